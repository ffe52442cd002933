"""Temporal smoothing for live streams: steadier probabilities and a displayed class that does not flicker.

Probabilities are averaged with an exponential moving average whose weight comes from the real
time between frames (alpha = 1 - exp(-dt / time_constant)), so a dropped frame or a slower
camera does not change how fast the display reacts. The displayed class comes from the one
decision rule (edgebc.decision) with its hysteresis option: the positive class is shown as soon as
its smoothed probability reaches the operating threshold and left only once it falls below
threshold x (1 - `margin`); between the other classes a challenger must lead by `margin`.
A frame without a decision (quality gate) withdraws the display and restarts the average, as
does a gap longer than `reset_after` seconds: an average must never span a different scene.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from edgebc.decision import DecisionRule


@dataclass(frozen=True)
class SmoothingConfig:
    time_constant: float = 0.5  # seconds; 0 disables smoothing
    margin: float = 0.1
    reset_after: float = 1.0  # seconds without a decided frame

    def __post_init__(self) -> None:
        if self.time_constant < 0 or not 0 <= self.margin < 1 or self.reset_after <= 0:
            raise ValueError(f"invalid smoothing settings: {self}")


@dataclass(frozen=True)
class Smoothed:
    label: str | None
    probabilities: dict[str, float] | None


class TemporalSmoother:
    def __init__(
        self,
        class_names: Sequence[str],
        positive_class: str,
        threshold: float | None,
        config: SmoothingConfig | None = None,
    ) -> None:
        self.classes = list(class_names)
        self.rule = DecisionRule(tuple(self.classes), self.classes.index(positive_class), threshold)
        self.config = config or SmoothingConfig()
        self.reset()

    def reset(self) -> None:
        self._mean: np.ndarray | None = None
        self._last_time: float | None = None
        self._shown: int | None = None

    def update(self, probabilities: dict[str, float] | None, timestamp: float) -> Smoothed:
        """Fold in one frame's probabilities (None: the frame got no decision) taken at `timestamp`."""
        if probabilities is None:
            self.reset()
            return Smoothed(None, None)
        p = np.array([probabilities[name] for name in self.classes], np.float64)
        if (
            self._mean is None
            or self._last_time is None
            or timestamp - self._last_time > self.config.reset_after
        ):
            self._mean = p
        else:
            dt = max(0.0, timestamp - self._last_time)
            alpha = (
                1.0
                if self.config.time_constant == 0
                else 1.0 - math.exp(-dt / self.config.time_constant)
            )
            self._mean = self._mean + alpha * (p - self._mean)
        self._last_time = timestamp
        self._shown = self._choose(self._mean)
        return Smoothed(
            self.classes[self._shown], dict(zip(self.classes, map(float, self._mean), strict=True))
        )

    def _choose(self, mean: np.ndarray) -> int:
        return self.rule.index(mean, self._shown, self.config.margin)
