"""Framed mammogram phantoms (laterality, CC/MLO view, labels, markers, 8/12-bit), for testing
the mammography preprocessing against known ground truth.

A breast is drawn against the chest wall in a canonical frame (chest wall on the image's left
edge) and mirrored for the other laterality, as radiologists hang films and as the mini-MIAS
images lie: a left breast has its chest wall on the LEFT edge, a right breast on the RIGHT edge. CC views are a
half-ellipse; MLO views reach the top edge (the axillary tail) and carry the pectoral muscle as a
bright triangle in the upper chest-wall corner. Parenchyma is fat plus fibroglandular texture
(1/f-like noise, more of it in dense breasts), with a skin-line fall-off. Findings reuse the
mini-MIAS phantom's masses and calcifications. Film-style framing (a bright laterality/view label
block with text and a ruler-like tick strip and a skin-marker dot) sits on the side away from the
chest wall, never on the breast. Values are 12-bit stored in 16 bits (like full-field digital
mammography) or 8-bit, both quantised from one float image.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from edgebc.data.records import CLASS_NAMES, Finding
from edgebc.synth.mammo import _add_calcifications, _add_mass
from edgebc.synth.ultrasound import smooth_noise

LATERALITIES = ("L", "R")
VIEWS = ("CC", "MLO")
Box = tuple[int, int, int, int]  # x, y, width, height in pixels, origin top-left

_BREAST_DEPTH = (
    0.55,
    0.70,
)  # of the width: the nipple never comes closer than this to the far edge
_FRAMING_X = 0.76  # canonical frame: labels and markers start here, beyond the deepest breast


@dataclass(frozen=True)
class BreastParameters:
    """What stays the same between the CC and MLO views of one breast: how dense it is and,
    when it has one, the finding's class, size and where it lies (fractions of the breast)."""

    label: str
    density: float  # 0 fatty .. 1 extremely dense
    finding_depth: float  # fraction of the breast depth from the chest wall
    finding_height: float  # -1 (cranial / top) .. 1 (caudal / bottom)
    finding_radius: float  # fraction of the image width
    calcifications: bool


@dataclass(frozen=True)
class Mammogram:
    """One framed mammogram phantom and the ground truth its preprocessing is tested against."""

    image: np.ndarray  # HxW uint8, or uint16 holding 12-bit values (0..4095)
    mask: np.ndarray  # uint8 HxW, 1 inside the finding's mass
    breast: np.ndarray  # uint8 HxW, 1 inside the breast (pectoral muscle included)
    pectoral: np.ndarray  # uint8 HxW, 1 inside the pectoral muscle (all 0 on CC)
    label: str
    laterality: str  # "L" | "R"
    view: str  # "CC" | "MLO"
    findings: tuple[Finding, ...]
    label_box: Box
    marker_boxes: tuple[Box, ...]

    @property
    def view_code(self) -> str:
        """The manifest's `view` value, e.g. "L-CC"."""
        return f"{self.laterality}-{self.view}"

    @property
    def chest_wall(self) -> str:
        """The image edge the chest wall lies on: "left" or "right"."""
        return "left" if self.laterality == "L" else "right"


def draw_breast(label: str, rng: np.random.Generator) -> BreastParameters:
    """The view-independent parameters of one breast with a finding of class `label`."""
    if label not in CLASS_NAMES:
        raise ValueError(f"label must be one of {', '.join(CLASS_NAMES)}, got {label!r}")
    return BreastParameters(
        label=label,
        density=float(rng.uniform(0.1, 0.9)),
        finding_depth=float(rng.uniform(0.3, 0.65)),
        finding_height=float(rng.uniform(-0.5, 0.5)),
        finding_radius=float(rng.uniform(0.035, 0.07)),
        calcifications=label == "malignant" and bool(rng.random() < 0.5),
    )


