"""Burned-in marks (calipers, dotted measurement lines, text, coloured overlays): find them by
shape and paint them out, so a model cannot learn the sonographer's annotations for the lesion.

A mark is drawn, not imaged: strokes one to four pixels wide that stand far above the tissue
around them, and that a 9x9 median (the local tissue level) removes. Speckle and bright tissue
pass the same brightness test in places, so each candidate is judged by its shape:

- strokes: thin (distance-transform half-width <= 3 px), at least 6 px long, and hollow or
  elongated (a cross, a line, a glyph, a word): kept as marks;
- dots: small compact specks are marks only when three or more sit on a straight line at equal
  spacing (a dotted measurement line); a lone round speck with graded intensity is what an
  echogenic focus or a microcalcification looks like, and it stays;
- colour: thin structures in saturated colour (yellow boxes, coloured text) in BGR frames.

Detection runs on an 8-bit grey view at the frame's native resolution (the thresholds are in
grey levels of 255 and in pixels of the stored frame); painting (OpenCV's Telea inpainting on
the mask, which takes each mark's anti-aliased fringe) runs on the frame itself, in its own dtype and channels.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from edgebc.data.fingerprint import CHROMA_THRESHOLD, chroma_spread
from edgebc.decode import to_grey_uint8

#: The local tissue level: a median this wide removes strokes up to 4 px and specks up to ~7 px.
MEDIAN_SIZE = 9
#: A candidate pixel stands this many grey levels above its local median ...
MIN_CONTRAST = 50
#: ... and is at least this bright (marks are drawn in white or light grey).
MIN_BRIGHTNESS = 120
#: A mark's pixels stand this far above their median on average. Hollow shapes (crosses,
#: glyphs, words) and vertical strokes need the lower bar; horizontal streaks need the higher one,
#: because bright tissue layers make short horizontal streaks of 55-70 (measured on BUS-BRA and
#: BUSI frames, where drawn marks reach 70-200; the phantoms' harsher speckle reaches 60-69).
MIN_MARK_CONTRAST = 70
MIN_STREAK_CONTRAST = 80
#: The mark takes with it the pixels around it this far above a wider (21 px) median: the
#: anti-aliased fringe and the fainter parts of glyphs, whose 9 px median dense text lifts.
FRINGE_CONTRAST = 20
FRINGE_MEDIAN_SIZE = 21
#: How far (px) marks grow into pixels as bright as a mark (the rest of a bold glyph, which the
#: 9 px median misses inside dense text) and into the fainter fringe.
GLYPH_STEPS = 8
FRINGE_STEPS = 2
#: Strokes are at most this half-width (distance transform, px): 1-4 px lines, glyph strokes.
MAX_STROKE_HALF_WIDTH = 3.0
#: A stroke is at least this long (its bounding box's longer side, px) ...
MIN_STROKE_LENGTH = 6
#: ... and hollow (fill of its bounding box at most this) or elongated (aspect at least this).
MAX_STROKE_FILL = 0.45
MIN_STROKE_ASPECT = 2.5
#: A group whose pixels spread at most this much more along one axis than across is a cross or a
#: glyph; a group with a vertical run of MIN_VERTICAL_RUN px has a drawn vertical stroke.
MAX_SPREAD_RATIO = 6.0
MIN_VERTICAL_RUN = 5
#: Specks up to this size (px, longer side) are dots: marks only when they form a dotted line.
MAX_DOT_SIZE = 5
#: Dots of a dotted line are 2..this many px apart (centre to centre) ...
MAX_DOT_SPACING = 14.0
#: ... and a dot between two others is a line dot when both are this close to mirror images.
DOT_LINE_TOLERANCE = 0.2
#: Inpainting radius (px): how far around each masked pixel Telea's method looks.
INPAINT_RADIUS = 3


@dataclass(frozen=True)
class Marks:
    """Where one frame's burned-in marks are: a mask at native resolution and how many marks."""

    mask: np.ndarray  # uint8 HxW, 255 on the pixels that removal paints over
    count: int  # connected marks (a cross, a glyph or a word, one dot of a dotted line)

    @property
    def fraction(self) -> float:
        """Share of the frame's pixels that are marks."""
        return float(np.count_nonzero(self.mask)) / float(self.mask.size)


def find_marks(image: np.ndarray) -> Marks:
    """The burned-in marks of one frame (grey HxW or BGR HxWx3; uint8, uint16 or float in [0, 1])."""
    grey = to_grey_uint8(image)
    above = grey.astype(np.int16) - cv2.medianBlur(grey, MEDIAN_SIZE)
    candidates = ((above >= MIN_CONTRAST) & (grey >= MIN_BRIGHTNESS)).astype(np.uint8)
    strokes, stroke_count = _strokes(candidates, above)
    dots, dot_count = _dotted_lines(candidates & (1 - strokes), above)
    mask = strokes | dots
    if mask.any():
        mask = _with_fringe(mask, grey)
    colour_count = 0
    if image.ndim == 3:
        colour, colour_count = _thin_colour(image)
        mask |= colour
    return Marks(mask=mask * np.uint8(255), count=stroke_count + dot_count + colour_count)


