"""Coverage-guided fuzzing of every decoder entry point of edgebc.decode (issue 18).

Each input goes through sniff_format, read_header (a prefix and the whole file), read_image_view,
decode_image and decode_dicom_frames (each at the display depth and at full depth), and every
decoded image through to_grey_uint8 (read_image is decode_image over the file's bytes; the
regression test covers it). A *finding* is any of:

- an exception other than the module's documented ones (ImageDecodeError, DecodeBusyError), or a
  decoded image that does not match its header (`crash`, `invalid`);
- an input that takes longer than --timeout-s (`hang`; libFuzzer also kills a true hang);
- peak RSS during one input beyond 128 MiB + 4x the decoded bytes its header may declare
  (`memory`). Atheris instruments Python, not libpng/libjpeg inside OpenCV, so memory is measured
  on the process: the kernel's peak-RSS mark (VmHWM) is reset before each input and read after.
  An address-space limit (RLIMIT_AS) keeps a runaway allocation from taking the machine down.

Every finding is written to FINDINGS/<kind>-<sha1>.bin with a .txt note; the run continues and
exits 1 if any was found. Copy a finding's .bin and a one-line note to tests/data/fuzz/ to keep it
as a regression test (tests/test_fuzz_regressions.py).

    python tools/fuzz_decode.py --target all --seconds 60
    python tools/fuzz_decode.py --target png --runs 1000000 --corpus /tmp/corpus
    python tools/fuzz_decode.py --make-seeds DIR

Seeds are generated from the project's phantoms (edgebc.synth), never taken from real data.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import logging
import re
import resource
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import cv2
import numpy as np

TARGETS = ("png", "pgm", "jpeg", "dicom")
SLACK_BYTES = 128 * 1024**2
DECODED_BYTES_FACTOR = 4
ADDRESS_SPACE_HEADROOM = 4 * 1024**3


# -- seeds --------------------------------------------------------------------------------------


def make_seeds(folder: Path) -> list[Path]:
    """Write small PNG, PGM, JPEG and DICOM seeds (8/16-bit, grey/colour, cine) made from phantoms."""
    from edgebc.synth import make_cine, make_mammo_phantom, make_ultrasound_phantom

    rng = np.random.default_rng(18)
    grey = cv2.resize(make_ultrasound_phantom("malignant", rng, 64, 64).image, (24, 20))
    mammo = cv2.resize(make_mammo_phantom("benign", rng, 64).image, (20, 24))
    grey16 = mammo.astype(np.uint16) * 257
    colour = cv2.applyColorMap(grey, cv2.COLORMAP_BONE)
    cine = [cv2.resize(f, (16, 12)) for f in make_cine("benign", rng, frames=3, height=32, width=32)[0]]  # fmt: skip
    seeds: dict[str, bytes] = {
        "png-grey8.png": _encode(".png", grey),
        "png-grey16.png": _encode(".png", grey16),
        "png-bgr8.png": _encode(".png", colour),
        "png-bgr16.png": _encode(".png", colour.astype(np.uint16) * 257),
        "png-bgra8.png": _encode(".png", cv2.cvtColor(colour, cv2.COLOR_BGR2BGRA)),
        "png-palette.png": _palette_png(grey // 64),
        "pgm-grey8.pgm": b"P5\n# mini-MIAS style\n20 24\n255\n" + mammo.tobytes(),
        "pgm-grey12.pgm": b"P5\n20 24\n4095\n" + (mammo.astype(">u2") * 16).tobytes(),
        "jpeg-grey.jpg": _encode(".jpg", grey),
        "jpeg-bgr.jpg": _encode(".jpg", colour),
        "jpeg-progressive.jpg": _encode(".jpg", colour, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1]),
        "jpeg-restart.jpg": _encode(".jpg", colour, [cv2.IMWRITE_JPEG_RST_INTERVAL, 1]),
        "dicom-grey8.dcm": _dicom(grey[np.newaxis]),
        "dicom-grey16-windowed.dcm": _dicom(
            grey16[np.newaxis],
            RescaleSlope=2,
            RescaleIntercept=-5,
            WindowCenter=30000,
            WindowWidth=40000,
        ),
        "dicom-monochrome1.dcm": _dicom(mammo[np.newaxis], "MONOCHROME1"),
        "dicom-mammo-voi-lut.dcm": _dicom(
            (mammo.astype(np.uint16) * 16)[np.newaxis],
            "MONOCHROME1",
            VOILUTSequence=[_voi_lut(np.linspace(0, 4095, 64).astype("<u2"), 1000, 12)],
            ImageLaterality="L",
            ViewPosition="MLO",
            PatientOrientation=["A", "FR"],
        ),
        "dicom-mammo-sigmoid.dcm": _dicom(
            (mammo.astype(np.uint16) * 16)[np.newaxis],
            WindowCenter=2048,
            WindowWidth=1024,
            VOILUTFunction="SIGMOID",
        ),
        "dicom-rgb.dcm": _dicom(cv2.cvtColor(colour, cv2.COLOR_BGR2RGB)[np.newaxis], "RGB"),
        "dicom-ybr.dcm": _dicom(
            cv2.cvtColor(colour, cv2.COLOR_BGR2YCrCb)[np.newaxis][..., [0, 2, 1]], "YBR_FULL"
        ),
        "dicom-cine.dcm": _dicom(np.stack(cine)),
        "dicom-cine-rle.dcm": _dicom(np.stack(cine), rle=True),
    }
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, data in seeds.items():
        (folder / name).write_bytes(data)
        written.append(folder / name)
    return written


def _encode(ext: str, image: np.ndarray, params: list[int] | None = None) -> bytes:
    ok, buffer = cv2.imencode(ext, image, params or [])
    if not ok:
        raise RuntimeError(f"OpenCV could not encode a {ext} seed")
    return buffer.tobytes()


def _palette_png(indices: np.ndarray) -> bytes:
    """A 2-bit palette PNG, which OpenCV cannot write; built from its chunks."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body)
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    height, width = indices.shape
    packed = np.zeros((height, (width + 3) // 4), np.uint8)
    for k in range(width):
        packed[:, k // 4] |= (indices[:, k].astype(np.uint8) & 3) << (6 - 2 * (k % 4))
    rows = b"".join(b"\0" + row.tobytes() for row in packed)
    ihdr = struct.pack(">IIBBBBB", width, height, 2, 3, 0, 0, 0)
    palette = bytes(np.repeat(np.array([0, 85, 170, 255], np.uint8), 3))
    return b"\x89PNG\r\n\x1a\n" + b"".join(
        chunk(kind, body)
        for kind, body in [
            (b"IHDR", ihdr), (b"PLTE", palette), (b"tRNS", b"\xff\x80"),
            (b"IDAT", zlib.compress(rows)), (b"IEND", b""),
        ]
    )  # fmt: skip


def _dicom(frames: np.ndarray, photometric: str = "MONOCHROME2", rle: bool = False, **extra: object) -> bytes:  # fmt: skip
    """An ultrasound DICOM of `frames` (FxHxW or FxHxWx3, uint8 or uint16)."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, RLELossless, UltrasoundImageStorage

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UltrasoundImageStorage
    meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.10.18.1"
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = UltrasoundImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = frames.shape[1:3]
    ds.SamplesPerPixel = 3 if frames.ndim == 4 else 1
    if ds.SamplesPerPixel == 3:
        ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = photometric
    bits = frames.itemsize * 8
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
    if len(frames) > 1:
        ds.NumberOfFrames = len(frames)
    ds.PixelData = frames.tobytes()
    for keyword, value in extra.items():
        setattr(ds, keyword, value)
    if rle:
        ds.compress(RLELossless)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _voi_lut(table: np.ndarray, first: int, bits: int) -> object:
    """A VOI LUT item: `table` (uint16) mapping values from `first` on, `bits` bits per entry."""
    import pydicom

    item = pydicom.Dataset()
    item.LUTDescriptor = [len(table), first, bits]
    item.LUTData = table.astype("<u2").tobytes()
    return item


# -- one input ----------------------------------------------------------------------------------


class Finding(Exception):
    """An input did something the decoders promise not to do."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind


def exercise(data: bytes) -> None:
    """Run `data` through every public entry point; raise anything but the documented errors."""
    from functools import partial

    from edgebc.decode import (
        decode_dicom_frames,
        decode_image,
        read_header,
        read_image_view,
        sniff_format,
        to_grey_uint8,
    )

    sniff_format(data)
    header = None
    for whole_file in (False, True):
        try:
            header = read_header(data, "fuzz", whole_file=whole_file)
        except _documented_errors():
            header = None
    try:
        read_image_view(data, "fuzz")
    except _documented_errors():
        pass
    for decode, full_depth in (
        (decode_image, False),
        (decode_dicom_frames, False),
        (decode_image, True),
        (decode_dicom_frames, True),
    ):
        try:
            decoded = partial(decode, full_depth=full_depth)(data, "fuzz")
        except _documented_errors():
            continue
        images = decoded if isinstance(decoded, list) else [decoded]
        if header is None:
            raise Finding("invalid", f"{decode.__name__} decoded a file whose header was refused")
        if len(images) != header.frames:
            raise Finding("invalid", f"{decode.__name__} gave {len(images)} images for {header}")
        for image in images:
            if (
                not isinstance(image, np.ndarray)
                or image.shape[:2] != (header.height, header.width)
                or image.dtype not in (np.uint8, np.uint16)
                or image.ndim not in (2, 3)
                or (image.ndim == 3 and image.shape[2] != 3)
            ):
                raise Finding(
                    "invalid",
                    f"{decode.__name__} gave {getattr(image, 'shape', image)!r} for header {header}",
                )
            to_grey_uint8(image)


def _documented_errors() -> tuple[type[Exception], ...]:
    from edgebc.decode import DecodeBusyError
    from edgebc.errors import ImageDecodeError

    return (ImageDecodeError, DecodeBusyError)


def allowed_peak_bytes(data: bytes) -> int:
    """Peak RSS growth one input may cause: slack plus a multiple of what its header may admit."""
    from edgebc.decode import DEFAULT_MAX_DECODED_BYTES, DEFAULT_MAX_DICOM_BYTES, read_header

    try:
        header = read_header(data, whole_file=True)
    except _documented_errors():
        return SLACK_BYTES
    cap = DEFAULT_MAX_DICOM_BYTES if header.format == "dicom" else DEFAULT_MAX_DECODED_BYTES
    return SLACK_BYTES + DECODED_BYTES_FACTOR * min(header.decoded_bytes, cap)


def status_bytes(field: str) -> int:
    """A memory figure of this process from /proc/self/status: VmRSS, VmHWM (peak RSS), VmSize."""
    found = re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text())
    return int(found.group(1)) * 1024 if found else 0


def reset_peak_rss() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0), so the next reading is this input's peak."""
    Path("/proc/self/clear_refs").write_text("5")


def check_input(data: bytes, timeout_s: float) -> None:
    """Exercise one input and raise Finding for a crash, an invalid image, a hang or a blow-up."""
    rss_before = status_bytes("VmRSS")
    reset_peak_rss()
    start = time.perf_counter()
    try:
        exercise(data)
    except Finding:
        raise
    except Exception as exc:  # anything undocumented is exactly what fuzzing looks for
        trace = "".join(traceback.format_exception(exc))
        raise Finding("crash", f"{type(exc).__name__}: {exc}\n{trace}") from exc
    elapsed = time.perf_counter() - start
    grown = status_bytes("VmHWM") - rss_before
    if elapsed > timeout_s:
        raise Finding("hang", f"took {elapsed:.1f} s, over the {timeout_s:g} s per-input limit")
    allowed = allowed_peak_bytes(data)
    if grown > allowed:
        raise Finding("memory", f"peak RSS grew {grown / 2**20:.0f} MiB during this input, over "
                      f"the {allowed / 2**20:.0f} MiB allowed")  # fmt: skip


def record_finding(findings: Path, data: bytes, finding: Finding) -> Path:
    """Write the input's bytes and what it did; returns the .bin path."""
    findings.mkdir(parents=True, exist_ok=True)
    path = findings / f"{finding.kind}-{hashlib.sha1(data).hexdigest()[:16]}.bin"
    path.write_bytes(data)
    path.with_suffix(".txt").write_text(f"{finding}\n")
    return path


# -- the fuzzing process ------------------------------------------------------------------------


def fuzz_child(args: argparse.Namespace) -> None:
    """Run libFuzzer in this process (it exits when done); findings are recorded, not fatal."""
    try:
        import atheris
    except ImportError:
        sys.exit("atheris is needed to fuzz: pip install atheris (Linux x86_64 or macOS wheels)")
    cv2.setNumThreads(1)
    # pydicom warns about every malformed field; a million inputs would fill the log (and the
    # warnings registry, which remembers each distinct message)
    warnings.simplefilter("ignore")
    logging.disable(logging.WARNING)
    _soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = status_bytes("VmSize") + ADDRESS_SPACE_HEADROOM
    if hard == resource.RLIM_INFINITY or limit < hard:
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    findings = Path(args.findings)

    def test_one_input(data: bytes) -> None:
        try:
            check_input(data, args.timeout_s)
        except Finding as finding:
            path = record_finding(findings, data, finding)
            print(f"fuzz: FINDING {finding.kind} -> {path}", file=sys.stderr, flush=True)

    # pydicom is Python too: instrumenting it guides the fuzzer through DICOM parsing
    with atheris.instrument_imports(include=["edgebc", "pydicom"]):
        import pydicom.pixels  # noqa: F401

        import edgebc.decode  # noqa: F401

    libfuzzer_args = [
        sys.argv[0],
        f"-timeout={int(args.timeout_s * 3)}",
        "-rss_limit_mb=6144",
        f"-artifact_prefix={findings}/",
        "-print_final_stats=1",
        f"-max_len={args.max_len}",
        *([f"-runs={args.runs}"] if args.runs else [f"-max_total_time={args.seconds}"]),
        args.corpus,
    ]
    atheris.Setup(libfuzzer_args, test_one_input)
    atheris.Fuzz()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", choices=[*TARGETS, "all"], default="all",
                        help="which seeds to start from (every entry point sees every input)")  # fmt: skip
    amount = parser.add_mutually_exclusive_group()
    amount.add_argument("--runs", type=int, help="stop after this many executions")
    amount.add_argument("--seconds", type=int, default=60, help="stop after this long (default 60)")
    parser.add_argument(
        "--corpus", help="corpus folder (kept; seeded if empty); default: a temp one"
    )
    parser.add_argument("--findings", default=str(Path(tempfile.gettempdir()) / "edgebc-fuzz-findings"),
                        help="where findings are written (default: TMPDIR/edgebc-fuzz-findings)")  # fmt: skip
    parser.add_argument("--timeout-s", type=float, default=10.0, help="per-input time limit")
    parser.add_argument("--max-len", type=int, default=16384, help="largest input in bytes")
    parser.add_argument("--make-seeds", metavar="DIR", help="only write the seed corpus to DIR")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.make_seeds:
        for path in make_seeds(Path(args.make_seeds)):
            print(path)
        return 0
    if args.child:
        fuzz_child(args)  # libFuzzer exits the process
        return 0
    with tempfile.TemporaryDirectory(prefix="edgebc-fuzz-") as scratch:
        corpus = Path(args.corpus or scratch)
        corpus.mkdir(parents=True, exist_ok=True)
        if not any(corpus.iterdir()):
            for seed in make_seeds(Path(scratch) / "seeds"):
                if args.target == "all" or seed.name.startswith(args.target):
                    (corpus / seed.name).write_bytes(seed.read_bytes())
        return _run_child(args, corpus)


