"""ONNX export of a (converted) model, checked against PyTorch with onnxruntime."""
from __future__ import annotations

import os
import warnings
from typing import List, Union

import torch
import torch.nn as nn
from torch.utils._pytree import tree_flatten

from ..convert.fold_bn import fold_batchnorm
from ..errors import DsdError
from ..fileio import atomic_path
from ..modes import eval_mode, full_precision
from ..module_tree import deepcopy_module
from ..timing.latency import pin_onnxruntime_forms
from ..timing.runtimes import export_onnx_model
from ..timing.settings import BenchmarkSettings

__all__ = ["export_onnx"]


FORM_CHOICES = ("timed", "static")


@torch.no_grad()
@full_precision()
def export_onnx(model: nn.Module, example: torch.Tensor, path: Union[str, os.PathLike],
                rtol: float = 1e-3, atol: float = 1e-4, fold_bn: bool = True, forms: str = "timed",
                dynamic_batch: bool = True, progress: bool = False) -> float:
    """Export with ``torch.onnx.export`` and return onnxruntime's max abs difference from PyTorch's outputs (every
    tensor of them: a tuple's, a dict's), which must be within ``atol + rtol`` times each output's largest value.

    On a copy (``model`` is unchanged): inference BatchNorm is folded into the convs first (``fold_bn``), and
    ``forms="timed"`` pins each separable layer of rank >= 2 to the form that runs fastest in ONNX Runtime at
    ``example``'s shape (:func:`dsd.timing.pin_onnxruntime_forms`; each layer timed alone, through the
    layer-timing cache); ``"static"`` exports the static rule's forms. Layers pinned already keep their form.
    ``dynamic_batch``: the file takes any batch size (a model that does not export so is exported at
    ``example``'s batch, with a warning). A caller's autocast is off inside: the file computes in the model's own
    precision (under bfloat16 autocast the export had bfloat16 convs, which ONNX Runtime's CPU provider refuses)."""
    if forms not in FORM_CHOICES:
        raise DsdError(f"forms must be one of {list(FORM_CHOICES)}, got {forms!r}")
    if not isinstance(example, torch.Tensor):
        raise DsdError(f"export_onnx exports a model called on one tensor, and checks the file on it; the example is a "
                       f"{type(example).__name__} (a detector's list of images?): export such a model with "
                       "torch.onnx.export, as its library documents")
    try:
        import onnxruntime
    except ImportError as error:
        raise DsdError("ONNX export needs onnx, onnxscript and onnxruntime: pip install 'dsd[onnx]'") from error
    with eval_mode(model):
        expected = _tensors(model(example))
    model = deepcopy_module(model).eval()
    if fold_bn:
        model = fold_batchnorm(model, inplace=True)
    if forms == "timed":
        pin_onnxruntime_forms(model, tuple(example.shape),
                              BenchmarkSettings(runtime="onnxruntime", batch_size=example.shape[0]), progress)
    with eval_mode(model):
        with atomic_path(path) as tmp:
            _export(model, example, tmp, dynamic_batch)
            session = onnxruntime.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
            first = session.get_inputs()[0]
            if dynamic_batch and not isinstance(first.shape[0], str):  # the exporter may also fix it without a word
                warnings.warn(f"the ONNX export takes a fixed batch of {first.shape[0]}: this model does not export "
                              "with a dynamic batch dimension", stacklevel=2)
            got = [torch.from_numpy(output) for output in session.run(None, {first.name: example.numpy()})]
            if len(got) != len(expected) or any(g.shape != e.shape for g, e in zip(got, expected)):
                raise DsdError(f"the ONNX export of this model gives outputs of shapes {[tuple(g.shape) for g in got]}"
                               f" where PyTorch gives {[tuple(e.shape) for e in expected]}; not written")
            # (max abs difference, largest value) per output; rtol against the largest value: float rounding scales
            # with the activations behind an output, not with each element (one near zero of a large output differs
            # by 3e-4 in float32)
            gaps = [((g.double() - e.double()).abs().max().item(), e.abs().max().item()) if g.numel() else (0.0, 0.0)
                    for g, e in zip(got, expected)]
            difference = max(gap for gap, _ in gaps)
            if any(gap > atol + rtol * scale for gap, scale in gaps):
                raise DsdError(f"the ONNX export of this model does not reproduce PyTorch's outputs "
                               f"(max abs difference {difference:.3g}); not written")
    return difference


def _export(model: nn.Module, example: torch.Tensor, path, dynamic_batch: bool) -> None:
    """``export_onnx_model``, at ``example``'s batch where the batch cannot stay symbolic."""
    if dynamic_batch:
        try:
            export_onnx_model(model, example, path, dynamic_batch=True)
            return
        except DsdError:  # torch.export could not keep the batch symbolic: export at the example's batch
            pass
    try:
        export_onnx_model(model, example, path)
    except DsdError as error:
        raise DsdError(f"{error}; nothing was written: convert without --export, or export the part of the model "
                       "that traces") from error.__cause__


def _tensors(output) -> List[torch.Tensor]:
    """A model's output tensors in the order the exported file lists them (its pytree order: a dict's values...)."""
    return [t for t in tree_flatten(output)[0] if isinstance(t, torch.Tensor)]
