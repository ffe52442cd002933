"""`edgebc eval`: a checkpoint or an exported ONNX model scored the way clinicians read a test.

On a manifest or folder: accuracy, balanced accuracy, per-class sensitivity / specificity /
precision / F1, Cohen's kappa and the confusion matrix; malignant-vs-rest and macro one-vs-rest
AUC with 95% bootstrap intervals; calibration (ECE and reliability diagram) with the temperature
stored at training; sensitivity and specificity at the stored operating threshold; patient-level
results where patient_id exists; a subgroup table for any manifest column; Grad-CAM overlays of
right and wrong cases, and how much of their evidence lies on the lesion where the data has
lesion masks (a check on the caliper shortcut); a Markdown and JSON report with ROC, PR,
confusion and calibration PNGs. Every count (accuracy, confusion matrix, sensitivity, votes) is of
the decisions the cart would show: the card's decision rule at its operating threshold.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from edgebc import metrics
from edgebc.atomic import atomic_write_bytes, atomic_write_text
from edgebc.backends import Backend, open_backend
from edgebc.data import read_dataset
from edgebc.data.records import Sample
from edgebc.data.sample_image import read_sample, sample_input
from edgebc.decision import DecisionRule
from edgebc.errors import EdgebcError
from edgebc.localiser import lesion_crop_of
from edgebc.model_card import ModelCard
from edgebc.optional import require
from edgebc.preprocess import PreprocessCard, prepared_frame
from edgebc.train import plots

# Manifest columns the subgroup table splits by unless told otherwise; `annotations` is the audit's
# burned-in calipers/text flag, so a model leaning on calipers shows as a gap between its rows.
DEFAULT_SUBGROUPS = ("source", "modality", "view", "annotations")


def evaluate_checkpoint(
    checkpoint: str | Path,
    data: str | Path,
    out_dir: str | Path,
    split: str | None = "test",
    n_boot: int = 1000,
    gradcam_per_kind: int = 4,
    subgroups: Sequence[str] = DEFAULT_SUBGROUPS,
    device: str = "cpu",
    seed: int = 0,
) -> dict[str, Any]:
    """Score a checkpoint (.pt) or an exported model (.onnx, through ONNX Runtime) on `data`
    (optionally one split of it), reading everything about the model from its card; write the
    report into `out_dir`."""
    return evaluate_with_predictions(checkpoint, data, out_dir, split, n_boot, gradcam_per_kind,
                                     subgroups, device, seed)[0]  # fmt: skip


@dataclass(frozen=True)
class Predictions:
    """A model's probabilities on the cases it was scored on, in the report's order: what a paired
    comparison of models (edgebc compare) needs beside the report's numbers."""

    samples: list[Sample]
    y: np.ndarray
    probs: np.ndarray
    card: ModelCard


