"""The embedded demo model loads with no torch, passes its manifest, and beats chance on fresh phantoms."""

import numpy as np

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
