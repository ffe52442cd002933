"""Every input that ever crashed, hung or blew memory in edgebc.decode stays fixed (issue 18).

tests/data/fuzz/ holds one file per finding, NAME.bin, beside a one-line note of what it did,
NAME.txt: the form in which tools/fuzz_decode.py writes its findings, so a new one is kept by
copying the .bin and trimming its note to that first line. Each input goes through every decoder
entry point by the fuzzer's own check (a documented error or a valid image, within its time and
peak-RSS bounds) and through read_image from a file.
"""

import importlib
import sys
from pathlib import Path

import pytest

from edgebc.decode import read_image
from edgebc.errors import ImageDecodeError

FUZZ_DIR = Path(__file__).parent / "data" / "fuzz"
CASES = sorted(FUZZ_DIR.glob("*.bin"))


@pytest.fixture(scope="module")
def fuzz_tool():
    """tools/fuzz_decode.py, imported as a module (it is a script beside the package)."""
    pytest.importorskip("pydicom")
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
    try:
        return importlib.import_module("fuzz_decode")
    finally:
        sys.path.pop(0)


def test_every_kept_input_has_a_one_line_note():
    assert len(CASES) >= 6  # the 45-byte PNG of issue 18 and the fuzzer's five DICOM findings
    for case in CASES:
        note = case.with_suffix(".txt")
        assert note.is_file(), f"{case.name} has no note {note.name}"
        lines = note.read_text().strip().splitlines()
        assert len(lines) == 1 and lines[0].split(":")[0] in ("crash", "invalid", "hang", "memory")


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.stem)
@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns about each malformed field
def test_kept_input_gets_a_clear_error_or_a_valid_image(case, fuzz_tool):
    data = case.read_bytes()
    try:
        fuzz_tool.check_input(data, timeout_s=10.0)
    except fuzz_tool.Finding as finding:
        pytest.fail(
            f"{case.name} ({case.with_suffix('.txt').read_text().strip()}) still: {finding}"
        )
    try:
        image = read_image(case)
    except ImageDecodeError:
        return
    assert image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)


def test_the_check_reports_an_undocumented_error_as_a_finding(fuzz_tool, monkeypatch):
    """The check above must be able to fail: a raw error from a decoder is a finding."""
    import edgebc.decode

    def broken(data, name="<buffer>", **_):
        raise TypeError("raw")

    monkeypatch.setattr(edgebc.decode, "decode_image", broken)
    with pytest.raises(fuzz_tool.Finding, match="crash: TypeError: raw"):
        fuzz_tool.check_input(CASES[0].read_bytes(), timeout_s=10.0)


def test_the_check_reports_a_hang_and_a_memory_blow_up_as_findings(fuzz_tool, monkeypatch):
    import time

    import numpy as np

    import edgebc.decode

    def slow(*args, **kwargs):
        time.sleep(0.2)
        raise ImageDecodeError("refused, slowly")

    monkeypatch.setattr(edgebc.decode, "decode_image", slow)
    with pytest.raises(fuzz_tool.Finding, match="hang: took"):
        fuzz_tool.check_input(CASES[0].read_bytes(), timeout_s=0.1)

    def allocate(*args, **kwargs):
        block = np.ones(300 * 2**20, np.uint8)  # touched, so resident
        raise ImageDecodeError(f"refused after allocating {block.nbytes} bytes")

    monkeypatch.setattr(edgebc.decode, "decode_image", allocate)
    with pytest.raises(fuzz_tool.Finding, match="memory: peak RSS grew"):
        fuzz_tool.check_input(CASES[0].read_bytes(), timeout_s=10.0)
