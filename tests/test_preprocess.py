"""The shared preprocessing against hand-computed numpy results, plus properties over random inputs."""

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from edgebc.errors import ConfigError
from edgebc.preprocess import PreprocessCard, letterbox_geometry, preprocess, preprocess_batch
from edgebc.region import Region


def test_same_size_grey_is_only_scaled_and_normalised(rng):
    image = rng.integers(0, 256, (16, 16), dtype=np.uint8)
    card = PreprocessCard(input_height=16, input_width=16, mean=(0.3,), std=(0.2,))
    expected = ((image.astype(np.float64) / 255.0 - 0.3) / 0.2)[None, None]
    out = preprocess(image, card)
    assert out.shape == (1, 1, 16, 16) and out.dtype == np.float32
    np.testing.assert_allclose(out, expected, atol=1e-5)


def test_bgr_becomes_rgb_with_per_channel_statistics():
    bgr = np.zeros((8, 8, 3), np.uint8)
    bgr[..., 0], bgr[..., 1], bgr[..., 2] = 10, 100, 250  # B, G, R
    card = PreprocessCard.imagenet_rgb(8, 8)
    out = preprocess(bgr, card)[0]
    for channel, value in enumerate((250, 100, 10)):  # R, G, B order in the tensor
        expected = (value / 255.0 - card.mean[channel]) / card.std[channel]
        np.testing.assert_allclose(out[channel], expected, atol=1e-5)


def test_bgr_to_grey_uses_luma_weights_and_grey_to_rgb_replicates():
    bgr = np.zeros((8, 8, 3), np.uint8)
    bgr[..., 0], bgr[..., 1], bgr[..., 2] = 30, 60, 90
    card = PreprocessCard(input_height=8, input_width=8, mean=(0.0,), std=(1.0,))
    luma = round(0.299 * 90 + 0.587 * 60 + 0.114 * 30)
    np.testing.assert_allclose(preprocess(bgr, card), luma / 255.0, atol=1 / 255.0 + 1e-6)
    grey = np.full((8, 8), 77, np.uint8)
    rgb = preprocess(
        grey,
        PreprocessCard(input_height=8, input_width=8, channels=3, mean=(0, 0, 0), std=(1, 1, 1)),
    )
    np.testing.assert_allclose(rgb, 77 / 255.0, atol=1e-6)


def test_area_downscale_by_two_is_the_block_mean(rng):
    image = rng.integers(0, 256, (32, 32), dtype=np.uint16) * 200
    card = PreprocessCard(
        input_height=16, input_width=16, resize="stretch", mean=(0.0,), std=(1.0,)
    )
    blocks = image.astype(np.float64).reshape(16, 2, 16, 2).mean(axis=(1, 3)) / 65535.0
    np.testing.assert_allclose(preprocess(image, card)[0, 0], blocks, atol=1.0 / 65535)


def test_letterbox_centres_the_image_between_bars_of_pad_value():
    image = np.full((10, 20), 255, np.uint8)  # wide: fits 16 wide, 8 tall, bars above and below
    card = PreprocessCard(
        input_height=16, input_width=16, resize="letterbox", pad_value=0.25, mean=(0.0,), std=(1.0,)
    )
    geometry = letterbox_geometry(10, 20, card)
    assert (geometry.top, geometry.left, geometry.height, geometry.width) == (4, 0, 8, 16)
    out = preprocess(image, card)[0, 0]
    np.testing.assert_allclose(out[4:12], 1.0, atol=1e-6)
    np.testing.assert_allclose(out[:4], round(0.25 * 255) / 255.0, atol=1e-6)
    np.testing.assert_allclose(out[12:], round(0.25 * 255) / 255.0, atol=1e-6)


def test_fixed_region_crop_selects_the_imaging_area_only():
    frame = np.zeros((100, 200, 3), np.uint8)
    frame[20:60, 50:130] = 200  # the "image"; UI around it is black
    frame[0:5, :] = 255  # a bright menu bar the crop must exclude
    card = PreprocessCard(
        input_height=20, input_width=40, resize="stretch", mean=(0.0,), std=(1.0,)
    )
    out = preprocess(frame, card, region=Region(50, 20, 80, 40))
    np.testing.assert_allclose(out, 200 / 255.0, atol=1e-6)
    with pytest.raises(ValueError, match="does not fit in a 200x100 frame"):
        preprocess(frame, card, region=Region(150, 20, 80, 40))


def test_batch_equals_stacked_singles(rng):
    card = PreprocessCard(input_height=24, input_width=24)
    frames = [rng.integers(0, 256, (30 + 7 * k, 40), dtype=np.uint8) for k in range(3)]
    np.testing.assert_array_equal(
        preprocess_batch(frames, card), np.concatenate([preprocess(f, card) for f in frames])
    )


