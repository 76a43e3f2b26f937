"""Build or load a model from one source string: ``timm:NAME``, ``torchvision:NAME``, ``dsd:NAME``,
``package.module:factory`` (imports and runs your code: only with ``trust_code=True``), a state dict
(``.pt/.pth/.pth.tar/.bin/.ckpt`` with ``weights_only=True``, or ``.safetensors``) with an architecture, a whole
pickled module (only with ``trust_pickle=True``: unpickling runs code from the file), or a dsd plan.

:func:`parse_source` is the one parser of these strings; the CLI, plans and recipes all go through it.
"""
from __future__ import annotations

import argparse
import contextlib
import difflib
import importlib
import inspect
import pickle
import re
import zipfile
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import torch
import torch.nn as nn

from ..errors import DsdError

__all__ = ["ModelSource", "SourceRef", "parse_source", "build_arch", "load_model", "load_state_dict_file",
           "read_safetensors", "load_into",
           "STATE_DICT_SUFFIXES", "SUPPORTED_FORMATS", "PLAN_SUFFIX", "REGISTRIES", "check_trusted"]

STATE_DICT_SUFFIXES = (".pt", ".pth", ".tar", ".bin", ".ckpt")  # .tar: timm's train.py writes model_best.pth.tar
SUPPORTED_FORMATS = ("timm:NAME, torchvision:NAME, dsd:NAME, package.module:factory with --trust-code, a state dict "
                     "(.pt/.pth/.pth.tar/.bin/.ckpt or .safetensors) with --arch, a pickled nn.Module with "
                     "--trust-pickle, or a dsd plan (.plan.json)")
_CHECKPOINT_KEYS = ("state_dict", "model", "model_state_dict", "module")  # common training-checkpoint layouts
PLAN_SUFFIX = ".plan.json"
REGISTRIES = ("timm", "torchvision", "dsd")  # model names that build known code only: safe from any file
FACTORY, FILE, PLAN = "factory", "file", "plan"
_FACTORY = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


@dataclass(frozen=True)
class SourceRef:
    """A parsed source string: ``kind`` is a registry (timm, torchvision, dsd), factory, file or plan."""
    kind: str
    name: str  # the model name, ``package.module:factory``, or the path

    @property
    def is_registry(self) -> bool:
        return self.kind in REGISTRIES


def parse_source(text: str) -> SourceRef:
    """What a source string names. Files that exist win over the ``package.module:factory`` reading."""
    if not isinstance(text, str) or not text:
        raise DsdError(f"model source {text!r} is empty; give {SUPPORTED_FORMATS}")
    kind, sep, name = text.partition(":")
    if sep and kind in REGISTRIES:
        if not name:
            raise DsdError(f"model source {text!r} names no model: give {kind}:NAME")
        return SourceRef(kind, name)
    if text.endswith(PLAN_SUFFIX):
        return SourceRef(PLAN, text)
    if _FACTORY.match(text) and not Path(text).exists():
        return SourceRef(FACTORY, text)
    return SourceRef(FILE, text)


def check_trusted(text: str, trust_code: bool, where: str) -> None:
    """Refuse a source or architecture that would import and run user code, unless trusted."""
    if not trust_code and parse_source(text).kind == FACTORY:
        raise UntrustedCode(text, where)


class UntrustedCode(DsdError):
    def __init__(self, ref: str, where: str):
        super().__init__(f"{where} names {ref!r}, which imports and runs Python code from your environment; dsd "
                         "runs it only when asked: pass --trust-code (trust_code=True) if you trust where it came from")


@dataclass
class ModelSource:
    """How the original model was obtained; stored in the plan so the converted model can be rebuilt."""
    arch: Optional[str] = None  # timm:NAME, torchvision:NAME or package.module:factory
    arch_kwargs: Dict[str, Any] = field(default_factory=dict)
    weights: Optional[str] = None  # the file the weights came from, if any
    pretrained: bool = False

    @property
    def random_weights(self) -> bool:
        """A timm or torchvision architecture built without pretrained weights or a weights file."""
        return (self.weights is None and not self.pretrained and self.arch is not None
                and parse_source(self.arch).kind in ("timm", "torchvision"))

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def _suggest(name: str, choices) -> str:
    close = difflib.get_close_matches(name, list(choices), n=3, cutoff=0.6)
    return f" Did you mean: {', '.join(close)}?" if close else ""


def build_arch(arch: str, pretrained: bool = False, trust_code: bool = False, where: str = "the architecture",
               **kwargs) -> nn.Module:
    """A model from ``timm:NAME``, ``torchvision:NAME``, ``dsd:NAME`` or (with ``trust_code``) ``package.module:factory``.
    A constructor that refuses its keywords (a misspelt ``--arch-kwarg``) is one line naming them."""
    ref = parse_source(arch)
    if ref.kind not in (*REGISTRIES, FACTORY):
        raise DsdError(f"architecture {arch!r} is not of the form timm:NAME, torchvision:NAME, dsd:NAME or "
                       "package.module:factory")
    kind, name = (ref.kind, ref.name) if ref.is_registry else arch.split(":")
    given = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    build = _builder(arch, kind, name, pretrained, trust_code, where, kwargs)
    try:
        return build()
    except DsdError:
        raise
    except Exception as error:
        raise DsdError(f"{arch} could not be built{f' with {given}' if given else ''}: {type(error).__name__}: "
                       f"{str(error).splitlines()[0] if str(error) else ''}"
                       + ("; check the keywords given (--arch-kwarg)" if given else "")) from error