def remove_marks(image: np.ndarray, marks: Marks | None = None) -> np.ndarray:
    """The frame with its marks painted out from the tissue around them; same shape and dtype.

    A frame without marks comes back unchanged (the same array).
    """
    marks = find_marks(image) if marks is None else marks
    if marks.mask.shape != image.shape[:2]:
        raise ValueError(
            f"marks mask is {marks.mask.shape} but the frame is {image.shape[:2]}; "
            "find the marks on the same frame"
        )
    if marks.count == 0 or not marks.mask.any():
        return image
    mask = marks.mask
    if image.dtype not in (np.uint8, np.uint16):
        # OpenCV's Telea on float frames overshoots far outside [0, 1]: paint a 16-bit copy.
        as_uint16 = np.round(np.clip(image, 0.0, 1.0) * 65535.0).astype(np.uint16)
        return (remove_marks(as_uint16, marks).astype(np.float32) / 65535.0).astype(image.dtype)
    if image.ndim == 2 or image.dtype == np.uint8:
        return cv2.inpaint(np.ascontiguousarray(image), mask, INPAINT_RADIUS, cv2.INPAINT_TELEA)
    # OpenCV paints 16-bit and float frames one channel at a time.
    channels = [
        cv2.inpaint(np.ascontiguousarray(image[:, :, c]), mask, INPAINT_RADIUS, cv2.INPAINT_TELEA)
        for c in range(image.shape[2])
    ]
    return np.stack(channels, axis=2)


def _with_fringe(mask: np.ndarray, grey: np.ndarray) -> np.ndarray:
    """Grow the marks into the bright pixels that touch them: far into very bright ones (the rest of
    a bold glyph), a little into faint ones (anti-aliasing), and one last pixel unconditionally."""
    above = grey.astype(np.int16) - cv2.medianBlur(grey, FRINGE_MEDIAN_SIZE)
    cross = cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3))
    for threshold, steps in ((MIN_MARK_CONTRAST, GLYPH_STEPS), (FRINGE_CONTRAST, FRINGE_STEPS)):
        allowed = (above >= threshold).astype(np.uint8)
        for _ in range(steps):
            mask = mask | (np.asarray(cv2.dilate(mask, cross), np.uint8) & allowed)
    return cv2.dilate(mask, cross)


def _strokes(candidates: np.ndarray, above: np.ndarray) -> tuple[np.ndarray, int]:
    """Thin, long, hollow-or-elongated, high-contrast groups of candidate pixels (gaps of one
    pixel bridged)."""
    groups = np.asarray(cv2.dilate(candidates, np.ones((3, 3), np.uint8)), np.uint8) & 1
    count, found, stats, _ = cv2.connectedComponentsWithStats(groups, connectivity=8)
    labels = np.asarray(found, np.int32)
    if count <= 1:
        return np.zeros_like(candidates), 0
    half_width = cv2.distanceTransform(candidates, cv2.DIST_L2, 3)
    widest = np.zeros(count, np.float32)
    np.maximum.at(widest, labels[candidates > 0], half_width[candidates > 0])
    area = np.bincount(labels[candidates > 0], minlength=count).astype(np.float32)
    contrast = np.bincount(
        labels[candidates > 0], weights=above[candidates > 0], minlength=count
    ) / np.maximum(area, 1)
    # The group's box shrinks by the one pixel the bridging dilation added on each side.
    width = np.maximum(stats[:, cv2.CC_STAT_WIDTH] - 2, 1).astype(np.float32)
    height = np.maximum(stats[:, cv2.CC_STAT_HEIGHT] - 2, 1).astype(np.float32)
    longer = np.maximum(width, height)
    hollow = area / (width * height) <= MAX_STROKE_FILL
    horizontal = width / height >= MIN_STROKE_ASPECT
    # Bright tissue draws thin curves too (skin line, Cooper's ligaments, a cyst's wall), but as
    # one stroke in one, roughly horizontal, direction. A drawn mark has strokes across each other
    # (a cross: isotropic spread) or vertical ones (glyphs, the text cursor).
    spread = _spread_ratio(candidates, labels, count, area)
    vertical_run = cv2.erode(candidates, np.ones((MIN_VERTICAL_RUN, 1), np.uint8))
    has_vertical = np.bincount(labels[vertical_run > 0], minlength=count) > 0
    drawn = (spread <= MAX_SPREAD_RATIO) | has_vertical
    is_stroke = (
        (widest > 0)
        & (widest <= MAX_STROKE_HALF_WIDTH)
        & (longer >= MIN_STROKE_LENGTH)
        & drawn
        & (
            (hollow & (contrast >= MIN_MARK_CONTRAST))
            | (has_vertical & (contrast >= MIN_MARK_CONTRAST))
            | (horizontal & (contrast >= MIN_STREAK_CONTRAST))
        )
    )
    is_stroke[0] = False
    return (is_stroke[labels] & (candidates > 0)).astype(np.uint8), int(is_stroke.sum())


