"""A scanner's whole screen around a B-mode image, as an HDMI capture card delivers it.

Black background, parameter text (some of it coloured), a menu row of outlined buttons, a
depth scale with tick marks beside the image, a grey-bar, a body-mark pictogram and a clock:
everything the imaging-region crop must leave out. The true region is returned with the screen
so the crop and its detector can be tested against it.
"""

from __future__ import annotations

import cv2
import numpy as np

from edgebc.region import Region

_FONT = cv2.FONT_HERSHEY_SIMPLEX
_PARAMETERS = ("Gn 52", "DR 60", "FR 27 Hz", "D 4.5 cm", "MI 0.9", "TIS 0.2", "L12-5", "BREAST")
_MENUS = ("Freeze", "Measure", "Annot", "Body Mk", "Cine", "Store")


def render_scanner_screen(
    image: np.ndarray, rng: np.random.Generator, screen_height: int = 1080, screen_width: int = 1920
) -> tuple[np.ndarray, Region]:
    """Place grey `image` (HxW uint8) on a BGR scanner screen; returns (screen, true region)."""
    if image.ndim != 2 or image.dtype != np.uint8:
        raise ValueError(
            f"expected a grey uint8 image, got shape {image.shape} dtype {image.dtype}"
        )
    screen = np.zeros((screen_height, screen_width, 3), np.uint8)
    scale_px = screen_height / 1080.0
    target_h = int(rng.uniform(0.55, 0.78) * screen_height)
    target_w = round(image.shape[1] * target_h / image.shape[0])
    max_w = int(0.6 * screen_width)
    if target_w > max_w:
        target_h, target_w = round(target_h * max_w / target_w), max_w
    x = int(rng.uniform(0.22, 0.95) * (screen_width - target_w - int(0.2 * screen_width))) + int(
        0.15 * screen_width
    )
    y = int(rng.uniform(0.08, 0.14) * screen_height)
    resized = cv2.resize(image, (target_w, target_h), interpolation=cv2.INTER_AREA)
    screen[y : y + target_h, x : x + target_w] = resized[:, :, None]
    region = Region(x, y, target_w, target_h)
    _draw_ui(screen, region, rng, scale_px)
    return screen, region


def _draw_ui(screen: np.ndarray, region: Region, rng: np.random.Generator, s: float) -> None:
    height, width = screen.shape[:2]
    grey, cyan, yellow = (200, 200, 200), (230, 220, 60), (60, 220, 230)
    text_scale, thick = 0.7 * s, max(1, round(1.5 * s))
    # Header line and clock, well above the image.
    cv2.putText(
        screen,
        "edgebc phantom  ID: ------",
        (int(20 * s), int(35 * s)),
        _FONT,
        text_scale,
        grey,
        thick,
    )
    cv2.putText(
        screen,
        "2026-11-21 10:42:07",
        (width - int(300 * s), int(35 * s)),
        _FONT,
        text_scale,
        grey,
        thick,
    )
    # Parameter column on the left, some lines coloured.
    for row, text in enumerate(_PARAMETERS):
        colour = yellow if row % 3 == 0 else grey
        cv2.putText(
            screen, text, (int(20 * s), int((110 + 38 * row) * s)), _FONT, text_scale, colour, thick
        )
    # Depth scale beside the image: a thin line with ticks and labels.
    sx = region.x + region.w + int(12 * s)
    if sx + int(60 * s) < width:
        cv2.line(screen, (sx, region.y), (sx, region.y + region.h), grey, 1)
        for k in range(6):
            ty = region.y + int(k * region.h / 5) - (1 if k == 5 else 0)
            cv2.line(screen, (sx, ty), (sx + int(10 * s), ty), grey, 1)
            cv2.putText(
                screen, str(k), (sx + int(16 * s), ty + int(6 * s)), _FONT, 0.5 * s, grey, 1
            )
    # Grey bar (a narrow vertical gradient) at the far right.
    gx, gy, gh = width - int(40 * s), int(200 * s), int(220 * s)
    ramp = np.linspace(255, 0, gh).astype(np.uint8)
    screen[gy : gy + gh, gx : gx + int(14 * s)] = ramp[:, None, None]
    # Body-mark pictogram: a small breast outline with a probe line, bottom left.
    bx, by = int(90 * s), height - int(230 * s)
    cv2.ellipse(screen, (bx, by), (int(45 * s), int(45 * s)), 0, 180, 360, grey, 1)
    cv2.line(screen, (bx - int(45 * s), by), (bx + int(45 * s), by), grey, 1)
    angle = rng.uniform(0, np.pi)
    dx, dy = int(25 * s * np.cos(angle)), int(25 * s * np.sin(angle))
    cv2.line(
        screen,
        (bx - dx, by - int(20 * s) - dy),
        (bx + dx, by - int(20 * s) + dy),
        cyan,
        max(1, int(3 * s)),
    )
    # Menu row: outlined buttons with labels along the bottom edge.
    bw, bh = int(150 * s), int(44 * s)
    top = height - bh - int(20 * s)
    for k, label in enumerate(_MENUS):
        left = int(320 * s) + k * (bw + int(16 * s))
        if left + bw >= width:
            break
        cv2.rectangle(screen, (left, top), (left + bw, top + bh), grey, 1)
        cv2.putText(
            screen,
            label,
            (left + int(12 * s), top + int(30 * s)),
            _FONT,
            0.65 * s,
            cyan,
            max(1, thick - 1),
        )
