"""The forms a ``DepthwiseSeparableConv2d`` computes its output in, and the measured choice among them.

Every form is the same function (the depthwise conv with depth multiplier ``rank``, then the pointwise conv)
of an input already given the module's explicit padding:

- ``multiplier``: the two convs as written. A depth multiplier >= 2 falls off the fast depthwise kernels
  (3-8x on a CPU, 13-24x in bf16 channels_last on a GPU), but with few input channels it is a grouped dense
  conv on the fast kernels.
- ``slices``: r rank-1 separable convs, depthwise slice j of every channel and then its pointwise weights,
  accumulated into the output in place.
- ``concat``: the r rank-1 depthwise convs concatenated slice-major, then one pointwise conv over their ``r*C``
  channels with its weights permuted to match: the depthwise convs stay on the fast kernels and the pointwise
  GEMM is one deep product instead of r shallow ones (on a 2-core CPU, batch 8, channels_last, rank 4 at 256
  channels 14x14: 1.5x faster than the dense conv, where the slices are 0.96x).
- ``dense``: one conv with the recomposed kernel ``W[m, c] = sum_j pw[m, c*r + j] * dw[c*r + j]``: the dense
  conv's cost, so a layer in this form is never slower than the conv it replaced.
- ``fused``: dsd's fused depthwise+pointwise Triton kernel (:func:`dsd.kernels.separable_conv2d`) on CUDA, the
  two convs elsewhere; timed only on CUDA, ungrouped layers, and where ``dsd.kernels.use_fused_kernel()`` (or
  ``DSD_FUSED_KERNEL=1``) lets it.

Which is fastest depends on the channels, the spatial size, the memory format, the dtype, the batch and the
device: on a 2-core CPU an RGB stem at rank 10 runs 1.9x faster than its dense conv as a multiplier conv in
channels_last and 2x slower in NCHW. So at inference in eager mode a layer times its candidate forms on its
first call with each kind of input and keeps the fastest, as ``torch.backends.cudnn.benchmark`` does for
cuDNN's algorithms; a CUDA graph capture, which cannot time, uses what its warm-up runs measured (time them as
replays inside :func:`forms_timed_as_cuda_graphs`: launch overhead, which a graph does not pay, counts in
eager). Training, tracing, scripting, compiling, exporting and ``torch.use_deterministic_algorithms`` take the
static rule (:func:`static_form`, which on CUDA differs from a CPU's) instead; so does everything after
``autotune_forms(False)`` (or with ``DSD_AUTOTUNE_FORMS=0``) and inside :func:`static_forms` (dsd's calibration
and fine-tuning, which must give the same weights on every run). A layer pinned to a form (``layer.pin_form``;
the ONNX export pins each layer to what runs fastest in ONNX Runtime) computes in that form everywhere.
"""
from __future__ import annotations

import contextlib
import math
import os
import time
import warnings
from typing import Callable, Dict, Iterator, Optional, Tuple, Union

import torch
import torch.nn.functional as F

from ..kernels import (FUSED_DTYPES, arrange_weights, arranged_separable_conv2d, fused_kernel_enabled,
                       separable_conv2d)

__all__ = ["FORMS", "MULTIPLIER_FORM_CHANNELS", "static_form", "candidate_forms", "fused_applies", "choose_form",
           "run_form", "autotune_forms", "forms_autotuned", "static_forms", "forms_timed_as_cuda_graphs"]

# Up to this many input channels, rank r runs as one depthwise conv with depth multiplier r when not timed on a
# CPU (on CUDA the static rule takes the dense form): with so few groups it is a (grouped) dense conv on the fast
# kernels, where r rank-1 slices would cost r conv launches (CREPE's 1-channel conv at rank 64 made the model 6x
# slower than its original as slices; from 16 channels on, slices win at low ranks).
MULTIPLIER_FORM_CHANNELS = 8
TIMED_ROUNDS = 3  # each candidate runs once per round, after one untimed run; its fastest run counts

_AUTOTUNE = {"enabled": os.environ.get("DSD_AUTOTUNE_FORMS", "1") != "0", "replayed": False}


