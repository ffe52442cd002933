"""`edgebc eval`: a checkpoint scored the way clinicians read a test.

On a manifest or folder: accuracy, balanced accuracy, per-class sensitivity / specificity /
precision / F1, Cohen's kappa and the confusion matrix; malignant-vs-rest and macro one-vs-rest
AUC with 95% bootstrap intervals; calibration (ECE and reliability diagram) with the temperature
stored at training; sensitivity and specificity at the stored operating threshold; patient-level
results where patient_id exists; a subgroup table for any manifest column; Grad-CAM overlays of
right and wrong cases; a Markdown and JSON report with ROC, PR, confusion and calibration PNGs.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from edgebc.train import plots
from edgebc.train.checkpoint import load_checkpoint
from edgebc.train.dataset import SampleDataset, cache_tensors
from edgebc.train.engine import model_from_checkpoint, predict_logits
from edgebc.train.gradcam import grad_cam, overlay
from edgebc.train.models import model_spec

from edgebc import metrics
from edgebc.atomic import atomic_write_bytes, atomic_write_text
from edgebc.data import read_dataset
from edgebc.data.records import Sample
from edgebc.errors import EdgebcError
from edgebc.optional import require
from edgebc.preprocess import PreprocessCard

torch = require("torch", "evaluation")


def evaluate_checkpoint(
    checkpoint: str | Path,
    data: str | Path,
    out_dir: str | Path,
    split: str | None = "test",
    n_boot: int = 1000,
    gradcam_per_kind: int = 4,
    subgroups: Sequence[str] = ("source", "modality", "view"),
    device: str = "cpu",
    seed: int = 0,
) -> dict[str, Any]:
    """Score `checkpoint` on `data` (optionally one split of it); write the report into `out_dir`."""
    record = load_checkpoint(checkpoint)
    classes = list(record["class_names"])
    positive = classes.index(record["positive_class"])
    card = PreprocessCard.from_dict(record["preprocess"], source=f"{checkpoint}: preprocess")
    samples = read_dataset(data)
    if split:
        if not any(s.split for s in samples):
            raise EdgebcError(
                f"{data}: has no split column; pass --split all to evaluate every sample"
            )
        samples = [s for s in samples if s.split == split]
    unknown = sorted({s.label for s in samples} - set(classes))
    if unknown:
        raise EdgebcError(f"{data}: labels {unknown} are not classes of this model ({classes})")
    if not samples:
        raise EdgebcError(f"{data}: no samples{f' in split {split!r}' if split else ''}")
    torch_device = torch.device(device)
    model = model_from_checkpoint(record).to(torch_device)
    images, targets = cache_tensors(SampleDataset(samples, card, classes), desc="cache eval")
    logits = predict_logits(model, images, torch_device)
    y = targets.numpy()
    temperature = float(record.get("temperature") or 1.0)
    probs = metrics.softmax(logits, temperature)
    report = score(probs, y, classes, positive, record.get("operating_point"), n_boot, seed)
    report["ece_uncalibrated"] = metrics.expected_calibration_error(metrics.softmax(logits), y)[0]
    report.update(
        checkpoint=str(checkpoint), data=str(data), split=split or "all", n=len(samples), temperature=temperature,
        weights_sha256=record.get("weights_sha256"), arch=record["arch"],
        patient_level=patient_level(samples, probs, y, positive),
        subgroups=subgroup_table(samples, probs, y, positive, subgroups),
    )  # fmt: skip
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_predictions(out / "predictions.csv", samples, probs, classes)
    _write_figures(out, report, probs, y, classes, positive)
    layer = model.get_submodule(model_spec(record["arch"]).cam_layer)
    report["gradcam"] = _write_gradcams(
        out / "gradcam", model, layer, images, probs, y, card, classes, gradcam_per_kind, seed
    )
    atomic_write_text(out / "report.json", json.dumps(report, indent=2, default=float) + "\n")
    atomic_write_text(out / "report.md", render_markdown(report, classes))
    return report


def score(
    probs: np.ndarray,
    y: np.ndarray,
    classes: Sequence[str],
    positive: int,
    operating: dict[str, float] | None,
    n_boot: int,
    seed: int,
) -> dict[str, Any]:
    """Every headline number for class probabilities `probs` against labels `y`."""
    k = len(classes)
    matrix = metrics.confusion_matrix(y, probs.argmax(1), k)
    stats = metrics.per_class_stats(matrix)
    pos_scores = probs[:, positive]
    auc_positive = metrics.roc_auc(y == positive, pos_scores)
    auc_ci = metrics.bootstrap_ci(
        lambda yy, ss: metrics.roc_auc(yy == positive, ss), y, pos_scores, n_boot, seed
    )

    def macro(yy, pp):
        return float(np.mean([metrics.roc_auc(yy == c, pp[:, c]) for c in range(k)]))

    macro_ci = metrics.bootstrap_ci(macro, y, probs, n_boot, seed)
    ece, table = metrics.expected_calibration_error(probs, y)
    result: dict[str, Any] = {
        "accuracy": float(np.trace(matrix) / matrix.sum()),
        "balanced_accuracy": float(np.nanmean([s.sensitivity for s in stats])),
        "cohen_kappa": metrics.cohen_kappa(matrix),
        "confusion_matrix": matrix.tolist(),
        "per_class": {c: s.__dict__ for c, s in zip(classes, stats, strict=True)},
        "auc_positive": auc_positive, "auc_positive_ci": list(auc_ci),
        "macro_auc": macro(y, probs), "macro_auc_ci": list(macro_ci),
        "average_precision_positive": metrics.average_precision(y == positive, pos_scores),
        "ece": ece, "reliability": table, "positive_class": classes[positive],
    }  # fmt: skip
    if operating:
        threshold = float(operating["threshold"])
        sens_ci = metrics.bootstrap_ci(
            lambda yy, ss: metrics.sensitivity_at(yy == positive, ss, threshold),
            y,
            pos_scores,
            n_boot,
            seed,
        )
        result["operating_point"] = {
            "threshold": threshold, "target_sensitivity": operating["target_sensitivity"],
            "validation_sensitivity": operating["sensitivity"], "validation_specificity": operating["specificity"],
            "sensitivity": metrics.sensitivity_at(y == positive, pos_scores, threshold), "sensitivity_ci": list(sens_ci),
            "specificity": metrics.specificity_at(y == positive, pos_scores, threshold),
        }  # fmt: skip
    return result


def patient_level(
    samples: Sequence[Sample], probs: np.ndarray, y: np.ndarray, positive: int
) -> dict[str, Any] | None:
    """Per patient: mean probability (scored by AUC) and majority vote of predicted classes."""
    by_patient: dict[str, list[int]] = defaultdict(list)
    for index, sample in enumerate(samples):
        if sample.patient_id:
            by_patient[sample.patient_id].append(index)
    if not by_patient:
        return None
    labels, mean_scores, votes_right = [], [], 0
    for indices in by_patient.values():
        truth = int(
            max(y[indices], key=lambda c: (c == positive, c))
        )  # a patient with any malignant image is malignant
        labels.append(truth)
        mean_scores.append(float(probs[indices, positive].mean()))
        votes = np.bincount(probs[indices].argmax(1), minlength=probs.shape[1])
        votes_right += int(np.argmax(votes) == truth)
    labels_arr = np.array(labels)
    return {
        "patients": len(by_patient),
        "auc_positive_mean_probability": metrics.roc_auc(
            labels_arr == positive, np.array(mean_scores)
        ),
        "majority_vote_accuracy": votes_right / len(by_patient),
    }


def subgroup_table(
    samples: Sequence[Sample],
    probs: np.ndarray,
    y: np.ndarray,
    positive: int,
    columns: Sequence[str],
) -> dict[str, list[dict[str, Any]]]:
    table: dict[str, list[dict[str, Any]]] = {}
    for column in columns:
        values = [_column_value(s, column) for s in samples]
        if all(v is None for v in values):
            continue
        rows = []
        for value in sorted({v for v in values if v is not None}):
            index = np.array([v == value for v in values])
            rows.append({
                "value": value, "n": int(index.sum()),
                "accuracy": float((probs[index].argmax(1) == y[index]).mean()),
                "auc_positive": metrics.roc_auc(y[index] == positive, probs[index, positive]),
            })  # fmt: skip
        table[column] = rows
    return table


def render_markdown(report: dict[str, Any], classes: Sequence[str]) -> str:
    def ci(pair):
        return f"[{pair[0]:.3f}, {pair[1]:.3f}]"

    lines = [
        f"# Evaluation: {report['arch']} on {report['data']} ({report['split']}, n={report['n']})",
        "",
        f"- {report['positive_class']}-vs-rest AUC **{report['auc_positive']:.3f}** 95% CI {ci(report['auc_positive_ci'])}",
        f"- macro one-vs-rest AUC {report['macro_auc']:.3f} 95% CI {ci(report['macro_auc_ci'])}",
        f"- accuracy {report['accuracy']:.3f}, balanced accuracy {report['balanced_accuracy']:.3f}, Cohen's kappa {report['cohen_kappa']:.3f}",
        f"- ECE {report['ece']:.3f} with temperature {report['temperature']:.3f} ({report['ece_uncalibrated']:.3f} without)",
    ]
    op = report.get("operating_point")
    if op:
        lines.append(
            f"- at threshold {op['threshold']:.3f} (chosen for sensitivity {op['target_sensitivity']:.2f} on validation): "
            f"sensitivity **{op['sensitivity']:.3f}** {ci(op['sensitivity_ci'])}, specificity **{op['specificity']:.3f}**"
        )
    lines += [
        "",
        "| class | sensitivity | specificity | precision | F1 | n |",
        "|---|---|---|---|---|---|",
    ]
    for name, s in report["per_class"].items():
        lines.append(
            f"| {name} | {s['sensitivity']:.3f} | {s['specificity']:.3f} | {s['precision']:.3f} | {s['f1']:.3f} | {s['support']} |"
        )
    lines += ["", "Confusion matrix (rows true, columns predicted): " + ", ".join(classes), ""]
    lines += ["    " + "  ".join(f"{v:4d}" for v in row) for row in report["confusion_matrix"]]
    if report.get("patient_level"):
        p = report["patient_level"]
        lines += [
            "",
            f"Patient level ({p['patients']} patients): AUC of mean probability {p['auc_positive_mean_probability']:.3f}, majority-vote accuracy {p['majority_vote_accuracy']:.3f}",
        ]
    for column, rows in report.get("subgroups", {}).items():
        lines += ["", f"| {column} | n | accuracy | AUC |", "|---|---|---|---|"]
        lines += [
            f"| {r['value']} | {r['n']} | {r['accuracy']:.3f} | {r['auc_positive']:.3f} |"
            for r in rows
        ]
    lines += [
        "",
        "![ROC](roc.png) ![PR](pr.png) ![confusion](confusion.png) ![calibration](calibration.png)",
        "",
    ]
    return "\n".join(lines)


def _column_value(sample: Sample, column: str) -> str | None:
    if hasattr(sample, column) and column not in ("extra", "path", "masks", "findings"):
        value = getattr(sample, column)
        return None if value is None else str(value)
    return dict(sample.extra).get(column) or None


def _write_predictions(
    path: Path, samples: Sequence[Sample], probs: np.ndarray, classes: Sequence[str]
) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path", "label", "predicted", *[f"p_{c}" for c in classes]])
    for sample, row in zip(samples, probs, strict=True):
        writer.writerow(
            [str(sample.path), sample.label, classes[int(row.argmax())], *[f"{v:.6f}" for v in row]]
        )
    atomic_write_text(path, buffer.getvalue())


def _write_figures(
    out: Path,
    report: dict[str, Any],
    probs: np.ndarray,
    y: np.ndarray,
    classes: Sequence[str],
    positive: int,
) -> None:
    curves = {}
    for k, name in enumerate(classes):
        fpr, tpr, _ = metrics.roc_curve(y == k, probs[:, k])
        curves[f"{name} vs rest"] = (fpr, tpr, metrics.roc_auc(y == k, probs[:, k]))
    op = report.get("operating_point")
    plots.roc_plot(curves, out / "roc.png", (op["sensitivity"], op["specificity"]) if op else None)
    plots.pr_plot(y == positive, probs[:, positive], out / "pr.png", classes[positive])
    plots.confusion_plot(np.array(report["confusion_matrix"]), classes, out / "confusion.png")
    plots.reliability_plot(report["reliability"], report["ece"], out / "calibration.png")


def _write_gradcams(folder: Path, model: torch.nn.Module, layer: torch.nn.Module, images: torch.Tensor, probs: np.ndarray, y: np.ndarray,
                    card: PreprocessCard, classes: Sequence[str], per_kind: int, seed: int) -> list[str]:  # fmt: skip
    rng = np.random.default_rng(seed)
    predicted = probs.argmax(1)
    written = []
    for kind, chosen in (
        ("correct", np.nonzero(predicted == y)[0]),
        ("wrong", np.nonzero(predicted != y)[0]),
    ):
        for index in rng.permutation(chosen)[:per_kind]:
            cam = grad_cam(model, layer, images[index], int(predicted[index]))
            caption = f"true {classes[y[index]]} / pred {classes[predicted[index]]} {probs[index].max():.2f}"
            _ok, png = cv2.imencode(".png", overlay(images[index], cam, card, caption))
            path = folder / f"{kind}_{int(index):04d}.png"
            atomic_write_bytes(path, png.tobytes())
            written.append(str(path))
    return written


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m edgebc.train.evaluate ...` is `edgebc eval ...`."""
    from edgebc.cli import main as cli_main

    return cli_main(["eval", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
