"""The ``dsd`` umbrella command (``convert``, ``report``, ...) and the ``dsd-convert`` console script."""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

import importlib

from .. import __version__
from .common import ArgumentParser, run_command

COMMANDS = ("convert", "report", "validate", "finetune", "demo")  # modules of dsd.cli, imported when needed


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="dsd", description="Depthwise-separable decoupling for trained CNNs.")
    parser.add_argument("--version", action="version", version=f"dsd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        module = importlib.import_module(f".{name}", __package__)
        command = sub.add_parser(name, help=module.DESCRIPTION, description=module.DESCRIPTION)
        module.add_arguments(command)
        command.set_defaults(run=module.run, prog=f"dsd {name}")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv in (["--version"], ["-V"]):  # answered before the commands (and torch) are imported
        print(f"dsd {__version__}")
        return 0
    args = build_parser().parse_args(argv)
    return run_command(args.prog, args.run, args)


def convert_main(argv: Optional[List[str]] = None) -> int:
    from . import convert
    parser = ArgumentParser(prog="dsd-convert", description=convert.DESCRIPTION)
    convert.add_arguments(parser)
    return run_command("dsd-convert", convert.run, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
