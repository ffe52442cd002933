"""Mammography-like phantoms, so multimodal code can be tested without real mammograms.

A breast silhouette against the chest wall, fibroglandular texture (1/f-like noise whose level
sets fatty or dense tissue), the pectoral muscle as a bright triangle (MLO view), and a finding:
benign masses are round or oval and circumscribed; malignant ones are spiculated, often with a
cluster of microcalcifications. Findings use mini-MIAS conventions (centre, radius; origin
top-left here) so the same code reads both.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from edgebc.data.records import CLASS_NAMES, Finding
from edgebc.synth.ultrasound import smooth_noise


@dataclass(frozen=True)
class MammoPhantom:
    image: np.ndarray  # uint8 HxW
    mask: np.ndarray  # uint8 HxW, 1 inside the mass
    label: str
    view: str  # "left" | "right"
    findings: tuple[Finding, ...]


def make_mammo_phantom(label: str, rng: np.random.Generator, size: int = 256) -> MammoPhantom:
    """One labelled mediolateral-oblique-like phantom of `size` x `size` pixels."""
    if label not in CLASS_NAMES:
        raise ValueError(f"label must be one of {', '.join(CLASS_NAMES)}, got {label!r}")
    if size < 64:
        raise ValueError(f"mammography phantoms need at least 64x64 pixels, got {size}")
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    semi_x, semi_y = rng.uniform(0.55, 0.8) * size, rng.uniform(0.4, 0.48) * size
    centre_y = size / 2 + rng.uniform(-0.05, 0.05) * size
    breast = ((x / semi_x) ** 2 + ((y - centre_y) / semi_y) ** 2) <= 1.0
    density = rng.uniform(0.25, 0.6)
    texture = 0.6 * smooth_noise(rng, (size, size), 0.03) + 0.4 * smooth_noise(
        rng, (size, size), 0.008
    )
    tissue = density + 0.12 * texture
    skin_fade = np.clip(1.0 - ((x / semi_x) ** 2 + ((y - centre_y) / semi_y) ** 2), 0, 1) ** 0.3
    image = np.where(breast, tissue * (0.55 + 0.45 * skin_fade), 0.02)
    muscle = (x / (0.35 * size) + y / (0.55 * size)) < 1.0
    image = np.where(muscle & breast, np.maximum(image, 0.75 + 0.05 * texture), image)
    mask = np.zeros((size, size), np.uint8)
    findings: tuple[Finding, ...] = ()
    if label != "normal":
        radius = rng.uniform(0.04, 0.09) * size
        cx = rng.uniform(0.2, 0.55) * size
        cy = centre_y + rng.uniform(-0.25, 0.25) * size
        image = _add_mass(image, mask, rng, cx, cy, radius, spiculated=label == "malignant")
        kind = "SPIC" if label == "malignant" else "CIRC"
        if label == "malignant" and rng.random() < 0.5:
            image = _add_calcifications(image, rng, cx, cy, radius)
            kind = "CALC" if rng.random() < 0.3 else kind
        findings = (
            Finding(
                kind=kind,
                severity="M" if label == "malignant" else "B",
                x=float(cx),
                y=float(cy),
                radius=float(radius),
            ),
        )
    image = image + rng.normal(0, 0.01, image.shape)
    view = "left" if rng.random() < 0.5 else "right"
    out = np.clip(np.round(image * 255), 0, 255).astype(np.uint8)
    # NB: "left" here has the chest wall on the RIGHT edge, the opposite of the mini-MIAS films
    # (a left breast lies against the left edge) and of the framed mammograms in mammogram.py;
    # kept as it is for the tests that pin this phantom's pixels.
    if view == "left":
        out, mask = out[:, ::-1].copy(), mask[:, ::-1].copy()
        findings = tuple(
            Finding(f.kind, f.severity, size - 1 - f.x if f.x is not None else None, f.y, f.radius)
            for f in findings
        )
    return MammoPhantom(image=out, mask=mask, label=label, view=view, findings=findings)


def _add_mass(
    image: np.ndarray,
    mask: np.ndarray,
    rng: np.random.Generator,
    cx: float,
    cy: float,
    radius: float,
    spiculated: bool,
) -> np.ndarray:
    size = image.shape[0]
    layer = np.zeros_like(image, dtype=np.float32)
    axes = (int(radius), int(radius * rng.uniform(0.7, 1.0)))
    cv2.ellipse(layer, (int(cx), int(cy)), axes, rng.uniform(0, 180), 0, 360, 1.0, -1)
    mask[layer > 0] = 1
    if spiculated:
        for _ in range(int(rng.integers(8, 18))):
            angle = rng.uniform(0, 2 * np.pi)
            length = radius * rng.uniform(1.5, 3.0)
            end = (int(cx + length * np.cos(angle)), int(cy + length * np.sin(angle)))
            cv2.line(layer, (int(cx), int(cy)), end, 0.6, max(1, size // 256))
    blurred = np.asarray(cv2.GaussianBlur(layer, (0, 0), 1.5 if spiculated else 1.0))
    return np.maximum(image, image + rng.uniform(0.15, 0.3) * blurred)


def _add_calcifications(
    image: np.ndarray, rng: np.random.Generator, cx: float, cy: float, radius: float
) -> np.ndarray:
    out = image.copy()
    size = image.shape[0]
    for _ in range(int(rng.integers(5, 15))):
        px = int(np.clip(cx + rng.normal(0, radius), 0, size - 1))
        py = int(np.clip(cy + rng.normal(0, radius), 0, size - 1))
        cv2.circle(out, (px, py), max(1, size // 512), 1.0, -1)
    return out
