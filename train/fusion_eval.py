"""A fusion model's answer with ultrasound only, mammograms only and both, side by side on the same cases.

For a fusion checkpoint (train/models/fusion.py) and a split of its case manifest, every case
that has both modalities is scored three ways by the one model: its ultrasound alone (the
mammogram inputs marked absent), its mammograms alone, and both. Per combination: the AUC of
the positive class over cases (a case's instances' mean probability) with a bootstrap CI over
patients, the majority vote of its instances' decisions (the card's decision rule; a tie goes to
the positive class, the side a missed cancer is on) with its voted confusion matrix; then the
paired AUC differences (both minus ultrasound only, both minus mammograms only) with CIs from
the same resampled patients; and each modality's share of the decision by ablation: how far the
positive probability moves when that modality is taken away, as a share of both moves.

Each combination's sensitivity and specificity over cases at the card's one threshold
(train/finalize.py chose it so that every combination the card allows reaches the target on the
calibration cases), with a warning where a combination misses the target here. And Grad-CAM per
branch (train/gradcam.py): for a few cases of each outcome of the fused decision at the card's
threshold (TP, FP, FN, TN), each ultrasound image's map from the ultrasound branch and each
mammogram view's map from the mammogram branch, both for the logit of the class the fused decision
chose, drawn back onto the image at its own resolution (the breast as the model's crop shows it).

    python -m edgebc.train.fusion_eval runs/fusion-phantoms/best.pt --split test [--manifest M]
        [--us-baseline runs/paired-us/best.pt] [--out report.json] [--gradcam 2 --maps DIR]

With --us-baseline, a separately trained ultrasound-only model is scored on the same cases too,
and the fusion model's answer with no mammogram (and with both) is compared with it, paired, with
CIs: a fusion model should lose nothing when the mammogram is absent.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from edgebc import metrics
from edgebc.atomic import atomic_write_bytes, atomic_write_text
from edgebc.data import read_dataset
from edgebc.data.records import Sample
from edgebc.decision import DecisionRule
from edgebc.errors import EdgebcError
from edgebc.model_card import ModelCard
from edgebc.optional import require
from edgebc.train.checkpoint import load_checkpoint, model_from_checkpoint
from edgebc.train.fusion_data import (
    cache_fusion,
    instance_sources,
    mean_per_case,
    modalities_present,
)
from edgebc.train.models.fusion import unpack

torch = require("torch", "training")
log = logging.getLogger(__name__)

COMBINATIONS = ("us_only", "mg_only", "both")
OUTCOMES = ("TP", "FP", "FN", "TN")


def possible_combinations(card: ModelCard) -> tuple[str, ...]:
    """The combinations of inputs the card lets the device answer with: ultrasound alone where
    every mammogram input is optional, mammograms alone where the ultrasound is, and both."""
    us = [i for i in card.inputs if i.modality == "us"]
    mg = [i for i in card.inputs if i.modality == "mg"]
    allowed = []
    if us and all(i.optional for i in mg):
        allowed.append("us_only")
    if mg and all(i.optional for i in us):
        allowed.append("mg_only")
    return (*allowed, "both")


def combination_rows(has_us: np.ndarray, has_mg: np.ndarray, combination: str) -> np.ndarray:
    """The packed rows that can be scored as `combination` (they hold what it needs)."""
    return {"us_only": has_us, "mg_only": has_mg, "both": has_us & has_mg}[combination]


def figures_at(probs: np.ndarray, y: np.ndarray, units: Sequence[str], positive: int,
               threshold: float) -> dict[str, Any]:  # fmt: skip
    """Sensitivity and specificity over cases at `threshold` (a case's score is its instances'
    mean positive probability, as the operating point was chosen), with the cases behind them."""
    _, unit_y, unit_p = metrics.unit_scores(units, y, probs, positive)
    is_positive = unit_y == positive
    return {
        "sensitivity": metrics.sensitivity_at(is_positive, unit_p[:, positive], threshold),
        "specificity": metrics.specificity_at(is_positive, unit_p[:, positive], threshold),
        "positives": int(is_positive.sum()),
        "negatives": int((~is_positive).sum()),
    }


def combination_logits(
    model: Any, packed: Any, combination: str, batch_size: int = 64, device: Any = None
) -> np.ndarray:
    """The model's logits for packed instances with the other modality marked absent (NaN)."""
    if combination not in COMBINATIONS:
        raise ValueError(f"combination must be one of {', '.join(COMBINATIONS)}, got {combination}")
    parts = unpack(packed, model.layout)
    us, mg = parts["us"].clone(), parts["mg"].clone()
    if combination == "mg_only":
        us.fill_(float("nan"))
    elif combination == "us_only":
        mg.fill_(float("nan"))
    rows = torch.cat([us.flatten(1), mg.flatten(1)], dim=1)
    from edgebc.train.loop import predict_logits

    return predict_logits(model, rows, device or torch.device("cpu"), batch_size)


