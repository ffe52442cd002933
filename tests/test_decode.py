"""Safe decoding: formats by magic bytes, size refused before decoding, truncation detected."""

import re
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
        ImageDecodeError, match="expected a PNG, JPEG, PGM or DICOM file, got 47 49 46 38"
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


def _dicom_bytes(
    pixels: np.ndarray, photometric: str = "MONOCHROME2", frames: int = 1, **extra: object
) -> bytes:
    pydicom = pytest.importorskip("pydicom")
    import io

    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, UltrasoundImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UltrasoundImageStorage
    # A fixed UID: a random one can contain the digits the corruption tests look for (CI once
    # drew one holding "4321" twice).
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=["edgebc test DICOM"])
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
    for keyword, value in extra.items():
        setattr(ds, keyword, value)
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


# -- hostile files (issue 18) -------------------------------------------------------------------

#: Found by coverage-guided fuzzing: a second chunk claiming 4.28 GB made libpng allocate 4.2 GB.
FUZZ_PNG_4GB = bytes.fromhex(
    "89504e470d0a1a0a0000000d49484452000000be0000014f49b2a4891130b33d6eff6d0d0049454e44ae426082"
)


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png_with_ihdr(ihdr: bytes, idat: bytes = zlib.compress(b"\0" * 64)) -> bytes:
    return (
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")
    )


def test_fuzzed_45_byte_png_is_refused_without_a_big_allocation():
    import subprocess
    import sys

    with pytest.raises(
        ImageDecodeError, match=r"fuzz\.png: PNG chunk IHDR at byte 8 fails its CRC"
    ):
        decode_image(FUZZ_PNG_4GB, "fuzz.png")
    # the same file with an intact, legal IHDR is still refused: for the chunk length it claims
    repaired = FUZZ_PNG_4GB[:8] + _chunk(b"IHDR", struct.pack(">IIBBBBB", 190, 335, 8, 0, 0, 0, 0))
    with pytest.raises(ImageDecodeError, match="chunk IEND at byte 33 declares 4285336832 bytes"):
        decode_image(repaired + FUZZ_PNG_4GB[33:], "fuzz.png")
    # Peak memory in a fresh process: the refusal costs nothing like the 4.2 GB it used to.
    script = (
        "import resource, sys\n"
        "from edgebc.decode import decode_image\n"
        "from edgebc.errors import ImageDecodeError\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        f"data = bytes.fromhex({FUZZ_PNG_4GB.hex()!r})\n"
        "try:\n    decode_image(data)\nexcept ImageDecodeError:\n    pass\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)\n"
    )
    grown_kb = int(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                                  timeout=120, check=True).stdout)  # fmt: skip
    assert grown_kb < 50_000


@pytest.mark.parametrize(
    ("ihdr", "message"),
    [
        (struct.pack(">IIBBBBB", 0, 10, 8, 0, 0, 0, 0), "illegal size 0x10"),
        (struct.pack(">IIBBBBB", 10, 10, 16, 3, 0, 0, 0), "bit depth 16 with colour type 3"),
        (struct.pack(">IIBBBBB", 10, 10, 4, 2, 0, 0, 0), "bit depth 4 with colour type 2"),
        (struct.pack(">IIBBBBB", 10, 10, 8, 5, 0, 0, 0), "bit depth 8 with colour type 5"),
        (struct.pack(">IIBBBBB", 10, 10, 8, 0, 1, 0, 0), "compression 1"),
        (struct.pack(">IIBBBBB", 10, 10, 8, 0, 0, 0, 2), "interlace 2"),
    ],
    ids=["zero-width", "16-bit-palette", "4-bit-rgb", "colour-5", "compression", "interlace"],
)
def test_png_header_fields_must_be_legal(ihdr, message):
    with pytest.raises(ImageDecodeError, match=message):
        decode_image(_png_with_ihdr(ihdr))


