"""Safe decoding of PNG, JPEG, PGM and DICOM into OpenCV-convention arrays (grey HxW or BGR HxWx3).

Files come from capture cards, USB sticks and uploads, so nothing is trusted: the format is
identified by its magic bytes (never by the file name); the PNG chunk and JPEG marker structure is
walked and checked against the bytes present before any decoder sees them (a 45-byte PNG whose
chunk length no file of its size can hold made libpng allocate 4 GB); the decoded size (width x
height x channels x bytes per sample, x frames for DICOM) is read from the header and refused
*before* any pixel is decoded, per image and across every thread of the process (a 311 KB PNG can
declare 320 MB of pixels); and a truncated or lying file is refused rather than decoded into a
partly grey picture, which libjpeg does without complaint.

Depth: by default a grey DICOM frame is made display-ready in 8 bits (what an ultrasound screen
shows). With `full_depth=True` it comes as uint16 over 0..65535 instead: the modality LUT or
rescale, then the VOI LUT table or the window (mapped onto 0..65535, not 0..255), else the
modality's nominal range (a 12-bit mammogram stored in 16 bits is scaled by 65535/4095), then
MONOCHROME1 inverted; worked in blocks of rows, so a 4096x3328 mammogram never has a
full-frame float copy. PNG keeps its own depth either way (a 16-bit PNG decodes to uint16).
`read_image_view` reads what a DICOM header says about a mammogram's view (breast side, view
position, the image edge the chest wall lies on) without decoding pixels; `read_study` the study
and patient a file belongs to, hashed (never the fields themselves).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import math
import re
import struct
import threading
import time
import warnings
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np

from edgebc.errors import EdgebcError, ImageDecodeError
from edgebc.optional import require

ImageFormat = Literal["png", "jpeg", "dicom", "pgm"]

#: Default ceiling on width*height; 8K UHD is 33 Mpx, a 4K x 4K full-field mammogram 16 Mpx.
DEFAULT_MAX_PIXELS = 40_000_000
#: Default ceiling on one image's decoded bytes: admits a 4K capture frame (3840x2160x3 = 24 MB)
#: and a 16-bit full-field mammogram (4096x3328x2 = 27 MB) with room to spare; refuses the 320 MB
#: that a 311 KB PNG can declare.
DEFAULT_MAX_DECODED_BYTES = 64 * 1024**2
#: DICOM cines multiply pixels by frames; cap a whole file's decoded bytes (all frames) instead.
DEFAULT_MAX_DICOM_BYTES = 512 * 1024**2
#: Decoded bytes in flight across all threads of the process (uploads, sources, classify workers).
DEFAULT_SHARED_DECODE_BYTES = 512 * 1024**2
#: How long a decode waits for the shared budget before it is refused as busy.
DEFAULT_BUDGET_WAIT_S = 5.0

_MAX_PNG_CHUNK = 2**31 - 1  # the PNG spec's limit on a chunk length
#: PNG colour type -> (channels OpenCV decodes it to, legal bit depths).
_PNG_COLOUR_TYPES = {
    0: (1, {1, 2, 4, 8, 16}),  # grey
    2: (3, {8, 16}),  # RGB
    3: (4, {1, 2, 4, 8}),  # palette (counted as 4: a tRNS chunk makes it BGRA)
    4: (4, {8, 16}),  # grey + alpha (OpenCV expands it to BGRA)
    6: (4, {8, 16}),  # RGBA
}

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
#: The next marker inside entropy-coded data: 0xFF not followed by a stuffed 0x00, a restart
#: marker (0xD0-0xD7) or another fill 0xFF.
_JPEG_NEXT_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
#: Scan data inserted before EOI to test whether the scan was complete (see _check_jpeg_scan).
_JPEG_PROBE = bytes(np.random.default_rng(18).integers(0, 255, 4096, dtype=np.uint8))


class DecodeBusyError(EdgebcError):
    """The process-wide decoded-bytes budget stayed full for longer than the caller would wait.

    Not a fault of the file (not a ValueError): a server answers it 503 with Retry-After."""


class DecodeBudget:
    """A thread-safe count of decoded bytes in flight, shared by every decode in the process.

    A decode reserves its header-declared size before decoding and returns it after; one that
    does not fit waits (up to `wait_s`) for others to finish, then is refused as busy. One bigger
    than the whole budget is refused at once, since waiting cannot help it.
    """

    def __init__(self, capacity: int) -> None:
        self._cond = threading.Condition()
        self._in_flight = 0
        self.set_capacity(capacity)

    def set_capacity(self, capacity: int) -> None:
        """Change the budget (a setting); reservations already held stay valid."""
        if capacity <= 0:
            raise ValueError(f"decode budget must be a positive number of bytes, got {capacity}")
        with self._cond:
            self.capacity = capacity
            self._cond.notify_all()

    @property
    def in_flight(self) -> int:
        """Bytes reserved right now."""
        with self._cond:
            return self._in_flight

    @contextlib.contextmanager
    def reserve(self, nbytes: int, name: str, wait_s: float) -> Iterator[None]:
        """Hold `nbytes` of the budget for the duration of the block."""
        with self._cond:
            if nbytes > self.capacity:
                raise ImageDecodeError(
                    f"{name}: decoding needs {nbytes} bytes, over the process-wide decode budget "
                    f"of {self.capacity} bytes"
                )
            deadline = time.monotonic() + wait_s
            while self._in_flight + nbytes > self.capacity:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise DecodeBusyError(
                        f"{name}: the decode budget is busy ({self._in_flight} of {self.capacity} "
                        f"bytes in flight, {nbytes} more needed for {wait_s:g} s); retry later"
                    )
                self._cond.wait(left)
            self._in_flight += nbytes
        try:
            yield
        finally:
            with self._cond:
                self._in_flight -= nbytes
                self._cond.notify_all()


#: The one budget that uploads, frame sources and classify workers share by default.
SHARED_DECODE_BUDGET = DecodeBudget(DEFAULT_SHARED_DECODE_BYTES)


@dataclass(frozen=True)
class ImageHeader:
    """What the header declares, read without decoding pixels."""

    format: ImageFormat
    width: int
    height: int
    frames: int = 1
    channels: int = 1  # as the decoder allocates them (palette PNG: 4, grey+alpha PNG: 4)
    bytes_per_sample: int = 1

    @property
    def decoded_bytes(self) -> int:
        """What decoding allocates for the pixels: width x height x channels x bytes x frames."""
        return self.width * self.height * self.channels * self.bytes_per_sample * self.frames


def sniff_format(data: bytes) -> ImageFormat | None:
    """The format named by the magic bytes, or None for anything else."""
    if data.startswith(_PNG_MAGIC):
        return "png"
    if data.startswith(_JPEG_MAGIC):
        return "jpeg"
    if len(data) >= 132 and data[128:132] == b"DICM":
        return "dicom"
    if data[:2] == b"P5" and data[2:3].isspace():
        return "pgm"
    return None


def read_header(data: bytes, name: str = "<buffer>", whole_file: bool = False) -> ImageHeader:
    """Identify the format and read the declared size; raise ImageDecodeError for anything else.

    `data` may be the first bytes of a file (what is there must be consistent); with `whole_file`
    the whole structure is checked too (every PNG chunk to IEND, every JPEG scan to EOI), as the
    decoders do before decoding."""
    kind = sniff_format(data)
    if kind == "png":
        return _png_header(data, name, whole_file)
    if kind == "jpeg":
        return _walk_jpeg(data, name, whole_file)[0]
    if kind == "dicom":
        return _dicom_header(data, name)
    if kind == "pgm":
        return _pgm_header(data, name, whole_file)[0]
    if data[:2] in (b"P2", b"P1", b"P4", b"P3", b"P6") and data[2:3].isspace():
        raise ImageDecodeError(
            f"{name}: a Netpbm {data[:2].decode()} file; only binary grey PGM (P5) is read"
        )
    head = data[:8].hex(" ") if data else "an empty file"
    raise ImageDecodeError(f"{name}: expected a PNG, JPEG, PGM or DICOM file, got {head}")


def decode_image(
    data: bytes,
    name: str = "<buffer>",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES,
    budget: DecodeBudget | None = SHARED_DECODE_BUDGET,
    wait_s: float = DEFAULT_BUDGET_WAIT_S,
    full_depth: bool = False,
) -> np.ndarray:
    """Decode one image to uint8/uint16 grey (HxW) or uint8 BGR (HxWx3); alpha is dropped.

    The header is checked (structure, pixels, decoded bytes) before any pixel is decoded, and the
    decode holds its decoded bytes of `budget` (None: no shared budget) while it runs.
    A multi-frame DICOM is refused here: use `decode_dicom_frames` for cine loops.
    `full_depth`: a grey DICOM comes as uint16 over 0..65535 rather than display-ready uint8
    (see the module docstring); PNG and JPEG keep their own depth either way.
    """
    header = read_header(data, name, whole_file=True)
    _check_size(header, name, max_pixels, max_decoded_bytes)
    if header.format == "dicom":
        if header.frames != 1:
            raise ImageDecodeError(
                f"{name}: DICOM has {header.frames} frames; read it as a cine "
                "(decode_dicom_frames) or pick one frame"
            )
        frames = decode_dicom_frames(
            data,
            name,
            max_pixels,
            max_decoded_bytes,
            budget=budget,
            wait_s=wait_s,
            full_depth=full_depth,
        )
        return frames[0]
    if header.format == "pgm":
        with _reserved(budget, header, name, wait_s):
            return _decode_pgm(data, name)
    with _reserved(budget, header, name, wait_s):
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        if image is None:
            raise ImageDecodeError(
                f"{name}: {header.format.upper()} data is corrupt and could not be decoded"
            )
        if image.shape[0] != header.height or image.shape[1] != header.width:
            raise ImageDecodeError(
                f"{name}: decoded {image.shape[1]}x{image.shape[0]} but the header declares "
                f"{header.width}x{header.height}"
            )
        if header.format == "jpeg":
            _check_jpeg_scan(data, name)
        return _drop_alpha(image)


def read_image(
    path: str | Path,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES,
    full_depth: bool = False,
) -> np.ndarray:
    """Read and safely decode the image file at `path` (see `decode_image`)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ImageDecodeError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ImageDecodeError(f"{path}: is a directory, not an image file") from None
    except OSError as exc:
        raise ImageDecodeError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    return decode_image(data, str(path), max_pixels, max_decoded_bytes, full_depth=full_depth)


