"""`edgebc calibrate`: refit a model's temperature and operating point on a site's own cases."""

from __future__ import annotations

import argparse
from pathlib import Path

from edgebc.commands import HelpFormatter


def register_calibrate(commands: argparse._SubParsersAction) -> None:
    calibrate = commands.add_parser(
        "calibrate",
        help="refit temperature and operating point on this site's labelled cases; write a release",
        description="Run an exported model over a small labelled set from this site's own scanner "
        "(a manifest .csv with patient_id, or class folders), refit its temperature and the "
        "threshold for the target sensitivity over the site's patients — the way training chose "
        "them — with a one-sided Clopper-Pearson lower bound on the sensitivity and the number of "
        "malignant patients it rests on, and write a new release folder: the model file unchanged, "
        "card.json (the site's card) and MANIFEST.sha256 over both. `edgebc serve --model "
        "OUT/model.onnx`, `classify`, `eval` and `model install` then decide by the site's card. "
        "Torch-free.",
        formatter_class=HelpFormatter,
    )
    calibrate.add_argument("model", type=Path, help="exported .onnx with MANIFEST.sha256 beside it")
    calibrate.add_argument("--data", type=Path, required=True,
                           help="the site's labelled cases: manifest .csv or class folders")  # fmt: skip
    calibrate.add_argument("--split", default=None,
                           help="use only this split of the manifest (default: every sample)")  # fmt: skip
    calibrate.add_argument("--out", type=Path, required=True,
                           help="new release folder (must not exist)")  # fmt: skip
    calibrate.add_argument("--target-sensitivity", type=float, default=None,
                           help="sensitivity the threshold is chosen for (default: the card's, else 0.95)")  # fmt: skip
    calibrate.add_argument("--confidence", type=float, default=None,
                           help="confidence of the sensitivity bound (default: the card's, else 0.95)")  # fmt: skip
    calibrate.add_argument("--min-positives", type=int, default=None,
                           help="refuse a set with fewer positive patients (default 10)")  # fmt: skip
    calibrate.add_argument("--name", default=None,
                           help="name of the calibrated model (default: the model's name + '-site')")  # fmt: skip
    calibrate.set_defaults(handler=run_calibrate)


def run_calibrate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from edgebc.calibration import bound_statement
    from edgebc.site_calibration import MIN_POSITIVES, calibrate_site

    minimum = MIN_POSITIVES if args.min_positives is None else args.min_positives
    with tqdm(desc="calibrate", unit="frame", disable=None) as bar:
        result = calibrate_site(args.model, args.data, args.out, args.split,
                                args.target_sensitivity, args.confidence, minimum, args.name,
                                bar.update)  # fmt: skip
    card, before, fit = result.card, result.source, result.fit
    point = fit.operating_point
    entry = card.lineage["site_calibration"]
    print(f"{entry['cases']} cases ({result.frames} images): {point.positives} "
          f"{card.positive_class}, {point.negatives} other (unit: {point.unit})")  # fmt: skip
    print(f"temperature {before.temperature:.3f} -> {fit.temperature:.3f}; "
          f"ECE {fit.ece_before:.3f} -> {fit.ece_after:.3f}")  # fmt: skip
    if result.shipped:
        print(f"the model's own threshold {before.threshold:.3f} here: sensitivity "
              f"{result.shipped['sensitivity']:.3f}, specificity {result.shipped['specificity']:.3f}")  # fmt: skip
    print(f"site threshold {point.threshold:.3f} for target {point.target_sensitivity:.2f}: "
          f"sensitivity {point.sensitivity:.3f}, specificity {point.specificity:.3f}")  # fmt: skip
    print(bound_statement(card))
    print(f"wrote {result.release} (model.onnx, card.json, MANIFEST.sha256)")
    return 0
