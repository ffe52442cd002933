"""Finalising a trained model: the temperature and the operating point, fitted on validation, into its card.

After the last epoch the best weights get a temperature that minimises validation NLL and the
highest positive-class threshold whose validation sensitivity reaches the target, chosen over
independent cases — patients where the manifest names them (a patient's frames count once, by
their mean probability), near-duplicate groups otherwise — with the figures, the number of
malignant cases behind them and a one-sided lower confidence bound on the sensitivity it gives on
new cases (metrics.threshold_for_sensitivity says why the bound holds for a threshold chosen on
the same data). The bound is about the model that ships: it is these weights' own validation
predictions, not out-of-fold models', that choose the threshold. Both go into the card of `best.pt` — the one record
export embeds and the device decides by — so they flow one way, from here to the cart. The fit is
edgebc.calibration's, the one `edgebc calibrate` refits at a site with. The card also gets the
training distribution's statistics and their out-of-distribution thresholds, fitted on the same
held-out frames (train/shift_stats.py), for shift detection on the device.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgebc.atomic import atomic_write_text
from edgebc.calibration import fit_calibration
from edgebc.optional import require
from edgebc.train.checkpoint import (
    Checkpoint,
    load_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
)
from edgebc.train.config import TrainConfig

torch = require("torch", "training")
log = logging.getLogger(__name__)


def finalize_best(
    path: Path, val_x: Any, val_y: Any, val_units: Sequence[str], device: Any, config: TrainConfig,
    fitted_on: str = "validation split", train_x: Any = None,
) -> dict[str, Any]:  # fmt: skip
    """Fit the temperature and the operating threshold on `fitted_on` (the calibration split when
    the manifest has one, else validation); store both in the card, saying where they came from."""
    if fitted_on == "validation split":
        log.warning(
            "the operating point is fitted on the validation split, which also chose the epoch: "
            "its sensitivity bound is optimistic; give the split a calibration side "
            "(edgebc data split --calibration 0.15)"
        )
    from edgebc.train.loop import predict_logits

    checkpoint = load_checkpoint(path)
    card = checkpoint.card
    model = model_from_checkpoint(checkpoint).to(device)
    logits = predict_logits(model, val_x, device)
    fit = fit_calibration(logits, val_y.numpy(), val_units, card.positive,
                          config.optim.target_sensitivity, config.optim.sensitivity_confidence)  # fmt: skip
    temperature, point = fit.temperature, fit.operating_point
    ece_before, ece_after = fit.ece_before, fit.ece_after
    calibration = {"val_ece_before": ece_before, "val_ece_after": ece_after, "fitted_on": fitted_on}
    finalized = checkpoint.with_card(
        temperature=temperature, operating_point=point, calibration=calibration
    )
    save_checkpoint(
        path, with_shift_statistics(finalized, train_x, val_x, val_units, fitted_on, device, config)
    )
    return {**card.metrics, "best_epoch": checkpoint.training["epoch"] + 1, "temperature": temperature,
            "val_ece_before": ece_before, "val_ece_after": ece_after, "threshold": point.threshold,
            "val_sensitivity_at_threshold": point.sensitivity,
            "val_specificity_at_threshold": point.specificity,
            "val_sensitivity_bound": point.sensitivity_bound,
            "val_positive_units": point.positives, "fitted_on": fitted_on}  # fmt: skip


def with_shift_statistics(
    checkpoint: Checkpoint, train_x: Any, held_x: Any, held_units: Sequence[str], fitted_on: str,
    device: Any, config: TrainConfig,
) -> Checkpoint:  # fmt: skip
    """The card with what the model saw (edgebc.shift): its training frames as the loop cached them
    through the shared preprocessing (un-augmented: augmentation works on copies of each batch;
    None reads them again), and thresholds from the held-out frames the operating point was
    fitted on. A failure here costs the statistics, never the run: the card then says nothing and
    the device's shift check stays off."""
    from edgebc.train.shift_stats import cached_split, with_training_statistics

    try:
        if train_x is None:
            train_x, _ = cached_split(config, "train")
        if train_x is None:
            return checkpoint
        train_x = train_x.cpu()
        return with_training_statistics(checkpoint, train_x, held_x.cpu(), held_units, fitted_on,
                                        device)  # fmt: skip
    except (ValueError, np.linalg.LinAlgError) as exc:
        log.warning(
            "no training-distribution statistics in the card (shift detection off): %s", exc
        )
        return checkpoint


def finalize_run(
    run_dir: Path,
    val_x: Any,
    val_y: Any,
    val_units: Sequence[str],
    fitted_on: str,
    device: Any,
    config: TrainConfig,
    history: list[dict[str, float]],
    world_size: int,
    ddp_identical: bool,
    train_x: Any = None,
) -> dict[str, Any]:
    """Finalise `best.pt`, then write the run's metrics.json and training curves."""
    best = finalize_best(run_dir / "best.pt", val_x, val_y, val_units, device, config, fitted_on,
                         train_x)  # fmt: skip
    best["ddp_world_size"] = world_size
    if world_size > 1:
        best["ddp_weights_identical"] = float(ddp_identical)
    atomic_write_text(run_dir / "metrics.json", json.dumps(best, indent=2) + "\n")
    from edgebc.train.plots import training_curves

    training_curves(history, run_dir / "curves.png", config.optim.early_stop_metric)
    return best