def decode_dicom_frames(
    data: bytes,
    name: str = "<buffer>",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_DICOM_BYTES,
    budget: DecodeBudget | None = SHARED_DECODE_BUDGET,
    wait_s: float = DEFAULT_BUDGET_WAIT_S,
    full_depth: bool = False,
) -> list[np.ndarray]:
    """Decode every frame of a DICOM file to uint8 grey or BGR, display-ready.

    Applies the modality LUT and the VOI window (what the scanner showed), inverts MONOCHROME1,
    and converts YBR colour to BGR, so a DICOM frame and a screen grab of the same scan look alike.
    `max_bytes` caps the decoded bytes of all frames together. `full_depth`: grey frames come as
    uint16 over 0..65535 (`dicom_grey_full_depth`) instead of uint8; colour stays uint8 BGR.
    """
    header = read_header(data, name, whole_file=True)
    if header.format != "dicom":
        raise ImageDecodeError(f"{name}: not a DICOM file (found {header.format.upper()})")
    _check_size(header, name, max_pixels, max_bytes)
    pydicom = require("pydicom", "reading DICOM files")
    from pydicom.pixels import apply_modality_lut, apply_voi_lut, convert_color_space

    with _reserved(budget, header, name, wait_s):
        try:
            ds = pydicom.dcmread(io.BytesIO(data))
            # pixel data holding more frames than declared would otherwise be decoded too
            ds.pixel_array_options(allow_excess_frames=False)
            with warnings.catch_warnings():  # excess bytes: ignored on purpose, as said above
                warnings.filterwarnings("ignore", r"The pixel data is \d+ bytes long, which "
                                        r"indicates it contains \d+ bytes of excess padding")  # fmt: skip
                pixels = ds.pixel_array
        except Exception as exc:  # pydicom raises many types for corrupt or unsupported data
            raise ImageDecodeError(f"{name}: DICOM pixel data could not be decoded: {exc}") from exc
        photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2"))
        samples = int(getattr(ds, "SamplesPerPixel", 1))
        frames = pixels if header.frames > 1 else pixels[np.newaxis]
        expected = (header.frames, header.height, header.width) + (
            (samples,) if samples > 1 else ()
        )
        if frames.shape != expected:
            raise ImageDecodeError(
                f"{name}: DICOM pixel data decoded to shape {frames.shape}, but the header "
                f"declares {expected} (frames, rows, columns, samples); refused"
            )
        _check_dicom_display(ds, photometric, samples, name)
        out = []
        for frame in frames:
            if samples == 1 and full_depth:
                out.append(dicom_grey_full_depth(frame, ds, name))
            elif samples == 1:
                try:
                    values = apply_voi_lut(apply_modality_lut(frame, ds), ds)
                    values = values.astype(np.float64, copy=False)
                except Exception as exc:  # fields checked above; LUT sequences can still be corrupt
                    raise ImageDecodeError(
                        f"{name}: DICOM display values could not be applied: {exc}"
                    ) from exc
                out.append(_to_uint8_grey(values, invert=photometric == "MONOCHROME1"))
            else:
                if photometric.startswith("YBR"):
                    frame = convert_color_space(frame, photometric, "RGB")
                elif photometric != "RGB":
                    raise ImageDecodeError(
                        f"{name}: unsupported DICOM colour model {photometric!r}"
                    )
                out.append(cv2.cvtColor(np.ascontiguousarray(frame, np.uint8), cv2.COLOR_RGB2BGR))
        return out