def evaluate_combinations(
    checkpoint_path: str | Path, manifest: str | Path | None = None, split: str = "test",
    resamples: int = 1000, seed: int = 0, us_baseline: str | Path | None = None,
    gradcam_dir: str | Path | None = None, gradcam_per_outcome: int = 2,
) -> dict[str, Any]:  # fmt: skip
    """Every combination's scores on the split's cases that have both modalities (see the
    module docstring); `manifest` defaults to the one the run trained on. `us_baseline`, a
    separately trained ultrasound-only checkpoint, is scored on the same cases (a case's
    ultrasound images' mean probability): what the fusion model with no mammogram must match.
    With `gradcam_dir`, each branch's Grad-CAM maps of up to `gradcam_per_outcome` cases per
    outcome are written there (`write_branch_gradcams`)."""
    checkpoint = load_checkpoint(checkpoint_path)
    card = checkpoint.card
    if card.arch != "late_fusion":
        raise EdgebcError(f"{checkpoint_path}: not a fusion model (arch {card.arch})")
    config = checkpoint.training.get("config") or {}
    manifest = manifest or config.get("data", {}).get("manifest")
    if not manifest:
        raise EdgebcError(f"{checkpoint_path}: give the manifest (its config names none)")
    task = card.task
    samples = [s for s in read_dataset(manifest)
               if split in ("all", s.split) and task.takes(s.label)]  # fmt: skip
    us_input = next(i for i in card.inputs if i.modality == "us")
    mg_inputs = [i for i in card.inputs if i.modality == "mg"]
    views = [str(i.view) for i in mg_inputs]
    packed, targets, rows = cache_fusion(samples, us_input.preprocess, mg_inputs[0].preprocess,
                                         task, views, desc=f"cache {split}")  # fmt: skip
    model = model_from_checkpoint(checkpoint)
    has_us, has_mg = modalities_present(packed, model.layout)
    units = [s.unit for s in rows]
    incomplete = {u for u, a, b in zip(units, has_us, has_mg, strict=True) if not (a and b)}
    keep = np.array([u not in incomplete for u in units])
    if not keep.any():
        raise EdgebcError(f"no case of split {split!r} in {manifest} has both modalities")
    packed, y = packed[torch.from_numpy(keep)], targets.numpy()[keep]
    units = [u for u, k in zip(units, keep, strict=True) if k]
    rule = DecisionRule.of(card)
    probabilities = {
        c: metrics.softmax(combination_logits(model, packed, c), card.temperature)
        for c in COMBINATIONS
    }
    case_y, _ = mean_per_case(y[:, None].astype(float), units)
    case_positive = case_y[:, 0] == task.positive
    case_units = list(dict.fromkeys(units))
    report: dict[str, Any] = {
        "checkpoint": str(checkpoint_path), "manifest": str(manifest), "split": split,
        "cases": len(case_units), "instances": len(y),
        "positive_cases": int(case_positive.sum()), "positive_class": task.positive_class,
        "fusion": card.arch_options.get("fusion"), "combinations": {},
    }  # fmt: skip
    scores = {}
    for combination, probs in probabilities.items():
        per_case, _ = mean_per_case(probs, units)
        scores[combination] = per_case[:, task.positive]
        voted = _majority_votes(rule.indices(probs), units, task.positive, len(task.classes))
        report["combinations"][combination] = {
            "auc": metrics.roc_auc(case_positive, scores[combination]),
            "auc_ci": metrics.cluster_bootstrap_ci(
                metrics.roc_auc,
                case_units,
                case_positive,
                scores[combination],
                n_boot=resamples,
                seed=seed,
            ),
            "voted_confusion_matrix": metrics.confusion_matrix(
                case_y[:, 0].astype(int), voted, len(task.classes)
            ).tolist(),
            "voted_accuracy": float(np.mean(voted == case_y[:, 0].astype(int))),
        }

    def difference(yy: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
        return metrics.roc_auc(yy, a) - metrics.roc_auc(yy, b)

    for single in ("us_only", "mg_only"):
        report[f"both_minus_{single}"] = {
            "auc_difference": difference(case_positive, scores["both"], scores[single]),
            "ci": metrics.cluster_bootstrap_ci(
                difference,
                case_units,
                case_positive,
                scores["both"],
                scores[single],
                n_boot=resamples,
                seed=seed,
            ),
        }
    if us_baseline is not None:
        baseline = _ultrasound_model_scores(us_baseline, samples, case_units, task)
        report["us_model"] = {
            "checkpoint": str(us_baseline),
            "auc": metrics.roc_auc(case_positive, baseline),
            "auc_ci": metrics.cluster_bootstrap_ci(metrics.roc_auc, case_units, case_positive,
                                                   baseline, n_boot=resamples, seed=seed),
        }  # fmt: skip
        for name, fused in (("us_only", scores["us_only"]), ("both", scores["both"])):
            report[f"{name}_minus_us_model"] = {
                "auc_difference": difference(case_positive, fused, baseline),
                "ci": metrics.cluster_bootstrap_ci(difference, case_units, case_positive, fused,
                                                   baseline, n_boot=resamples, seed=seed),
            }  # fmt: skip
    if card.threshold is not None:
        report["operating_point"] = operating_point_by_combination(
            card, {c: probabilities[c] for c in possible_combinations(card)}, y, units
        )
    if gradcam_dir is not None and gradcam_per_outcome > 0:
        sources = [s for s, k in zip(instance_sources(samples, views), keep, strict=True) if k]
        report["gradcam"] = write_branch_gradcams(
            Path(gradcam_dir), model, card, packed, sources, units, probabilities["both"], y,
            gradcam_per_outcome, seed,
        )  # fmt: skip
    without_us = np.abs(scores["both"] - scores["mg_only"]).mean()
    without_mg = np.abs(scores["both"] - scores["us_only"]).mean()
    total = without_us + without_mg
    report["share_by_ablation"] = {
        "us": float(without_us / total) if total > 0 else float("nan"),
        "mg": float(without_mg / total) if total > 0 else float("nan"),
        "mean_change_without_us": float(without_us),
        "mean_change_without_mg": float(without_mg),
    }
    return report


def operating_point_by_combination(card: ModelCard, probabilities: dict[str, np.ndarray],
                                   y: np.ndarray, units: Sequence[str]) -> dict[str, Any]:  # fmt: skip
    """Each combination's sensitivity and specificity over cases at the card's one threshold,
    against the card's target; a warning (logged, and in the report) for each that misses it."""
    point = card.operating_point
    threshold = float(card.threshold)  # type: ignore[arg-type]
    target = point.target_sensitivity if point is not None else None
    by_inputs, warnings = {}, []
    for combination, probs in probabilities.items():
        figures = figures_at(probs, y, units, card.positive, threshold)
        if target is not None and figures["positives"]:
            figures["meets_target"] = bool(figures["sensitivity"] >= target)
            if not figures["meets_target"]:
                warnings.append(
                    f"{combination}: sensitivity {figures['sensitivity']:.3f} at the card's "
                    f"threshold {threshold:.3f} is below the target {target:.2f} "
                    f"({figures['positives']} {card.positive_class} cases)"
                )
        by_inputs[combination] = figures
    for warning in warnings:
        log.warning("%s", warning)
    return {"threshold": threshold, "target_sensitivity": target, "by_inputs": by_inputs,
            "warnings": warnings}  # fmt: skip


def write_branch_gradcams(
    folder: Path, model: Any, card: ModelCard, packed: Any,
    sources: Sequence[tuple[str, Sample | None, dict[str, Sample]]], units: Sequence[str],
    probs: np.ndarray, y: np.ndarray, per_outcome: int, seed: int,
) -> list[dict[str, str]]:  # fmt: skip
    """Grad-CAM per branch for up to `per_outcome` cases of each outcome (TP, FP, FN, TN) of the
    fused decision (the card's rule on the case's mean probability with both modalities): every
    ultrasound image's map from the ultrasound branch, on its instance, and every mammogram view's
    map from the mammogram branch, on the case's first instance (the view set is the same in all),
    each for the logit of the class that decision chose, drawn over the image as the model's
    preprocessing prepared it, at its own resolution. Named OUTCOME_CASE_us_K.png (K: the case's
    K-th ultrasound image) and OUTCOME_CASE_mg_VIEW.png; returns what each file shows."""
    from edgebc.data.sample_image import read_sample
    from edgebc.preprocess import prepared_frame
    from edgebc.train.gradcam import branch_cams, overlay_on_frame

    rule = DecisionRule.of(card)
    per_case, case_units = mean_per_case(probs, units)
    case_y, _ = mean_per_case(y[:, None].astype(float), units)  # a case's instances share its label
    y_case = case_y[:, 0] == card.positive
    decided = rule.indices(per_case)
    said_positive = decided == card.positive
    outcome_of = {"TP": said_positive & y_case, "FP": said_positive & ~y_case,
                  "FN": ~said_positive & y_case, "TN": ~said_positive & ~y_case}  # fmt: skip
    prep = {i.modality: i.preprocess for i in card.inputs}
    views = [str(i.view) for i in card.inputs if i.modality == "mg"]
    arches = dict(card.arch_options["branch_arch"])
    rng = np.random.default_rng(seed)
    written: list[dict[str, str]] = []
    for outcome in OUTCOMES:
        for c in rng.permutation(np.flatnonzero(outcome_of[outcome]))[:per_outcome]:
            unit, target = case_units[c], int(decided[c])
            label = f"{outcome} p={per_case[c, card.positive]:.2f}"
            rows = [i for i, u in enumerate(units) if u == unit]
            for k, row in enumerate(rows):
                case_id, us_sample, mg_samples = sources[row]
                cams = branch_cams(model, packed[row : row + 1], target, arches)
                stem = f"{outcome}_{_safe(case_id)}"
                drawn = [] if us_sample is None else [("us", str(k), us_sample, cams["us"][0])]
                if k == 0:
                    drawn += [("mg", view, sample, cams["mg"][views.index(view)])
                              for view, sample in mg_samples.items()]  # fmt: skip
                for modality, view, sample, cam in drawn:
                    image, seen_as = read_sample(sample)
                    frame = prepared_frame(image, prep[modality], view=seen_as)
                    caption = f"{modality} {view} {label}"  # the file's name says the case
                    picture = overlay_on_frame(frame, cam, prep[modality], caption)
                    name = f"{stem}_us_{int(view):02d}" if modality == "us" else f"{stem}_mg_{view}"
                    path = folder / f"{name}.png"
                    _ok, png = cv2.imencode(".png", picture)
                    atomic_write_bytes(path, png.tobytes())
                    written.append({"path": str(path), "case": case_id, "outcome": outcome,
                                    "modality": modality, "view": view, "image": str(sample.path),
                                    "target": card.class_names[target]})  # fmt: skip
    return written


def _safe(name: str) -> str:
    """A case id as a file name's part: letters, digits, '-', '_' and '.' kept, others '_'."""
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)


