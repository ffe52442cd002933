"""Arguments and entry point shared by `python benchmarks/latency.py` and `edgebc bench`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from edgebc.atomic import atomic_write_text

DEFAULT_ARCHS = ["mobilenet_v3_small", "shufflenet_v2_x1_0", "mobilenet_v3_large"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help="one model, batch 1, one thread, few iterations: a CI smoke run (under a minute)")  # fmt: skip
    parser.add_argument(
        "--arch", action="append", default=None, help="registry architecture (repeatable)"
    )
    parser.add_argument(
        "--model", type=Path, default=None, help="benchmark this exported .onnx instead"
    )
    parser.add_argument("--int8", type=Path, default=None, help="its INT8 .onnx, with --model")
    parser.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="its checkpoint for the torch rows, with --model",
    )
    parser.add_argument(
        "--no-int8", action="store_true", help="skip INT8 quantization of made models"
    )
    parser.add_argument(
        "--batch", type=int, action="append", default=None, help="batch sizes (default 1 and 16)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        action="append",
        default=None,
        help="ONNX Runtime / torch threads (default 1..cores)",
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


def main_from_args(args: argparse.Namespace) -> int:
    import os

    from edgebc.bench.report import compare, to_csv, to_markdown, to_png
    from edgebc.bench.run import run

    cores = os.cpu_count() or 1
    quick = args.quick
    archs = args.arch or (DEFAULT_ARCHS[:1] if quick else DEFAULT_ARCHS)
    batches = args.batch or ([1] if quick else [1, 16])
    threads = args.threads or ([1] if quick else list(range(1, cores + 1)))
    report = run(quick, archs, batches, threads, args.fps, args.model, args.int8, args.checkpoint,
                 int8=not args.no_int8 and not quick)  # fmt: skip
    markdown = to_markdown(report)
    print(markdown)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out.with_suffix(".json"), json.dumps(report, indent=2) + "\n")
        atomic_write_text(args.out.with_suffix(".csv"), to_csv(report))
        atomic_write_text(args.out.with_suffix(".md"), markdown + "\n")
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="edgebc latency benchmark: stages, backends, full pipeline, headroom",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    add_arguments(parser)
    return main_from_args(parser.parse_args(argv))
