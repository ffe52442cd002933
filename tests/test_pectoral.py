"""Pectoral-muscle suppression on MLO views: the removed triangle against the phantoms' own
muscle masks, CC views left untouched, and the card's switch through the shared preprocessing."""

from __future__ import annotations

import numpy as np
import pytest

from edgebc.breast import prepare_breast
from edgebc.decode import ImageView
from edgebc.pectoral import find_pectoral, suppress_pectoral
from edgebc.preprocess import PreprocessCard, preprocess
from edgebc.synth.mammogram import LATERALITIES, Mammogram, draw_breast, make_mammogram

SEEDS = range(8)


def _phantom(seed: int, laterality: str, view: str, bits: int = 12) -> Mammogram:
    breast = draw_breast(("normal", "benign", "malignant")[seed % 3], np.random.default_rng(seed))
    return make_mammogram(breast, np.random.default_rng(100 + seed), laterality, view, bits=bits)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


@pytest.mark.parametrize("bits", [8, 12])
@pytest.mark.parametrize("laterality", LATERALITIES)
def test_the_removed_region_matches_the_phantoms_muscle_on_mlo(laterality, bits):
    ious = []
    for seed in SEEDS:
        m = _phantom(seed, laterality, "MLO", bits)
        assert m.pectoral.any()
        # crop off: the frame keeps its geometry, so the truth masks line up with it
        out = prepare_breast(m.image, crop=False, laterality="left", pectoral="suppress")
        truth = m.pectoral if laterality == "L" else m.pectoral[:, ::-1]
        breast = m.breast if laterality == "L" else m.breast[:, ::-1]
        before = m.image if laterality == "L" else m.image[:, ::-1]
        removed = ((before > 0) & (out == 0) & (breast == 1)).astype(np.uint8)
        ious.append(_iou(removed, truth))
        # what stays is untouched
        np.testing.assert_array_equal(out[removed == 0], before[removed == 0])
    assert min(ious) >= 0.85, ious


def test_cc_views_are_unchanged_and_a_known_cc_view_is_not_searched():
    for seed in SEEDS:
        for laterality in LATERALITIES:
            m = _phantom(seed, laterality, "CC")
            oriented = m.image if laterality == "L" else m.image[:, ::-1]
            assert find_pectoral(oriented) is None, (seed, laterality)
            assert suppress_pectoral(oriented) is oriented
            card = PreprocessCard(256, 192, breast_crop=True, laterality="left")
            np.testing.assert_array_equal(
                preprocess(m.image, PreprocessCard(**{**card.to_dict(), "pectoral": "suppress"})),
                preprocess(m.image, card),
            )
    # an MLO phantom whose header says CC keeps its muscle: the header's view is believed
    m = _phantom(0, "L", "MLO")
    kept = prepare_breast(m.image, False, "keep", pectoral="suppress", is_mlo=False)
    assert kept is m.image


def test_the_card_switch_removes_the_muscle_at_either_laterality_and_keep_is_the_old_tensor():
    card = PreprocessCard(256, 192, breast_crop=True, laterality="left", pectoral="suppress")
    left, right = _phantom(3, "L", "MLO"), _phantom(3, "R", "MLO")
    suppressed = preprocess(left.image, card)
    np.testing.assert_array_equal(suppressed, preprocess(right.image, card))
    keep = PreprocessCard(256, 192, breast_crop=True, laterality="left")
    assert not np.array_equal(suppressed, preprocess(left.image, keep))
    # the top-left corner (the muscle, after turning left) is black: the lowest normalised level
    black = (0.0 - card.mean[0]) / card.std[0]
    assert np.all(suppressed[0, 0, :8, :8] == np.float32(black))
    # laterality "keep": a right breast is suppressed in place, not left mirrored
    in_place = prepare_breast(right.image, False, "keep", pectoral="suppress")
    mirrored = prepare_breast(right.image, False, "left", pectoral="suppress")
    np.testing.assert_array_equal(in_place, mirrored[:, ::-1])
    np.testing.assert_array_equal(
        preprocess(left.image, card, view=ImageView("L", "MLO", "left")), suppressed
    )
    with pytest.raises(ValueError, match="pectoral must be one of"):
        PreprocessCard(pectoral="remove")  # type: ignore[arg-type]
