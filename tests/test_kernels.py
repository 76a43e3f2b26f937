"""The fused depthwise+pointwise kernel: exact against the two-conv definition (Triton's interpreter on the
CPU), registered as a custom op that torch.export and torch.compile keep whole."""
import json
import os
import subprocess
import sys

import pytest
import torch

from dsd.kernels import separable_conv2d
from dsd.kernels.separable_op import reference_separable_conv2d

CASES = [  # channels, out, rank, kernel, stride, padding, dilation, bias, dtype
    (4, 5, 1, 3, 1, 1, 1, True, "float32"),
    (6, 3, 2, 3, 2, 1, 1, False, "float32"),
    (3, 7, 3, 5, 1, 4, 2, True, "float32"),
    (40, 20, 1, 3, 1, 1, 1, True, "float32"),  # more than one block of input channels
    (5, 70, 2, 3, 1, 0, 1, True, "float32"),  # more than one block of output channels
    (8, 8, 2, 3, 1, 1, 1, True, "float16"),
    (5, 4, 1, 3, 2, 0, 1, True, "bfloat16"),
    (4, 4, 4, 7, 3, 3, 1, False, "float16"),
    (64, 24, 2, 3, 1, 1, 1, True, "float32"),  # channels in whole blocks: the loads without a channel mask
]
TOLERANCE = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1e-2}  # relative, against float64

# every block configuration the autotuner may pick (runs of pixels and 2-D tiles), on a layer with partial blocks
# of input and output channels and an image that no tile divides
CONFIG_CASE = (40, 70, 2, 3, 2, 1, 2, True, "float32")

SCRIPT = """
import json, sys, torch
from dsd.kernels import interpreted_separable_conv2d
from dsd.kernels.separable_op import reference_separable_conv2d
torch.manual_seed(0)
errors = []
for c, m, r, k, s, p, d, bias, dtype, config in json.loads(sys.argv[1]):
    dtype = getattr(torch, dtype)
    x, dw, pw = torch.randn(2, c, 11, 9), torch.randn(c * r, 1, k, k), torch.randn(m, c * r, 1, 1)
    b = torch.randn(m) if bias else None
    x, dw, pw, b = (t.to(dtype) if t is not None else None for t in (x, dw, pw, b))
    got = interpreted_separable_conv2d(x, dw, pw, b, s, p, d, config=config)
    ref = reference_separable_conv2d(*(t.double() if t is not None else None for t in (x, dw, pw, b)),
                                     (s, s), (p, p), (d, d))
    assert got.shape == ref.shape and got.dtype == dtype
    errors.append(((got.double() - ref).norm() / ref.norm()).item())
empty = interpreted_separable_conv2d(torch.randn(0, 4, 9, 9), torch.randn(8, 1, 3, 3), torch.randn(6, 8, 1, 1),
                                     None, 2, 1, 1)  # a detector's mask head on no boxes: no grid to launch
assert empty.shape == (0, 6, 5, 5), empty.shape
print(json.dumps(errors))
"""


# A loop over a runtime bound, as the kernel's loop over input channels: Triton 3.6's interpreter takes int() of a
# one-element array there, which numpy 2.4 refuses (torch 2.11's Triton; a GPU compiles the loop and is unaffected).
PROBE = """
import torch, triton, triton.language as tl
@triton.jit
def count(out_ptr, n):
    total = 0
    for _ in range(0, n, 1):
        total += 1
    tl.store(out_ptr, total)
out = torch.zeros(1, dtype=torch.int32)
count[(1,)](out, 3)
assert out.item() == 3
"""


def test_fused_kernel_matches_the_definition_under_the_triton_interpreter():
    triton = pytest.importorskip("triton")
    from dsd.kernels.separable_triton import CONFIGS
    cases = [(*case, 0) for case in CASES] + [(*CONFIG_CASE, i) for i in range(1, len(CONFIGS))]
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    probe = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=120)
    if probe.returncode:
        pytest.skip(f"Triton {triton.__version__}'s interpreter cannot run a loop over a runtime bound here: "
                    f"{probe.stderr.strip().splitlines()[-1]}")
    result = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(cases)], capture_output=True, text=True,
                            env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    errors = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(errors) == len(cases)
    for case, error in zip(cases, errors):
        assert error < TOLERANCE[case[-2]], (case, error)


def test_the_op_computes_the_definition_off_cuda():
    x, dw, pw, b = torch.randn(2, 4, 9, 9), torch.randn(8, 1, 3, 3), torch.randn(6, 8, 1, 1), torch.randn(6)
    torch.testing.assert_close(separable_conv2d(x, dw, pw, b, 2, 1, 1),
                               reference_separable_conv2d(x, dw, pw, b, (2, 2), (1, 1), (1, 1)))
    grouped = torch.randn(6, 4, 1, 1)  # a pointwise conv in two groups: the kernel does not take it
    torch.testing.assert_close(separable_conv2d(x, dw, grouped, b, 1, 1, 1),
                               reference_separable_conv2d(x, dw, grouped, b, (1, 1), (1, 1), (1, 1)))
    with pytest.raises(ValueError, match="depthwise_weight must be"):
        separable_conv2d(x, torch.randn(6, 1, 3, 3), pw)


