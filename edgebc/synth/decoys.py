"""Pictures for testing the quality gate: what it must refuse, and B-mode it must let through.

A cart's capture card shows whatever the scanner outputs, including its menus, a PC desktop when
the input is switched, a report on screen, or nothing at all (a black screen, the probe lifted).
The gate must refuse these. It must also pass B-mode as scanners other than the phantom's deliver
it: framed by black margins, or fading into a dim, smoothed, lossily captured depth as BUS-BRA's
Toshiba and Logiq images do below a lesion. Tests and tools/measure_quality_gate.py use these
generators so both claims are checked without any image from the internet.
"""

from __future__ import annotations

import cv2
import numpy as np


def make_desktop_screen(
    rng: np.random.Generator, height: int = 768, width: int = 1024
) -> np.ndarray:
    """A grey desktop: a plain background, a few windows with title bars and lines of text."""
    background = int(rng.integers(180, 250)) if rng.random() < 0.6 else int(rng.integers(20, 60))
    screen = np.full((height, width), background, np.uint8)
    for _ in range(int(rng.integers(2, 6))):
        x, y = int(rng.integers(0, width - 300)), int(rng.integers(0, height - 200))
        w, h = int(rng.integers(200, width - x + 1)), int(rng.integers(150, height - y + 1))
        shade = int(rng.integers(100, 256))
        cv2.rectangle(screen, (x, y), (x + w, y + h), shade, -1)
        cv2.rectangle(screen, (x, y), (x + w, y + 30), int(rng.integers(0, 256)), -1)
        ink = 0 if shade > 128 else 255
        for line in range(y + 50, y + h - 10, 22):
            cv2.putText(screen, f"Patient list  row {line}  2026-11-21", (x + 10, line),
                        cv2.FONT_HERSHEY_SIMPLEX, 0.55, ink, 1, cv2.LINE_AA)  # fmt: skip
    return screen


def make_document(rng: np.random.Generator, height: int = 1100, width: int = 850) -> np.ndarray:
    """A scanned-looking text page: dark lines of text on a light page with a little noise."""
    page = np.full((height, width), int(rng.integers(225, 250)), np.uint8)
    for line in range(80, height - 60, 28):
        length = int(rng.integers(width // 3, width - 120))
        cv2.putText(page, "Findings: " + "lorem ipsum " * (length // 110), (60, line),
                    cv2.FONT_HERSHEY_SIMPLEX, 0.6, int(rng.integers(0, 60)), 1, cv2.LINE_AA)  # fmt: skip
    noise = rng.normal(0.0, 1.5, page.shape)
    return np.clip(page + noise, 0, 255).astype(np.uint8)


def make_blank_frame(rng: np.random.Generator, height: int = 480, width: int = 640) -> np.ndarray:
    """A frame with nothing on it: one grey level (a black screen, the probe lifted, a uniform test
    frame) with the capture's noise (up to 4 grey levels), half of them through JPEG as an MJPG
    capture card delivers them."""
    level, noise = rng.uniform(0.0, 255.0), rng.uniform(0.0, 4.0)
    frame = np.clip(np.round(level + rng.normal(0.0, noise, (height, width))), 0, 255)
    return jpeg(frame.astype(np.uint8), 75) if rng.random() < 0.5 else frame.astype(np.uint8)


def with_black_margins(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Grey B-mode `image` inside black margins of 10-40 % of its size on each side, as an export
    or screen grab that keeps the space around the scan delivers it."""
    height, width = image.shape
    top, bottom = (int(f * height) for f in rng.uniform(0.1, 0.4, 2))
    left, right = (int(f * width) for f in rng.uniform(0.1, 0.4, 2))
    return cv2.copyMakeBorder(image, top, bottom, left, right, cv2.BORDER_CONSTANT, value=0)


def with_dim_depth(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Grey B-mode `image` as scanners with weak echoes at depth show it: below 30-50 % of the
    depth the tissue fades to 4-10 % of its brightness on the display's dim floor (12-20 grey
    levels), speckle reduction smooths it and JPEG capture flattens it (BUS-BRA's Toshiba and
    Logiq images below a lesion or in its shadow)."""
    depth = np.arange(image.shape[0], dtype=np.float32)[:, None] / image.shape[0]
    start, floor, haze = rng.uniform(0.3, 0.5), rng.uniform(0.04, 0.1), rng.uniform(12.0, 20.0)
    fade = np.clip((depth - start) / (0.85 - start), 0.0, 1.0)
    faded = image.astype(np.float32) * (1.0 - fade * (1.0 - floor)) + haze * fade
    smoothed = cv2.GaussianBlur(faded, (0, 0), rng.uniform(0.7, 1.0))
    return jpeg(np.clip(np.round(smoothed), 0, 255).astype(np.uint8), int(rng.integers(75, 95)))


def jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    """`image` after a round trip through JPEG at `quality` (a capture card's MJPG, an export)."""
    ok, encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    decoded = cv2.imdecode(encoded, cv2.IMREAD_UNCHANGED) if ok else None
    if decoded is None:
        raise ValueError(f"OpenCV could not round-trip an image of shape {image.shape} via JPEG")
    return decoded
