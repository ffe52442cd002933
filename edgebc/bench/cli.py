"""Arguments and entry point of `edgebc bench`, which `python benchmarks/latency.py` extends."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from edgebc.atomic import atomic_write_text
from edgebc.bench.backends import BenchModel, given_model
from edgebc.errors import EdgebcError


def add_arguments(
    parser: argparse.ArgumentParser, without_model: str = "the embedded demo model"
) -> None:
    """The options of `edgebc bench`; `without_model` says what runs when --model is not given."""
    parser.add_argument("--quick", action="store_true",
                        help="one model, batch 1, one thread, few iterations: a CI smoke run (under a minute)")  # fmt: skip
    parser.add_argument(
        "--model",
        type=Path,
        default=None,
        help=f"exported .onnx to time (without it: {without_model})",
    )
    parser.add_argument("--int8", type=Path, default=None, help="its INT8 .onnx, with --model")
    parser.add_argument(
        "--batch", type=int, action="append", default=None, help="batch sizes (default 1 and 16)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        action="append",
        default=None,
        help="ONNX Runtime threads, and torch's in benchmarks/latency.py (default 1..cores)",
    )
    parser.add_argument(
        "--fps", type=float, default=30.0, help="input frame rate for the real-time headroom run"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="write OUT.json, OUT.csv, OUT.md and OUT.png"
    )
    parser.add_argument(
        "--compare", type=Path, default=None, help="previous JSON: print ratios, flag regressions"
    )
    parser.add_argument("--tolerance", type=float, default=0.15, help="slow-down beyond this fraction is a regression")  # fmt: skip
    parser.add_argument("--check-data", type=Path, default=None,
                        help="manifest .csv or dataset folder whose frames every backend's outputs are "
                             "checked on against ONNX Runtime FP32 before it is timed (default: phantoms)")  # fmt: skip
    parser.add_argument("--check-split", default=None, help="only this split of --check-data")
    parser.add_argument("--check-limit", type=int, default=64,
                        help="at most this many --check-data frames, drawn at random (seed 0)")  # fmt: skip


def batches_and_threads(args: argparse.Namespace) -> tuple[list[int], list[int]]:
    """The batch sizes and thread counts to time: as given, else 1 (--quick) or 1 and 16 and
    every thread count up to the cores."""
    cores = os.cpu_count() or 1
    batches = args.batch or ([1] if args.quick else [1, 16])
    threads = args.threads or ([1] if args.quick else list(range(1, cores + 1)))
    return batches, threads


def given_models(args: argparse.Namespace) -> list[BenchModel]:
    """--model (and --int8), or the embedded demo model: `edgebc bench` times exported files only."""
    if args.model is not None:
        return [given_model(args.model, args.int8)]
    if args.int8 is not None:
        raise EdgebcError("--int8 goes with --model: the INT8 export of that model")
    from edgebc.demo import DEMO_MODEL

    print(
        "no --model: timing the embedded demo model (PyTorch rows and models made from the "
        "registry: python benchmarks/latency.py, with the [train] and [export] extras)",
        file=sys.stderr,
    )
    return [given_model(DEMO_MODEL)]


def main_from_args(args: argparse.Namespace, models: Sequence[BenchModel] | None = None) -> int:
    """Time `models` (default: those the arguments name), print the table, write and compare."""
    from edgebc.bench.report import compare, to_csv, to_markdown, to_png, write_report
    from edgebc.bench.run import run

    batches, threads = batches_and_threads(args)
    if models is None:
        models = given_models(args)
    check_set = None
    if args.check_data is not None:
        from edgebc.bench.accuracy import dataset_set

        check_set = dataset_set(args.check_data, args.check_split, args.check_limit)
    report = run(args.quick, batches, threads, models, args.fps, check_set)
    markdown = to_markdown(report)
    print(markdown)
    if args.out:
        write_report(args.out, report, markdown)
        atomic_write_text(args.out.with_suffix(".csv"), to_csv(report))
        to_png(report, args.out.with_suffix(".png"))
        print(f"\nwrote {args.out.with_suffix('.json')}, .csv, .md, .png")
    if args.compare:
        lines, regressed = compare(
            report, json.loads(args.compare.read_text(encoding="utf-8")), args.tolerance
        )
        print("\ncompared with", args.compare)
        print("\n".join(lines) if lines else "nothing in common to compare")
        return 1 if regressed else 0
    return 0
