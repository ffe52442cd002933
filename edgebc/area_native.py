"""The native area kernel (edgebc/_native/area_kernel.c) behind a numpy-shaped call: loaded with
ctypes from the library `pip install` builds in edgebc/_native.

Why a native kernel: on a cart's 1080p frame numpy's summed-area table and its reading of it
(gathers and float64 temporaries) took 0.8 ms of the 2.0 a frame from frame to decision (a
profile, docs/RUNTIME.md); the kernel makes the same downscales in one pass in about 0.5. It is an
accelerator, never a second definition: edgebc.area checks it against the numpy path when it first
loads it and uses it only if every pixel agrees, and without a C compiler at install time the
library is simply absent and the numpy path answers alike.

A library is loaded only if it was built from the very source beside it (setup.py compiles the
source's SHA-256 into it): an editable install keeps its old build after the source changes, and
a build from another source could crash the process, which no check after loading could catch.
`EDGEBC_AREA_KERNEL=numpy` switches the kernel off without touching the installation.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.machinery
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

#: The folder of the source and the library (no Python package: no module walk imports it).
NATIVE = Path(__file__).resolve().parent / "_native"

#: The library's name in NATIVE (setup.py builds it as the extension edgebc._native.area_kernel).
LIBRARY = "area_kernel"

#: The source it is built from; setup.py compiles this file's SHA-256 into the library.
SOURCE = NATIVE / "area_kernel.c"

#: Where the kernel may be switched off: "numpy" (off) or "native" (the default).
SWITCH = "EDGEBC_AREA_KERNEL"

#: The largest image (pixels) whose 8-bit table fits int32: every sum is at most 255 * H * W.
MAX_TABLE_PIXELS = (2**31 - 1) // 255


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
    is made of. Checked when made: the kernel reads the image's table rows and columns at these
    indices and one past them, so an index out of range would read outside its buffers."""

    rows: int
    cols: int
    out_h: int
    out_w: int
    rows_below: np.ndarray  # intp, out_h + 1, each in [0, rows - 1]
    row_fractions: np.ndarray  # float64, out_h + 1
    cols_below: np.ndarray  # intp, out_w + 1, each in [0, cols - 1]
    col_fractions: np.ndarray  # float64, out_w + 1
    inverse_area: float

    def __post_init__(self) -> None:
        if not (0 < self.out_h <= self.rows and 0 < self.out_w <= self.cols):
            raise ValueError(f"a {self.out_w} x {self.out_h} grid does not downscale a "
                             f"{self.rows} x {self.cols} image")  # fmt: skip
        if self.rows * self.cols > MAX_TABLE_PIXELS:
            raise ValueError(f"a {self.rows} x {self.cols} image is too large for the kernel's "
                             "32-bit table")  # fmt: skip
        for name, array, dtype, length, top in (
            ("rows_below", self.rows_below, np.intp, self.out_h + 1, self.rows - 1),
            ("cols_below", self.cols_below, np.intp, self.out_w + 1, self.cols - 1),
            ("row_fractions", self.row_fractions, np.float64, self.out_h + 1, None),
            ("col_fractions", self.col_fractions, np.float64, self.out_w + 1, None),
        ):
            if array.dtype != dtype or array.ndim != 1 or not array.flags.c_contiguous:
                raise ValueError(f"a grid's {name} must be a contiguous {np.dtype(dtype)} vector")
            if array.shape[0] != length:
                raise ValueError(f"a grid's {name} has {array.shape[0]} entries, not {length}")
            if top is not None and (array.min() < 0 or array.max() > top):
                raise ValueError(f"a grid's {name} leaves [0, {top}]")

    @functools.cached_property
    def plan(self) -> _Plan:
        """The kernel's struct for this grid (copied into each call's array: `out` is set there)."""
        return _Plan(self.out_h, self.out_w, self.rows_below.ctypes.data,
                     self.row_fractions.ctypes.data, self.cols_below.ctypes.data,
                     self.col_fractions.ctypes.data, self.inverse_area, None)  # fmt: skip


class Kernel:
    """The loaded library."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._library = ctypes.CDLL(str(path))
        source = self._library.edgebc_area_source_sha256
        source.restype, source.argtypes = ctypes.c_char_p, []
        #: The SHA-256 of the source this library was built from ("unknown" if not told).
        self.source_sha256 = (source() or b"").decode("ascii", "replace")
        self._downscale = self._library.edgebc_area_downscale
        self._downscale.restype = ctypes.c_int
        self._downscale.argtypes = [ctypes.c_void_p, ctypes.c_ssize_t, ctypes.c_int32,
                                    ctypes.c_int32, ctypes.c_int32, ctypes.POINTER(_Plan)]  # fmt: skip

    def downscale(self, image: np.ndarray, grids: Sequence[Grid]) -> list[np.ndarray]:
        """`image` (8-bit grey, rows contiguous) at each grid's size; every grid must have been
        made for this image's size (a Grid checks the rest of what the kernel relies on)."""
        if image.dtype != np.uint8 or image.ndim != 2 or (image.strides[1] != 1 and image.shape[1] > 1):  # fmt: skip
            raise ValueError(f"the area kernel reads 8-bit grey rows, got {image.dtype} {image.shape} "
                             f"with strides {image.strides}")  # fmt: skip
        rows, cols = image.shape
        for g in grids:  # a grid of another size would read outside the image's table rows
            if (g.rows, g.cols) != (rows, cols):
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
    """The built library in NATIVE, or None where it was not built."""
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        candidate = NATIVE / f"{LIBRARY}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def source_sha256() -> str | None:
    """The SHA-256 of the source beside this module (it ships in the package), None without it."""
    return hashlib.sha256(SOURCE.read_bytes()).hexdigest() if SOURCE.is_file() else None


def load() -> tuple[Kernel | None, str, bool]:
    """(the kernel, how it stands, whether an operator should hear of it) or (None, why not,
    ...): switched off, not built (no C compiler: said quietly), or a library that does not
    load or was built from another source (said loudly: the installation is off)."""
    switch = os.environ.get(SWITCH, "native")
    if switch == "numpy":
        return None, f"switched off ({SWITCH}=numpy)", False
    if switch != "native":
        return None, f"switched off: {SWITCH}={switch!r} is neither 'native' nor 'numpy'", True
    path = library_path()
    if path is None:
        return None, (f"not built (no {LIBRARY} library in edgebc/_native; `pip install` builds "
                      "it where a C compiler is present)"), False  # fmt: skip
    want = source_sha256()
    try:
        kernel = Kernel(path)
    except (OSError, AttributeError) as exc:
        return None, f"{path.name} does not load: {exc}", True
    if want is not None and kernel.source_sha256 != want:
        return None, (f"{path.name} was built from another area_kernel.c (sha256 "
                      f"{kernel.source_sha256[:12]}, the source here {want[:12]}): reinstall "
                      "edgebc"), True  # fmt: skip
    return kernel, f"loaded from {path.name}", False
