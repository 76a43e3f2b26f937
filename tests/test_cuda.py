"""What needs a GPU: the fused kernel compiled for it (exact against the float64 definition in every dtype and
block configuration, every output element written, as a separable layer's form under autocast and CUDA graphs)
and models timed interleaved as CUDA-graph replays. Skipped without CUDA (CI has none; the kernel's arithmetic
is tested there under Triton's interpreter)."""
import pytest
import timm
import torch

import dsd
from dsd.kernels import separable_conv2d
from dsd.kernels.separable_op import reference_separable_conv2d
from dsd.layers import DepthwiseSeparableConv2d
from dsd.layers.forms import FORMS, forms_timed_as_cuda_graphs
from dsd.timing import BenchmarkSettings, measure

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CASES = [  # batch, channels, out, size, rank, kernel, stride, padding, dilation, bias
    (2, 4, 5, 11, 1, 3, 1, 1, 1, True),
    (3, 40, 70, 13, 2, 3, 2, 1, 2, True),
    (2, 64, 64, 28, 1, 3, 1, 1, 1, False),
    (2, 96, 200, 14, 3, 5, 1, 2, 1, True),
    (4, 256, 256, 14, 1, 3, 2, 1, 1, False),
    (2, 512, 512, 7, 2, 3, 1, 1, 1, True),
    (1, 3, 64, 32, 4, 7, 2, 3, 1, False),
]
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}  # relative, against float64


def _inputs(case, dtype):
    n, c, m, size, r, k, _, _, _, bias = case
    x = torch.randn(n, c, size, size, device="cuda").to(dtype)
    dw, pw = torch.randn(c * r, 1, k, k, device="cuda"), torch.randn(m, c * r, 1, 1, device="cuda")
    b = torch.randn(m, device="cuda") if bias else None
    return x, dw.to(dtype), pw.to(dtype), b.to(dtype) if b is not None else None


def _error(got, x, dw, pw, b, case):
    *_, s, p, d, _ = case
    ref = reference_separable_conv2d(*(t.double() if t is not None else None for t in (x, dw, pw, b)),
                                     (s, s), (p, p), (d, d))
    assert got.shape == ref.shape and not got.isnan().any()
    return ((got.double() - ref).norm() / ref.norm()).item()


@pytest.fixture(autouse=True)
def no_tf32():
    allowed = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # the float32 tolerance is IEEE's; tf32 is tested on its own
    yield
    torch.backends.cudnn.allow_tf32 = allowed


def test_forms_timed_as_cuda_graph_replays():
    """Inside forms_timed_as_cuda_graphs a layer times its forms as replays, keeps that choice apart from the
    eager one, and computes the same function in what it chose, captured in a graph as well."""
    torch.manual_seed(0)
    layer = DepthwiseSeparableConv2d(128, 128, 3, rank=2, padding=((1, 1), (1, 1))).cuda().eval()
    x = torch.randn(16, 128, 28, 28, device="cuda").contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        want = FORMS["multiplier"](layer, layer._pad(x))
        eager = layer(x)
        with forms_timed_as_cuda_graphs():
            replayed = layer(x)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = layer(x)
            graph.replay()
    assert len(layer.tuned_forms()) == 2
    for got in (eager, replayed, out):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_autotuner_keeps_to_this_gpus_shared_memory(dtype):
    """256 channels, batch 64: the largest blocks need more shared memory than an H100 or H200 has; rank 2 after
    rank 1 at the same shape (the block tuned for rank 1 was reused at rank 2 and ran out of it)."""
    torch.manual_seed(0)
    for rank in (1, 2):
        case = (64, 256, 256, 14, rank, 3, 1, 1, 1, False)
        x, dw, pw, _ = _inputs(case, dtype)
        got = separable_conv2d(x.contiguous(memory_format=torch.channels_last), dw, pw, None, 1, 1, 1)
        assert _error(got, x, dw, pw, None, case) < TOLERANCE[dtype], rank


# every case in bf16 (what the kernel is for), two in the other dtypes: each case compiles up to ten block
# configurations per dtype, minutes in all on a cold Triton cache
AUTOTUNED = [(case, torch.bfloat16) for case in CASES] + [(case, dtype) for case in CASES[1:4:2]
                                                          for dtype in (torch.float32, torch.float16)]


