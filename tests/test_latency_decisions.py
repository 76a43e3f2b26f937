"""Latency decided in the user's runtime: the decision logic with injected timings (real timings belong in
benchmarks/), the interval, the on-disk cache, the settings' validation and one real onnxruntime run."""
import importlib.util

import pytest
import torch
import torch.nn as nn

import dsd
from dsd.errors import DsdError
from dsd.layers import DepthwiseSeparableConv2d, static_forms
from dsd.layers.cost import dense_macs_per_pixel, output_pixels, separable_macs_per_pixel
from dsd.timing import BenchmarkSettings, LatencyStats, Speedup, cache, measure, measure_layer, runtimes


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.b = nn.Conv2d(16, 32, 3, padding=1, bias=False)
        self.c = nn.Conv2d(32, 32, 5, padding=2, groups=2)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        x = self.c(torch.relu(self.b(torch.relu(self.a(x)))))
        return self.head(x.mean((2, 3)))


def _stats(ms: float) -> LatencyStats:
    """Five iterations 1% apart: a tight but honest interval."""
    return LatencyStats.of([ms * (1 + 0.01 * (i - 2)) for i in range(5)], 1)


def _macs_ms(site, module) -> float:
    pixels = output_pixels(site.call_shapes)
    if isinstance(module, DepthwiseSeparableConv2d):
        per_pixel = separable_macs_per_pixel(module.in_channels, module.out_channels, module.kernel_size,
                                             module.rank, module.groups)
    else:
        per_pixel = dense_macs_per_pixel(module.in_channels, module.out_channels, module.kernel_size, module.groups)
    return pixels * per_pixel / 1e6


class Injected:
    """Layer timings proportional to multiply-adds (``isolated``: a per-layer factor on the separable form);
    the whole model is ``overhead_ms`` plus its layers, a separable layer costing ``in_context`` times more
    inside the model than alone (what a per-layer timing cannot see)."""

    def __init__(self, monkeypatch, overhead_ms=0.0, in_context=None, isolated=None, time_of=_macs_ms):
        self.sites, self.overhead_ms, self.time_of = {}, overhead_ms, time_of
        self.in_context, self.isolated = in_context or {}, isolated or {}
        self.whole_model_calls = 0
        monkeypatch.setattr("dsd.convert.choose.site_timings", self.site_timings)
        monkeypatch.setattr("dsd.convert.end_to_end.model_timings", self.model_timings)

    def _layer_ms(self, site, module, factors):
        separable = isinstance(module, DepthwiseSeparableConv2d)
        return self.time_of(site, module) * (factors.get(site.name, 1.0) if separable else 1.0)

    def site_timings(self, site, variants, settings):
        self.sites[site.name] = site
        return [_stats(self._layer_ms(site, m, self.isolated)) for m in variants]

    def model_ms(self, model):
        return self.overhead_ms + sum(self._layer_ms(site, model.get_submodule(name), self.in_context)
                                      for name, site in self.sites.items())

    def model_timings(self, original, candidate, input_shape, settings, progress=False):
        self.whole_model_calls += 1
        return _stats(self.model_ms(original)), _stats(self.model_ms(candidate))


X = torch.randn(1, 3, 16, 16)


def test_target_latency_is_a_share_of_the_whole_models_latency(monkeypatch):
    injected = Injected(monkeypatch, overhead_ms=2.0)
    converted, report = dsd.convert_model(Net().eval(), X, target_latency=0.6)
    outcome = report.budget
    assert outcome.end_to_end is not None and outcome.end_to_end.rounds == 1
    measured = injected.model_ms(converted) / injected.model_ms(Net())
    assert outcome.reached == pytest.approx(measured) and outcome.reached <= 0.6
    assert "measured end to end" in report.summary() and "end to end (eager, cpu, float32, batch 1)" in report.summary()
    _, report = dsd.convert_model(Net().eval(), X, target_latency=0.6,
                                  benchmark=BenchmarkSettings(channels_last=True, batch_size=4))
    assert "end to end (eager, cpu, float32, channels_last, batch 4)" in report.summary()  # as the user deploys


def test_target_latency_tightens_when_the_whole_model_disagrees(monkeypatch):
    """Alone the separable layers look 2x cheaper than they are inside the model: the first choice misses the
    target end to end, and dsd chooses again on a budget tightened by the miss."""
    injected = Injected(monkeypatch, overhead_ms=0.5, in_context={"a": 2.0, "b": 2.0, "c": 2.0})
    converted, report = dsd.convert_model(Net().eval(), X, target_latency=0.5)
    assert report.budget.end_to_end.rounds >= 2
    assert report.budget.reached <= 0.5
    assert report.budget.reached == pytest.approx(injected.model_ms(converted) / injected.model_ms(Net()))


