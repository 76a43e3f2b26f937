"""Looking at a model without changing it: eval mode, autocast off, recorded call shapes, a forward on meta
tensors, whether it runs on example inputs, its floating-point outputs."""
from __future__ import annotations

import functools
import warnings
from contextlib import ExitStack, contextmanager
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch.nn.utils.stateless import _reparametrize_module
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

from .errors import DsdError, ExampleInputsError, short_error

__all__ = ["eval_mode", "full_precision", "record_shapes", "attributes_kept", "run_on_meta", "call_shapes",
           "output_shape", "floating_outputs", "CallShapes", "as_args", "example_inputs_error",
           "check_runs", "check_class_scores"]

Shape = Tuple[int, ...]
CallShapes = Dict[str, List[Tuple[Shape, Shape]]]  # name -> (input shape, output shape) per call


@contextmanager
def full_precision() -> Iterator[None]:
    """Autocast off (CPU and CUDA) inside: a conversion run under a caller's autocast would decouple the weights
    in bfloat16 (a full-rank conversion 4e-3 off its conv instead of 1e-7)."""
    with ExitStack() as stack:
        for device in ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",):
            stack.enter_context(torch.autocast(device, enabled=False))
        yield


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


def _meta(value: Any) -> Any:
    return torch.empty_like(value, device="meta") if isinstance(value, torch.Tensor) else value


def _meta_state(module: nn.Module) -> Dict[str, torch.Tensor]:
    """Every parameter and buffer as an empty meta tensor, for ``_reparametrize_module``: named once per place it
    is held (a module registered under two names is swapped once: swapped under each, it kept a meta tensor
    afterwards), and one meta tensor wherever one tensor is held (tied weights stay tied)."""
    metas: Dict[int, torch.Tensor] = {}
    state = {}
    for prefix, sub in module.named_modules():
        for name, tensor in [*sub._parameters.items(), *sub._buffers.items()]:
            if tensor is not None:
                state[f"{prefix}.{name}" if prefix else name] = metas.setdefault(id(tensor), _meta(tensor))
    return state


@contextmanager
def attributes_kept(model: nn.Module) -> Iterator[nn.Module]:
    """Every module's attributes as they were before the block: a forward that caches what it made on the
    module (an anchor grid, a position table) must not keep a tracer's proxy or a meta tensor there."""
    before = [(m, dict(vars(m))) for m in model.modules()]
    try:
        yield model
    finally:
        for module, attributes in before:
            module.__dict__.clear()
            module.__dict__.update(attributes)


def _inference_batch_norm(func, args: tuple, kwargs: dict) -> bool:
    if func is torch.ops.aten._native_batch_norm_legit_no_training.default:
        return True
    return func is torch.ops.aten.native_batch_norm.default and not (
        args[5] if len(args) > 5 else kwargs.get("training", True))


_INPLACE, _BROADCAST, _REDUCTION = "in place", "broadcast", "reduction"
_UNTAGGED_ELEMENTWISE = {"aten::hardswish", "aten::hardswish_"}  # element-wise, not tagged pointwise in ATen


def _writes(schema, kwarg_only: bool) -> bool:
    """Whether the op writes into one of its arguments: the first (``self``), or a keyword-only one (``out``).
    Read from the schema, which every torch release has (torch 2.11 has no ``torch.Tag.out``)."""
    arguments = [a for a in schema.arguments if a.kwarg_only] if kwarg_only else schema.arguments[:1]
    return any(a.alias_info is not None and a.alias_info.is_write for a in arguments)


@functools.lru_cache(maxsize=None)
def _shape_rule(func) -> Optional[str]:
    """How an ATen op with one result shapes it from its inputs, where that is all there is to its shape:
    ``in place`` (an element-wise op on its ``self``), ``broadcast`` (element-wise: the broadcast of its
    inputs), ``reduction`` (over ``dim``, ``keepdim``), else None. An in-place op is element-wise where it or
    its out-of-place twin is tagged so (``hardswish_`` is not, ``hardswish`` is)."""
    tags, schema = set(func.tags), func._schema
    if schema.name in _UNTAGGED_ELEMENTWISE:
        tags.add(torch.Tag.pointwise)
    if len(schema.returns) != 1 or _writes(schema, kwarg_only=True):  # an out= variant
        return None
    if _writes(schema, kwarg_only=False) and schema.name.endswith("_"):  # in place on its self
        twin = getattr(getattr(torch.ops.aten, schema.name.split("::")[-1].rstrip("_"), None), func._overloadname, None)
        elementwise = torch.Tag.pointwise in tags or (twin is not None and _shape_rule(twin) == _BROADCAST)
        return _INPLACE if elementwise else None
    if schema.is_mutable:
        return None
    if torch.Tag.pointwise in tags:
        return _BROADCAST
    names = [argument.name for argument in schema.arguments]
    return _REDUCTION if torch.Tag.reduction in tags and names[:1] == ["self"] and {"dim", "keepdim"} <= set(names) \
        else None


