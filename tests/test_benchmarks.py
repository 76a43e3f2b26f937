"""Smoke tests: every benchmark script runs on its smallest setting, so the scripts cannot rot."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"

CASES = {
    "conversion_time": ["--models", "resnet18", "--size", "64", "--repeats", "1"],
    "decouple_speed": ["--repeats", "1"],
    "call_overhead": ["--calls", "10"],
    "finetune_digits": ["--epochs", "1", "--seeds", "0", "--configs", "rank1"],
    "budgets_digits": ["--budgets", "0.5", "--finetune-epochs", "1", "--latency-models"],
    "budgets_latency": ["--budgets", "--latency-models", "resnet18", "--target-latency", "0.8"],
    "zoo_coverage": ["--timm", "resnet18", "--torchvision", "resnet18", "--workers", "1"],
    "recovery": ["--models", "digits_cnn", "--configs", "r1", "--inits", "svd", "--seeds", "0", "--epochs", "1"],
    "latency": ["--models", "timm:resnet18", "--batch-size", "1", "--variants", "rank1", "--runtimes", "eager",
                "onnxruntime", "--warmup", "0", "--iters", "2"],
    "runtime_decisions": ["--batch-size", "1", "--iters", "3", "--checks", "compare"],
    "vs_pruning": ["--iters", "1", "--rounds", "1", "--batch-size", "1"],
    "real_weights": ["--models", "digits_cnn", "--targets", "0.5", "--distill-steps", "2"],
    "onnx_forms": ["--cases", "digits_cnn rank 2", "--batch-size", "1", "--iters", "1"],
    "kernels": ["--batch-sizes", "1", "--models", "resnet18", "--model-batch", "1", "--iters", "1", "--rounds", "1"],
}


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(CASES))
def test_benchmark_runs(script, tmp_path, digits_cache):
    env = {**os.environ, "DSD_BENCHMARK_RESULTS": str(tmp_path), "DSD_CACHE": str(digits_cache)}
    command = "budgets_digits" if script == "budgets_latency" else script  # one script, two result files
    result = subprocess.run([sys.executable, f"{command}.py", *CASES[script]], cwd=BENCHMARKS, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads((tmp_path / f"{script}.json").read_text())
    assert data["rows"] and data["environment"]["torch"]
    results_md = (tmp_path / "RESULTS.md").read_text()  # regenerated with this run's section
    assert data["environment"]["command"] in results_md and data["environment"]["torch"] in results_md


@pytest.mark.slow
def test_zoo_coverage_smoke_checks_real_conversions(tmp_path):
    """The smallest zoo coverage run passes its own checks: converted, shapes kept, full rank exact."""
    env = {**os.environ, "DSD_BENCHMARK_RESULTS": str(tmp_path)}
    subprocess.run([sys.executable, "zoo_coverage.py", *CASES["zoo_coverage"]], cwd=BENCHMARKS, env=env, check=True,
                   capture_output=True, timeout=900)
    data = json.loads((tmp_path / "zoo_coverage.json").read_text())
    assert [r["status"] for r in data["rows"]] == ["pass", "pass"]
    assert all(r["shapes_preserved"] and r["converted"] == 17 for r in data["rows"])
    assert [r["status"] for r in data["sample"]] == ["pass", "pass"]
    assert all(r["full_rank_error"] < 1e-6 for r in data["sample"])
