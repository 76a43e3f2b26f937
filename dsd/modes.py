"""Looking at a model without changing it: eval mode, recorded call shapes, its floating-point outputs."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Dict, Iterator, List, Mapping, Tuple

import torch
import torch.nn as nn
from torch.utils._pytree import tree_flatten

__all__ = ["eval_mode", "record_shapes", "floating_outputs", "CallShapes"]

Shape = Tuple[int, ...]
CallShapes = Dict[str, List[Tuple[Shape, Shape]]]  # name -> (input shape, output shape) per call


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode (no BatchNorm statistics updated), each module's own training flag restored after."""
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for m, flag in flags.items():
            m.training = flag


@contextmanager
def record_shapes(modules: Mapping[str, nn.Module]) -> Iterator[CallShapes]:
    """Forward hooks that record every call's first-input and output shapes, by name.

    The dict fills in first-call order (execution order); modules never called are absent.
    """
    calls: CallShapes = {}

    def recorder(name):
        def record(module, args, output):  # returns None: a hook's return value would replace the output
            calls.setdefault(name, []).append((tuple(args[0].shape), tuple(output.shape)))
        return record
    handles = [module.register_forward_hook(recorder(name)) for name, module in modules.items()]
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


def floating_outputs(output: Any) -> List[torch.Tensor]:
    """The floating-point tensors in a model's output, however nested (tuples, dicts, detection lists)."""
    return [t for t in tree_flatten(output)[0] if isinstance(t, torch.Tensor) and t.is_floating_point()]
