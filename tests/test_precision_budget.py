"""The statistical accuracy budget for reduced precision (edgebc.precision_budget), on hand-made
probabilities whose decisions under the demo card's rule (malignant when p >= 0.0909) are known."""

import math

import numpy as np
import pytest

from edgebc.demo import DEMO_MODEL
from edgebc.model_card import read_card
from edgebc.precision_budget import AGREEMENT, AUC, SENSITIVITY, PrecisionBudget, judge

CARD = read_card(DEMO_MODEL)  # normal, benign, malignant; positive 2; threshold 0.0909
NORMAL, BENIGN, MALIGNANT = 0, 1, 2
# margins wide enough for the 92-frame case, so these tests show the mechanics on it; the
# default budget's tighter margins need the larger check sets it is used with (test at the end)
LOOSE = PrecisionBudget(max_disagreement=0.06, max_auc_drop=0.02, max_sensitivity_drop=0.05)


def logits_of(p_malignant, other_is_benign):
    """Logits whose softmax at the card's temperature gives p(malignant) and the rest to benign or
    normal (three quarters of it), so the decision is known."""
    p_mal = np.asarray(p_malignant, np.float64)
    rest = 1.0 - p_mal
    major, minor = 0.75 * rest, 0.25 * rest
    benign = np.where(other_is_benign, major, minor)
    normal = np.where(other_is_benign, minor, major)
    probs = np.stack([normal, benign, p_mal], axis=1)
    return CARD.temperature * np.log(probs)


