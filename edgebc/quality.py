"""The quality gates: frames that cannot be read as B-mode ultrasound (QualityGate) or as a
mammogram (MammographyGate, for models whose card declares a mammography input) get "no decision"
and a reason.

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
from typing import ClassVar, cast

import cv2
import numpy as np

from edgebc.area import area_resize
from edgebc.breast import Breast, NoBreastFoundError, find_breast
from edgebc.data.fingerprint import colour_fraction
from edgebc.decode import to_grey_uint8


@dataclass(frozen=True)
class QualityResult:
    ok: bool
    reason: str | None = None
    check: str | None = None  # the test that refused: one of CHECKS, for counting refusals by kind

    def __str__(self) -> str:
        return "ok" if self.ok else f"no decision: {self.reason}"


#: The ultrasound gate's default size: it judges a grey copy at most this many pixels on its
#: long side. Where a grey model's input is the grey crop resized by area, the classifier reads
#: this copy and the model's resize from one summed-area table (edgebc.area). Not 224, the
#: common model size, by default: judged at 224 px with the same limits, 42 of the 5,548 frames
#: tools/measure_quality_gate.py measures change verdict (35 mammogram phantoms, 5 mini-MIAS
#: films, one BUS-BRA Logiq 5 frame and its JPEG copy), and no choice of limits at 224 keeps every verdict (issue 23).
GATE_SIZE = 256
CHECKS = ("uniform", "dark", "bright", "colour", "flat", "speckle")
#: The mammography gate's checks, in the order it makes them.
MAMMOGRAPHY_CHECKS = (
    "uniform",
    "bit_depth",
    "saturated",
    "colour",
    "no_breast",
    "flat",
    "ultrasound",
)


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
    # The long side, in pixels, of the grey copy every statistic is judged on: part of the gate's
    # design, not a setting (its limits were measured at this size); see gate_at_size.
    size: ClassVar[int] = GATE_SIZE

    def check(
        self, frame: np.ndarray, grey: np.ndarray | None = None, small: np.ndarray | None = None
    ) -> QualityResult:
        """`grey` is the frame already converted to grey (the classifier converts once for both
        the gate and a grey model's preprocessing); computed here when not given. `small` is
        `thumbnail(grey, self.size)` already made (the classifier's, where a grey model's
        resize of the same grey frame is that very array)."""
        # Every test is a statistic over the picture, so it is judged on a grey copy at most
        # `size` px on its long side: 1080p crops cost about 2 ms instead of 40 (measured).
        # Grey first, then scale: scaling the colour frame cost three times as much.
        if small is None:
            small = thumbnail(grey if grey is not None else to_grey_uint8(frame), self.size)
        elif small.shape[:2] != thumbnail_shape(frame.shape[0], frame.shape[1], self.size):
            raise ValueError(f"the gate's copy must be {self.size} px on its long side, got shape "
                             f"{small.shape} for a frame of shape {frame.shape}")  # fmt: skip
        grey8 = to_grey_uint8(small)
        std, mean = level_spread(grey8)
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
        flat, contrast = speckle_statistics(grey8, self.flat_contrast, self.size)
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


def gate_at_size(size: int, **limits: float) -> QualityGate:
    """A QualityGate judging a copy `size` px on its long side instead of GATE_SIZE, to measure
    what another size does (tools/measure_quality_gate.py --gate-size, benchmarks/pipeline.py):
    its limits were measured at GATE_SIZE, so the size is not a site's setting."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 32:
        raise ValueError(f"quality gate size must be a whole number of pixels >= 32, got {size!r}")
    if size == GATE_SIZE:
        return QualityGate(**limits)
    sized = type(f"QualityGateAt{size}", (QualityGate,), {"size": size})
    return cast(QualityGate, sized(**limits))


def thumbnail(image: np.ndarray, size: int = 256) -> np.ndarray:
    """`image` scaled (area-averaged) so its long side is at most `size`; small images unchanged."""
    height, width = thumbnail_shape(image.shape[0], image.shape[1], size)
    if (height, width) == image.shape[:2]:
        return image
    return area_resize(image, width, height)


def thumbnail_shape(height: int, width: int, size: int = 256) -> tuple[int, int]:
    """(height, width) of `thumbnail` of a height x width image."""
    scale = size / max(height, width)
    if scale >= 1:
        return height, width
    return max(1, round(height * scale)), max(1, round(width * scale))


def level_spread(grey8: np.ndarray) -> tuple[float, float]:
    """(standard deviation, mean) of the grey levels from two OpenCV calls (0.004 ms on a 256 px
    copy; numpy's std and mean took 0.056), the mean as numpy gives it (the exact sum over the
    count; OpenCV multiplies by the count's reciprocal, a last bit apart at a whole-number mean)."""
    _, deviation = cv2.meanStdDev(grey8)
    return float(deviation[0, 0]), float(cv2.sumElems(grey8)[0]) / grey8.size


def subsample(image: np.ndarray, size: int = 256) -> np.ndarray:
    """Every k-th pixel so the long side is about `size`: for shares of pixels (colour) a sample
    is as good as the whole and costs nothing, unlike an area-averaged thumbnail."""
    step = max(1, max(image.shape[:2]) // size)
    return image[::step, ::step]


def speckle_statistics(
    grey8: np.ndarray, flat_contrast: float = 0.01, size: int = GATE_SIZE
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


@dataclass(frozen=True)
class MammographyGate:
    """The gate for models whose card declares a mammography (`mg`) input.

    A mammogram is a breast on a near-black background, of smooth tissue, in 8 to 16 bits. Every
    statistic is judged on a copy at most 256 px on its long side (a 4096x3328 DICOM costs what a
    small PNG does), in the frame's own dtype: a 12-bit mammogram stored in 16 bits (0..4095) is
    never shifted right by 8; where a statistic needs 8 bits the frame is scaled by its own range
    (its 0.5th to 99.5th percentile). In order, it refuses:

    - uniform: nothing on the frame, judged on a 32 px copy so capture noise averages away: its
      spread is under `min_std` levels of 255 of the frame's scale (255 for uint8; for uint16 the
      smallest 2^b - 1 holding its brightest level, so a 12-bit frame is judged on 0..4095).
    - bit_depth: levels that cannot be a mammogram as stored: a 16-bit frame whose levels all fit
      in 8 bits (brightest under `min_levels_16bit`: an 8-bit image put in 16, or a 16-bit film
      shifted right by 8 and stored again), or an 8-bit frame whose bright end (99.5th
      percentile) stays under `min_bright_8bit` (a 12-bit film shifted into 8 bits reads 0..15).
    - saturated: more than `max_saturated` of the pixels at the frame's brightest level (clipped
      exposure, a window set too narrow, a nearly binary picture).
    - colour: colour over more than `max_colour_fraction` of the picture (a photo, a screen).
    - no_breast: edgebc.breast.find_breast finds no breast (nothing stands above the background,
      or its largest bright region is too small).
    - flat: more than `max_level_share` of the breast's pixels at one grey level (8-bit, scaled by
      the frame's range): a screen, document or graphic, whose windows and pages are one shade.
    - ultrasound: the breast region's median speckle contrast (3x3 spread / local mean, on the
      256 px copy scaled by its own range, inside the breast's mask eroded from its edge) above
      `max_speckle_contrast`, or above `max_side_to_side_contrast` where the region fills the
      frame from side to side as a scan does (a breast lies against one side, its chest wall):
      B-mode speckle, which film and digital mammograms do not have.

    Measured 2026-11-30 (tools/measure_quality_gate.py; see docs/RUNTIME.md): speckle contrast of
    mini-MIAS 0.010-0.041 (0.010-0.011 for the two films that reach both side edges), of
    mammogram phantoms 0.022-0.044; of BUSI 0.046-0.194 (three heavily smoothed frames under
    0.052, all filling the width), BUS-BRA 0.065-0.330, ultrasound phantoms and scanner screens
    at least 0.12.
    """

    min_std: float = 2.0
    min_levels_16bit: int = 256
    min_bright_8bit: float = 32.0
    max_saturated: float = 0.10
    max_colour_fraction: float = 0.05
    max_level_share: float = 0.2
    max_speckle_contrast: float = 0.052
    # A bright region that fills the frame from side to side (covering at least
    # `min_side_cover` of both side edges) is a scan, not a breast against its chest wall, when
    # it has even this much speckle: heavily smoothed B-mode (speckle reduction) comes under
    # max_speckle_contrast, but mammograms that fill the width are smoother still.
    min_side_cover: float = 0.3
    max_side_to_side_contrast: float = 0.03

    def check(self, frame: np.ndarray, grey: np.ndarray | None = None) -> QualityResult:
        """`grey` is the frame already converted to grey in its own dtype (the classifier converts
        once for both the gate and a grey model's preprocessing); computed here when not given."""
        grey = integer_grey(frame if grey is None else grey)
        small = thumbnail(grey, 256)
        sample = subsample(grey, 256)  # for levels and shares of pixels: as good as the whole
        top = int(sample.max())
        scale = 255 if grey.dtype == np.uint8 else max(255, (1 << top.bit_length()) - 1)
        spread = float(thumbnail(small, 32).std()) * 255.0 / scale
        if spread < self.min_std:
            return QualityResult(
                False,
                f"blank or uniform frame (grey-level spread {spread:.1f} of 255 < {self.min_std})",
                "uniform",
            )
        if grey.dtype == np.uint16 and top < self.min_levels_16bit:
            return QualityResult(
                False,
                f"wrong bit depth: a 16-bit frame whose levels reach only {top} (8 bits' worth; "
                "an 8-bit image stored in 16 bits, or a film shifted right by 8)",
                "bit_depth",
            )
        low, high = (float(v) for v in np.percentile(small, (0.5, 99.5)))
        if grey.dtype == np.uint8 and high < self.min_bright_8bit:
            return QualityResult(
                False,
                f"wrong bit depth: an 8-bit frame whose bright end is grey level {high:.0f} "
                "(a 12-bit mammogram shifted into 8 bits reads 0..15)",
                "bit_depth",
            )
        saturated = float(np.count_nonzero(sample == top)) / float(sample.size)
        if saturated > self.max_saturated:
            return QualityResult(
                False,
                f"saturated: {saturated:.0%} of the pixels sit at the brightest level "
                "(clipped exposure, a window too narrow, or a nearly binary picture)",
                "saturated",
            )
        colour = 0.0 if frame.dtype.kind == "f" else colour_fraction(subsample(frame, 128))
        if colour > self.max_colour_fraction:
            return QualityResult(
                False, f"does not look like a mammogram: colour covers {colour:.0%}", "colour"
            )
        try:
            breast = find_breast(small)
        except NoBreastFoundError as error:
            return QualityResult(False, str(error), "no_breast")
        texture = texture_of(small, low, high, breast)
        if texture.level_share > self.max_level_share:
            return QualityResult(
                False,
                f"does not look like a mammogram: {texture.level_share:.0%} of its bright region "
                "is one grey level (a screen, document or graphic?)",
                "flat",
            )
        contrast = texture.speckle_contrast
        side_to_side = texture.side_cover >= self.min_side_cover
        if contrast > self.max_speckle_contrast or (
            side_to_side and contrast > self.max_side_to_side_contrast
        ):
            where = " filling the frame from side to side" if side_to_side else ""
            return QualityResult(
                False,
                f"does not look like a mammogram: speckle texture (contrast {contrast:.3f}){where},"
                " as B-mode ultrasound has (an ultrasound frame given to a mammography model?)",
                "ultrasound",
            )
        return QualityResult(True)


@dataclass(frozen=True)
class BreastTexture:
    """What the mammography gate reads off the breast region (see MammographyGate)."""

    level_share: float  # share of its pixels at its commonest 8-bit level
    speckle_contrast: float  # median 3x3 spread / local mean inside it
    side_cover: float  # the lesser share of the frame's two side edges that it covers


def texture_of(small: np.ndarray, low: float, high: float, breast: Breast) -> BreastTexture:
    """The texture of `breast` (found on `small`, the frame's thumbnail) with the thumbnail
    scaled to 8 bits between its levels `low` and `high`."""
    grey8 = np.clip((small.astype(np.float32) - low) * (255.0 / max(high - low, 1e-6)), 0, 255)
    mask = cv2.resize(breast.mask, (grey8.shape[1], grey8.shape[0]),
                      interpolation=cv2.INTER_NEAREST)  # fmt: skip
    return BreastTexture(
        largest_level_share(np.round(grey8[mask > 0]).astype(np.uint8)),
        breast_speckle_contrast(grey8, mask),
        float(min(mask[:, 0].mean(), mask[:, -1].mean())),
    )


def breast_texture(frame: np.ndarray) -> BreastTexture:
    """The texture the mammography gate judges, for a whole frame (tools/measure_quality_gate.py
    reports its range per set); NoBreastFoundError where there is no breast."""
    small = thumbnail(integer_grey(frame), 256)
    low, high = (float(v) for v in np.percentile(small, (0.5, 99.5)))
    return texture_of(small, low, high, find_breast(small))


Gate = QualityGate | MammographyGate


def gate_for(modality: str, ultrasound: QualityGate, mammography: MammographyGate) -> Gate:
    """The gate for a model input's modality (`mg`: mammography; anything else: ultrasound)."""
    return mammography if modality == "mg" else ultrasound


def integer_grey(frame: np.ndarray) -> np.ndarray:
    """A grey view of a grey or BGR(A) frame in its own bit depth (never shifted to 8 bits): uint8
    and uint16 as they are, float in [0, 1] as 16-bit levels."""
    if frame.ndim == 3 and frame.shape[2] == 1:
        frame = frame[:, :, 0]
    elif frame.ndim == 3:
        frame = cv2.cvtColor(np.ascontiguousarray(frame[:, :, :3]), cv2.COLOR_BGR2GRAY)
    if frame.dtype in (np.uint8, np.uint16):
        return frame
    return np.round(np.clip(np.nan_to_num(frame), 0.0, 1.0) * 65535.0).astype(np.uint16)


def largest_level_share(levels: np.ndarray) -> float:
    """The share of 8-bit `levels` at their commonest level (1.0 when empty)."""
    if levels.size == 0:
        return 1.0
    return float(np.bincount(levels.ravel(), minlength=256).max()) / float(levels.size)


def breast_speckle_contrast(grey8: np.ndarray, mask: np.ndarray) -> float:
    """Median speckle contrast (3x3 spread / (local mean + 1)) of a float 8-bit-scaled frame over
    its breast mask eroded by 3 px (the skin line's edge is structure, not texture)."""
    mean = cv2.blur(grey8, (3, 3))
    spread = np.sqrt(np.maximum(cv2.blur(grey8 * grey8, (3, 3)) - mean * mean, 0.0))
    inner = cv2.erode(mask, np.ones((7, 7), np.uint8)) > 0
    if not inner.any():
        inner = mask > 0
    return median(spread[inner] / (mean[inner] + 1.0)) if inner.any() else 0.0
