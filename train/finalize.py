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

A fusion model answers with ultrasound alone, mammograms alone or both, and its calibration cases
mostly have both while in a field clinic most women have no mammogram: a threshold fitted on the
cases as they come would hold its sensitivity for the mix it saw, not for a woman scanned without
one. So its one threshold (one decision rule: the device never switches thresholds by input) is
the lowest of the thresholds each combination the card allows needs for the target on its own,
and each combination's figures at it go into the card's calibration (`operating_point_by_inputs`),
with a warning for a combination the calibration cases cannot speak for.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgebc import metrics
from edgebc.atomic import atomic_write_text
from edgebc.calibration import fit_calibration
from edgebc.errors import EdgebcError
from edgebc.model_card import ModelCard, OperatingPoint
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
    calibration: dict[str, Any] = {"val_ece_before": ece_before, "val_ece_after": ece_after,
                                   "fitted_on": fitted_on}  # fmt: skip
    by_inputs = None
    if card.arch == "late_fusion":
        point, by_inputs, warnings = fusion_operating_point(
            model, card, val_x, val_y.numpy(), val_units, temperature,
            config.optim.target_sensitivity, config.optim.sensitivity_confidence, device,
        )  # fmt: skip
        calibration["operating_point_by_inputs"] = by_inputs
        calibration["operating_point_warnings"] = warnings
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
            "val_positive_units": point.positives, "fitted_on": fitted_on,
            **({"val_operating_point_by_inputs": by_inputs} if by_inputs else {})}  # fmt: skip


def fusion_operating_point(
    model: Any, card: ModelCard, x: Any, y: np.ndarray, units: Sequence[str], temperature: float,
    target: float, confidence: float, device: Any,
) -> tuple[OperatingPoint, dict[str, dict[str, Any]], list[str]]:  # fmt: skip
    """A fusion model's one operating point, honest for every combination of inputs its card
    allows (train/fusion_eval.py's US only, MG only, both): each combination is scored on the
    packed instances that hold what it needs (the other modality marked absent), over cases, and
    chooses its own threshold for `target`; the lowest of these is the model's, so each one's
    sensitivity on these cases reaches the target at it. Returns the point (its figures those of
    the combination with the weakest evidence: the lowest sensitivity bound, each combination's
    bound taken at its own threshold, which only understates it at a lower one), the figures of
    every combination at the threshold, and warnings for combinations with no positive case."""
    from edgebc.calibration import operating_point  # the one fit, per combination
    from edgebc.train.fusion_data import modalities_present
    from edgebc.train.fusion_eval import (
        combination_logits,
        combination_rows,
        figures_at,
        possible_combinations,
    )

    has_us, has_mg = modalities_present(x, model.layout)
    y = np.asarray(y)
    own: dict[str, OperatingPoint] = {}
    scored: dict[str, tuple[np.ndarray, np.ndarray, list[str]]] = {}
    warnings = []
    for combination in possible_combinations(card):
        rows = combination_rows(has_us, has_mg, combination)
        if not bool((y[rows] == card.positive).any()):
            warnings.append(
                f"{combination}: no {card.positive_class} case of the calibration side has these "
                "inputs, so the threshold is not fitted for them: their sensitivity is unknown "
                "(calibrate on cases that have them)"
            )
            continue
        logits = combination_logits(model, x[torch.from_numpy(rows).to(x.device)], combination,
                                    device=device)  # fmt: skip
        probs = metrics.softmax(logits, temperature)
        kept = [u for u, k in zip(units, rows, strict=True) if k]
        scored[combination] = (probs, y[rows], kept)
        own[combination] = operating_point(probs, y[rows], kept, card.positive, target,
                                           confidence)  # fmt: skip
    if not own:
        raise EdgebcError(
            f"no {card.positive_class} case of the calibration side has any inputs this fusion "
            "model takes: no threshold can be fitted (calibrate on cases with both modalities)"
        )
    threshold = min(p.threshold for p in own.values())
    by_inputs: dict[str, dict[str, Any]] = {}
    for combination, (probs, yy, kept) in scored.items():
        figures = figures_at(probs, yy, kept, card.positive, threshold)
        by_inputs[combination] = {
            **figures, "threshold_alone": own[combination].threshold,
            "sensitivity_bound": own[combination].sensitivity_bound,
            "meets_target": bool(figures["sensitivity"] >= target),
        }  # fmt: skip
        log.info("operating point %.3f, %s: sensitivity %.3f, specificity %.3f (%d %s cases; "
                 "alone it would take %.3f)", threshold, combination, figures["sensitivity"],
                 figures["specificity"], figures["positives"], card.positive_class,
                 own[combination].threshold)  # fmt: skip
    for combination in possible_combinations(card):
        if combination not in by_inputs:
            by_inputs[combination] = {"positives": 0, "meets_target": None}
    for warning in warnings:
        log.warning("%s", warning)
    weakest = min(scored, key=lambda c: (own[c].sensitivity_bound or 0.0,
                                         by_inputs[c]["sensitivity"]))  # fmt: skip
    figures = by_inputs[weakest]
    # a combination nobody measured has no bound, so the card states none: the device would
    # otherwise show one for answers (say, mammograms alone) no calibration case speaks for
    bound = None if warnings else own[weakest].sensitivity_bound
    point = OperatingPoint(
        threshold, target, figures["sensitivity"], figures["specificity"], figures["positives"],
        figures["negatives"], bound, confidence, own[weakest].unit,
    )  # fmt: skip
    return point, by_inputs, warnings


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