def _signature(value: Any) -> Any:
    """What an op's result dtype depends on: tensors' dtypes (and their dimensions: a 0-dim tensor promotes like
    a scalar), other arguments' types."""
    if isinstance(value, torch.Tensor):
        return value.dtype, value.dim()
    if isinstance(value, (list, tuple)):
        return tuple(_signature(v) for v in value)
    return type(value)


_result_dtypes: Dict[tuple, torch.dtype] = {}


def _result_dtype(func, args: tuple, kwargs: dict) -> torch.dtype:
    """The dtype of ``func(*args, **kwargs)``, found once per op and signature on one-element CPU tensors (the
    real kernel: microseconds, where many ops' meta kernels are Python decompositions of a millisecond)."""
    key = (func, _signature(args), tuple((k, _signature(v)) for k, v in sorted(kwargs.items())))
    if key not in _result_dtypes:
        def tiny(t):
            return torch.ones((1,) * t.dim(), dtype=t.dtype) if isinstance(t, torch.Tensor) else t
        with warnings.catch_warnings():  # what one element says of itself (std: "degrees of freedom <= 0")
            warnings.simplefilter("ignore")
            _result_dtypes[key] = func(*tree_map(tiny, args), **tree_map(tiny, kwargs)).dtype
    return _result_dtypes[key]


def _reduced_shape(func, args: tuple, kwargs: dict) -> Shape:
    arguments = func._schema.arguments
    bound = {a.name: args[i] if i < len(args) else kwargs.get(a.name, a.default_value if a.has_default_value()
                                                                else None) for i, a in enumerate(arguments)}
    x, dims, keepdim = bound["self"], bound["dim"], bound["keepdim"]
    dims = [dims] if isinstance(dims, int) else range(x.dim()) if dims is None or len(dims) == 0 else dims
    reduced = {d % x.dim() for d in dims}
    return tuple(1 if i in reduced else size for i, size in enumerate(x.shape) if keepdim or i not in reduced)


def _tensors(args: tuple, kwargs: dict) -> List[torch.Tensor]:
    """The tensor arguments, also those in lists (``torch.utils._pytree`` costs more than the op it would save)."""
    found = []
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif isinstance(value, (list, tuple)):
            found.extend(v for v in value if isinstance(v, torch.Tensor))
    return found


def _empty_meta(shape: Sequence[int], dtype: torch.dtype, like: Optional[torch.Tensor] = None,
                memory_format: torch.memory_format = torch.preserve_format) -> torch.Tensor:
    """``torch.empty_like(like, dtype=dtype, memory_format=...)`` on meta (contiguous without ``like``). Made with
    ``empty_strided`` where ``like`` is dense: ``empty_like`` on meta is a Python decomposition (50 us, ten times)."""
    if like is not None and memory_format == torch.preserve_format and (
            like.is_contiguous() or like.is_contiguous(memory_format=torch.channels_last)):
        return torch.empty_strided(shape, like.stride(), dtype=dtype, device="meta")
    if like is not None and memory_format == torch.preserve_format:
        return torch.empty_like(like, dtype=dtype)
    contiguous = torch.contiguous_format if memory_format == torch.preserve_format else memory_format
    return torch.empty(shape, dtype=dtype, device="meta", memory_format=contiguous)


