"""Measure how many local patients `edgebc calibrate` needs for what bound (issue 16).

    python tools/measure_site_calibration.py MODEL.onnx --data SITE_SPLIT.csv \
        [--splits train,val] [--sizes 10,20,40,80] [--draws 50] [--out FOLDER]

A model trained at one site is calibrated on growing random sets of another site's patients, as a
clinic would (n malignant patients and the site's share of benign ones), and each calibrated
operating point is scored on that site's remaining patients: the stated bound against the realised
per-patient sensitivity, the specificity, and ECE on the held-out patients before and after. Every
draw repeats the calibration with fresh patients, so the table shows how far one clinic's result
varies, and how often the realised sensitivity reached the stated bound (its coverage; the
bound's confidence is the share it should reach).

The model runs once over the pool through the cart's backend (edgebc.site_calibration.model_logits);
each draw then calls the same fit `edgebc calibrate` calls (edgebc.calibration.fit_calibration).
For the first draw of each size the subset's manifest is written, so that
`edgebc calibrate MODEL --data FOLDER/subset-<n>.csv --out RELEASE` reproduces its row through the
command itself. The site's test split is left out by default: it is read once, at the end.
Writes FOLDER/site-calibration.json (every draw) and FOLDER/site-calibration.md (the table).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from edgebc import metrics
from edgebc.backends import open_backend
from edgebc.calibration import fit_calibration
from edgebc.data import read_dataset, write_manifest
from edgebc.site_calibration import model_logits


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path, help="exported .onnx (trained elsewhere)")
    parser.add_argument(
        "--data", type=Path, required=True, help="the site's manifest with patient_id"
    )
    parser.add_argument("--splits", default="train,val", help="splits forming the pool (not test)")
    parser.add_argument(
        "--sizes", default="10,20,40,80", help="malignant patients per calibration set"
    )
    parser.add_argument("--draws", type=int, default=50, help="random calibration sets per size")
    parser.add_argument("--target", type=float, default=0.95)
    parser.add_argument("--confidence", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("site-calibration"))
    args = parser.parse_args(argv)

    backend = open_backend(args.model, warmup=0)
    card = backend.card
    splits = set(args.splits.split(","))
    samples = [s for s in read_dataset(args.data) if s.split in splits]
    keep, excluded = card.task.partition([s.label for s in samples], str(args.data))
    samples = [s for s, kept in zip(samples, keep, strict=True) if kept]
    y = card.task.encode(s.label for s in samples)
    print(
        f"running {card.name} over {len(samples)} images of splits {sorted(splits)}",
        file=sys.stderr,
    )
    logits = model_logits(backend, samples, model_path=args.model)
    backend.close()

    units = np.array([s.unit for s in samples])
    positive = card.positive
    patients = sorted(set(units))
    malignant = sorted({u for u, k in zip(units, y, strict=True) if k == positive})
    benign = sorted(set(patients) - set(malignant))
    ratio = len(benign) / len(malignant)
    shipped = held_out_scores(logits, y, units, np.ones(len(y), bool), positive, card.temperature,
                              card.threshold)  # fmt: skip
    rng = np.random.default_rng(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for size in (int(v) for v in args.sizes.split(",")):
        n_benign = round(size * ratio)
        if size >= len(malignant) or n_benign >= len(benign):
            raise SystemExit(
                f"--sizes {size}: the pool has only {len(malignant)} malignant patients"
            )
        for draw in range(args.draws):
            chosen = set(rng.choice(malignant, size, replace=False)) | set(
                rng.choice(benign, n_benign, replace=False)
            )
            calibrate = np.isin(units, list(chosen))
            fit = fit_calibration(logits[calibrate], y[calibrate], list(units[calibrate]), positive,
                                  args.target, args.confidence, card.temperature)  # fmt: skip
            point = fit.operating_point
            held = held_out_scores(logits, y, units, ~calibrate, positive, fit.temperature,
                                   point.threshold)  # fmt: skip
            site = held_out_scores(logits, y, units, np.ones(len(y), bool), positive,
                                   fit.temperature, point.threshold)  # fmt: skip
            held_before = metrics.expected_calibration_error(
                metrics.softmax(logits[~calibrate], card.temperature), y[~calibrate]
            )[0]
            rows.append({
                "malignant_patients": size, "benign_patients": n_benign, "draw": draw,
                "images": int(calibrate.sum()), "temperature": fit.temperature,
                "threshold": point.threshold, "bound": point.sensitivity_bound,
                "calibration_sensitivity": point.sensitivity, **held,
                "held_out_ece_before": held_before, "site_sensitivity": site["sensitivity"],
            })  # fmt: skip
            if draw == 0:
                subset = [s for s, inside in zip(samples, calibrate, strict=True) if inside]
                write_manifest(subset, args.out / f"subset-{size}.csv")
    report = {
        "model": str(args.model), "model_name": card.name, "data": str(args.data),
        "splits": sorted(splits), "images": len(samples), "patients": len(patients),
        "malignant_patients": len(malignant), "excluded_labels": excluded,
        "target": args.target, "confidence": args.confidence, "draws": args.draws,
        "seed": args.seed, "date": dt.date.today().isoformat(),
        "shipped": {"temperature": card.temperature, "threshold": card.threshold, **shipped},
        "rows": rows,
    }  # fmt: skip
    (args.out / "site-calibration.json").write_text(json.dumps(report, indent=2) + "\n")
    table = render(report)
    (args.out / "site-calibration.md").write_text(table)
    print(table)
    return 0


def held_out_scores(logits: np.ndarray, y: np.ndarray, units: np.ndarray, mask: np.ndarray,
                    positive: int, temperature: float, threshold: float | None) -> dict[str, Any]:  # fmt: skip
    """Per-patient sensitivity and specificity at `threshold` (a patient's mean probability, as
    the bound and `edgebc eval` count them) and ECE, on the patients in `mask`."""
    probs = metrics.softmax(logits[mask], temperature)
    _, unit_y, unit_p = metrics.unit_scores(list(units[mask]), y[mask], probs, positive)
    is_positive, scores = unit_y == positive, unit_p[:, positive]
    return {
        "held_out_patients": len(unit_y), "held_out_malignant": int(is_positive.sum()),
        "sensitivity": None if threshold is None else metrics.sensitivity_at(is_positive, scores, threshold),
        "specificity": None if threshold is None else metrics.specificity_at(is_positive, scores, threshold),
        "held_out_ece": metrics.expected_calibration_error(probs, y[mask])[0],
        "auc": metrics.roc_auc(is_positive, scores),
    }  # fmt: skip


def render(report: dict[str, Any]) -> str:
    def spread(values: list[float]) -> str:
        low, mid, high = np.percentile(values, [5, 50, 95])
        return f"{mid:.2f} ({low:.2f}–{high:.2f})"

    shipped = report["shipped"]
    lines = [
        f"Site calibration of {report['model_name']} on {report['data']} "
        f"(splits {', '.join(report['splits'])}: {report['patients']} patients, "
        f"{report['malignant_patients']} malignant), {report['draws']} random calibration sets "
        f"per size, target sensitivity {report['target']}, confidence {report['confidence']}, "
        f"seed {report['seed']}, {report['date']}.",
        "",
        f"As shipped (threshold {shipped['threshold']:.3f}, temperature {shipped['temperature']:.3f}) "
        f"on all {shipped['held_out_patients']} patients: sensitivity {shipped['sensitivity']:.2f}, "
        f"specificity {shipped['specificity']:.2f}, ECE {shipped['held_out_ece']:.3f}, "
        f"patient AUC {shipped['auc']:.3f}.",
        "",
        "Median (5th–95th percentile) over the draws; realised figures are per patient on the "
        "pool's patients outside the calibration set. Coverage: the share of draws whose realised "
        'sensitivity reached the bound; "site" takes every pool patient as the site\'s population '
        "(what the bound is about), the held-out column only the patients outside the set, whose "
        "sensitivity falls when the set happened to take the easy ones.",
        "",
        "| malignant / benign patients | bound | realised sensitivity | coverage | coverage, site "
        "| specificity | threshold | held-out ECE before → after |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for size in sorted({r["malignant_patients"] for r in report["rows"]}):
        rows = [r for r in report["rows"] if r["malignant_patients"] == size]
        coverage = np.mean([r["sensitivity"] >= r["bound"] for r in rows])
        on_site = np.mean([r["site_sensitivity"] >= r["bound"] for r in rows])
        lines.append(
            f"| {size} / {rows[0]['benign_patients']} | {spread([r['bound'] for r in rows])} "
            f"| {spread([r['sensitivity'] for r in rows])} | {coverage:.2f} | {on_site:.2f} "
            f"| {spread([r['specificity'] for r in rows])} | {spread([r['threshold'] for r in rows])} "
            f"| {np.median([r['held_out_ece_before'] for r in rows]):.3f} → "
            f"{np.median([r['held_out_ece'] for r in rows]):.3f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
