"""``dsd validate SOURCE --data-dir DIR [--against CONVERTED]``: accuracy of both models on your own data."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..fileio import OutputSet
from ..io import SUPPORTED_FORMATS, check_outputs
from ..validation import validate, validation_loader
from .common import (add_against, add_common_flags, add_input_size, add_model_args, console, input_size,
                     load_against, load_source, positive_int)

DESCRIPTION = ("Top-1/top-5 of the original and the converted model on an ImageFolder (or the built-in digits), "
               "side by side, with how often they agree.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_args(parser, f"the original model: {SUPPORTED_FORMATS}")
    add_against(parser)
    data = parser.add_argument_group("data (as timm's validate.py)")
    data.add_argument("--data-dir", required=True, metavar="DIR",
                      help="an ImageFolder (DIR/val is used when it exists; one sub-folder per class), or 'digits'")
    add_input_size(data)
    data.add_argument("--batch-size", type=positive_int, default=64, help="images per batch")
    data.add_argument("--workers", type=int, default=0, help="data-loading worker processes")
    parser.add_argument("--json", metavar="FILE", help="write the accuracies as JSON")
    add_common_flags(parser)


def run(args: argparse.Namespace) -> int:
    outputs_asked = [Path(args.json)] if args.json else []
    check_outputs(outputs_asked, [args.source, args.against or "", args.data_dir], args.force)
    original, _ = load_source(args)
    size = input_size(args, original)
    loader = validation_loader(args.data_dir, size, args.batch_size, args.workers, original)
    converted = load_against(args, original, size)
    result = validate({"original": original, "converted": converted}, loader, args.data_dir, progress=not args.quiet)
    out = console(args)
    with OutputSet(outputs_asked, args.force) as outputs:
        if args.json:
            outputs.path(args.json).write_text(result.to_json())
        console(args, results=True).print(result.summary())
        written = outputs.commit()
    for path in written:
        out.print(f"wrote {path}")
    return 0
