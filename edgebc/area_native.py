"""The native area kernel (edgebc/_native/area_kernel.c) behind a numpy-shaped call: loaded with
ctypes from the library `pip install` builds in edgebc/_native.

Why a native kernel: on a cart's 1080p frame numpy's summed-area table and its reading of it
(gathers and float64 temporaries) took 0.8 ms of the 2.0 a frame from frame to decision (a
profile, docs/RUNTIME.md); the kernel makes the same downscales in one pass in about 0.5. It is an
accelerator, never a second definition: edgebc.area checks it against the numpy path when it first
loads it and uses it only if every pixel agrees, and without a C compiler at install time the
library is simply absent and the numpy path answers alike.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.machinery
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

#: The library's name in edgebc/_native (setup.py builds it as the extension
#: edgebc._native.area_kernel; the folder is no package, so no module walk imports it).
LIBRARY = "area_kernel"

#: edgebc_area_abi() of the library this module was written against.
ABI = 1


class _Plan(ctypes.Structure):
    """edgebc_area_plan in area_kernel.c."""

    _fields_ = [
        ("out_h", ctypes.c_int32),
        ("out_w", ctypes.c_int32),
        ("rows_below", ctypes.c_void_p),
        ("row_fractions", ctypes.c_void_p),
        ("cols_below", ctypes.c_void_p),
        ("col_fractions", ctypes.c_void_p),
        ("inverse_area", ctypes.c_double),
        ("out", ctypes.c_void_p),
    ]


@dataclass(frozen=True)
class Grid:
    """One output size's cell grid on a rows x cols image, as the kernel reads it: corner rows
    and columns as (table index at or below, fraction above it), the arrays the numpy path's plan
    is made of."""

    rows: int
    cols: int
    out_h: int
    out_w: int
    rows_below: np.ndarray  # intp, out_h + 1
    row_fractions: np.ndarray  # float64, out_h + 1
    cols_below: np.ndarray  # intp, out_w + 1
    col_fractions: np.ndarray  # float64, out_w + 1
    inverse_area: float

    @functools.cached_property
    def plan(self) -> _Plan:
        """The kernel's struct for this grid (copied into each call's array: `out` is set there)."""
        for array, dtype in ((self.rows_below, np.intp), (self.cols_below, np.intp),
                             (self.row_fractions, np.float64), (self.col_fractions, np.float64)):  # fmt: skip
            if array.dtype != dtype or not array.flags.c_contiguous:
                raise ValueError(f"a grid's arrays must be contiguous {np.dtype(dtype)}")
        return _Plan(self.out_h, self.out_w, self.rows_below.ctypes.data,
                     self.row_fractions.ctypes.data, self.cols_below.ctypes.data,
                     self.col_fractions.ctypes.data, self.inverse_area, None)  # fmt: skip


class Kernel:
    """The loaded library."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._library = ctypes.CDLL(str(path))
        self._downscale = self._library.edgebc_area_downscale
        self._downscale.restype = ctypes.c_int
        self._downscale.argtypes = [ctypes.c_void_p, ctypes.c_ssize_t, ctypes.c_int32,
                                    ctypes.c_int32, ctypes.c_int32, ctypes.POINTER(_Plan)]  # fmt: skip
        abi = self._library.edgebc_area_abi
        abi.restype, abi.argtypes = ctypes.c_int, []
        self.abi = int(abi())

    def downscale(self, image: np.ndarray, grids: Sequence[Grid]) -> list[np.ndarray]:
        """`image` (8-bit grey, rows contiguous, at most MAX_TABLE_PIXELS) at each grid's size;
        the caller (edgebc.area) has checked that every grid downscales this image."""
        if image.dtype != np.uint8 or image.ndim != 2 or (image.strides[1] != 1 and image.shape[1] > 1):  # fmt: skip
            raise ValueError(f"the area kernel reads 8-bit grey rows, got {image.dtype} {image.shape} "
                             f"with strides {image.strides}")  # fmt: skip
        rows, cols = image.shape
        for g in grids:  # a grid of another size would read outside the image's table rows
            if (g.rows, g.cols) != (rows, cols) or not (
                0 < g.out_h <= rows and 0 < g.out_w <= cols
            ):
                raise ValueError(f"a {g.out_w} x {g.out_h} grid made for a {g.rows} x {g.cols} "
                                 f"image cannot downscale a {rows} x {cols} one")  # fmt: skip
        if not grids:
            return []
        outs = [np.empty((g.out_h, g.out_w), np.uint8) for g in grids]
        plans = (_Plan * len(grids))(*(g.plan for g in grids))
        for plan, out in zip(plans, outs, strict=True):
            plan.out = out.ctypes.data
        status = self._downscale(image.ctypes.data, image.strides[0], rows, cols, len(grids), plans)
        if status != 0:
            raise MemoryError("the area kernel could not allocate its row buffers")
        return outs


def library_path() -> Path | None:
    """The built library in edgebc/_native, or None where it was not built."""
    here = Path(__file__).resolve().parent / "_native"
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        candidate = here / f"{LIBRARY}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def load() -> tuple[Kernel | None, str]:
    """(the kernel, how it stands) or (None, why not): not built, or not loadable here."""
    path = library_path()
    if path is None:
        return None, (f"not built (no {LIBRARY} library in edgebc/_native; `pip install` builds "
                      "it where a C compiler is present)")  # fmt: skip
    try:
        kernel = Kernel(path)
    except (OSError, AttributeError) as exc:
        return None, f"{path.name} does not load: {exc}"
    if kernel.abi != ABI:
        return None, (f"{path.name} was built from another version of area_kernel.c (ABI "
                      f"{kernel.abi}, this edgebc needs {ABI}): reinstall edgebc")  # fmt: skip
    return kernel, f"loaded from {path.name}"
