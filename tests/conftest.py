import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _fresh_timings(monkeypatch):
    """Every test measures afresh: the user's layer-timing cache is neither read nor written."""
    monkeypatch.setenv("DSD_LATENCY_CACHE", "off")


@pytest.fixture(scope="session")
def digits_cache(tmp_path_factory):
    """A DSD_CACHE holding the trained dsd:digits_cnn teacher, trained once per test session."""
    import os

    from dsd import zoo
    from dsd.finetune.distributed import DistEnv
    from dsd.finetune.models import train_builtin

    cache = tmp_path_factory.mktemp("dsd-cache")
    previous = os.environ.get("DSD_CACHE")
    os.environ["DSD_CACHE"] = str(cache)
    train_builtin("digits_cnn", DistEnv(), progress=False)
    assert zoo.cached_weights("digits_cnn").is_file()
    yield cache
    if previous is None:
        os.environ.pop("DSD_CACHE", None)
    else:
        os.environ["DSD_CACHE"] = previous