def test_card_round_trips_through_json_and_rejects_unknown_keys():
    card = PreprocessCard.imagenet_rgb(192, 160, resize="stretch")
    assert PreprocessCard.from_json(card.to_json()) == card
    with pytest.raises(
        ConfigError, match=r"unknown key 'input_hieght'.*Did you mean 'input_height'"
    ):
        PreprocessCard.from_dict({"input_hieght": 224})
    with pytest.raises(ConfigError, match="version 2 is not supported"):
        PreprocessCard.from_dict({**card.to_dict(), "version": 2})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"channels": 2}, "channels must be 1"),
        ({"std": (0.0,)}, "std values must be positive"),
        ({"mean": (0.5, 0.5)}, "one value per channel"),
        ({"pad_value": 2.0}, "pad_value is an intensity"),
        ({"input_height": 4}, "input size must be"),
    ],
)
def test_invalid_cards_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PreprocessCard(**kwargs)


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (np.full((4, 4), np.nan, np.float32), "NaN or infinite"),
        (np.full((4, 4), 3.0, np.float32), r"in \[0, 1\]"),
        (np.zeros((4, 4), np.int32), "unsupported image dtype int32"),
        (np.zeros((4, 4, 2), np.uint8), "expected a grey"),
        (np.zeros((0, 4), np.uint8), "expected a grey|empty"),
    ],
)
def test_bad_frames_are_refused_plainly(image, message):
    with pytest.raises(ValueError, match=message):
        preprocess(image, PreprocessCard())


_dtypes = st.sampled_from([np.uint8, np.uint16, np.float32, np.float64])


@st.composite
def _frames(draw):
    dtype = draw(_dtypes)
    shape = (
        draw(st.integers(1, 300)),
        draw(st.integers(1, 300)),
        *draw(st.sampled_from([(), (3,), (1,), (4,)])),
    )
    if np.issubdtype(dtype, np.integer):
        elements = st.integers(0, int(np.iinfo(dtype).max))
    else:
        elements = st.floats(0.0, 1.0, width=32)
    return draw(hnp.arrays(dtype, shape, elements=elements))


@settings(max_examples=60, deadline=None)
@given(
    frame=_frames(),
    channels=st.sampled_from([1, 3]),
    resize=st.sampled_from(["stretch", "letterbox"]),
    side=st.integers(8, 64),
)
def test_property_shape_dtype_range_and_finiteness(frame, channels, resize, side):
    card = PreprocessCard(
        input_height=side,
        input_width=side + 3,
        channels=channels,
        resize=resize,
        mean=(0.4,) * channels,
        std=(0.3,) * channels,
    )
    out = preprocess(frame, card)
    assert out.shape == (1, channels, side, side + 3)
    assert out.dtype == np.float32
    assert np.all(np.isfinite(out))
    low, high = (0.0 - 0.4) / 0.3, (1.0 - 0.4) / 0.3
    assert out.min() >= low - 1e-4 and out.max() <= high + 1e-4


def _phantom(seed=0):
    from edgebc.synth import make_ultrasound_phantom
    from edgebc.synth.ultrasound import phantom_rng

    image = make_ultrasound_phantom("benign", phantom_rng(seed, 0), 200, 240).image
    image[:, :30] = 0  # the black surround beside the sector
    return image


def _changed(image, curve):
    """The frame as another scanner preset would show it: a monotone curve on the tissue."""
    out = np.round(255 * curve(image.astype(np.float64) / 255)).clip(0, 255).astype(np.uint8)
    out[image == 0] = 0
    return out


@pytest.mark.parametrize(
    "curve",
    [lambda x: x**0.6, lambda x: np.log1p(8 * x) / np.log(9), lambda x: 0.8 * x],
    ids=["gamma", "log-compression", "gain"],
)
def test_equalising_undoes_any_monotone_transfer_curve(curve):
    from edgebc.preprocess import normalise_appearance

    image = _phantom()
    original = normalise_appearance(image, "equalise").astype(int)
    other = normalise_appearance(_changed(image, curve), "equalise").astype(int)
    raw_gap = np.abs(image.astype(int) - _changed(image, curve).astype(int)).mean()
    assert raw_gap > 5  # the presets really differ
    assert np.abs(original - other).mean() < 2.0  # and equalised they agree to quantisation
    assert (original[:, :30] == 0).all()  # the surround stays black


def test_stretching_undoes_gain_and_maps_the_tissue_percentiles_to_the_full_range():
    from edgebc.preprocess import normalise_appearance

    image = _phantom(1)
    dimmer = _changed(image, lambda x: 0.7 * x)
    a, b = normalise_appearance(image, "stretch"), normalise_appearance(dimmer, "stretch")
    assert np.abs(a.astype(int) - b.astype(int)).mean() < 1.5
    tissue = a[image > 5]
    assert np.percentile(tissue, 99.5) == 255 and np.percentile(tissue, 0.5) == 0


