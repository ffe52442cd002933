"""Area downscaling from a summed-area table (edgebc.area): the exact cell means, OpenCV's
INTER_AREA to within one grey level on a few pixels, several sizes from one table, and cv2.resize
itself wherever the table does not answer. Every test runs on both paths a grey image may take:
the native kernel (edgebc.area_native) and numpy's reading of the table."""

import contextlib
import threading

import cv2
import numpy as np
import pytest

from edgebc import area
from edgebc.area import KEEP_TABLE_BYTES, MAX_TABLE_PIXELS, area_resize, area_resizes, reads_table
from edgebc.synth import make_ultrasound_phantom, render_scanner_screen
from edgebc.synth.ultrasound import phantom_rng


@pytest.fixture(autouse=True, params=["native", "numpy"])
def downscale_path(request):
    """Each test once through the native kernel, once held to the numpy path."""
    if request.param == "numpy":
        with area.numpy_only():
            yield request.param
        return
    if area.native_kernel() is None:  # test_the_native_kernel_is_built_and_checked fails then
        pytest.skip(f"native area kernel: {area.native_kernel_status()[1]}")
    yield request.param


def coverage(size: int, cells: int) -> np.ndarray:
    """cells x size: the share of each input pixel inside each output cell, over the cell's width."""
    scale = size / cells
    weights = np.zeros((cells, size))
    for cell in range(cells):
        start, end = cell * scale, (cell + 1) * scale
        for pixel in range(int(start), min(size, int(np.ceil(end)))):
            weights[cell, pixel] = (min(end, pixel + 1) - max(start, pixel)) / scale
    return weights


def exact_means(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """The cell means by the definition, in float64: coverage weights on both axes."""
    rows, cols = coverage(image.shape[0], height), coverage(image.shape[1], width)
    values = image.astype(np.float64)
    if values.ndim == 2:
        return rows @ values @ cols.T
    return np.stack([rows @ values[:, :, c] @ cols.T for c in range(values.shape[2])], axis=-1)


def phantom(k: int, height: int = 400, width: int = 480) -> np.ndarray:
    return make_ultrasound_phantom("benign", phantom_rng(31, k), height, width).image


# (width, height) from a 397 x 480 frame: non-integer factors, a whole factor on one axis only
# (240, 160: 2 across), an axis kept (480), a single column or row
SIZES = [
    (224, 187),
    (256, 213),
    (100, 71),
    (37, 50),
    (479, 300),
    (240, 160),
    (480, 150),
    (1, 90),
    (200, 1),
]


@pytest.mark.parametrize(("width", "height"), SIZES)
def test_each_pixel_is_its_cells_exact_mean_rounded_half_to_even(width, height):
    image = phantom(1, 397, 480)
    got = area_resize(image, width, height)
    want = exact_means(image, width, height)
    decided = np.abs(want - np.floor(want) - 0.5) > 1e-6  # ties aside: rounding order decides them
    assert decided.mean() > 0.99
    assert np.array_equal(got[decided], np.rint(want[decided]).astype(np.uint8))
    assert np.abs(got.astype(np.float64) - want).max() <= 0.5 + 1e-6


def test_colour_cells_are_each_channels_exact_mean():
    image = render_scanner_screen(phantom(7), phantom_rng(31, 11), 540, 960)[0]
    got = area_resize(image, 301, 170)
    want = exact_means(image, 301, 170)
    decided = np.abs(want - np.floor(want) - 0.5) > 1e-6
    assert got.shape == (170, 301, 3) and decided.mean() > 0.99
    assert np.array_equal(got[decided], np.rint(want[decided]).astype(np.uint8))


@pytest.mark.parametrize(("width", "height"), SIZES)
def test_opencvs_inter_area_to_one_grey_level_on_a_few_pixels(width, height):
    for image in (phantom(2, 397, 480), render_scanner_screen(phantom(3), phantom_rng(31, 9), 540, 960)[0]):  # fmt: skip
        if width > image.shape[1] or height > image.shape[0]:
            continue
        got = area_resize(image, width, height).astype(np.int16)
        want = cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA).astype(np.int16)
        assert got.shape == want.shape
        assert np.abs(got - want).max() <= 1
        # a mean at a half (common where a factor is whole) may round either way in either
        # implementation; elsewhere they differ where OpenCV's float32 sums cross a half
        tie = np.abs(exact_means(image, width, height) % 1 - 0.5) < 1e-3
        assert np.count_nonzero((got != want) & ~tie) <= max(2, 0.0005 * got.size)


