"""Mammograms at their full bit depth: grey DICOM decoded to uint16 through the modality LUT,
VOI LUT table or window and MONOCHROME1 inversion; 16-bit PNG kept; the header's view read; all
on synthetic DICOM files the tests make themselves."""

from __future__ import annotations

import io
import tracemalloc

import cv2
import numpy as np
import pytest

from edgebc.decode import ImageView, decode_image, read_image, read_image_view
from edgebc.errors import ImageDecodeError

pydicom = pytest.importorskip("pydicom")


def _mammo_dicom(pixels: np.ndarray, bits_stored: int = 12, **extra: object) -> bytes:
    """A digital mammography DICOM with `bits_stored` bits in 16 allocated, MONOCHROME2 unless
    `extra` says otherwise; `extra` sets any further field (sequences as lists of dicts)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import DigitalMammographyXRayImageStorageForPresentation as MG
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MG
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = MG, meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits_stored, bits_stored - 1
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.astype("<u2").tobytes()
    for keyword, value in extra.items():
        if keyword.endswith("Sequence"):
            items = []
            for fields in value:  # type: ignore[attr-defined]
                item = Dataset()
                for k, v in fields.items():
                    setattr(item, k, v)
                items.append(item)
            value = items
        setattr(ds, keyword, value)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


PIXELS = np.array([[0, 1000, 2048], [2560, 4000, 4095]], np.uint16)


def _full(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] as the full-depth decoder stores them."""
    return np.round(np.clip(values, 0, 1) * 65535).astype(np.uint16)


def test_12_bits_in_16_fill_0_to_65535_and_the_8_bit_default_is_unchanged():
    data = _mammo_dicom(PIXELS)
    full = decode_image(data, full_depth=True)
    assert full.dtype == np.uint16
    np.testing.assert_array_equal(full, _full(PIXELS / 4095.0))
    assert full[1, 0] == 40969  # 2560 * 65535 / 4095, not 2560 >> 4 or 2560 >> 8
    default = decode_image(data)
    assert default.dtype == np.uint8  # the display path: min..max stretched onto 0..255
    np.testing.assert_array_equal(default, np.round(PIXELS / 4095.0 * 255).astype(np.uint8))


def test_monochrome1_is_inverted_at_full_depth():
    full = decode_image(
        _mammo_dicom(PIXELS, PhotometricInterpretation="MONOCHROME1"), full_depth=True
    )
    np.testing.assert_array_equal(full, 65535 - _full(PIXELS / 4095.0))
    assert full[0, 0] == 65535 and full[1, 2] == 0


def test_rescale_maps_the_nominal_range_through_slope_and_intercept():
    data = _mammo_dicom(PIXELS, RescaleSlope=2, RescaleIntercept=-1000)
    full = decode_image(data, full_depth=True)
    low, high = -1000.0, 4095 * 2 - 1000.0  # the stored range 0..4095 through the rescale
    np.testing.assert_array_equal(full, _full((PIXELS * 2.0 - 1000 - low) / (high - low)))


