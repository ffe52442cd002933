"""Temporal smoothing: time-constant behaviour, hysteresis, and withdrawal on no-decision frames."""

import itertools
import math

import numpy as np
import pytest

from edgebc.smoothing import SmoothingConfig, TemporalSmoother

CLASSES = ("normal", "benign", "malignant")


def probs(normal, benign, malignant):
    return {"normal": normal, "benign": benign, "malignant": malignant}


def test_step_response_follows_the_time_constant_whatever_the_frame_rate():
    for fps in (10, 30, 60):
        smoother = TemporalSmoother(CLASSES, "malignant", None, SmoothingConfig(time_constant=0.5))
        smoother.update(probs(1, 0, 0), 0.0)
        t = 0.0
        while t < 0.5 - 1e-9:
            t += 1 / fps
            out = smoother.update(probs(0, 0, 1), t)
        # after one time constant an exponential average has covered 1 - 1/e of the step
        assert out.probabilities["malignant"] == pytest.approx(1 - math.exp(-t / 0.5), abs=1e-9)


def test_positive_class_enters_at_the_threshold_and_leaves_below_threshold_times_one_minus_margin():
    smoother = TemporalSmoother(
        CLASSES, "malignant", 0.3, SmoothingConfig(time_constant=0.0, margin=0.2)
    )
    assert smoother.update(probs(0.5, 0.25, 0.25), 0.0).label == "normal"
    assert smoother.update(probs(0.4, 0.3, 0.30), 0.1).label == "malignant"  # reached the threshold
    assert (
        smoother.update(probs(0.5, 0.25, 0.25), 0.2).label == "malignant"
    )  # 0.25 >= 0.3 * (1 - 0.2) = 0.24: held
    assert smoother.update(probs(0.6, 0.21, 0.19), 0.3).label == "normal"  # fell below 0.24


def test_positive_hysteresis_scales_with_a_low_threshold():
    """A high-sensitivity threshold (0.11) must not hold "malignant" down to a probability of 0.01."""
    smoother = TemporalSmoother(
        CLASSES, "malignant", 0.11, SmoothingConfig(time_constant=0.0, margin=0.1)
    )
    assert smoother.update(probs(0.4, 0.4, 0.2), 0.0).label == "malignant"
    assert smoother.update(probs(0.45, 0.45, 0.10), 0.1).label == "malignant"  # 0.10 >= 0.099
    assert smoother.update(probs(0.3, 0.62, 0.08), 0.2).label == "benign"


def test_noisy_input_near_a_boundary_flickers_far_less_when_smoothed():
    rng = np.random.default_rng(0)
    smoother = TemporalSmoother(
        CLASSES, "malignant", None, SmoothingConfig(time_constant=0.5, margin=0.1)
    )
    raw_labels, shown = [], []
    for k in range(300):
        benign = float(np.clip(0.5 + rng.normal(0, 0.08), 0, 1))
        raw_labels.append("benign" if benign > 0.5 else "normal")
        shown.append(smoother.update(probs(1 - benign, benign, 0.0), k / 30).label)
    changes = lambda labels: sum(a != b for a, b in itertools.pairwise(labels))
    assert changes(raw_labels) > 50 and changes(shown) <= 3


def test_no_decision_withdraws_and_gaps_restart_the_average():
    smoother = TemporalSmoother(CLASSES, "malignant", 0.3, SmoothingConfig(time_constant=1.0))
    smoother.update(probs(0, 0, 1), 0.0)
    assert smoother.update(None, 0.05) == smoother.update(None, 0.06)  # withdrawn: nothing shown
    assert (
        smoother.update(probs(1, 0, 0), 0.1).probabilities["normal"] == 1.0
    )  # fresh start, no carry-over
    assert (
        smoother.update(probs(0, 1, 0), 5.0).probabilities["benign"] == 1.0
    )  # 4.9 s gap > reset_after