def test_png_chunk_structure_is_checked_before_decoding(rng):
    good = _png(rng.integers(0, 256, (16, 16), dtype=np.uint8))
    bad_crc = bytearray(good)
    bad_crc[29] ^= 1  # the IHDR CRC
    with pytest.raises(ImageDecodeError, match="chunk IHDR at byte 8 fails its CRC"):
        decode_image(bytes(bad_crc))
    with pytest.raises(ImageDecodeError, match="PNG is truncated"):
        decode_image(good[: good.index(b"IEND") - 4])  # cut cleanly before IEND
    no_idat = b"\x89PNG\r\n\x1a\n" + good[8:33] + _chunk(b"IEND", b"")
    with pytest.raises(ImageDecodeError, match="no image data"):
        decode_image(no_idat)
    palette = _png_with_ihdr(struct.pack(">IIBBBBB", 4, 4, 8, 3, 0, 0, 0))
    with pytest.raises(ImageDecodeError, match="no palette"):
        decode_image(palette)


def _png_16bit_rgba_zeros(side: int) -> bytes:
    """A decompression bomb: side x side RGBA at 16 bits of zeros, compressed row by row."""
    compressor, row = zlib.compressobj(9), b"\0" * (1 + side * 8)
    idat = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    return _png_with_ihdr(struct.pack(">IIBBBBB", side, side, 16, 6, 0, 0, 0), idat)


def test_decoded_bytes_budget_refuses_a_bomb_inside_the_pixel_limit():
    bomb = _png_16bit_rgba_zeros(6324)
    assert len(bomb) < 400_000  # ~311 KB declaring 6324 x 6324 x 4 x 2 = 320 MB
    header = read_header(bomb)
    assert header.decoded_bytes == 6324 * 6324 * 4 * 2 and header.width * header.height < 40e6
    with pytest.raises(ImageDecodeError, match=r"= 319943808 decoded bytes, over the limit"):
        decode_image(bomb, "bomb.png")


def test_decoded_bytes_budget_admits_a_4k_frame_and_a_16_bit_mammogram():
    frame = np.zeros((2160, 3840, 3), np.uint8)
    frame[::7, ::5] = 200
    np.testing.assert_array_equal(decode_image(_png(frame)), frame)
    mammogram = np.zeros((4096, 3328), np.uint16)
    mammogram[1000:3000, 500:2500] = 40000
    decoded = decode_image(_png(mammogram))
    assert decoded.dtype == np.uint16
    np.testing.assert_array_equal(decoded, mammogram)


