"""The imaging region: where on the scanner's screen the B-mode image sits.

A capture card delivers the scanner's whole screen (menus, text, depth scale, probe icon) around
the ultrasound image. The model must only ever see the image, so the region is either configured
(x, y, w, h, measured once per cart) or proposed by `detect_imaging_region` and confirmed by an
engineer. The detector looks for the largest bright, solid area: speckle fills the B-mode image
densely, while text, tick marks and icons are thin strokes that a morphological opening erases.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from edgebc.decode import to_grey_uint8


@dataclass(frozen=True)
class Region:
    """An axis-aligned rectangle in frame pixels: left x, top y, width w, height h."""

    x: int
    y: int
    w: int
    h: int

    def __post_init__(self) -> None:
        for name in ("x", "y", "w", "h"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise ValueError(
                    f"region {name} must be an integer number of pixels, got {value!r}"
                )
        if self.x < 0 or self.y < 0:
            raise ValueError(f"region origin must not be negative, got x={self.x}, y={self.y}")
        if self.w <= 0 or self.h <= 0:
            raise ValueError(f"region must have positive size, got w={self.w}, h={self.h}")

    @property
    def area(self) -> int:
        return self.w * self.h

    def fits(self, frame_height: int, frame_width: int) -> bool:
        """True when the region lies wholly inside a frame of this size."""
        return self.x + self.w <= frame_width and self.y + self.h <= frame_height

    def crop(self, frame: np.ndarray) -> np.ndarray:
        """The view of `frame` inside the region; refuses a region that leaves the frame."""
        height, width = frame.shape[:2]
        if not self.fits(height, width):
            raise ValueError(
                f"imaging region x={self.x} y={self.y} w={self.w} h={self.h} does not fit in a "
                f"{width}x{height} frame; the capture resolution changed or the region is wrong"
            )
        return frame[self.y : self.y + self.h, self.x : self.x + self.w]

    def iou(self, other: Region) -> float:
        """Intersection over union, for comparing a detected region with a known one."""
        left, top = max(self.x, other.x), max(self.y, other.y)
        right = min(self.x + self.w, other.x + other.w)
        bottom = min(self.y + self.h, other.y + other.h)
        inter = max(0, right - left) * max(0, bottom - top)
        return inter / float(self.area + other.area - inter)


def detect_imaging_region(
    frame: np.ndarray,
    min_fraction: float = 0.05,
    intensity_threshold: int = 12,
) -> Region | None:
    """Propose the imaging region of a scanner screen grab, or None when nothing qualifies.

    Steps: grey, light blur, threshold above the black background, a closing that fills dark
    lesions and speckle gaps inside the image, an opening about 2% of the frame wide that erases
    text and thin UI, then the largest connected area. None when it covers less than
    `min_fraction` of the frame (a blank or menu-only screen): the caller must then refuse, not
    classify the whole screen.
    """
    grey = to_grey_uint8(frame)
    height, width = grey.shape
    blurred = cv2.GaussianBlur(grey, (5, 5), 0)
    mask = (blurred > intensity_threshold).astype(np.uint8)
    size = max(3, round(min(height, width) * 0.02) | 1)
    kernel = cv2.getStructuringElement(cv2.MORPH_RECT, (size, size))
    closed = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, kernel)
    opened = cv2.morphologyEx(
        closed,
        cv2.MORPH_OPEN,
        cv2.getStructuringElement(cv2.MORPH_RECT, (2 * size + 1, 2 * size + 1)),
    )
    count, _, stats, _ = cv2.connectedComponentsWithStats(opened, connectivity=8)
    if count <= 1:
        return None
    areas = stats[1:, cv2.CC_STAT_AREA]
    best = 1 + int(np.argmax(areas))
    if areas[best - 1] < min_fraction * height * width:
        return None
    x, y, w, h = (int(v) for v in stats[best, :4])
    return Region(x, y, w, h)
