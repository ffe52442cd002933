"""Safe decoding: formats by magic bytes, size refused before decoding, truncation detected."""

import struct
import zlib

import cv2
import numpy as np
import pytest

from edgebc.decode import decode_image, read_header, read_image, sniff_format
from edgebc.errors import ImageDecodeError


def _png(image: np.ndarray) -> bytes:
    return cv2.imencode(".png", image)[1].tobytes()


def _jpeg(image: np.ndarray) -> bytes:
    return cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()


def _png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares width x height: a decompression bomb in miniature."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = lambda kind, body: (
        struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    )
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def test_png_grey_and_colour_round_trip_exactly(rng):
    grey = rng.integers(0, 256, (37, 53), dtype=np.uint8)
    colour = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    np.testing.assert_array_equal(decode_image(_png(grey)), grey)
    np.testing.assert_array_equal(decode_image(_png(colour)), colour)


def test_sixteen_bit_png_keeps_its_depth():
    image = np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000
    decoded = decode_image(_png(image))
    assert decoded.dtype == np.uint16
    np.testing.assert_array_equal(decoded, image)


def test_alpha_channel_is_dropped():
    bgra = np.zeros((4, 5, 4), np.uint8)
    bgra[..., 0], bgra[..., 3] = 200, 255
    decoded = decode_image(_png(bgra))
    assert decoded.shape == (4, 5, 3)
    assert decoded[0, 0].tolist() == [200, 0, 0]


def test_jpeg_header_size_is_read_without_decoding():
    data = _jpeg(np.full((48, 80), 128, np.uint8))
    header = read_header(data)
    assert (header.format, header.width, header.height) == ("jpeg", 80, 48)
    assert decode_image(data).shape == (48, 80)


def test_unknown_format_is_refused_with_its_first_bytes():
    with pytest.raises(
        ImageDecodeError, match="expected a PNG, JPEG or DICOM file, got 47 49 46 38"
    ):
        decode_image(b"GIF89a" + b"\0" * 100, "x.gif")
    assert sniff_format(b"BM" + b"\0" * 200) is None


def test_oversized_image_is_refused_before_decoding():
    bomb = _png_claiming(100_000, 100_000)
    assert len(bomb) < 200
    with pytest.raises(
        ImageDecodeError, match=r"100000x100000 = 10000000000 pixels, over the limit"
    ):
        decode_image(bomb, "bomb.png")
    with pytest.raises(ImageDecodeError, match="over the limit of 100"):
        decode_image(_png(np.zeros((20, 20), np.uint8)), max_pixels=100)


def test_truncated_png_and_jpeg_are_refused(rng):
    image = rng.integers(0, 256, (64, 64), dtype=np.uint8)
    with pytest.raises(ImageDecodeError, match="PNG is truncated"):
        decode_image(_png(image)[:-100])
    with pytest.raises(ImageDecodeError, match="JPEG is truncated"):
        decode_image(_jpeg(image)[:-200])


def test_corrupt_png_body_is_refused():
    data = bytearray(_png(np.full((32, 32), 7, np.uint8)))
    data[40:60] = b"\xff" * 20  # damage the compressed stream, keep header and IEND
    with pytest.raises(ImageDecodeError, match="corrupt"):
        decode_image(bytes(data))


def test_read_image_reports_missing_file_and_directory(tmp_path):
    with pytest.raises(ImageDecodeError, match="no such file"):
        read_image(tmp_path / "absent.png")
    with pytest.raises(ImageDecodeError, match="is a directory"):
        read_image(tmp_path)


def _dicom_bytes(pixels: np.ndarray, photometric: str = "MONOCHROME2", frames: int = 1) -> bytes:
    pydicom = pytest.importorskip("pydicom")
    import io

    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, UltrasoundImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UltrasoundImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = (
        meta.MediaStorageSOPClassUID,
        meta.MediaStorageSOPInstanceUID,
    )
    ds.Rows, ds.Columns = pixels.shape[-2:]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.PixelData = pixels.astype(np.uint8).tobytes()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_dicom_single_frame_decodes_to_full_range_grey():
    pixels = np.array([[0, 50], [100, 200]], np.uint8)
    decoded = decode_image(_dicom_bytes(pixels))
    # Display scaling: darkest value maps to 0, brightest to 255, linearly in between.
    np.testing.assert_array_equal(decoded, np.round(pixels / 200.0 * 255).astype(np.uint8))


def test_dicom_monochrome1_is_inverted_and_cine_needs_the_frames_reader():
    pixels = np.array([[0, 255]], np.uint8)
    assert decode_image(_dicom_bytes(pixels, "MONOCHROME1")).tolist() == [[255, 0]]
    cine = np.stack([np.full((4, 4), v, np.uint8) for v in (10, 20, 30)])
    with pytest.raises(ImageDecodeError, match="3 frames"):
        decode_image(_dicom_bytes(cine, frames=3))
    from edgebc.decode import decode_dicom_frames

    assert len(decode_dicom_frames(_dicom_bytes(cine, frames=3))) == 3


def test_corrupt_dicom_is_refused():
    data = _dicom_bytes(np.zeros((8, 8), np.uint8))
    with pytest.raises(ImageDecodeError):
        decode_image(data[:200])


def test_atomic_writes_get_ordinary_permissions_and_keep_existing_ones(tmp_path):
    import os
    import stat

    from edgebc.atomic import atomic_write_bytes

    fresh = tmp_path / "model.onnx"
    atomic_write_bytes(fresh, b"x")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o666 & ~umask
    os.chmod(fresh, 0o640)
    atomic_write_bytes(fresh, b"y")
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o640 and fresh.read_bytes() == b"y"
    assert not [
        p for p in tmp_path.iterdir() if p.name.startswith(".")
    ]  # no temporary file left behind