def _ultrasound_model_scores(path: str | Path, samples: Sequence[Any], case_units: Sequence[str],
                            task: Any) -> np.ndarray:  # fmt: skip
    """Each case's positive probability from a one-image ultrasound checkpoint: the mean over
    the case's ultrasound images, through the shared preprocessing."""
    from edgebc.data.sample_image import sample_input

    checkpoint = load_checkpoint(path)
    card = checkpoint.card
    card.require_one_image("an ultrasound baseline")
    if card.inputs[0].modality != "us" or card.task.name != task.name:
        raise EdgebcError(
            f"{path}: the baseline must be an ultrasound model of task {task.name} "
            f"(it is {card.inputs[0].modality}, {card.task.name})"
        )
    model = model_from_checkpoint(checkpoint).eval()
    out = []
    for unit in case_units:
        images = [sample_input(s, card.preprocess) for s in samples
                  if s.unit == unit and s.modality == "us"]  # fmt: skip
        if not images:
            raise EdgebcError(f"case {unit} has no ultrasound image for the baseline")
        with torch.inference_mode():
            logits = model(torch.from_numpy(np.stack(images)))
        logits = logits[0] if isinstance(logits, tuple) else logits
        probs = metrics.softmax(logits.numpy(), card.temperature)
        out.append(float(probs[:, card.task.positive].mean()))
    return np.array(out)