def test_an_unmet_latency_target_is_reported_not_hidden(monkeypatch):
    Injected(monkeypatch, overhead_ms=0.5, in_context={"a": 6.0, "b": 6.0, "c": 6.0})
    _, report = dsd.convert_model(Net().eval(), X, target_latency=0.5)
    assert report.budget.reached > 0.5
    assert "not met" in report.summary()


def test_a_latency_budget_never_buys_more_multiply_adds(monkeypatch):
    """Timings that make every rank equally fast: without only_if_cheaper the least-error rank (the highest)
    would win, though it costs more multiply-adds than the dense conv."""
    flat = Injected(monkeypatch, time_of=lambda site, module: 1.0 if isinstance(module, DepthwiseSeparableConv2d)
                    else 10.0)
    _, report = dsd.convert_model(Net().eval(), X, target_latency=0.5)
    assert flat.whole_model_calls >= 1 and report.converted
    assert all(r.macs_after < r.macs_before for r in report.converted)
    _, costlier = dsd.convert_model(Net().eval(), X, target_latency=0.5, only_if_cheaper=False)
    assert any(r.macs_after >= r.macs_before for r in costlier.converted)


def _conv_macs_share(report) -> float:
    after = sum(r.macs_before if r.macs_after is None else r.macs_after for r in report.layers)
    return after / sum(r.macs_before for r in report.layers)


def test_a_latency_budget_with_a_flop_cap_meets_both(monkeypatch):
    """Separable layers 3x slower per multiply-add than dense ones (as on CPUs at high rank): the latency
    budget alone spends its time on high ranks; with target_flops as well, the FLOPs hold too."""
    injected = Injected(monkeypatch, overhead_ms=0.5, isolated={"a": 3.0, "b": 3.0, "c": 3.0},
                        in_context={"a": 3.0, "b": 3.0, "c": 3.0})
    _, alone = dsd.convert_model(Net().eval(), X, target_latency=0.8)
    cap = round(_conv_macs_share(alone) * 0.7, 3)
    converted, both = dsd.convert_model(Net().eval(), X, target_latency=0.8, target_flops=cap,
                                        target_flops_of="convs")
    assert both.budget.kind == "latency" and both.budget.reached <= 0.8
    assert both.budget.reached == pytest.approx(injected.model_ms(converted) / injected.model_ms(Net()))
    assert both.budget.cap.kind == "flops" and both.budget.cap.reached <= cap
    assert both.budget.cap.reached == pytest.approx(_conv_macs_share(both))
    assert f"; and flops {cap:g}, reached" in both.summary()
    assert both.plan.options["target_flops"] == cap and both.plan.options["target_latency"] == 0.8


def test_two_budgets_only_as_a_latency_budget_with_a_cap():
    for budgets in ({"target_flops": 0.5, "target_params": 0.5}, {"energy": 0.9, "target_latency": 0.5}):
        with pytest.raises(DsdError, match="choose one of"):
            dsd.ConvertOptions(**budgets)


def test_only_if_faster_reverts_until_the_model_is_not_slower(monkeypatch):
    """Every layer is faster alone, but inside the model layer a's separable form costs 500x: dsd makes dense
    again the layers with the smallest gain until the whole model is not slower."""
    injected = Injected(monkeypatch, in_context={"a": 500.0})
    converted, report = dsd.convert_model(Net().eval(), X, only_if_faster=True)
    gains = {r.name: r.latency_before_ms - r.latency_after_ms for r in report.layers}
    assert min(gains, key=gains.get) == "a"
    assert report.end_to_end.reverted == ["a"] and report.end_to_end.speedup.median >= 1.0
    assert {r.name for r in report.converted} == {"b", "c"}
    assert {r.name: r.category for r in report.skipped} == {"a": "not faster"}
    assert "made dense again" in next(r.reason for r in report.skipped)
    assert injected.model_ms(converted) <= injected.model_ms(Net())


