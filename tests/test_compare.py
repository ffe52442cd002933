"""edgebc compare: DeLong and McNemar against worked examples and bootstraps, and the table on
tiny phantom runs against evaluate_checkpoint's own numbers."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from edgebc import metrics
from edgebc.errors import EdgebcError

# A hand-worked example: cases 0-2 positive, 3-4 negative, two models scored on all five.
POSITIVE = np.array([True, True, True, False, False])
FIRST = np.array([0.9, 0.6, 0.4, 0.5, 0.3])  # V10 = 1, 1, 1/2; V01 = 2/3, 1; AUC 5/6
SECOND = np.array([0.8, 0.2, 0.7, 0.1, 0.75])  # V10 = 1, 1/2, 1/2; V01 = 1, 1/3; AUC 2/3


def test_delong_structural_components_and_variance_match_the_hand_worked_example():
    auc, v10, v01 = metrics.placement_values(POSITIVE, FIRST)
    assert auc == pytest.approx(5 / 6)
    np.testing.assert_allclose(v10, [1, 1, 0.5])
    np.testing.assert_allclose(v01, [2 / 3, 1])
    aucs, cov = metrics.delong_covariance(POSITIVE, FIRST, SECOND)
    np.testing.assert_allclose(aucs, [5 / 6, 2 / 3])
    # var = S10/m + S01/n: (1/12)/3 + (1/18)/2 = 1/18; (1/12)/3 + (2/9)/2 = 5/36;
    # cov = (1/24)/3 + (-1/9)/2 = -1/24
    np.testing.assert_allclose(cov, [[1 / 18, -1 / 24], [-1 / 24, 5 / 36]])
    test = metrics.delong_test(POSITIVE, FIRST, SECOND)
    # difference 1/6, variance 1/18 + 5/36 + 2/24 = 5/18, so z = sqrt(1/10)
    assert test.difference == pytest.approx(1 / 6)
    assert test.standard_error == pytest.approx(math.sqrt(5 / 18))
    assert test.statistic == pytest.approx(math.sqrt(0.1))
    assert test.p_value == pytest.approx(math.erfc(math.sqrt(0.1) / math.sqrt(2)))
    assert test.p_value == pytest.approx(0.7518, abs=1e-4)


def _correlated(n, rng, shift=0.8):
    positive = rng.random(n) < 0.4
    shared = rng.normal(size=n)
    first = shared + rng.normal(size=n) + shift * positive
    second = shared + rng.normal(size=n) + 0.5 * shift * positive
    return positive, first, second


def test_delong_variance_of_the_difference_agrees_with_a_bootstrap():
    rng = np.random.default_rng(1)
    positive, first, second = _correlated(300, rng)
    test = metrics.delong_test(positive, first, second)
    draws = []
    for _ in range(800):
        i = rng.integers(0, len(positive), len(positive))
        draws.append(metrics.roc_auc(positive[i], first[i]) - metrics.roc_auc(positive[i], second[i]))
    assert test.difference == pytest.approx(
        metrics.roc_auc(positive, first) - metrics.roc_auc(positive, second)
    )
    assert test.standard_error == pytest.approx(np.std(draws), rel=0.1)


def test_clustered_delong_is_delong_with_one_case_per_patient_and_widens_with_repeats():
    rng = np.random.default_rng(2)
    positive, first, second = _correlated(120, rng)
    singletons = [f"p{k}" for k in range(120)]
    _, plain = metrics.delong_covariance(positive, first, second)
    _, clustered = metrics.clustered_auc_covariance(positive, singletons, first, second)
    np.testing.assert_allclose(clustered, plain, rtol=1e-12)
    # 60 patients, each seen twice with nearly the same frame: the clustered variance is about
    # the patient bootstrap's, and larger than DeLong's, which counts each frame as a case
    patient_pos = rng.random(60) < 0.4
    base = rng.normal(size=60) + 0.8 * patient_pos
    pos = np.repeat(patient_pos, 2)
    a = np.repeat(base, 2) + 0.2 * rng.normal(size=120)
    b = np.repeat(base + rng.normal(size=60), 2) + 0.2 * rng.normal(size=120)
    patients = [f"p{k}" for k in range(60) for _ in range(2)]
    clustered_test = metrics.delong_test(pos, a, b, patients)
    assert clustered_test.method.startswith("clustered DeLong")
    naive = metrics.delong_test(pos, a, b)
    assert clustered_test.standard_error > 1.2 * naive.standard_error
    draws = []
    for _ in range(800):
        chosen = rng.integers(0, 60, 60)
        i = np.concatenate([[2 * c, 2 * c + 1] for c in chosen])
        draws.append(metrics.roc_auc(pos[i], a[i]) - metrics.roc_auc(pos[i], b[i]))
    assert clustered_test.standard_error == pytest.approx(np.nanstd(draws), rel=0.15)


def test_mcnemar_exact_on_the_discordant_pairs():
    # 1 case only the first gets right, 6 only the second: p = 2 * (1 + 7) / 2**7
    first = np.array([1, 0, 0, 0, 0, 0, 0, 1, 1, 0], bool)
    second = np.array([0, 1, 1, 1, 1, 1, 1, 1, 1, 0], bool)
    test = metrics.mcnemar_test(first, second)
    assert test.statistic == 7 and test.p_value == pytest.approx(16 / 128)
    assert test.difference == pytest.approx(0.3 - 0.8)
    assert metrics.mcnemar_test(first, first).p_value == 1.0
    assert metrics.mcnemar_test(np.ones(3, bool), np.array([1, 1, 0], bool)).p_value == 1.0


def test_mcnemar_clusters_by_patient_only_where_patients_repeat():
    rng = np.random.default_rng(3)
    first, second = rng.random(80) < 0.7, rng.random(80) < 0.5
    singletons = metrics.mcnemar_test(first, second, [str(k) for k in range(80)])
    assert singletons.method.startswith("McNemar exact")  # no patient repeats: the exact test
    patients = [str(k // 2) for k in range(80)]
    clustered = metrics.mcnemar_test(first, second, patients)
    per = np.add.reduceat((first & ~second).astype(int) - (~first & second), np.arange(0, 80, 2))
    assert clustered.statistic == pytest.approx(per.sum() ** 2 / (per**2).sum())
    assert clustered.p_value == pytest.approx(math.erfc(math.sqrt(clustered.statistic / 2)))
    assert clustered.method.startswith("clustered McNemar")
