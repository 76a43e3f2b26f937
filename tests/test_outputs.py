"""Outputs that survive failures and races: staged writes, exclusive claims, weights+plan pairs, stale temporaries."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import dsd
from dsd.cli.main import convert_main
from dsd.fileio import TEMP_SUFFIX, OutputSet, remove_stale_temporaries

BIN = Path(sys.executable).parent
SMALL = ["dsd:digits_cnn", "--arch-kwarg", "width=8", "--input-size", "1", "32", "32", "--quiet"]


def _snapshot(folder: Path):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_a_failed_force_run_keeps_the_earlier_files_byte_for_byte(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert convert_main([*SMALL, "--json", "r.json"]) == 0
    earlier = _snapshot(tmp_path)

    def broken(*args, **kwargs):
        raise RuntimeError("disk on fire")
    monkeypatch.setattr("dsd.cli.convert.compare", broken)  # fails after the new weights were staged
    assert convert_main([*SMALL, "--json", "r.json", "--rank", "2", "--force"]) == 1
    assert _snapshot(tmp_path) == earlier
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    if not torch.cuda.is_available():
        assert convert_main([*SMALL, "--device", "cuda", "--force"]) == 2
        assert _snapshot(tmp_path) == earlier
    assert "disk on fire" in capsys.readouterr().err


def test_of_two_runs_claiming_one_file_exactly_one_wins(tmp_path):
    target = tmp_path / "out.txt"
    first, second = OutputSet([target]), OutputSet([target])
    first.path(target).write_text("first")
    second.path(target).write_text("second")
    assert first.commit() == [target]
    with pytest.raises(dsd.DsdError, match="created by someone else"):
        second.commit()
    assert target.read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"], "the loser leaves no temporaries"


def test_a_refused_commit_undoes_what_it_placed(tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "a.plan.json"
    b.write_text("someone else's")
    outputs = OutputSet([a, b])
    outputs.path(a).write_text("weights")
    outputs.path(b).write_text("plan")
    with pytest.raises(dsd.DsdError):
        outputs.commit()
    assert not a.exists() and b.read_text() == "someone else's"


def test_folders_made_for_the_outputs_go_again_when_the_run_fails(tmp_path):
    final = tmp_path / "new" / "deeper" / "report.json"
    with pytest.raises(RuntimeError):
        with OutputSet([final]) as outputs:
            outputs.path(final).write_text("{}")
            raise RuntimeError("the run failed")
    assert list(tmp_path.iterdir()) == []
    with OutputSet([final]) as outputs:
        outputs.path(final).write_text("{}")
        assert outputs.commit() == [final]
    assert final.read_text() == "{}"


def test_concurrent_command_line_runs(tmp_path):
    command = [str(BIN / "dsd-convert"), *SMALL, "-o", "same.safetensors"]
    runs = [subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]
    codes = sorted(run.wait(timeout=300) for run in runs)
    assert codes == [0, 2], [run.stderr.read() for run in runs]
    assert isinstance(dsd.load_converted(tmp_path / "same.plan.json"), torch.nn.Module)
    assert not list(tmp_path.glob(f"*{TEMP_SUFFIX}"))


def test_weights_that_do_not_belong_to_the_plan_are_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert convert_main([*SMALL, "-o", "a.safetensors"]) == 0
    assert convert_main([*SMALL, "-o", "b.safetensors", "--rank", "2"]) == 0
    (tmp_path / "b.safetensors").replace(tmp_path / "a.safetensors")  # as if a --force run died between renames
    with pytest.raises(dsd.DsdError, match="SHA-256 differs"):
        dsd.load_converted(tmp_path / "a.plan.json")


def test_stale_temporaries_of_dead_runs_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".x.safetensors.{int(dead.stdout)}.abcd{TEMP_SUFFIX}"
    live = tmp_path / f".y.safetensors.{os.getppid()}.abcd{TEMP_SUFFIX}"
    stale.write_text("x")
    live.write_text("y")
    assert remove_stale_temporaries(tmp_path) == [stale]
    assert live.exists()


@pytest.mark.slow
def test_kill_9_never_leaves_a_plan_without_its_weights(tmp_path):
    """Kill runs at moments spread over their lifetime; every plan left must load, and the next run cleans up."""
    for delay in (2.0, 3.0, 3.5, 4.0, 4.5, 5.0, 6.0):
        folder = tmp_path / f"kill{delay}"
        folder.mkdir()
        run = subprocess.Popen([str(BIN / "dsd-convert"), *SMALL, "--json", "r.json"], cwd=folder,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        run.send_signal(signal.SIGKILL)
        run.wait()
        plan = folder / "digits_cnn_dsd.plan.json"
        if plan.exists():
            dsd.load_converted(plan)  # raises if the pair is inconsistent
        again = subprocess.run([str(BIN / "dsd-convert"), *SMALL, "--force"], cwd=folder, capture_output=True, text=True)
        assert again.returncode == 0, again.stderr
        assert not list(folder.glob(f"*{TEMP_SUFFIX}")), "the next run removes the dead run's temporaries"