def autotune_forms(enabled: bool = True) -> None:
    """Let separable layers time their forms at inference and keep the fastest (on by default; also
    ``DSD_AUTOTUNE_FORMS=0``). Off, every layer takes :func:`static_form`: bitwise the same outputs run to run."""
    _AUTOTUNE["enabled"] = bool(enabled)


def forms_autotuned() -> bool:
    return _AUTOTUNE["enabled"]


@contextlib.contextmanager
def static_forms() -> Iterator[None]:
    """Every separable layer in its static form inside (a context manager and a decorator): the same bits on
    every run, as calibration, fidelity measurements and fine-tuning need to be reproducible."""
    previous = _AUTOTUNE["enabled"]
    _AUTOTUNE["enabled"] = False
    try:
        yield
    finally:
        _AUTOTUNE["enabled"] = previous


@contextlib.contextmanager
def forms_timed_as_cuda_graphs() -> Iterator[None]:
    """Inside, layers on CUDA time their forms as CUDA-graph replays, the GPU's time without launch overhead:
    what a model runs as when it is replayed as a CUDA graph (dsd's ``cudagraph`` runtime warms up in here;
    wrap the first call before ``torch.cuda.graph`` in it). Timed in eager, every kernel launch counts, which
    favours one dense kernel over two separable ones even where these take less GPU time (resnet18 at rank 1,
    bf16, batch 64 on an H100: 16 of 17 layers dense)."""
    previous = _AUTOTUNE["replayed"]
    _AUTOTUNE["replayed"] = True
    try:
        yield
    finally:
        _AUTOTUNE["replayed"] = previous


def _is_nhwc(t: torch.Tensor) -> bool:
    return t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def _depthwise_slices(layer) -> torch.Tensor:
    """The depthwise weight slice-major ``(r, C, 1, kh, kw)``, each slice contiguous (a strided slice sends the
    conv down a slow path, about 5x on a CPU)."""
    dw = layer.depthwise.weight
    return dw.view(layer.in_channels, layer.rank, *dw.shape[1:]).transpose(0, 1).contiguous()


def slice_weights(layer) -> Tuple[torch.Tensor, torch.Tensor]:
    """The weights slice-major, each slice contiguous: depthwise (r, C, 1, kh, kw), pointwise (r, M, C/g, 1, 1)."""
    pw = layer.pointwise.weight
    return (_depthwise_slices(layer),
            pw.view(layer.out_channels, -1, layer.rank, 1, 1).permute(2, 0, 1, 3, 4).contiguous())


def concat_weights(layer) -> Tuple[torch.Tensor, torch.Tensor]:
    """The depthwise slices ``(r, C, 1, kh, kw)`` and the pointwise weights for their concatenation
    ``(M, r*C/g, 1, 1)``: within each group slice-major (``j*C/g + c``) instead of ``c*r + j``."""
    pw, r, m = layer.pointwise.weight, layer.rank, layer.out_channels
    return _depthwise_slices(layer), pw.view(m, -1, r, 1, 1).transpose(1, 2).reshape(m, -1, 1, 1).contiguous()


