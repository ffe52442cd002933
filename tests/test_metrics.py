"""Metrics against hand-computed values (and scikit-learn where it is installed)."""

import numpy as np
import pytest

from edgebc import metrics


def test_auc_by_hand_with_ties():
    # positives 0.9, 0.4 ; negatives 0.4, 0.1: pairs (0.9>0.4)=1 (0.9>0.1)=1 (0.4=0.4)=0.5 (0.4>0.1)=1 -> 3.5/4
    assert metrics.roc_auc(np.array([1, 1, 0, 0]), np.array([0.9, 0.4, 0.4, 0.1])) == pytest.approx(
        0.875
    )
    assert metrics.roc_auc(np.array([1, 0]), np.array([0.2, 0.8])) == 0.0
    assert np.isnan(metrics.roc_auc(np.array([1, 1]), np.array([0.2, 0.8])))


def test_auc_and_ap_match_scikit_learn():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    scores = np.round(rng.normal(y * 0.8, 1.0), 1)  # rounded: plenty of ties
    assert metrics.roc_auc(y, scores) == pytest.approx(sklearn_metrics.roc_auc_score(y, scores))
    assert metrics.average_precision(y, scores) == pytest.approx(
        sklearn_metrics.average_precision_score(y, scores)
    )
    fpr, tpr, _ = metrics.roc_curve(y, scores)
    ref_fpr, ref_tpr, _ = sklearn_metrics.roc_curve(y, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, ref_fpr)
    np.testing.assert_allclose(tpr, ref_tpr)


def test_confusion_kappa_and_per_class_by_hand():
    y_true = np.array([0, 0, 1, 1, 1, 2])
    y_pred = np.array([0, 1, 1, 1, 2, 2])
    matrix = metrics.confusion_matrix(y_true, y_pred, 3)
    assert matrix.tolist() == [[1, 1, 0], [0, 2, 1], [0, 0, 1]]
    # observed 4/6; expected (2*1 + 3*3 + 1*2)/36 = 13/36
    assert metrics.cohen_kappa(matrix) == pytest.approx((4 / 6 - 13 / 36) / (1 - 13 / 36))
    benign = metrics.per_class_stats(matrix)[1]
    assert (benign.sensitivity, benign.specificity, benign.precision) == pytest.approx(
        (2 / 3, 2 / 3, 2 / 3)
    )
    assert benign.support == 3


def test_ece_by_hand():
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.4, 0.6]])
    y = np.array([0, 1, 1, 1])
    ece, table = metrics.expected_calibration_error(probs, y, bins=5)
    # top-class confidences .9 (right), .8 (wrong), .7 (right), .6 (right); bins are (low, high]:
    # (.8, 1]: conf .9 acc 1 gap .1 weight 1/4; (.6, .8]: conf .75 acc .5 gap .25 weight 1/2;
    # (.4, .6]: conf .6 acc 1 gap .4 weight 1/4  ->  .025 + .125 + .1
    assert ece == pytest.approx(0.25)
    assert [b["count"] for b in table] == [1, 2, 1]


def test_temperature_fit_recovers_the_true_temperature():
    rng = np.random.default_rng(1)
    calibrated = rng.normal(0, 2.0, (4000, 3))
    y = np.array([rng.choice(3, p=p) for p in metrics.softmax(calibrated)])
    overconfident = calibrated * 2.5  # a model 2.5x too sure of itself
    assert metrics.fit_temperature(overconfident, y) == pytest.approx(2.5, rel=0.08)
    assert metrics.negative_log_likelihood(overconfident, y, 2.5) < metrics.negative_log_likelihood(
        overconfident, y
    )


def test_threshold_for_sensitivity_by_hand():
    positive = np.array([1, 1, 1, 1, 0, 0, 0, 0], bool)
    scores = np.array([0.9, 0.8, 0.6, 0.3, 0.7, 0.4, 0.2, 0.1])
    point = metrics.threshold_for_sensitivity(positive, scores, 0.75)
    assert (point.threshold, point.sensitivity, point.specificity) == (0.6, 0.75, 0.75)
    assert metrics.threshold_for_sensitivity(positive, scores, 1.0).threshold == 0.3
    with pytest.raises(ValueError, match="without positive cases"):
        metrics.threshold_for_sensitivity(~np.ones(3, bool), np.zeros(3), 0.9)


def test_bootstrap_interval_brackets_the_estimate_and_is_reproducible():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 200)
    scores = rng.normal(y, 1.0)
    low, high = metrics.bootstrap_ci(metrics.roc_auc, y, scores, n_boot=300, seed=3)
    assert low < metrics.roc_auc(y, scores) < high
    assert (low, high) == metrics.bootstrap_ci(metrics.roc_auc, y, scores, n_boot=300, seed=3)
    assert 0.05 < high - low < 0.25


def test_the_sensitivity_bound_is_clopper_pearson():
    scipy_stats = pytest.importorskip("scipy.stats")
    for detected, n in ((19, 20), (57, 60), (5, 5), (1, 10), (190, 200)):
        expected = scipy_stats.beta.ppf(0.05, detected, n - detected + 1)
        assert metrics.sensitivity_lower_bound(detected, n, 0.95) == pytest.approx(
            expected, abs=1e-9
        )
    assert metrics.sensitivity_lower_bound(0, 7) == 0.0
    # 19 of 20 malignant patients found: 95 % sure of at least 0.78 on new patients, not 0.95
    point = metrics.threshold_for_sensitivity(
        np.array([1] * 20 + [0] * 5, bool), np.r_[np.linspace(0.4, 0.99, 20), np.full(5, 0.1)], 0.95
    )
    assert (point.positives, point.negatives, point.sensitivity) == (20, 5, 0.95)
    assert point.sensitivity_bound == pytest.approx(0.78389, abs=1e-5) and point.confidence == 0.95


def test_the_bound_covers_the_true_sensitivity_as_often_as_it_claims():
    """Resampling: draw validation sets from a known population, choose the threshold on each
    the way training does, and count how often the population's sensitivity at that threshold is
    at least the stated bound. The threshold is chosen on the very scores the bound is computed
    from; the empirical sensitivity there, taken as a bound, would cover far less often."""
    rng = np.random.default_rng(7)
    population = rng.beta(5, 2, 400_000)  # malignant patients' scores
    confidence, draws, n = 0.9, 800, 40
    covered = naive = 0
    for _ in range(draws):
        scores = rng.choice(population, n)
        point = metrics.threshold_for_sensitivity(np.ones(n, bool), scores, 0.9, confidence)
        truth = float((population >= point.threshold).mean())
        covered += truth >= point.sensitivity_bound
        naive += truth >= point.sensitivity
    assert abs(covered / draws - confidence) < 0.035  # exact up to resampling noise (sd 0.011)
    assert naive / draws < 0.6