@pytest.mark.parametrize("case, dtype", AUTOTUNED)
def test_the_autotuned_kernel_matches_the_definition(case, dtype):
    torch.manual_seed(0)
    x, dw, pw, b = _inputs(case, dtype)
    *_, s, p, d, _ = case
    # freed NaNs where the output will be allocated: an element the kernel does not write stays NaN
    poison = torch.full((x.shape[0] * pw.shape[0] * x.shape[2] * x.shape[3] * 2,), float("nan"), device="cuda",
                        dtype=dtype)
    del poison
    assert _error(separable_conv2d(x, dw, pw, b, s, p, d), x, dw, pw, b, case) < TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_block_configuration_matches_the_definition(dtype):
    from dsd.kernels.separable_op import arrange_weights
    from dsd.kernels.separable_triton import CONFIGS, launch_separable_conv2d
    torch.manual_seed(0)
    case = CASES[1]
    x, dw, pw, b = _inputs(case, dtype)
    *_, s, p, d, _ = case
    from triton.runtime.errors import OutOfResources
    ran = 0
    for config in CONFIGS:
        try:
            got = launch_separable_conv2d(x, *arrange_weights(dw, pw, x.shape[1]), b, dw.shape[2:], (s, s), (p, p),
                                          (d, d), config)
        except OutOfResources:  # too large for this GPU in this dtype: the autotuner skips it too
            continue
        assert _error(got, x, dw, pw, b, case) < TOLERANCE[dtype], config
        ran += 1
    assert ran >= len(CONFIGS) // 2


def test_float32_follows_the_tf32_switch():
    torch.manual_seed(0)
    case = CASES[3]
    x, dw, pw, b = _inputs(case, torch.float32)
    torch.backends.cudnn.allow_tf32 = True
    assert _error(separable_conv2d(x, dw, pw, b, 1, 2, 1), x, dw, pw, b, case) < 5e-3


def test_the_fused_form_under_autocast_and_a_cuda_graph():
    torch.manual_seed(0)
    layer = DepthwiseSeparableConv2d(64, 96, 3, rank=2, padding=((1, 1), (1, 1))).cuda().eval()
    x = torch.randn(8, 64, 28, 28, device="cuda").contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
        want = FORMS["multiplier"](layer, x)
        assert FORMS["fused"](layer, x).dtype == torch.bfloat16
        torch.testing.assert_close(FORMS["fused"](layer, x), want, rtol=2e-2, atol=2e-2)
        layer.pin_form("fused")
        static = x.clone()
        layer(static)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = layer(static)
        static.copy_(torch.randn_like(static))
        graph.replay()
        torch.testing.assert_close(out, FORMS["multiplier"](layer, static), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("runtime", [dict(runtime="cudagraph"),
                                     dict(runtime="compile", compile_mode="reduce-overhead")])
def test_models_timed_interleaved_as_cuda_graphs(runtime):
    """Each replay reads its model's weights: a later capture (which empties the allocator's cache) must not
    unmap an earlier one's (an illegal memory access with timm models, batch 64, before the step held the copy);
    torch.compile's CUDA-graph trees share one memory pool between the models."""
    original = timm.create_model("resnet18").eval()
    converted, _ = dsd.convert_model(original, torch.randn(1, 3, 224, 224), rank=1)
    settings = BenchmarkSettings(device="cuda", dtype="bfloat16", batch_size=64, channels_last=True, warmup=2,
                                 iters=3, **runtime)
    stats = measure([original, converted], (64, 3, 224, 224), settings)
    torch.cuda.synchronize()
    assert all(s.median_ms > 0 for s in stats)



def test_torch_compile_on_cuda_computes_rank_2_in_the_dense_form():
    """The static rule on CUDA: the dense form, which the slices lost to at all but the smallest layer measured."""
    from dsd.timing import chosen_forms
    torch.manual_seed(0)
    layer = DepthwiseSeparableConv2d(64, 64, 3, rank=2, padding=((1, 1), (1, 1))).cuda().eval()
    x = torch.randn(8, 64, 28, 28, device="cuda").contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(layer)(x), FORMS["multiplier"](layer, layer._pad(x)), rtol=1e-4,
                                   atol=1e-4)
    settings = BenchmarkSettings(device="cuda", runtime="compile", channels_last=True)
    assert chosen_forms(torch.nn.Sequential(layer), tuple(x.shape), settings) == {"0": "dense"}