def _majority_votes(decided: np.ndarray, units: Sequence[str], positive: int,
                    classes: int) -> np.ndarray:  # fmt: skip
    """Each case's most frequent decision over its instances; a tie goes to the positive class
    when it is among the tied, else to the lowest class index."""
    grouped: dict[str, list[int]] = {}
    for unit, k in zip(units, decided, strict=True):
        grouped.setdefault(unit, []).append(int(k))
    votes = []
    for decisions in grouped.values():
        counts = np.bincount(decisions, minlength=classes)
        tied = np.flatnonzero(counts == counts.max())
        votes.append(positive if positive in tied else int(tied[0]))
    return np.array(votes, np.int64)


def format_report(report: dict[str, Any]) -> str:
    """The report as the lines a person reads."""
    lines = [f"{report['checkpoint']} on {report['split']}: {report['cases']} cases with both "
             f"modalities ({report['positive_cases']} {report['positive_class']}), "
             f"{report['instances']} instances; fusion {report['fusion']}", "",
             "| inputs | AUC [95 % CI over patients] | voted accuracy |", "|---|---|---|"]  # fmt: skip
    for name, row in report["combinations"].items():
        low, high = row["auc_ci"]
        lines.append(f"| {name} | {row['auc']:.3f} [{low:.3f}, {high:.3f}] | "
                     f"{row['voted_accuracy']:.3f} |")  # fmt: skip
    for single in ("us_only", "mg_only"):
        diff = report[f"both_minus_{single}"]
        low, high = diff["ci"]
        lines.append(
            f"both minus {single}: {diff['auc_difference']:+.3f} [{low:+.3f}, {high:+.3f}]"
        )
    if "us_model" in report:
        low, high = report["us_model"]["auc_ci"]
        lines.append(f"the ultrasound-only model: {report['us_model']['auc']:.3f} "
                     f"[{low:.3f}, {high:.3f}]")  # fmt: skip
        for name in ("us_only", "both"):
            diff = report[f"{name}_minus_us_model"]
            low, high = diff["ci"]
            lines.append(f"{name} minus the ultrasound-only model: {diff['auc_difference']:+.3f} "
                         f"[{low:+.3f}, {high:+.3f}]")  # fmt: skip
    share = report["share_by_ablation"]
    lines.append(f"share by ablation: us {share['us']:.2f}, mg {share['mg']:.2f}")
    point = report.get("operating_point")
    if point is not None:
        target = point["target_sensitivity"]
        lines += ["", f"at the card's threshold {point['threshold']:.3f}"
                  + (f" (target sensitivity {target:.2f})" if target is not None else "")
                  + ", over cases:", "| inputs | sensitivity | specificity |", "|---|---|---|"]  # fmt: skip
        for name, row in point["by_inputs"].items():
            lines.append(f"| {name} | {row['sensitivity']:.3f} ({row['positives']} positive) | "
                         f"{row['specificity']:.3f} ({row['negatives']} negative) |")  # fmt: skip
        lines += [f"WARNING: {w}" for w in point["warnings"]]
    maps = report.get("gradcam")
    if maps:
        lines += ["", f"Grad-CAM per branch ({len(maps)} maps, for the fused decision's class):"]
        lines += [f"  {m['outcome']} {m['case']} {m['modality']} {m['view']}: {m['path']}"
                  for m in maps]  # fmt: skip
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--manifest", help="case manifest (default: the run's)")
    parser.add_argument("--split", default="test", help="the split to score, or all")
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--out", type=Path, help="write the report as JSON here")
    parser.add_argument("--us-baseline", type=Path,
                        help="a separately trained ultrasound-only checkpoint to score on the same cases")  # fmt: skip
    parser.add_argument("--gradcam", type=int, default=2,
                        help="cases per outcome (TP, FP, FN, TN) given Grad-CAM maps per branch; 0: none")  # fmt: skip
    parser.add_argument("--maps", type=Path,
                        help="folder for the Grad-CAM maps (default: gradcam/ beside --out, else "
                             "fusion-eval-SPLIT/gradcam/ in the checkpoint's folder)")  # fmt: skip
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    maps = args.maps or (
        args.out.parent / "gradcam" if args.out
        else args.checkpoint.parent / f"fusion-eval-{args.split}" / "gradcam"
    )  # fmt: skip
    report = evaluate_combinations(args.checkpoint, args.manifest, args.split, args.resamples,
                                   us_baseline=args.us_baseline, gradcam_dir=maps,
                                   gradcam_per_outcome=args.gradcam)  # fmt: skip
    if args.out:
        atomic_write_text(args.out, json.dumps(report, indent=2) + "\n")
    print(format_report(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