def test_a_flat_image_stays_flat_and_a_step_averages_across_its_cell():
    assert np.all(area_resize(np.full((93, 170), 77, np.uint8), 40, 21) == 77)
    step = np.zeros((4, 10), np.uint8)
    step[:, 5:] = 200  # cells of 2.5 px: the middle cell [2.5, 5) is black, [5, 7.5) white
    assert area_resize(step, 4, 2).tolist() == [[0, 0, 200, 200]] * 2
    edge = np.zeros((4, 9), np.uint8)
    edge[:, 4] = 150  # cells of 3 px by 4/3: the pixel lies in the middle column of cells
    assert area_resize(edge, 3, 3).tolist() == [[0, 50, 0]] * 3
    edge = np.zeros((3, 10), np.uint8)
    edge[:, 2] = 100  # cells of 2.5 px: pixel 2 is half in each of the first two cells
    assert area_resize(edge, 4, 3).tolist() == [[20, 20, 0, 0]] * 3


def test_several_sizes_from_one_table_are_each_sizes_own_resize():
    image = render_scanner_screen(phantom(4), phantom_rng(31, 10), 1080, 1920)[0][141:934, 443:1395]
    grey = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    for source in (grey, image):
        together = area_resizes(source, [(224, 187), (256, 213), (952 // 4, 793 // 4)])
        for (width, height), made in zip([(224, 187), (256, 213), (238, 198)], together, strict=True):  # fmt: skip
            assert made.shape[:2] == (height, width) and made.dtype == np.uint8
            assert np.array_equal(made, area_resize(source, width, height))


def test_a_result_is_its_own_array_not_the_reused_table():
    first, second = phantom(5), phantom(6)
    made = area_resize(first, 224, 187)
    kept = made.copy()
    area_resize(second, 224, 187)
    area_resizes(second, [(224, 187), (100, 83)])
    assert np.array_equal(made, kept)
    assert np.array_equal(area_resize(first, 224, 187), kept)


def test_threads_each_read_their_own_table(downscale_path):
    images = [phantom(k) for k in range(4)]
    want = [area_resize(image, 224, 187) for image in images]
    wrong = []

    def work(k):
        with area.numpy_only() if downscale_path == "numpy" else contextlib.nullcontext():
            if area._workspace.numpy_only != (downscale_path == "numpy"):
                wrong.append("path")  # an assert here would end the thread, not fail the test
            for _ in range(30):
                if not np.array_equal(area_resize(images[k], 224, 187), want[k]):
                    wrong.append(k)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert wrong == []


@pytest.mark.parametrize(
    ("image", "size"),
    [
        (np.arange(200 * 300, dtype=np.uint32).reshape(200, 300).astype(np.uint8), (100, 50)),  # integer factors
        (np.arange(200 * 300, dtype=np.uint32).reshape(200, 300).astype(np.uint8), (400, 150)),  # enlarging one axis
        ((np.arange(200 * 300).reshape(200, 300) * 7 % 65536).astype(np.uint16), (224, 149)),
        (np.linspace(0, 1, 200 * 300, dtype=np.float32).reshape(200, 300), (224, 149)),
    ],
)  # fmt: skip
def test_where_the_table_does_not_answer_opencv_does_bit_for_bit(image, size):
    assert not reads_table(image, *size)
    want = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    assert np.array_equal(area_resize(image, *size), want)
    assert np.array_equal(area_resizes(image, [size])[0], want)


def test_frames_too_large_for_a_32_bit_table_go_to_opencv():
    side = int(np.sqrt(MAX_TABLE_PIXELS)) + 2
    assert 255 * side * side > 2**31 - 1
    big = np.full((side, side), 255, np.uint8)  # a table of it would overflow int32
    big[::3] = 7
    assert not reads_table(big, 224, 224)
    want = cv2.resize(big, (224, 224), interpolation=cv2.INTER_AREA)
    assert np.array_equal(area_resize(big, 224, 224), want)
    assert reads_table(np.empty((side - 4, side - 4), np.uint8), 224, 224)


def test_one_channel_with_a_channel_axis_comes_back_as_opencv_gives_it():
    image = phantom(8)[:, :, np.newaxis]
    for size in ((224, 187), (240, 200)):
        want = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
        assert area_resize(image, *size).shape == want.shape == size[::-1]


def test_a_thread_does_not_hold_a_large_table(downscale_path):
    area_resize(np.zeros((2000, 3000, 3), np.uint8) + 9, 224, 150)  # a 72 MB table
    kept = area._workspace.table
    assert kept is None or kept.nbytes <= KEEP_TABLE_BYTES
    area._workspace.table = None
    area_resize(phantom(9), 224, 187)  # numpy keeps a grey frame's for the next; the kernel none
    assert (area._workspace.table is not None) == (downscale_path == "numpy")
