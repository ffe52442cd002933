"""The quality gate: it refuses blank, dark, bright and colour frames, screens, documents and smooth
pictures with a reason, and lets ultrasound through."""

import cv2
import numpy as np
import pytest

from edgebc.quality import QualityGate
from edgebc.synth import make_ultrasound_phantom
from edgebc.synth.ultrasound import phantom_rng


def _phantom(k=0, size=96):
    return make_ultrasound_phantom(
        ("normal", "benign", "malignant")[k % 3], phantom_rng(21, k), size, size
    ).image


def test_quality_gate_refuses_blank_dark_and_colour_frames_with_reasons():
    gate = QualityGate()
    assert gate.check(_phantom()).ok
    assert "blank or uniform" in gate.check(np.full((64, 64), 90, np.uint8)).reason
    dark = (
        np.random.default_rng(0).exponential(7.0, (64, 64)).astype(np.uint8)
    )  # textured but nearly black
    assert "too dark" in gate.check(dark).reason
    doppler = cv2.cvtColor(_phantom(), cv2.COLOR_GRAY2BGR)
    doppler[20:60, 20:60] = (0, 0, 255)
    assert "colour overlay covers" in gate.check(doppler).reason


def test_quality_gate_refuses_screens_documents_and_smooth_pictures_but_not_ultrasound():
    from edgebc.synth import make_cine
    from edgebc.synth.decoys import make_desktop_screen, make_document
    from edgebc.synth.ultrasound import phantom_rng

    gate = QualityGate()
    rng = np.random.default_rng(1)
    decoys = [make_desktop_screen(rng) for _ in range(6)] + [
        make_desktop_screen(rng, 1080, 1920),
        make_document(rng),
    ]
    reasons = [gate.check(decoy).reason for decoy in decoys]
    assert all(reasons), (
        reasons
    )  # every one refused: flat (not ultrasound), or washed out when bright
    assert sum("does not look like B-mode ultrasound" in r and "flat" in r for r in reasons) >= 3, (
        reasons
    )
    smooth = cv2.GaussianBlur(_phantom(), (0, 0), 2)  # film-like: structure without speckle
    assert "no speckle texture" in gate.check(smooth).reason
    for label in ("normal", "benign", "malignant"):
        frames, _ = make_cine(label, phantom_rng(4, 1), 6, 256, 256)
        assert all(gate.check(frame).ok for frame in frames)
        assert gate.check(cv2.resize(frames[0], (1024, 1024))).ok  # scaled up: judged at 256 px


@pytest.mark.parametrize("size", [1, 2, 3, 10, 4097, 50000])
def test_quality_median_is_numpys_median(size):
    from edgebc.quality import median

    values = np.random.default_rng(size).random(size).astype(np.float32)
    assert median(values) == pytest.approx(float(np.median(values.astype(np.float64))), abs=1e-7)
