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

from edgebc.data.fingerprint import chroma_spread
from edgebc.quality import (
    CHECKS,
    MAMMOGRAPHY_CHECKS,
    MammographyGate,
    QualityGate,
    breast_texture,
    level_spread,
    speckle_statistics,
    subsample,
)
from edgebc.synth import make_ultrasound_phantom
from edgebc.synth.decoys import (
    jpeg,
    make_blank_frame,
    make_desktop_screen,
    make_document,
    with_black_margins,
    with_dim_depth,
)
from edgebc.synth.screen import render_scanner_screen
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
    """deploy/configs/archive-batch.yaml says its keys of both gates are their defaults."""
    config = yaml.safe_load((REPO / "deploy" / "configs" / "archive-batch.yaml").read_text())
    assert config["quality"] == dataclasses.asdict(QualityGate())
    assert config["mammography_quality"] == dataclasses.asdict(MammographyGate())


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


# -- the mammography gate (issue 20) -----------------------------------------------------------


def _mammogram(k=0, bits=12, view="MLO", side="L", height=640, width=512):
    from edgebc.synth.mammogram import draw_breast, make_mammogram

    rng = phantom_rng(50 + bits, k)
    breast = draw_breast(("normal", "benign", "malignant")[k % 3], rng)
    return make_mammogram(breast, rng, side, view, height, width, bits).image