def make_mammogram(
    breast: BreastParameters,
    rng: np.random.Generator,
    laterality: str,
    view: str,
    height: int = 320,
    width: int = 256,
    bits: int = 12,
) -> Mammogram:
    """One framed phantom of `breast` seen in `view` ("CC" or "MLO") on side `laterality`
    ("L" or "R"); `bits` 12 gives uint16 with 12-bit values, 8 gives uint8."""
    if laterality not in LATERALITIES:
        raise ValueError(f"laterality must be L or R, got {laterality!r}")
    if view not in VIEWS:
        raise ValueError(f"view must be CC or MLO, got {view!r}")
    if bits not in (8, 12):
        raise ValueError(f"bits must be 8 or 12, got {bits}")
    if height < 128 or width < 96:
        raise ValueError(f"framed mammograms need at least 128x96 pixels, got {height}x{width}")
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    depth = rng.uniform(*_BREAST_DEPTH) * width
    if view == "CC":
        centre_y, semi_y = height * rng.uniform(0.47, 0.53), height * rng.uniform(0.36, 0.42)
    else:  # reaches above the top edge: the axillary tail runs off the film
        centre_y, semi_y = height * rng.uniform(0.52, 0.58), height * rng.uniform(0.6, 0.64)
    radial = (x / depth) ** 2 + ((y - centre_y) / semi_y) ** 2
    breast_mask = radial <= 1.0
    pectoral_mask = np.zeros_like(breast_mask)
    if view == "MLO":
        top_width = depth * np.sqrt(max(0.0, 1 - (centre_y / semi_y) ** 2))
        muscle_w = rng.uniform(0.6, 0.9) * top_width
        muscle_h = rng.uniform(0.35, 0.5) * height
        pectoral_mask = ((x / muscle_w + y / muscle_h) < 1.0) & breast_mask

    texture = 0.6 * smooth_noise(rng, (height, width), 0.03) + 0.4 * smooth_noise(
        rng, (height, width), 0.008
    )
    # Fibroglandular tissue gathers behind the nipple and thins towards the chest wall and skin.
    glandular_zone = np.exp(-(((x / depth - 0.45) / 0.35) ** 2 + ((y - centre_y) / semi_y) ** 2))
    glandular = np.clip(texture * 0.5 + (breast.density - 0.5) * 2.0 + glandular_zone, 0, None)
    tissue = 0.25 + 0.35 * np.clip(glandular * glandular_zone, 0, 1.2) + 0.03 * texture
    skin = np.clip(1.0 - radial, 0, 1) ** 0.3  # compressed thickness falls off at the skin line
    image = np.where(breast_mask, tissue * (0.5 + 0.5 * skin), 0.0).astype(np.float32)
    image = np.where(pectoral_mask, 0.82 + 0.03 * texture, image)

    mask = np.zeros((height, width), np.uint8)
    findings: tuple[Finding, ...] = ()
    if breast.label != "normal":
        radius = breast.finding_radius * width
        cx, cy = _finding_centre(breast, depth, centre_y, semi_y, radius, pectoral_mask)
        image = _add_mass(image, mask, rng, cx, cy, radius, spiculated=breast.label == "malignant")
        if breast.calcifications:
            image = _add_calcifications(image, rng, cx, cy, radius)
        kind = "SPIC" if breast.label == "malignant" else "CIRC"
        severity = "M" if breast.label == "malignant" else "B"
        findings = (Finding(kind, severity, float(cx), float(cy), float(radius)),)
        mask &= breast_mask.astype(np.uint8)  # a mass never spills onto the background
    noise = rng.normal(0, 0.004, image.shape)
    image = (np.where(breast_mask, image, 0.0) + noise).astype(np.float32)

    breast_u8 = breast_mask.astype(np.uint8)
    pectoral_u8 = pectoral_mask.astype(np.uint8)
    if laterality == "R":  # mirror everything drawn so far; the framing text is drawn upright after
        image, mask = image[:, ::-1].copy(), mask[:, ::-1].copy()
        breast_u8, pectoral_u8 = breast_u8[:, ::-1].copy(), pectoral_u8[:, ::-1].copy()
        findings = tuple(
            Finding(f.kind, f.severity, width - 1 - (f.x or 0.0), f.y, f.radius) for f in findings
        )
    label_box, marker_boxes = _draw_framing(image, rng, f"{laterality} {view}", laterality)
    top = 4095 if bits == 12 else 255
    out = np.clip(np.round(image * top), 0, top).astype(np.uint16 if bits == 12 else np.uint8)
    return Mammogram(
        image=out,
        mask=mask,
        breast=breast_u8,
        pectoral=pectoral_u8,
        label=breast.label,
        laterality=laterality,
        view=view,
        findings=findings,
        label_box=label_box,
        marker_boxes=marker_boxes,
    )


