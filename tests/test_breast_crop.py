"""The mammography steps of the shared preprocessing: breast crop (framing dropped) and laterality
normalisation, on framed phantoms with ground truth and on the shared mini-MIAS films."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from edgebc.breast import NoBreastFoundError, find_breast, prepare_breast
from edgebc.preprocess import PreprocessCard, preprocess
from edgebc.synth.mammogram import LATERALITIES, VIEWS, Mammogram, draw_breast, make_mammogram

SEEDS = range(6)
MAMMO_CARD = PreprocessCard(input_height=256, input_width=192, breast_crop=True, laterality="left")


def _phantom(seed: int, laterality: str, view: str, bits: int = 12) -> Mammogram:
    breast = draw_breast(("normal", "benign", "malignant")[seed % 3], np.random.default_rng(seed))
    return make_mammogram(breast, np.random.default_rng(100 + seed), laterality, view, bits=bits)


def _indicator(shape: tuple[int, ...], boxes: list[tuple[int, int, int, int]]) -> np.ndarray:
    out = np.zeros(shape[:2], np.uint8)
    for x, y, w, h in boxes:
        out[y : y + h, x : x + w] = 1
    return out


def _box_iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    ix = max(0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


@pytest.mark.parametrize("bits", [8, 12])
@pytest.mark.parametrize("view", VIEWS)
@pytest.mark.parametrize("laterality", LATERALITIES)
def test_crop_keeps_the_breast_and_drops_labels_and_markers(laterality, view, bits):
    for seed in SEEDS:
        m = _phantom(seed, laterality, view, bits)
        found = find_breast(m.image)
        # isolate() applied to the ground-truth masks: what of the breast survives the crop and
        # the blacking out, and what of the framing does.
        kept = found.isolate(m.breast).sum() / m.breast.sum()
        assert kept >= 0.99, (seed, kept)
        framing = _indicator(m.image.shape, [m.label_box, *m.marker_boxes])
        assert found.isolate(framing).sum() == 0, seed
        ys, xs = np.nonzero(m.breast)
        truth = (int(xs.min()), int(ys.min()), int(np.ptp(xs)) + 1, int(np.ptp(ys)) + 1)
        assert _box_iou((found.x, found.y, found.width, found.height), truth) >= 0.9, seed
        assert found.chest_wall == m.chest_wall, seed


@pytest.mark.parametrize("laterality", LATERALITIES)
def test_a_marker_inside_the_breasts_box_is_blacked_out(laterality):
    """A CC breast's box has empty corners on the nipple side; a marker dropped there lies inside
    the crop, so cropping alone would keep it."""
    for seed in SEEDS:
        m = _phantom(seed, laterality, "CC")
        ys, xs = np.nonzero(m.breast)
        x0, y0, width = int(xs.min()), int(ys.min()), int(np.ptp(xs)) + 1
        far = x0 + int(0.8 * width) if laterality == "L" else x0 + int(0.2 * width) - 8
        marker = (far, y0 + 2, 8, 8)
        image = m.image.copy()
        image[y0 + 2 : y0 + 10, far : far + 8] = image.max()
        framing = _indicator(image.shape, [marker])
        assert not (framing & m.breast).any()  # off the breast, yet inside its box
        found = find_breast(image)
        assert found.crop(framing).sum() == framing.sum(), seed
        assert found.isolate(framing).sum() == 0, seed
        assert found.isolate(m.breast).sum() >= 0.99 * m.breast.sum(), seed


@pytest.mark.parametrize("view", VIEWS)
def test_laterality_left_mirrors_a_right_breast_onto_its_left_twin(view):
    for seed in SEEDS:
        left, right = (_phantom(seed, side, view) for side in LATERALITIES)
        # The R phantom is the L one mirrored, bar its upright label text, which the crop drops.
        mirrored = prepare_breast(right.image, crop=True, laterality="left")
        np.testing.assert_array_equal(mirrored, prepare_breast(left.image, True, "left"))
        assert find_breast(mirrored).chest_wall == "left"
        # Through the card: the same tensor for both sides.
        np.testing.assert_array_equal(
            preprocess(right.image, MAMMO_CARD), preprocess(left.image, MAMMO_CARD)
        )
    # Without the crop: a left breast is left as it is, a right one is mirrored whole.
    np.testing.assert_array_equal(prepare_breast(left.image, False, "left"), left.image)
    np.testing.assert_array_equal(prepare_breast(right.image, False, "left"), right.image[:, ::-1])
    np.testing.assert_array_equal(prepare_breast(right.image, False, "keep"), right.image)


def test_16_bit_float_and_colour_frames_find_the_same_breast():
    m = _phantom(1, "R", "MLO")  # 12-bit values in uint16
    reference = find_breast(m.image)
    boxes = {
        "full 16-bit": find_breast(m.image * np.uint16(16)),
        "float": find_breast(m.image.astype(np.float32) / 4095.0),
        "BGR": find_breast(np.dstack([m.image] * 3)),
    }
    for name, found in boxes.items():
        assert (found.x, found.y, found.width, found.height, found.chest_wall) == (
            reference.x,
            reference.y,
            reference.width,
            reference.height,
            reference.chest_wall,
        ), name
    out = prepare_breast(m.image, crop=True, laterality="left")
    assert out.dtype == np.uint16 and out.max() > 255  # the full bit depth comes through
    assert preprocess(m.image, MAMMO_CARD).shape == (1, 1, 256, 192)


@pytest.mark.parametrize(
    "frame",
    [
        np.zeros((300, 240), np.uint8),
        np.full((300, 240), 2000, np.uint16),
        np.pad(np.full((6, 6), 255, np.uint8), 150),  # a lone speck (a marker on empty film)
    ],
    ids=["black", "flat-16-bit", "speck"],
)
def test_a_frame_without_a_breast_is_refused_plainly(frame):
    with pytest.raises(NoBreastFoundError, match="no breast on this frame"):
        preprocess(frame, MAMMO_CARD)
    with pytest.raises(NoBreastFoundError):
        preprocess(frame, PreprocessCard(laterality="left"))
    # The default card does what it always did.
    assert preprocess(frame, PreprocessCard()).shape == (1, 1, 224, 224)


def test_the_card_carries_the_steps_and_older_cards_read_as_off():
    card = PreprocessCard(breast_crop=True, laterality="left")
    assert PreprocessCard.from_json(card.to_json()) == card
    older = {
        k: v
        for k, v in PreprocessCard().to_dict().items()
        if k not in ("breast_crop", "laterality")
    }
    restored = PreprocessCard.from_dict(older)
    assert (restored.breast_crop, restored.laterality) == (False, "keep")
    with pytest.raises(ValueError, match="laterality must be one of"):
        PreprocessCard(laterality="right")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="breast_crop must be true or false"):
        PreprocessCard(breast_crop="yes")  # type: ignore[arg-type]
    m = _phantom(0, "R", "CC")
    assert prepare_breast(m.image, crop=False, laterality="keep") is m.image


def test_training_dataset_tensor_equals_runtime_tensor_for_a_mammogram(tmp_path):
    torch = pytest.importorskip("torch", reason="torch (the [train] extra) is not installed")
    from edgebc.data import Sample
    from edgebc.decode import read_image
    from edgebc.task import TASKS
    from edgebc.train.dataset import SampleDataset

    path = tmp_path / "mammogram.png"
    cv2.imwrite(str(path), _phantom(2, "R", "MLO").image)
    dataset = SampleDataset([Sample(path, "malignant")], MAMMO_CARD, TASKS["three_class"])
    tensor, _ = dataset[0]
    assert tensor.dtype == torch.float32
    np.testing.assert_array_equal(tensor.numpy(), preprocess(read_image(path), MAMMO_CARD)[0])


# Hand-read from the films (x, y, width, height): bright film labels, and on mdb012 the bright
# film-edge strip. mdb135's label lies within the breast's bounding box (a wide breast).
MIAS_FRAMING = {
    "mdb005": [(257, 3, 84, 99)],
    "mdb012": [(558, 3, 98, 113), (812, 100, 25, 800)],
    "mdb135": [(205, 3, 68, 117)],
}
# Breasts that fill the film from edge to edge: no side is taller, the image-based rule fails.
MIAS_LATERALITY_MISSES = {"mdb151", "mdb152"}


@pytest.mark.data
def test_mini_mias_crop_drops_the_film_labels_and_laterality_follows_the_numbering(data_dir):
    mias = data_dir / "mias"
    files = sorted(mias.glob("mdb*.png"))
    if not files:
        pytest.skip(f"mini-MIAS absent at {mias}")
    areas, misses = [], set()
    for path in files:
        film = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        found = find_breast(film)
        areas.append(found.width * found.height / film.size)
        # mdb(2k-1) is a woman's right breast, mdb(2k) her left; the chest wall is on that side.
        expected = "right" if int(path.stem[3:]) % 2 else "left"
        if found.chest_wall != expected:
            misses.add(path.stem)
        if path.stem in MIAS_FRAMING:
            framing = _indicator(film.shape, MIAS_FRAMING[path.stem])
            assert found.isolate(framing).sum() == 0, path.stem
            kept = found.isolate(film)
            assert kept.max() >= 0.9 * film.max(), path.stem  # the bright breast stays
    assert misses <= MIAS_LATERALITY_MISSES, sorted(misses)
    assert np.median(areas) < 0.6, np.median(areas)  # the crop is much smaller than the film
    assert np.mean(np.asarray(areas) < 0.9) >= 0.97


def _filled_film(chest_wall: str) -> np.ndarray:
    """A breast filling the film from edge to edge (as on mdb151), a little taller on its chest
    wall's side: the image can barely tell the side (ratio ~1.1)."""
    film = np.zeros((300, 240), np.uint16)
    ys, xs = np.mgrid[0:300, 0:240]
    taper = 20 if chest_wall == "left" else 0
    film[(ys >= 30 + taper * xs / 240) & (ys < 270 - taper * xs / 240)] = 3000
    if chest_wall == "right":
        film = film[:, ::-1]
    return film


