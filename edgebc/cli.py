"""The `edgebc` command: one tool with subcommands for every part of the product.

Errors the user can act on print one line and exit 1 (2 for usage errors); `--verbose` shows
the traceback. Each command group lives in `edgebc.commands`; this module wires them together.
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from collections.abc import Sequence

from edgebc import __version__
from edgebc.commands import (
    HelpFormatter,
    Parser,
    audit,
    bench,
    calibrate,
    classify,
    compare,
    data,
    export,
    info,
    model,
    region,
    serve,
    synth,
    train,
)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="edgebc",
        description="Breast-lesion classification for point-of-care ultrasound (research use only, "
        "not a medical device).",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"edgebc {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="debug logging, and full tracebacks on errors"
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    info.register_info(commands)
    synth.register_synth(commands)
    data.register_data(commands)
    train.register_train(commands)
    train.register_eval(commands)
    train.register_cross_site(commands)
    compare.register_compare(commands)
    export.register_export(commands)
    calibrate.register_calibrate(commands)
    classify.register_classify(commands)
    serve.register_serve(commands)
    bench.register_bench(commands)
    model.register_model(commands)
    region.register_region(commands)
    audit.register_audit(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        print("edgebc: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.verbose:
            traceback.print_exc()
        message = str(exc) or type(exc).__name__
        print(f"edgebc: error: {message}", file=sys.stderr)
        if not args.verbose:
            print("edgebc: run with --verbose for the full traceback", file=sys.stderr)
        return 1
