"""Pieces every ``dsd`` command shares: argument groups, value parsers, and the error contract.

Bad input -> one line on stderr and exit code 2 (argparse's own convention); no traceback unless
``--debug``. Any other exception is a dsd bug: exit 1 with a hint to re-run with ``--debug``.
"""
from __future__ import annotations

import argparse
import ast
import json
import sys
from typing import Any, Callable, Dict, List, Optional, Tuple

from ..errors import DsdError, ExampleInputsError

EXIT_BAD_INPUT = 2


class HelpFormatter(argparse.HelpFormatter):
    """Every option's default in its help, where it has one worth showing (not off, empty or unset)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("%(default)" in text or default in (None, False, [], ()) or default is argparse.SUPPRESS
                or not action.option_strings or "(default" in text):
            return text
        return f"{text} (default: %(default)s)"


class ArgumentParser(argparse.ArgumentParser):
    """argparse with dsd's error contract: one line naming the problem, then exit code 2 (no usage block);
    help shows the defaults."""

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def rank_value(text: str):
    if text == "full":
        return text
    try:
        return positive_int(text)
    except argparse.ArgumentTypeError as error:
        raise argparse.ArgumentTypeError(f"{error}; give a positive integer or 'full'") from None


def key_value(text: str) -> Tuple[str, Any]:
    """``key=value`` with the value read as JSON, else as a Python literal, where it parses (``num_classes=10`` ->
    int, ``weights_backbone=None`` -> None: a constructor's keywords are Python's), else as the string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not of the form key=value")
    for parse in (json.loads, ast.literal_eval):
        try:
            return key, parse(value)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):  # JSONDecodeError is a ValueError
            continue
    return key, value


def add_model_args(parser: argparse.ArgumentParser, source_help: str) -> None:
    parser.add_argument("source", help=source_help)
    parser.add_argument("--arch", help="architecture of a state dict: timm:NAME, torchvision:NAME, dsd:NAME or "
                                       "package.module:factory (with --trust-code)")
    parser.add_argument("--arch-kwarg", action="append", type=key_value, default=[], metavar="KEY=VALUE",
                        help="keyword for the architecture's constructor, e.g. num_classes=10 (repeatable)")
    parser.add_argument("--pretrained", action="store_true", help="timm/torchvision weights from the local cache")
    parser.add_argument("--trust-pickle", action="store_true",
                        help="allow loading a whole pickled nn.Module (unpickling runs code from the file)")
    add_trust_code(parser)


def add_input_size(parser) -> None:
    parser.add_argument("--input-size", type=positive_int, nargs=3, metavar=("C", "H", "W"),
                        help="input size (default: the model's pretrained_cfg, which timm's and dsd's models carry, "
                             "else 3 224 224)")


def add_against(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--against", metavar="CONVERTED",
                        help="the converted model (a dsd .plan.json, or any source above); default: convert "
                             "SOURCE at rank 1 now")


def load_source(args: argparse.Namespace):
    """The model named by SOURCE and how it was obtained, with a warning when its weights are random."""
    from ..io import load_model
    model, source = load_model(args.source, args.arch, arch_kwargs(args), args.pretrained, args.trust_pickle,
                               args.trust_code)
    if source.random_weights and not args.quiet:
        print(f"{getattr(args, 'prog', 'dsd-convert')}: warning: {args.source} has random weights (no --pretrained, "
              "no weights file): its decoupling errors and accuracy mean nothing; pass --pretrained or a weights "
              "file with --arch", file=sys.stderr)
    return model, source


def load_against(args: argparse.Namespace, original, size: List[int]):
    """The model named by ``--against``, or ``original`` converted at rank 1 now."""
    import torch

    from ..convert import convert_model
    from ..io import load_model
    if args.against:
        return load_model(args.against, trust_pickle=args.trust_pickle, trust_code=args.trust_code)[0]
    return convert_model(original, torch.randn(1, *size))[0]


def add_trust_code(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trust-code", action="store_true",
                        help="allow a source, --arch or plan naming package.module:factory (imports and runs that code)")


def add_measure_args(parser: argparse.ArgumentParser) -> None:
    """The measurement flags: one per field of :class:`dsd.BenchmarkSettings`, plus the input size and reports."""
    from ..timing import BenchmarkSettings
    from .dataclass_args import add_dataclass_arguments

    group = parser.add_argument_group("measurement (dsd.BenchmarkSettings)")
    add_input_size(group)
    add_dataclass_arguments(group, BenchmarkSettings)
    group.add_argument("--json", metavar="FILE", help="write the savings report as JSON")
    group.add_argument("--md", metavar="FILE", help="write the savings report as Markdown")
    group.add_argument("--plot", metavar="FILE", help="write a PNG of per-layer FLOPs and latency")


def benchmark_settings(args: argparse.Namespace):
    from ..timing import BenchmarkSettings
    from .dataclass_args import dataclass_from_args
    return dataclass_from_args(BenchmarkSettings, args)


def add_common_flags(parser: argparse.ArgumentParser, force_help: str = "overwrite existing output files") -> None:
    parser.add_argument("--force", action="store_true", help=force_help)
    parser.add_argument("--quiet", action="store_true",
                        help="no progress bars or messages; the results asked for (a report, a table) still print")
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")


def arch_kwargs(args: argparse.Namespace) -> Dict[str, Any]:
    return dict(args.arch_kwarg)


def input_size(args: argparse.Namespace, model) -> List[int]:
    if args.input_size:
        return list(args.input_size)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return list(cfg.get("input_size", (3, 224, 224)))


def console(args: argparse.Namespace, results: bool = False):
    """Rich console on stdout; wide enough for the tables when stdout is a file or a pipe. ``--quiet`` silences
    it, except for ``results``: what the command was asked to print (``pytest -q`` still prints its results)."""
    from rich.console import Console
    return Console(quiet=args.quiet and not results, width=None if sys.stdout.isatty() else 160)


def _one_line(error: DsdError) -> str:
    """The error's message; raised in a DataLoader worker, it comes back with the worker's traceback in its message
    (PyTorch's ExceptionWrapper), whose last line holds the original."""
    lines = str(error).strip().splitlines()
    if len(lines) > 1 and lines[0].startswith("Caught ") and "DataLoader worker" in lines[0]:
        return lines[-1].split(": ", 1)[-1]
    return str(error)


def run_command(prog: str, command: Callable[[argparse.Namespace], Optional[int]], args: argparse.Namespace) -> int:
    try:
        return command(args) or 0
    except DsdError as error:
        if args.debug:
            raise
        hint = " (--input-size C H W)" if isinstance(error, ExampleInputsError) and hasattr(args, "input_size") else ""
        print(f"{prog}: error: {_one_line(error)}{hint}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        if args.debug:
            raise
        print(f"{prog}: internal error: {type(error).__name__}: {error}. This is a dsd bug; re-run with --debug "
              "for the traceback and report it", file=sys.stderr)
        return 1
