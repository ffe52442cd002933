"""A sample's pixels and view, read the way every model input is made from them.

Training, evaluation, calibration and the export checks all read a manifest's images here, so a
mammogram reaches the shared preprocessing as the device reads it: at full depth (a 12-bit DICOM
is not cut to 8 bits before the breast is found) and with its view (the manifest's `L-MLO`, else
the DICOM header's ImageLaterality / ViewPosition), which decides the laterality flip and whether
the pectoral muscle is looked for. Ultrasound is read exactly as before.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from edgebc.data.mammo_audit import is_mammogram, stated_view
from edgebc.data.records import Sample
from edgebc.decode import ImageView, decode_image, read_image, read_image_view
from edgebc.errors import ImageDecodeError
from edgebc.preprocess import PreprocessCard, preprocess_chw


def read_sample(sample: Sample) -> tuple[np.ndarray, ImageView]:
    """(pixels, view) of one sample: mammograms at full depth with their view; any other
    modality as `read_image` gives it, with an unknown view."""
    if not is_mammogram(sample):
        return read_image(sample.path), ImageView()
    path = Path(sample.path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ImageDecodeError(f"{path}: no such file") from None
    header = read_image_view(data, str(path))
    return decode_image(data, str(path), full_depth=True), sample_view(sample, header)


def sample_view(sample: Sample, header: ImageView | None = None) -> ImageView:
    """The view of a mammogram: the side and projection its manifest row states (`L-CC`,
    `R MLO`, `left`; mini-MIAS's films are MLO), with the chest-wall edge its DICOM header gives
    (`header`, how the film is stored) else by the hanging convention; the header's alone where
    the row states no side; unknown without either."""
    header = header or ImageView()
    side, projection = stated_view(sample)
    if side is not None:
        return ImageView.hung(side, projection or header.position, header)  # type: ignore[arg-type]
    if projection is not None and header.position is None:
        return ImageView(header.laterality, projection, header.chest_wall)
    return header


def sample_input(
    sample: Sample,
    prep: PreprocessCard,
    crop: Callable[[np.ndarray], np.ndarray] | None = None,
) -> np.ndarray:
    """One sample's (C, H, W) model input: its pixels and view through the shared preprocessing;
    for a classifier trained on lesion crops, cropped first as the cart crops
    (`edgebc.localiser.lesion_crop_of(card)`)."""
    image, view = read_sample(sample)
    return preprocess_chw(image if crop is None else crop(image), prep, view=view)
