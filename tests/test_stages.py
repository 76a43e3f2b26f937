"""Each stage of the conversion pass on its own: describe, choose ranks, keep faster, initialise, rewrite."""
import torch
import torch.nn as nn

from dsd.convert import ConvertOptions
from dsd.convert.match import analyze
from dsd.convert.pipeline import choose_layer_ranks, describe_layers, initialise_layers, keep_faster_layers, rewrite
from dsd.layers import DepthwiseSeparableConv2d
from dsd.timing import LatencyStats


def _model():
    shared = nn.Conv2d(16, 16, 3, padding=1)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), shared, nn.ReLU(), shared, nn.Conv2d(16, 32, 1),
                         nn.Conv2d(32, 32, 3, padding=1, groups=32), nn.Conv2d(32, 8, 5, padding=2))


def _described(options=ConvertOptions()):
    model, x = _model().eval(), torch.randn(1, 3, 12, 12)
    analysis = analyze(model, x)
    return model, x, analysis, *describe_layers(analysis, options)


def test_describe_makes_one_record_per_conv_in_execution_order():
    model, _, analysis, records, eligible = _described()
    assert list(records) == ["0", "1", "4", "5", "6"]  # the shared conv once, under its first name
    assert {n: r.status for n, r in records.items()} == {
        "0": "pending", "1": "pending", "4": "skipped", "5": "skipped", "6": "pending"}
    assert records["4"].category == "1x1 kernel" and records["5"].category == "already depthwise"
    assert [site.name for site, _ in eligible] == ["0", "1", "6"]
    assert records["1"].calls == 2 and records["1"].macs_before == 2 * 144 * 16 * 16 * 9


def test_choose_ranks_marks_what_the_budget_keeps_dense():
    options = ConvertOptions(target_flops=0.3)
    model, _, analysis, records, eligible = _described(options)
    chosen, outcome = choose_layer_ranks(eligible, records, analysis, options, model)
    assert outcome.kind == "flops" and outcome.reached <= 0.3
    kept_dense = {site.name for site, _ in eligible} - {site.name for site, _ in chosen}
    assert all(records[name].category == "budget" for name in kept_dense)
    assert all(spec.rank >= 1 for _, spec in chosen)


def test_keep_faster_drops_the_layers_measured_slower(monkeypatch):
    times = {"0": (1.0, 2.0), "1": (3.0, 1.0), "6": (5.0, 4.0)}  # (dense, separable) ms

    def injected(site, variants, settings):
        return [LatencyStats.of([times[site.name][isinstance(m, DepthwiseSeparableConv2d)]] * 5, 1) for m in variants]
    monkeypatch.setattr("dsd.convert.choose.site_timings", injected)
    _, _, _, records, eligible = _described()
    kept, end_to_end = keep_faster_layers(eligible, records, ConvertOptions(only_if_faster=True))
    assert end_to_end is None  # no whole-model timer given: per layer only
    assert [site.name for site, _ in kept] == ["1", "6"]
    assert records["0"].category == "not faster" and records["1"].latency_before_ms == 3.0


def test_initialise_then_rewrite_keeps_shared_layers_shared():
    options = ConvertOptions(rank="full", only_if_cheaper=False)
    model, x, _, records, eligible = _described(options)
    expected = model(x)
    layers, specs = initialise_layers(eligible, records, options, model, model, None, None)
    assert [s.name for s in specs] == ["0", "1", "6"] and all(s.init_error < 1e-6 for s in specs)
    assert all(records[s.name].status == "converted" for s in specs)
    rewrite(model, layers, options)
    assert model[1] is model[3] and isinstance(model[1], DepthwiseSeparableConv2d)
    torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-5)
