"""Print a savings report and write the files asked for: shared by ``convert`` and ``report``."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Dict, List, Optional

from rich.console import Console

from ..fileio import OutputSet
from ..savings import SavingsReport
from .common import console as results_console


def report_files(args: argparse.Namespace) -> List[Path]:
    return [Path(p) for p in (args.json, args.md, args.plot) if p]


def wants_latency(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "report", True) or args.json or args.md or args.plot)


def emit(savings: SavingsReport, args: argparse.Namespace, console: Console, outputs: OutputSet,
         show_table: bool, extra: Optional[Dict[str, Any]] = None) -> None:
    """Stage the report files asked for in ``outputs`` (committed by the caller) and print the report.
    ``extra``: more top-level entries for the JSON file (the conversion record of every conv)."""
    if args.json:
        outputs.path(args.json).write_text(json.dumps({**savings.to_dict(), **(extra or {})}, indent=2) + "\n")
    if args.md:
        outputs.path(args.md).write_text(savings.to_markdown())
    if args.plot:
        savings.plot(outputs.path(args.plot))
    if show_table:
        results_console(args, results=True).print(savings.to_rich())
    else:
        console.print(savings.summary())