@dataclass(frozen=True)
class ImageView:
    """What is known about a mammogram's view apart from its pixels: the breast's side ("L"/"R"),
    the view position ("CC", "MLO", ...) and the image edge its chest wall lies on; None where
    unknown. From a DICOM header (`read_image_view`) or a manifest's view code (`from_code`)."""

    laterality: Literal["L", "R"] | None = None
    position: str | None = None
    chest_wall: Literal["left", "right"] | None = None

    @classmethod
    def from_code(cls, code: str) -> ImageView:
        """From a manifest's `view` value such as "L-MLO" (a left breast hangs with its chest wall
        on the left edge, as mini-MIAS and the phantoms lie); "" gives an unknown view."""
        if not code:
            return cls()
        side, _, position = code.partition("-")
        if side not in ("L", "R") or not position:
            raise ValueError(f"view code must look like 'L-MLO' or 'R-CC', got {code!r}")
        return cls.hung(side, position.upper())  # type: ignore[arg-type]

    @classmethod
    def hung(
        cls, side: Literal["L", "R"], position: str | None, stored: ImageView | None = None
    ) -> ImageView:
        """A view of `side` and `position` as stated (a manifest), its chest-wall edge from how
        the file says it is stored (`stored`: a DICOM header of the same side, or of none)
        where it says, else by the hanging convention: a left breast with its chest wall on the
        left edge."""
        if (
            stored is not None
            and stored.chest_wall is not None
            and stored.laterality in (None, side)
        ):
            return cls(side, position, stored.chest_wall)
        return cls(side, position, "left" if side == "L" else "right")

    @property
    def is_mlo(self) -> bool | None:
        """Whether this is an (M)LO view showing the pectoral muscle; None when unknown."""
        return None if self.position is None else self.position in ("MLO", "LMO", "ML", "LM")