def test_appearance_works_on_16_bit_float_and_colour_frames_and_none_is_the_identity():
    from edgebc.preprocess import normalise_appearance

    image = _phantom(2)
    assert normalise_appearance(image, "none") is image
    wide = image.astype(np.uint16) * 257
    np.testing.assert_allclose(
        normalise_appearance(wide, "equalise") / 65535.0,
        normalise_appearance(image, "equalise") / 255.0,
        atol=0.01,
    )
    as_float = normalise_appearance(image.astype(np.float32) / 255, "stretch")
    assert as_float.dtype == np.float32 and as_float.min() >= 0.0 and as_float.max() <= 1.0
    colour = normalise_appearance(np.dstack([image] * 3), "equalise")
    np.testing.assert_array_equal(colour[:, :, 1], normalise_appearance(image, "equalise"))
    black = np.zeros((20, 20), np.uint8)
    np.testing.assert_array_equal(normalise_appearance(black, "equalise"), black)
    with pytest.raises(ValueError, match="appearance must be one of"):
        PreprocessCard(appearance="histogram")  # type: ignore[arg-type]


def test_the_card_carries_appearance_and_older_cards_read_as_none():
    card = PreprocessCard(appearance="equalise")
    assert PreprocessCard.from_json(card.to_json()) == card
    older = {k: v for k, v in PreprocessCard().to_dict().items() if k != "appearance"}
    assert PreprocessCard.from_dict(older).appearance == "none"
    frame = _phantom(3)
    assert not np.array_equal(preprocess(frame, card), preprocess(frame, PreprocessCard()))


def test_clahe_without_clipping_on_one_tile_is_histogram_equalisation_at_16_bits(rng):
    """Hand-computed: with one tile and no clipping, CLAHE maps each level to its rank, over the
    frame's own 16-bit range: value of rank r (1-based) among N -> round(r * 65535 / N), the
    product in float32 as OpenCV forms it."""
    from edgebc.preprocess import enhance_contrast

    levels = rng.permutation(np.arange(1, 4097, dtype=np.uint16) * 7).reshape(64, 64)
    out = enhance_contrast(levels, clip=1000.0, tiles=1)  # 1000: no bin reaches the limit
    ranks = np.argsort(np.argsort(levels.ravel())).reshape(64, 64) + 1
    assert out.dtype == np.uint16
    scaled = ranks.astype(np.float32) * np.float32(65535 / 4096)
    np.testing.assert_array_equal(out, np.round(scaled).astype(np.uint16))
    assert enhance_contrast(levels, 0.0, 8) is levels  # clip 0: off


def test_clahe_keeps_16_bit_detail_and_black_background(rng):
    from edgebc.preprocess import enhance_contrast

    # a faint 16-bit texture (256 levels wide) on a breast, with black background on the left
    frame = np.zeros((128, 128), np.uint16)
    frame[:, 32:] = 30000 + rng.integers(0, 256, (128, 96), dtype=np.uint16)
    out = enhance_contrast(frame, clip=2.0, tiles=4)
    assert out.dtype == np.uint16
    assert np.all(out[:, :32] == 0)  # black stays black
    raw = cv2.createCLAHE(2.0, (4, 4)).apply(frame)
    assert raw[:, :32].max() > 0  # which plain CLAHE would not keep
    tissue = out[:, 32:].astype(np.float64)
    assert tissue.std() > 20 * frame[:, 32:].std()  # the faint texture is spread out
    assert len(np.unique(out[:, 32:])) > 256  # not quantised to 8 bits on the way
    floats = enhance_contrast(frame.astype(np.float32) / 65535.0, 2.0, 4)
    np.testing.assert_allclose(floats * 65535.0, out, atol=0.5)
    colour = enhance_contrast(np.dstack([frame] * 3), 2.0, 4)
    np.testing.assert_array_equal(colour[:, :, 2], out)


def test_the_card_carries_clahe_and_pectoral_and_older_cards_read_as_off():
    card = PreprocessCard(clahe_clip=2.5, clahe_tiles=6, pectoral="suppress")
    assert PreprocessCard.from_json(card.to_json()) == card
    older = {
        k: v
        for k, v in PreprocessCard().to_dict().items()
        if k not in ("clahe_clip", "clahe_tiles", "pectoral")
    }
    restored = PreprocessCard.from_dict(older)
    assert (restored.clahe_clip, restored.clahe_tiles, restored.pectoral) == (0.0, 8, "keep")
    frame = _phantom(3)
    assert not np.array_equal(preprocess(frame, card), preprocess(frame, PreprocessCard()))
    np.testing.assert_array_equal(  # clip 0 is off whatever the tiles
        preprocess(frame, PreprocessCard(clahe_tiles=3)), preprocess(frame, PreprocessCard())
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"clahe_clip": -1.0}, "clahe_clip is CLAHE's clip limit"),
        ({"clahe_clip": float("nan")}, "clahe_clip is CLAHE's clip limit"),
        ({"clahe_clip": "2"}, "clahe_clip is CLAHE's clip limit"),
        ({"clahe_tiles": 0}, "clahe_tiles is the CLAHE grid's tiles per side"),
        ({"clahe_tiles": 2.5}, "clahe_tiles is the CLAHE grid's tiles per side"),
        ({"clahe_tiles": True}, "clahe_tiles is the CLAHE grid's tiles per side"),
        ({"pectoral": "remove"}, "pectoral must be one of"),
    ],
)
def test_invalid_mammography_steps_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PreprocessCard(**kwargs)
