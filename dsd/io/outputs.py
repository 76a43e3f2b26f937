"""Where ``dsd-convert`` writes, and the checks made before anything is written."""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, List, Optional

from ..errors import DsdError
from ..fileio import remove_stale_temporaries
from .converted import plan_path_for
from .sources import FACTORY, PLAN_SUFFIX, parse_source

__all__ = ["OutputPaths", "default_stem", "output_paths", "check_outputs"]


def default_stem(source: str) -> Path:
    """``timm:resnet50`` -> ``./resnet50``; ``pkg.mod:net`` -> ``./pkg_mod_net``; ``dir/model.pt`` -> ``dir/model``
    (``model_best.pth.tar`` -> ``model_best``)."""
    ref = parse_source(source)
    if ref.is_registry or ref.kind == FACTORY:
        return Path(ref.name.replace(".", "_").replace(":", "_"))
    path = Path(source)
    for double in (PLAN_SUFFIX, ".pth.tar"):
        if path.name.endswith(double):
            return path.with_name(path.name[:-len(double)])
    return path.with_name(path.stem)


@dataclass
class OutputPaths:
    weights: Path
    plan: Path
    module: Optional[Path] = None
    onnx: Optional[Path] = None

    def all(self) -> List[Path]:
        return [self.weights, self.plan, *self.extras()]

    def extras(self) -> List[Path]:
        """The optional outputs asked for (a pickled module, ONNX)."""
        return [p for p in (self.module, self.onnx) if p is not None]


def output_paths(source: str, output: Optional[str] = None, save_module: bool = False,
                 export_onnx: bool = False) -> OutputPaths:
    stem = default_stem(source)
    weights = Path(output) if output else stem.with_name(stem.name + "_dsd.safetensors")
    if weights.suffix != ".safetensors":
        raise DsdError(f"-o {weights}: the converted weights are written as safetensors; give a *.safetensors path")
    base = weights.with_suffix("")
    return OutputPaths(weights, plan_path_for(weights), base.with_suffix(".pt") if save_module else None,
                       base.with_suffix(".onnx") if export_onnx else None)


def _writable_dir(directory: Path) -> bool:
    """Try it: ``os.access`` says yes to root even on read-only mounts."""
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".dsd-write-check-")
    except OSError:
        return False
    os.close(fd)
    os.unlink(tmp)
    return True


def check_outputs(outputs: Iterable[Path], inputs: Iterable[str], force: bool) -> None:
    """Refuse before any work: missing or read-only directory, an input as output, two outputs that are one
    file, or an existing file without force. Temporaries left by dead runs in those directories are removed."""
    input_paths = {Path(i).resolve() for i in inputs if i and Path(i).exists()}
    outputs, seen = list(outputs), set()
    for path in outputs:
        if path.resolve() in seen:
            raise DsdError(f"{path} is named for two outputs: choose distinct files")
        seen.add(path.resolve())
    for path in outputs:
        directory = path.parent
        if not directory.is_dir():  # created when the outputs are written (mkdir -p), if it can be
            existing = next(p for p in [directory.absolute(), *directory.absolute().parents] if p.exists())
            if not existing.is_dir() or not _writable_dir(existing):
                raise DsdError(f"cannot write {path}: {existing} is not a writable directory; choose another output")
            continue
        if path.resolve() in input_paths:
            raise DsdError(f"{path} is also an input; writing it would destroy the input: choose another output")
        if path.is_dir():
            raise DsdError(f"cannot write {path}: it is a directory")
        if path.exists() and not force:
            raise DsdError(f"{path} exists; pass --force to overwrite it")
        if not _writable_dir(directory):
            raise DsdError(f"cannot write {path}: directory {directory} is not writable; choose another -o")
        remove_stale_temporaries(directory)
