"""The imaging-region detector finds the B-mode image on synthetic scanner screens."""

import numpy as np
import pytest

from edgebc.region import Region, detect_imaging_region
from edgebc.synth import make_ultrasound_phantom, render_scanner_screen
from edgebc.synth.ultrasound import phantom_rng


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize(("height", "width"), [(1080, 1920), (480, 640)])
def test_detector_finds_the_image_on_a_cluttered_screen(seed, height, width):
    label = ("normal", "benign", "malignant")[seed % 3]
    phantom = make_ultrasound_phantom(label, phantom_rng(seed, 0), 200, 240)
    screen, truth = render_scanner_screen(phantom.image, phantom_rng(seed, 1), height, width)
    found = detect_imaging_region(screen)
    assert found is not None
    assert found.iou(truth) >= 0.9, (found, truth)


def test_blank_or_menu_only_screen_gives_no_region():
    assert detect_imaging_region(np.zeros((480, 640, 3), np.uint8)) is None
    screen, _ = render_scanner_screen(
        np.zeros((10, 10), np.uint8), np.random.default_rng(0), 480, 640
    )
    assert detect_imaging_region(screen) is None


def test_full_frame_image_is_the_whole_frame():
    frame = make_ultrasound_phantom("benign", phantom_rng(9, 9), 240, 320).image
    found = detect_imaging_region(frame)
    assert found is not None and found.iou(Region(0, 0, 320, 240)) > 0.95


def test_region_validation_and_iou():
    with pytest.raises(ValueError, match="positive size"):
        Region(0, 0, 0, 5)
    with pytest.raises(ValueError, match="must not be negative"):
        Region(-1, 0, 5, 5)
    assert Region(0, 0, 10, 10).iou(Region(5, 0, 10, 10)) == pytest.approx(50 / 150)
