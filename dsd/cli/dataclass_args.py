"""Command-line flags derived from a settings dataclass (``ConvertOptions``, ``BenchmarkSettings``).

Each field becomes ``--field-name`` with the field's help text and default; the type says how it is
parsed (bool: a switch, tuple: repeatable, int/float/str: one value); the field's ``cli`` metadata adds
what the type cannot say (another flag name, choices, ``nargs``). Values are validated by the dataclass
itself, so the CLI and the Python API refuse the same things with the same words.
"""
from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any, Dict, Sequence, Type, TypeVar, Union

from .common import rank_value

__all__ = ["add_dataclass_arguments", "dataclass_from_args"]

T = TypeVar("T")
_PARSERS = {"rank": rank_value}


def _without_none(tp: Any) -> Any:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if typing.get_origin(tp) is Union and len(args) == 1 else tp


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def _argparse_kwargs(f: dataclasses.Field, tp: Any) -> Dict[str, Any]:
    default, base = _default(f), _without_none(tp)
    kwargs: Dict[str, Any] = {"dest": f.name, "default": default}
    if base is bool:
        kwargs["action"] = "store_false" if default else "store_true"
    elif typing.get_origin(base) is tuple:
        kwargs.update(action="append", default=[])
    elif base in (int, float, str):
        kwargs["type"] = base
    cli = {k: v for k, v in f.metadata.get("cli", {}).items() if k != "flag"}
    if isinstance(cli.get("type"), str):
        cli["type"] = _PARSERS[cli["type"]]
    kwargs.update(cli)
    kwargs["help"] = f.metadata.get("help", "")
    return kwargs


def add_dataclass_arguments(group, cls: type, skip: Sequence[str] = ()) -> None:
    """Add one flag per field of ``cls`` (except ``skip``) to an argparse parser or group."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name not in skip:
            flag = f.metadata.get("cli", {}).get("flag", "--" + f.name.replace("_", "-"))
            group.add_argument(flag, **_argparse_kwargs(f, hints[f.name]))


def dataclass_from_args(cls: Type[T], args: argparse.Namespace, **extra: Any) -> T:
    """An instance of ``cls`` from the parsed flags (fields it has no flag for come from ``extra``)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    return cls.from_dict({**values, **extra})