def test_only_if_faster_keeps_a_layer_whose_interval_includes_one(monkeypatch):
    times = {"a": ([1.0, 1.2, 0.8, 1.1, 0.9], [1.05, 1.25, 0.85, 1.0, 0.95]),  # too close to tell: kept
             "b": ([1.0, 1.01, 0.99, 1.0, 1.0], [2.0, 2.02, 1.98, 2.0, 2.0]),  # clearly slower: dense
             "c": ([3.0, 3.0, 3.1, 2.9, 3.0], [1.0, 1.0, 1.1, 0.9, 1.0])}

    def site_timings(site, variants, settings):
        return [LatencyStats.of(times[site.name][isinstance(m, DepthwiseSeparableConv2d)], 1) for m in variants]
    monkeypatch.setattr("dsd.convert.choose.site_timings", site_timings)
    monkeypatch.setattr("dsd.convert.end_to_end.model_timings", lambda *a, **k: (_stats(2.0), _stats(1.0)))
    _, report = dsd.convert_model(Net().eval(), X, only_if_faster=True)
    assert {r.name for r in report.converted} == {"a", "c"}
    b = next(r for r in report.skipped if r.name == "b")
    assert b.category == "not faster" and "p10-p90" in b.reason


def test_a_model_of_several_inputs_decides_per_layer(monkeypatch):
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = Net()

        def forward(self, x, y):
            return self.net(x + y)
    Injected(monkeypatch)
    _, report = dsd.convert_model(TwoInputs().eval(), (X, X), only_if_faster=True)
    assert report.end_to_end is None and len(report.converted) == 3


# -- the interval ---------------------------------------------------------------------------------

def test_speedup_interval():
    fast = LatencyStats.of([1.0, 1.01, 0.99, 1.02, 0.98, 1.0], 1)
    slow = LatencyStats.of([2.0, 2.02, 1.98, 2.01, 1.99, 2.0], 1)
    noisy = LatencyStats.of([0.5, 1.5, 1.0, 2.0, 0.7, 1.2], 1)
    assert Speedup.of(slow, fast).clearly_faster and Speedup.of(fast, slow).clearly_slower
    interval = Speedup.of(fast, noisy)
    assert interval.uncertain and interval.p10 < interval.median < interval.p90
    assert Speedup.of(slow, fast) == Speedup.of(slow, fast)  # seeded: the same figures every time
    single = Speedup.of(LatencyStats.of([2.0], 1), LatencyStats.of([1.0], 1))
    assert (single.p10, single.median, single.p90) == (2.0, 2.0, 2.0)


def test_summed_calls_add_iteration_by_iteration():
    total = LatencyStats.summed([LatencyStats.of([1.0, 2.0, 3.0], 4), LatencyStats.of([10.0, 20.0, 30.0], 4)], 4)
    assert total.samples_ms == [11.0, 22.0, 33.0] and total.median_ms == 22.0


# -- the cache ------------------------------------------------------------------------------------

def test_a_second_measurement_of_the_same_layer_comes_from_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("DSD_LATENCY_CACHE", str(tmp_path))
    measured = []
    real = dsd.timing.latency.measure

    def counting(modules, *args, **kwargs):
        measured.append(len(modules))
        return real(modules, *args, **kwargs)
    monkeypatch.setattr("dsd.timing.latency.measure", counting)
    conv = nn.Conv2d(8, 8, 3, padding=1)
    separable = dsd.layers.DepthwiseSeparableConv2d(8, 8, 3, padding=((1, 1), (1, 1)))
    settings = BenchmarkSettings(warmup=0, iters=3)
    first = measure_layer([conv, separable], (1, 8, 12, 12), settings)
    again = measure_layer([nn.Conv2d(8, 8, 3, padding=1), separable], (1, 8, 12, 12), settings)
    assert measured == [2] and [s.samples_ms for s in first] == [s.samples_ms for s in again]
    measure_layer([conv], (1, 8, 12, 12), settings.updated(batch_size=2))  # another batch: measured
    measure_layer([nn.Conv2d(8, 8, 3, padding=2, dilation=2)], (1, 8, 12, 12), settings)  # another geometry
    assert measured == [2, 1, 1] and len(list(tmp_path.glob("*.json"))) == 4


def test_the_cache_can_be_switched_off_and_survives_a_broken_entry(monkeypatch, tmp_path):
    settings = BenchmarkSettings(warmup=0, iters=2)
    conv = nn.Conv2d(4, 4, 3)
    monkeypatch.setenv("DSD_LATENCY_CACHE", "off")
    assert cache.cache_dir() is None
    measure_layer([conv], (1, 4, 8, 8), settings)
    monkeypatch.setenv("DSD_LATENCY_CACHE", str(tmp_path))
    key = cache.layer_key(conv, (1, 4, 8, 8), settings)
    (tmp_path / f"{key}.json").write_text("{not json")
    (stats,) = measure_layer([conv], (1, 4, 8, 8), settings)
    assert stats.iters == 2 and cache.load(key) is not None
    with static_forms():  # a timing with the separable layers' forms untimed is another timing
        assert cache.layer_key(conv, (1, 4, 8, 8), settings) != key


