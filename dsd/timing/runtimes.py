"""The runtimes a model is timed in: a registry of handlers, each turning a module and an input into one step.

A handler gets the caller's module (never changed: it works on a copy), an input tensor already on the
device and in the memory format of the settings, and returns a callable that runs one inference.
"""
from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict

import numpy as np
import torch
import torch.nn as nn

from ..errors import DsdError, short_error
from ..modes import full_precision
from ..module_tree import deepcopy_module
from .settings import BenchmarkSettings

__all__ = ["Step", "RUNTIME_HANDLERS", "prepare_step", "on_device", "export_onnx_model", "onnxruntime_session"]

Step = Callable[[], Any]
Handler = Callable[[nn.Module, torch.Tensor, BenchmarkSettings], Step]
RUNTIME_HANDLERS: Dict[str, Handler] = {}


def _runtime(name: str):
    def register(handler: Handler) -> Handler:
        RUNTIME_HANDLERS[name] = handler
        return handler
    return register


def prepare_step(module: nn.Module, x: torch.Tensor, settings: BenchmarkSettings) -> Step:
    return RUNTIME_HANDLERS[settings.runtime](module, x, settings)


def on_device(module: nn.Module, settings: BenchmarkSettings) -> nn.Module:
    """An eval-mode copy of ``module`` on the settings' device, in their memory format."""
    # Copied outside inference mode, as a user's model is made: weights copied inside it would be inference
    # tensors, which run differently (a rank-r layer cannot keep its weight layout between calls).
    with torch.inference_mode(False):
        module = deepcopy_module(module).eval().to(settings.device)
        return module.to(memory_format=torch.channels_last) if settings.channels_last else module


@_runtime("eager")
def _eager(module: nn.Module, x: torch.Tensor, settings: BenchmarkSettings) -> Step:
    module = on_device(module, settings)
    return lambda: module(x)


def _import_cpp_extension_quietly() -> None:
    """Inductor imports ``torch.utils.cpp_extension``, which on a machine without a GPU logs "No CUDA runtime is
    found" as it reads CUDA_HOME at import: noise beside dsd's one-line messages, and under ``--quiet``."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    previous = logger.level
    logger.setLevel(logging.ERROR)
    try:
        import torch.utils.cpp_extension  # noqa: F401
    finally:
        logger.setLevel(previous)


@_runtime("compile")
class _CompiledStep:
    """One call of ``torch.compile`` over an eval copy (``module``) of the caller's model, compiled as it is
    made: Dynamo decides whether the weights are frozen constants as it traces, from Inductor's global
    ``freezing``, not from options given to torch.compile (with those alone nothing was frozen)."""

    def __init__(self, module: nn.Module, x: torch.Tensor, settings: BenchmarkSettings):
        _import_cpp_extension_quietly()
        from torch._inductor import config, list_mode_options
        options = list_mode_options(settings.compile_mode)  # torch.compile takes a mode or options, not both
        self.module, self.x = on_device(module, settings), x
        self.compiled = torch.compile(self.module, options=options)
        self.graphs = bool(options.get("triton.cudagraphs"))
        with config.patch(freezing=settings.freezing):
            self()

    def __call__(self) -> Any:
        if self.graphs:
            # each call one inference step of CUDA-graph trees: models timed interleaved share their memory pool
            torch.compiler.cudagraph_mark_step_begin()
        return self.compiled(self.x)


@_runtime("cudagraph")
def _cuda_graph(module: nn.Module, x: torch.Tensor, settings: BenchmarkSettings) -> Step:
    """Capture one forward on a static input (after warm-up on a side stream, as PyTorch's docs do) and
    return its replay: no Python and no kernel-launch overhead, as in a reduce-overhead or TensorRT engine."""
    module = on_device(module, settings)
    current = torch.cuda.current_stream(settings.device)
    side = torch.cuda.Stream(settings.device)
    side.wait_stream(current)
    with torch.cuda.stream(side):
        for _ in range(3):
            module(x)
    current.wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        module(x)
    return _GraphReplay(graph, module)


class _GraphReplay:
    """A captured graph's replay, holding the module whose weights the graph reads by address: let go, the next
    capture's ``empty_cache`` unmaps them (an illegal memory access when models are timed interleaved)."""

    def __init__(self, graph: "torch.cuda.CUDAGraph", module: nn.Module):
        self.graph, self.module = graph, module

    def __call__(self) -> None:
        self.graph.replay()


@full_precision()  # an export under a caller's autocast would write its dtype's convs into the file
def export_onnx_model(module: nn.Module, example: torch.Tensor, path: Path, dynamic_batch: bool = False) -> None:
    """``torch.onnx.export`` (the dynamo exporter, weights inside the file), quietly; ``dynamic_batch``: the
    first input dimension symbolic, so the file runs at any batch size. A model it cannot export is a
    :class:`DsdError` (data-dependent control flow: detection models' NMS...)."""
    dynamic = {}
    if dynamic_batch:
        dynamic["dynamic_shapes"] = ({0: torch.export.Dim("batch")},)
        if example.shape[0] == 1:  # torch.export specialises a dimension of size 1 to a constant
            example = example.expand(2, *example.shape[1:])
    # works when called under inference_mode too; the exporter's report of a failure (the whole graph, hundreds of
    # kB written to stderr) is not printed: the error says it in one line and chains the exception
    try:
        with torch.inference_mode(False), torch.no_grad(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            torch.onnx.export(module, (example.clone(),), str(path), dynamo=True, external_data=False, verbose=False,
                              **dynamic)
    except Exception as error:
        raise DsdError(f"torch.onnx.export cannot export this model ({short_error(error)})") from error


def onnxruntime_session(module: nn.Module, example: torch.Tensor, settings: BenchmarkSettings):
    """An ``InferenceSession`` over the float32 export of a CPU copy of ``module``, all graph optimisations on."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = settings.thread_count
    # Idle workers would spin on the cores the next interleaved session needs (on 2 cores: 2.3x slower).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    providers = ["CUDAExecutionProvider"] if settings.is_cuda else ["CPUExecutionProvider"]
    with torch.inference_mode(False):  # parameters copied inside it would be inference tensors, which export refuses
        cpu_copy = deepcopy_module(module).eval().float().cpu()
    with tempfile.TemporaryDirectory(prefix="dsd-onnx-") as folder:
        path = Path(folder) / "model.onnx"
        export_onnx_model(cpu_copy, example.detach().float().cpu(), path)
        return onnxruntime.InferenceSession(str(path), options, providers=providers)


@_runtime("onnxruntime")
def _onnxruntime(module: nn.Module, x: torch.Tensor, settings: BenchmarkSettings) -> Step:
    try:
        session = onnxruntime_session(module, x, settings)
    except DsdError as error:
        raise DsdError(f"{error}, so it cannot be timed in onnxruntime: choose another runtime (--runtime eager)"
                       ) from error.__cause__
    name = session.get_inputs()[0].name
    if not settings.is_cuda:
        feed = {name: x.detach().cpu().numpy()}
        return lambda: session.run(None, feed)
    binding = session.io_binding()  # inputs and outputs stay on the GPU: no host copies in the timing
    x = x.contiguous()
    binding.bind_input(name, "cuda", x.device.index or 0, np.float32, list(x.shape), x.data_ptr())
    for output in session.get_outputs():
        binding.bind_output(output.name, "cuda", x.device.index or 0)
    return lambda: session.run_with_iobinding(binding)
