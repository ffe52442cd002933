"""Safe decoding of PNG, JPEG and DICOM into OpenCV-convention arrays (grey HxW or BGR HxWx3).

Files come from capture cards, USB sticks and uploads, so nothing is trusted: the format is
identified by its magic bytes (never by the file name), the image size is read from the header
and an oversized image is refused *before* any pixel is decoded (a 100k x 100k PNG is a few KB
that would ask for tens of GB), and a truncated file is refused rather than decoded into a
partly grey picture, which libjpeg does without complaint.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import cv2
import numpy as np

from edgebc.errors import ImageDecodeError
from edgebc.optional import require

ImageFormat = Literal["png", "jpeg", "dicom"]

#: Default ceiling on width*height; 8K UHD is 33 Mpx, a 4K x 4K full-field mammogram 16 Mpx.
DEFAULT_MAX_PIXELS = 40_000_000
#: DICOM cines multiply pixels by frames; cap the total decoded size instead.
DEFAULT_MAX_DICOM_BYTES = 2 * 1024**3

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_PNG_IEND = b"IEND\xaeB`\x82"
_JPEG_MAGIC = b"\xff\xd8\xff"
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


@dataclass(frozen=True)
class ImageHeader:
    """What the header declares, read without decoding pixels."""

    format: ImageFormat
    width: int
    height: int
    frames: int = 1


def sniff_format(data: bytes) -> ImageFormat | None:
    """The format named by the magic bytes, or None for anything else."""
    if data.startswith(_PNG_MAGIC):
        return "png"
    if data.startswith(_JPEG_MAGIC):
        return "jpeg"
    if len(data) >= 132 and data[128:132] == b"DICM":
        return "dicom"
    return None


def read_header(data: bytes, name: str = "<buffer>") -> ImageHeader:
    """Identify the format and read the declared size; raise ImageDecodeError for anything else."""
    kind = sniff_format(data)
    if kind == "png":
        return _png_header(data, name)
    if kind == "jpeg":
        return _jpeg_header(data, name)
    if kind == "dicom":
        return _dicom_header(data, name)
    head = data[:8].hex(" ") if data else "an empty file"
    raise ImageDecodeError(f"{name}: expected a PNG, JPEG or DICOM file, got {head}")


def decode_image(
    data: bytes, name: str = "<buffer>", max_pixels: int = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """Decode one image to uint8/uint16 grey (HxW) or uint8 BGR (HxWx3); alpha is dropped.

    A multi-frame DICOM is refused here: use `decode_dicom_frames` for cine loops.
    """
    header = read_header(data, name)
    _check_size(header, name, max_pixels)
    if header.format == "dicom":
        frames = decode_dicom_frames(data, name, max_pixels=max_pixels)
        if len(frames) != 1:
            raise ImageDecodeError(
                f"{name}: DICOM has {len(frames)} frames; read it as a cine (decode_dicom_frames) "
                "or pick one frame"
            )
        return frames[0]
    _check_complete(data, header.format, name)
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
    return _drop_alpha(image)


def read_image(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
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
    return decode_image(data, str(path), max_pixels=max_pixels)


def decode_dicom_frames(
    data: bytes,
    name: str = "<buffer>",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_DICOM_BYTES,
) -> list[np.ndarray]:
    """Decode every frame of a DICOM file to uint8 grey or BGR, display-ready.

    Applies the modality LUT and the VOI window (what the scanner showed), inverts MONOCHROME1,
    and converts YBR colour to BGR, so a DICOM frame and a screen grab of the same scan look alike.
    """
    header = read_header(data, name)
    if header.format != "dicom":
        raise ImageDecodeError(f"{name}: not a DICOM file (found {header.format.upper()})")
    _check_size(header, name, max_pixels)
    if header.width * header.height * header.frames * 3 > max_bytes:
        raise ImageDecodeError(
            f"{name}: DICOM declares {header.frames} frames of {header.width}x{header.height}, "
            f"over the {max_bytes} byte limit"
        )
    pydicom = require("pydicom", "reading DICOM files")
    from pydicom.pixels import apply_modality_lut, apply_voi_lut, convert_color_space

    try:
        ds = pydicom.dcmread(io.BytesIO(data))
        pixels = ds.pixel_array
    except Exception as exc:  # pydicom raises many types for corrupt or unsupported data
        raise ImageDecodeError(f"{name}: DICOM pixel data could not be decoded: {exc}") from exc
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2"))
    samples = int(getattr(ds, "SamplesPerPixel", 1))
    frames = pixels if header.frames > 1 else pixels[np.newaxis]
    out = []
    for frame in frames:
        if samples == 1:
            values = apply_voi_lut(apply_modality_lut(frame, ds), ds).astype(np.float64)
            out.append(_to_uint8_grey(values, invert=photometric == "MONOCHROME1"))
        else:
            if photometric.startswith("YBR"):
                frame = convert_color_space(frame, photometric, "RGB")
            elif photometric != "RGB":
                raise ImageDecodeError(f"{name}: unsupported DICOM colour model {photometric!r}")
            out.append(cv2.cvtColor(np.ascontiguousarray(frame, np.uint8), cv2.COLOR_RGB2BGR))
    return out


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


def _to_uint8_grey(values: np.ndarray, invert: bool) -> np.ndarray:
    low, high = float(values.min()), float(values.max())
    scaled = np.zeros(values.shape, np.float64) if high <= low else (values - low) / (high - low)
    if invert:
        scaled = 1.0 - scaled
    return np.round(scaled * 255.0).astype(np.uint8)


def _drop_alpha(image: np.ndarray) -> np.ndarray:
    if image.ndim == 3 and image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    if image.ndim == 3 and image.shape[2] == 1:
        return image[:, :, 0]
    return image


def _check_size(header: ImageHeader, name: str, max_pixels: int) -> None:
    if header.width <= 0 or header.height <= 0:
        raise ImageDecodeError(
            f"{name}: header declares an empty image ({header.width}x{header.height})"
        )
    if header.width * header.height > max_pixels:
        raise ImageDecodeError(
            f"{name}: image is {header.width}x{header.height} = {header.width * header.height} "
            f"pixels, over the limit of {max_pixels}; refused before decoding"
        )


def _check_complete(data: bytes, kind: ImageFormat, name: str) -> None:
    if kind == "png" and _PNG_IEND not in data[-64:]:
        raise ImageDecodeError(f"{name}: PNG is truncated (no IEND chunk at the end)")
    if kind == "jpeg":
        start_of_scan = data.find(b"\xff\xda")
        if start_of_scan < 0 or data.rfind(b"\xff\xd9") < start_of_scan:
            raise ImageDecodeError(
                f"{name}: JPEG is truncated (no end-of-image marker after the scan)"
            )


def _png_header(data: bytes, name: str) -> ImageHeader:
    if len(data) < 33 or data[12:16] != b"IHDR":
        raise ImageDecodeError(f"{name}: PNG header is missing or truncated")
    width, height = struct.unpack(">II", data[16:24])
    return ImageHeader("png", width, height)


def _jpeg_header(data: bytes, name: str) -> ImageHeader:
    pos = 2
    size = len(data)
    while pos + 4 <= size:
        if data[pos] != 0xFF:
            raise ImageDecodeError(f"{name}: JPEG marker structure is corrupt at byte {pos}")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):  # markers without a length
            pos += 2
            continue
        (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        if length < 2:
            raise ImageDecodeError(
                f"{name}: JPEG segment at byte {pos} has invalid length {length}"
            )
        if marker in _JPEG_SOF:
            if pos + 9 > size:
                break
            height, width = struct.unpack(">HH", data[pos + 5 : pos + 9])
            return ImageHeader("jpeg", width, height)
        if marker in (0xDA, 0xD9):
            break
        pos += 2 + length
    raise ImageDecodeError(f"{name}: JPEG has no frame header (SOF) before its image data")


def _dicom_header(data: bytes, name: str) -> ImageHeader:
    pydicom = require("pydicom", "reading DICOM files")
    try:
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
        rows, columns = int(ds.Rows), int(ds.Columns)
        frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    except AttributeError:
        raise ImageDecodeError(f"{name}: DICOM has no image (Rows/Columns missing)") from None
    except Exception as exc:
        raise ImageDecodeError(f"{name}: DICOM header could not be read: {exc}") from exc
    return ImageHeader("dicom", columns, rows, frames)