def evaluate_with_predictions(
    checkpoint: str | Path,
    data: str | Path,
    out_dir: str | Path,
    split: str | None = "test",
    n_boot: int = 1000,
    gradcam_per_kind: int = 4,
    subgroups: Sequence[str] = DEFAULT_SUBGROUPS,
    device: str = "cpu",
    seed: int = 0,
    fold: int | None = None,
) -> tuple[dict[str, Any], Predictions]:
    """evaluate_checkpoint, also returning the probabilities behind the report; `fold` keeps only
    that cross-validation fold of the split (the fold a cross-validation run validated on)."""
    model = _load_for_eval(Path(checkpoint), device)
    card = model.card
    if card.arch == "late_fusion":
        raise EdgebcError(
            f"{checkpoint}: a fusion model decides cases, not images: score it with python -m "
            f"edgebc.train.fusion_eval {checkpoint} --manifest {data} --split {split or 'all'} "
            "(ultrasound only, mammograms only and both, side by side)"
        )
    card.require_one_image("edgebc eval")
    task, prep = card.task, card.preprocess
    samples = read_dataset(data)
    if split:
        if not any(s.split for s in samples):
            raise EdgebcError(
                f"{data}: has no split column; pass --split all to evaluate every sample"
            )
        samples = [s for s in samples if s.split == split]
    if fold is not None:
        samples = [s for s in samples if s.fold == fold]
    # Labels the task leaves out (normal frames for benign-vs-malignant) are counted, not scored.
    keep, excluded = task.partition([s.label for s in samples], str(data))
    samples = [s for s, kept in zip(samples, keep, strict=True) if kept]
    if not samples:
        where = f" in split {split!r}" if split else ""
        raise EdgebcError(
            f"{data}: no samples{where}{f' fold {fold}' if fold is not None else ''} for task {task.name}"
        )
    crop = lesion_crop_of(
        card, checkpoint, model.trained_localiser
    )  # crops if it was trained on them
    images = np.stack([sample_input(s, prep, crop) for s in samples])
    y = task.encode(s.label for s in samples)
    logits = model.logits(images)
    probs = metrics.softmax(logits, card.temperature)
    rule = DecisionRule.of(card)
    report = score(probs, y, card, n_boot, seed, [s.unit for s in samples])
    report["ece_uncalibrated"] = metrics.expected_calibration_error(metrics.softmax(logits), y)[0]
    report.update(
        checkpoint=str(checkpoint), data=str(data), split=split or "all", n=len(samples), temperature=card.temperature,
        weights_sha256=card.weights_sha256, arch=card.arch, backend=model.backend, task=task.name,
        excluded_labels=excluded, patient_level=patient_level(samples, probs, y, rule),
        subgroups=subgroup_table(samples, probs, y, rule, subgroups, n_boot, seed),
    )  # fmt: skip
    if fold is not None:
        report["fold"] = fold
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_predictions(out / "predictions.csv", samples, probs, rule)
    _write_figures(out, report, probs, y, card.class_names, card.positive)
    report["gradcam"] = model.gradcams(
        out / "gradcam", images, probs, y, rule, gradcam_per_kind, seed, samples
    )
    report["lesion_attention"] = model.lesion_attention(samples, images, y)
    atomic_write_text(out / "report.json", json.dumps(report, indent=2, default=float) + "\n")
    atomic_write_text(out / "report.md", render_markdown(report, card.class_names))
    return report, Predictions(samples, y, probs, card)


class _EvalModel:
    """What evaluation needs from a model, whether a torch checkpoint or an exported ONNX file:
    a backend behind the runtime's protocol (its card and logits) and, for checkpoints, the torch
    module for Grad-CAM."""

    def __init__(self, path: Path, device: str) -> None:
        self.path = path
        self._torch_model: Any = None
        self.trained_localiser: list[str] = []  # where its training configuration found it
        self.runtime: Backend
        if path.suffix.lower() == ".onnx":
            # The runtime's own backend: it checks MANIFEST.sha256 and reads the card.
            self.runtime = open_backend(path, warmup=0)
            self.backend = f"onnxruntime ({self.runtime.card.precision})"
        else:
            from edgebc.train.torch_backend import TorchBackend

            torch_backend = TorchBackend(path, device)
            self.runtime, self.backend = torch_backend, "pytorch"
            self._torch_model = torch_backend.module
            self.trained_localiser = torch_backend.trained_localiser
        self.card: ModelCard = self.runtime.card

    def logits(self, images: np.ndarray, batch: int = 32) -> np.ndarray:
        step = min(batch, self.card.max_batch)
        return np.concatenate(
            [self.runtime.run(images[i : i + step]) for i in range(0, len(images), step)]
        )

    def gradcams(self, folder: Path, images: np.ndarray, probs: np.ndarray, y: np.ndarray,
                 rule: DecisionRule, per_kind: int, seed: int,
                 samples: Sequence[Sample]) -> list[str] | str:  # fmt: skip
        if self._torch_model is None:
            return "not available for ONNX models: Grad-CAM needs gradients; evaluate the checkpoint for heat maps"
        from edgebc.train.models import model_spec

        torch = require("torch", "Grad-CAM")
        layer = self._torch_model.get_submodule(model_spec(self.card.arch).cam_layer)
        # A mammogram's map goes back onto the breast at the film's resolution (gradcam module).
        full_resolution = self.card.inputs[0].modality == "mg"
        return _write_gradcams(folder, self._torch_model, layer, torch.from_numpy(images), probs,
                               y, self.card.preprocess, rule, per_kind, seed,
                               samples if full_resolution else None)  # fmt: skip

    def lesion_attention(
        self, samples: Sequence[Sample], images: np.ndarray, y: np.ndarray
    ) -> dict[str, float] | str | None:
        """Grad-CAM's share on the lesion (gradcam.lesion_attention); None without lesion masks."""
        if not any(s.masks for s in samples):
            return None
        if self._torch_model is None:
            return "not available for ONNX models: Grad-CAM needs gradients"
        if self.card.lineage.get("input_crop"):
            return "not measured: the lesion masks are drawn on whole frames, the model reads crops"
        from edgebc.train.dataset import lesion_mask_on_input
        from edgebc.train.gradcam import lesion_attention
        from edgebc.train.models import model_spec

        torch = require("torch", "Grad-CAM")
        layer = self._torch_model.get_submodule(model_spec(self.card.arch).cam_layer)
        masks = [lesion_mask_on_input(s, self.card.preprocess) for s in samples]
        return lesion_attention(self._torch_model, layer, torch.from_numpy(images), masks, y)