def _builder(arch: str, kind: str, name: str, pretrained: bool, trust_code: bool, where: str,
             kwargs: Dict[str, Any]) -> Callable[[], nn.Module]:
    """What builds the model, once the name is known to exist (and, for your code, to be trusted)."""
    if kind == "timm":
        import timm
        if name not in timm.list_models():
            raise DsdError(f"timm has no model {name!r}.{_suggest(name, timm.list_models())}")

        def build_timm() -> nn.Module:
            try:
                with _hub_offline():
                    return timm.create_model(name, pretrained=pretrained, **kwargs)
            except Exception as error:
                if pretrained:
                    raise DsdError(f"no pretrained weights for timm:{name} in the local Hugging Face cache "
                                   f"({type(error).__name__}); dsd does not download: drop --pretrained or put the "
                                   "weights in the cache") from error
                raise
        return build_timm
    if kind == "torchvision":
        import torchvision
        names = torchvision.models.list_models()
        if name not in names:
            raise DsdError(f"torchvision has no model {name!r}.{_suggest(name, names)}")
        if pretrained:
            weights = torchvision.models.get_model_weights(name).DEFAULT
            cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
            if not cached.is_file():
                raise DsdError(f"no pretrained weights for torchvision:{name} in the local cache ({cached} is "
                               "missing); drop --pretrained or put the weights file there")
        builder = torchvision.models.get_model_builder(name)
        if not pretrained and "weights_backbone" in inspect.signature(builder).parameters:
            kwargs.setdefault("weights_backbone", None)  # its default (ImageNet weights) would be downloaded
        return lambda: builder(weights="DEFAULT" if pretrained else None, **kwargs)
    if kind == "dsd":
        from .. import zoo
        return lambda: zoo.build(name, pretrained, **kwargs)
    if not trust_code:  # only a package.module:factory is left here
        raise UntrustedCode(arch, where)
    try:
        factory = getattr(importlib.import_module(kind), name)
    except (ImportError, AttributeError) as error:
        raise DsdError(f"cannot import the model factory {arch!r}: {error}") from error
    return lambda: factory(**kwargs)


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    """Hugging Face hub in offline mode: pretrained weights come from the local cache or not at all."""
    from huggingface_hub import constants
    previous, constants.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE, True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = previous


def _check_file(path: Path) -> None:
    if not path.exists():
        raise DsdError(f"{path}: no such file")
    if path.is_dir():
        raise DsdError(f"{path} is a directory; give a model file")
    if path.stat().st_size == 0:
        raise DsdError(f"{path} is empty")


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in archive.namelist())


def _as_state_dict(obj: Any, path: Path) -> Dict[str, torch.Tensor]:
    if isinstance(obj, dict):
        for key in _CHECKPOINT_KEYS:
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if tensors and len(tensors) == len(obj):
            return tensors
    raise DsdError(f"{path} holds a {type(obj).__name__}, not a state dict or a model; save model.state_dict() "
                   f"or the whole model")


