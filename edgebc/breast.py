"""Find the breast on a mammogram, so preprocessing can crop away the film's background, labels
and markers and turn every breast to face the same way.

The breast is the largest bright connected region of the film: the background is near black, and
labels, rulers and skin-marker dots are bright but small and stand apart from it. The crop is the
breast's bounding box with a margin, and inside it everything off the breast (its mask grown by
the margin) is set to black, so a label beside a wide breast goes too. Detection runs
on a grey view at most DETECT_SIDE pixels on its long side (so a 4096x3328 DICOM costs what a
512-pixel image does), scaled from the frame's own low and high percentiles (so a 12-bit
mammogram stored in 16 bits is seen at full contrast, not shifted down to 0..15). The threshold
is a tenth of the way from the film's black to its bright level: far above the black's noise,
below the dim skin margin. (Otsu's level is not used: with a bright pectoral muscle or label in
the picture it falls between fat and muscle and cuts the breast apart.)

The chest wall is the side of the breast's bounding box where the breast is tallest: the breast
meets the chest wall along its full height and narrows to the nipple on the other side. Where
the file's header says which edge the chest wall is on (edgebc.decode.read_image_view), that is
used instead, and the image's judgement checks it: when the image says the opposite side clearly
(one edge at least CONFLICT_RATIO times taller than the other) the frame is refused
(LateralityConflictError), since a header and a picture that disagree mean a mislabelled study or
a film stored mirrored, and either way the breast would be turned the wrong way; where the image
is unsure (a breast filling the film edge to edge) the header decides.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np

from edgebc.errors import EdgebcError
from edgebc.pectoral import PECTORAL_MODES, suppress_pectoral

log = logging.getLogger(__name__)

LATERALITY_MODES = ("keep", "left")
#: Detection works on a copy at most this many pixels on its long side.
DETECT_SIDE = 512
#: The grey view is scaled between these percentiles of the frame's levels (robust to a few
#: saturated or dead pixels).
SCALE_PERCENTILES = (0.5, 99.5)
#: A frame whose levels span less than this share of its full scale between those percentiles is
#: blank (no film, no breast).
MIN_SPAN = 0.02
#: Breast pixels are above this fraction of the way from the low to the high percentile.
THRESHOLD_FRACTION = 0.1
#: The opening (px at detection scale) that cuts thin bridges (ruler ticks, text strokes, a faint
#: glow) between the breast and the framing before the components are counted.
OPENING_SIZE = 5
#: The breast covers at least this share of the frame; a largest component below it is no breast.
MIN_AREA_FRACTION = 0.02
#: The crop keeps this share of the breast's box size as a margin on every side, and the breast's
#: mask grows by as much (the skin line's dim fringe, and rounding from the detection scale).
MARGIN_FRACTION = 0.02
#: The chest wall's side is judged on this share of the box's width at each edge.
EDGE_FRACTION = 0.1
#: The image contradicts a header's chest-wall side "clearly" when the side it picks is at least
#: this many times taller than the header's (mini-MIAS: 2.3 and up on the 256 films the image
#: judges right, median 4.0; 1.08 and 1.11 on the two it cannot judge).
CONFLICT_RATIO = 2.0


class BreastRefusal(EdgebcError, ValueError):
    """A frame the breast steps cannot prepare; a classifier turns it into no decision, named by
    `check` (the quality check it counts as), and goes on with the next frame."""

    check = "breast"


class NoBreastFoundError(BreastRefusal):
    """The frame holds no region that could be a breast (blank, flat or nearly empty)."""

    check = "no_breast"


class LateralityConflictError(BreastRefusal):
    """The stated view (DICOM header or manifest) puts the chest wall on one side and the image
    clearly on the other."""

    check = "laterality"


@dataclass(frozen=True, eq=False)
class Breast:
    """Where the breast lies on a frame: its box (margin included) in the frame's own pixels, the
    side its chest wall is on, and its mask (grown by the margin) at detection scale."""

    x: int
    y: int
    width: int
    height: int
    chest_wall: Literal["left", "right"]
    mask: np.ndarray  # uint8, 1 on the breast, over the whole frame at detection scale
    #: How much taller the breast is at its chest-wall edge than at the other (>= 1; inf when the
    #: other edge is empty): how sure the image is of `chest_wall`.
    chest_wall_ratio: float = 1.0

    def crop(self, image: np.ndarray) -> np.ndarray:
        """The frame inside the breast's box, as a view."""
        return image[self.y : self.y + self.height, self.x : self.x + self.width]

    def isolate(self, image: np.ndarray) -> np.ndarray:
        """The frame inside the breast's box with everything off the breast set to black: a label
        or marker that lies within the box (beside a wide breast) goes too. A new array."""
        height, width = image.shape[:2]
        full = cv2.resize(self.mask, (width, height), interpolation=cv2.INTER_NEAREST)
        kept = self.crop(image).copy()
        kept[self.crop(full) == 0] = 0
        return kept


