"""Accuracy per backend alongside benchmarks/latency.py: the same labelled frames through every
available backend, with AUC (95% CI), decisions at the operating threshold and agreement.

    python benchmarks/accuracy.py [--model m.onnx --int8 m-int8.onnx --checkpoint m.pt]
                                  [--data manifest.csv --split test] [--make-int8] [--out results/acc]

Without arguments: the embedded demo model on synthetic phantoms (torch-free, like any run
without --checkpoint and --make-int8). The scoring lives in edgebc/bench/accuracy.py; this adds
PyTorch on the checkpoint as the reference (the [train] extra) and quantizing here (the [export]
extra).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from latency import with_torch_rows  # the sibling script (benchmarks/ is on sys.path when run)

from edgebc.bench.accuracy import LabelledSet, dataset_set, evaluate, phantom_set, to_markdown
from edgebc.bench.backends import given_model
from edgebc.bench.report import write_report
from edgebc.demo import DEMO_MODEL
from edgebc.errors import EdgebcError


def make_int8(fp32: Path, calibration: LabelledSet, out: Path) -> Path:
    """Quantize `fp32` with frames that are not in the evaluated set (needs the [export] extra)."""
    from edgebc.export.quantize import QuantPlan, quantize_int8

    quantize_int8(
        fp32,
        out,
        calibration.frames,
        calibration.frames,
        calibration.labels,
        # Every node quantized: the table shows what INT8 itself does to the decisions. (The export's
        # budget loop would keep nodes in float until the decisions agree, which on the tiny demo
        # model means all of them, and an "INT8" row that is FP32 in disguise.)
        QuantPlan(calibration_size=len(calibration.frames), max_excluded_nodes=0),
    )
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Accuracy per backend: the same labelled frames through every available "
        "backend, with AUC, decisions at the operating threshold and agreement",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model", type=Path, default=DEMO_MODEL, help="exported FP32 .onnx")
    parser.add_argument("--int8", type=Path, default=None, help="its INT8 .onnx")
    parser.add_argument("--checkpoint", type=Path, default=None, help="its checkpoint (torch rows)")
    parser.add_argument(
        "--make-int8",
        action="store_true",
        help="quantize --model here (calibrated on frames outside the evaluated set: other "
        "phantom seeds, or --calibration-split of --data)",
    )
    parser.add_argument(
        "--data",
        type=Path,
        default=None,
        help="labelled manifest .csv or dataset folder (default: synthetic phantoms)",
    )
    parser.add_argument("--split", default=None, help="evaluate only this split of --data")
    parser.add_argument("--calibration-split", default="val", help="--make-int8 frames from --data")
    parser.add_argument("--limit", type=int, default=None, help="at most this many frames")
    parser.add_argument("--per-class", type=int, default=40, help="phantoms per class")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for CIs")
    parser.add_argument("--out", type=Path, default=None, help="write OUT.json and OUT.md")
    args = parser.parse_args(argv)
    try:
        if args.data is None:
            labelled = phantom_set(args.per_class)
        else:
            labelled = dataset_set(args.data, args.split, args.limit)
        with tempfile.TemporaryDirectory(prefix="edgebc-accuracy-") as folder:
            work = Path(folder)
            int8 = args.int8
            if args.make_int8:
                calibration = (
                    phantom_set(16, seed=78)
                    if args.data is None
                    else dataset_set(args.data, args.calibration_split, 200)
                )
                int8 = make_int8(args.model, calibration, work / "int8.onnx")
            model = with_torch_rows(given_model(args.model, int8), args.checkpoint, [1])
            report = evaluate(model, labelled, work, args.bootstrap)
    except EdgebcError as exc:
        print(f"error: {exc}")
        return 2
    markdown = to_markdown(report)
    print(markdown)
    if args.out:
        print(f"\nwrote {write_report(args.out, report, markdown)} and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