class _Fused(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.dw, self.pw = torch.nn.Parameter(torch.randn(8, 1, 3, 3)), torch.nn.Parameter(torch.randn(6, 8, 1, 1))

    def forward(self, x):
        return separable_conv2d(x, self.dw, self.pw, None, 1, 1, 1).relu()


def test_export_keeps_the_custom_op_whole():
    model, x = _Fused(), torch.randn(1, 4, 8, 8)
    exported = torch.export.export(model, (x,))
    targets = {str(node.target) for node in exported.graph.nodes if node.op == "call_function"}
    assert "dsd.separable_conv2d.default" in targets
    torch.testing.assert_close(exported.module()(x), model(x))


def test_the_op_is_differentiable():
    model, x = _Fused(), torch.randn(1, 4, 8, 8, requires_grad=True)
    model(x).sum().backward()
    expected = [t.grad.clone() for t in (x, model.dw, model.pw)]
    for t in (x, model.dw, model.pw):
        t.grad = None
    reference_separable_conv2d(x, model.dw, model.pw, None, (1, 1), (1, 1), (1, 1)).relu().sum().backward()
    for got, want in zip(expected, [x.grad, model.dw.grad, model.pw.grad]):
        torch.testing.assert_close(got, want)


@pytest.mark.slow
def test_compile_keeps_working_with_the_custom_op():
    model, x = _Fused(), torch.randn(1, 4, 8, 8)
    torch.testing.assert_close(torch.compile(model)(x), model(x))


def test_the_autotuner_is_offered_only_blocks_the_gpus_shared_memory_holds():
    """On an H100 (232,448 bytes per block, opt-in) the largest blocks in float32 ask for 280,832: they are pruned
    before the autotuner compiles them; in bfloat16 at rank 1 they fit. The single-stage block is always offered,
    even where the bound prunes every other (float32 at rank 3 with a 5x5 kernel outgrew an H200 in every
    pipelined block, and the kernel failed)."""
    pytest.importorskip("triton")
    from types import SimpleNamespace
    from unittest import mock

    from dsd.kernels.separable_triton import CONFIGS, SINGLE_STAGE, _fitting
    gpu = SimpleNamespace(is_cuda=True, device=0)
    h100 = SimpleNamespace(shared_memory_per_block_optin=232448)

    def offered(dot_fp32, rank=1):
        args = {"M": 256, "C": 256, "x_ptr": gpu, "DOT_FP32": dot_fp32, "R": rank}
        with mock.patch("torch.cuda.get_device_properties", return_value=h100):
            return _fitting(CONFIGS, args)
    widest = [cfg for cfg in CONFIGS if cfg.kwargs["BLOCK_P"] == 128 and cfg.kwargs["BLOCK_M"] == 256]
    assert widest and not set(widest) & set(offered(True))
    assert set(widest) <= set(offered(False))
    assert all(SINGLE_STAGE in offered(fp32, rank) for fp32 in (True, False) for rank in (1, 3, 64))
    assert offered(True, rank=64) == [SINGLE_STAGE]
    cpu = {"M": 256, "C": 256, "x_ptr": torch.empty(1), "DOT_FP32": True, "R": 1}  # no GPU: only the channel rule
    assert all(cfg.kwargs["BLOCK_M"] <= 256 for cfg in _fitting(CONFIGS, cpu))


def test_blocks_are_tuned_per_layer_geometry():
    """A block tuned for one rank (or kernel, stride, dilation) was reused for another layer of the same shape,
    where it ran out of shared memory (an H200: rank 2 after rank 1, bfloat16, 256 channels at 14x14)."""
    pytest.importorskip("triton")
    from dsd.kernels.separable_triton import _autotuned_kernel
    assert {"N", "C", "HO", "WO", "M", "R", "KH", "KW", "SH", "SW", "DH", "DW", "TF32"} <= set(_autotuned_kernel.keys)


@pytest.mark.slow
def test_the_single_stage_block_fits_a_hopper_gpus_shared_memory():
    """Compiled for sm_90 here (no GPU needed): the block always offered fits in an H100's or H200's 232,448
    bytes where every pipelined block outgrows them (float32, rank 3, a 5x5 kernel)."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from dsd.kernels.separable_triton import SINGLE_STAGE, _separable_conv2d_kernel as kernel
    names = kernel.arg_names
    constants = dict(SH=1, SW=1, PH=2, PW=2, DH=1, DW=1, KH=5, KW=5, R=3, HAS_BIAS=True, DOT_FP32=True, TF32=False,
                     EVEN_C=True, **SINGLE_STAGE.kwargs)
    signature = {n: "constexpr" if n in constants else "*fp32" if n.endswith("_ptr") else "i32" for n in names}
    source = ASTSource(kernel, signature, constexprs={(names.index(n),): v for n, v in constants.items()})
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": SINGLE_STAGE.num_warps, "num_stages": SINGLE_STAGE.num_stages})
    assert compiled.metadata.shared <= 232448