def _window(x: np.ndarray, centre: float, width: float, function: str) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2-3 onto [0, 1], written out by hand."""
    if function == "LINEAR":
        return np.clip((x - (centre - 0.5)) / (width - 1) + 0.5, 0, 1)
    if function == "LINEAR_EXACT":
        return np.clip((x - centre) / width + 0.5, 0, 1)
    return 1 / (1 + np.exp(-4 * (x - centre) / width))


@pytest.mark.parametrize("function", ["LINEAR", "LINEAR_EXACT", "SIGMOID"])
def test_the_window_is_mapped_onto_0_to_65535(function):
    data = _mammo_dicom(PIXELS, WindowCenter=2048, WindowWidth=1024, VOILUTFunction=function)
    full = decode_image(data, full_depth=True)
    x = PIXELS.astype(np.float64)
    np.testing.assert_array_equal(full, _full(_window(x, 2048, 1024, function)))
    if function == "LINEAR":  # below the window black, above it white, the centre mid-grey
        assert full[0, 0] == full[0, 1] == 0 and full[1, 1] == full[1, 2] == 65535
        assert full[0, 2] == 32800  # (2048 - 2047.5) / 1023 + 0.5 of 65535
    # with a rescale, the window applies to the rescaled values
    rescaled = _mammo_dicom(
        PIXELS,
        WindowCenter=4096,
        WindowWidth=2048,
        VOILUTFunction=function,
        RescaleSlope=2,
        RescaleIntercept=0,
    )
    np.testing.assert_array_equal(
        decode_image(rescaled, full_depth=True), _full(_window(2 * x, 4096, 2048, function))
    )


def test_a_voi_lut_table_is_applied_and_scaled_from_its_bits():
    table = np.array([0, 1000, 3000, 4095], "<u2").tobytes()
    lut = {"LUTDescriptor": [4, 1000, 12], "LUTData": table}
    pixels = np.array([[0, 1000, 1001], [1002, 1003, 4095]], np.uint16)
    data = _mammo_dicom(pixels, VOILUTSequence=[lut], WindowCenter=10, WindowWidth=2)
    full = decode_image(data, full_depth=True)  # the table wins over the window, as in pydicom
    # below the first mapped value: entry 0; above the last: the last entry
    np.testing.assert_array_equal(full, _full(np.array([[0, 0, 1000], [3000, 4095, 4095]]) / 4095))
    bad = _mammo_dicom(pixels, VOILUTSequence=[{**lut, "LUTDescriptor": [4, 1000, 20]}])
    with pytest.raises(ImageDecodeError, match="VOI LUT declares 20 bits per entry"):
        decode_image(bad, full_depth=True)


def test_an_unknown_voi_function_is_refused_naming_it():
    data = _mammo_dicom(PIXELS, WindowCenter=2048, WindowWidth=1024, VOILUTFunction="CUBIC")
    with pytest.raises(ImageDecodeError, match="VOILUTFunction is 'CUBIC'"):
        decode_image(data, full_depth=True)


def test_read_image_keeps_16_bit_png_and_decodes_dicom_files_at_full_depth(tmp_path):
    values = (np.arange(64 * 48, dtype=np.uint32).reshape(64, 48) * 21).astype(np.uint16)
    png = tmp_path / "mammogram.png"
    cv2.imwrite(str(png), values)
    for full_depth in (False, True):
        decoded = read_image(png, full_depth=full_depth)
        assert decoded.dtype == np.uint16
        np.testing.assert_array_equal(decoded, values)
    dicom = tmp_path / "mammogram.dcm"
    dicom.write_bytes(_mammo_dicom(PIXELS, PhotometricInterpretation="MONOCHROME1"))
    np.testing.assert_array_equal(
        read_image(dicom, full_depth=True), 65535 - _full(PIXELS / 4095.0)
    )


def test_a_full_field_16_bit_mammogram_decodes_without_full_frame_float_copies():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 4096, (4096, 3328), dtype=np.uint16)
    data = _mammo_dicom(pixels, RescaleSlope=1.5, RescaleIntercept=-10)
    frame_bytes = pixels.nbytes  # 27 MB; a float64 copy of it would be 109 MB
    del pixels
    tracemalloc.start()
    try:
        decoded = decode_image(data, full_depth=True)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert decoded.shape == (4096, 3328) and decoded.dtype == np.uint16
    # pydicom's copy of the pixel data, its decoded array and the output, plus blocks of rows
    assert peak < 3.5 * frame_bytes, peak / frame_bytes


def test_the_header_view_is_read_without_pixels():
    pixels = np.zeros((4, 4), np.uint16)
    view = read_image_view(_mammo_dicom(pixels, ImageLaterality="L", ViewPosition="MLO"))
    assert view == ImageView("L", "MLO", "left") and view.is_mlo
    # series-level Laterality when ImageLaterality is absent; a right breast faces the other way
    view = read_image_view(_mammo_dicom(pixels, Laterality="R", ViewPosition="CC"))
    assert view == ImageView("R", "CC", "right") and view.is_mlo is False
    # PatientOrientation's row direction says which edge the chest wall is on, whatever the side
    stored_mirrored = _mammo_dicom(pixels, ImageLaterality="R", PatientOrientation=["A", "FR"])
    assert read_image_view(stored_mirrored).chest_wall == "left"
    assert read_image_view(_mammo_dicom(pixels, ImageLaterality="B")) == ImageView()
    png = cv2.imencode(".png", np.zeros((4, 4), np.uint8))[1].tobytes()
    assert read_image_view(png) == ImageView() and ImageView().is_mlo is None
    assert ImageView.from_code("R-MLO") == ImageView("R", "MLO", "right")
    with pytest.raises(ValueError, match="view code must look like"):
        ImageView.from_code("MLO")


def test_training_reads_a_dicom_mammogram_at_full_depth_with_its_view(tmp_path):
    """What training, eval and calibration feed the preprocessing: the film at full depth and the
    manifest's view, else the header's; an ultrasound sample as before."""
    from edgebc.data.records import Sample
    from edgebc.data.sample_image import read_sample, sample_input
    from edgebc.preprocess import PreprocessCard, preprocess_chw

    path = tmp_path / "mg.dcm"
    path.write_bytes(_mammo_dicom(PIXELS, ImageLaterality="R", ViewPosition="CC"))
    stated = Sample(path, "normal", modality="mammo", view="L-MLO")
    image, view = read_sample(stated)
    np.testing.assert_array_equal(image, _full(PIXELS / 4095.0))  # not cut to 8 bits
    assert view == ImageView("L", "MLO", "left")  # the manifest's view wins over the header's
    assert read_sample(stated.with_(view=None))[1] == ImageView("R", "CC", "right")
    assert read_sample(stated.with_(modality="us"))[0].dtype == np.uint8
    prep = PreprocessCard(input_height=8, input_width=8)
    np.testing.assert_array_equal(
        sample_input(stated, prep),
        preprocess_chw(read_image(path, full_depth=True), prep, view=ImageView("L", "MLO", "left")),
    )


def test_serve_sources_read_a_mammogram_folder_at_full_depth_with_each_films_view(tmp_path):
    """What `edgebc serve` plays for a mammography model: a folder (or one file) of DICOM at full
    depth, each frame carrying its header's view; for an ultrasound model, 8-bit as before."""
    from edgebc.sources import open_source

    (tmp_path / "a.dcm").write_bytes(_mammo_dicom(PIXELS, ImageLaterality="L", ViewPosition="CC"))
    for uri in (str(tmp_path), str(tmp_path / "a.dcm")):
        source = open_source(uri, full_depth=True)
        source.open()
        frame = source.read()
        np.testing.assert_array_equal(frame.image, _full(PIXELS / 4095.0))
        assert frame.view == ImageView("L", "CC", "left")
        plain = open_source(uri)
        plain.open()
        assert plain.read().image.dtype == np.uint8


def test_a_film_stored_unmirrored_keeps_its_headers_chest_wall_in_training_and_on_the_device(
    tmp_path,
):
    """A left breast stored with its chest wall on the right (PatientOrientation P\\F): the
    manifest says L-MLO, the header says how it is stored; training and the device agree."""
    from edgebc.data.records import Sample
    from edgebc.data.sample_image import read_sample

    path = tmp_path / "left.dcm"
    path.write_bytes(_mammo_dicom(PIXELS, ImageLaterality="L", PatientOrientation=["P", "F"]))
    _, trained = read_sample(Sample(path, "normal", modality="mammo", view="L-MLO"))
    device = read_image_view(path.read_bytes())
    assert trained == ImageView("L", "MLO", "right") and device.chest_wall == "right"
