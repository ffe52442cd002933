"""k-fold cross-validation over the group-aware folds written by `edgebc data split --folds K`.

Each fold validates once while the others train; the summary gives mean and standard deviation
of every best-epoch metric across folds, which says more about a small dataset than one split.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

from edgebc.atomic import atomic_write_text
from edgebc.data import read_dataset
from edgebc.errors import EdgebcError
from edgebc.train.config import TrainConfig
from edgebc.train.distill import FOLD_PLACEHOLDER
from edgebc.train.loop import check_teachers, train_model

SUMMARY_KEYS = (
    "val_auc_positive",
    "val_macro_auc",
    "val_balanced_accuracy",
    "val_accuracy",
    "val_ece_after",
    "val_specificity_at_threshold",
    "best_epoch",
)


def cross_validate(config: TrainConfig, show_progress: bool = True) -> dict[str, Any]:
    folds = sorted({s.fold for s in read_dataset(config.data.manifest) if s.fold is not None})
    if len(folds) < 2:
        raise EdgebcError(
            f"{config.data.manifest}: needs a fold column with at least 2 folds (edgebc data split --folds K --val 0)"
        )
    fold_configs = [_fold_config(config, fold) for fold in folds]
    for fold_config in fold_configs:  # every fold's teachers, before the first fold trains
        check_teachers(fold_config)
    per_fold = []
    for fold, fold_config in zip(folds, fold_configs, strict=True):
        result = train_model(fold_config, show_progress=show_progress)
        per_fold.append(
            {"fold": fold, **{k: result.best_metrics.get(k, float("nan")) for k in SUMMARY_KEYS}}
        )
    summary = {
        key: {
            "mean": float(np.nanmean([f[key] for f in per_fold])),
            "sd": float(np.nanstd([f[key] for f in per_fold], ddof=1)),
        }
        for key in SUMMARY_KEYS
    }
    out = Path(config.out_dir) / config.name
    report = {"folds": per_fold, "summary": summary}
    atomic_write_text(out / "cv_summary.json", json.dumps(report, indent=2) + "\n")
    lines = [
        f"# {len(folds)}-fold cross-validation: {config.model.arch}",
        "",
        "| metric | mean | sd | " + " | ".join(f"fold {f}" for f in folds) + " |",
    ]
    lines.append("|---" * (3 + len(folds)) + "|")
    for key in SUMMARY_KEYS:
        values = " | ".join(f"{f[key]:.3f}" for f in per_fold)
        lines.append(
            f"| {key} | {summary[key]['mean']:.3f} | {summary[key]['sd']:.3f} | {values} |"
        )
    atomic_write_text(out / "cv_summary.md", "\n".join(lines) + "\n")
    return report


def _fold_config(config: TrainConfig, fold: int) -> TrainConfig:
    """The run for one fold: its own folder, that fold validating, that fold's teachers."""
    teachers = tuple(p.replace(FOLD_PLACEHOLDER, str(fold)) for p in config.optim.distill_from)
    return dataclasses.replace(
        config,
        name=f"{config.name}/fold{fold}",
        data=dataclasses.replace(config.data, fold=fold),
        optim=dataclasses.replace(config.optim, distill_from=teachers),
    )
