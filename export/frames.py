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
    """Up to `limit` frames and their labels (none for a video) from a manifest, dataset folder or video.

    Dataset samples are drawn in a seeded random order, so a limit takes a fair sample of the classes.
    """
    path = Path(source)
    if path.is_file() and path.suffix.lower() in VIDEO_SUFFIXES:
        video = open_source(str(path))
        video.open()
        try:
            frames = []
            while len(frames) < limit and (frame := video.read()) is not None:
                frames.append(frame.image)
        finally:
            video.close()
        if not frames:
            raise EdgebcError(f"{path}: no frames could be read from this video")
        return frames, []
    samples = read_dataset(path)
    if split:
        samples = [s for s in samples if s.split == split]
    if not samples:
        raise EdgebcError(
            f"{path}: no samples{f' in split {split!r}' if split else ''} to calibrate or check with"
        )
    order = np.random.default_rng(seed).permutation(len(samples))[:limit]
    # a mammogram at full depth; its view is not kept (the image's own judgement turns it)
    return [read_sample(samples[i])[0] for i in order], [samples[i].label for i in order]


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
    """Like `load_frames`, with units and paths, `limit` <= 0 taking every sample, and the files
    in `exclude` (the calibration frames) left out, so a check set never re-uses them."""
    path = Path(source)
    if path.is_file() and path.suffix.lower() in VIDEO_SUFFIXES:
        frames, _ = load_frames(path, limit if limit > 0 else 1 << 31, seed)
        return FrameSet(frames)
    left_out = {Path(p).resolve() for p in exclude}
    samples = [s for s in read_dataset(path) if split is None or s.split == split]
    samples = [s for s in samples if Path(s.path).resolve() not in left_out]
    if not samples:
        raise EdgebcError(
            f"{path}: no samples{f' in split {split!r}' if split else ''} left to check with"
            + (f" once the {len(left_out)} calibration frames are left out" if left_out else "")
        )
    order = np.random.default_rng(seed).permutation(len(samples))
    chosen = [samples[i] for i in (order[:limit] if limit > 0 else order)]
    return FrameSet([read_sample(s)[0] for s in chosen], [s.label for s in chosen],
                    [s.unit for s in chosen], [Path(s.path) for s in chosen])  # fmt: skip