def _result_on_meta(func, args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
    """The result of an op that :func:`_shape_rule` shapes, on meta tensors, without its meta kernel (None: another
    op, or not on meta)."""
    rule = _shape_rule(func)
    if rule is None:
        return None
    tensors = _tensors(args, kwargs)
    if not tensors or not all(t.device.type == "meta" or t.dim() == 0 for t in tensors) \
            or not any(t.device.type == "meta" for t in tensors):
        return None
    if rule == _INPLACE:
        return args[0] if isinstance(args[0], torch.Tensor) and args[0].device.type == "meta" else None
    if rule == _REDUCTION and tensors[0].dim() == 0:
        return None
    try:
        dtype = _result_dtype(func, args, kwargs)
    except Exception:  # no CPU kernel for these dtypes: the meta kernel decides
        return None
    if rule == _REDUCTION:
        return _empty_meta(_reduced_shape(func, args, kwargs), dtype)
    shapes = {t.shape for t in tensors}
    shape = shapes.pop() if len(shapes) == 1 else torch.broadcast_shapes(*shapes)
    like = next((t for t in tensors if t.shape == shape and t.device.type == "meta"), None)
    return _empty_meta(shape, dtype, like, kwargs.get("memory_format", torch.preserve_format))


class _ShapeOnly(TorchDispatchMode):
    """Inference BatchNorm, element-wise ops and reductions on meta tensors as what they are: shape-preserving,
    broadcasting, reducing.

    PyTorch computes many of their meta results through Python decompositions: the whole normalisation (three
    quarters of a meta forward of resnet18, which then cost as much as a real forward at batch 1), ``relu``,
    ``hardswish``, ``hardtanh``, ``gelu``, ``add`` at 0.2-3 ms a call (mobilenetv3_large_100's meta forward took
    77 ms, four times its real one), ``mean`` over dims at 0.25 ms (squeeze-excitation blocks). Batch statistics
    (training, or no running statistics) and every other op take PyTorch's own path.
    """

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _inference_batch_norm(func, args, kwargs):
            x = args[0]
            statistic = _empty_meta((x.shape[1],), x.dtype)  # the saved statistics, as the meta kernel shapes them
            return _empty_meta(x.shape, x.dtype, x), statistic, statistic
        result = _result_on_meta(func, args, kwargs)
        return func(*args, **kwargs) if result is None else result


@torch.no_grad()
def run_on_meta(model: nn.Module, args: Tuple[Any, ...]) -> bool:
    """Run ``model(*args)`` with its parameters, buffers and tensor arguments on the meta device: every shape,
    no arithmetic (hooks see the shapes, as in a real run). True if it ran; the model is left as it was.

    False where it did not (an op without a meta kernel, a tensor that is not a parameter or buffer, control
    flow on values): the caller then runs it for real.
    """
    with attributes_kept(model):
        try:
            with _ShapeOnly(), _reparametrize_module(model, _meta_state(model)):
                model(*tree_map(_meta, args))
        except Exception:  # any failure on meta tensors: the real run decides
            return False
    return True


def as_args(example_inputs: Any) -> tuple:
    """Example inputs as forward arguments: a tuple is the arguments, anything else the one argument."""
    return example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)


def _describe_argument(argument: Any) -> str:
    if isinstance(argument, torch.Tensor):
        return f"of shape {tuple(argument.shape)}"
    count = f" of {len(argument)}" if isinstance(argument, (list, dict)) else ""
    return f"(a {type(argument).__name__}{count})"


def example_inputs_error(example_inputs: Any, error: BaseException, what: str = "the model",
                         inputs: str = "example inputs") -> ExampleInputsError:
    """The one-line error for a model (``what``) that fails on ``example_inputs`` (called ``inputs``): their shapes
    and the failure."""
    described = ", ".join(_describe_argument(a) for a in as_args(example_inputs))
    hint = ""
    if isinstance(example_inputs, list):
        hint = " (a list is one argument; a tuple holds the forward's arguments)"
    return ExampleInputsError(f"{what} does not run on {inputs} {described}: {short_error(error)}; give inputs of the "
                              f"shape, dtype and device it takes{hint}")


def check_runs(model: nn.Module, example_inputs: Any, what: str = "the model", inputs: str = "example inputs") -> None:
    """Raise :class:`ExampleInputsError` (naming the model as ``what``, the inputs as ``inputs``) where
    ``model(*example_inputs)`` fails in eval mode. A real run: meta kernels do not check every dtype and device."""
    with eval_mode(model), torch.no_grad():
        try:
            model(*as_args(example_inputs))
        except Exception as error:
            raise example_inputs_error(example_inputs, error, what, inputs) from error


def check_class_scores(logits: Any, model: str, what: str) -> None:
    """Refuse, in one line, outputs that are not a (batch, classes) tensor of class scores; ``model`` names the
    model, ``what`` says what needs them."""
    if not isinstance(logits, torch.Tensor):  # a detector's list of dicts, a feature extractor's list of maps
        raise DsdError(f"{model} returns a {type(logits).__name__}, not a tensor of class scores; {what}")
    if logits.dim() != 2:
        raise DsdError(f"{model} returns outputs of shape {tuple(logits.shape)}, not class scores; {what}")


def call_shapes(model: nn.Module, args: Tuple[Any, ...], modules: Mapping[str, nn.Module]) -> CallShapes:
    """The call shapes of ``modules`` when ``model(*args)`` runs: on meta tensors where it can, else for real."""
    with record_shapes(modules) as calls:
        if not run_on_meta(model, args):
            calls.clear()  # what a failed meta run recorded
            model(*args)
    return calls


@torch.no_grad()
def output_shape(module: nn.Module, input_shape: Shape) -> Shape:
    """The shape of ``module(x)`` for ``x`` of ``input_shape`` (in the module's dtype), computed on meta tensors.

    Its forward runs without the module's own hooks: a user's hook, carried over to a converted layer, has no
    business with meta tensors."""
    x = torch.empty(input_shape, dtype=next(module.parameters()).dtype, device="meta")
    with _ShapeOnly(), _reparametrize_module(module, _meta_state(module)):
        return tuple(module.forward(x).shape)


def floating_outputs(output: Any) -> List[torch.Tensor]:
    """The floating-point tensors in a model's output, however nested (tuples, dicts, detection lists)."""
    return [t for t in tree_flatten(output)[0] if isinstance(t, torch.Tensor) and t.is_floating_point()]