def _load_for_eval(path: Path, device: str) -> _EvalModel:
    if not path.is_file():
        raise EdgebcError(f"{path}: model file not found")
    return _EvalModel(path, device)


def score(probs: np.ndarray, y: np.ndarray, card: ModelCard, n_boot: int, seed: int,
          units: Sequence[str] | None = None) -> dict[str, Any]:  # fmt: skip
    """Every headline number, from the one scoring function with the card's decision rule, and
    the operating point: the sensitivity realised here — per frame, and per independent case
    (patient) where `units` name them, the way the bound was stated — against the validation
    figures it was chosen on and the card's lower bound."""
    result = metrics.score_predictions(probs, y, DecisionRule.of(card), n_boot, seed)
    point = card.operating_point
    if point is not None:
        op: dict[str, Any] = {
            "threshold": point.threshold, "target_sensitivity": point.target_sensitivity,
            "validation_sensitivity": point.sensitivity, "validation_specificity": point.specificity,
            "validation_positives": point.positives, "validation_negatives": point.negatives,
            "sensitivity_bound": point.sensitivity_bound, "confidence": point.confidence, "unit": point.unit,
            "sensitivity": result["sensitivity"], "sensitivity_ci": result.get("sensitivity_ci"),
            "specificity": result["specificity"],
        }  # fmt: skip
        if units is not None and point.unit == "patient":
            _, unit_y, unit_p = metrics.unit_scores(units, y, probs, card.positive)
            called = unit_p[:, card.positive] >= point.threshold
            positives = unit_y == card.positive
            op["patient_sensitivity"] = float(called[positives].mean()) if positives.any() else None
            op["patients_positive"] = int(positives.sum())
        realised = op.get("patient_sensitivity", op["sensitivity"])
        if point.sensitivity_bound is not None and realised is not None and np.isfinite(realised):
            op["bound_held"] = bool(realised >= point.sensitivity_bound)
        result["operating_point"] = op
    return result


