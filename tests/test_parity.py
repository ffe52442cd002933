"""Train and runtime produce the same tensor for the same frame: one preprocessing, no copy of it."""

import cv2
import numpy as np
import pytest

from edgebc.data import Sample
from edgebc.decode import read_image
from edgebc.preprocess import PreprocessCard, preprocess
from edgebc.synth import make_ultrasound_phantom
from edgebc.synth.ultrasound import phantom_rng
from edgebc.task import TASKS

torch = pytest.importorskip("torch", reason="torch (the [train] extra) is not installed")


@pytest.mark.parametrize(
    "card",
    [
        PreprocessCard(),
        PreprocessCard.imagenet_rgb(160, 192, resize="stretch"),
        PreprocessCard(appearance="equalise"),
        PreprocessCard.imagenet_rgb(appearance="stretch"),
    ],
)
def test_training_dataset_tensor_equals_runtime_tensor(tmp_path, card):
    from edgebc.train.dataset import SampleDataset

    path = tmp_path / "frame.png"
    cv2.imwrite(str(path), make_ultrasound_phantom("malignant", phantom_rng(0, 0), 300, 420).image)
    dataset = SampleDataset([Sample(path, "malignant")], card, TASKS["three_class"])
    tensor, target = dataset[0]
    runtime = preprocess(read_image(path), card)[0]
    assert target == 2
    assert tensor.dtype == torch.float32 and tuple(tensor.shape) == card.input_shape
    np.testing.assert_array_equal(tensor.numpy(), runtime)


def test_dataset_refuses_labels_outside_the_classes(tmp_path):
    from edgebc.train.dataset import SampleDataset

    with pytest.raises(ValueError, match="that task benign_vs_malignant does not take"):
        SampleDataset(
            [Sample(tmp_path / "x.png", "normal")], PreprocessCard(), TASKS["benign_vs_malignant"]
        )
