"""Pictures people look at: training curves, ROC, PR, confusion matrix, reliability diagram.

matplotlib (the [train] extra) with the non-interactive Agg backend; every figure is written
atomically as PNG.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from edgebc import metrics
from edgebc.atomic import atomic_write_bytes
from edgebc.optional import require


def _pyplot():  # type: ignore[no-untyped-def]
    matplotlib = require("matplotlib", "training and evaluation plots")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:  # type: ignore[no-untyped-def]
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def training_curves(history: Sequence[dict[str, float]], path: Path, metric: str) -> Path:
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    epochs = [h["epoch"] for h in history]
    left.plot(epochs, [h["train_loss"] for h in history], label="train loss")
    left.plot(epochs, [h["val_loss"] for h in history], label="validation loss")
    left.set_xlabel("epoch")
    left.legend()
    for key in ("val_auc_positive", "val_macro_auc", "val_balanced_accuracy"):
        right.plot(epochs, [h[key] for h in history], label=key.replace("val_", ""))
    right.set_xlabel("epoch")
    right.set_ylim(0, 1)
    right.legend()
    right.set_title(f"early stopping on {metric}")
    return _save(fig, path)


def roc_plot(
    curves: dict[str, tuple[np.ndarray, np.ndarray, float]],
    path: Path,
    operating: tuple[float, float] | None = None,
) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.6, 4.4))
    for name, (fpr, tpr, auc) in curves.items():
        ax.plot(fpr, tpr, label=f"{name} (AUC {auc:.3f})")
    if operating is not None:
        ax.plot([1 - operating[1]], [operating[0]], "o", color="black", label="operating point")
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def pr_plot(positive: np.ndarray, scores: np.ndarray, path: Path, name: str) -> Path:
    plt = _pyplot()
    precision, recall = metrics.precision_recall_curve(positive, scores)
    fig, ax = plt.subplots(figsize=(4.6, 4.4))
    ax.step(
        recall,
        precision,
        where="post",
        label=f"{name} (AP {metrics.average_precision(positive, scores):.3f})",
    )
    ax.set_xlabel("recall (sensitivity)")
    ax.set_ylabel("precision")
    ax.set_ylim(0, 1.02)
    ax.legend(loc="lower left", fontsize=8)
    return _save(fig, path)


def confusion_plot(matrix: np.ndarray, classes: Sequence[str], path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.2, 3.8))
    ax.imshow(matrix, cmap="Blues")
    for (i, j), value in np.ndenumerate(matrix):
        ax.text(j, i, str(value), ha="center", va="center", color="black")
    ax.set_xticks(range(len(classes)), classes)
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    return _save(fig, path)


def reliability_plot(table: list[dict[str, float]], ece: float, path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.4, 4.2))
    centres = [(b["low"] + b["high"]) / 2 for b in table]
    ax.bar(
        centres,
        [b["accuracy"] for b in table],
        width=1 / 15,
        edgecolor="black",
        alpha=0.7,
        label="accuracy",
    )
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(f"ECE {ece:.3f}")
    return _save(fig, path)
