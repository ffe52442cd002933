"""Phantoms: deterministic, masked, described by BI-RADS terms that differ by class, and written to disk."""

import itertools
from collections import Counter

import cv2
import numpy as np
import pytest

from edgebc.data import read_dataset
from edgebc.synth import make_cine, make_mammo_phantom, make_ultrasound_phantom
from edgebc.synth.dataset import SynthPlan, write_phantom_dataset
from edgebc.synth.ultrasound import phantom_rng


def test_same_seed_same_phantom_other_seed_other_phantom():
    a = make_ultrasound_phantom("malignant", phantom_rng(1, 2), 96, 128)
    b = make_ultrasound_phantom("malignant", phantom_rng(1, 2), 96, 128)
    c = make_ultrasound_phantom("malignant", phantom_rng(1, 3), 96, 128)
    np.testing.assert_array_equal(a.image, b.image)
    assert not np.array_equal(a.image, c.image)
    assert a.image.shape == (96, 128) and a.image.dtype == np.uint8


def test_lesion_is_darker_than_its_surroundings_and_masked():
    contrasts = []
    for k in range(12):
        p = make_ultrasound_phantom("benign", phantom_rng(7, k), 160, 160)
        assert p.mask.sum() > 50
        ring = cv2.dilate(p.mask, np.ones((15, 15), np.uint8)) - p.mask
        contrasts.append(p.image[ring > 0].mean() - p.image[p.mask > 0].mean())
    assert np.median(contrasts) > 20  # hypo/anechoic lesions, as BI-RADS describes them
    normal = make_ultrasound_phantom("normal", phantom_rng(7, 0), 160, 160)
    assert normal.mask.sum() == 0 and normal.lesion is None


def test_descriptors_follow_birads_tendencies_with_overlap():
    benign = [
        make_ultrasound_phantom("benign", phantom_rng(8, k), 64, 64).lesion for k in range(200)
    ]
    malignant = [
        make_ultrasound_phantom("malignant", phantom_rng(9, k), 64, 64).lesion for k in range(200)
    ]
    share = lambda items, field, value: np.mean([getattr(i, field) == value for i in items])
    assert (
        share(benign, "orientation", "parallel") > 0.8 > share(malignant, "orientation", "parallel")
    )
    assert (
        share(malignant, "posterior", "shadowing") > 0.45 > share(benign, "posterior", "shadowing")
    )
    assert (
        share(benign, "margin", "circumscribed") > 0.6
        and share(malignant, "margin", "circumscribed") == 0
    )
    # Not trivially separable: each class has members that look like the other on a descriptor.
    assert (
        share(malignant, "orientation", "parallel") > 0
        and share(benign, "posterior", "shadowing") > 0
    )


def test_cine_moves_smoothly_and_never_repeats_a_frame():
    frames, masks = make_cine("benign", phantom_rng(3, 3), frames=12, height=96, width=128)
    assert len(frames) == len(masks) == 12
    diffs = [np.abs(a.astype(int) - b).mean() for a, b in itertools.pairwise(frames)]
    assert min(diffs) > 0.5  # fresh noise each frame
    assert np.abs(frames[0].astype(int) - frames[-1]).mean() > max(diffs)  # the probe travelled


def test_mammo_phantom_findings_sit_on_the_mass():
    p = make_mammo_phantom("malignant", phantom_rng(4, 4), 256)
    (finding,) = p.findings
    assert p.mask[int(finding.y), int(finding.x)] == 1
    assert make_mammo_phantom("normal", phantom_rng(4, 5), 128).findings == ()


def test_dataset_writer_is_complete_and_readable(tmp_path):
    plan = SynthPlan(
        n_per_class=3, size=64, seed=2, modality="both", screens=2, cine_per_class=1, cine_frames=5
    )
    manifest = write_phantom_dataset(tmp_path, plan)
    samples = read_dataset(manifest)
    assert Counter((s.modality, s.label) for s in samples) == {
        (m, c): 3 for m in ("us", "mammo") for c in ("normal", "benign", "malignant")
    }
    assert all(s.path.is_file() and s.masks[0].is_file() for s in samples)
    capture = cv2.VideoCapture(str(tmp_path / "cine" / "benign_00.avi"))
    count = 0
    while capture.read()[0]:
        count += 1
    assert count == 5
    assert len(list((tmp_path / "cine" / "benign_00").glob("frame_*.png"))) == 5
    assert (tmp_path / "screens" / "regions.json").is_file()
    again = tmp_path / "again"
    write_phantom_dataset(again, plan)
    assert (again / "us/benign/benign_0002.png").read_bytes() == (
        tmp_path / "us/benign/benign_0002.png"
    ).read_bytes()


def test_synth_plan_rejects_nonsense():
    with pytest.raises(ValueError, match="n_per_class"):
        SynthPlan(n_per_class=0)
