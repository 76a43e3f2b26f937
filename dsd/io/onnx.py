"""ONNX export of a (converted) model, checked against PyTorch with onnxruntime."""
from __future__ import annotations

import copy
import os
from typing import Union

import torch
import torch.nn as nn

from ..convert.fold_bn import fold_batchnorm
from ..errors import DsdError
from ..fileio import atomic_path
from ..modes import eval_mode
from ..timing.runtimes import export_onnx_model

__all__ = ["export_onnx"]


@torch.no_grad()
def export_onnx(model: nn.Module, example: torch.Tensor, path: Union[str, os.PathLike],
                rtol: float = 1e-3, atol: float = 1e-4, fold_bn: bool = True) -> float:
    """Export with ``torch.onnx.export`` and return onnxruntime's max abs difference from PyTorch's output.

    Inference BatchNorm is folded into the convs first (``fold_bn``; on a copy: ``model`` is unchanged)."""
    try:
        import onnxruntime
    except ImportError as error:
        raise DsdError("ONNX export needs onnx, onnxscript and onnxruntime: pip install 'dsd[onnx]'") from error
    with eval_mode(model):
        expected = model(example)
    if fold_bn:
        model = fold_batchnorm(copy.deepcopy(model).eval(), inplace=True)
    with eval_mode(model):
        with atomic_path(path) as tmp:
            export_onnx_model(model, example, tmp)
            session = onnxruntime.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
            (got,) = session.run(None, {session.get_inputs()[0].name: example.numpy()})[:1]
            got = torch.from_numpy(got)
            if got.shape != expected.shape or not torch.allclose(got, expected, rtol=rtol, atol=atol):
                raise DsdError(f"the ONNX export of this model does not reproduce PyTorch's output "
                               f"(max abs difference {(got - expected).abs().max().item():.3g}); not written")
    return (got - expected).abs().max().item()
