"""``BenchmarkSettings``: how every latency in dsd is measured, and which runtime runs the model."""
from __future__ import annotations

import importlib.util
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Dict, Optional

import torch

from ..errors import DsdError

__all__ = ["BenchmarkSettings", "COMPILE_MODES", "DTYPES", "RUNTIMES"]

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
RUNTIMES = ("eager", "compile", "cudagraph", "onnxruntime")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def _help(text: str, **cli: Any) -> Dict[str, Any]:
    return {"help": text, "cli": cli}


@dataclass(frozen=True)
class BenchmarkSettings:
    """How every latency in dsd is measured: the savings report, ``only_if_faster``, ``target_latency``,
    and the benchmarks. The CLI's measurement flags are derived from these fields.

    ``runtime``: ``eager`` (PyTorch as is), ``compile`` (``torch.compile``), ``cudagraph`` (a captured CUDA
    graph replayed: what ``torch.compile(mode="reduce-overhead")`` and TensorRT deployments see) or
    ``onnxruntime`` (dsd's ONNX export in an ``InferenceSession``: CPU provider, CUDA provider on ``cuda``);
    ``compile_mode``: ``torch.compile``'s ``mode`` under runtime ``compile``; ``freezing``: Inductor's
    ``freezing`` there too (PyTorch's setting for compiled inference, off by default as in PyTorch).
    """
    device: str = field(default="cpu", metadata=_help("device to time on: cpu, cuda, cuda:1"))
    dtype: str = field(default="float32", metadata=_help(
        "precision; float16/bfloat16 run under AMP autocast", choices=tuple(DTYPES)))
    batch_size: int = field(default=1, metadata=_help("batch size of the timed inputs"))
    channels_last: bool = field(default=False, metadata=_help("time in the channels_last memory format"))
    runtime: str = field(default="eager", metadata=_help("what runs the model", choices=RUNTIMES))
    compile_mode: str = field(default="default", metadata=_help(
        "torch.compile's mode under --runtime compile", choices=COMPILE_MODES))
    freezing: bool = field(default=False, metadata=_help(
        "under --runtime compile, Inductor's inference freezing: weights become constants and what is computed "
        "from them alone (BatchNorm folding, separable layers' recomposed kernels) is computed once"))
    threads: Optional[int] = field(default=None, metadata=_help(
        "CPU threads (torch and onnxruntime); default: torch's current setting"))
    warmup: int = field(default=10, metadata=_help("untimed iterations first"))  # timm benchmark.py: 10 and 40
    iters: int = field(default=40, metadata=_help("timed iterations"))

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise DsdError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.runtime not in RUNTIMES:
            raise DsdError(f"runtime must be one of {', '.join(RUNTIMES)}, got {self.runtime!r}")
        if self.compile_mode not in COMPILE_MODES:
            raise DsdError(f"compile_mode must be one of {', '.join(COMPILE_MODES)}, got {self.compile_mode!r}")
        try:
            device = torch.device(self.device)
        except (RuntimeError, TypeError):
            raise DsdError(f"device {self.device!r} is not a torch device; use cpu, cuda or cuda:N") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise DsdError(f"device {self.device!r} asked for, but this machine has no CUDA GPU; use --device cpu")
        if device.type not in ("cpu", "cuda"):
            raise DsdError(f"device {self.device!r}: dsd times on cpu or cuda only")
        for name in ("batch_size", "iters", "warmup", "threads"):
            value, least = getattr(self, name), 0 if name == "warmup" else 1
            if name == "threads" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise DsdError(f"{name} must be an integer >= {least}, got {value!r}")
        for name in ("channels_last", "freezing"):
            if not isinstance(getattr(self, name), bool):
                raise DsdError(f"{name} must be true or false, got {getattr(self, name)!r}")
        self._check_runtime(device)

    def _check_runtime(self, device: torch.device) -> None:
        if self.compile_mode != "default" and self.runtime != "compile":
            raise DsdError(f"compile_mode {self.compile_mode!r} applies to runtime compile, not {self.runtime!r}: "
                           "add --runtime compile or drop --compile-mode")
        if self.freezing and self.runtime != "compile":
            raise DsdError(f"freezing applies to runtime compile, not {self.runtime!r}: add --runtime compile or "
                           "drop --freezing")
        if self.runtime == "cudagraph" and device.type != "cuda":
            raise DsdError("runtime cudagraph replays a CUDA graph and needs a CUDA device: add --device cuda, "
                           "or choose eager, compile or onnxruntime")
        if self.runtime != "onnxruntime":
            return
        if importlib.util.find_spec("onnxruntime") is None:
            raise DsdError("runtime onnxruntime needs onnxruntime, onnx and onnxscript: pip install 'dsd[onnx]'")
        if self.dtype != "float32":
            raise DsdError(f"runtime onnxruntime times the float32 ONNX export; drop dtype {self.dtype!r}")
        if self.channels_last:
            raise DsdError("channels_last does not apply to onnxruntime, which chooses its own layout; drop it")
        if device.type == "cuda":
            import onnxruntime
            if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
                raise DsdError("runtime onnxruntime on cuda needs onnxruntime-gpu (this onnxruntime has no CUDA "
                               "provider); use --device cpu or install onnxruntime-gpu")

    @property
    def is_cuda(self) -> bool:
        return torch.device(self.device).type == "cuda"

    @property
    def thread_count(self) -> int:
        return self.threads or torch.get_num_threads()

    def describe(self) -> str:
        """How the timings are taken, in a few words: ``eager, cpu, float32, channels_last, batch 8``."""
        layout = ", channels_last" if self.channels_last else ""
        how = [self.compile_mode] if self.compile_mode != "default" else []
        how += ["freezing"] if self.freezing else []
        runtime = f"{self.runtime} ({', '.join(how)})" if how else self.runtime
        return f"{runtime}, {self.device}, {self.dtype}{layout}, batch {self.batch_size}"

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "BenchmarkSettings":
        """Settings from a mapping (a plan's record, a recipe, CLI values); unknown keys are refused.
        ``compile: true`` (the field of earlier releases) means ``runtime: compile``."""
        if not isinstance(data, dict):
            raise DsdError(f"benchmark settings must be a mapping, got {data!r}")
        return cls().updated(**data)

    def updated(self, **changes: Any) -> "BenchmarkSettings":
        """A copy with some fields changed; ``compile=True`` (earlier releases) means ``runtime="compile"``."""
        if "compile" in changes:
            legacy = changes.pop("compile")
            if not isinstance(legacy, bool):
                raise DsdError(f"compile must be true or false, got {legacy!r}; prefer runtime='compile'")
            if legacy and changes.setdefault("runtime", "compile") != "compile":
                raise DsdError(f"compile=true and runtime={changes['runtime']!r} disagree; give runtime alone")
        unknown = sorted(set(changes) - {f.name for f in fields(self)})
        if unknown:
            raise DsdError(f"unknown benchmark setting {unknown[0]!r}; valid: {', '.join(f.name for f in fields(self))}")
        return replace(self, **changes)
