"""One labelled image (`Sample`) and the lesion findings a mammogram annotation carries."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np

from edgebc.decode import read_image

CLASS_NAMES: tuple[str, ...] = ("normal", "benign", "malignant")


@dataclass(frozen=True)
class Finding:
    """A located abnormality: centre in image pixels with the origin at the TOP-left, radius in pixels.

    Centre and radius are None where the annotation gives none (MIAS lists some widely
    distributed calcifications without a site).
    """

    kind: str
    severity: str
    x: float | None = None
    y: float | None = None
    radius: float | None = None


#: Manifest modality names that mean mammography; a model card calls that modality `mg`.
MAMMOGRAPHY_MODALITIES = ("mammo", "mg", "mammography")


def card_modality(modality: str | None) -> Literal["us", "mg"]:
    """The model card's name (`us`, `mg`) for a manifest's modality column (`mammo`, `us`, ...)."""
    return "mg" if (modality or "").strip().lower() in MAMMOGRAPHY_MODALITIES else "us"


@dataclass(frozen=True)
class Sample:
    """One image to classify with its label and what is known about where it came from.

    `group` holds a near-duplicate group id written by the audit; splits keep a group (and a
    patient) on one side. `extra` keeps any further manifest columns for subgroup analysis.
    """

    path: Path
    label: str
    patient_id: str | None = None
    modality: str = "us"
    view: str | None = None
    source: str | None = None
    split: str | None = None
    fold: int | None = None
    group: str | None = None
    masks: tuple[Path, ...] = ()
    findings: tuple[Finding, ...] = ()
    extra: tuple[tuple[str, str], ...] = field(default=())

    @property
    def lesion_box(self) -> tuple[int, int, int, int] | None:
        """The lesion's bounding box (x, y, w, h) in image pixels, from a `bbox` column such as
        BUS-BRA's `[91,24,103,79]`; None without one. A malformed box is an error, not a guess."""
        text = dict(self.extra).get("bbox")
        if not text:
            return None
        try:
            values = [int(v) for v in str(text).strip().strip("[]()").split(",")]
        except ValueError as exc:
            raise ValueError(f"{self.path}: bbox {text!r} is not four integers x,y,w,h") from exc
        if len(values) != 4 or values[2] <= 0 or values[3] <= 0 or min(values[:2]) < 0:
            raise ValueError(f"{self.path}: bbox {text!r} is not x,y,w,h with a positive size")
        return values[0], values[1], values[2], values[3]

    @property
    def unit(self) -> str:
        """What an independent case is: the patient where the data names one, else the
        near-duplicate group, else the frame (two panels of one lesion are one case)."""
        if self.patient_id:
            return f"patient:{self.patient_id}"
        if self.group:
            return f"group:{self.group}"
        return f"frame:{self.path}"

    def site(self, column: str = "source") -> str | None:
        """Where the frame was acquired, at the grain of `column`: "source" (the site), "device"
        (the scanner; a one-scanner site such as BUSI names none, so its site stands for it), or
        any other manifest column. None when nothing names it."""
        value = getattr(self, column) if column in ("source", "modality", "view") else None
        value = value or dict(self.extra).get(column)
        if not value and column == "device":
            value = self.source
        return None if value in (None, "") else str(value)

    def with_(self, **changes: object) -> Sample:
        """A copy with some fields changed (samples are immutable)."""
        return replace(self, **changes)  # type: ignore[arg-type]


def load_mask(sample: Sample) -> np.ndarray | None:
    """The union of a sample's lesion masks as a uint8 0/1 array, or None when it has no mask file.

    BUSI stores a second and third lesion as `_mask_1`, `_mask_2`: a case's lesion area is all of them.
    """
    if not sample.masks:
        return None
    merged: np.ndarray | None = None
    for path in sample.masks:
        mask = read_image(path)
        if mask.ndim == 3:
            mask = mask.max(axis=2)
        binary = (mask > 0).astype(np.uint8)
        if merged is None:
            merged = binary
        elif merged.shape != binary.shape:
            raise ValueError(
                f"{path}: mask is {binary.shape[::-1]} but {sample.masks[0]} is {merged.shape[::-1]}"
            )
        else:
            merged |= binary
    return merged