def test_shared_budget_bounds_bytes_in_flight_across_parallel_decodes(monkeypatch):
    import threading

    from edgebc import decode

    image = np.full((100, 100, 3), 9, np.uint8)
    data, one = _png(image), 100 * 100 * 3
    budget = decode.DecodeBudget(2 * one)
    seen, started = [], threading.Barrier(6)
    real_imdecode = cv2.imdecode

    def slow_imdecode(buffer, flags):
        seen.append(budget.in_flight)
        threading.Event().wait(0.05)
        return real_imdecode(buffer, flags)

    monkeypatch.setattr(decode.cv2, "imdecode", slow_imdecode)
    results: list[object] = []

    def upload(wait_s):
        started.wait()
        try:
            results.append(decode_image(data, budget=budget, wait_s=wait_s).shape)
        except decode.DecodeBusyError as exc:
            results.append(exc)

    threads = [threading.Thread(target=upload, args=(10.0,)) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # all six waited their turn and decoded; never more than two images' bytes at once
    assert results == [(100, 100, 3)] * 6
    assert max(seen) == 2 * one and budget.in_flight == 0

    results.clear()
    threads = [threading.Thread(target=upload, args=(0.0,)) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    busy = [r for r in results if isinstance(r, decode.DecodeBusyError)]
    assert 1 <= len(busy) <= 4 and "decode budget is busy" in str(busy[0])
    with pytest.raises(ImageDecodeError, match="over the process-wide decode budget"):
        decode_image(_png(np.zeros((100, 300, 3), np.uint8)), budget=budget)


def _textured(rng, shape) -> np.ndarray:
    return cv2.GaussianBlur(rng.integers(0, 256, shape, dtype=np.uint8), (5, 5), 0)


def test_jpeg_marker_structure_is_checked(rng):
    data = _jpeg(_textured(rng, (32, 32)))
    sof = data.index(b"\xff\xc0")
    with pytest.raises(ImageDecodeError, match="declares 65535 bytes, but the file has only"):
        decode_image(data[: sof + 2] + b"\xff\xff" + data[sof + 4 :])
    sos = data.index(b"\xff\xda")
    no_sof = data[:sof] + data[sos:]
    with pytest.raises(ImageDecodeError, match="no frame header"):
        decode_image(no_sof)
    with pytest.raises(ImageDecodeError, match="declares 32x0 at 8 bits"):
        decode_image(data[: sof + 5] + b"\0\0" + data[sof + 7 :])


def test_jpeg_with_incomplete_scan_is_refused_even_with_eoi_appended(rng):
    data = _jpeg(_textured(rng, (240, 320, 3)))
    truncated = data[: len(data) // 2] + b"\xff\xd9"
    with pytest.raises(ImageDecodeError, match="scan data ends before the image is complete"):
        decode_image(truncated, "cut.jpg")


def test_jpeg_whose_header_lies_about_its_size_is_refused(rng):
    data = _jpeg(_textured(rng, (335, 190, 3)))
    sof = data.index(b"\xff\xc0")
    liar = data[: sof + 5] + struct.pack(">HH", 6000, 6000) + data[sof + 9 :]
    assert read_header(liar).height == 6000
    with pytest.raises(ImageDecodeError, match="over the limit"):
        decode_image(liar)  # the budget refuses 108 MB before decoding
    with pytest.raises(ImageDecodeError, match="scan data ends before the image is complete"):
        decode_image(liar, max_decoded_bytes=200_000_000)  # and so does the scan check


@pytest.mark.parametrize(
    "params",
    [[], [cv2.IMWRITE_JPEG_PROGRESSIVE, 1], [cv2.IMWRITE_JPEG_RST_INTERVAL, 4]],
    ids=["baseline", "progressive", "restart-markers"],
)
def test_complete_jpeg_decodes_exactly_as_opencv_does(rng, params):
    for shape in [(240, 320, 3), (61, 83)]:
        data = cv2.imencode(".jpg", _textured(rng, shape), params)[1].tobytes()
        expected = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        np.testing.assert_array_equal(decode_image(data), expected)
        # trailing bytes after EOI (some cameras append metadata) change nothing
        np.testing.assert_array_equal(decode_image(data + b"\0trailer"), expected)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"WindowCenter": 100, "WindowWidth": 0}, "WindowWidth is 0"),
        ({"RescaleSlope": 0, "RescaleIntercept": 0}, "RescaleSlope is 0"),
        ({"PhotometricInterpretation": "PALETTE COLOR"}, "PALETTE COLOR without its lookup table"),
    ],
    ids=["window-width-0", "rescale-slope-0", "palette-without-lut"],
)
def test_dicom_that_cannot_be_displayed_correctly_is_refused_naming_the_field(extra, message):
    data = _dicom_bytes(np.array([[0, 50], [100, 200]], np.uint8), **extra)
    with pytest.raises(ImageDecodeError, match=message):
        decode_image(data, "scan.dcm")


def test_dicom_window_is_applied_and_cine_bytes_count_every_frame():
    from edgebc.decode import decode_dicom_frames

    pixels = np.array([[0, 50], [100, 200]], np.uint8)
    windowed = decode_image(_dicom_bytes(pixels, WindowCenter=75, WindowWidth=50))
    assert windowed[0, 0] == 0 and windowed[1, 1] == 255  # outside the window: clipped
    cine = _dicom_bytes(np.zeros((3, 4, 4), np.uint8), frames=3)
    assert read_header(cine).decoded_bytes == 3 * 4 * 4
    with pytest.raises(ImageDecodeError, match=r"x 3 frames = 48 decoded bytes, over the limit"):
        decode_dicom_frames(cine, max_bytes=47)


def test_header_of_a_file_prefix_is_read_and_the_decoders_need_the_whole_file(rng):
    png = _png(rng.integers(0, 256, (300, 200), dtype=np.uint8))
    assert len(png) > 4096
    assert (read_header(png[:4096]).width, read_header(png[:4096]).height) == (200, 300)
    with pytest.raises(ImageDecodeError, match="PNG is truncated"):
        read_header(png[:4096], whole_file=True)


