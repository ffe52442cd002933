"""Accuracy alongside speed: the same labelled frames through every available backend.

A faster backend (INT8, FP16, another runtime) is only a choice if it decides as the reference
does, so this runs one labelled set through each backend `edgebc bench` would time and reports,
per backend: malignant-vs-rest AUC with a bootstrap 95% interval, accuracy and sensitivity of the
decisions at the model's operating threshold, and agreement with the reference backend (the first
that runs: PyTorch eager on the checkpoint when benchmarks/accuracy.py is given one, else ONNX
Runtime FP32 on one thread): the share of identical decisions and the largest change in the
malignant probability. Torch-free; the command is `python benchmarks/accuracy.py`.

`check_outputs` is the gate the latency benchmark puts before every timing: a backend whose
outputs on the same frames differ from ONNX Runtime FP32's (top-1, probabilities, or outputs that
do not follow the input at all) is reported wrong and never timed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgebc import __version__, sysinfo
from edgebc.bench.backends import BenchModel, candidates, why_unavailable
from edgebc.decision import DecisionRule
from edgebc.errors import EdgebcError
from edgebc.metrics import score_predictions, softmax
from edgebc.model_card import ModelCard, read_card
from edgebc.preprocess import preprocess_chw

BATCH = 8

# The gate before timing. Loose enough for reduced precisions (INT8 QDQ: top-1 97.8%, max Δp 0.09
# on BUSI; BF16 0.03), tight enough for a wrong backend: OpenCV DNN 5.0 on a trained
# MobileNetV3-Small gives the same logits for every frame (variation 1e-5 of the reference's).
MIN_TOP1_AGREEMENT = 0.9
MAX_PROB_CHANGE = 0.2
VARIATION_RANGE = (0.5, 2.0)
# Below this spread of the reference's probabilities across the frames the model cannot tell the
# frames apart (untrained weights), so agreement there proves nothing about a backend.
MIN_REFERENCE_PROB_SPREAD = 0.02


@dataclass(frozen=True)
class OutputCheck:
    """A backend's outputs against the reference's on the same frames, and the verdict.

    top1_agreement: share of frames with the same most probable class; max_prob_change: largest
    |Δp| over frames and classes (softmax at the card's temperature); variation: how much the
    backend's logits move between frames relative to the reference's (1 = as much; 0 = the same
    logits for every frame); max_logit_error: largest |Δlogit| relative to the reference's
    logit spread across the frames; discriminating: whether the reference's outputs vary enough
    across the frames for agreement to mean anything (False on untrained weights)."""

    frames: int
    top1_agreement: float
    max_prob_change: float
    variation: float
    max_logit_error: float
    discriminating: bool
    wrong: str | None  # why the outputs are wrong, or None

    def as_dict(self) -> dict[str, Any]:
        return {
            "frames": self.frames,
            "top1_agreement": self.top1_agreement,
            "max_prob_change": self.max_prob_change,
            "variation": self.variation,
            "max_logit_error": self.max_logit_error,
            "discriminating": self.discriminating,
            "wrong": self.wrong,
        }


def check_outputs(
    reference: np.ndarray, logits: np.ndarray, temperature: float = 1.0
) -> OutputCheck:
    """Compare one backend's logits (frames x classes) with the reference's on the same frames."""
    reference = np.asarray(reference, np.float64)
    logits = np.asarray(logits, np.float64)
    if logits.shape != reference.shape:
        return OutputCheck(len(reference), 0.0, 1.0, 0.0, float("inf"), True,
                           f"output shape {logits.shape}, the reference's {reference.shape}")  # fmt: skip
    if len(reference) < 2:
        raise EdgebcError("checking outputs needs at least two different frames")
    if not np.all(np.isfinite(logits)):
        return OutputCheck(len(reference), 0.0, 1.0, 0.0, float("inf"), True,
                           "non-finite outputs (NaN or inf)")  # fmt: skip
    p_ref, p = softmax(reference, temperature), softmax(logits, temperature)
    top1 = float(np.mean(p.argmax(axis=1) == p_ref.argmax(axis=1)))
    dp = float(np.max(np.abs(p - p_ref)))
    spread_ref = float(np.max(np.std(reference, axis=0)))
    spread = float(np.max(np.std(logits, axis=0)))
    variation = spread / spread_ref if spread_ref > 0 else (1.0 if spread == 0 else float("inf"))
    error = float(np.max(np.abs(logits - reference)))
    relative_error = error / spread_ref if spread_ref > 0 else (0.0 if error == 0 else float("inf"))
    discriminating = float(np.max(np.std(p_ref, axis=0))) >= MIN_REFERENCE_PROB_SPREAD
    wrong = None
    low, high = VARIATION_RANGE
    if not low <= variation <= high:
        wrong = (
            "the same outputs for every frame"
            if variation < 1e-3
            else f"outputs vary {variation:.3g}x as much across frames as the reference's"
        )
    elif discriminating and top1 < MIN_TOP1_AGREEMENT:
        wrong = f"top-1 agrees on {top1:.1%} of frames (< {MIN_TOP1_AGREEMENT:.0%})"
    elif discriminating and dp > MAX_PROB_CHANGE:
        wrong = f"probabilities differ by up to {dp:.3f} (> {MAX_PROB_CHANGE})"
    return OutputCheck(len(reference), top1, dp, variation, relative_error, discriminating, wrong)


def check_frames(card: ModelCard, labelled: LabelledSet | None = None) -> np.ndarray:
    """The frames every backend's outputs are checked on, preprocessed for `card`: the given
    labelled set (real frames), else 24 phantoms of every class from seeds of their own."""
    frames = (labelled or phantom_set(8, seed=91)).frames
    return np.stack([preprocess_chw(f, card.preprocess) for f in frames]).astype(np.float32)


def run_batched(runner: Any, tensors: np.ndarray, batch: int = BATCH) -> np.ndarray:
    """Logits of every frame, `batch` frames a call (the last call smaller)."""
    return np.concatenate(
        [np.asarray(runner.run(tensors[i : i + batch])) for i in range(0, len(tensors), batch)]
    )


@dataclass(frozen=True)
class LabelledSet:
    description: str
    frames: list[np.ndarray]
    labels: list[str]


def phantom_set(per_class: int, seed: int = 77) -> LabelledSet:
    """Synthetic phantoms of every class, from seeds the demo model was not trained on."""
    from edgebc.synth.ultrasound import phantom_stills

    frames, labels = phantom_stills(3 * per_class, seed)
    return LabelledSet(f"{len(frames)} synthetic phantoms (seed {seed})", frames, labels)


def dataset_set(path: Path, split: str | None, limit: int | None, seed: int = 0) -> LabelledSet:
    """Frames of a manifest or dataset folder (one split of it, `limit` drawn at random)."""
    from edgebc.data.readers import read_dataset
    from edgebc.decode import read_image

    samples = read_dataset(path)
    if split is not None:
        samples = [s for s in samples if s.split == split]
        if not samples:
            raise EdgebcError(f"{path}: no samples in split {split!r} (is it a split manifest?)")
    if limit is not None and limit < len(samples):
        chosen = np.random.default_rng(seed).choice(len(samples), limit, replace=False)
        samples = [samples[i] for i in sorted(chosen)]
    frames = [read_image(s.path) for s in samples]
    where = f"{path}" + (f" split {split}" if split else "")
    return LabelledSet(f"{len(frames)} frames of {where}", frames, [s.label for s in samples])


def evaluate(
    model: BenchModel, labelled: LabelledSet, work: Path, n_boot: int = 1000
) -> dict[str, Any]:
    """Every available backend on the same preprocessed frames; metrics and agreement per backend."""
    card = read_card(model.fp32)
    # Scored on the model's task: labels it leaves out (normal frames under benign_vs_malignant)
    # are counted in the report, not scored.
    keep, left_out = card.task.partition(labelled.labels)
    frames = [f for f, kept in zip(labelled.frames, keep, strict=True) if kept]
    if not frames:
        raise EdgebcError(f"none of the frames has a label of task {card.task.name}")
    tensors = np.stack([preprocess_chw(f, card.preprocess) for f in frames])
    y = card.task.encode([label for label, kept in zip(labelled.labels, keep, strict=True) if kept])
    backends: dict[str, Any] = {}
    reference: dict[str, Any] | None = None
    for candidate in candidates(model, [1], work, BATCH):
        try:
            loaded = candidate.make()
            logits = run_batched(loaded, tensors)
        except Exception as exc:  # reported in the table, like the latency benchmark does
            backends[candidate.name] = {"unavailable": why_unavailable(exc)}
            continue
        result = _scores(logits, y, card, n_boot)
        if reference is None:
            reference = {"name": candidate.name, "logits": logits, **result}
        result["check"] = check_outputs(reference["logits"], logits, card.temperature).as_dict()
        result["agreement"] = float(
            np.mean(np.array(result.pop("decisions")) == reference["decisions"])
        )
        result["max_positive_prob_change"] = float(
            np.max(np.abs(np.array(result.pop("positive_probs")) - reference["positive_probs"]))
        )
        backends[candidate.name] = result
        loaded.close()
    if reference is None:
        raise EdgebcError("no backend could run this model (see the reasons above)")
    return {
        "edgebc": __version__,
        "date": time.strftime("%Y-%m-%d"),
        "machine": {"cpu": sysinfo.cpu_description(), "gpus": sysinfo.nvidia_gpus()},
        "model": card.name,
        "threshold": card.threshold,
        "data": labelled.description,
        "class_counts": {n: int(np.sum(y == k)) for k, n in enumerate(card.class_names)},
        "task": card.task.name,
        "labels_left_out": left_out,
        "reference": reference["name"],
        "backends": backends,
    }


def _scores(logits: np.ndarray, y: np.ndarray, card: ModelCard, n_boot: int) -> dict[str, Any]:
    """The one scoring function with the card's decision rule, plus what agreement needs."""
    probs = softmax(logits, card.temperature)
    rule = DecisionRule.of(card)
    scores = score_predictions(probs, y, rule, n_boot)
    return {
        "auc_positive": scores["auc_positive"],
        "auc_ci95": scores["auc_positive_ci"],
        "accuracy": scores["accuracy"],
        "sensitivity": scores["sensitivity"],
        "specificity": scores["specificity"],
        "decisions": rule.decided_names(probs),
        "positive_probs": probs[:, rule.positive].tolist(),
    }


def to_markdown(report: dict[str, Any]) -> str:
    lines = [
        f"edgebc {report['edgebc']}, {report['date']}, {sysinfo.cpu_line(report['machine']['cpu'])}: "
        f"{report['model']} on {report['data']}; "
        f"decisions at threshold {_threshold(report['threshold'])}; agreement against {report['reference']}",
        "",
        "| backend | AUC malignant (95% CI) | accuracy | sensitivity | specificity | agreement | max Δp | outputs |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in report["backends"].items():
        if "unavailable" in r:
            lines.append(f"| {name} | not available: {r['unavailable']} |||||||")
            continue
        low, high = r["auc_ci95"]
        lines.append(
            f"| {name} | {r['auc_positive']:.3f} ({low:.3f}–{high:.3f}) | {r['accuracy']:.3f} | "
            f"{r['sensitivity']:.3f} | {r['specificity']:.3f} | {r['agreement']:.1%} | "
            f"{r['max_positive_prob_change']:.4f} | {check_summary(r.get('check'))} |"
        )
    return "\n".join(lines)


def check_summary(check: dict[str, Any] | None) -> str:
    """One table cell: WRONG with the reason, or the figures of a passed check."""
    if check is None:
        return "not checked"
    figures = (
        f"top-1 {check['top1_agreement']:.1%}, max Δp {check['max_prob_change']:.3f}, "
        f"variation {check['variation']:.3g}"
    )
    if check["wrong"]:
        return f"**WRONG**: {check['wrong']} ({figures})"
    if not check["discriminating"]:
        return f"ok on variation only: the reference barely varies across the frames ({figures})"
    return f"ok ({figures})"


def _threshold(value: float | None) -> str:
    return "none (most probable class)" if value is None else f"{value:.3f}"
