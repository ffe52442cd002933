"""Frames for calibration and parity checks: a sample of a dataset (with labels) or of a video."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgebc.data import read_dataset
from edgebc.data.sample_image import read_sample
from edgebc.errors import EdgebcError
from edgebc.sources import VIDEO_SUFFIXES, open_source


def load_frames(
    source: str | Path, limit: int, seed: int = 0, split: str | None = None
) -> tuple[list[np.ndarray], list[str]]:
    """Up to `limit` (> 0) frames and their labels (none for a video) from a manifest, dataset
    folder or video: `load_frame_set`'s frames and labels.

    Dataset samples are drawn in a seeded random order, so a limit takes a fair sample of the classes.
    """
    if limit <= 0:
        raise EdgebcError(f"frames to load must be at least 1, got {limit}")
    chosen = load_frame_set(source, limit, seed, split)
    return chosen.frames, chosen.labels


@dataclass(frozen=True)
class FrameSet:
    """Frames with what the accuracy budget needs beside them: labels (none for a video), the
    independent unit of each (its patient where the data names one) and the file it came from."""

    frames: list[np.ndarray]
    labels: list[str] = field(default_factory=list)
    units: list[str] = field(default_factory=list)
    paths: list[Path] = field(default_factory=list)


def load_frame_set(source: str | Path, limit: int = 0, seed: int = 0, split: str | None = None,
                   exclude: Collection[Path] = ()) -> FrameSet:  # fmt: skip
    """Up to `limit` frames (every one when `limit` <= 0) with their labels, units and paths from
    a manifest or dataset folder, drawn in a seeded random order, the files in `exclude` (the
    calibration frames) left out so a check set never re-uses them; or a video's first frames."""
    path = Path(source)
    if path.is_file() and path.suffix.lower() in VIDEO_SUFFIXES:
        return FrameSet(_video_frames(path, limit if limit > 0 else 1 << 31))
    left_out = {Path(p).resolve() for p in exclude}
    samples = [s for s in read_dataset(path) if split is None or s.split == split]
    samples = [s for s in samples if Path(s.path).resolve() not in left_out]
    if not samples:
        raise EdgebcError(
            f"{path}: no samples{f' in split {split!r}' if split else ''} to calibrate or check with"
            + (f" once the {len(left_out)} calibration frames are left out" if left_out else "")
        )
    order = np.random.default_rng(seed).permutation(len(samples))
    chosen = [samples[i] for i in (order[:limit] if limit > 0 else order)]
    # a mammogram at full depth; its view is not kept (the image's own judgement turns it)
    return FrameSet([read_sample(s)[0] for s in chosen], [s.label for s in chosen],
                    [s.unit for s in chosen], [Path(s.path) for s in chosen])  # fmt: skip


def _video_frames(path: Path, limit: int) -> list[np.ndarray]:
    video = open_source(str(path))
    video.open()
    try:
        frames: list[np.ndarray] = []
        while len(frames) < limit and (frame := video.read()) is not None:
            frames.append(frame.image)
    finally:
        video.close()
    if not frames:
        raise EdgebcError(f"{path}: no frames could be read from this video")
    return frames