@pytest.mark.parametrize(
    ("extra", "corrupt", "message"),
    [
        ({"WindowCenter": "12345", "WindowWidth": 400}, (b"12345 ", b"12@45 "),
         r"WindowCenter is '12@45', not a number"),
        ({"WindowCenter": 100, "WindowWidth": 4321}, (b"4321", b"nan "), "WindowWidth is .*not a number"),
        ({"RescaleSlope": 1, "RescaleIntercept": "54321"}, (b"54321 ", b"5x321 "),
         r"RescaleIntercept is '5x321', not a number"),
        ({"RescaleSlope": 1, "RescaleIntercept": 0}, (b"\x28\x00\x53\x10DS", b"\x28\x00\x53\x10DC"),
         "RescaleSlope cannot be read: Unknown Value Representation 'DC'"),
    ],
    ids=["window-center-text", "window-width-nan", "rescale-intercept-text", "slope-unknown-vr"],
)  # fmt: skip
def test_dicom_display_fields_that_are_not_numbers_are_refused_naming_the_field(
    extra, corrupt, message
):
    """Found by fuzzing: pydicom keeps a malformed number as text, and its LUT code then raised a
    raw TypeError or ValueError (or, for an unknown VR, NotImplementedError)."""
    data = _dicom_bytes(np.array([[0, 50], [100, 200]], np.uint8), **extra)
    assert data.count(corrupt[0]) == 1
    with pytest.raises(ImageDecodeError, match=message):
        decode_image(data.replace(*corrupt), "scan.dcm")


def test_dicom_pixel_data_holding_more_frames_than_declared_decodes_only_the_declared_frame():
    """Found by fuzzing: with NumberOfFrames absent (1), pixel data long enough for 3 frames
    decoded to a 3xHxW array that decode_image returned as if it were one image. Bytes beyond
    the declared frames are now ignored, as bytes after a PNG's IEND or a JPEG's EOI are."""
    from edgebc.decode import decode_dicom_frames

    frames = np.stack([np.full((4, 6), 10 * k, np.uint8) for k in range(3)])
    frames[0, 0, 0] = 200
    data = _dicom_bytes(frames)
    assert read_header(data).frames == 1
    expected = np.where(frames[0] == 200, 255, 0).astype(np.uint8)  # full range: 0..200 -> 0..255
    np.testing.assert_array_equal(decode_image(data), expected)
    [only] = decode_dicom_frames(data)
    np.testing.assert_array_equal(only, expected)


def test_a_good_jpeg_decodes_without_libjpeg_lines_on_stderr(capfd, caplog):
    """The scan check's probe draws libjpeg's "Corrupt JPEG data: ... extraneous bytes" for every
    good JPEG; it becomes a debug log line, not noise on the cart's stderr."""
    import logging

    caplog.set_level(logging.DEBUG, logger="edgebc.decode")
    image = (np.random.default_rng(0).random((64, 80)) * 255).astype(np.uint8)
    data = cv2.imencode(".jpg", image)[1].tobytes()
    assert decode_image(data, "scan.jpg").shape == (64, 80)
    assert "JPEG" not in capfd.readouterr().err
    assert any("extraneous bytes" in r.getMessage() for r in caplog.records)


def _pgm(values: np.ndarray, maxval: int, comment: bytes = b"") -> bytes:
    height, width = values.shape
    raster = values.astype(">u2" if maxval > 255 else np.uint8).tobytes()
    return b"P5\n" + comment + f"{width} {height}\n{maxval}\n".encode() + raster


def test_binary_pgm_is_read_at_its_own_depth_and_its_mistakes_are_named():
    """mini-MIAS was published as 8-bit P5 PGM; a 12-bit film as PGM keeps 0..4095."""
    films = np.arange(12, dtype=np.uint16).reshape(3, 4)
    eight = decode_image(_pgm(films * 20, 255, b"# scanned 1994\n"))
    assert eight.dtype == np.uint8 and eight.tolist() == (films * 20).tolist()
    twelve = decode_image(_pgm(films * 370, 4095))
    assert twelve.dtype == np.uint16 and twelve.tolist() == (films * 370).tolist()
    assert read_header(_pgm(films, 255)).format == "pgm"
    for data, words in [
        (_pgm(films, 255)[:-3], "cut short"),
        (_pgm(films * 400, 4095), "values above its maxval 4095"),
        (b"P5\n4 3\n70000\n" + bytes(24), "maxval 70000"),
        (b"P5\n4\n", "no valid height"),
        (b"P2\n4 3\n255\n" + b"0 " * 12, "only binary grey PGM (P5)"),
    ]:
        with pytest.raises(ImageDecodeError, match=re.escape(words)):
            decode_image(data)