def _finding_centre(
    breast: BreastParameters,
    depth: float,
    centre_y: float,
    semi_y: float,
    radius: float,
    pectoral: np.ndarray,
) -> tuple[float, float]:
    """The finding's centre in the canonical frame: inside the breast by at least its radius and,
    on MLO, below the pectoral muscle (pushed down the breast until it clears it)."""
    u = breast.finding_depth
    half_height = semi_y * np.sqrt(1 - u**2) - 1.5 * radius
    cx = u * depth
    cy = centre_y + breast.finding_height * max(0.0, half_height)
    height = pectoral.shape[0]
    clear = int(np.ceil(1.5 * radius))
    while (
        cy < height - 1
        and pectoral[
            max(0, int(cy) - clear) : int(cy) + clear + 1,
            max(0, int(cx) - clear) : int(cx) + clear + 1,
        ].any()
    ):
        cy += 1.0
    return float(cx), float(cy)


def _draw_framing(
    image: np.ndarray, rng: np.random.Generator, text: str, laterality: str
) -> tuple[Box, tuple[Box, ...]]:
    """Label block, tick strip and skin-marker dot on the side away from the chest wall, in
    place; returns their boxes."""
    height, width = image.shape
    far_w = width - int(np.ceil(_FRAMING_X * width))  # the framing band's width
    band_x = width - far_w if laterality == "L" else 0  # the side away from the chest wall
    margin = max(2, width // 64)
    box_w, box_h = far_w - 2 * margin, max(14, height // 14)
    box_y = margin + int(rng.integers(0, max(1, height // 40)))
    box = (band_x + margin, box_y, box_w, box_h)
    font = cv2.FONT_HERSHEY_SIMPLEX
    (text_w, text_h), _ = cv2.getTextSize(text, font, 1.0, 1)
    scale = min((box_w - 4) / text_w, (box_h - 4) / text_h)
    (text_w, text_h), _ = cv2.getTextSize(text, font, scale, 1)
    block = np.full((box_h, box_w), 242, np.uint8)  # OpenCV draws text on 8-bit images only
    origin = ((box_w - text_w) // 2, (box_h + text_h) // 2)
    cv2.putText(block, text, origin, font, scale, 13, 1, cv2.LINE_AA)
    image[box_y : box_y + box_h, box[0] : box[0] + box_w] = block / 255.0
    ruler_x = band_x + far_w - margin - max(3, width // 48)
    ruler_w = max(3, width // 48)
    ruler_top, ruler_bottom = int(0.35 * height), int(0.85 * height)
    step = max(4, height // 40)
    for k, tick_y in enumerate(range(ruler_top, ruler_bottom, step)):
        length = ruler_w if k % 5 == 0 else (ruler_w + 1) // 2
        start = ruler_x if laterality == "R" else ruler_x + ruler_w - length
        image[tick_y, start : start + length] = 0.9
    ruler = (ruler_x, ruler_top, ruler_w, ruler_bottom - ruler_top)
    dot_r = max(2, width // 100)
    dot_cx = band_x + far_w // 2 - dot_r
    dot_cy = int(0.92 * height)
    cv2.circle(image, (dot_cx, dot_cy), dot_r, 1.0, -1)
    dot = (dot_cx - dot_r, dot_cy - dot_r, 2 * dot_r + 1, 2 * dot_r + 1)
    return box, (ruler, dot)
