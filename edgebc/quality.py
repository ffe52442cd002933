"""The quality gate: frames that cannot be read as B-mode ultrasound get "no decision" and a reason.

A classifier answers something for any input; a cart must not. Before inference each cropped
frame is checked for what a person at the screen would see at once: a blank or uniform picture
(probe in the air, frozen black screen), a frame too dark or washed out to read, and colour
covering much of the image (Doppler overlays change what the model sees). Frozen feeds are the
stream's job (it compares consecutive frames). Detecting non-ultrasound content (a photo, a
desktop) is not done yet.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgebc.data.fingerprint import colour_fraction
from edgebc.decode import to_grey_uint8


@dataclass(frozen=True)
class QualityResult:
    ok: bool
    reason: str | None = None

    def __str__(self) -> str:
        return "ok" if self.ok else f"no decision: {self.reason}"


@dataclass(frozen=True)
class QualityGate:
    """Thresholds on 8-bit grey levels and shares of pixels; defaults chosen so BUSI frames pass."""

    min_std: float = 6.0
    min_mean: float = 8.0
    max_mean: float = 235.0
    max_colour_fraction: float = 0.05

    def check(self, frame: np.ndarray) -> QualityResult:
        grey8 = to_grey_uint8(frame)
        std, mean = float(grey8.std()), float(grey8.mean())
        if std < self.min_std:
            return QualityResult(
                False, f"blank or uniform frame (grey-level spread {std:.1f} < {self.min_std})"
            )
        if mean < self.min_mean:
            return QualityResult(False, f"frame too dark (mean grey level {mean:.0f})")
        if mean > self.max_mean:
            return QualityResult(False, f"frame washed out (mean grey level {mean:.0f})")
        colour = colour_fraction(frame)
        if colour > self.max_colour_fraction:
            return QualityResult(
                False, f"colour overlay covers {colour:.0%} of the image (Doppler?)"
            )
        return QualityResult(True)
