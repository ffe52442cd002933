"""Clinical classification metrics in numpy: the same code scores a torch checkpoint and an ONNX model.

AUC is the Mann-Whitney statistic (ties count half), so it needs no curve integration; confidence
intervals are percentile bootstraps over cases; calibration is expected calibration error over
equal-width bins; temperature scaling minimises validation NLL over log T; the operating point
is the highest threshold whose sensitivity reaches the target, because at a screening cart a
missed cancer costs more than a recall.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgebc.decision import DecisionRule
from edgebc.model_card import OperatingPoint


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of logits / temperature, computed stably."""
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    z = np.asarray(logits, np.float64) / temperature
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def roc_auc(positive: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve = P(score of a random positive > a random negative), ties half."""
    positive = np.asarray(positive, bool)
    scores = np.asarray(scores, np.float64)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = _average_ranks(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def roc_curve(
    positive: np.ndarray, scores: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(false-positive rate, true-positive rate, threshold) at every distinct score, from (0,0)."""
    positive = np.asarray(positive, bool)
    order = np.argsort(-np.asarray(scores, np.float64), kind="mergesort")
    sorted_scores = np.asarray(scores, np.float64)[order]
    hits = positive[order]
    distinct = np.r_[np.nonzero(np.diff(sorted_scores))[0], len(sorted_scores) - 1]
    tp = np.cumsum(hits)[distinct]
    fp = np.cumsum(~hits)[distinct]
    tpr = np.r_[0.0, tp / max(1, positive.sum())]
    fpr = np.r_[0.0, fp / max(1, (~positive).sum())]
    return fpr, tpr, np.r_[np.inf, sorted_scores[distinct]]


def precision_recall_curve(
    positive: np.ndarray, scores: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(precision, recall) at every distinct threshold, highest threshold first."""
    _, tpr, thresholds = roc_curve(positive, scores)
    positive = np.asarray(positive, bool)
    predicted = np.array([(np.asarray(scores) >= t).sum() for t in thresholds[1:]])
    tp = tpr[1:] * positive.sum()
    precision = np.where(predicted > 0, tp / np.maximum(predicted, 1), 1.0)
    return precision, tpr[1:]


def average_precision(positive: np.ndarray, scores: np.ndarray) -> float:
    precision, recall = precision_recall_curve(positive, scores)
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def bootstrap_ci(
    metric: Callable[[np.ndarray, np.ndarray], float],
    y: np.ndarray,
    scores: np.ndarray,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap interval of metric(y, scores) over resampled cases; NaN draws are skipped."""
    rng = np.random.default_rng(seed)
    n = len(y)
    draws = (rng.integers(0, n, n) for _ in range(n_boot))
    return _percentile_interval((metric(y[i], scores[i]) for i in draws), n_boot, level)


def cluster_bootstrap_ci(
    metric: Callable[..., float],
    clusters: Sequence[str],
    *arrays: np.ndarray,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap interval of metric(*arrays) resampling whole clusters (patients): a
    patient's frames are drawn together, so two views of one lesion do not count as two cases
    and the interval is as wide as the number of patients warrants. NaN draws are skipped."""
    members: dict[str, list[int]] = {}
    for position, cluster in enumerate(clusters):
        members.setdefault(cluster, []).append(position)
    groups = [np.array(m) for m in members.values()]
    rng = np.random.default_rng(seed)
    draws = (
        np.concatenate([groups[k] for k in rng.integers(0, len(groups), len(groups))])
        for _ in range(n_boot)
    )
    values = (metric(*(np.asarray(a)[i] for a in arrays)) for i in draws)
    return _percentile_interval(values, n_boot, level)


def _percentile_interval(values: Iterable[float], n_boot: int, level: float) -> tuple[float, float]:
    """The percentile interval of the finite bootstrap values; NaN when fewer than half are."""
    finite = [v for v in values if np.isfinite(v)]
    if len(finite) < n_boot // 2:
        return float("nan"), float("nan")
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(finite, [tail, 100 - tail])
    return float(low), float(high)


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Rows are the true class, columns the predicted class."""
    matrix = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(matrix, (np.asarray(y_true), np.asarray(y_pred)), 1)
    return matrix


def cohen_kappa(matrix: np.ndarray) -> float:
    total = matrix.sum()
    observed = np.trace(matrix) / total
    expected = float(np.sum(matrix.sum(axis=0) * matrix.sum(axis=1))) / total**2
    return float((observed - expected) / (1 - expected)) if expected < 1 else float("nan")


@dataclass(frozen=True)
class ClassStats:
    sensitivity: float
    specificity: float
    precision: float
    f1: float
    support: int


def per_class_stats(matrix: np.ndarray) -> list[ClassStats]:
    total = matrix.sum()
    stats = []
    for k in range(matrix.shape[0]):
        tp = matrix[k, k]
        fn = matrix[k].sum() - tp
        fp = matrix[:, k].sum() - tp
        tn = total - tp - fn - fp
        sens = tp / (tp + fn) if tp + fn else float("nan")
        spec = tn / (tn + fp) if tn + fp else float("nan")
        prec = tp / (tp + fp) if tp + fp else float("nan")
        f1 = (
            2 * prec * sens / (prec + sens)
            if (prec + sens) and np.isfinite(prec) and np.isfinite(sens)
            else float("nan")
        )
        stats.append(ClassStats(float(sens), float(spec), float(prec), float(f1), int(tp + fn)))
    return stats


def expected_calibration_error(
    probs: np.ndarray, y: np.ndarray, bins: int = 15
) -> tuple[float, list[dict[str, float]]]:
    """ECE of the top-class confidence, and the per-bin table behind the reliability diagram."""
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == np.asarray(y)
    edges = np.linspace(0, 1, bins + 1)
    table, ece = [], 0.0
    for low, high in itertools.pairwise(edges):
        inside = (confidence > low) & (confidence <= high)
        if not inside.any():
            continue
        accuracy, mean_conf = float(correct[inside].mean()), float(confidence[inside].mean())
        ece += inside.mean() * abs(accuracy - mean_conf)
        table.append(
            {
                "low": float(low),
                "high": float(high),
                "count": int(inside.sum()),
                "accuracy": accuracy,
                "confidence": mean_conf,
            }
        )
    return float(ece), table


def negative_log_likelihood(logits: np.ndarray, y: np.ndarray, temperature: float = 1.0) -> float:
    probs = softmax(logits, temperature)
    return float(-np.mean(np.log(np.clip(probs[np.arange(len(y)), y], 1e-12, 1.0))))


def fit_temperature(
    logits: np.ndarray, y: np.ndarray, low: float = 0.05, high: float = 20.0
) -> float:
    """The temperature that minimises NLL on (validation) logits; golden-section search on log T."""
    a, b = np.log(low), np.log(high)
    ratio = (np.sqrt(5) - 1) / 2
    c, d = b - ratio * (b - a), a + ratio * (b - a)

    def f(log_t):
        return negative_log_likelihood(logits, y, float(np.exp(log_t)))

    fc, fd = f(c), f(d)
    for _ in range(80):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = f(d)
    return float(np.exp((a + b) / 2))


def threshold_for_sensitivity(
    positive: np.ndarray,
    scores: np.ndarray,
    target: float = 0.95,
    confidence: float = 0.95,
    unit: str = "frame",
) -> OperatingPoint:
    """The highest threshold t with sensitivity(score >= t) >= target, what it achieves, and a
    one-sided lower confidence bound on the sensitivity it gives on new cases.

    The bound holds although t is chosen from these scores: t is the k-th smallest positive score,
    so the share of the positive population scoring below it is Beta(k, n - k + 1) distributed
    whatever the score distribution (order statistics), which is exactly the Clopper-Pearson
    bound for n - k + 1 detections of n. Each element should be one independent unit (a patient):
    frames of one lesion are not independent, and counting them separately overstates the bound.
    """
    if not 0 < target <= 1:
        raise ValueError(f"target sensitivity must be in (0, 1], got {target}")
    positive = np.asarray(positive, bool)
    scores = np.asarray(scores, np.float64)
    if not positive.any():
        raise ValueError("cannot choose a threshold without positive cases")
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    candidates = np.sort(np.unique(scores[positive]))[::-1]
    threshold = float(candidates[-1])
    for candidate in candidates:
        if float((scores[positive] >= candidate).mean()) >= target:
            threshold = float(candidate)
            break
    detected = int((scores[positive] >= threshold).sum())
    return OperatingPoint(
        threshold, target, detected / n_pos, specificity_at(positive, scores, threshold), n_pos,
        n_neg, sensitivity_lower_bound(detected, n_pos, confidence), confidence, unit,  # type: ignore[arg-type]
    )  # fmt: skip


def sensitivity_lower_bound(detected: int, n: int, confidence: float = 0.95) -> float:
    """One-sided Clopper-Pearson lower bound on a proportion: the p at which `detected` or more
    of `n` would happen with probability 1 - confidence (0 when nothing was detected)."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if not 0 <= detected <= n or n < 1:
        raise ValueError(f"need 0 <= detected <= n and n >= 1, got {detected} of {n}")
    if detected == 0:
        return 0.0
    alpha = 1.0 - confidence
    low, high = 0.0, 1.0
    for _ in range(60):  # P(X >= detected | p) rises with p: bisect for the p where it is alpha
        middle = (low + high) / 2
        if binomial_tail(detected, n, middle) < alpha:
            low = middle
        else:
            high = middle
    return low


def binomial_tail(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p), summed in log space (stable for n in the thousands)."""
    if k <= 0:
        return 1.0
    if p <= 0.0:
        return 0.0
    if p >= 1.0:
        return 1.0
    j = np.arange(k, n + 1)
    log_terms = (
        np.array([math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) for i in j])
        + j * math.log(p) + (n - j) * math.log1p(-p)
    )  # fmt: skip
    top = log_terms.max()
    return float(min(1.0, math.exp(top) * np.exp(log_terms - top).sum()))


def unit_scores(
    units: Sequence[str], y: np.ndarray, probs: np.ndarray, positive: int
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """One row per unit (patient): its mean probabilities and its class — the positive class when
    any of its frames is positive (a patient with a malignant frame is a malignant patient), else
    the highest class index among its frames."""
    order: dict[str, list[int]] = {}
    for index, unit in enumerate(units):
        order.setdefault(unit, []).append(index)
    names = list(order)
    mean = np.stack([np.asarray(probs)[order[u]].mean(axis=0) for u in names])
    labels = np.array(
        [int(max(np.asarray(y)[order[u]], key=lambda c: (c == positive, c))) for u in names]
    )
    return names, labels, mean


def sensitivity_at(positive: np.ndarray, scores: np.ndarray, threshold: float) -> float:
    positive = np.asarray(positive, bool)
    return (
        float((np.asarray(scores)[positive] >= threshold).mean())
        if positive.any()
        else float("nan")
    )


def specificity_at(positive: np.ndarray, scores: np.ndarray, threshold: float) -> float:
    negative = ~np.asarray(positive, bool)
    return (
        float((np.asarray(scores)[negative] < threshold).mean()) if negative.any() else float("nan")
    )


def score_predictions(
    probs: np.ndarray, y: np.ndarray, rule: DecisionRule, n_boot: int = 0, seed: int = 0
) -> dict[str, Any]:
    """Every headline number for class probabilities `probs` against class indices `y`, with the
    decisions taken by `rule` — the device's own rule — so a report's accuracy, confusion matrix,
    sensitivity and agreement are about the calls the cart shows. `n_boot` > 0 adds percentile
    bootstrap intervals over cases."""
    probs, y = np.asarray(probs, np.float64), np.asarray(y)
    k, positive = len(rule.class_names), rule.positive
    decided = rule.indices(probs)
    matrix = confusion_matrix(y, decided, k)
    stats = per_class_stats(matrix)
    scores = probs[:, positive]

    def macro(yy: np.ndarray, pp: np.ndarray) -> float:
        aucs = [roc_auc(yy == c, pp[:, c]) for c in range(k)]
        return float(np.nanmean(aucs)) if np.isfinite(aucs).any() else float("nan")

    ece, table = expected_calibration_error(probs, y)
    result: dict[str, Any] = {
        "n": len(y), "positive_class": rule.positive_class, "threshold": rule.threshold,
        "accuracy": float(np.trace(matrix) / max(1, matrix.sum())),
        "balanced_accuracy": float(np.nanmean([s.sensitivity for s in stats])),
        "cohen_kappa": cohen_kappa(matrix), "confusion_matrix": matrix.tolist(),
        "per_class": {c: s.__dict__ for c, s in zip(rule.class_names, stats, strict=True)},
        "auc_positive": roc_auc(y == positive, scores), "macro_auc": macro(y, probs),
        "average_precision_positive": average_precision(y == positive, scores),
        "sensitivity": stats[positive].sensitivity, "specificity": stats[positive].specificity,
        "ece": ece, "reliability": table,
    }  # fmt: skip
    if n_boot > 0:
        result["auc_positive_ci"] = list(
            bootstrap_ci(lambda yy, ss: roc_auc(yy == positive, ss), y, scores, n_boot, seed)
        )
        result["macro_auc_ci"] = list(bootstrap_ci(macro, y, probs, n_boot, seed))
        result["sensitivity_ci"] = list(
            bootstrap_ci(
                lambda yy, dd: (
                    float(np.mean(dd[yy == positive] == positive))
                    if (yy == positive).any()
                    else float("nan")
                ),
                y,
                decided,
                n_boot,
                seed,
            )
        )
    return result


def _average_ranks(values: np.ndarray) -> np.ndarray:
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    ranks = np.empty(len(values), np.float64)
    boundaries = np.r_[0, np.nonzero(np.diff(sorted_values))[0] + 1, len(values)]
    for start, end in itertools.pairwise(boundaries):
        ranks[order[start:end]] = (start + end + 1) / 2.0
    return ranks


@dataclass(frozen=True)
class PairedTest:
    """A two-sided test of two models on the same cases: the difference (first minus second), its
    standard error where the test has one, the statistic and p, and which method produced them."""

    difference: float
    standard_error: float | None
    statistic: float
    p_value: float
    method: str


def placement_values(
    positive: np.ndarray, scores: np.ndarray
) -> tuple[float, np.ndarray, np.ndarray]:
    """DeLong's structural components by midranks (Sun & Xu 2014, "fast DeLong"): the AUC, then for
    each positive the share of negatives it outscores (V10) and for each negative the share of
    positives that outscore it (V01), ties counting half; each set averages to the AUC."""
    positive = np.asarray(positive, bool)
    scores = np.asarray(scores, np.float64)
    m, n = int(positive.sum()), int((~positive).sum())
    if m == 0 or n == 0:
        raise ValueError(f"DeLong needs positive and negative cases, got {m} and {n}")
    all_ranks = _average_ranks(scores)
    v10 = (all_ranks[positive] - _average_ranks(scores[positive])) / n
    v01 = 1.0 - (all_ranks[~positive] - _average_ranks(scores[~positive])) / m
    return float(v10.mean()), v10, v01


def delong_covariance(positive: np.ndarray, *scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The AUCs of several models' scores on the same cases and DeLong's covariance matrix of them
    (DeLong, DeLong & Clarke-Pearson 1988): S10 / m + S01 / n over the structural components."""
    parts = [placement_values(positive, s) for s in scores]
    aucs = np.array([p[0] for p in parts])
    v10 = np.stack([p[1] for p in parts])
    v01 = np.stack([p[2] for p in parts])
    s10 = np.atleast_2d(np.cov(v10, ddof=1)) if v10.shape[1] > 1 else np.zeros((len(aucs),) * 2)
    s01 = np.atleast_2d(np.cov(v01, ddof=1)) if v01.shape[1] > 1 else np.zeros((len(aucs),) * 2)
    return aucs, s10 / v10.shape[1] + s01 / v01.shape[1]


def clustered_auc_covariance(
    positive: np.ndarray, clusters: Sequence[str], *scores: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The AUCs and their covariance when cases repeat within patients (Obuchowski 1997,
    Biometrics 53:567): each patient contributes the summed structural components of its positive
    and of its negative frames, and the variance is taken over patients, not frames, with the
    covariance between a patient's positive and negative frames kept. With one case per patient
    it is DeLong's covariance exactly."""
    positive = np.asarray(positive, bool)
    index = {c: k for k, c in enumerate(dict.fromkeys(clusters))}
    of = np.array([index[c] for c in clusters])
    n_clusters = len(index)
    m_i = np.bincount(of[positive], minlength=n_clusters).astype(np.float64)
    n_i = np.bincount(of[~positive], minlength=n_clusters).astype(np.float64)
    big_m, big_n = m_i.sum(), n_i.sum()
    aucs, x_dev, y_dev = [], [], []
    for s in scores:
        auc, v10, v01 = placement_values(positive, s)
        aucs.append(auc)
        x_dev.append(np.bincount(of[positive], v10, n_clusters) - m_i * auc)
        y_dev.append(np.bincount(of[~positive], v01, n_clusters) - n_i * auc)
    with_pos, with_neg = int((m_i > 0).sum()), int((n_i > 0).sum())
    if min(with_pos, with_neg, n_clusters) < 2:
        raise ValueError(
            f"a clustered AUC variance needs 2+ patients with positive and with negative cases, "
            f"got {with_pos} and {with_neg}"
        )
    x, y = np.stack(x_dev), np.stack(y_dev)
    s10 = with_pos / ((with_pos - 1) * big_m) * (x @ x.T)
    s01 = with_neg / ((with_neg - 1) * big_n) * (y @ y.T)
    s11 = n_clusters / (n_clusters - 1) * (x @ y.T)
    return np.array(aucs), s10 / big_m + s01 / big_n + (s11 + s11.T) / (big_m * big_n)


def delong_test(
    positive: np.ndarray,
    first: np.ndarray,
    second: np.ndarray,
    clusters: Sequence[str] | None = None,
) -> PairedTest:
    """Two correlated AUCs on the same cases compared by DeLong's z test; with `clusters` (the
    patient of each case) where patients repeat, by Obuchowski's clustered variance instead."""
    if clusters is not None and len(set(clusters)) < len(clusters):
        aucs, cov = clustered_auc_covariance(positive, clusters, first, second)
        method = "clustered DeLong (Obuchowski 1997), patients as clusters"
    else:
        aucs, cov = delong_covariance(positive, first, second)
        method = "DeLong (fast, midrank structural components)"
    difference = float(aucs[0] - aucs[1])
    variance = float(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    if variance <= 0:
        if difference == 0:  # identical rankings: no difference to test
            return PairedTest(difference, 0.0, 0.0, 1.0, method)
        # a difference with no estimable variance (a class of one case, a model with one score
        # for every case) is no evidence either way: p is not available, not 0
        return PairedTest(difference, 0.0, math.nan, math.nan,
                          f"{method}: variance not estimable (too few cases of a class)")  # fmt: skip
    z = difference / math.sqrt(variance)
    return PairedTest(difference, math.sqrt(variance), z, math.erfc(abs(z) / math.sqrt(2)), method)


def mcnemar_test(
    first_correct: np.ndarray, second_correct: np.ndarray, clusters: Sequence[str] | None = None
) -> PairedTest:
    """Whether two models' decisions on the same cases are right equally often. Independent cases:
    McNemar's exact test (two-sided binomial on the discordant pairs; exact at every count, the
    chi-square being only its large-sample form). Where patients repeat: the clustered McNemar of
    Durkalski et al. 2003 (Stat Med 22:1417), chi-square on the per-patient discordance, which is
    McNemar's own statistic with one case per patient. The difference is in accuracy."""
    a = np.asarray(first_correct, bool)
    b = np.asarray(second_correct, bool)
    if a.shape != b.shape:
        raise ValueError(f"paired decisions need the same cases, got {a.shape} and {b.shape}")
    only_first, only_second = a & ~b, ~a & b
    difference = float(a.mean() - b.mean()) if len(a) else float("nan")
    if clusters is not None and len(set(clusters)) < len(clusters):
        index = {c: k for k, c in enumerate(dict.fromkeys(clusters))}
        of = np.array([index[c] for c in clusters])
        per_patient = np.bincount(of, only_first.astype(float) - only_second, len(index))
        spread = float((per_patient**2).sum())
        statistic = float(per_patient.sum() ** 2 / spread) if spread else 0.0
        p = math.erfc(math.sqrt(statistic / 2)) if spread else 1.0
        return PairedTest(
            difference,
            None,
            statistic,
            p,
            "clustered McNemar (Durkalski 2003), patients as clusters",
        )
    discordant, fewer = (
        int(only_first.sum() + only_second.sum()),
        int(min(only_first.sum(), only_second.sum())),
    )
    # P(X <= fewer) = P(X >= discordant - fewer) by symmetry, summed without cancellation
    p = min(1.0, 2 * binomial_tail(discordant - fewer, discordant, 0.5)) if discordant else 1.0
    return PairedTest(
        difference, None, float(discordant), p, "McNemar exact (binomial on discordant pairs)"
    )
