"""Every snippet in README.md runs: the Python blocks in order (slow: real timm models, real timings), and
every command line of the shell blocks parses with the flags it names."""
import re
import shlex
from pathlib import Path

import pytest
import torch

README = (Path(__file__).parent.parent / "README.md").read_text()
PYTHON = re.findall(r"```python\n(.*?)```", README, re.S)
SHELL = re.findall(r"```bash\n(.*?)```", README, re.S)


def _command_lines():
    for block in SHELL:
        for line in block.splitlines():
            words = shlex.split(line, comments=True)
            if words and words[0] in ("dsd", "dsd-convert"):
                yield words
            elif words[:3] == ["torchrun", "--nproc_per_node", "8"]:
                yield ["dsd", *words[words.index("dsd.cli") + 1:]]


@pytest.mark.parametrize("words", list(_command_lines()), ids=lambda w: " ".join(w)[:60])
def test_every_readme_command_parses(words):
    from dsd.cli import convert
    from dsd.cli.common import ArgumentParser
    from dsd.cli.main import build_parser
    if words[0] == "dsd-convert":
        parser = ArgumentParser(prog="dsd-convert")
        convert.add_arguments(parser)
        parser.parse_args(words[1:])
    else:
        build_parser().parse_args(words[1:])


def test_the_readme_has_snippets():
    assert len(PYTHON) >= 3 and len(list(_command_lines())) >= 8


@pytest.mark.slow
def test_readme_python_snippets_run_in_order(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DSD_LATENCY_CACHE", str(tmp_path / "latency-cache"))
    images = torch.utils.data.TensorDataset(torch.randn(16, 3, 224, 224), torch.zeros(16, dtype=torch.long))
    namespace = {"train_loader": torch.utils.data.DataLoader(images, batch_size=8)}  # the reader's own data
    for block in PYTHON:
        if 'device="cuda"' in block and not torch.cuda.is_available():
            block = block.replace('gpu = dsd.BenchmarkSettings(device="cuda"', 'gpu = dict(device="cuda"')
        exec(compile(block, "README.md", "exec"), namespace)
    assert (tmp_path / "resnet50_dsd.plan.json").is_file() and (tmp_path / "savings.png").is_file()
