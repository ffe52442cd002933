"""Non-ultrasound decoys: desktop screens and text documents, for testing the quality gate.

A cart's capture card shows whatever the scanner outputs, including its menus, a PC desktop when
the input is switched, or a report on screen. The gate must refuse these; tests and
tools/measure_quality_gate.py use these generators so the claim is checked without any image
from the internet.
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