def patient_level(
    samples: Sequence[Sample], probs: np.ndarray, y: np.ndarray, rule: DecisionRule
) -> dict[str, Any] | None:
    """Per patient: mean probability (scored by AUC) and majority vote of the decided classes."""
    positive = rule.positive
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
        votes = np.bincount(rule.indices(probs[indices]), minlength=probs.shape[1])
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
    rule: DecisionRule,
    columns: Sequence[str],
    n_boot: int = 0,
    seed: int = 0,
) -> dict[str, list[dict[str, Any]]]:
    """Per value of each column: the AUC with its CI over patients (where `n_boot`), and the
    sensitivity and specificity of the card's decisions. One threshold serves every subgroup, so
    a subgroup whose sensitivity falls far below the others' (a modality, a site the threshold was
    hardly fitted on) shows here, not in the pooled figure."""
    positive, decided = rule.positive, rule.indices(probs)
    called, truth = decided == positive, y == positive
    table: dict[str, list[dict[str, Any]]] = {}
    for column in columns:
        values = [_column_value(s, column) for s in samples]
        if all(v is None for v in values):
            continue
        rows = []
        for value in sorted({v for v in values if v is not None}):
            index = np.array([v == value for v in values])
            auc = metrics.roc_auc(truth[index], probs[index, positive])
            row: dict[str, Any] = {
                "value": value, "n": int(index.sum()), "positives": int(truth[index].sum()),
                "accuracy": float((decided[index] == y[index]).mean()), "auc_positive": auc,
                "sensitivity": float(called[index & truth].mean()) if (index & truth).any() else None,
                "specificity": float(1 - called[index & ~truth].mean()) if (index & ~truth).any() else None,
            }  # fmt: skip
            if n_boot and np.isfinite(auc):
                units = [s.unit for s, kept in zip(samples, index, strict=True) if kept]
                row["auc_positive_ci"] = metrics.cluster_bootstrap_ci(
                    metrics.roc_auc, units, truth[index], probs[index, positive],
                    n_boot=n_boot, seed=seed,
                )  # fmt: skip
            rows.append(row)
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
        f"- task {report['task']}; counts are of the decisions the device shows (the card's rule and threshold)"
        + "".join(f"; left out: {n} {label}" for label, n in report["excluded_labels"].items()),
    ]
    op = report.get("operating_point")
    if op:
        lines.append(
            f"- at threshold {op['threshold']:.3f} (chosen for sensitivity {op['target_sensitivity']:.2f} on validation): "
            f"sensitivity **{op['sensitivity']:.3f}** {ci(op['sensitivity_ci'])}, specificity **{op['specificity']:.3f}**"
        )
        if op.get("sensitivity_bound") is not None:
            realised = op.get("patient_sensitivity", op["sensitivity"])
            lines.append(
                f"- the card bounds the sensitivity at >= {op['sensitivity_bound']:.3f} ({op['confidence']:.0%} "
                f"confidence, {op['validation_positives']} positive {op['unit']}s); realised here per {op['unit']}: "
                + (
                    "n/a"
                    if realised is None
                    else f"{realised:.3f} ({'held' if op.get('bound_held') else 'NOT held'})"
                )
            )
    attention = report.get("lesion_attention")
    if isinstance(attention, dict) and attention["frames"]:
        lines.append(
            f"- Grad-CAM evidence for the true class on the lesion: {attention['mean_share_on_lesion']:.3f} of the map "
            f"on average over {attention['frames']} frames with a lesion mask; the masks cover {attention['mean_lesion_area']:.3f} "
            f"of the input (a map blind to the lesion scores about that); {attention['blank_maps']} blank maps"
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

    def share(value):
        return "n/a" if value is None else f"{value:.3f}"

    for column, rows in report.get("subgroups", {}).items():
        lines += ["", f"| {column} | n (positive) | accuracy | AUC [95% CI] | sensitivity | specificity |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        lines += [
            f"| {r['value']} | {r['n']} ({r.get('positives', '?')}) | {r['accuracy']:.3f} | {r['auc_positive']:.3f}"
            f"{' ' + ci(r['auc_positive_ci']) if r.get('auc_positive_ci') else ''} | "
            f"{share(r.get('sensitivity'))} | {share(r.get('specificity'))} |"
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
    path: Path, samples: Sequence[Sample], probs: np.ndarray, rule: DecisionRule
) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path", "label", "predicted", *[f"p_{c}" for c in rule.class_names]])
    for sample, row, decided in zip(samples, probs, rule.decided_names(probs), strict=True):
        writer.writerow([str(sample.path), sample.label, decided, *[f"{v:.6f}" for v in row]])
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


def _write_gradcams(folder: Path, model: Any, layer: Any, images: Any, probs: np.ndarray, y: np.ndarray,
                    prep: PreprocessCard, rule: DecisionRule, per_kind: int, seed: int,
                    frames_of: Sequence[Sample] | None = None) -> list[str]:  # fmt: skip
    """Overlays for up to `per_kind` right and wrong answers; over the model's input, or, with
    `frames_of` (the samples behind `images`), over each one's prepared frame at full resolution."""
    from edgebc.train.gradcam import grad_cam, overlay, overlay_on_frame

    rng = np.random.default_rng(seed)
    classes = rule.class_names
    predicted = rule.indices(probs)
    written = []
    for kind, chosen in (
        ("correct", np.nonzero(predicted == y)[0]),
        ("wrong", np.nonzero(predicted != y)[0]),
    ):
        for index in rng.permutation(chosen)[:per_kind]:
            cam = grad_cam(model, layer, images[index], int(predicted[index]))
            caption = f"true {classes[y[index]]} / pred {classes[predicted[index]]} {probs[index].max():.2f}"
            if frames_of is None:
                picture = overlay(images[index], cam, prep, caption)
            else:
                image, view = read_sample(frames_of[index])
                frame = prepared_frame(image, prep, view=view)
                picture = overlay_on_frame(frame, cam, prep, caption)
            _ok, png = cv2.imencode(".png", picture)
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
