"""Framed mammogram phantoms: deterministic, on the stated side, pectoral muscle on MLO only,
framing off the breast, 12-bit in 16, findings in the breast, four views per woman on disk."""

import json
from collections import Counter

import cv2
import numpy as np
import pytest

from edgebc.data import read_dataset
from edgebc.synth.dataset import SynthPlan, write_phantom_dataset
from edgebc.synth.mammogram import BreastParameters, draw_breast, make_mammogram
from edgebc.synth.ultrasound import phantom_rng


def _mammogram(label="malignant", laterality="L", view="MLO", seed=0, bits=12):
    breast = draw_breast(label, phantom_rng(seed, 1))
    return make_mammogram(breast, phantom_rng(seed, 2), laterality, view, 240, 192, bits)


def _box_pixels(mask, box):
    x, y, w, h = box
    return mask[y : y + h, x : x + w]


def test_same_seed_same_bytes_other_seed_other_image():
    a, b = _mammogram(seed=3), _mammogram(seed=3)
    assert a.image.tobytes() == b.image.tobytes() and a.findings == b.findings
    assert a.label_box == b.label_box and a.marker_boxes == b.marker_boxes
    assert not np.array_equal(a.image, _mammogram(seed=4).image)


@pytest.mark.parametrize("view", ["CC", "MLO"])
def test_breast_lies_against_the_stated_chest_wall_and_mirrors(view):
    left = _mammogram("benign", "L", view)
    right = _mammogram("benign", "R", view)
    width = left.image.shape[1]
    columns = np.arange(width)
    # The breast's mass of pixels sits on the chest-wall side: left edge for L, right edge for R.
    assert left.chest_wall == "left" and right.chest_wall == "right"
    left_centre = (left.breast.sum(axis=0) * columns).sum() / left.breast.sum()
    right_centre = (right.breast.sum(axis=0) * columns).sum() / right.breast.sum()
    assert left_centre < 0.35 * width < 0.65 * width < right_centre
    assert left.breast[:, 0].sum() > 0.5 * left.breast.shape[0] and left.breast[:, -1].sum() == 0
    # Same seed, other side: the R breast is the L breast mirrored, finding included.
    np.testing.assert_array_equal(left.breast[:, ::-1], right.breast)
    np.testing.assert_array_equal(left.mask[:, ::-1], right.mask)
    assert right.findings[0].x == pytest.approx(width - 1 - left.findings[0].x)


def test_pectoral_muscle_is_a_bright_upper_chest_wall_triangle_on_mlo_only():
    for laterality in ("L", "R"):
        mlo = _mammogram("normal", laterality, "MLO")
        pectoral, breast = mlo.pectoral > 0, mlo.breast > 0
        height, width = pectoral.shape
        assert pectoral.sum() > 0.01 * height * width
        ys, xs = np.nonzero(pectoral)
        assert ys.max() < 0.55 * height  # upper part only
        wall = 0 if laterality == "L" else width - 1
        assert pectoral[0, wall] and np.abs(xs - wall).max() < 0.5 * width
        parenchyma = mlo.image[breast & ~pectoral].astype(float)
        assert mlo.image[pectoral].mean() > parenchyma.mean() + 0.2 * 4095
        cc = _mammogram("normal", laterality, "CC")
        assert cc.pectoral.sum() == 0
        assert cc.breast[0].sum() == 0 and mlo.breast[0].sum() > 0  # only MLO runs off the top


@pytest.mark.parametrize(("laterality", "view"), [("L", "CC"), ("R", "CC"), ("L", "MLO"), ("R", "MLO")])  # fmt: skip
def test_label_block_and_markers_are_bright_and_off_the_breast(laterality, view):
    m = _mammogram("malignant", laterality, view)
    near_breast = cv2.dilate(m.breast, np.ones((5, 5), np.uint8))
    for box in (m.label_box, *m.marker_boxes):
        assert _box_pixels(near_breast, box).sum() == 0
        assert _box_pixels(m.image, box).max() > 0.85 * 4095
    block = _box_pixels(m.image, m.label_box)
    assert (block > 0.9 * 4095).mean() > 0.5 and (
        block < 0.2 * 4095
    ).sum() > 10  # bright, with text
    # Off the breast and its framing, the film is black.
    framing = np.zeros_like(m.breast)
    for x, y, w, h in (m.label_box, *m.marker_boxes):
        framing[y : y + h, x : x + w] = 1
    assert m.image[(near_breast == 0) & (framing == 0)].max() < 0.05 * 4095


