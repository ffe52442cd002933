"""The quality gate: it refuses blank frames, screens, documents and mammograms with a reason, and
lets B-mode through as scanners other than the phantom's deliver it (black margins, dim depth)."""

import dataclasses
import importlib
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from edgebc.quality import CHECKS, QualityGate, speckle_statistics
from edgebc.synth import make_ultrasound_phantom
from edgebc.synth.decoys import (
    jpeg,
    make_blank_frame,
    make_desktop_screen,
    make_document,
    with_black_margins,
    with_dim_depth,
)
from edgebc.synth.ultrasound import phantom_rng, phantom_stills

REPO = Path(__file__).resolve().parents[1]
TOOLS = REPO / "tools"


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


def test_flat_is_judged_relative_to_the_pixels_own_brightness():
    """A 3x3 spread of half a grey level is flat on a bright page (0.2 % of its level) but not in a
    dim shadow (2 %): the left half (grey 20/21) is not flat, the right half (200/201) is."""
    checker = (np.indices((64, 64)).sum(axis=0) % 2).astype(np.uint8)
    image = np.hstack([20 + checker, 200 + checker])
    flat, contrast = speckle_statistics(image)
    values = image.astype(np.float64)
    padded = np.pad(values, 1, mode="reflect")  # OpenCV's default border for cv2.blur
    windows = np.lib.stride_tricks.sliding_window_view(padded, (3, 3))
    ratio = windows.std(axis=(2, 3)) / (windows.mean(axis=(2, 3)) + 1.0)
    assert flat == pytest.approx(np.mean(ratio < 0.01), abs=1e-6)
    assert flat == pytest.approx(0.5, abs=0.01)  # the bright half, edges aside
    assert contrast == pytest.approx(np.median(ratio), abs=1e-4)
    old_rule_flat = windows.std(axis=(2, 3)) < 1.0  # spread under one grey level, at any level
    assert old_rule_flat[:, :63].all() and old_rule_flat[:, 65:].all()  # both halves, seam aside


def test_bmode_framed_by_wide_black_margins_passes():
    gate = QualityGate()
    for k, frame in enumerate(phantom_stills(30, seed=31, size=200)[0]):
        framed = with_black_margins(frame, phantom_rng(32, k))
        assert framed.shape[0] >= 1.2 * frame.shape[0] and framed.shape[1] >= 1.2 * frame.shape[1]
        assert gate.check(framed).ok, gate.check(framed)


def test_bmode_fading_into_a_dim_smoothed_jpeg_depth_passes():
    """BUS-BRA's Toshiba and Logiq frames below a lesion: the gate once called their dim floor
    flat (spread under one grey level) and refused a third of the Toshiba frames."""
    gate = QualityGate()
    for k, frame in enumerate(phantom_stills(30, seed=33, size=256)[0]):
        faded = with_dim_depth(frame, phantom_rng(34, k))
        bottom = faded[-faded.shape[0] // 6 :]
        assert 10 <= bottom.mean() <= 40  # the depth really is dim
        assert gate.check(faded).ok, gate.check(faded)


def test_screens_documents_and_blank_frames_are_refused_as_captured():
    gate = QualityGate()
    rng = np.random.default_rng(35)
    screens = [make_desktop_screen(rng) for _ in range(10)] + [make_document(rng) for _ in range(4)]
    for picture in screens + [jpeg(s, 75) for s in screens]:
        verdict = gate.check(picture)
        assert not verdict.ok and verdict.check in ("flat", "bright"), verdict
    for k in range(100):
        verdict = gate.check(make_blank_frame(phantom_rng(36, k)))
        assert not verdict.ok and verdict.check == "uniform", verdict


def test_every_refusal_names_its_check():
    gate = QualityGate()
    rng = np.random.default_rng(37)
    doppler = cv2.cvtColor(_phantom(), cv2.COLOR_GRAY2BGR)
    doppler[20:60, 20:60] = (0, 0, 255)
    refused = {
        "uniform": np.full((64, 64), 90, np.uint8),
        "dark": rng.exponential(7.0, (64, 64)).astype(np.uint8),
        "bright": 255 - rng.exponential(7.0, (64, 64)).astype(np.uint8),
        "colour": doppler,
        "flat": make_document(rng),
        "speckle": cv2.GaussianBlur(_phantom(), (0, 0), 2),
    }
    assert set(refused) == set(CHECKS)
    for check, picture in refused.items():
        verdict = gate.check(picture)
        assert not verdict.ok and verdict.check == check, (check, verdict)
    assert gate.check(_phantom()).check is None


def test_the_archive_job_config_lists_the_gates_defaults():
    """deploy/configs/archive-batch.yaml says its quality keys are the gate's defaults."""
    config = yaml.safe_load((REPO / "deploy" / "configs" / "archive-batch.yaml").read_text())
    assert config["quality"] == dataclasses.asdict(QualityGate())


def measure_tool():
    """tools/measure_quality_gate.py, imported as a module (it is a script beside the package)."""
    if str(TOOLS) not in sys.path:
        sys.path.append(str(TOOLS))
    return importlib.import_module("measure_quality_gate")


def test_the_measurement_judges_every_scanner_on_its_own():
    """3 % refused on one scanner misses the goal even when the site as a whole stays under 2 %."""
    tool = measure_tool()
    gate = QualityGate()
    good, bad = _phantom(0, 128), make_document(np.random.default_rng(38))
    scanner_a = tool.FrameSet(
        tool.ULTRASOUND, "site", "A", lambda: [("a", good)] * 97 + [("x", bad)] * 3
    )
    scanner_b = tool.FrameSet(tool.ULTRASOUND, "site", "B", lambda: [("b", good)] * 100)
    blank = tool.FrameSet(tool.BLANK, "synthetic", "blank", lambda: [("0", np.zeros((64, 64)))])
    sets = [tool.tally(s, gate) for s in (scanner_a, scanner_b, blank)]
    assert scanner_a.refused == {"flat": 3} and scanner_a.refused_share == 0.03
    assert scanner_b.refused_share == 0.0 and blank.refused == {"uniform": 1}
    assert tool.site_totals(sets) == ["site: 200 frames, refused 3 (1.5%)"]
    (us_met, us_text), (blank_met, _) = tool.goals(sets)
    assert not us_met and "worst: site / A, 3.0%" in us_text and blank_met
    assert all(met for met, _ in tool.goals([scanner_b, blank]))


@pytest.mark.data
@pytest.mark.slow
def test_every_real_scanner_passes_and_mammograms_are_refused(data_dir):
    """Issue 16's goals on the real data: at most 2 % of every scanner's B-mode frames refused
    (BUSI's GE LOGIQ E9, BUS-BRA's four, and each site through JPEG), at least 95 % of mini-MIAS."""
    tool = measure_tool()
    gate = QualityGate()
    sets = [tool.tally(s, gate) for s in tool.real_sets(data_dir)]
    scanners = {s.name for s in sets if s.site == tool.BUSBRA_SITE}
    assert {"GE Logiq 5 @10-12MHz", "GE Logiq 7 @10-14MHz"} <= scanners
    ultrasound = [s for s in sets if s.kind == tool.ULTRASOUND]
    assert {s.site for s in ultrasound} == {tool.BUSI_SITE, tool.BUSBRA_SITE}
    for s in ultrasound:
        assert s.total >= 15 and s.refused_share <= 0.02, (s.site, s.name, s.refused)
    (mias,) = [s for s in sets if s.kind == tool.NOT_ULTRASOUND]
    assert mias.total >= 250 and mias.refused_share >= 0.95, mias.refused
