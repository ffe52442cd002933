"""Accuracy alongside speed: the same labelled frames through every available backend.

A faster backend (INT8, FP16, another runtime) is only a choice if it decides as the reference
does, so this runs one labelled set through each backend `edgebc bench` would time and reports,
per backend: malignant-vs-rest AUC with a bootstrap 95% interval, accuracy and sensitivity of the
decisions at the model's operating threshold, and agreement with the reference backend (the first
that runs: PyTorch eager on the checkpoint when benchmarks/accuracy.py is given one, else ONNX
Runtime FP32 on one thread): the share of identical decisions and the largest change in the
malignant probability. Torch-free; the command is `python benchmarks/accuracy.py`.
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
            logits = np.concatenate(
                [loaded.run(tensors[i : i + BATCH]) for i in range(0, len(tensors), BATCH)]
            )
        except Exception as exc:  # reported in the table, like the latency benchmark does
            backends[candidate.name] = {"unavailable": why_unavailable(exc)}
            continue
        result = _scores(logits, y, card, n_boot)
        if reference is None:
            reference = {"name": candidate.name, **result}
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
        f"edgebc {report['edgebc']}, {report['date']}: {report['model']} on {report['data']}; "
        f"decisions at threshold {_threshold(report['threshold'])}; agreement against {report['reference']}",
        "",
        "| backend | AUC malignant (95% CI) | accuracy | sensitivity | specificity | agreement | max Δp |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in report["backends"].items():
        if "unavailable" in r:
            lines.append(f"| {name} | not available: {r['unavailable']} ||||||")
            continue
        low, high = r["auc_ci95"]
        lines.append(
            f"| {name} | {r['auc_positive']:.3f} ({low:.3f}–{high:.3f}) | {r['accuracy']:.3f} | "
            f"{r['sensitivity']:.3f} | {r['specificity']:.3f} | {r['agreement']:.1%} | "
            f"{r['max_positive_prob_change']:.4f} |"
        )
    return "\n".join(lines)


def _threshold(value: float | None) -> str:
    return "none (most probable class)" if value is None else f"{value:.3f}"