def test_the_headers_chest_wall_is_used_and_a_clear_contradiction_is_refused(caplog):
    from edgebc.breast import LateralityConflictError
    from edgebc.decode import ImageView

    m = _phantom(0, "L", "MLO")
    assert find_breast(m.image).chest_wall_ratio >= 2.0  # the image is sure: the left edge
    # agreeing header: the same tensor as the image's own judgement, and the log says which
    with caplog.at_level("DEBUG", logger="edgebc.breast"):
        agreed = preprocess(m.image, MAMMO_CARD, view=ImageView("L", "MLO", "left"))
    np.testing.assert_array_equal(agreed, preprocess(m.image, MAMMO_CARD))
    assert "chest wall on the left from the header" in caplog.text
    # a header that says the opposite of a clear picture: refused, naming both
    with pytest.raises(
        LateralityConflictError,
        match=r"stated view \(DICOM header or manifest\) puts the chest wall on the right",
    ):
        preprocess(m.image, MAMMO_CARD, view=ImageView("R", "MLO", "right"))
    # where the image can hardly tell (a breast filling the film), the header decides
    film = _filled_film("left")
    found = find_breast(film)
    assert found.chest_wall == "left" and found.chest_wall_ratio < 2.0
    turned = prepare_breast(film, True, "left", header_chest_wall="right")
    np.testing.assert_array_equal(turned, prepare_breast(film, True, "left")[:, ::-1])
    # a header without a side leaves it to the image; no header at all is the old behaviour
    np.testing.assert_array_equal(
        preprocess(m.image, MAMMO_CARD, view=ImageView(position="MLO")),
        preprocess(m.image, MAMMO_CARD),
    )
    with pytest.raises(ValueError, match="header chest wall must be left, right or None"):
        prepare_breast(m.image, True, "left", header_chest_wall="L")


@pytest.mark.data
def test_mini_mias_chest_wall_certainty_separates_the_films_the_image_misjudges(data_dir):
    """CONFLICT_RATIO sits between the films the image judges right and those it cannot judge, so
    a true header is never refused on mini-MIAS and a contradicting one is on all but those."""
    from edgebc.breast import CONFLICT_RATIO

    files = sorted((data_dir / "mias").glob("mdb*.png"))
    if not files:
        pytest.skip(f"mini-MIAS absent at {data_dir / 'mias'}")
    right, wrong = [], []
    for path in files:
        found = find_breast(cv2.imread(str(path), cv2.IMREAD_UNCHANGED))
        expected = "right" if int(path.stem[3:]) % 2 else "left"
        (right if found.chest_wall == expected else wrong).append(found.chest_wall_ratio)
    assert min(right) >= CONFLICT_RATIO > max(wrong, default=1.0), (min(right), wrong)
