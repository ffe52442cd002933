"""Area downscaling (OpenCV's INTER_AREA) read from a summed-area table: on the cart's frames
the gate's copy and the model's input from one table cost 0.4-0.6 ms a frame less than two
cv2.resize calls (docs/RUNTIME.md).

Why: behind a 1080p capture the grey imaging region (about 950 x 800 px) is downscaled twice per
frame, to the quality gate's 256 px copy and to the model's 224 px input, and cv2.resize's area
mode took 0.7 ms for each (OpenCV 5.0, one thread, AMD EPYC; non-integer factors take its generic
float path): together more than the network. An area downscale gives each output pixel the mean
of its cell of the input, the rectangle [x * W/w, (x + 1) * W/w) x [y * H/h, (y + 1) * H/h). The
summed-area table (cv2.integral, 0.13 ms) gives any cell's sum from its four corners; a corner at
a fractional position is read by linear interpolation between table entries, which is exact for
an image constant within each pixel. What is left is a gather of four table entries per corner,
0.2-0.5 ms per size depending on what the caches hold (benchmarks/pipeline.py times the whole
path with the table and with cv2.resize side by side).

Not bit for bit OpenCV's: OpenCV accumulates each cell in float32 and drops slivers thinner than
1/1000 of a pixel at cell edges; here the means are exact (float64) and rounded to the nearest
grey level. A mean that is exactly a half (common only where a factor is whole on one axis) lands
a float64 rounding error to one side, the same side every time, so it may round either way;
OpenCV's does too. Over every BUSI and BUS-BRA frame (1,755), as the gate's 256 px copy and a
224 px model's input, 1 to 7 pixels in 100,000 differ from OpenCV's, each by one grey level, and
the then recommended MobileNetV3-Small's answers moved by at most 0.0005 with no decision changed
(tools/measure_area_resize.py, 2026-11-30); tests/test_area.py holds the bound on phantoms. Both
training and the device read frames through this one function (edgebc.preprocess.
resized_for_input, edgebc.quality.thumbnail), so a model's input is the same array in both;
models trained before it (on cv2.resize) see inputs that differ as above.

A grey image's downscales are made by the native kernel where `pip install` could build it
(edgebc/_native/area_kernel.c through edgebc.area_native): the same arithmetic in one pass over the
image, without the stored table or numpy's temporaries: about 0.5 ms a cart frame instead of 0.8
(0.41-0.55 ms less on the core path, docs/RUNTIME.md). It
is checked against the numpy path below when it first loads, and used only if every pixel agrees;
`native_kernel_status` says which path answers, and `edgebc info` prints it.

Where OpenCV is already fast or does something else, cv2.resize itself answers: integer factors
on both axes (its exact integer path), enlarging on either axis (it interpolates), images that are
not 8-bit, single-channel images with a channel axis (cv2 drops it), and frames too large for a
32-bit table.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from edgebc import area_native
from edgebc.area_native import MAX_TABLE_PIXELS, Grid, Kernel

log = logging.getLogger(__name__)


#: A thread keeps its table for the next frame up to this size (a 1080p grey frame's is 8.3 MB);
#: larger ones (colour, mammograms) are made afresh each time rather than held.
KEEP_TABLE_BYTES = 16 << 20


class _Workspace(threading.local):
    """Each thread's summed-area table, reused from frame to frame: a fresh 3 MB array per frame
    costs the kernel's page faults (measured: 3.5 ms a frame instead of 0.13); and whether this
    thread is held to the numpy path (`numpy_only`)."""

    table: np.ndarray | None = None
    numpy_only: bool = False


_workspace = _Workspace()


def area_resize(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """`image` (H x W or H x W x C) downscaled to width x height by cell means: what
    cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA) computes (see the module)."""
    return area_resizes(image, [(width, height)])[0]


def area_resizes(image: np.ndarray, sizes: Sequence[tuple[int, int]]) -> list[np.ndarray]:
    """`image` downscaled to each (width, height) of `sizes`, all read from one summed-area table
    (a grey image's by the native kernel where it is loaded: edgebc.area_native); each equal, bit
    for bit, to `area_resize(image, width, height)`."""
    height, width = image.shape[:2]
    wanted = [(int(w), int(h)) for w, h in sizes]
    from_table = list(dict.fromkeys(size for size in wanted if reads_table(image, *size)))
    kernel = None if _workspace.numpy_only or image.ndim != 2 or not from_table else native_kernel()  # fmt: skip
    made: dict[tuple[int, int], np.ndarray] = {}
    if kernel is not None:
        # rows one byte apart (a one-column view counts as such whatever its stride says)
        rows = image if image.strides[1] == 1 or width == 1 else image.copy()
        grids = [cell_grid(height, width, h, w) for w, h in from_table]
        made = dict(zip(from_table, kernel.downscale(rows, grids), strict=True))
    elif from_table:
        table = summed_area_table(image)
        made = {(w, h): cell_means(table, cell_plan(height, width, h, w)) for w, h in from_table}
    results: list[np.ndarray] = []
    given: set[tuple[int, int]] = set()
    for w, h in wanted:
        if (w, h) not in made:
            results.append(cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA))
        else:  # a size asked for twice gets a copy, not the same array
            results.append(made[(w, h)].copy() if (w, h) in given else made[(w, h)])
            given.add((w, h))
    return results


@contextlib.contextmanager
def numpy_only() -> Iterator[None]:
    """Within it, this thread's downscales come from the numpy path even where the native kernel
    is loaded: to time one against the other (benchmarks/pipeline.py) and to test them equal."""
    before = _workspace.numpy_only
    _workspace.numpy_only = True
    try:
        yield
    finally:
        _workspace.numpy_only = before


@functools.cache
def native_kernel_status() -> tuple[Kernel | None, str]:
    """(the native kernel, how it stands): loaded and checked pixel for pixel against the numpy
    path on random images (sizes with non-integer factors, a whole factor on one axis, a kept
    axis, a single row or column), or None and why not. A kernel that disagrees anywhere is not
    used: a compiler that fuses multiply-adds, say, would move the rounding of exact halves."""
    kernel, how, loud = area_native.load()
    if kernel is None:
        (log.warning if loud else log.info)("area downscales: numpy path (native kernel %s)", how)
        return None, how
    try:
        differs = _differs_from_numpy(kernel)
    except Exception as exc:  # any failure of the check leaves the kernel unused
        differs = f"its check failed: {type(exc).__name__}: {exc}"
    if differs:
        how = f"{how}, but unused: {differs}"
        log.warning("area downscales: numpy path (native kernel %s)", how)
        return None, how
    return kernel, f"{how}, equal to the numpy path"


def _differs_from_numpy(kernel: Kernel) -> str | None:
    """Where `kernel` and the numpy path part on the check's images, or None. The images are rich
    in exact halves (where a fused multiply-add or another order of operations would round the
    other way): runs of equal levels, and levels 0 and 1 only."""
    rng = np.random.default_rng(20261130)
    for rows, cols, sizes in _SELF_CHECK:
        noise = rng.integers(0, 256, (rows, cols), np.uint8)
        runs = noise.copy()
        runs[: rows // 2] = runs[: rows // 2] // 64 * 64
        for image in (noise, runs, noise & 1):
            for view in (image, image[1:, 2:]):
                height, width = view.shape
                fitting = [(w, h) for w, h in sizes if reads_table(view, w, h)]
                table = summed_area_table(view)
                want = [cell_means(table, cell_plan(height, width, h, w)) for w, h in fitting]
                got = kernel.downscale(view, [cell_grid(height, width, h, w) for w, h in fitting])
                for (w, h), a, b in zip(fitting, got, want, strict=True):
                    if not np.array_equal(a, b):
                        return (f"its {w} x {h} downscale of a {height} x {width} image differs "
                                "from the numpy path's")  # fmt: skip
    return None


def native_kernel() -> Kernel | None:
    """The checked native kernel, or None (native_kernel_status says why)."""
    return native_kernel_status()[0]


#: (rows, cols, [(width, height), ...]) the native kernel is checked on before it is used:
#: non-integer factors, a whole factor on one axis, the height or the width kept, single rows
#: and columns (each also on the image less its first row and two columns).
_SELF_CHECK = (
    (203, 317, [(224, 187), (100, 71), (158, 101), (317, 40), (150, 203), (150, 202), (1, 90),
                (200, 1), (13, 7), (315, 77)]),
    (96, 64, [(32, 17), (64, 40), (21, 96), (21, 95), (5, 5)]),
)  # fmt: skip


def reads_table(image: np.ndarray, width: int, height: int) -> bool:
    """True where the table gives the downscale, False where cv2.resize does (module docstring)."""
    rows, cols = image.shape[:2]
    return (
        image.dtype == np.uint8
        and (image.ndim == 2 or (image.ndim == 3 and image.shape[2] > 1))
        and 0 < width <= cols
        and 0 < height <= rows
        and (cols % width != 0 or rows % height != 0)
        and rows * cols <= MAX_TABLE_PIXELS
    )


def summed_area_table(image: np.ndarray) -> np.ndarray:
    """cv2.integral of an 8-bit image, int32, (H + 1) x (W + 1) [x C], in this thread's reused
    buffer: valid until this thread makes its next table."""
    rows, cols = image.shape[:2]
    shape = (rows + 1, cols + 1, *image.shape[2:])
    table = _workspace.table
    if table is None or table.shape != shape:
        table = np.empty(shape, np.int32)
        _workspace.table = table if table.nbytes <= KEEP_TABLE_BYTES else None
    return cv2.integral(image, sum=table, sdepth=cv2.CV_32S)  # written into `table`


@functools.lru_cache(maxsize=8)
def cell_grid(rows: int, cols: int, out_h: int, out_w: int) -> Grid:
    """The cell grid's corners along each axis (cached: a cart's frames have one size)."""
    ylo, yfrac = _edges(rows, out_h)
    xlo, xfrac = _edges(cols, out_w)
    grid = Grid(rows, cols, out_h, out_w, ylo, yfrac, xlo, xfrac, (out_h / rows) * (out_w / cols))
    for array in (ylo, yfrac, xlo, xfrac):
        array.setflags(write=False)
    return grid


@functools.lru_cache(maxsize=8)
def cell_plan(rows: int, cols: int, out_h: int, out_w: int) -> CellPlan:
    """Where the cell grid's corners lie in the table (cached: a cart's frames have one size)."""
    grid = cell_grid(rows, cols, out_h, out_w)
    stride = cols + 1
    base = grid.rows_below[:, None] * stride + grid.cols_below[None, :]
    plan = CellPlan(
        base, grid.row_fractions[:, None], grid.col_fractions, stride, grid.inverse_area
    )
    plan.base.setflags(write=False)
    return plan


@dataclass(frozen=True)
class CellPlan:
    """The cell grid's corners: each lies between four table entries, the one at or above and
    left of it at flat index `base` (out_h + 1, out_w + 1), with its fractions below (`yfrac`, a
    column) and right (`xfrac`, a row) of that entry; `stride` is the table's row length. Kept
    small (one index and two vectors, not four of each): the plan is read every frame."""

    base: np.ndarray
    yfrac: np.ndarray
    xfrac: np.ndarray
    stride: int
    inverse_area: float


def _edges(size: int, cells: int) -> tuple[np.ndarray, np.ndarray]:
    """The `cells + 1` cell edges along one axis as (table index at or below, fraction above it);
    the last edge is the image's own border exactly."""
    edges = np.arange(cells + 1, dtype=np.float64) * (size / cells)
    edges[-1] = size
    below = np.minimum(edges.astype(np.intp), size - 1)
    return below, edges - below


def cell_means(table: np.ndarray, plan: CellPlan) -> np.ndarray:
    """Every cell's mean, rounded to uint8: the table interpolated at the cell grid's corners
    (linearly across, then down), then each cell's sum as the difference of its four corners."""
    channels = table.shape[2:]
    flat = table.reshape(-1, *channels)
    xfrac = plan.xfrac if not channels else plan.xfrac[:, None]
    yfrac = plan.yfrac if not channels else plan.yfrac[:, :, None]
    upper, lower = (_across(flat[offset:], plan.base, xfrac) for offset in (0, plan.stride))
    grid = upper + (lower - upper) * yfrac
    sums = np.diff(np.diff(grid, axis=0), axis=1)
    sums *= plan.inverse_area
    np.clip(sums, 0, 255, out=sums)  # a sum a rounding error below zero is 0
    return np.rint(sums).astype(np.uint8)


def _across(flat: np.ndarray, base: np.ndarray, xfrac: np.ndarray) -> np.ndarray:
    """The table row through each corner, read at the corner's fractional column (float64)."""
    left = np.take(flat, base, axis=0)
    right = np.take(flat[1:], base, axis=0)
    return left + (right - left) * xfrac
