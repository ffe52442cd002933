"""The native area kernel (edgebc/_native/area_kernel.c through edgebc.area_native): built here, equal
to numpy's reading of the summed-area table on any grey image and size, and never used where it
disagrees or is missing. tests/test_area.py runs every downscale test through both paths."""

import platform
import shutil
import subprocess
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest

from edgebc import area, area_native
from edgebc.area import area_resize, area_resizes
from edgebc.synth import make_ultrasound_phantom, render_scanner_screen
from edgebc.synth.ultrasound import phantom_rng


def phantom(k: int, height: int = 400, width: int = 480) -> np.ndarray:
    return make_ultrasound_phantom("benign", phantom_rng(31, k), height, width).image


def test_the_native_kernel_is_built_and_checked():
    kernel, how = area.native_kernel_status()
    assert kernel is not None, (
        f"the native area kernel is {how}: reinstall with a C compiler present "
        "(pip install -e .); the numpy path gives the same downscales, 0.4 ms a cart frame slower"
    )
    assert how.endswith("equal to the numpy path")


def numpy_path(image, sizes):
    with area.numpy_only():
        return area_resizes(image, sizes)


@pytest.mark.parametrize("seed", range(6))
def test_the_kernel_equals_numpy_on_any_grey_image_and_size(seed):
    rng = np.random.default_rng(seed)
    rows, cols = (int(v) for v in rng.integers(2, 700, 2))
    image = rng.integers(0, 256, (rows, cols), np.uint8)
    image[: rows // 2, : cols // 2] = image[: rows // 2, : cols // 2] // 85 * 85  # exact halves
    view = image[int(rng.integers(0, rows // 2)) :, int(rng.integers(0, cols // 2)) :]
    sizes = [(int(rng.integers(1, view.shape[1] + 1)), int(rng.integers(1, view.shape[0] + 1)))
             for _ in range(4)] + [(max(1, view.shape[1] // 2), max(1, view.shape[0] // 3))]  # fmt: skip
    assert np.array_equal(np.concatenate([r.ravel() for r in area_resizes(view, sizes)]),
                          np.concatenate([r.ravel() for r in numpy_path(view, sizes)]))  # fmt: skip


@pytest.mark.parametrize(("shape", "size"), [((1, 7), (3, 1)), ((7, 1), (1, 3)), ((5, 3), (2, 2)),
                                             ((2, 9), (4, 1)), ((3, 3), (2, 3))])  # fmt: skip
def test_the_kernel_equals_numpy_on_the_smallest_images(shape, size):
    image = (np.arange(shape[0] * shape[1]).reshape(shape) * 37 % 256).astype(np.uint8)
    assert area.reads_table(image, *size)
    assert np.array_equal(area_resize(image, *size), numpy_path(image, [size])[0])


def test_the_kernel_equals_numpy_on_a_cart_frames_crop_at_the_gate_and_model_sizes():
    screen = render_scanner_screen(phantom(12), phantom_rng(31, 13), 1080, 1920)[0]
    grey = cv2.cvtColor(screen, cv2.COLOR_BGR2GRAY)[141:934, 443:1395]  # a strided view
    sizes = [(256, 213), (224, 187), (224, 224)]
    got, want = area_resizes(grey, sizes), numpy_path(grey, sizes)
    assert all(np.array_equal(a, b) for a, b in zip(got, want, strict=True))


# Sizes keeping the height or the width (whole factor 1 on one axis: exact halves everywhere on
# the other), a whole factor on one axis, and plain non-integer ones. Found by a reviewer: a
# kernel fusing the multiply-add of a corner's interpolation passed random images but differed
# from numpy on phantoms at sizes like (150, 400).
PHANTOM_SIZES = [(150, 400), (480, 133), (240, 173), (160, 400), (224, 187), (37, 11), (479, 399)]


@pytest.mark.parametrize("k", range(4))
def test_the_kernel_equals_numpy_on_phantoms_with_an_axis_kept_or_whole(k):
    image = phantom(20 + k)  # 400 x 480
    for source in (image, image & 1, image[::-1], np.asfortranarray(image)):  # & 1: ties
        got, want = area_resizes(source, PHANTOM_SIZES), numpy_path(source, PHANTOM_SIZES)
        for size, a, b in zip(PHANTOM_SIZES, got, want, strict=True):
            assert np.array_equal(a, b), size


def test_a_size_asked_for_twice_comes_back_as_two_equal_arrays():
    image = phantom(16)
    for sizes in ([(224, 187), (224, 187)], [[224, 187], [224, 187]], np.array([[224, 187]] * 2)):
        first, second = area_resizes(image, sizes)
        assert first is not second and not np.shares_memory(first, second)
        assert np.array_equal(first, second) and first.shape == (187, 224)


def test_a_one_column_view_whatever_its_stride():
    column = (np.arange(9, dtype=np.uint8) * 29)[:, None]
    for view in (np.ascontiguousarray(column.T).T, column[:, ::-1],
                 np.broadcast_to(column, (9, 1)), np.asfortranarray(column)):  # fmt: skip
        assert np.array_equal(area_resize(view, 1, 4), numpy_path(view, [(1, 4)])[0])


def test_a_grid_made_for_another_image_is_refused():
    kernel = area.native_kernel()
    if kernel is None:
        pytest.skip(f"native area kernel: {area.native_kernel_status()[1]}")
    grid = area.cell_grid(400, 480, 187, 224)
    with pytest.raises(ValueError, match="made for a 400 x 480 image cannot downscale a 300 x 480"):
        kernel.downscale(np.zeros((300, 480), np.uint8), [grid])
    assert kernel.downscale(np.zeros((400, 480), np.uint8), []) == []


def test_numpy_only_holds_only_its_own_thread_and_only_inside():
    seen = []
    with area.numpy_only():
        worker = threading.Thread(target=lambda: seen.append(area._workspace.numpy_only))
        worker.start()
        worker.join()
        assert area._workspace.numpy_only
    assert seen == [False] and not area._workspace.numpy_only


def test_a_kernel_that_disagrees_anywhere_is_not_used(monkeypatch, caplog):
    class OffByOne:
        """A kernel whose rounding moved: one pixel a grey level up."""

        def __init__(self, kernel):
            self.kernel = kernel

        def downscale(self, image, grids):
            outs = self.kernel.downscale(image, grids)
            if grids and grids[0].out_h == 17:  # only the second check image's first size
                outs[0][3, 5] += 1
            return outs

    kernel = area.native_kernel()
    if kernel is None:
        pytest.skip(f"native area kernel: {area.native_kernel_status()[1]}")
    monkeypatch.setattr(area.area_native, "load", lambda: (OffByOne(kernel), "loaded", False))
    area.native_kernel_status.cache_clear()
    try:
        got, how = area.native_kernel_status()
        assert got is None and "differs from the numpy path" in how and "96 x 64" in how
        assert "numpy path" in caplog.text
        image = phantom(14)
        assert np.array_equal(area_resize(image, 224, 187), numpy_path(image, [(224, 187)])[0])
    finally:
        area.native_kernel_status.cache_clear()


def test_without_the_library_the_numpy_path_answers_and_says_why(monkeypatch):
    monkeypatch.setattr(area.area_native, "library_path", lambda: None)
    area.native_kernel_status.cache_clear()
    try:
        kernel, how = area.native_kernel_status()
        assert kernel is None and how.startswith("not built")
        image = phantom(15)
        assert np.array_equal(area_resize(image, 224, 187), numpy_path(image, [(224, 187)])[0])
    finally:
        area.native_kernel_status.cache_clear()


SOURCE = Path(area_native.__file__).parent / "_native" / "area_kernel.c"


def build(tmp_path, source: str, *flags: str) -> Path:
    """`source` built as the library is (setup.py's flags unless `flags` say otherwise), under a
    name of its own (the dynamic loader hands back a library already loaded from the same path)."""
    if shutil.which("gcc") is None:
        pytest.skip("no gcc here to build a kernel variant")
    name = f"variant{len(list(tmp_path.glob('variant*.so')))}"
    c_file, library = tmp_path / f"{name}.c", tmp_path / f"{name}.so"
    c_file.write_text(source)
    subprocess.run(["gcc", "-O3", "-fPIC", "-shared", *(flags or ("-ffp-contract=off",)),
                    "-o", str(library), str(c_file)], check=True, capture_output=True)  # fmt: skip
    return library


def loaded(library: Path) -> area_native.Kernel:
    return area_native.Kernel(library)


@pytest.mark.parametrize(
    ("change", "flags"),
    [
        # rounding half up instead of half to even
        (("return (uint8_t)(int32_t)((value + magic) - magic);", "(void)magic; return (uint8_t)(value + 0.5);"), ()),
        # another order: interpolate from the right entry
        (("(double)left + (double)(int32_t)(right - left) * plan->col_fractions[j]",
          "(double)right - (double)(int32_t)(right - left) * (1.0 - plan->col_fractions[j])"), ()),
        # the cell's mean divided by its area, not multiplied by the inverse
        (("* plan->inverse_area;", "/ (1.0 / plan->inverse_area);"), ()),
    ],
    ids=["half-up", "from-the-right", "divide"],
)  # fmt: skip
def test_the_check_refuses_kernels_that_round_or_order_otherwise(tmp_path, change, flags):
    """Variants of the real source, each wrong only where the arithmetic's rounding shows."""
    source = SOURCE.read_text()
    assert source.count(change[0]) == 1
    kernel = loaded(build(tmp_path, source.replace(*change), *flags))
    assert "differs from the numpy path's" in (area._differs_from_numpy(kernel) or "")


def test_the_check_refuses_a_build_with_fused_multiply_adds(tmp_path):
    if platform.machine() == "aarch64":  # fused multiply-adds are baseline there
        flags = ("-ffp-contract=fast",)
    else:
        cpu = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
        if " fma " not in cpu:
            pytest.skip("this CPU has no FMA instructions to build the variant with")
        flags = ("-ffp-contract=fast", "-mfma")
    kernel = loaded(build(tmp_path, SOURCE.read_text(), *flags))
    assert "differs from the numpy path's" in (area._differs_from_numpy(kernel) or "")


def test_fast_math_builds_are_refused_at_compile_time(tmp_path):
    with pytest.raises(subprocess.CalledProcessError) as failed:
        build(tmp_path, SOURCE.read_text(), "-ffast-math")
    assert b"must not be built with -ffast-math" in failed.value.stderr


def test_a_library_built_from_another_source_is_not_loaded(tmp_path, monkeypatch, caplog):
    """An editable install keeps its old library after the source changes; one built from
    another source could crash the process, so it is never loaded (and said loudly)."""
    source = SOURCE.read_text()
    library = build(tmp_path, source, "-ffp-contract=off", '-DEDGEBC_AREA_SOURCE_SHA256="0123abcd"')
    monkeypatch.setattr(area_native, "library_path", lambda: library)
    kernel, how, loud = area_native.load()
    assert kernel is None and loud
    assert "built from another area_kernel.c (sha256 0123abcd" in how and "reinstall" in how
    area.native_kernel_status.cache_clear()
    try:
        assert area.native_kernel_status() == (None, how)
        assert "WARNING" in caplog.text or any(r.levelname == "WARNING" for r in caplog.records)
    finally:
        area.native_kernel_status.cache_clear()
    # the same source built as setup.py builds it is loaded
    digest = area_native.source_sha256()
    same = build(tmp_path, source, "-ffp-contract=off", f'-DEDGEBC_AREA_SOURCE_SHA256="{digest}"')
    monkeypatch.setattr(area_native, "library_path", lambda: same)
    kernel, how, loud = area_native.load()
    assert kernel is not None and kernel.source_sha256 == digest and not loud


@pytest.mark.parametrize(
    ("value", "loud"), [("numpy", False), ("nump", True), ("", True)]
)  # fmt: skip
def test_the_kernel_can_be_switched_off_and_a_wrong_switch_is_said(monkeypatch, value, loud):
    monkeypatch.setenv(area_native.SWITCH, value)
    kernel, how, said = area_native.load()
    assert kernel is None and said == loud and how.startswith("switched off")
    area.native_kernel_status.cache_clear()
    try:
        assert area.native_kernel_status()[0] is None
        image = phantom(17)
        assert np.array_equal(area_resize(image, 224, 187), numpy_path(image, [(224, 187)])[0])
    finally:
        area.native_kernel_status.cache_clear()


def test_a_grid_the_kernel_would_read_outside_of_is_refused_when_made():
    good = area.cell_grid(400, 480, 187, 224)
    fields = {f: getattr(good, f) for f in good.__dataclass_fields__}
    below = good.rows_below.copy()
    below[-1] = 400  # one row past the image: the kernel would read past its table
    for change, words in [
        ({"rows_below": below}, r"rows_below leaves \[0, 399\]"),
        ({"cols_below": good.cols_below[:-1].copy()}, "cols_below has 224 entries, not 225"),
        ({"row_fractions": good.row_fractions.astype(np.float32)}, "contiguous float64"),
        ({"rows": 3000, "cols": 3000}, "too large for the kernel's 32-bit table"),
        ({"out_h": 401}, "does not downscale"),
    ]:
        with pytest.raises(ValueError, match=words):
            area_native.Grid(**{**fields, **change})
