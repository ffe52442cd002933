"""Short cine clips: a linear probe sliding across a lesion, as a live scan delivers frames.

A field wider than the view is imaged once (so speckle moves coherently with the tissue, as
it does under a real probe), then a window slides across it with a little breathing motion and
fresh electronic noise per frame, so consecutive frames are similar but never identical.
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

from edgebc.synth.ultrasound import make_ultrasound_phantom


def make_cine(
    label: str,
    rng: np.random.Generator,
    frames: int = 30,
    height: int = 256,
    width: int = 256,
    sweep: float = 0.6,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """`frames` uint8 frames and their lesion masks; the window travels `sweep` x width in total."""
    if frames < 1:
        raise ValueError(f"a cine needs at least one frame, got {frames}")
    if not 0.0 <= sweep <= 1.0:
        raise ValueError(f"sweep is a fraction of the frame width in [0, 1], got {sweep}")
    margin = 8
    field_width = width + int(np.ceil(sweep * width)) + 2 * margin
    field = make_ultrasound_phantom(label, rng, height + 2 * margin, field_width)
    images, masks = [], []
    for k in range(frames):
        t = k / max(1, frames - 1)
        x = margin + round(t * sweep * width)
        y = margin + round(3 * np.sin(2 * np.pi * t * 1.5))
        frame = field.image[y : y + height, x : x + width].astype(np.float32)
        frame += rng.normal(0.0, 3.0, frame.shape).astype(np.float32)
        images.append(np.clip(np.round(frame), 0, 255).astype(np.uint8))
        masks.append(np.ascontiguousarray(field.mask[y : y + height, x : x + width]))
    return images, masks


def write_video(frames: list[np.ndarray], path: str | Path, fps: float = 30.0) -> Path:
    """Write grey uint8 frames as Motion-JPEG AVI (every OpenCV build reads it), atomically."""
    if not frames:
        raise ValueError("no frames to write")
    path = Path(path)
    height, width = frames[0].shape[:2]
    partial = path.with_name(f".{path.stem}.partial{path.suffix}")
    writer = cv2.VideoWriter(
        str(partial), cv2.VideoWriter.fourcc(*"MJPG"), fps, (width, height), False
    )
    if not writer.isOpened():
        raise OSError(f"{path}: OpenCV cannot open a Motion-JPEG video writer here")
    try:
        for frame in frames:
            writer.write(frame)
    finally:
        writer.release()
    os.replace(partial, path)
    return path
