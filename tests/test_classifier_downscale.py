"""The classifier reads the gate's copy and the model's resize of a frame from one summed-area
table (or one pass of the native kernel) where the model's input is the frame resized and nothing else (one array where the two
agree), and the model's input and the gate's verdict stay exactly what each stage gives alone."""

import dataclasses

import cv2
import numpy as np
import pytest

from edgebc import area, area_native
from edgebc.backends import open_backend
from edgebc.classifier import FrameClassifier
from edgebc.demo import DEMO_LINEAGE_KEY, DEMO_MODEL
from edgebc.preprocess import preprocess_chw, to_channels
from edgebc.quality import GATE_SIZE, QualityGate, gate_at_size, thumbnail
from edgebc.synth import make_ultrasound_phantom, render_scanner_screen
from edgebc.synth.decoys import make_blank_frame, make_desktop_screen
from edgebc.synth.ultrasound import phantom_rng


class RecordingBackend:
    """The demo model's card with another input size; records each tensor it is given."""

    def __init__(self, side, **preprocess):
        card = open_backend(DEMO_MODEL).card
        inputs = tuple(
            dataclasses.replace(i, preprocess=dataclasses.replace(
                i.preprocess, input_height=side, input_width=side, **preprocess))
            for i in card.inputs
        )  # fmt: skip
        lineage = {k: v for k, v in card.lineage.items() if k != DEMO_LINEAGE_KEY}
        self.card = dataclasses.replace(card, inputs=inputs, lineage=lineage)
        self.model_sha256 = "ab" * 32
        self.name = "recording"  # the Backend protocol's runtime name
        self.tensors = []

    def run(self, tensors):
        self.tensors.append(tensors.copy())
        return np.tile(np.array([[0.2, 0.3, 0.5]], np.float32), (len(tensors), 1))


def screen(k):
    phantom = make_ultrasound_phantom("malignant", phantom_rng(5, k), 400, 480).image
    frame, region = render_scanner_screen(phantom, phantom_rng(5, 100 + k), 1080, 1920)
    return frame, region


@pytest.fixture
def passes(monkeypatch):
    """Counts the passes over a full-size frame that downscale it: summed-area tables
    (edgebc.area's numpy path), the native kernel's passes and cv2.resize calls."""
    area.native_kernel_status()  # its check on first use makes passes of its own
    calls = []
    for name in ("integral", "resize"):
        original = getattr(cv2, name)

        def counting(image, *args, _original=original, **kwargs):
            calls.append(image.shape)
            return _original(image, *args, **kwargs)

        monkeypatch.setattr(cv2, name, counting)
    native = area_native.Kernel.downscale

    def counting_native(self, image, grids):
        calls.append(image.shape)
        return native(self, image, grids)

    monkeypatch.setattr(area_native.Kernel, "downscale", counting_native)
    return calls


@pytest.mark.parametrize(
    ("side", "gate_size"), [(GATE_SIZE, GATE_SIZE), (224, GATE_SIZE), (224, 224), (128, GATE_SIZE)]
)
def test_one_table_for_the_gate_and_the_model_and_the_same_answers(passes, side, gate_size):
    for k in range(3):
        frame, region = screen(k)
        backend = RecordingBackend(side)
        gate = gate_at_size(gate_size)
        passes.clear()
        decision = FrameClassifier(backend, region, gate=gate).classify(frame)
        assert len(passes) == 1
        crop = region.crop(frame)
        assert decision.quality == gate.check(crop) and decision.quality.ok
        want = preprocess_chw(to_channels(crop, 1), backend.card.preprocess)
        assert backend.tensors[0].shape == (1, *want.shape)
        assert np.array_equal(backend.tensors[0][0], want)  # bit for bit


def test_refused_frames_get_the_gates_own_verdict_and_no_inference():
    backend = RecordingBackend(GATE_SIZE)
    classifier = FrameClassifier(backend)
    for frame in (make_blank_frame(phantom_rng(8, 1)), make_desktop_screen(phantom_rng(9, 1))):
        decision = classifier.classify(frame)
        assert decision.quality == QualityGate().check(frame) and not decision.quality.ok
    assert backend.tensors == []


def test_steps_before_the_resize_keep_each_stage_on_its_own_copy(passes):
    frame, region = screen(0)
    backend = RecordingBackend(GATE_SIZE, appearance="stretch")
    classifier = FrameClassifier(backend, region)
    passes.clear()
    classifier.classify(frame)
    assert len(passes) == 2  # the model's input is not the grey crop resized: no sharing
    want = preprocess_chw(to_channels(region.crop(frame), 1), backend.card.preprocess)
    assert np.array_equal(backend.tensors[0][0], want)


def test_the_gate_given_its_copy_judges_as_it_does_alone():
    frames = [screen(k)[0] for k in range(2)] + [make_desktop_screen(phantom_rng(9, 2))]
    frames += [make_ultrasound_phantom("benign", phantom_rng(6, k), 300, 500).image for k in range(3)]  # fmt: skip
    for size in (GATE_SIZE, 224):
        gate = gate_at_size(size)
        for frame in frames:
            grey = to_channels(frame, 1)
            assert gate.check(frame, grey, thumbnail(grey, size)) == gate.check(frame)
    big = screen(0)[0]
    with pytest.raises(ValueError, match="224 px on its long side"):
        gate_at_size(224).check(big, None, thumbnail(to_channels(big, 1), 256))


def test_the_gate_size_is_no_setting_and_another_is_only_made_on_purpose():
    assert "size" not in dataclasses.asdict(QualityGate())  # limits were measured at GATE_SIZE
    other = gate_at_size(224, min_std=7.0)
    assert other.size == 224 and other.min_std == 7.0 and QualityGate().size == GATE_SIZE


@pytest.mark.parametrize("size", [16, 0, 224.0, True])
def test_a_gate_size_that_is_not_a_sensible_whole_number_is_refused(size):
    with pytest.raises(ValueError, match="quality gate size"):
        gate_at_size(size)


@pytest.mark.parametrize("shape", [(213, 256), (200, 240), (150, 180), (224, 300)])
def test_crops_at_or_under_a_size_get_the_same_copies_as_alone(passes, shape):
    """A crop already at the gate's size (its copy is the crop), between the two sizes, under
    both (the model's resize enlarges: OpenCV's), and one the model's size on one side."""
    frame = make_ultrasound_phantom("benign", phantom_rng(7, shape[0]), *shape).image
    backend = RecordingBackend(224)
    passes.clear()
    decision = FrameClassifier(backend).classify(frame)
    assert len(passes) <= 1  # one table, or OpenCV's one resize where it enlarges
    assert decision.quality == QualityGate().check(frame) and decision.quality.ok
    want = preprocess_chw(to_channels(frame, 1), backend.card.preprocess)
    assert np.array_equal(backend.tensors[0][0], want)