def dense_weight(layer) -> Tuple[torch.Tensor]:
    """The recomposed dense kernel ``(M, C/g, kh, kw)`` (in the weights' dtype, never autocast)."""
    dw, pw = layer.depthwise.weight, layer.pointwise.weight
    g, r, c, m = layer.groups, layer.rank, layer.in_channels, layer.out_channels
    kh, kw = layer.kernel_size
    with torch.autocast(dw.device.type, enabled=False):
        weight = torch.einsum("gmcr,gcrk->gmck", pw.reshape(g, m // g, c // g, r), dw.reshape(g, c // g, r, kh * kw))
    return (weight.reshape(m, c // g, kh, kw).contiguous(),)  # einsum may return a permuted view


def multiplier_forward(layer, x: torch.Tensor) -> torch.Tensor:
    return layer.pointwise(layer.depthwise(x))


# oneDNN's conv with a sum post-op, writing into its first argument (what Inductor fuses conv + add into on a CPU);
# None where PyTorch is built without oneDNN
_ONEDNN_CONV_ADD_ = getattr(getattr(torch.ops.mkldnn, "_convolution_pointwise_", None), "binary", None) \
    if torch.backends.mkldnn.is_available() else None


def _adds_in_onednn(out: torch.Tensor) -> bool:
    """Whether a 1x1 conv can add into ``out`` inside oneDNN: eager float32 CPU inference, nothing recording,
    tracing or compiling (an export or a trace must see standard ops), oneDNN present and not switched off."""
    return (_ONEDNN_CONV_ADD_ is not None and out.device.type == "cpu" and out.dtype == torch.float32
            and type(out) is torch.Tensor and out.numel() > 0 and not torch.is_grad_enabled()
            and torch.backends.mkldnn.enabled
            and not (torch.jit.is_tracing() or torch.jit.is_scripting() or torch.compiler.is_compiling()))


def slices_forward(layer, x: torch.Tensor) -> torch.Tensor:
    """Rank r as the sum of r rank-1 separable convs; summing the per-slice pointwise products in place avoids
    concatenating the slices (a strided copy in channels_last) and a temporary the size of the output. On a CPU
    at inference oneDNN adds each product in its conv's own output pass (batch 8, channels_last, rank 3 at 64
    channels 56x56: 1.9x faster than the dense conv, 1.0x as a separate in-place GEMM)."""
    dw, g = layer.depthwise, layer.groups
    depthwise, pointwise = _kept_in_compute_dtype(layer, "slices", slice_weights, x)
    out = F.conv2d(dw._conv_forward(x, depthwise[0], None), pointwise[0], layer.pointwise.bias, groups=g)
    onednn = layer.rank > 1 and _adds_in_onednn(out)
    for j in range(1, layer.rank):
        z = dw._conv_forward(x, depthwise[j], None)
        if onednn:
            _ONEDNN_CONV_ADD_(out, z, pointwise[j], None, [0, 0], [1, 1], [1, 1], g, "add", None, None, [], None)
            continue
        weight = pointwise[j, :, :, 0, 0].to(out.dtype)  # (M, C); in-place GEMMs are not autocast
        if g == 1 and _is_nhwc(out) and _is_nhwc(z):
            out.permute(0, 2, 3, 1).view(-1, layer.out_channels).addmm_(
                z.permute(0, 2, 3, 1).reshape(-1, layer.in_channels), weight.t())
        elif g == 1 and out.dim() == 4 and out.is_contiguous() and z.is_contiguous():  # NCHW
            n, pixels = out.shape[0], out.shape[2] * out.shape[3]  # not -1: an empty batch leaves it undefined
            out.view(n, layer.out_channels, pixels).baddbmm_(weight.expand(n, -1, -1), z.view(n, layer.in_channels, pixels))
        else:
            out = out + F.conv2d(z, pointwise[j], None, groups=g)
    return out


def concat_forward(layer, x: torch.Tensor) -> torch.Tensor:
    """Rank r as r rank-1 depthwise convs whose outputs, concatenated, feed one pointwise conv over r*C channels."""
    dw, g = layer.depthwise, layer.groups
    depthwise, pointwise = _kept_in_compute_dtype(layer, "concat", concat_weights, x)
    slices = [dw._conv_forward(x, depthwise[j], None) for j in range(layer.rank)]
    if g > 1:  # the pointwise conv reads each group's channels as one block: the slices within a group
        slices = [part for chunks in zip(*(z.chunk(g, dim=1) for z in slices)) for part in chunks]
    return F.conv2d(torch.cat(slices, dim=1), pointwise, layer.pointwise.bias, groups=g)


def _zero_padded(dw: torch.nn.Conv2d, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
    """The input and the padding left for a zero-padding conv: other padding modes are applied first."""
    if dw.padding_mode != "zeros":
        return F.pad(x, dw._reversed_padding_repeated_twice, mode=dw.padding_mode), (0, 0)
    return x, dw.padding


def _autocast_dtype(x: torch.Tensor) -> Optional[torch.dtype]:
    """The dtype autocast computes ops on ``x`` in; None where it is off (or has no such device: meta tensors)."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if device in ("cpu", "cuda") and torch.is_autocast_enabled(device) \
        else None


Make = Callable[[torch.nn.Module], Tuple[torch.Tensor, ...]]


def _kept_in_compute_dtype(layer, form: str, make: Make, x: torch.Tensor,
                           layout: Optional[str] = None) -> Tuple[torch.Tensor, ...]:
    """The kept weights in autocast's dtype where autocast would cast them for ``x``: autocast caches its casts
    of leaf parameters at most, so a kept float32 weight was cast again on every call (on this CPU in bf16, a
    256-channel 14x14 dense-form layer at batch 1 took 1.4x as long)."""
    return layer.kept_weights(form, make, layout, _autocast_dtype(x))


def _channels_last_dense_weight(layer) -> Tuple[torch.Tensor]:
    return tuple(w.contiguous(memory_format=torch.channels_last) for w in dense_weight(layer))


def dense_forward(layer, x: torch.Tensor) -> torch.Tensor:
    """One conv with the recomposed kernel, laid out in the input's memory format (an NCHW kernel on an NHWC
    input costs a layout change per call: 3-5% of the conv on a CPU)."""
    dw = layer.depthwise
    if _is_nhwc(x):
        (weight,) = _kept_in_compute_dtype(layer, "dense", _channels_last_dense_weight, x, layout="channels_last")
    else:
        (weight,) = _kept_in_compute_dtype(layer, "dense", dense_weight, x)
    x, padding = _zero_padded(dw, x)
    return F.conv2d(x, weight, layer.pointwise.bias, dw.stride, padding, dw.dilation, layer.groups)


def _arranged_weights(layer) -> Tuple[torch.Tensor, torch.Tensor]:
    return arrange_weights(layer.depthwise.weight, layer.pointwise.weight, layer.in_channels)


def fused_forward(layer, x: torch.Tensor) -> torch.Tensor:
    """The fused kernel on weights kept in its layout and the input's dtype; autocast does not reach a custom
    op, so its dtype is applied here."""
    dw, dtype = layer.depthwise, _autocast_dtype(x) or x.dtype
    x, padding = _zero_padded(dw, x)
    if layer.groups != 1:  # the kernel takes an ungrouped pointwise conv; the op computes the definition
        return separable_conv2d(x.to(dtype), dw.weight, layer.pointwise.weight, layer.pointwise.bias, dw.stride,
                                padding, dw.dilation)
    taps, rows = layer.kept_weights("fused", _arranged_weights, dtype=dtype)
    return arranged_separable_conv2d(x.to(dtype), taps, rows, layer.pointwise.bias, dw.kernel_size, dw.stride,
                                     padding, dw.dilation)


Form = Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]
FORMS: Dict[str, Form] = {"multiplier": multiplier_forward, "slices": slices_forward, "concat": concat_forward,
                          "dense": dense_forward, "fused": fused_forward}


def static_form(layer, device: Union[torch.device, str] = "cpu") -> str:
    """The form taken where nothing is timed: rank 1 as written; at rank >= 2 on CUDA the recomposed dense conv;
    elsewhere few channels as written and more as the concatenated slices. On CUDA the slices ran 0.40-0.95x of
    the dense conv's speed as CUDA-graph replays (64-512 channels, batch 8 and 64, float32 and bfloat16, an H100
    and an H200; 1.02-1.22x only at 512 channels 7x7 in bfloat16 at batch 64) and a depth multiplier 0.06-0.34x;
    resnet18 at ``target_flops=0.5`` ran 0.40x of its original under torch.compile in slices and 0.81x with its
    RGB stem as a multiplier conv, where every layer measured fastest dense as replays (an H200, bf16, batch 64).
    On a 2-core CPU (batch 8, side by side) resnet18 at ``target_flops=0.5`` ran 0.87x / 1.01x of its original in the
    concatenated form (NCHW / channels_last) and 0.79x / 0.88x as accumulated slices; compiled in channels_last
    1.08x and 1.05x."""
    if layer.rank == 1:
        return "multiplier"
    if torch.device(device).type == "cuda":
        return "dense"
    return "multiplier" if layer.in_channels <= MULTIPLIER_FORM_CHANNELS else "concat"


def fused_applies(layer, x: torch.Tensor) -> bool:
    """Whether the fused kernel is worth timing for ``layer`` on ``x``: CUDA, a dtype it takes, an ungrouped
    pointwise conv, and the kernel switched on."""
    dtype = _autocast_dtype(x) or x.dtype
    return fused_kernel_enabled() and x.is_cuda and layer.groups == 1 and dtype in FUSED_DTYPES


def candidate_forms(layer, x: Optional[torch.Tensor] = None) -> Tuple[str, ...]:
    """The forms worth timing: slices and concat only where there are channels enough for r conv launches to
    pay; the fused kernel where :func:`fused_applies` to the input ``x`` (never without one: ONNX has no such op)."""
    forms = ("multiplier", "dense") if static_form(layer) == "multiplier" else (
        "multiplier", "slices", "concat", "dense")
    return forms + ("fused",) if x is not None and fused_applies(layer, x) else forms


def _tunable(x: torch.Tensor) -> bool:
    """Eager inference on a plain CPU or CUDA tensor, with nothing recording, tracing or compiling the ops."""
    if not _AUTOTUNE["enabled"] or torch.is_grad_enabled() or type(x) is not torch.Tensor:
        return False
    if x.device.type not in ("cpu", "cuda") or torch.are_deterministic_algorithms_enabled():
        return False
    return not (torch.jit.is_tracing() or torch.jit.is_scripting() or torch.compiler.is_compiling())


def _input_kind(x: torch.Tensor) -> tuple:
    replayed = _AUTOTUNE["replayed"] and x.is_cuda
    return tuple(x.shape), x.dtype, x.device, _is_nhwc(x), _autocast_dtype(x), torch.get_num_threads(), replayed


def _runs(layer, x: torch.Tensor, name: str) -> bool:
    """Run ``name`` once, untimed; False where the fused kernel does not build here (it is then no candidate)."""
    try:
        FORMS[name](layer, x)
    except Exception as error:  # noqa: BLE001 - only the fused kernel may fail to build
        if name != "fused":
            raise
        warnings.warn(f"dsd's fused kernel failed on this machine ({type(error).__name__}: {error}); "
                      "separable layers use the other forms", RuntimeWarning, stacklevel=4)
        return False
    return True


def _fastest_runs(layer, x: torch.Tensor, names: Tuple[str, ...]) -> Dict[str, float]:
    """Each form's fastest run in seconds, after one untimed run each (it makes the kept weights and lets the
    backend pick its kernels). The forms take turns, so that a passing slowdown of the machine does not
    fall on one form's runs alone."""
    sync = (lambda: torch.cuda.synchronize(x.device)) if x.is_cuda else (lambda: None)
    best = {name: math.inf for name in names if _runs(layer, x, name)}
    if x.is_cuda and _AUTOTUNE["replayed"]:
        return _fastest_replays(layer, x, tuple(best))
    for _ in range(TIMED_ROUNDS):
        for name in best:
            sync()
            start = time.perf_counter()
            FORMS[name](layer, x)
            sync()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def _fastest_replays(layer, x: torch.Tensor, names: Tuple[str, ...]) -> Dict[str, float]:
    """Each form captured alone in a CUDA graph; its fastest replay in seconds (CUDA events), taking turns."""
    graphs = {}
    for name in names:
        graphs[name] = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graphs[name]):
            FORMS[name](layer, x)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = {name: math.inf for name in names}
    for _ in range(TIMED_ROUNDS):
        for name, graph in graphs.items():
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            best[name] = min(best[name], start.elapsed_time(end) / 1000)
    return best


def choose_form(layer, x: torch.Tensor) -> str:
    """The form ``layer`` computes ``x`` in: at eager inference, the fastest measured for this kind of input
    (shape, dtype, device, memory format, autocast, threads; on CUDA, whether inside
    :func:`forms_timed_as_cuda_graphs`), timed on its first call; else :func:`static_form`.
    A CUDA graph capture uses what its warm-up runs measured (it cannot time). A pinned form always wins."""
    if layer.pinned_form is not None:
        return layer.pinned_form
    if not _tunable(x):
        return static_form(layer, x.device)
    tuned, kind = layer.tuned_forms(), _input_kind(x)
    if kind not in tuned:
        if x.is_cuda and torch.cuda.is_current_stream_capturing():
            return static_form(layer, x.device)
        seconds = _fastest_runs(layer, x, candidate_forms(layer, x))
        tuned[kind] = min(seconds, key=seconds.get)
        layer.release_kept_weights(keep=set(tuned.values()))  # a dense kernel is the size of the replaced conv
    return tuned[kind]


def run_form(layer, x: torch.Tensor) -> torch.Tensor:
    return FORMS[choose_form(layer, x)](layer, x)
