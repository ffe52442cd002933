"""Frames for calibration and parity checks: a sample of a dataset (with labels) or of a video."""

from __future__ import annotations

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