def _run_child(args: argparse.Namespace, corpus: Path) -> int:
    """Fuzz in a child process (libFuzzer exits when done), then summarise what it did."""
    findings = Path(args.findings)
    findings.mkdir(parents=True, exist_ok=True)
    before = set(findings.iterdir())
    command = [sys.executable, __file__, "--child", "--target", args.target, "--corpus",
               str(corpus), "--findings", str(findings), "--timeout-s", str(args.timeout_s),
               "--max-len", str(args.max_len),
               *(["--runs", str(args.runs)] if args.runs else ["--seconds", str(args.seconds)])]  # fmt: skip
    log_path = findings / f"libfuzzer-{args.target}.log"
    print(f"fuzz: libFuzzer's log: {log_path}", flush=True)
    start = time.monotonic()
    with log_path.open("w") as log_file:  # libjpeg's warnings alone would fill a pipe's memory
        child = subprocess.run(command, stderr=log_file, check=False)
    wall = time.monotonic() - start
    with log_path.open("rb") as log_file:
        log_file.seek(max(0, log_path.stat().st_size - 65536))
        log = log_file.read().decode(errors="replace")
    runs = re.findall(r"stat::number_of_executed_units:\s*(\d+)", log)
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    new = sorted(p for p in set(findings.iterdir()) - before if p.suffix not in (".txt", ".log"))
    kinds = {k: sum(p.name.startswith(k) for p in new) for k in ("crash", "invalid", "hang",
                                                                 "memory", "timeout", "oom")}  # fmt: skip
    print(f"fuzz: target {args.target}: {runs[-1] if runs else '?'} executions in {wall:.0f} s, "
          f"peak RSS {peak_mb:.0f} MB, findings: "
          + ", ".join(f"{k} {n}" for k, n in kinds.items()))  # fmt: skip
    for path in new[:20]:
        print(f"fuzz: finding {path} ({path.with_suffix('.txt').read_text().splitlines()[0]})")
    if new or child.returncode != 0:
        print(
            f"fuzz: FAILED (libFuzzer exit {child.returncode}, {len(new)} findings in {findings})"
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