def test_timings_cached_by_other_code_of_the_same_version_are_not_reused(monkeypatch, tmp_path):
    """A development checkout keeps one version number while its layers change: the key holds a digest of dsd's
    source, so a timing made by other code is measured again."""
    package = tmp_path / "pkg"
    (package / "layers").mkdir(parents=True)
    (package / "layers" / "forms.py").write_text("FAST = True\n")
    (package / "notes.txt").write_text("not code")
    first = cache.source_digest(package)
    assert cache.source_digest(package) == first
    (package / "notes.txt").write_text("still not code")
    assert cache.source_digest(package) == first
    (package / "layers" / "forms.py").write_text("FAST = False\n")
    assert cache.source_digest(package) != first
    (package / "layers" / "forms.py").write_text("FAST = True\n")
    (package / "layers" / "forms.py").rename(package / "forms.py")  # the same text elsewhere is other code
    assert cache.source_digest(package) != first
    conv, settings = nn.Conv2d(4, 4, 3), BenchmarkSettings(warmup=0, iters=2)
    key = cache.layer_key(conv, (1, 4, 8, 8), settings)
    monkeypatch.setattr(cache, "_dsd_source_digest", lambda: "other code")
    assert cache.layer_key(conv, (1, 4, 8, 8), settings) != key


# -- the settings ---------------------------------------------------------------------------------

@pytest.mark.parametrize("changes, message", [
    (dict(runtime="tensorrt"), "runtime must be one of eager, compile, cudagraph, onnxruntime"),
    (dict(runtime="cudagraph"), "needs a CUDA device"),
    (dict(runtime="onnxruntime", dtype="float16"), "float32"),
    (dict(runtime="onnxruntime", channels_last=True), "channels_last does not apply"),
    (dict(threads=0), "threads must be an integer >= 1"),
    (dict(device="mps"), "cpu or cuda"),
    (dict(compile=True, runtime="onnxruntime"), "disagree"),
    (dict(speed="fast"), "unknown benchmark setting 'speed'"),
    (dict(compile_mode="fast", runtime="compile"), "compile_mode must be one of default, reduce-overhead"),
    (dict(compile_mode="reduce-overhead"), "applies to runtime compile, not 'eager'"),
    (dict(freezing=True), "freezing applies to runtime compile, not 'eager'"),
    (dict(freezing="yes", runtime="compile"), "freezing must be true or false"),
])
def test_bad_settings_are_refused_in_words(changes, message):
    with pytest.raises(DsdError, match=message):
        BenchmarkSettings.from_dict(changes)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_cuda_runtimes_without_a_gpu_are_refused():
    with pytest.raises(DsdError, match="no CUDA GPU"):
        BenchmarkSettings(device="cuda", runtime="cudagraph")


