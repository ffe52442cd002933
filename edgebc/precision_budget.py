"""The accuracy budget every reduced precision must pass: shown with confidence, not by a point.

A reduced precision (ONNX Runtime INT8, OpenVINO BF16 or INT8, TensorRT FP16, ...) is judged by
one function, `judge`, on the same frames as the FP32 reference, through the card's own decision
rule (edgebc.decision): what the cart would show. Three criteria, each a loss with a one-sided
upper confidence bound that must stay within its limit (non-inferiority: the candidate carries
the burden of proof, so too few frames fail rather than pass):

- decision agreement: the share of frames whose decision changes; Clopper-Pearson bound;
- AUC of the positive class: the paired drop with DeLong's standard error (Obuchowski's
  clustered variance where patients repeat: edgebc.metrics.delong_test);
- sensitivity at the operating point: the paired drop on positive frames (lost minus gained
  detections), Agresti-Min's interval for matched proportions (2005).

Where patients repeat, the agreement and sensitivity bounds are also taken with the variance
over patients (a ratio estimator), and the larger bound counts. The verdict names the binding
criterion: the one whose bound is closest to (or furthest past) its limit. A point budget of
">= 99 % agreement" on 92 frames fails on one flipped frame; this one fails a candidate that is
worse, or one that was judged on too few frames to show it is not, and says which.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from statistics import NormalDist
from typing import Any

import numpy as np

from edgebc import metrics
from edgebc.decision import DecisionRule
from edgebc.model_card import ModelCard

AGREEMENT, AUC, SENSITIVITY = "decision agreement", "AUC", "sensitivity at the operating point"


@dataclass(frozen=True)
class PrecisionBudget:
    """Limits on the one-sided upper confidence bounds of each loss: the non-inferiority margins.
    Tight, because the comparison is one model at two numeric precisions, not two models: the
    AUC may drop by at most 0.01 (the old point budget's figure, now for the bound) and the
    sensitivity at the operating point by at most 3 points, which a check set of a few hundred
    positive frames can show for a candidate that loses one or two (BUSI's 25 validation
    positives cannot: use every labelled frame not used for calibration)."""

    confidence: float = 0.95
    max_disagreement: float = 0.05  # share of decisions that change
    max_auc_drop: float = 0.01
    max_sensitivity_drop: float = 0.03

    def __post_init__(self) -> None:
        if not 0.5 <= self.confidence < 1:
            raise ValueError(f"confidence must be in [0.5, 1), got {self.confidence}")
        for name in ("max_disagreement", "max_auc_drop", "max_sensitivity_drop"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")


@dataclass(frozen=True)
class Criterion:
    """One criterion: its loss on these frames, the loss's upper confidence bound, the limit the
    bound must stay within, and the bound identical outputs would give (the frames' floor)."""

    name: str
    loss: float
    bound: float
    limit: float
    passed: bool
    floor: float
    method: str
    detail: str

    @property
    def pressure(self) -> float:
        """bound / limit: 1 is at the limit; the binding criterion has the largest."""
        if self.limit > 0:
            return self.bound / self.limit
        return 0.0 if self.bound <= 0 else math.inf


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    binding: str
    criteria: tuple[Criterion, ...]
    frames: int
    units: int
    confidence: float
    reference: dict[str, float]
    candidate: dict[str, float]
    max_prob_diff: float
    mean_prob_diff: float

    def criterion(self, name: str) -> Criterion:
        return next(c for c in self.criteria if c.name == name)

    @property
    def agreement(self) -> float:
        return 1.0 - self.criterion(AGREEMENT).loss

    def summary(self) -> str:
        """One line: allowed or not, and the binding criterion with its bound and limit."""
        c = self.criterion(self.binding)
        state = "within the budget" if self.allowed else "OUTSIDE the budget"
        too_few = (
            " (too few frames to show it even with identical outputs)" if c.floor > c.limit else ""
        )
        return (
            f"{state} on {self.frames} frames; binding: {c.name}, loss {c.loss:+.4f}, "
            f"{100 * self.confidence:.0f} % bound {c.bound:.4f} vs limit {c.limit:.4f}{too_few}"
        )

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["summary"] = self.summary()
        return out


def judge(
    reference_logits: np.ndarray,
    candidate_logits: np.ndarray,
    labels: np.ndarray,
    card: ModelCard,
    units: Sequence[str] | None = None,
    budget: PrecisionBudget = PrecisionBudget(),
) -> Verdict:
    """Judge `candidate_logits` against `reference_logits` (the FP32 model's, same frames in the
    same order) with class indices `labels` of the card's task, `units` the patient of each frame
    where patients repeat, by the card's temperature and decision rule."""
    reference = np.asarray(reference_logits, np.float64)
    candidate = np.asarray(candidate_logits, np.float64)
    y = np.asarray(labels)
    n = len(y)
    if reference.shape != candidate.shape or reference.ndim != 2 or reference.shape[0] != n:
        raise ValueError(
            f"reference {reference.shape} and candidate {candidate.shape} logits need one row per "
            f"labelled frame ({n})"
        )
    if n == 0:
        raise ValueError("the precision budget needs labelled frames to judge on")
    if units is not None and len(units) != n:
        raise ValueError(f"{len(units)} units for {n} frames")
    clusters = list(units) if units is not None and len(set(units)) < n else None
    rule, z = DecisionRule.of(card), NormalDist().inv_cdf(budget.confidence)
    p_ref, p_cand = (metrics.softmax(x, card.temperature) for x in (reference, candidate))
    d_ref, d_cand = rule.indices(p_ref), rule.indices(p_cand)
    positive = y == card.positive
    criteria = (
        _agreement(d_ref != d_cand, clusters, budget, z),
        _auc(positive, p_ref[:, card.positive], p_cand[:, card.positive], clusters, budget, z),
        _sensitivity(
            positive, d_ref == card.positive, d_cand == card.positive, clusters, budget, z
        ),
    )
    binding = max(criteria, key=lambda c: (not c.passed, c.pressure))
    diff = np.abs(p_ref - p_cand)
    return Verdict(
        allowed=all(c.passed for c in criteria), binding=binding.name, criteria=criteria,
        frames=n, units=len(set(units)) if units is not None else n, confidence=budget.confidence,
        reference=_figures(p_ref, d_ref, y, card.positive),
        candidate=_figures(p_cand, d_cand, y, card.positive),
        max_prob_diff=float(diff.max()), mean_prob_diff=float(diff.mean()),
    )  # fmt: skip


def _agreement(changed: np.ndarray, clusters: list[str] | None, budget: PrecisionBudget,
               z: float) -> Criterion:  # fmt: skip
    n, k = len(changed), int(changed.sum())
    bound, method = _upper_proportion(k, n, budget.confidence), "Clopper-Pearson"
    if clusters is not None:
        clustered = k / n + z * _ratio_se(changed.astype(float), np.ones(n), clusters)
        if clustered > bound:
            bound, method = clustered, "ratio estimator over patients"
    return Criterion(AGREEMENT, k / n, bound, budget.max_disagreement,
                     bound <= budget.max_disagreement, _upper_proportion(0, n, budget.confidence),
                     method, f"{k} of {n} decisions changed (agreement {1 - k / n:.4f})")  # fmt: skip


def _auc(positive: np.ndarray, ref: np.ndarray, cand: np.ndarray, clusters: list[str] | None,
         budget: PrecisionBudget, z: float) -> Criterion:  # fmt: skip
    limit = budget.max_auc_drop
    if positive.all() or not positive.any():
        return Criterion(AUC, math.nan, math.inf, limit, False, math.inf, "DeLong",
                         "the frames hold one class only: the AUC cannot be compared")  # fmt: skip
    test = metrics.delong_test(positive, ref, cand, clusters)
    se = test.standard_error or 0.0
    # a difference with no estimable variance (a class of one frame) proves nothing either way
    bound = math.inf if test.difference != 0 and se == 0 else test.difference + z * se
    auc_ref = metrics.roc_auc(positive, ref)
    return Criterion(AUC, test.difference, bound, limit, bound <= limit, 0.0, test.method,
                     f"AUC {auc_ref:.4f} -> {auc_ref - test.difference:.4f} (SE of the paired "
                     f"difference {se:.4f})")  # fmt: skip


def _sensitivity(positive: np.ndarray, ref_hit: np.ndarray, cand_hit: np.ndarray,
                 clusters: list[str] | None, budget: PrecisionBudget, z: float) -> Criterion:  # fmt: skip
    limit, n = budget.max_sensitivity_drop, int(positive.sum())
    if n == 0:
        return Criterion(SENSITIVITY, math.nan, math.inf, limit, False, math.inf, "Agresti-Min",
                         "no frames of the positive class: sensitivity cannot be shown to hold")  # fmt: skip
    lost = int((positive & ref_hit & ~cand_hit).sum())
    gained = int((positive & ~ref_hit & cand_hit).sum())
    bound, method = _agresti_min_upper(lost, gained, n, z), "Agresti-Min (matched proportions)"
    if clusters is not None:
        change = (ref_hit.astype(float) - cand_hit.astype(float))[positive]
        kept = [c for c, p in zip(clusters, positive, strict=True) if p]
        clustered = (lost - gained) / n + z * _ratio_se(change, np.ones(n), kept)
        if clustered > bound:
            bound, method = clustered, "ratio estimator over patients"
    return Criterion(SENSITIVITY, (lost - gained) / n, bound, limit, bound <= limit,
                     _agresti_min_upper(0, 0, n, z), method,
                     f"{lost} positive frames lost, {gained} gained of {n}; sensitivity "
                     f"{ref_hit[positive].mean():.4f} -> {cand_hit[positive].mean():.4f}")  # fmt: skip


def _upper_proportion(k: int, n: int, confidence: float) -> float:
    """One-sided Clopper-Pearson upper bound on a proportion k / n."""
    return 1.0 - metrics.sensitivity_lower_bound(n - k, n, confidence) if k < n else 1.0


def _agresti_min_upper(lost: int, gained: int, n: int, z: float) -> float:
    """Upper bound on a paired drop (lost - gained) / n: Agresti & Min's adjusted Wald interval
    (half a case added to each cell of the 2 x 2 table), good at small counts where Wald is 0."""
    b, c, m = lost + 0.5, gained + 0.5, n + 2.0
    variance = max(0.0, (b + c) - (b - c) ** 2 / m) / m**2
    return (b - c) / m + z * math.sqrt(variance)


def _ratio_se(numerator: np.ndarray, denominator: np.ndarray, clusters: Sequence[str]) -> float:
    """Standard error of sum(numerator) / sum(denominator) with clusters as the independent units."""
    index = {c: k for k, c in enumerate(dict.fromkeys(clusters))}
    of = np.array([index[c] for c in clusters])
    g = len(index)
    if g < 2:
        return math.inf
    num = np.bincount(of, numerator, g)
    den = np.bincount(of, denominator, g)
    ratio = num.sum() / den.sum()
    return float(math.sqrt(g / (g - 1) * ((num - ratio * den) ** 2).sum()) / den.sum())


def _figures(
    probs: np.ndarray, decided: np.ndarray, y: np.ndarray, positive: int
) -> dict[str, float]:
    """The model's own figures on these frames (beside the paired losses, for the report)."""
    is_pos = y == positive
    both = bool(is_pos.any() and (~is_pos).any())
    return {
        "accuracy": float(np.mean(decided == y)),
        "auc_positive": metrics.roc_auc(is_pos, probs[:, positive]) if both else math.nan,
        "sensitivity": float(np.mean(decided[is_pos] == positive)) if is_pos.any() else math.nan,
        "specificity": float(np.mean(decided[~is_pos] != positive))
        if (~is_pos).any()
        else math.nan,
    }
