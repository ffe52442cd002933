"""The auxiliary lesion-mask loss: masks follow their image, the loss weighs what it should,
the head stays out of the model, and Grad-CAM's share on the lesion is measured right."""

import math

import cv2
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch (the [train] extra) is not installed")

from edgebc.data import read_manifest, write_manifest
from edgebc.data.records import Sample
from edgebc.errors import EdgebcError
from edgebc.preprocess import PreprocessCard
from edgebc.task import TASKS
from edgebc.train import loop
from edgebc.train.augment import BatchAugmenter
from edgebc.train.checkpoint import load_checkpoint
from edgebc.train.config import AugmentConfig
from edgebc.train.dataset import SampleDataset
from edgebc.train.gradcam import lesion_attention
from edgebc.train.lesion_mask import mask_loss
from edgebc.train.models import create_model
from tests.test_training import _config, tiny_split  # noqa: F401  (the fixture)


def test_masks_take_the_same_warp_as_their_images_and_draw_no_randomness():
    card = PreprocessCard(input_height=32, input_width=32, channels=1, mean=(0.5,), std=(0.25,))
    square = torch.zeros(2, 1, 32, 32)
    square[:, :, 8:20, 10:26] = 1.0
    geometry_only = AugmentConfig(brightness=0, contrast=0, gamma=(1, 1), speckle=0, hflip=0.5)
    augmenter = BatchAugmenter(geometry_only, card)
    images, masks = augmenter.with_masks(
        (square - 0.5) / 0.25, square.clone(), torch.Generator().manual_seed(4)
    )
    assert not torch.equal(masks, square)  # it really moved
    torch.testing.assert_close(images * 0.25 + 0.5, masks, atol=1e-5, rtol=0)

    full = BatchAugmenter(AugmentConfig(), card)
    plain = full((square - 0.5) / 0.25, torch.Generator().manual_seed(9))
    with_masks, _ = full.with_masks((square - 0.5) / 0.25, square, torch.Generator().manual_seed(9))
    assert torch.equal(plain, with_masks)


def _png(path, array):
    assert cv2.imwrite(str(path), array)
    return path


def test_a_mask_is_letterboxed_like_its_image_with_empty_bars(tmp_path):
    image = _png(tmp_path / "frame.png", np.full((40, 80), 90, np.uint8))
    first, second = np.zeros((40, 80), np.uint8), np.zeros((40, 80), np.uint8)
    first[10:30, 20:30], second[10:30, 30:40] = 255, 255  # two lesion files: their union counts
    masks = (_png(tmp_path / "m0.png", first), _png(tmp_path / "m1.png", second))
    card = PreprocessCard(input_height=32, input_width=32, channels=1, pad_value=0.3)
    dataset = SampleDataset(
        [Sample(image, "benign", masks=masks)], card, TASKS["benign_vs_malignant"]
    )
    mask = dataset.mask(0).numpy()[0]
    # 80x40 fits 32x32 at scale 0.4 as 32x16, 8 rows of bars above: the lesion lands on rows
    # 12-19, columns 8-15, exactly (its edges fall on whole output pixels).
    expected = np.zeros((32, 32), np.float32)
    expected[12:20, 8:16] = 1.0
    np.testing.assert_allclose(mask, expected, atol=1e-6)
    assert (
        SampleDataset([Sample(image, "benign")], card, TASKS["benign_vs_malignant"]).mask(0) is None
    )

    wrong = _png(tmp_path / "small.png", np.zeros((20, 40), np.uint8))
    with pytest.raises(ValueError, match=r"mask is \(40, 20\) but its image .* is \(80, 40\)"):
        SampleDataset(
            [Sample(image, "benign", masks=(wrong,))], card, TASKS["benign_vs_malignant"]
        ).mask(0)


def test_mask_loss_is_coverage_cross_entropy_over_samples_that_have_a_mask():
    # One 2x2 mask with one lesion pixel over a 1x1 feature map: target coverage 0.25. A logit of
    # log(1/3) predicts 0.25, so the loss is the entropy of 0.25.
    masks = torch.zeros(2, 1, 2, 2)
    masks[0, 0, 0, 0] = 1.0
    logits = torch.full((2, 1, 1, 1), math.log(1 / 3))
    logits[1] = 5.0  # badly wrong for the second sample (empty mask)
    entropy = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    without_second = mask_loss(logits, masks, torch.tensor([True, False]))
    assert float(without_second) == pytest.approx(entropy, abs=1e-6)
    both = mask_loss(logits, masks, torch.tensor([True, True]))
    assert float(both) == pytest.approx((entropy + math.log1p(math.exp(5.0))) / 2, abs=1e-5)
    assert float(mask_loss(logits, masks, torch.tensor([False, False]))) == 0.0


def test_training_with_the_mask_loss_keeps_the_head_out_of_the_model(tiny_split, tmp_path):  # noqa: F811
    config = _config(tiny_split, tmp_path, "masked", "optim.epochs=4", "optim.mask_loss_weight=1.0")
    result = loop.train_model(config, show_progress=False)
    losses = [row["train_mask_loss"] for row in result.history]
    assert all(0 < loss < 2 for loss in losses) and losses[-1] < 0.8 * losses[0]
    plain_keys = set(create_model("simple_cnn", 3, 1).state_dict())
    assert set(load_checkpoint(result.best_checkpoint).state_dict) == plain_keys
    head = load_checkpoint(result.run_dir / "last.pt").training["mask_head_state"]
    assert head["weight"].shape[:2] == (1, 128) and head["weight"].shape[2:] == (1, 1)


def test_the_mask_loss_without_masks_is_refused_by_name(tiny_split, tmp_path):  # noqa: F811
    bare = write_manifest(
        [s.with_(masks=()) for s in read_manifest(tiny_split)], tmp_path / "bare.csv"
    )
    with pytest.raises(EdgebcError, match=r"none of the .* training samples .* has a lesion mask"):
        loop.train_model(
            _config(bare, tmp_path, "x", "optim.mask_loss_weight=1.0"), show_progress=False
        )
    assert not (tmp_path / "x" / "last.pt").exists()


class _SumModel(torch.nn.Module):
    """Grad-CAM by hand: the layer is the input itself, the logits +-mean of it, so the class-0
    map is the (positive) input and the class-1 map is blank."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Identity()

    def forward(self, x):
        mean = self.layer(x).mean(dim=(1, 2, 3))
        return torch.stack([mean, -mean], 1)


def test_lesion_attention_is_the_maps_share_inside_the_mask():
    model = _SumModel()
    image = torch.ones(1, 8, 8)
    image[:, :, 4:] = 3.0  # right half three times as bright: three quarters of the evidence
    left = np.zeros((8, 8), np.float32)
    left[:, :4] = 1.0
    images = image.expand(3, 1, 8, 8)
    result = lesion_attention(
        model, model.layer, images, [left, None, np.zeros_like(left)], np.array([0, 0, 0])
    )
    assert result["frames"] == 1 and result["blank_maps"] == 0
    assert result["mean_share_on_lesion"] == pytest.approx(0.25, abs=1e-6)
    assert result["mean_lesion_area"] == pytest.approx(0.5)
    blank = lesion_attention(model, model.layer, images[:1], [left], np.array([1]))
    assert blank["frames"] == 0 and blank["blank_maps"] == 1
