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

    python -m edgebc.train.fusion_eval runs/fusion-phantoms/best.pt --split test [--manifest M]
        [--us-baseline runs/paired-us/best.pt]

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

import numpy as np

from edgebc import metrics
from edgebc.atomic import atomic_write_text
from edgebc.data import read_dataset
from edgebc.decision import DecisionRule
from edgebc.errors import EdgebcError
from edgebc.optional import require
from edgebc.train.checkpoint import load_checkpoint, model_from_checkpoint
from edgebc.train.fusion_data import cache_fusion, mean_per_case
from edgebc.train.models.fusion import unpack

torch = require("torch", "training")
log = logging.getLogger(__name__)

COMBINATIONS = ("us_only", "mg_only", "both")


def combination_logits(
    model: Any, packed: Any, combination: str, batch_size: int = 64
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

    return predict_logits(model, rows, torch.device("cpu"), batch_size)


def evaluate_combinations(
    checkpoint_path: str | Path, manifest: str | Path | None = None, split: str = "test",
    resamples: int = 1000, seed: int = 0, us_baseline: str | Path | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Every combination's scores on the split's cases that have both modalities (see the
    module docstring); `manifest` defaults to the one the run trained on. `us_baseline`, a
    separately trained ultrasound-only checkpoint, is scored on the same cases (a case's
    ultrasound images' mean probability): what the fusion model with no mammogram must match."""
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
    us_size = int(np.prod(us_input.preprocess.input_shape))
    has_us = torch.isfinite(packed[:, :us_size]).all(dim=1).numpy()
    has_mg = torch.isfinite(packed[:, us_size:]).view(len(packed), len(views), -1)
    has_mg = has_mg.all(dim=2).any(dim=1).numpy()
    units = [s.unit for s in rows]
    incomplete = {u for u, a, b in zip(units, has_us, has_mg, strict=True) if not (a and b)}
    keep = np.array([u not in incomplete for u in units])
    if not keep.any():
        raise EdgebcError(f"no case of split {split!r} in {manifest} has both modalities")
    packed, y = packed[torch.from_numpy(keep)], targets.numpy()[keep]
    units = [u for u, k in zip(units, keep, strict=True) if k]
    model = model_from_checkpoint(checkpoint)
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
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    report = evaluate_combinations(args.checkpoint, args.manifest, args.split, args.resamples,
                                   us_baseline=args.us_baseline)  # fmt: skip
    if args.out:
        atomic_write_text(args.out, json.dumps(report, indent=2) + "\n")
    print(format_report(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