def reference_set(n=92, positives=36, seed=0):
    """A realistic FP32 reference: malignant frames mostly scored high, a few missed; benign and
    normal frames mostly low, a few false positives."""
    rng = np.random.default_rng(seed)
    y = np.array([MALIGNANT] * positives + [BENIGN] * ((n - positives) // 2)
                 + [NORMAL] * (n - positives - (n - positives) // 2))  # fmt: skip
    p = np.where(y == MALIGNANT, rng.uniform(0.15, 0.95, n), rng.uniform(0.005, 0.07, n))
    p[:3] = [0.05, 0.06, 0.07]  # three malignant frames the reference misses
    p[positives : positives + 4] = [0.2, 0.3, 0.12, 0.5]  # four benign false positives
    p[positives + 5] = 0.085  # a benign frame just under the threshold
    other_is_benign = y != NORMAL
    return y, p, other_is_benign


def test_identical_outputs_pass_with_zero_losses_and_the_floor_binds():
    y, p, other = reference_set()
    ref = logits_of(p, other)
    verdict = judge(ref, ref.copy(), y, CARD, budget=LOOSE)
    assert verdict.allowed and verdict.agreement == 1.0
    assert [c.loss for c in verdict.criteria] == [0.0, 0.0, 0.0]
    # with 36 positives the sensitivity bound cannot go below 1.645 / 38 even with no change
    sens = verdict.criterion(SENSITIVITY)
    assert sens.bound == pytest.approx(1.6448536 / 38, abs=1e-6) and sens.floor == sens.bound
    assert verdict.binding == SENSITIVITY


def test_one_flipped_decision_in_92_passes_and_names_the_binding_criterion():
    """The issue's case: one frame of 92 flips; a >= 99 % point agreement failed it (91/92)."""
    y, p, other = reference_set()
    ref = logits_of(p, other)
    q = p.copy()
    q[36 + 5] = 0.095  # the benign frame at 0.085 crosses the threshold: one decision changes
    q += np.random.default_rng(1).normal(0, 0.002, len(q)).clip(-0.004, 0.004) * (q > 0.1)
    verdict = judge(ref, logits_of(q, other), y, CARD, budget=LOOSE)
    agreement = verdict.criterion(AGREEMENT)
    assert agreement.loss == pytest.approx(1 / 92)
    assert agreement.bound == pytest.approx(0.0505, abs=5e-4)  # Clopper-Pearson, 1 of 92
    assert verdict.criterion(SENSITIVITY).loss == 0.0
    assert verdict.criterion(AUC).passed and abs(verdict.criterion(AUC).loss) < 0.01
    assert verdict.allowed, verdict.summary()
    assert verdict.binding == SENSITIVITY  # 0.043 of 0.05 is closer than 0.0505 of 0.06
    assert "within the budget" in verdict.summary() and SENSITIVITY in verdict.summary()


def test_a_systematically_lower_malignant_score_fails_and_the_worst_criterion_binds():
    y, p, other = reference_set()
    ref = logits_of(p, other)
    q = np.where(y == MALIGNANT, p * 0.3, p)  # every malignant score shrinks to 30 %
    verdict = judge(ref, logits_of(q, other), y, CARD, budget=LOOSE)
    sens = verdict.criterion(SENSITIVITY)
    lost = int(((p >= CARD.threshold) & (q < CARD.threshold) & (y == MALIGNANT)).sum())
    assert lost >= 4 and sens.loss == pytest.approx(lost / 36)
    assert not any(c.passed for c in verdict.criteria) and not verdict.allowed
    # AUC 0.964 -> 0.837 is 9x its limit, sensitivity 0.917 -> 0.722 6x: the AUC binds
    assert verdict.criterion(AUC).pressure > sens.pressure > 1
    assert verdict.binding == AUC
    assert "OUTSIDE the budget" in verdict.summary()


def test_many_flips_between_non_positive_classes_fail_on_agreement_only():
    y, p, other = reference_set()
    ref = logits_of(p, other)
    swapped = other.copy()
    swapped[40:50] = ~swapped[40:50]  # ten benign frames now decided normal (or back)
    verdict = judge(ref, logits_of(p, swapped), y, CARD, budget=LOOSE)
    assert verdict.criterion(AGREEMENT).loss == pytest.approx(10 / 92)
    assert not verdict.criterion(AGREEMENT).passed
    assert verdict.criterion(SENSITIVITY).passed and verdict.criterion(AUC).loss == 0.0
    assert verdict.binding == AGREEMENT and not verdict.allowed


def test_a_candidate_that_keeps_decisions_but_ranks_worse_fails_on_auc():
    y, p, other = reference_set(n=200, positives=80)
    ref = logits_of(p, other)
    p[80:100] = np.linspace(0.1, 0.4, 20)  # twenty false positives, ranked below most malignant
    ref = logits_of(p, other)
    q = p.copy()
    above = q >= CARD.threshold
    # above the threshold, scores no longer rank: every decided-malignant frame gets 0.5
    q[above] = 0.5
    verdict = judge(ref, logits_of(q, other), y, CARD, budget=LOOSE)
    auc = verdict.criterion(AUC)
    assert verdict.criterion(AGREEMENT).loss == 0.0 and verdict.criterion(SENSITIVITY).loss == 0.0
    assert auc.loss > 0.03 and not auc.passed and verdict.binding == AUC


def test_too_few_positive_frames_fail_even_identical_and_say_so():
    y, p, other = reference_set(n=60, positives=20)
    ref = logits_of(p, other)
    verdict = judge(ref, ref.copy(), y, CARD, budget=LOOSE)
    assert not verdict.allowed and verdict.binding == SENSITIVITY
    assert verdict.criterion(SENSITIVITY).floor > 0.05
    assert "too few frames" in verdict.summary()


def test_patients_that_repeat_widen_the_bound():
    y, p, other = reference_set(n=184, positives=72)
    ref = logits_of(p, other)
    q = p.copy()
    q[[0, 1, 2]] = 0.2  # three missed malignant frames now detected...
    q[[10, 11, 12, 13]] = 0.02  # ...and four detected ones lost, all of one patient
    units = [f"p{i // 2}" for i in range(184)]
    units[10:14] = ["p-lost"] * 4
    independent = judge(ref, logits_of(q, other), y, CARD, budget=LOOSE)
    clustered = judge(ref, logits_of(q, other), y, CARD, units=units, budget=LOOSE)
    assert clustered.units == len(set(units)) < clustered.frames
    assert clustered.criterion(SENSITIVITY).bound > independent.criterion(SENSITIVITY).bound
    assert clustered.criterion(SENSITIVITY).method == "ratio estimator over patients"


def test_bad_input_is_refused():
    y, p, other = reference_set()
    ref = logits_of(p, other)
    with pytest.raises(ValueError, match="one row per labelled frame"):
        judge(ref, ref[:-1], y, CARD)
    with pytest.raises(ValueError, match="confidence"):
        PrecisionBudget(confidence=1.0)
    one_class = judge(ref[:30], ref[:30], y[:30], CARD)  # malignant frames only
    assert not one_class.allowed and math.isinf(one_class.criterion(AUC).bound)


def test_the_default_budget_refuses_three_points_of_sensitivity_and_passes_one_flip_in_920():
    """The defaults are the non-inferiority margins export and the plan use: on 400 positive
    frames a candidate losing 12 detections (3 points) fails; one that flips one benign frame
    of 920 passes."""
    y, p, other = reference_set(n=920, positives=400, seed=2)
    ref = logits_of(p, other)
    detected = np.nonzero((y == MALIGNANT) & (p >= CARD.threshold))[0][:12]
    q = p.copy()
    q[detected] = 0.05  # twelve malignant frames the reference found, now missed
    worse = judge(ref, logits_of(q, other), y, CARD)
    assert not worse.allowed and worse.criterion(SENSITIVITY).loss == pytest.approx(12 / 400)
    q = p.copy()
    q[400 + 5] = 0.095  # one benign frame crosses the threshold
    assert judge(ref, logits_of(q, other), y, CARD).allowed