def find_breast(image: np.ndarray) -> Breast:
    """The breast's bounding box (with a margin) and chest-wall side on a grey or BGR frame of
    uint8, uint16 or float in [0, 1]; NoBreastFoundError when there is none."""
    grey = image if image.ndim == 2 else cv2.cvtColor(image[:, :, :3], cv2.COLOR_BGR2GRAY)
    height, width = grey.shape
    factor = min(1.0, DETECT_SIDE / max(height, width))
    small = grey
    if factor < 1.0:  # in the frame's own dtype: a float copy of a full mammogram is 50+ MB
        size = (max(1, round(width * factor)), max(1, round(height * factor)))
        small = cv2.resize(grey, size, interpolation=cv2.INTER_AREA)
    small = small.astype(np.float32)
    full_scale = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}.get(grey.dtype, 1.0)
    low, high = (float(v) for v in np.percentile(small, SCALE_PERCENTILES))
    if high - low < MIN_SPAN * full_scale:
        raise NoBreastFoundError(
            f"no breast on this frame: its levels span {high - low:.4g} of {full_scale:.0f} "
            "(blank or flat)"
        )
    scaled = np.clip((small - low) * (255.0 / (high - low)), 0, 255).astype(np.uint8)
    mask = (scaled > THRESHOLD_FRACTION * 255.0).astype(np.uint8)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (OPENING_SIZE, OPENING_SIZE))
    mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, kernel)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    if count < 2:
        raise NoBreastFoundError("no breast on this frame: nothing stands above the background")
    biggest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    area = int(stats[biggest, cv2.CC_STAT_AREA])
    if area < MIN_AREA_FRACTION * mask.size:
        raise NoBreastFoundError(
            f"no breast on this frame: its largest bright region covers {area / mask.size:.1%} "
            f"of it (a breast covers at least {MIN_AREA_FRACTION:.0%})"
        )
    bx, by, bw, bh = (int(stats[biggest, k]) for k in range(4))
    breast = (labels == biggest).astype(np.uint8)
    chest_wall, ratio = _chest_wall_side(breast[by : by + bh, bx : bx + bw])
    grow = 2 * max(1, int(np.ceil(MARGIN_FRACTION * max(bw, bh)))) + 1
    breast = cv2.dilate(breast, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (grow, grow)))
    # Back to the frame's pixels, rounding outwards, then the margin.
    x0, y0 = int(np.floor(bx / factor)), int(np.floor(by / factor))
    x1, y1 = int(np.ceil((bx + bw) / factor)), int(np.ceil((by + bh) / factor))
    margin_x = int(np.ceil(MARGIN_FRACTION * (x1 - x0)))
    margin_y = int(np.ceil(MARGIN_FRACTION * (y1 - y0)))
    x0, y0 = max(0, x0 - margin_x), max(0, y0 - margin_y)
    x1, y1 = min(width, x1 + margin_x), min(height, y1 + margin_y)
    return Breast(x0, y0, x1 - x0, y1 - y0, chest_wall, breast, ratio)


def prepare_breast(
    image: np.ndarray,
    crop: bool,
    laterality: str,
    header_chest_wall: str | None = None,
    pectoral: str = "keep",
    is_mlo: bool | None = None,
) -> np.ndarray:
    """The frame cropped to its breast with the rest blacked out (when `crop`) and, for laterality
    "left", mirrored so the chest wall is on the left ("keep" leaves the side as it is). Same
    dtype and channels out.

    `header_chest_wall` ("left"/"right"/None) is the chest wall's edge from the file's header:
    used instead of the image's judgement where given (LateralityConflictError when the image
    clearly says the other side). `pectoral` "suppress" blacks out the pectoral muscle
    (edgebc.pectoral) unless the view is known not to be MLO (`is_mlo` False)."""
    if laterality not in LATERALITY_MODES:
        raise ValueError(f"laterality must be one of {list(LATERALITY_MODES)}, got {laterality!r}")
    if header_chest_wall not in (None, "left", "right"):
        raise ValueError(
            f"header chest wall must be left, right or None, got {header_chest_wall!r}"
        )
    if pectoral not in PECTORAL_MODES:
        raise ValueError(f"pectoral must be one of {list(PECTORAL_MODES)}, got {pectoral!r}")
    suppress = pectoral == "suppress" and is_mlo is not False
    if not crop and laterality == "keep" and not suppress:
        return image
    breast = find_breast(image)
    chest_wall = breast.chest_wall
    if header_chest_wall is not None:
        if header_chest_wall != chest_wall and breast.chest_wall_ratio >= CONFLICT_RATIO:
            raise LateralityConflictError(
                f"the stated view (DICOM header or manifest) puts the chest wall on the {header_chest_wall}, but the image "
                f"clearly on the {chest_wall} (that edge {breast.chest_wall_ratio:.1f}x taller): "
                "a mislabelled study or a mirrored film; refused rather than turned the wrong way"
            )
        log.debug(
            "chest wall on the %s from the header (image: %s, ratio %.2f)",
            header_chest_wall, chest_wall, breast.chest_wall_ratio,
        )  # fmt: skip
        chest_wall = header_chest_wall  # type: ignore[assignment]
    else:
        log.debug(
            "chest wall on the %s from the image (ratio %.2f)", chest_wall, breast.chest_wall_ratio
        )
    if crop:
        image = breast.isolate(image)
    flip = chest_wall == "right"
    if flip:
        image = image[:, ::-1]
    if suppress:
        image = suppress_pectoral(np.ascontiguousarray(image))
    if flip and laterality == "keep":
        image = image[:, ::-1]
    return np.ascontiguousarray(image)


def _chest_wall_side(component: np.ndarray) -> tuple[Literal["left", "right"], float]:
    """The side of the breast's box where the breast is taller (the chest wall; left on a tie),
    and how many times taller it is there than at the other edge."""
    strip = max(1, round(EDGE_FRACTION * component.shape[1]))
    left = int(component[:, :strip].sum())
    right = int(component[:, -strip:].sum())
    side: Literal["left", "right"] = "right" if right > left else "left"
    high, low = max(left, right), min(left, right)
    return side, (high / low if low else float("inf"))