def read_image_view(data: bytes, name: str = "<buffer>") -> ImageView:
    """What a DICOM header says about the view, without decoding pixels; nothing for PNG/JPEG.

    The breast's side is ImageLaterality, else Laterality (L or R; anything else is unknown). The
    chest wall's image edge is read from PatientOrientation's row direction where it gives one (A:
    columns run towards the nipple, so the chest wall is on the left; P: on the right), else from
    the side by the hanging convention (a left breast's chest wall on the left edge)."""
    if sniff_format(data) != "dicom":
        return ImageView()
    pydicom = require("pydicom", "reading DICOM files")
    try:
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
        side = str(getattr(ds, "ImageLaterality", "") or getattr(ds, "Laterality", "") or "")
        position = str(getattr(ds, "ViewPosition", "") or "").strip().upper() or None
        orientation = getattr(ds, "PatientOrientation", None)
        rows = str(orientation[0] if orientation else "").strip().upper()
    except Exception as exc:
        raise ImageDecodeError(f"{name}: DICOM header could not be read: {exc}") from exc
    side = side.strip().upper()
    laterality = side if side in ("L", "R") else None
    chest_wall: Literal["left", "right"] | None = None
    if rows.startswith("A"):
        chest_wall = "left"
    elif rows.startswith("P"):
        chest_wall = "right"
    elif laterality is not None:
        chest_wall = "left" if laterality == "L" else "right"
    return ImageView(laterality, position, chest_wall)  # type: ignore[arg-type]


@dataclass(frozen=True)
class DicomStudy:
    """Which DICOM study and patient a file belongs to, as sha256 hashes of its StudyInstanceUID
    and PatientID (the fields themselves are never kept); None where the file says none (not
    DICOM, or the tag is absent). The patient's hash is for comparing files, never for a record."""

    study_sha256: str | None = None
    patient_sha256: str | None = dataclass_field(
        default=None, repr=False
    )  # a short id's hash reverses


def read_study(data: bytes, name: str = "<buffer>") -> DicomStudy:
    """The hashed study and patient ids of a DICOM file, without decoding pixels; none for
    PNG/JPEG."""
    if sniff_format(data) != "dicom":
        return DicomStudy()
    pydicom = require("pydicom", "reading DICOM files")
    try:
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
        study = str(getattr(ds, "StudyInstanceUID", "") or "").strip()
        patient = str(getattr(ds, "PatientID", "") or "").strip()
    except Exception as exc:
        raise ImageDecodeError(f"{name}: DICOM header could not be read: {exc}") from exc
    return DicomStudy(_identity_sha256("StudyInstanceUID", study),
                      _identity_sha256("PatientID", patient))  # fmt: skip


def _identity_sha256(tag: str, value: str) -> str | None:
    return hashlib.sha256(f"{tag}={value}".encode()).hexdigest() if value else None


def to_grey_uint8(image: np.ndarray) -> np.ndarray:
    """8-bit grey view of a decoded frame (grey, BGR or BGRA; uint8, uint16 or float in [0, 1]),
    for the checks that look at the picture rather than feed the model (region, quality, audit)."""
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 3:
        image = cv2.cvtColor(image[:, :, :3], cv2.COLOR_BGR2GRAY)
    if image.ndim != 2:
        raise ValueError(f"expected a grey (HxW) or BGR (HxWx3) frame, got shape {image.shape}")
    if image.dtype == np.uint8:
        return image
    if image.dtype == np.uint16:
        return (image >> 8).astype(np.uint8)
    return np.clip(np.nan_to_num(image.astype(np.float32)) * 255.0, 0, 255).astype(np.uint8)


#: Rows worked at a time by the full-depth path: the float copies it needs stay a few MB.
_ROW_BLOCK = 64
_FULL_SCALE = 65535.0
_VOI_FUNCTIONS = ("LINEAR", "LINEAR_EXACT", "SIGMOID")


def dicom_grey_full_depth(frame: np.ndarray, ds: Any, name: str = "<buffer>") -> np.ndarray:
    """One grey DICOM frame of stored values as uint16 over 0..65535, at its full depth.

    The modality LUT (or RescaleSlope/Intercept), then the first VOI LUT table if there is one
    (its output scaled from its declared 0..2^bits-1), else the first window (DICOM PS3.3
    C.11.2.1.2: LINEAR, LINEAR_EXACT or SIGMOID) mapped onto 0..65535, else the modality's nominal
    range (from BitsStored and PixelRepresentation through the rescale) mapped onto 0..65535;
    MONOCHROME1 is inverted. `ds` is the pydicom dataset the frame came from."""
    from pydicom.pixels import apply_modality_lut, apply_voi

    try:
        photometric, voi_bits, window, (low, high) = _display_plan(ds, name)
    except ImageDecodeError:
        raise
    except Exception as exc:  # pydicom converts a field on first access: an unknown VR, say
        raise ImageDecodeError(f"{name}: DICOM display fields cannot be read: {exc}") from exc
    out = np.empty(frame.shape, np.uint16)
    for start in range(0, frame.shape[0], _ROW_BLOCK):
        block = frame[start : start + _ROW_BLOCK]
        try:
            values = apply_modality_lut(block, ds)
            if voi_bits is not None:  # a table is indexed by whole values (a rescale gives floats)
                index = values if values.dtype.kind in "iu" else np.round(values).astype(np.int64)
                values = np.asarray(apply_voi(index, ds), np.float64) / (2.0**voi_bits - 1)
            else:
                values = np.asarray(values, np.float64)
        except Exception as exc:  # fields checked; LUT sequences can still be corrupt
            raise ImageDecodeError(
                f"{name}: DICOM display values could not be applied: {exc}"
            ) from exc
        if window is not None:
            values = _apply_window(values, *window)
        elif voi_bits is None:
            values = (values - low) / (high - low)
        np.clip(values, 0.0, 1.0, out=values)
        if photometric == "MONOCHROME1":
            values = 1.0 - values
        out[start : start + block.shape[0]] = np.round(values * _FULL_SCALE)
    return out