def _spread_ratio(
    candidates: np.ndarray, labels: np.ndarray, count: int, area: np.ndarray
) -> np.ndarray:
    """Per group, the larger over the smaller principal variance of its pixels' coordinates."""
    ys, xs = np.nonzero(candidates)
    group = labels[ys, xs]
    n = np.maximum(area, 1.0)

    def mean(values: np.ndarray) -> np.ndarray:
        return np.bincount(group, weights=values, minlength=count) / n

    mx, my = mean(xs.astype(np.float64)), mean(ys.astype(np.float64))
    dx, dy = xs - mx[group], ys - my[group]
    sxx, syy, sxy = mean(dx * dx) + 1 / 12, mean(dy * dy) + 1 / 12, mean(dx * dy)
    half_trace, det = (sxx + syy) / 2, sxx * syy - sxy * sxy
    root = np.sqrt(np.maximum(half_trace * half_trace - det, 0.0))
    return (half_trace + root) / np.maximum(half_trace - root, 1e-6)


def _dotted_lines(candidates: np.ndarray, above: np.ndarray) -> tuple[np.ndarray, int]:
    """Small high-contrast specks that sit, three or more, on a straight line at equal spacing."""
    count, labels, stats, centroids = cv2.connectedComponentsWithStats(candidates, connectivity=8)
    size = np.maximum(stats[:, cv2.CC_STAT_WIDTH], stats[:, cv2.CC_STAT_HEIGHT])
    area = np.maximum(stats[:, cv2.CC_STAT_AREA], 1)
    contrast = np.bincount(labels.ravel(), weights=above.ravel(), minlength=count) / area
    small = np.flatnonzero((size <= MAX_DOT_SIZE) & (contrast >= MIN_MARK_CONTRAST))
    small = small[small > 0]
    if len(small) < 3:
        return np.zeros_like(candidates), 0
    points = centroids[small]
    offsets = points[np.newaxis, :, :] - points[:, np.newaxis, :]  # [i, j] = j - i
    distance = np.hypot(offsets[..., 0], offsets[..., 1])
    near = (distance >= 2.0) & (distance <= MAX_DOT_SPACING)
    in_line = np.zeros(len(small), bool)
    for i in np.flatnonzero(near.sum(axis=1) >= 2):
        neighbours = np.flatnonzero(near[i])
        vectors = offsets[i, neighbours]
        # j and k mirror each other about i: i is the middle dot of three equally spaced ones.
        mirror = np.hypot(
            *(vectors[:, np.newaxis, :] + vectors[np.newaxis, :, :]).transpose(2, 0, 1)
        )
        scale = distance[i, neighbours]
        tolerance = DOT_LINE_TOLERANCE * np.minimum(scale[:, np.newaxis], scale[np.newaxis, :])
        np.fill_diagonal(mirror, np.inf)
        pairs = np.argwhere(mirror <= tolerance)
        if len(pairs):
            in_line[i] = True
            in_line[neighbours[pairs.ravel()]] = True
    chosen = np.zeros(count, bool)
    chosen[small[in_line]] = True
    return (chosen[labels] & (candidates > 0)).astype(np.uint8), int(in_line.sum())


def _thin_colour(image: np.ndarray) -> tuple[np.ndarray, int]:
    """Thin structures drawn in colour (boxes, text); filled colour (Doppler) is left alone."""
    pixels = image[:, :, :3]
    if pixels.dtype != np.uint8:
        pixels = _to_uint8(pixels)
    colour = (chroma_spread(pixels) > CHROMA_THRESHOLD).astype(np.uint8)
    count, found = cv2.connectedComponents(colour, connectivity=8)
    labels = np.asarray(found, np.int32)
    if count <= 1:
        return colour, 0
    half_width = cv2.distanceTransform(colour, cv2.DIST_L2, 3)
    widest = np.zeros(count, np.float32)
    np.maximum.at(widest, labels[colour > 0], half_width[colour > 0])
    thin = widest <= MAX_STROKE_HALF_WIDTH + 1.0
    thin[0] = False
    return (thin[labels] & (colour > 0)).astype(np.uint8), int(thin.sum())


def _to_uint8(pixels: np.ndarray) -> np.ndarray:
    if pixels.dtype == np.uint16:
        return (pixels >> 8).astype(np.uint8)
    return np.clip(np.round(pixels.astype(np.float32) * 255.0), 0, 255).astype(np.uint8)
