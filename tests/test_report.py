"""Savings report: exact counts, the fvcore cross-check, JSON schema, plot, CPU latency."""
import json
import struct

import pytest
import timm
import torch
import torch.nn as nn

import dsd
from dsd.savings import SavingsReport, count_flops
from dsd.timing import BenchmarkSettings, layer_latency


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.b = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.c = nn.Conv2d(16, 16, 5, padding=2, groups=4, bias=False)

    def forward(self, x):
        return self.c(self.b(self.a(x)))


def test_exact_params_and_flops_on_hand_built_net():
    model = Tiny()
    counts = count_flops(model, torch.randn(1, 3, 16, 16))
    assert counts.params[""] == 3 * 8 * 9 + (8 * 16 * 9 + 16) + 16 * 4 * 25
    assert counts.by_module["a"] == 16 * 16 * 8 * 3 * 9
    assert counts.by_module["b"] == 8 * 8 * 16 * 8 * 9
    assert counts.by_module["c"] == 8 * 8 * 16 * 4 * 25
    assert counts.total == counts.by_module["a"] + counts.by_module["b"] + counts.by_module["c"]


def _check_analytical(model, x, rank, channels_last=False):
    """fvcore's count of each converted layer equals the analytical one from the conversion report."""
    converted, report = dsd.convert_model(model, x, rank=rank)
    if channels_last:
        model, converted = model.to(memory_format=torch.channels_last), converted.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    before, after = count_flops(model, x), count_flops(converted, x)
    assert report.converted
    for record in report.converted:
        oh, ow = record.output_shape[-2:]
        c, m, g, (kh, kw) = record.in_channels, record.out_channels, record.groups, record.kernel_size
        r, (nkh, nkw) = record.rank, record.new_kernel_size
        assert before.by_module[record.name] == record.macs_before == oh * ow * (c // g) * m * kh * kw
        assert after.by_module[record.name] == record.macs_after == oh * ow * (c * r * nkh * nkw + (c * r // g) * m)


class Wider(Tiny):
    """Tiny and an ungrouped conv on 16 channels: rank r there runs as r slices accumulated by GEMMs."""

    def __init__(self):
        super().__init__()
        self.d = nn.Conv2d(16, 24, 3, padding=1)

    def forward(self, x):
        return self.d(super().forward(x))


@pytest.mark.parametrize("rank", [1, 3])
@pytest.mark.parametrize("channels_last", [False, True])
def test_fvcore_matches_analytical_counts_hand_built(rank, channels_last):
    _check_analytical(Wider(), torch.randn(1, 3, 16, 16), rank, channels_last)


def test_fvcore_matches_analytical_counts_resnet50():
    _check_analytical(timm.create_model("resnet50"), torch.randn(1, 3, 224, 224), 1)


def test_unsupported_ops_are_collected_not_printed(capfd, caplog):
    model = timm.create_model("efficientnet_b0")
    counts = count_flops(model, torch.randn(1, 3, 64, 64))
    assert "aten::silu_" in counts.unsupported_ops
    out, err = capfd.readouterr()
    assert "Unsupported operator" not in out + err + caplog.text


@pytest.fixture(scope="module")
def report():
    model = Tiny()
    converted, _ = dsd.convert_model(model, torch.randn(1, 3, 16, 16))
    return dsd.compare(model, converted, input_size=(3, 16, 16), batch_size=2, warmup=1, iters=3)


def test_compare_report_contents(report):
    assert [layer.name for layer in report.layers] == ["a", "b", "c"]
    assert report.environment["device"] == "cpu" and report.environment["threads"] >= 1
    assert report.environment["batch_size"] == 2 and report.environment["torch"] == torch.__version__
    for layer in [*report.layers, report.total]:
        assert layer.latency_before.iters == 3 and layer.latency_before.p10_ms <= layer.latency_before.p90_ms
        assert layer.flops_after < layer.flops_before and layer.speedup > 0
    assert report.total.flops_before == sum(layer.flops_before for layer in report.layers)
    text = report.summary()
    assert "FLOPs" in text and "one fused multiply-add counts as one FLOP" in text and "batch 2" in text


def test_json_schema_round_trip(report, tmp_path):
    path = tmp_path / "r.json"
    report.to_json(str(path))
    data = json.loads(path.read_text())
    assert data["schema"] == "dsd.savings" and data["version"] == 2
    assert set(data["total"]) == {"params_before", "params_after", "flops_before", "flops_after",
                                  "latency_before", "latency_after", "speedup_p10", "speedup_p90"}
    assert data["total"]["speedup_p10"] <= data["total"]["speedup_p90"]
    assert SavingsReport.from_dict(data).to_dict() == data
    with pytest.raises(ValueError, match="not a dsd.savings v2 report"):
        SavingsReport.from_dict({**data, "version": 99})


def test_version_1_reports_still_load(report):
    """Written before the intervals and the samples existed."""
    data = report.to_dict()
    data["version"] = 1
    for row in [data["total"], *data["layers"]]:
        del row["speedup_p10"], row["speedup_p90"]
        for key in ("latency_before", "latency_after"):
            del row[key]["samples_ms"]
    loaded = SavingsReport.from_dict(data)
    assert loaded.total.speedup == pytest.approx(report.total.speedup) and loaded.total.speedup_p10 is None
    assert "speedup" in loaded.summary()


def test_plot_is_a_real_png(report, tmp_path):
    path = tmp_path / "savings.png"
    report.plot(str(path))
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert width >= 600 and height >= 200 and len(data) > 10_000


def test_markdown_and_rich_tables(report):
    markdown = report.to_markdown()
    assert markdown.count("\n| ") == len(report.layers) + 2  # header, rows, total
    from rich.console import Console
    console = Console(record=True, width=200)
    console.print(report.to_rich())
    assert "total" in console.export_text()


def test_flops_only_report_without_latency():
    model = Tiny()
    converted, _ = dsd.convert_model(model, torch.randn(1, 3, 16, 16))
    report = dsd.compare(model, converted, input_size=(3, 16, 16), latency=False)
    assert report.environment is None and report.total.speedup is None
    assert SavingsReport.from_json(report.to_json()).to_dict() == report.to_dict()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_compare_counts_a_half_precision_model_in_its_dtype(dtype):
    """The counting input takes the model's dtype; latency in float32 of a half-precision model is refused with
    what to do (it failed inside the timing with PyTorch's dtype error)."""
    model = Tiny()
    converted, _ = dsd.convert_model(model, torch.randn(1, 3, 16, 16), rank=1)
    full = dsd.compare(model, converted, (3, 16, 16), latency=False)
    model, converted = model.to(dtype), converted.to(dtype)
    half = dsd.compare(model, converted, (3, 16, 16), latency=False)
    assert (half.total.flops_before, half.total.flops_after) == (full.total.flops_before, full.total.flops_after)
    with pytest.raises(dsd.DsdError, match="weights are .*: time it in that dtype"):
        dsd.compare(model, converted, (3, 16, 16))
    timed = dsd.compare(model, converted, (3, 16, 16), dtype=str(dtype).replace("torch.", ""), warmup=0, iters=2,
                        per_layer=False)
    assert timed.total.latency_before is not None and timed.total.latency_after is not None


def test_layer_latency_is_reusable():
    stats = layer_latency(nn.Conv2d(8, 8, 3, padding=1), (1, 8, 12, 12), BenchmarkSettings(warmup=0, iters=2),
                          batch_size=4)
    assert stats.iters == 2 and stats.images_per_s > 0


def test_cuda_requested_without_gpu_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ValueError, match="no CUDA GPU"):
        BenchmarkSettings(device="cuda")


class SharedHead(nn.Module):
    """One conv run on two levels, as a detector's head runs on each level of its feature pyramid."""

    def __init__(self):
        super().__init__()
        self.head = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        return self.head(x).mean((2, 3)) + self.head(x[..., ::2, ::2]).mean((2, 3))


def test_a_layer_called_on_several_inputs_is_timed_on_each_as_its_flops_count_it(monkeypatch):
    """Its row's FLOPs sum both calls; so does its time: each call's shape timed (the timing injected: width in
    ms for the dense conv, half that for the converted layer), iteration by iteration."""
    import importlib

    from dsd.timing import LatencyStats
    compare_module = importlib.import_module("dsd.savings.compare")

    def fake_measure_layer(pair, shape, settings):
        return [LatencyStats.of([float(shape[-1]) * share] * 3, settings.batch_size) for share in (1.0, 0.5)]

    monkeypatch.setattr(compare_module, "measure_layer", fake_measure_layer)
    model = SharedHead().eval()
    converted, _ = dsd.convert_model(model, torch.randn(1, 8, 16, 16), rank=1)
    report = dsd.compare(model, converted, (8, 16, 16), BenchmarkSettings(warmup=0, iters=2))
    (row,) = report.layers
    assert row.flops_before == count_flops(model, torch.randn(1, 8, 16, 16)).by_module["head"]
    assert row.latency_before.median_ms == 16 + 8 and row.latency_after.median_ms == 12