@pytest.mark.parametrize("bits", [8, 12])
def test_mammogram_phantoms_pass_the_mammography_gate_at_8_and_12_bits(bits):
    gate = MammographyGate()
    for k in range(12):
        image = _mammogram(k, bits, ("CC", "MLO")[k % 2], "LR"[(k // 2) % 2])
        assert image.dtype == (np.uint16 if bits == 12 else np.uint8)
        assert bits == 8 or 256 <= image.max() <= 4095  # 12-bit values, never shifted
        verdict = gate.check(image)
        assert verdict.ok and verdict.check is None, (k, verdict)


def test_the_ultrasound_gate_refuses_mammograms_and_the_mammography_gate_ultrasound():
    """The two gates are mirror images on the two modalities' phantoms."""
    us, mg = QualityGate(), MammographyGate()
    for k in range(6):
        assert us.check(_phantom(k, 256)).ok and not mg.check(_phantom(k, 256)).ok
        verdict = mg.check(_phantom(k, 256))
        assert verdict.check == "ultrasound" and "speckle" in verdict.reason, verdict
    assert not us.check(to_grey_uint8_scaled(_mammogram(0, 8))).ok


def to_grey_uint8_scaled(image):
    return image if image.dtype == np.uint8 else (image >> 4).astype(np.uint8)


def test_the_mammography_gate_refuses_each_wrong_input_with_its_check():
    gate = MammographyGate()
    rng = np.random.default_rng(51)
    film = _mammogram(1, 12)
    clipped = film.copy()
    clipped[film > np.percentile(film[film > 0], 40)] = 4095  # 60 % of the breast at the top level
    label_only = np.zeros((640, 512), np.uint16)
    label_only[20:40, 400:480] = 3000  # a film label on an empty film: no breast
    screen = render_scanner_screen(_phantom(2, 256), rng, 720, 1280)[0]
    colour_photo = cv2.cvtColor(film.astype(np.float32) / 4095.0, cv2.COLOR_GRAY2BGR)
    colour_photo = (colour_photo * 255).astype(np.uint8)
    colour_photo[100:500, 100:400] = (40, 160, 220)
    refused = {
        "uniform": [
            np.full((640, 512), 2000, np.uint16) + rng.integers(0, 9, (640, 512), np.uint16),
            make_blank_frame(phantom_rng(52, 0)),
        ],
        "bit_depth": [
            (film >> 8).astype(np.uint8),  # a 12-bit film shifted into 8 bits: 0..15
            (film >> 4).astype(np.uint16),  # an 8-bit image stored in 16 bits
        ],
        "saturated": [clipped],
        "colour": [colour_photo],
        "no_breast": [label_only],
        "flat": [make_document(rng), make_desktop_screen(rng)],
        "ultrasound": [_phantom(3, 256), screen, with_black_margins(_phantom(4, 200), rng)],
    }
    assert set(refused) == set(MAMMOGRAPHY_CHECKS)
    for check, pictures in refused.items():
        for picture in pictures:
            verdict = gate.check(picture)
            assert not verdict.ok and verdict.check == check, (check, verdict)
            assert verdict.reason
    assert gate.check(film).ok and gate.check((film >> 4).astype(np.uint8)).ok


def test_the_mammography_gate_judges_a_grey_copy_in_its_own_dtype():
    """The classifier hands the gate the grey frame it converted; uint16 stays uint16, so the
    verdict on a 12-bit film is the same from the BGR frame and from its grey copy."""
    gate = MammographyGate()
    film = _mammogram(2, 12)
    bgr = cv2.cvtColor(film, cv2.COLOR_GRAY2BGR)
    assert gate.check(bgr).ok and gate.check(bgr, film).ok
    assert not gate.check(bgr, (film >> 8).astype(np.uint8)).ok


@pytest.fixture(scope="module")
def models_by_modality(tmp_path_factory):
    """The embedded demo model under two cards: input modality us and mg, neither marked the demo."""
    from tests.helpers import demo_model_as

    folder = tmp_path_factory.mktemp("modality")
    return {modality: demo_model_as(folder, modality, modality) for modality in ("us", "mg")}


def test_a_classifier_gates_by_its_cards_input_modality(models_by_modality):
    from edgebc.backends import open_backend
    from edgebc.classifier import FrameClassifier

    us_gate, mg_gate = QualityGate(min_std=7.0), MammographyGate(min_std=3.0)
    us = FrameClassifier(open_backend(models_by_modality["us"]), None, us_gate)
    mg = FrameClassifier(
        open_backend(models_by_modality["mg"]), None, us_gate, mammography_gate=mg_gate
    )
    assert us.card.inputs[0].modality == "us" and mg.card.inputs[0].modality == "mg"
    assert us.gate is us_gate and mg.gate is mg_gate
    # handed the other's gate (an upload classifier made from the live one) it keeps its kind
    assert FrameClassifier(mg.backend, None, mg.gate).gate is mg_gate
    assert isinstance(FrameClassifier(us.backend, None, mg.gate).gate, QualityGate)
    assert isinstance(FrameClassifier(mg.backend).gate, MammographyGate)
    film, bmode = _mammogram(0, 12), _phantom(0, 256)
    mg_film, mg_bmode = mg.classify_batch([film, bmode])
    assert mg_film.quality.ok and mg_film.quality.check is None
    assert not mg_bmode.quality.ok and mg_bmode.quality.check == "ultrasound"
    assert mg_bmode.label is None
    us_film, us_bmode = us.classify_batch([(film >> 4).astype(np.uint8), bmode])
    assert not us_film.quality.ok and us_film.quality.check in ("speckle", "flat")
    assert us_bmode.quality.ok


def test_build_classifier_gives_an_mg_model_the_mammography_settings(models_by_modality):
    from edgebc.classifier_settings import ClassifierSettings, build_classifier

    mg_gate = MammographyGate(max_speckle_contrast=0.06)
    settings = ClassifierSettings(str(models_by_modality["mg"]), mammography_quality=mg_gate)
    assert build_classifier(settings).gate is mg_gate
    settings = ClassifierSettings(str(models_by_modality["us"]), mammography_quality=mg_gate)
    assert build_classifier(settings).gate is settings.quality


def test_smoothed_bmode_filling_the_frame_is_refused_by_its_side_to_side_speckle():
    """BUSI's three most smoothed frames (speckle reduction, contrast 0.046-0.050) come under the
    plain speckle limit; a scan fills the frame from side to side, a breast lies against one side."""
    gate = MammographyGate()
    for k in range(3):
        smoothed = cv2.GaussianBlur(_phantom(k, 256), (0, 0), 2.5)
        texture = breast_texture(smoothed)
        assert gate.max_side_to_side_contrast < texture.speckle_contrast
        assert texture.speckle_contrast < gate.max_speckle_contrast and texture.side_cover > 0.9
        verdict = gate.check(smoothed)
        assert verdict.check == "ultrasound" and "side to side" in verdict.reason, verdict
        assert MammographyGate(min_side_cover=1.01).check(smoothed).ok  # the side rule refused it
    for k in range(4):  # mammograms lie against one side edge at most
        assert breast_texture(_mammogram(k, 12, "CC", "LR"[k % 2])).side_cover == 0.0


def test_the_measurement_holds_the_mammography_gate_to_its_own_goals():
    tool = measure_tool()
    gate, mg_gate = QualityGate(), MammographyGate()
    films = [(f"film {k}", _mammogram(k, 12)) for k in range(4)]
    mammograms = tool.FrameSet(tool.NOT_ULTRASOUND, "s", "films", lambda: films, mammograms=True)
    bmode = tool.FrameSet(tool.ULTRASOUND, "s", "scans", lambda: [("b", _phantom(0, 256))] * 3)
    sets = [tool.tally(s, gate, mg_gate) for s in (mammograms, bmode)]
    assert mammograms.mg_refused_share == 0.0 and bmode.mg_refused == {"ultrasound": 3}
    assert len(mammograms.mg_contrast) == 4 and max(mammograms.mg_contrast) < 0.052
    assert all(met for met, _ in tool.mg_goals(sets))
    shifted = [(name, (film >> 8).astype(np.uint8)) for name, film in films]
    bad = tool.FrameSet(tool.NOT_ULTRASOUND, "s", "shifted", lambda: shifted, mammograms=True)
    tool.tally(bad, gate, mg_gate)
    assert bad.mg_refused == {"bit_depth": 4}
    (met, text), _ = tool.mg_goals([bad, bmode])
    assert not met and "worst: s / shifted, 100.0%" in text


@pytest.mark.data
@pytest.mark.slow
def test_the_mammography_gate_passes_mini_mias_and_refuses_real_bmode(data_dir):
    """Issue 20's goals on the real data: at most 2 % of mini-MIAS refused by the mammography
    gate, at least 95 % of every BUSI and BUS-BRA scanner's frames."""
    tool = measure_tool()
    sets = [s for s in tool.real_sets(data_dir) if not s.recaptured]
    for s in sets:
        tool.tally(s, QualityGate(), MammographyGate())
    (mias,) = [s for s in sets if s.mammograms]
    assert mias.total >= 250 and mias.mg_refused_share <= 0.02, mias.mg_refused_names
    scanners = [s for s in sets if s.kind == tool.ULTRASOUND]
    assert len(scanners) >= 5
    for s in scanners:
        assert s.mg_refused_share >= 0.95 and set(s.mg_refused) == {"ultrasound"}, (
            s.name,
            s.mg_refused,
        )
    assert all(met for met, _ in tool.mg_goals(sets))


def test_level_spread_is_numpys_mean_exactly_and_its_std_to_the_last_bits():
    frames = [
        make_ultrasound_phantom("benign", phantom_rng(41, k), 213, 256).image for k in range(4)
    ]
    frames.append(np.full((50, 60), 8, np.uint8))  # a whole-number mean right at the gate's limit
    frames.append(np.tile(np.array([0, 16], np.uint8), (40, 30)))  # mean 8, spread 8
    for grey in frames:
        std, mean = level_spread(grey)
        assert mean == float(grey.mean())
        assert std == pytest.approx(float(grey.std()), rel=1e-12, abs=1e-12)
    assert level_spread(np.full((50, 60), 8, np.uint8)) == (0.0, 8.0)


@pytest.mark.parametrize("channels", [3, 4])
def test_chroma_spread_of_a_strided_sample_is_each_pixels_channel_range(channels):
    # the gate's colour test reads every k-th pixel of a crop of a capture frame: a strided view
    # that chroma_spread copies as 3-byte units; each pixel's max - min of B, G, R either way
    rng = np.random.default_rng(4)
    frame = rng.integers(0, 256, (200, 300, channels), dtype=np.uint8)
    sample = subsample(frame[13:190, 21:290], 32)[:, :, :3]
    assert not sample.flags.c_contiguous
    expected = sample.max(axis=2) - sample.min(axis=2)
    np.testing.assert_array_equal(chroma_spread(sample), expected)
    np.testing.assert_array_equal(chroma_spread(np.ascontiguousarray(sample)), expected)


def test_a_grey_frame_with_a_channel_axis_is_judged_like_one_without():
    # (H, W, 1) frames, which to_grey_uint8 accepts, crashed the colour test
    frame = make_ultrasound_phantom("benign", phantom_rng(41, 0)).image
    assert QualityGate().check(frame[:, :, None]) == QualityGate().check(frame)
    assert QualityGate().check(frame[:, :, None]).ok