def _apply_window(values: np.ndarray, centre: float, width: float, function: str) -> np.ndarray:
    """The VOI window onto [0, 1] (DICOM PS3.3 C.11.2.1.2-3)."""
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(np.clip(-4.0 * (values - centre) / width, -700, 700)))
    if function == "LINEAR_EXACT":
        return (values - centre) / width + 0.5
    if width <= 1.0:  # LINEAR with width 1: a step at the centre
        return (values > centre - 0.5).astype(np.float64)
    return (values - (centre - 0.5)) / (width - 1.0) + 0.5


def _display_plan(
    ds: Any, name: str
) -> tuple[str, int | None, tuple[float, float, str] | None, tuple[float, float]]:
    """What the full-depth path reads from the header: the photometric interpretation, the VOI
    LUT table's bits (None without one), the window (centre, width, function; None without one)
    and the modality's nominal range."""
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2"))
    numbers = {field: _dicom_numbers(ds, field, name) for field in _DICOM_DISPLAY_FIELDS}
    voi_bits = _voi_lut_bits(ds, name)
    window = None
    if voi_bits is None and numbers["WindowCenter"] and numbers["WindowWidth"]:
        function = str(getattr(ds, "VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
        if function not in _VOI_FUNCTIONS:
            raise ImageDecodeError(
                f"{name}: DICOM VOILUTFunction is {function!r}; one of "
                f"{', '.join(_VOI_FUNCTIONS)} expected"
            )
        window = (numbers["WindowCenter"][0], numbers["WindowWidth"][0], function)
    return photometric, voi_bits, window, _nominal_range(ds, numbers)


def _voi_lut_bits(ds: object, name: str) -> int | None:
    """The output bits of the first VOI LUT table (None when there is none)."""
    sequence = getattr(ds, "VOILUTSequence", None)
    if not sequence:
        return None
    try:
        bits = int(sequence[0].LUTDescriptor[2])
    except Exception as exc:  # a missing or malformed descriptor
        raise ImageDecodeError(f"{name}: DICOM VOI LUT has no usable LUTDescriptor: {exc}") from exc
    if not 1 <= bits <= 16:
        raise ImageDecodeError(
            f"{name}: DICOM VOI LUT declares {bits} bits per entry; 1..16 expected"
        )
    return bits


def _nominal_range(ds: object, numbers: dict[str, list[float] | None]) -> tuple[float, float]:
    """The range the modality's output values can span: the stored bits' range through the
    rescale, or a modality LUT table's declared output range."""
    modality_lut = getattr(ds, "ModalityLUTSequence", None)
    if modality_lut:
        try:
            return 0.0, 2.0 ** int(modality_lut[0].LUTDescriptor[2]) - 1
        except Exception:
            pass  # pydicom refuses the table itself when it is applied
    bits = int(getattr(ds, "BitsStored", 0) or getattr(ds, "BitsAllocated", 8) or 8)
    if int(getattr(ds, "PixelRepresentation", 0) or 0) == 1:
        low, high = -(2.0 ** (bits - 1)), 2.0 ** (bits - 1) - 1
    else:
        low, high = 0.0, 2.0**bits - 1
    slope, intercept = 1.0, 0.0
    if numbers["RescaleSlope"] and numbers["RescaleIntercept"]:  # pydicom needs both, too
        slope, intercept = numbers["RescaleSlope"][0], numbers["RescaleIntercept"][0]
    ends = sorted((low * slope + intercept, high * slope + intercept))
    return ends[0], max(ends[1], ends[0] + 1.0)


def _to_uint8_grey(values: np.ndarray, invert: bool) -> np.ndarray:
    """min..max of float64 `values` onto 0..255, in place (`values` is the caller's scratch: a
    full-field mammogram's float64 frame is 109 MB, and each copy of it counts)."""
    low, high = float(values.min()), float(values.max())
    if high <= low:
        values.fill(0.0)
    else:
        np.subtract(values, low, out=values)
        np.divide(values, high - low, out=values)
    if invert:
        np.subtract(1.0, values, out=values)
    np.multiply(values, 255.0, out=values)
    return np.round(values, out=values).astype(np.uint8)


def _drop_alpha(image: np.ndarray) -> np.ndarray:
    if image.ndim == 3 and image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    if image.ndim == 3 and image.shape[2] == 1:
        return image[:, :, 0]
    return image


def _reserved(
    budget: DecodeBudget | None, header: ImageHeader, name: str, wait_s: float
) -> contextlib.AbstractContextManager[None]:
    return (
        contextlib.nullcontext()
        if budget is None
        else budget.reserve(header.decoded_bytes, name, wait_s)
    )


def _check_size(header: ImageHeader, name: str, max_pixels: int, max_bytes: int) -> None:
    if header.width <= 0 or header.height <= 0:
        raise ImageDecodeError(
            f"{name}: header declares an empty image ({header.width}x{header.height})"
        )
    if header.width * header.height > max_pixels:
        raise ImageDecodeError(
            f"{name}: image is {header.width}x{header.height} = {header.width * header.height} "
            f"pixels, over the limit of {max_pixels}; refused before decoding"
        )
    if header.decoded_bytes > max_bytes:
        frames = f" x {header.frames} frames" if header.frames != 1 else ""
        raise ImageDecodeError(
            f"{name}: image is {header.width}x{header.height} x {header.channels} channels x "
            f"{header.bytes_per_sample} bytes{frames} = {header.decoded_bytes} decoded bytes, "
            f"over the limit of {max_bytes}; refused before decoding"
        )


def _check_dicom_display(ds: object, photometric: str, samples: int, name: str) -> None:
    """Refuse what pydicom would display wrongly without complaint (or fail on with a raw error)."""
    numbers = {field: _dicom_numbers(ds, field, name) for field in _DICOM_DISPLAY_FIELDS}
    for field in ("RescaleSlope", "RescaleIntercept"):
        if len(numbers[field] or [0.0]) != 1:
            raise ImageDecodeError(
                f"{name}: DICOM {field} has {numbers[field]}; one value expected"
            )
    if numbers["RescaleSlope"] == [0.0]:
        raise ImageDecodeError(
            f"{name}: DICOM RescaleSlope is 0, which maps every pixel to one value; refused"
        )
    width = numbers["WindowWidth"]
    if width is not None and any(w < 1 for w in width):
        raise ImageDecodeError(
            f"{name}: DICOM WindowWidth is {', '.join(f'{w:g}' for w in width)}; it must be at "
            "least 1 to be displayed"
        )
    if photometric == "PALETTE COLOR":
        has_lut = hasattr(ds, "RedPaletteColorLookupTableData")
        raise ImageDecodeError(
            f"{name}: DICOM is PALETTE COLOR "
            + ("" if has_lut else "without its lookup table (RedPaletteColorLookupTableData); ")
            + "palette images are not supported: export the frames as RGB"
        )
    if samples == 1 and photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ImageDecodeError(
            f"{name}: DICOM has one sample per pixel but colour model {photometric!r}"
        )


#: The DICOM fields that set how pixel values are displayed: all numbers, when present.
_DICOM_DISPLAY_FIELDS = ("RescaleSlope", "RescaleIntercept", "WindowCenter", "WindowWidth")


def _dicom_numbers(ds: object, field: str, name: str) -> list[float] | None:
    """A display field's values as finite numbers (None when absent); refuse anything else.

    pydicom keeps a malformed decimal string as text and converts fields on first access, so a
    corrupt field would otherwise fail later inside its LUT code with a raw TypeError."""
    try:
        value = getattr(ds, field, None)
    except Exception as exc:  # an unknown value representation, for one
        raise ImageDecodeError(f"{name}: DICOM {field} cannot be read: {exc}") from exc
    if value is None:
        return None
    multiple = isinstance(value, Sequence) and not isinstance(value, (str, bytes))
    values = list(value) if multiple else [value]
    try:
        numbers = [float(v) for v in values]
    except (TypeError, ValueError):
        numbers = []
    if not numbers or not all(math.isfinite(n) for n in numbers):
        raise ImageDecodeError(f"{name}: DICOM {field} is {value!r}, not a number; refused")
    return numbers


_STDERR = threading.Lock()
_LIBJPEG_WARNINGS = ("Corrupt JPEG data", "Premature end of JPEG", "Invalid SOS parameters")


@contextlib.contextmanager
def _libjpeg_warnings_logged() -> Iterator[None]:
    """libjpeg prints its warnings straight to the process's stderr (OpenCV passes none of them on):
    the scan check's probe draws "Corrupt JPEG data: 4095 extraneous bytes before marker 0xd9"
    for every good JPEG, which a cart's log must not fill with. While it decodes, file descriptor
    2 goes to an in-memory file (no disk: a full /tmp must not break decoding); libjpeg's lines
    become debug log lines and anything else written meanwhile (another thread's output) is passed
    on to stderr unchanged. Where no in-memory file can be made, nothing is redirected."""
    import logging
    import os

    try:
        scratch = os.memfd_create("edgebc-libjpeg", getattr(os, "MFD_CLOEXEC", 0))
    except (AttributeError, OSError):  # not Linux, or no memory: the lines stay on stderr
        yield
        return
    try:
        with _STDERR:
            saved = os.dup(2)
            os.dup2(scratch, 2)
            try:
                yield
            finally:
                os.dup2(saved, 2)
                os.close(saved)
        os.lseek(scratch, 0, os.SEEK_SET)
        text = b"".join(iter(lambda: os.read(scratch, 65536), b"")).decode("utf-8", "replace")
    finally:
        os.close(scratch)
    for line in text.splitlines(keepends=True):
        if line.startswith(_LIBJPEG_WARNINGS):
            logging.getLogger(__name__).debug("libjpeg: %s", line.strip())
        else:
            os.write(2, line.encode())


def _check_jpeg_scan(data: bytes, name: str) -> None:
    """Refuse a JPEG whose scan data ends before it has filled the image.

    libjpeg fills the missing blocks with mid-grey and only prints a warning ("Corrupt JPEG data:
    premature end of data segment") that OpenCV does not pass on. The test is libjpeg's own:
    the same file with extra scan data inserted before its end-of-image marker decodes to the
    same pixels if the scan was complete (libjpeg skips bytes after the last block), and to
    different ones if it was not (the extra data fills the missing blocks). Both decodes are at
    1/8 scale, which still reads every coefficient but allocates 1/64 of the pixels.
    """
    end = _walk_jpeg(data, name)[1]
    probe = data[:end] + _JPEG_PROBE + data[end:]
    flags = cv2.IMREAD_REDUCED_COLOR_8
    with _libjpeg_warnings_logged():  # the probe always draws "extraneous bytes" from libjpeg
        plain = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
        probed = cv2.imdecode(np.frombuffer(probe, np.uint8), flags)
    if plain is None or probed is None or not np.array_equal(plain, probed):
        raise ImageDecodeError(
            f"{name}: JPEG scan data ends before the image is complete (truncated, or the "
            "header declares more image than the data holds); refused rather than decoded grey"
        )


def _png_header(data: bytes, name: str, whole_file: bool) -> ImageHeader:
    """Walk every chunk against the bytes present; IHDR first, legal and intact; IEND reached."""
    if len(data) < 8 + 25 or data[12:16] != b"IHDR":
        raise ImageDecodeError(f"{name}: PNG header is missing or truncated")
    if data[8:12] != b"\0\0\0\x0d":
        raise ImageDecodeError(f"{name}: PNG IHDR chunk is {data[8:12].hex()} bytes long, not 13")
    pos, size, seen = 8, len(data), []
    while True:
        if pos + 8 > size and not whole_file:
            break
        if pos + 8 > size:
            raise ImageDecodeError(f"{name}: PNG is truncated (no IEND chunk at the end)")
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        if not kind.isalpha():
            raise ImageDecodeError(
                f"{name}: PNG chunk at byte {pos} has an invalid type {kind!r}; the file is corrupt"
            )
        if not whole_file and length <= _MAX_PNG_CHUNK and pos + 12 + length > size:
            break  # the prefix ends inside this chunk
        if length > _MAX_PNG_CHUNK or pos + 12 + length > size:
            raise ImageDecodeError(
                f"{name}: PNG is truncated or corrupt: chunk {kind.decode('latin-1')} at byte {pos} "
                f"declares {length} bytes "
                f"but the file has only {max(size - pos - 12, 0)} left; refused before decoding"
            )
        body = data[pos + 8 : pos + 8 + length]
        if kind[0] & 0x20 == 0:  # critical chunk: libpng refuses a bad CRC too, later and vaguer
            (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
            if zlib.crc32(kind + body) != crc:
                raise ImageDecodeError(
                    f"{name}: PNG chunk {kind.decode('latin-1')} at byte {pos} fails its CRC; "
                    "the file is corrupt"
                )
        seen.append(kind)
        pos += 12 + length
        if kind == b"IEND":
            break
    if whole_file and b"IDAT" not in seen:
        raise ImageDecodeError(f"{name}: PNG has no image data (IDAT chunk)")
    ihdr = data[16:29]
    width, height, depth, colour, compression, filtering, interlace = struct.unpack(
        ">IIBBBBB", ihdr
    )
    if width == 0 or height == 0 or width > _MAX_PNG_CHUNK or height > _MAX_PNG_CHUNK:
        raise ImageDecodeError(f"{name}: PNG IHDR declares an illegal size {width}x{height}")
    if colour not in _PNG_COLOUR_TYPES or depth not in _PNG_COLOUR_TYPES[colour][1]:
        raise ImageDecodeError(
            f"{name}: PNG IHDR declares bit depth {depth} with colour type {colour}, "
            "which the PNG specification does not allow"
        )
    if compression != 0 or filtering != 0 or interlace not in (0, 1):
        raise ImageDecodeError(
            f"{name}: PNG IHDR declares compression {compression}, filter {filtering}, "
            f"interlace {interlace}; only 0, 0 and 0/1 exist"
        )
    if whole_file and colour == 3 and b"PLTE" not in seen:
        raise ImageDecodeError(f"{name}: palette PNG has no palette (PLTE chunk)")
    channels = _PNG_COLOUR_TYPES[colour][0]
    if colour == 0 and b"tRNS" in seen:
        channels = 4  # a transparent grey value makes OpenCV decode BGRA
    if colour == 3 and b"tRNS" not in seen:
        channels = 3
    return ImageHeader("png", width, height, 1, channels, 2 if depth == 16 else 1)


def _walk_jpeg(data: bytes, name: str, whole_file: bool = True) -> tuple[ImageHeader, int]:
    """Walk the marker structure: segment lengths within the bytes, a sane SOF before the first
    scan, every scan's data ending at a marker, and an end-of-image marker reached.

    Returns the frame header and the byte offset of the end-of-image marker."""
    pos, size = 2, len(data)
    header: ImageHeader | None = None
    while pos + 2 <= size:
        if data[pos] != 0xFF:
            raise ImageDecodeError(f"{name}: JPEG marker structure is corrupt at byte {pos}")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker == 0xD9:
            if header is None:
                break
            return header, pos
        if marker in (0x01, *range(0xD0, 0xD8)):  # markers without a length
            pos += 2
            continue
        if pos + 4 > size:
            break
        (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        if length < 2 or pos + 2 + length > size:
            left = "too few" if length < 2 else f"but the file has only {size - pos - 2} left"
            raise ImageDecodeError(
                f"{name}: JPEG segment {marker:#04x} at byte {pos} declares {length} bytes, {left}"
            )
        if marker in _JPEG_SOF:
            header = _jpeg_frame(data[pos + 4 : pos + 2 + length], pos, name)
            if not whole_file:
                return header, -1
        if marker == 0xDA:
            if header is None:
                break
            found = _JPEG_NEXT_MARKER.search(data, pos + 2 + length)
            if found is None:
                break
            pos = found.start()
            continue
        pos += 2 + length
    if header is None:
        raise ImageDecodeError(f"{name}: JPEG has no frame header (SOF) before its image data")
    raise ImageDecodeError(f"{name}: JPEG is truncated (no end-of-image marker after the scan)")


def _jpeg_frame(body: bytes, pos: int, name: str) -> ImageHeader:
    if len(body) < 6:
        raise ImageDecodeError(f"{name}: JPEG frame header at byte {pos} is truncated")
    precision, height, width, components = struct.unpack(">BHHB", body[:6])
    if len(body) != 6 + 3 * components or components not in (1, 3, 4):
        raise ImageDecodeError(
            f"{name}: JPEG frame header at byte {pos} declares {components} components in "
            f"{len(body) + 2} bytes; the file is corrupt"
        )
    if precision not in (8, 12, 16) or width == 0 or height == 0:
        raise ImageDecodeError(
            f"{name}: JPEG frame header declares {width}x{height} at {precision} bits, "
            "which cannot be decoded"
        )
    channels = 1 if components == 1 else 3
    return ImageHeader("jpeg", width, height, 1, channels, 1 if precision == 8 else 2)


#: A PGM header field: whitespace and `#` comments, then a decimal number.
_PGM_FIELD = re.compile(rb"(?:\s|#[^\n]*(?:\n|$))*(\d{1,9})")


def _pgm_header(data: bytes, name: str, whole_file: bool) -> tuple[ImageHeader, int, int]:
    """A binary PGM's (P5: what mini-MIAS was published as) size and depth, and where its raster
    starts: width, height and maxval after the magic, each after whitespace or `#` comments, then
    one whitespace byte. Samples are one byte up to maxval 255, else two, big-endian."""
    values = []
    pos = 2
    for field in ("width", "height", "maxval"):
        match = _PGM_FIELD.match(data, pos)
        if match is None:
            raise ImageDecodeError(
                f"{name}: PGM header has no valid {field} (cut short or malformed)"
            )
        values.append(int(match.group(1)))
        pos = match.end()
    if data[pos : pos + 1] not in (b" ", b"\t", b"\r", b"\n"):
        raise ImageDecodeError(f"{name}: PGM header does not end in one whitespace byte")
    width, height, maxval = values
    if width < 1 or height < 1 or not 1 <= maxval <= 65535:
        raise ImageDecodeError(
            f"{name}: PGM declares {width}x{height} with maxval {maxval} (1..65535)"
        )
    sample = 1 if maxval < 256 else 2
    raster = pos + 1
    if whole_file and len(data) - raster < width * height * sample:
        raise ImageDecodeError(
            f"{name}: PGM raster holds {len(data) - raster} bytes, its header declares "
            f"{width * height * sample}: the file is cut short"
        )
    return ImageHeader("pgm", width, height, 1, 1, sample), raster, maxval


def _decode_pgm(data: bytes, name: str) -> np.ndarray:
    """A P5 PGM's raster as uint8 (maxval < 256) or uint16, its values as stored (a 12-bit
    film keeps 0..4095, as a 16-bit PNG does); values above maxval are refused."""
    header, raster, maxval = _pgm_header(data, name, whole_file=True)
    dtype = np.dtype(np.uint8) if header.bytes_per_sample == 1 else np.dtype(">u2")
    count = header.width * header.height
    values = np.frombuffer(data, dtype, count=count, offset=raster).reshape(
        header.height, header.width
    )
    image = values.astype(np.uint8 if header.bytes_per_sample == 1 else np.uint16)
    if int(image.max()) > maxval:
        raise ImageDecodeError(f"{name}: PGM holds values above its maxval {maxval}")
    return image


def _dicom_header(data: bytes, name: str) -> ImageHeader:
    pydicom = require("pydicom", "reading DICOM files")
    try:
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
        rows, columns = int(ds.Rows), int(ds.Columns)
        frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
        samples = int(getattr(ds, "SamplesPerPixel", 1))
        bits = int(getattr(ds, "BitsAllocated", 8))
    except AttributeError:
        raise ImageDecodeError(f"{name}: DICOM has no image (Rows/Columns missing)") from None
    except Exception as exc:
        raise ImageDecodeError(f"{name}: DICOM header could not be read: {exc}") from exc
    if frames < 1 or samples not in (1, 3) or bits not in (1, 8, 16, 32, 64):
        raise ImageDecodeError(
            f"{name}: DICOM declares {frames} frames of {samples} samples at {bits} bits "
            "allocated, which cannot be decoded"
        )
    return ImageHeader("dicom", columns, rows, frames, samples, max(1, bits // 8))
