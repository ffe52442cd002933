"""Scanner-appearance augmentation: each knob changes what it says it changes, and a recipe that
does not ask for them draws exactly what it drew before they existed (resumed runs stay exact)."""

import numpy as np
import pytest

from edgebc.preprocess import PreprocessCard

torch = pytest.importorskip("torch", reason="torch (the [train] extra) is not installed")

from edgebc.train.augment import BatchAugmenter, _gaussian_blur
from edgebc.train.config import AugmentConfig

CARD = PreprocessCard(input_height=32, input_width=32)
OFF = {"hflip": 0.0, "rotate_degrees": 0.0, "scale": (1.0, 1.0), "translate": 0.0, "elastic": 0.0,
       "brightness": 0.0, "contrast": 0.0, "gamma": (1.0, 1.0), "speckle": 0.0}  # fmt: skip


def _ramp(n=2):
    return (torch.linspace(0, 1, n * 32 * 32).view(n, 1, 32, 32) - 0.5) / 0.25


def _intensities(batch):
    return (batch * 0.25 + 0.5).numpy()


def test_a_recipe_without_the_scanner_knobs_draws_what_it_drew_before_them():
    # values of the augmenter as it was before the scanner knobs existed (same seed, same batch)
    out = BatchAugmenter(AugmentConfig(), CARD)(_ramp(), torch.Generator().manual_seed(3))
    assert float(out.double().sum()) == pytest.approx(-524.3202403783798, rel=1e-6)
    assert float(out[0, 0, 5, 7]) == pytest.approx(-1.6207633018493652, rel=1e-6)
    assert float(out[1, 0, 20, 3]) == pytest.approx(1.041381597518921, rel=1e-6)


def test_depth_gain_varies_down_the_rows_and_not_across_them():
    flat = torch.full((4, 1, 32, 32), (0.4 - 0.5) / 0.25)
    out = _intensities(
        BatchAugmenter(AugmentConfig(**OFF, tgc=0.5), CARD)(flat, torch.Generator().manual_seed(0))
    )
    assert np.allclose(out, out[:, :, :, :1], atol=1e-6)  # one gain per row
    rows = out[:, 0, :, 0] / 0.4
    assert rows.max() > 1.05 and rows.min() < 0.95 and rows.max() <= np.exp(0.5) + 1e-5
    assert np.abs(np.diff(rows, axis=1)).max() < 0.1  # smooth, like a TGC curve


def test_the_transfer_curve_keeps_order_and_black_and_white():
    out = _intensities(
        BatchAugmenter(AugmentConfig(**OFF, dynamic_range=4), CARD)(
            (torch.linspace(0, 1, 32 * 32).view(1, 1, 32, 32).repeat(8, 1, 1, 1) - 0.5) / 0.25,
            torch.Generator().manual_seed(1),
        )
    )
    flat = out.reshape(8, -1)
    assert np.all(np.diff(flat, axis=1) >= -1e-6)  # monotone: the ramp stays a ramp
    assert np.allclose(flat[:, 0], 0, atol=1e-5) and np.allclose(flat[:, -1], 1, atol=1e-4)
    middle = flat[:, flat.shape[1] // 2]
    assert middle.max() - middle.min() > 0.2  # different curves for different frames


def _detail(x):
    return float((x[..., 1:, :] - x[..., :-1, :]).abs().mean())


@pytest.mark.parametrize("knob", [{"blur": 1.5}, {"resolution": 2.0}])
def test_blur_and_coarser_resolution_remove_fine_detail(knob):
    speckle = (torch.rand(4, 1, 32, 32, generator=torch.Generator().manual_seed(2)) - 0.5) / 0.25
    out = BatchAugmenter(AugmentConfig(**OFF, **knob), CARD)(
        speckle * 0.5, torch.Generator().manual_seed(4)
    )
    assert _detail(out) < 0.7 * _detail(speckle * 0.5)


def test_gaussian_blur_keeps_the_mean_and_a_tiny_sigma_is_the_identity():
    x = torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(5))
    assert torch.allclose(_gaussian_blur(x, torch.tensor([1e-4, 1e-4, 1e-4])), x, atol=1e-5)
    blurred = _gaussian_blur(x, torch.tensor([0.5, 1.0, 2.0]))
    assert torch.allclose(blurred.mean((1, 2, 3)), x.mean((1, 2, 3)), atol=0.02)
    assert _detail(blurred[2:]) < _detail(blurred[1:2]) < _detail(blurred[:1])


def test_gain_and_noise_and_grain_are_drawn_from_the_seed():
    config = AugmentConfig(gain=0.3, noise=0.02, speckle_grain=(1, 3, 5), tgc=0.2, dynamic_range=2,
                           blur=0.8, resolution=1.5)  # fmt: skip
    a = BatchAugmenter(config, CARD)(_ramp(), torch.Generator().manual_seed(7))
    b = BatchAugmenter(config, CARD)(_ramp(), torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    assert not torch.equal(
        a, BatchAugmenter(AugmentConfig(), CARD)(_ramp(), torch.Generator().manual_seed(7))
    )


@pytest.mark.parametrize(
    "bad", [{"resolution": 0.5}, {"blur": -1.0}, {"speckle_grain": (2,)}, {"speckle_grain": ()}]
)
def test_impossible_knobs_are_refused(bad):
    with pytest.raises(ValueError, match="augment"):
        AugmentConfig(**bad)
