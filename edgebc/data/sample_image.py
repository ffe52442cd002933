"""A sample's pixels and view, read the way every model input is made from them.

Training, evaluation, calibration and the export checks all read a manifest's images here, so a
mammogram reaches the shared preprocessing as the device reads it: at full depth (a 12-bit DICOM
is not cut to 8 bits before the breast is found) and with its view (the manifest's `L-MLO`, else
the DICOM header's ImageLaterality / ViewPosition), which decides the laterality flip and whether
the pectoral muscle is looked for. Ultrasound is read exactly as before.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgebc.data.mammo_audit import is_mammogram, stated_view
from edgebc.data.records import Sample
from edgebc.decode import ImageView, read_image, read_image_view
from edgebc.preprocess import PreprocessCard, preprocess_chw


def read_sample(sample: Sample) -> tuple[np.ndarray, ImageView]:
    """(pixels, view) of one sample: mammograms at full depth with their view; any other
    modality as `read_image` gives it, with an unknown view."""
    if not is_mammogram(sample):
        return read_image(sample.path), ImageView()
    return read_image(sample.path, full_depth=True), sample_view(sample)


def sample_view(sample: Sample) -> ImageView:
    """The view a mammogram's manifest row states (`L-CC`, `R MLO`, `left`; mini-MIAS's films are
    MLO), else what its DICOM header says, else unknown."""
    side, projection = stated_view(sample)
    if side is not None:
        return ImageView(side, projection, "left" if side == "L" else "right")  # type: ignore[arg-type]
    view = read_image_view(Path(sample.path).read_bytes(), str(sample.path))
    if projection is not None and view.position is None:
        return ImageView(view.laterality, projection, view.chest_wall)
    return view


def sample_input(sample: Sample, prep: PreprocessCard) -> np.ndarray:
    """One sample's (C, H, W) model input: its pixels and view through the shared preprocessing."""
    image, view = read_sample(sample)
    return preprocess_chw(image, prep, view=view)