def read_safetensors(path: Path) -> Dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` file, as saved; one line where the file cannot be read."""
    from safetensors.torch import load_file
    try:
        return load_file(str(path))
    except Exception as error:
        raise DsdError(f"{path} is not a readable safetensors file (truncated or corrupt?): {error}") from error


def load_state_dict_file(path: Path) -> Dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a ``weights_only=True`` torch file (no code from the file runs), its
    keys as the model names its modules: the prefixes a DDP or ``torch.compile`` wrapper adds when the wrapped model
    is saved (``module.``, ``_orig_mod.``) are removed, as timm's ``clean_state_dict`` does."""
    from timm.models import clean_state_dict

    _check_file(path)
    if path.suffix == ".safetensors":
        return clean_state_dict(read_safetensors(path))
    try:
        # timm's training checkpoints keep their argparse.Namespace of arguments (data only), as timm loads them
        with torch.serialization.safe_globals([argparse.Namespace]):
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise _PickledObject(path) from error
    return clean_state_dict(_as_state_dict(loaded, path))


class _PickledObject(DsdError):
    def __init__(self, path: Path):
        super().__init__(f"{path} holds a pickled Python object (such as a whole nn.Module); unpickling it runs "
                         "code from the file, so dsd refuses by default. If you trust the file, pass --trust-pickle "
                         "(trust_pickle=True); better, save model.state_dict() and pass --arch")


def _load_torch_file(path: Path, trust_pickle: bool) -> Any:
    """A state dict, or with ``trust_pickle`` a pickled module; readable errors for everything else."""
    if _is_torchscript(path):
        raise DsdError(f"{path} is a TorchScript archive, which dsd cannot convert; supported: {SUPPORTED_FORMATS}")
    try:
        return load_state_dict_file(path)
    except _PickledObject:
        if not trust_pickle:
            raise
        return torch.load(path, map_location="cpu", weights_only=False)
    except DsdError:
        raise
    except Exception as error:
        raise DsdError(f"{path} could not be read as a PyTorch file (truncated or corrupt?): "
                       f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}") from error


class _Names:
    """The model's state-dict names, and which of them hold one tensor (a module registered under two names,
    tied weights): safetensors' ``save_model`` writes such a tensor under one of its names only."""

    def __init__(self, model: nn.Module):
        self.own = model.state_dict(keep_vars=True)
        self._aliases: Dict[int, set] = {}
        for key, tensor in self.own.items():
            self._aliases.setdefault(id(tensor), set()).add(key)

    def missing(self, keys: Iterable[str]) -> List[str]:
        """The model's names whose tensor none of ``keys`` fills."""
        given = set(keys)
        return [k for k, tensor in self.own.items() if self._aliases[id(tensor)].isdisjoint(given)]

    def fit(self, keys: Iterable[str]) -> bool:
        keys = list(keys)
        return set(keys) <= self.own.keys() and not self.missing(keys)


def _without_common_prefix(state_dict: Dict[str, torch.Tensor], names: _Names) -> Dict[str, torch.Tensor]:
    """The keys without the one first component they all share (``model.``: the attribute a LightningModule or a
    training wrapper keeps the network under), where that makes them the model's own keys; else as they are."""
    prefixes = {key.partition(".")[0] for key in state_dict}
    if len(prefixes) == 1 and all("." in key for key in state_dict):
        stripped = {key.partition(".")[2]: value for key, value in state_dict.items()}
        if names.fit(stripped):
            return stripped
    return state_dict


def load_into(model: nn.Module, state_dict: Dict[str, torch.Tensor], path: Path, arch: str) -> None:
    """Load ``state_dict`` into ``model`` where it fits exactly (a tensor the model holds under several names needs
    one of them); else one line naming ``path``, ``arch`` and what does not fit."""
    names = _Names(model)
    own = names.own
    state_dict = _without_common_prefix(state_dict, names)
    missing = names.missing(state_dict)
    unexpected = [k for k in state_dict if k not in own]
    wrong = [k for k in own if k in state_dict and own[k].shape != state_dict[k].shape]
    cast = [k for k in own if k in state_dict and own[k].is_floating_point() and not state_dict[k].is_floating_point()]
    if cast:
        raise DsdError(f"{path}: {cast[0]} holds {state_dict[cast[0]].dtype} values where {arch} has floating-point "
                       f"weights ({len(cast)} such tensors); save the trained float weights")
    if missing or unexpected or wrong:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if keys:
                parts.append(f"{label}: {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''} ({len(keys)})")
        hint = " (a different num_classes? pass --arch-kwarg num_classes=N)" if wrong else ""
        raise DsdError(f"{path} does not fit {arch}: {'; '.join(parts)}{hint}")
    if getattr(state_dict, "_metadata", None) is None:
        # safetensors keeps no module versions (torch.save keeps them): the model's own, as the file fits it
        # (torchvision's MNASNet refuses a state dict without its version)
        state_dict = OrderedDict(state_dict)
        state_dict._metadata = getattr(own, "_metadata", None)  # type: ignore[attr-defined]
    model.load_state_dict(state_dict, strict=False)  # every tensor filled, through one of its names at least


def load_model(source: str, arch: Optional[str] = None, arch_kwargs: Optional[Dict[str, Any]] = None,
               pretrained: bool = False, trust_pickle: bool = False, trust_code: bool = False
               ) -> Tuple[nn.Module, ModelSource]:
    """The model named by ``source`` (see the module docstring) and a record of how to rebuild it."""
    arch_kwargs = dict(arch_kwargs or {})
    ref = parse_source(source)
    if ref.kind == PLAN:
        from .converted import load_converted
        return load_converted(source, trust_code=trust_code), ModelSource(weights=source)
    if ref.kind != FILE:
        model = build_arch(source, pretrained, trust_code, where="the model source", **arch_kwargs)
        return model, ModelSource(source, arch_kwargs, None, pretrained)
    path = Path(source)
    _check_file(path)
    if path.suffix == ".safetensors":
        loaded: Any = load_state_dict_file(path)
    elif path.suffix in STATE_DICT_SUFFIXES:
        loaded = _load_torch_file(path, trust_pickle)
    else:
        raise DsdError(f"{path}: unsupported file type {path.suffix or '(no suffix)'!r}; supported: {SUPPORTED_FORMATS}")
    if isinstance(loaded, nn.Module):
        return loaded, ModelSource(arch, arch_kwargs, str(path))
    state_dict = _as_state_dict(loaded, path)
    if arch is None:
        raise DsdError(f"{path} holds a state dict (weights only); say which model it belongs to with --arch "
                       "timm:NAME, torchvision:NAME, dsd:NAME or package.module:factory")
    model = build_arch(arch, False, trust_code, where="--arch", **arch_kwargs)
    load_into(model, state_dict, path, arch)
    return model, ModelSource(arch, arch_kwargs, str(path))
