"""The embedded demo model loads with no torch, passes its manifest, and beats chance on fresh phantoms."""

import numpy as np
import pytest

from edgebc.backends import open_backend
from edgebc.classifier import FrameClassifier
from edgebc.demo import DEMO_MODEL
from edgebc.metrics import roc_auc
from edgebc.synth import make_ultrasound_phantom
from edgebc.synth.ultrasound import phantom_rng


def test_demo_model_is_shipped_verified_and_useful():
    assert DEMO_MODEL.is_file() and DEMO_MODEL.stat().st_size < 5_000_000  # "a few MB at most"
    backend = open_backend(DEMO_MODEL)  # checks MANIFEST.sha256 beside it
    card = backend.card
    assert card.name == "demo-phantom" and card.class_names == ("normal", "benign", "malignant")
    assert card.threshold is not None and card.preprocess.input_shape == (1, 128, 128)
    classifier = FrameClassifier(backend)
    labels, scores = [], []
    for k in range(60):  # a seed the demo model never saw
        label = ("normal", "benign", "malignant")[k % 3]
        decision = classifier.classify(
            make_ultrasound_phantom(label, phantom_rng(31337, k), 160, 160).image
        )
        labels.append(label == "malignant")
        scores.append(decision.positive_probability)
    assert roc_auc(np.array(labels), np.array(scores)) > 0.75


def _busi_frames(data_dir, per_class=12):
    import cv2

    root = data_dir / "busi" / "Dataset_BUSI_with_GT"
    for label in ("normal", "benign", "malignant"):
        paths = sorted(p for p in (root / label).glob("*.png") if "_mask" not in p.name)
        for path in paths[:per_class]:
            yield label, cv2.imread(str(path), cv2.IMREAD_UNCHANGED)


@pytest.mark.data
def test_the_demo_refuses_real_breast_ultrasound_and_still_decides_on_its_phantoms(data_dir):
    """The demo was made from phantoms only: real patients' frames get no benign or malignant
    label from it (it withdraws them as unlike its training frames, whatever `shift` says), while
    the phantoms it was made for still get decisions; every answer says it came from the demo."""
    from edgebc.classifier_settings import ClassifierSettings, build_classifier

    for shift in ("withdraw", "off"):  # "off" is not for the demo: it withdraws all the same
        classifier = build_classifier(ClassifierSettings(shift=shift))
        real = [classifier.classify(image) for _, image in _busi_frames(data_dir)]
        assert len(real) == 36 and all(d.demo for d in real)
        assert [d.label for d in real if d.label is not None] == [], shift
        assert sum(d.quality.check == "shift" for d in real) >= 30  # refused as unlike its phantoms
    classifier.reset_stream()  # a new stream: the real frames' window is over
    phantoms = [classifier.classify(make_ultrasound_phantom(label, phantom_rng(4242, k), 160, 160).image)
                for k, label in enumerate(("normal", "benign", "malignant") * 10)]  # fmt: skip
    assert sum(d.label is not None for d in phantoms) == 30 and all(d.demo for d in phantoms)
