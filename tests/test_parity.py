"""Train and runtime produce the same tensor for the same frame: one preprocessing, no copy of it."""

import cv2
import numpy as np
import pytest

from edgebc.data import Sample
from edgebc.decode import read_image
from edgebc.preprocess import PreprocessCard, preprocess
from edgebc.synth import make_ultrasound_phantom
from edgebc.synth.ultrasound import phantom_rng
from edgebc.task import TASKS

torch = pytest.importorskip("torch", reason="torch (the [train] extra) is not installed")


@pytest.mark.parametrize(
    "card",
    [
        PreprocessCard(),
        PreprocessCard.imagenet_rgb(160, 192, resize="stretch"),
        PreprocessCard(appearance="equalise"),
        PreprocessCard.imagenet_rgb(appearance="stretch"),
        PreprocessCard(appearance="minmax"),
        PreprocessCard.imagenet_rgb(appearance="minmax", resize="stretch"),
    ],
)
def test_training_dataset_tensor_equals_runtime_tensor(tmp_path, card):
    from edgebc.train.dataset import SampleDataset

    path = tmp_path / "frame.png"
    cv2.imwrite(str(path), make_ultrasound_phantom("malignant", phantom_rng(0, 0), 300, 420).image)
    dataset = SampleDataset([Sample(path, "malignant")], card, TASKS["three_class"])
    tensor, target = dataset[0]
    runtime = preprocess(read_image(path), card)[0]
    assert target == 2
    assert tensor.dtype == torch.float32 and tuple(tensor.shape) == card.input_shape
    np.testing.assert_array_equal(tensor.numpy(), runtime)


def test_dataset_refuses_labels_outside_the_classes(tmp_path):
    from edgebc.train.dataset import SampleDataset

    with pytest.raises(ValueError, match="that task benign_vs_malignant does not take"):
        SampleDataset(
            [Sample(tmp_path / "x.png", "normal")], PreprocessCard(), TASKS["benign_vs_malignant"]
        )


MG_CARD = PreprocessCard(
    input_height=256,
    input_width=192,
    breast_crop=True,
    laterality="left",
    pectoral="suppress",
    clahe_clip=2.0,
    clahe_tiles=4,
)


def test_training_and_runtime_tensors_agree_for_a_16_bit_mammogram_with_every_mg_step(tmp_path):
    """A 12-bit right MLO in a 16-bit PNG, cropped, turned left, its muscle suppressed and CLAHE
    applied at 16 bits: the training dataset and the runtime make the same tensor, and that
    tensor differs from the one made from the same film cut to 8 bits (the depth is used)."""
    from edgebc.synth.mammogram import draw_breast, make_mammogram
    from edgebc.train.dataset import SampleDataset

    breast = draw_breast("malignant", np.random.default_rng(4))
    m = make_mammogram(breast, np.random.default_rng(104), "R", "MLO", height=400, width=320)
    full = m.image * np.uint16(16)  # 12 bits spread over 16, as a full-depth decode gives them
    path = tmp_path / "mammogram.png"
    cv2.imwrite(str(path), full)
    dataset = SampleDataset([Sample(path, "malignant")], MG_CARD, TASKS["three_class"])
    tensor, _ = dataset[0]
    runtime = preprocess(read_image(path, full_depth=True), MG_CARD)[0]
    np.testing.assert_array_equal(tensor.numpy(), runtime)
    eight_bit = preprocess((full >> 8).astype(np.uint8), MG_CARD)[0]
    assert np.abs(eight_bit - runtime).max() > 0.05


def test_a_16_bit_dicom_mammogram_and_its_png_give_the_same_tensor(tmp_path):
    """The runtime's DICOM route (full-depth decode, the header's view) and the PNG of the same
    pixels agree, so a model trained on PNG exports sees the same input from the scanner's DICOM."""
    pytest.importorskip("pydicom")
    import io

    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import DigitalMammographyXRayImageStorageForPresentation as MG
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    from edgebc.decode import read_image_view
    from edgebc.synth.mammogram import draw_breast, make_mammogram

    breast = draw_breast("benign", np.random.default_rng(5))
    m = make_mammogram(breast, np.random.default_rng(105), "R", "MLO", height=400, width=320)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = MG, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta, ds.SOPClassUID, ds.SOPInstanceUID = meta, MG, meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = m.image.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME1"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.ImageLaterality, ds.ViewPosition = "R", "MLO"
    ds.PixelData = (4095 - m.image).astype("<u2").tobytes()  # stored inverted, as MONOCHROME1
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    dicom = tmp_path / "mammogram.dcm"
    dicom.write_bytes(buffer.getvalue())
    png = tmp_path / "mammogram.png"
    cv2.imwrite(str(png), np.round(m.image * (65535 / 4095)).astype(np.uint16))

    view = read_image_view(dicom.read_bytes())
    assert view.chest_wall == "right" and view.is_mlo
    from_dicom = preprocess(read_image(dicom, full_depth=True), MG_CARD, view=view)
    np.testing.assert_array_equal(from_dicom, preprocess(read_image(png), MG_CARD))
