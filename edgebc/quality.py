"""The quality gate: frames that cannot be read as B-mode ultrasound get "no decision" and a reason.

A classifier answers something for any input; a cart must not. Before inference each cropped
frame is checked for what a person at the screen would see at once: a blank or uniform picture
(a frozen black screen; a probe in the air, unless the scanner shows its noise floor, which looks
like speckle), a frame too dark or washed out to read, colour covering much of the image (Doppler
overlays change what the model sees), and pictures that are not B-mode ultrasound. Frozen feeds
are the stream's job (it compares consecutive frames).

"Not ultrasound" rests on speckle, which every B-mode image of tissue has and screens, documents,
graphics and film mammograms lack. On the frame scaled to 256 px (so the test does not depend on
resolution), among pixels brighter than black, each pixel's *speckle contrast* (3x3 grey-level
spread / local mean): the share of *flat* pixels (contrast below 1 %) and the median contrast.
Flat is relative to a pixel's brightness because real B-mode is nearly flat where it is dim: in
deep tissue and acoustic shadows weak echoes sit on the display's dim floor, and speckle
reduction and JPEG capture smooth them further. An absolute limit (spread under 1 grey level)
called those pixels flat and refused 12.8 % of BUS-BRA's frames (34 % of its Toshiba Aplio's);
screens and documents are flat at every brightness. Measured 2026-11-29
(tools/measure_quality_gate.py): real B-mode of five scanners (BUSI; BUS-BRA's four) flat <= 0.14
(<= 0.20 through JPEG at quality 75), contrast >= 0.028 (3 of 490 Logiq 5 frames under 0.04);
desktops and documents flat >= 0.52; mini-MIAS mammograms contrast <= 0.042. Limits 0.25 and
0.04. Natural grey photos with fine texture (grass, gravel, faces) and a few dense mammograms
pass; most natural photos are colour and fail the colour test. It is a guard against the wrong
input, not a detector of every non-ultrasound picture.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from edgebc.data.fingerprint import colour_fraction
from edgebc.decode import to_grey_uint8


@dataclass(frozen=True)
class QualityResult:
    ok: bool
    reason: str | None = None
    check: str | None = None  # the test that refused: one of CHECKS, for counting refusals by kind

    def __str__(self) -> str:
        return "ok" if self.ok else f"no decision: {self.reason}"


CHECKS = ("uniform", "dark", "bright", "colour", "flat", "speckle")


@dataclass(frozen=True)
class QualityGate:
    """Thresholds on 8-bit grey levels, shares of pixels and speckle contrast; defaults chosen so
    that the B-mode of five scanners (BUSI, BUS-BRA) passes and screens and mammograms do not."""

    min_std: float = 6.0
    min_mean: float = 8.0
    max_mean: float = 235.0
    max_colour_fraction: float = 0.05
    max_flat_fraction: float = 0.25
    flat_contrast: float = 0.01  # a pixel is flat when its speckle contrast is below this
    min_speckle_contrast: float = 0.04

    def check(self, frame: np.ndarray, grey: np.ndarray | None = None) -> QualityResult:
        """`grey` is the frame already converted to grey (the classifier converts once for both
        the gate and a grey model's preprocessing); computed here when not given."""
        # Every test is a statistic over the picture, so it is judged on a grey copy at most 256 px
        # on its long side: 1080p crops cost about 2 ms instead of 40 (measured). Grey first, then
        # scale: scaling the colour frame cost three times as much for the same statistics.
        grey8 = to_grey_uint8(thumbnail(grey if grey is not None else to_grey_uint8(frame)))
        std, mean = float(grey8.std()), float(grey8.mean())
        if std < self.min_std:
            return QualityResult(
                False,
                f"blank or uniform frame (grey-level spread {std:.1f} < {self.min_std})",
                "uniform",
            )
        if mean < self.min_mean:
            return QualityResult(False, f"frame too dark (mean grey level {mean:.0f})", "dark")
        if mean > self.max_mean:
            return QualityResult(False, f"frame washed out (mean grey level {mean:.0f})", "bright")
        colour = colour_fraction(subsample(frame, 128))
        if colour > self.max_colour_fraction:
            return QualityResult(
                False, f"colour overlay covers {colour:.0%} of the image (Doppler?)", "colour"
            )
        flat, contrast = speckle_statistics(grey8, self.flat_contrast)
        if flat > self.max_flat_fraction:
            return QualityResult(
                False,
                f"does not look like B-mode ultrasound: {flat:.0%} of the image is flat "
                "(a screen, document or graphic? check the imaging region)",
                "flat",
            )
        if contrast < self.min_speckle_contrast:
            return QualityResult(
                False,
                f"does not look like B-mode ultrasound: no speckle texture (contrast {contrast:.3f})",
                "speckle",
            )
        return QualityResult(True)


def thumbnail(image: np.ndarray, size: int = 256) -> np.ndarray:
    """`image` scaled (area-averaged) so its long side is at most `size`; small images unchanged."""
    height, width = image.shape[:2]
    scale = size / max(height, width)
    if scale >= 1:
        return image
    return cv2.resize(image, (max(1, round(width * scale)), max(1, round(height * scale))),
                      interpolation=cv2.INTER_AREA)  # fmt: skip


def subsample(image: np.ndarray, size: int = 256) -> np.ndarray:
    """Every k-th pixel so the long side is about `size`: for shares of pixels (colour) a sample
    is as good as the whole and costs nothing, unlike an area-averaged thumbnail."""
    step = max(1, max(image.shape[:2]) // size)
    return image[::step, ::step]


def speckle_statistics(
    grey8: np.ndarray, flat_contrast: float = 0.01, size: int = 256
) -> tuple[float, float]:
    """(share of flat pixels, median speckle contrast) over the non-black pixels of a grey frame.

    Both come from one per-pixel contrast, 3x3 spread / (local mean + 1); a pixel is flat when it
    is below `flat_contrast`, i.e. flat relative to its own brightness.
    """
    values = thumbnail(grey8, size).astype(np.float32)
    mean = cv2.blur(values, (3, 3))
    spread = np.sqrt(np.maximum(cv2.blur(values * values, (3, 3)) - mean * mean, 0.0))
    lit = values > 12
    if not lit.any():
        return 1.0, 0.0
    contrast = spread[lit] / (mean[lit] + 1.0)
    flat = float(np.count_nonzero(contrast < flat_contrast)) / float(contrast.size)
    return flat, median(contrast)


def median(values: np.ndarray) -> float:
    """np.median's value, by partition: np.median took 0.46 ms on a 256 px frame, this 0.05."""
    # One kth only: numpy's partition with two kth values is as slow as np.median.
    n = values.size
    parted = np.partition(values.ravel(), n // 2)
    upper = np.float64(parted[n // 2])
    lower = np.float64(parted[: n // 2].max()) if n % 2 == 0 else upper
    return float((lower + upper) / 2.0)