def test_depth_is_12_bits_in_16_or_8_bits():
    deep = _mammogram(bits=12)
    assert deep.image.dtype == np.uint16
    assert 255 < deep.image.max() <= 4095
    assert len(np.unique(deep.image[deep.breast > 0])) > 256
    shallow = _mammogram(bits=8)
    assert shallow.image.dtype == np.uint8
    assert np.abs(shallow.image.astype(int) - deep.image.astype(int) * 255 / 4095).max() <= 1


def test_findings_lie_inside_the_breast_and_off_the_pectoral_muscle():
    for seed in range(6):
        for view in ("CC", "MLO"):
            for label in ("benign", "malignant"):
                m = _mammogram(label, "R" if seed % 2 else "L", view, seed=seed)
                (finding,) = m.findings
                assert finding.severity == ("M" if label == "malignant" else "B")
                x, y = round(finding.x), round(finding.y)
                assert m.breast[y, x] == 1 and m.pectoral[y, x] == 0 and m.mask[y, x] == 1
                assert m.mask.sum() > 0 and (m.mask & (1 - m.breast)).sum() == 0
    assert _mammogram("normal").findings == () and _mammogram("normal").mask.sum() == 0
    # A finding drawn high up near the chest wall is moved down the breast, off the muscle.
    high = BreastParameters("benign", 0.5, 0.3, -1.0, 0.05, calcifications=False)
    for seed in range(4):
        m = make_mammogram(high, phantom_rng(seed, 2), "L", "MLO", 240, 192)
        (finding,) = m.findings
        assert m.mask.sum() > 0 and (m.mask & m.pectoral).sum() == 0
        assert m.breast[int(finding.y), int(finding.x)] == 1


def test_bad_arguments_are_refused():
    breast = draw_breast("benign", phantom_rng(0, 0))
    for kwargs, match in (
        ({"laterality": "left"}, "laterality"),
        ({"view": "ML"}, "view"),
        ({"bits": 16}, "bits"),
        ({"height": 64}, "at least"),
    ):
        args = {"laterality": "L", "view": "CC", **kwargs}
        with pytest.raises(ValueError, match=match):
            make_mammogram(breast, phantom_rng(0, 1), **args)
    with pytest.raises(ValueError, match="label"):
        draw_breast("cancer", phantom_rng(0, 0))
    with pytest.raises(ValueError, match="size >= 104"):
        SynthPlan(size=64, mammo_women=1)


def test_synth_writes_four_views_per_woman_with_truth(tmp_path):
    plan = SynthPlan(n_per_class=1, size=112, seed=5, mammo_women=3, mammo_bits=12)
    samples = [s for s in read_dataset(write_phantom_dataset(tmp_path, plan)) if s.view]
    assert Counter(s.patient_id for s in samples) == {"mg-0000": 4, "mg-0001": 4, "mg-0002": 4}
    for patient in ("mg-0000", "mg-0001", "mg-0002"):
        views = {s.view for s in samples if s.patient_id == patient}
        assert views == {"L-CC", "L-MLO", "R-CC", "R-MLO"}
    # Woman k has class k mod 3 in both views of one breast; her other breast is normal.
    for patient, label in (("mg-0001", "benign"), ("mg-0002", "malignant")):
        by_side = {s.view[0]: [] for s in samples if s.patient_id == patient}
        for s in samples:
            if s.patient_id == patient:
                by_side[s.view[0]].append(s.label)
        assert sorted(map(tuple, by_side.values())) == sorted(
            [("normal", "normal"), (label, label)]
        )
    assert {s.label for s in samples if s.patient_id == "mg-0000"} == {"normal"}
    truth = json.loads((tmp_path / "mammography" / "truth.json").read_text())
    for s in samples:
        record = truth[f"{s.patient_id}/{s.path.name}"]
        assert f"{record['laterality']}-{record['view']}" == s.view
        assert len(record["findings"]) == len(s.findings) == (s.label != "normal")
        image = cv2.imread(str(s.path), cv2.IMREAD_UNCHANGED)
        assert image.dtype == np.uint16 and image.shape == (140, 112) and image.max() <= 4095
        breast = cv2.imread(str(s.path.with_name(record["breast_mask"])), cv2.IMREAD_GRAYSCALE)
        x, y, w, h = record["label_box"]
        assert breast[y : y + h, x : x + w].max() == 0
        wall = 0 if record["chest_wall"] == "left" else -1
        assert breast[:, wall].max() == 255
    again = tmp_path / "again"
    write_phantom_dataset(again, plan)
    name = "mammography/mg-0002/mg-0002_R-MLO.png"
    assert (again / name).read_bytes() == (tmp_path / name).read_bytes()