def test_onnxruntime_missing_is_refused(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    with pytest.raises(DsdError, match=r"pip install 'dsd\[onnx\]'"):
        BenchmarkSettings(runtime="onnxruntime")


def test_the_compile_mode_is_described_where_it_is_not_the_default():
    assert BenchmarkSettings(runtime="compile").describe().startswith("compile, cpu")
    graphs = BenchmarkSettings(runtime="compile", compile_mode="reduce-overhead")
    assert graphs.describe().startswith("compile (reduce-overhead), cpu")
    assert BenchmarkSettings.from_dict(graphs.to_dict()) == graphs
    frozen = graphs.updated(freezing=True)
    assert frozen.describe().startswith("compile (reduce-overhead, freezing), cpu")


def test_a_frozen_compile_computes_what_eager_does_with_the_recomposed_kernel_computed_once():
    """Inductor's freezing folds what is computed from the weights alone (a dense-form layer's recomposed kernel):
    the timed step still computes the model, and a depthwise weight changed after compiling no longer reaches
    the output (Dynamo reads ``torch._inductor.config.freezing`` as it traces, not the options given to
    torch.compile: with those alone the weights stayed graph inputs and nothing was frozen). The setting decides,
    not the global flag."""
    torch.manual_seed(0)
    layer = DepthwiseSeparableConv2d(16, 24, 3, rank=2, padding=((1, 1), (1, 1))).pin_form("dense")
    model = nn.Sequential(layer, nn.BatchNorm2d(24), nn.ReLU()).eval()
    x = torch.randn(2, 16, 12, 12)
    for freezing in (True, False):
        settings = BenchmarkSettings(runtime="compile", freezing=freezing, batch_size=2)
        with torch.inference_mode(), torch._inductor.config.patch(freezing=not freezing):
            step = runtimes.prepare_step(model, x, settings)
            torch.testing.assert_close(step(), model(x), rtol=1e-5, atol=1e-5)
            before = step().clone()
            step.module[0].depthwise.weight.mul_(2.0)
            assert torch.equal(step(), before) == freezing


def test_every_model_timed_under_compile_is_compiled():
    """Dynamo keeps its compiled code per code object across the process and beyond 8 entries (its recompile
    limit) runs a frame eagerly, silently: a target_latency search times layers of many geometries, a benchmark
    many models, and the ninth would have been timed in eager PyTorch as if compiled."""
    from torch._dynamo.utils import counters
    settings = BenchmarkSettings(runtime="compile", batch_size=1, warmup=1, iters=1)
    for width in range(1, 10):  # one past the limit
        compiled = counters["frames"]["ok"]
        measure([nn.Sequential(nn.Conv2d(3, width, 3), nn.ReLU())], (1, 3, 8, 8), settings)
        assert counters["frames"]["ok"] > compiled, f"model {width} ran eagerly"


def test_the_compile_flag_of_earlier_releases_still_reads():
    assert BenchmarkSettings.from_dict({"compile": True}).runtime == "compile"
    assert BenchmarkSettings.from_dict({"compile": False, "device": "cpu"}).runtime == "eager"
    plan_record = {**BenchmarkSettings().to_dict(), "compile": False}
    plan_record.pop("runtime"), plan_record.pop("threads")
    assert BenchmarkSettings.from_dict(plan_record) == BenchmarkSettings()


# -- one real run in onnxruntime --------------------------------------------------------------------

def test_compare_and_only_if_faster_in_onnxruntime():
    settings = BenchmarkSettings(runtime="onnxruntime", batch_size=2, warmup=1, iters=3, threads=1)
    model = Net().eval()
    converted, report = dsd.convert_model(model, X, only_if_faster=True, benchmark=settings)
    assert report.end_to_end is not None and report.end_to_end.runtime == "onnxruntime"
    assert report.end_to_end.speedup.median >= 1.0 or not report.converted  # never slower: reverted if so
    savings = dsd.compare(model, converted, (3, 16, 16), settings)
    assert savings.environment["runtime"] == "onnxruntime" and savings.environment["onnxruntime"]
    assert savings.environment["threads"] == 1 and savings.total.latency_before.iters == 3
    assert savings.total.speedup_p10 <= savings.total.speedup <= savings.total.speedup_p90
    assert "measured in onnxruntime" in savings.summary()


def test_a_flop_budget_with_only_if_faster_chooses_among_the_faster_ranks(monkeypatch):
    """Ranks above 2 measure slower than the dense conv: the FLOP budget picks among dense, 1 and 2, and the
    FLOPs it reports are those of the model it returns (no layer is dropped after the budget)."""
    def time_of(site, module):
        slow = isinstance(module, DepthwiseSeparableConv2d) and module.rank > 2
        return _macs_ms(site, module) * (50.0 if slow else 1.0)
    Injected(monkeypatch, time_of=time_of)
    _, report = dsd.convert_model(Net().eval(), X, target_flops=0.7, target_flops_of="convs", only_if_faster=True)
    assert report.converted and all(r.rank <= 2 for r in report.converted)
    before, after = report.conv_macs()
    assert after / before == pytest.approx(report.budget.reached) and report.budget.reached <= 0.7
    _, unfiltered = dsd.convert_model(Net().eval(), X, target_flops=0.7, target_flops_of="convs")
    assert any(r.rank > 2 for r in unfiltered.converted)  # what the filter changed


# -- the forms an ONNX export is timed and written in --------------------------------------------------

class Stack(nn.Module):
    """Rank 1, rank 3 twice (one of them never called) and a rank-3 layer pinned already."""

    def __init__(self):
        super().__init__()
        self.one = DepthwiseSeparableConv2d(3, 16, 3, rank=1, padding=((1, 1), (1, 1)))
        self.three = DepthwiseSeparableConv2d(16, 16, 3, rank=3, padding=((1, 1), (1, 1)))
        self.pinned = DepthwiseSeparableConv2d(16, 16, 3, rank=3, padding=((1, 1), (1, 1))).pin_form("multiplier")
        self.unused = DepthwiseSeparableConv2d(16, 16, 3, rank=3, padding=((1, 1), (1, 1)))

    def forward(self, x):
        return self.pinned(self.three(self.one(x)))


def test_each_rank_r_layer_is_pinned_to_its_fastest_form_in_onnxruntime(monkeypatch):
    """Each candidate form timed alone on the layer's own input shape, at the settings' batch; the fastest
    pinned. Rank 1, layers pinned already and layers never called are left alone."""
    from dsd.timing import pin_onnxruntime_forms
    timed = []

    def fake_measure_layer(variants, input_shape, settings):
        timed.append((tuple(v.pinned_form for v in variants), tuple(input_shape)))
        ms = {"multiplier": 3.0, "slices": 2.0, "concat": 2.5, "dense": 1.0}
        return [_stats(ms[v.pinned_form]) for v in variants]
    monkeypatch.setattr("dsd.timing.latency.measure_layer", fake_measure_layer)
    model = Stack()
    chosen = pin_onnxruntime_forms(model, (4, 3, 10, 10), BenchmarkSettings(runtime="onnxruntime", batch_size=4))
    assert chosen == {"three": "dense"} and model.three.pinned_form == "dense"
    assert timed == [(("multiplier", "slices", "concat", "dense"), (4, 16, 10, 10))]
    assert model.one.pinned_form is None and model.unused.pinned_form is None
    assert model.pinned.pinned_form == "multiplier"


def test_onnxruntime_timings_measure_the_forms_the_export_writes(monkeypatch):
    """``measure`` in onnxruntime times a copy with the rank-r layers pinned (what export_onnx writes), and
    leaves the model it was given as it was."""
    pinned_copies = []

    def fake_pin(model, input_shape, settings):
        pinned_copies.append(model)
        model.three.pin_form("dense")
        return {"three": "dense"}
    monkeypatch.setattr("dsd.timing.latency.pin_onnxruntime_forms", fake_pin)
    monkeypatch.setattr("dsd.timing.latency.prepare_step", lambda module, x, settings: lambda: module(x))
    model = Stack().eval()
    measure([model], (2, 3, 10, 10), BenchmarkSettings(runtime="onnxruntime", batch_size=2, warmup=0, iters=1))
    assert len(pinned_copies) == 1 and pinned_copies[0] is not model and model.three.pinned_form is None
    measure([model], (2, 3, 10, 10), BenchmarkSettings(batch_size=2, warmup=0, iters=1))  # eager: as it is
    assert len(pinned_copies) == 1


def test_export_onnx_writes_each_layer_in_its_fastest_form_for_any_batch(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    model, x = Stack().eval(), torch.randn(1, 3, 10, 10)
    assert dsd.export_onnx(model, x, tmp_path / "timed.onnx") < 1e-4
    session = ort.InferenceSession(str(tmp_path / "timed.onnx"), providers=["CPUExecutionProvider"])
    assert isinstance(session.get_inputs()[0].shape[0], str)  # the batch is symbolic
    x3 = torch.randn(3, 3, 10, 10)
    (out,) = session.run(None, {session.get_inputs()[0].name: x3.numpy()})
    torch.testing.assert_close(torch.from_numpy(out), model(x3), rtol=1e-4, atol=1e-5)
    assert dsd.export_onnx(model, x, tmp_path / "static.onnx", forms="static", dynamic_batch=False) < 1e-4
    session = ort.InferenceSession(str(tmp_path / "static.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[0] == 1
    assert model.three.pinned_form is None  # the export pins a copy
    with pytest.raises(DsdError, match="forms must be one of"):
        dsd.export_onnx(model, x, tmp_path / "bad.onnx", forms="fastest")
    assert not (tmp_path / "bad.onnx").exists()


@pytest.mark.parametrize("form", ["multiplier", "slices", "concat", "dense"])
def test_every_form_an_export_may_pin_runs_in_onnxruntime(tmp_path, form):
    """Each form the export may pin a rank-r layer to (a grouped one included) is written as ONNX ops that
    compute the layer's function in ONNX Runtime, for a batch other than the example's."""
    ort = pytest.importorskip("onnxruntime")
    model = nn.Sequential(DepthwiseSeparableConv2d(8, 12, 3, rank=3, padding=((1, 1), (1, 1)), groups=2),
                          nn.ReLU(), DepthwiseSeparableConv2d(12, 12, 3, rank=2, stride=2, padding=((1, 1), (1, 1))))
    model = model.eval()
    for layer in model[::2]:
        layer.pin_form(form)
    assert dsd.export_onnx(model, torch.randn(1, 8, 10, 10), tmp_path / "m.onnx") < 1e-4
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randn(3, 8, 10, 10)
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with static_forms():
        want = model[2].pin_form("multiplier")(model[1](model[0].pin_form("multiplier")(x)))
    torch.testing.assert_close(torch.from_numpy(out), want, rtol=1e-4, atol=1e-5)


class TwoHeads(nn.Module):
    """Outputs as segmentation models give them: a dict of maps of two shapes."""

    def __init__(self):
        super().__init__()
        self.body, self.aux = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 2, 3, stride=2)

    def forward(self, x):
        features = self.body(x)
        return {"out": features, "aux": self.aux(features)}


class ValueBranch(nn.Module):
    """A branch on a tensor's value: torch.export cannot trace it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        return y if y.sum() > 0 else -y


def test_export_onnx_checks_every_output_of_a_dict(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    model, x = TwoHeads().eval(), torch.randn(2, 3, 12, 12)
    assert dsd.export_onnx(model, x, tmp_path / "two.onnx") < 1e-4
    session = ort.InferenceSession(str(tmp_path / "two.onnx"), providers=["CPUExecutionProvider"])
    out, aux = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    expected = model(x)
    torch.testing.assert_close(torch.from_numpy(out), expected["out"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.from_numpy(aux), expected["aux"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shift, accepted", [(1e-5, True), (1e-2, False)])
def test_the_export_check_scales_with_each_outputs_magnitude(tmp_path, monkeypatch, shift, accepted):
    """ONNX Runtime's float32 rounding scales with the activations behind an output, not with each element: an
    element-wise rtol refused timm's fbnetc_100 (random weights, logits up to ~400) for a difference of 3.7e-4 on a
    logit near zero. A difference of 1e-5 of the outputs' largest value is accepted, 1% refused (the PyTorch
    outputs the export is checked against shifted by that much)."""
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Conv2d(3, 8, 3)).eval(), torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        model[0].weight.mul_(300)
    onnx_module = importlib.import_module("dsd.io.onnx")
    real = onnx_module._tensors
    monkeypatch.setattr(onnx_module, "_tensors", lambda out: [t + shift * t.abs().max() for t in real(out)])
    if accepted:
        dsd.export_onnx(model, x, tmp_path / "m.onnx", forms="static")
        assert (tmp_path / "m.onnx").exists()
    else:
        with pytest.raises(DsdError, match="does not reproduce PyTorch's outputs"):
            dsd.export_onnx(model, x, tmp_path / "m.onnx", forms="static")
        assert not (tmp_path / "m.onnx").exists()


def test_a_model_the_exporter_cannot_take_is_one_line_and_writes_nothing(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    with pytest.raises(DsdError, match=r"torch.onnx.export cannot export this model \(.*\); nothing was written"):
        dsd.export_onnx(ValueBranch().eval(), torch.randn(2, 3, 8, 8), tmp_path / "branch.onnx")
    assert not list(tmp_path.iterdir())
    captured = capsys.readouterr()
    assert len(captured.err) + len(captured.out) < 2000  # not the exporter's report of the whole graph
    with pytest.raises(DsdError, match="cannot be timed in onnxruntime: choose another runtime"):
        measure([ValueBranch().eval()], (2, 3, 8, 8), BenchmarkSettings(runtime="onnxruntime", batch_size=2,
                                                                          warmup=0, iters=1))


def test_export_onnx_of_a_model_called_on_a_list_is_refused_in_words(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 8, 3)).eval()
    with pytest.raises(dsd.DsdError, match="the example is a list"):
        dsd.export_onnx(model, [torch.randn(3, 8, 8)], tmp_path / "m.onnx")
    assert not list(tmp_path.iterdir())


def test_export_onnx_under_autocast_writes_the_models_precision(tmp_path):
    """A caller's autocast does not reach the export: float32 convs, as ONNX Runtime's CPU provider takes them."""
    pytest.importorskip("onnxruntime")
    import onnx
    torch.manual_seed(0)
    model, _ = dsd.convert_model(Net().eval(), torch.randn(1, 3, 16, 16), rank=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert dsd.export_onnx(model, torch.randn(2, 3, 16, 16), tmp_path / "m.onnx", forms="static") < 1e-4
    graph = onnx.load(str(tmp_path / "m.onnx")).graph
    types = {t.data_type for t in graph.initializer}
    assert onnx.TensorProto.FLOAT in types and not types & {onnx.TensorProto.BFLOAT16, onnx.TensorProto.FLOAT16}


def test_a_rank_r_candidate_in_onnxruntime_counts_as_its_fastest_form(monkeypatch):
    """measure_layer times each form an unpinned rank-r layer may be exported in and keeps the fastest; a dense
    conv, a rank-1 layer and a pinned layer are timed as they are; other runtimes time the layer as it is."""
    timed = []

    def fake_measure(modules, input_shape, settings, progress=False, desc="timing"):
        timed.append([getattr(m, "pinned_form", "dense conv") for m in modules])
        ms = {"multiplier": 3.0, "slices": 2.0, "concat": 2.5, "dense": 5.0, None: 4.0, "dense conv": 6.0}
        return [_stats(ms[getattr(m, "pinned_form", "dense conv")]) for m in modules]
    monkeypatch.setattr("dsd.timing.latency.measure", fake_measure)
    rank3 = DepthwiseSeparableConv2d(16, 16, 3, rank=3, padding=((1, 1), (1, 1)))
    rank1 = DepthwiseSeparableConv2d(16, 16, 3, rank=1, padding=((1, 1), (1, 1)))
    variants = [nn.Conv2d(16, 16, 3, padding=1), rank1, rank3]
    ort = BenchmarkSettings(runtime="onnxruntime", batch_size=2)
    stats = measure_layer(variants, (1, 16, 8, 8), ort)
    assert [s.median_ms for s in stats] == pytest.approx([6.0, 4.0, 2.0])
    assert timed == [["dense conv", None, "multiplier", "slices", "concat", "dense"]] and rank3.pinned_form is None
    assert measure_layer([rank3], (1, 16, 8, 8), BenchmarkSettings(batch_size=2))[0].median_ms == pytest.approx(4.0)


def test_a_model_that_fixes_its_batch_is_exported_at_the_examples_batch_with_a_warning(tmp_path):
    ort = pytest.importorskip("onnxruntime")

    class BatchOfTwo(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return self.conv(x) if x.shape[0] == 2 else -self.conv(x)  # control flow on the batch size
    with pytest.warns(UserWarning, match="fixed batch of 2"):
        assert dsd.export_onnx(BatchOfTwo().eval(), torch.randn(2, 3, 8, 8), tmp_path / "m.onnx") < 1e-4
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[0] == 2


def test_chosen_forms_in_each_runtime(monkeypatch):
    """Eager: what each layer measured fastest on a copy (the model given is left untimed); onnxruntime: the pinned
    forms of the export; compile: the static rule. Layers never called report their static form."""
    from dsd.layers import forms
    from dsd.timing import chosen_forms
    monkeypatch.setattr(forms, "_fastest_runs", lambda layer, x, names: {n: float(n != "dense") for n in names})
    model, shape = Stack(), (2, 3, 10, 10)
    eager = chosen_forms(model, shape, BenchmarkSettings(batch_size=2))
    assert eager == {"one": "dense", "three": "dense", "pinned": "multiplier", "unused": "concat"}
    assert all(not layer.tuned_forms() for layer in (model.one, model.three))

    def fake_measure_layer(variants, input_shape, settings):
        return [_stats({"multiplier": 1.0, "slices": 2.0, "concat": 2.5, "dense": 3.0}[v.pinned_form])
                for v in variants]
    monkeypatch.setattr("dsd.timing.latency.measure_layer", fake_measure_layer)
    in_ort = chosen_forms(model, shape, BenchmarkSettings(runtime="onnxruntime", batch_size=2))
    assert in_ort == {"one": "multiplier", "three": "multiplier", "pinned": "multiplier", "unused": "concat"}
    assert model.three.pinned_form is None
    compiled = chosen_forms(model, shape, BenchmarkSettings(runtime="compile", batch_size=2))
    assert compiled == {"one": "multiplier", "three": "concat", "pinned": "multiplier", "unused": "concat"}


def test_timed_inputs_come_in_the_autocast_dtype():
    """A layer inside a model gets a half-precision input under autocast: so does the timed one (ONNX Runtime's
    files take float32)."""
    seen = []

    class Probe(nn.Module):
        def forward(self, x):
            seen.append(x.dtype)
            return x
    measure([Probe()], (1, 3, 4, 4), BenchmarkSettings(dtype="bfloat16", warmup=0, iters=1))
    assert seen == [torch.bfloat16]


def test_float32_timing_is_float32_under_a_callers_autocast():
    """``measure`` in float32 settings times float32 even where the caller has autocast on."""
    seen = []

    class Probe(nn.Module):
        def forward(self, x):
            seen.append((torch.is_autocast_enabled("cpu"), (x @ x.mT).dtype))
            return x
    with torch.autocast("cpu", dtype=torch.bfloat16):
        measure([Probe()], (1, 4, 4), BenchmarkSettings(warmup=0, iters=1))
        float32_calls = len(seen)
        measure([Probe()], (1, 4, 4), BenchmarkSettings(warmup=0, iters=1, dtype="bfloat16"))
    assert float32_calls and set(seen[:float32_calls]) == {(False, torch.float32)}
    assert set(seen[float32_calls:]) == {(True, torch.bfloat16)}
