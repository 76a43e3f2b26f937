"""The ``dsd`` umbrella command (``convert``, ``report``, ...) and the ``dsd-convert`` console script."""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from .. import __version__
from . import convert, demo, finetune, report
from .common import ArgumentParser, run_command

COMMANDS = {"convert": convert, "report": report, "finetune": finetune, "demo": demo}


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="dsd", description="Depthwise-separable decoupling for trained CNNs.")
    parser.add_argument("--version", action="version", version=f"dsd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module in COMMANDS.items():
        command = sub.add_parser(name, help=module.DESCRIPTION, description=module.DESCRIPTION)
        module.add_arguments(command)
        command.set_defaults(run=module.run, prog=f"dsd {name}")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(args.prog, args.run, args)


def convert_main(argv: Optional[List[str]] = None) -> int:
    parser = ArgumentParser(prog="dsd-convert", description=convert.DESCRIPTION)
    convert.add_arguments(parser)
    return run_command("dsd-convert", convert.run, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
