"""The one decision rule: from class probabilities to the class the cart shows.

The positive class (malignant) whenever its probability reaches the operating threshold, which was
chosen on validation for a target sensitivity; otherwise the most probable of the other classes.
Without a threshold, the most probable class. The device, `classify`, `eval`, the INT8 parity
budget and the benchmark's accuracy table all decide through `DecisionRule`, so a figure such as
"INT8 agrees on 100 % of decisions" is about the decisions the cart shows.

Hysteresis is an option of the same rule, for live streams (smoothing.py): given the class shown
now, the positive class is left only once its probability falls below threshold x (1 - margin) —
a band relative to the threshold, because high-sensitivity thresholds are often small (0.1) and an
absolute band would hold the class down to nothing — and between the other classes a challenger
must lead the shown one by `margin`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgebc.model_card import ModelCard


@dataclass(frozen=True)
class DecisionRule:
    class_names: tuple[str, ...]
    positive: int
    threshold: float | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.positive < len(self.class_names):
            raise ValueError(f"positive index {self.positive} is not a class of {self.class_names}")
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold is a probability in [0, 1], got {self.threshold}")

    @classmethod
    def of(cls, card: ModelCard, threshold: float | None = None) -> DecisionRule:
        """The card's rule; `threshold` overrides the card's (a site's own validated choice)."""
        chosen = card.threshold if threshold is None else threshold
        return cls(card.class_names, card.positive, chosen)

    @property
    def positive_class(self) -> str:
        return self.class_names[self.positive]

    def index(self, p: np.ndarray, shown: int | None = None, margin: float = 0.0) -> int:
        """The decided class index for one probability vector; `shown` and `margin` add hysteresis."""
        if self.threshold is not None:
            p_pos = p[self.positive]
            if p_pos >= self.threshold or (
                shown == self.positive and p_pos >= self.threshold * (1.0 - margin)
            ):
                return self.positive
            candidates = [k for k in range(len(p)) if k != self.positive]
        else:
            candidates = list(range(len(p)))
        best = max(candidates, key=lambda k: p[k])
        if shown in candidates and shown != best and p[best] - p[shown] < margin:
            return shown
        return best

    def describe(self, target_sensitivity: float | None = None) -> str:
        """The rule in words, for the screen beside the decision and its bars: a high-sensitivity
        threshold shows "malignant" while the bars read 14 % malignant, and that is by design."""
        if self.threshold is None:
            return "the most probable class"
        positive = self.positive_class
        why = (
            f", the operating point for {100 * target_sensitivity:.0f} % sensitivity"
            if target_sensitivity is not None
            else ""
        )
        return (
            f"{positive} when p({positive}) ≥ {self.threshold:.2f}{why}; "
            "otherwise the most probable other class"
        )

    def decide(self, p: np.ndarray) -> str:
        return self.class_names[self.index(p)]

    def indices(self, probs: np.ndarray) -> np.ndarray:
        """Decided class indices for (N, classes) probabilities (no hysteresis)."""
        return np.array([self.index(row) for row in np.asarray(probs)], np.int64)

    def decided_names(self, probs: np.ndarray) -> list[str]:
        """The decided class names for (N, classes) probabilities."""
        return [self.class_names[k] for k in self.indices(probs)]
