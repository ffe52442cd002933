"""Fitting a model's calibration and operating point: one implementation for training and sites.

Training's finalisation (train/finalize.py) fits them on its validation logits; `edgebc calibrate`
refits them on a clinic's own labelled cases. Both call `fit_calibration`, so a site's card is made
exactly the way the shipped one was: the temperature that minimises NLL (metrics.fit_temperature),
then the highest positive-class threshold whose sensitivity reaches the target over independent
cases — patients where the data names them, else near-duplicate groups, else frames — with a
one-sided Clopper-Pearson lower bound on the sensitivity and the number of positive cases it rests
on (metrics.threshold_for_sensitivity says why the bound holds for a threshold chosen on the same
data). Torch-free: the device runs it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from edgebc import metrics
from edgebc.model_card import ModelCard, OperatingPoint


@dataclass(frozen=True)
class Calibration:
    """A fitted temperature and operating point, and the calibration error before and after."""

    temperature: float
    operating_point: OperatingPoint
    ece_before: float  # at the temperature the model had before (1.0 for a freshly trained one)
    ece_after: float


def fit_calibration(
    logits: np.ndarray,
    y: np.ndarray,
    units: Sequence[str],
    positive: int,
    target: float,
    confidence: float,
    prior_temperature: float = 1.0,
) -> Calibration:
    """Temperature by NLL on `logits`, then the operating point on the calibrated probabilities
    over the independent cases `units` (Sample.unit of each row)."""
    logits, y = np.asarray(logits, np.float64), np.asarray(y)
    temperature = metrics.fit_temperature(logits, y)
    probs = metrics.softmax(logits, temperature)
    point = operating_point(probs, y, units, positive, target, confidence)
    ece_before, _ = metrics.expected_calibration_error(
        metrics.softmax(logits, prior_temperature), y
    )
    ece_after, _ = metrics.expected_calibration_error(probs, y)
    return Calibration(temperature, point, ece_before, ece_after)


def operating_point(probs: np.ndarray, y: np.ndarray, units: Sequence[str], positive: int,
                    target: float, confidence: float) -> OperatingPoint:  # fmt: skip
    """The threshold for `target` sensitivity over independent cases, with its bound: a unit's
    score is its frames' mean probability, and it is positive when any of its frames is."""
    kind = "patient" if any(not u.startswith("frame:") for u in units) else "frame"
    _, unit_y, unit_p = metrics.unit_scores(units, y, probs, positive)
    return metrics.threshold_for_sensitivity(
        unit_y == positive, unit_p[:, positive], target, confidence, kind
    )


def best_possible_bound(positives: int, confidence: float) -> float:
    """The highest sensitivity bound `positives` cases can give: every one of them detected."""
    return metrics.sensitivity_lower_bound(positives, positives, confidence) if positives else 0.0


def bound_statement(card: ModelCard, threshold: float | None = None) -> str | None:
    """The card's operating point in words — "sensitivity ≥ 0.87 at 95 % confidence, 60
    malignant patients" — or None when it states no bound, or when the threshold in use
    (`threshold`, where a cart overrides the card's) is not the one the bound is about."""
    point = card.operating_point
    if point is None or point.sensitivity_bound is None or point.confidence is None:
        return None
    if threshold is not None and threshold != point.threshold:
        return None
    statement = (
        f"sensitivity ≥ {point.sensitivity_bound:.2f} at {100 * point.confidence:.0f} % confidence"
    )
    if point.positives is None:
        return statement
    cases = "patients" if point.unit == "patient" else "images"
    return f"{statement}, {point.positives} {card.positive_class} {cases}"
