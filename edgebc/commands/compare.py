"""`edgebc compare`: several models side by side in the papers' table, with paired tests."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from edgebc.commands import HelpFormatter
from edgebc.errors import EdgebcError


def register_compare(commands: argparse._SubParsersAction) -> None:
    compare = commands.add_parser(
        "compare",
        help="compare models on the same cases: the papers' table, DeLong and McNemar, size and latency",
        description="Score several training runs (a run folder or its best.pt), cross-validation "
        "runs (a folder with cv_summary.json: each fold's model on its own fold, mean ± sd and the "
        "pooled out-of-fold confusion matrix) or exported .onnx models (with --data) on the same "
        "cases, and write comparison.md, comparison.json, roc.png and each model's eval report into "
        "--out. Accuracy, sensitivity, specificity, precision, F1, AUC with 95%% CI and Cohen's "
        "kappa at each card's operating point; per-class AUC; paired DeLong (AUC) and McNemar "
        "(decisions) tests, clustered by patient where patients repeat; parameters, ONNX size and "
        "latency on this machine (batch 1, one thread, ONNX Runtime). Models scored on different "
        "cases are refused. Checkpoints need torch (the [train] extra); .onnx models do not.",
        formatter_class=HelpFormatter,
    )
    compare.add_argument("models", nargs="+", metavar="[NAME=]PATH",
                         help="run folder, best.pt, cross-validation folder or .onnx; NAME= names its row")  # fmt: skip
    compare.add_argument("--data", type=Path, default=None,
                         help="manifest to score on (default: each run's own manifest; needed for .onnx)")  # fmt: skip
    compare.add_argument("--split", default="test", help="split to score on; 'all' for every case")
    compare.add_argument("--out", type=Path, required=True, help="folder for the comparison")
    compare.add_argument("--reported", type=Path, default=None,
                         help="YAML of papers' own numbers by row name (source, data, accuracy, ..., auc): "
                         "shown as 'as reported, on other data', never mixed with measured ones")  # fmt: skip
    for flag, what in (("--reduced", "mark a row as trained on a reduced budget, e.g. 'resnet50=5 of 100 epochs'"),
                       ("--budget", "state a row's training budget where its files do not, e.g. for an .onnx"),
                       ("--hardware", "the hardware a row was trained on, e.g. 'mnv3=2-core CPU'")):  # fmt: skip
        compare.add_argument(flag, action="append", default=[], metavar="NAME=TEXT", help=what)
    compare.add_argument(
        "--bootstrap", type=int, default=1000, help="bootstrap resamples for the CIs"
    )
    compare.add_argument("--latency-rounds", type=int, default=50,
                         help="timed calls per model, interleaved across models (0: no timing)")  # fmt: skip
    compare.add_argument("--device", default="cpu", help="torch device for scoring checkpoints")
    compare.set_defaults(handler=run_compare)


def _pairs(values: list[str], flag: str, names: list[str]) -> dict[str, str]:
    out = {}
    for value in values:
        name, sep, text = value.partition("=")
        if not sep or name not in names:
            raise EdgebcError(f"{flag} {value!r}: expected NAME=TEXT with NAME one of {names}")
        out[name] = text
    return out


def model_entries(args: argparse.Namespace) -> list[Any]:
    """The rows the user asked for, named by NAME= or by their run folder (or file stem)."""
    from edgebc.train.compare import ModelEntry

    named = []
    for given in args.models:
        name, sep, path_text = given.partition("=")
        path = Path(path_text) if sep else Path(given)
        if not sep:
            name = (
                path.parent.name
                if path.suffix.lower() == ".pt"
                else (path.stem if path.is_file() else path.name)
            )
        named.append((name, path))
    names = [n for n, _ in named]
    reduced = _pairs(args.reduced, "--reduced", names)
    budget = _pairs(args.budget, "--budget", names)
    hardware = _pairs(args.hardware, "--hardware", names)
    return [ModelEntry(n, p, reduced.get(n), budget.get(n), hardware.get(n)) for n, p in named]


def run_compare(args: argparse.Namespace) -> int:
    from edgebc.train.compare import compare_models

    report = compare_models(model_entries(args), args.out, args.data, None if args.split == "all" else args.split,
                            args.reported, args.bootstrap, args.latency_rounds, args.device)  # fmt: skip
    for row in report["rows"]:
        latency = row["latency"].get("p50_ms")
        print(f"  {row['name']:24s} AUC {row['auc']:.3f}  accuracy {row['accuracy']:.3f}  "
              f"sensitivity {row['sensitivity']:.3f}  specificity {row['specificity']:.3f}  "
              + (f"{latency:.1f} ms" if latency is not None else "not timed"))  # fmt: skip
    for pair in report["paired"]:
        print(
            f"  {pair['first']} vs {pair['second']}: AUC p={pair['auc']['p_value']:.3g}, "
            f"decisions p={pair['decisions']['p_value']:.3g}"
        )
    print(f"wrote {args.out / 'comparison.md'}")
    return 0
