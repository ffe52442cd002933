"""Fingerprints: per image for the audit (content hash, perceptual hash, thumbnail, colour and
marks), and per data set for a model's record (what it was trained or site-calibrated on).

pHash (DCT of a 32x32 thumbnail, 64 sign bits around the median) finds candidates that look
alike; a correlation of zero-mean 64x64 thumbnails then confirms them, because two unrelated
ultrasound frames that are mostly dark background share most pHash bits.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from edgebc.data.records import Sample
from edgebc.decode import decode_image, to_grey_uint8

THUMB_SIZE = 64
#: A pixel whose channels spread more than this (of 255) is coloured, not grey stored as RGB.
CHROMA_THRESHOLD = 40


@dataclass(frozen=True)
class Fingerprint:
    """What the audit needs to know about one readable image."""

    sha256: str
    width: int
    height: int
    channels: int
    dtype: str
    phash: int
    colour_fraction: float
    annotation_marks: int
    thumbnail: np.ndarray  # zero-mean, unit-norm float32 THUMB_SIZE x THUMB_SIZE

    @property
    def mode(self) -> str:
        return f"{'grey' if self.channels == 1 else 'BGR'} {self.dtype}"


def fingerprint_file(path: Path) -> Fingerprint:
    """Read, safely decode and fingerprint one file; raises ImageDecodeError for unreadable ones."""
    data = path.read_bytes()
    image = decode_image(data, str(path))
    return fingerprint_image(image, hashlib.sha256(data).hexdigest())


def fingerprint_image(image: np.ndarray, sha256: str) -> Fingerprint:
    grey = to_grey_uint8(image)
    return Fingerprint(
        sha256=sha256,
        width=int(image.shape[1]),
        height=int(image.shape[0]),
        channels=1 if image.ndim == 2 else int(image.shape[2]),
        dtype=str(image.dtype),
        phash=perceptual_hash(grey),
        colour_fraction=colour_fraction(image),
        annotation_marks=count_annotation_marks(grey),
        thumbnail=normalised_thumbnail(grey),
    )


def perceptual_hash(grey: np.ndarray) -> int:
    """64-bit DCT perceptual hash (the classic pHash): low frequencies above their median."""
    small = cv2.resize(grey, (32, 32), interpolation=cv2.INTER_AREA).astype(np.float32)
    low = cv2.dct(small)[:8, :8].flatten()
    bits = low > np.median(low[1:])
    return int(np.packbits(bits).view(">u8")[0])


def normalised_thumbnail(grey: np.ndarray) -> np.ndarray:
    """Zero-mean, unit-norm thumbnail; the dot product of two is their Pearson correlation."""
    thumb = cv2.resize(grey, (THUMB_SIZE, THUMB_SIZE), interpolation=cv2.INTER_AREA).astype(
        np.float32
    )
    thumb -= thumb.mean()
    norm = float(np.linalg.norm(thumb))
    return thumb / norm if norm > 0 else thumb


def colour_fraction(image: np.ndarray) -> float:
    """Share of pixels that carry colour (Doppler, coloured boxes); 0 for grey stored as RGB."""
    if image.ndim == 2 or image.shape[2] < 3:  # grey, with or without its channel axis
        return 0.0
    pixels = image[:, :, :3]
    if pixels.dtype != np.uint8:
        pixels = (pixels.astype(np.float32) * (255.0 / np.iinfo(pixels.dtype).max)).astype(np.uint8)
    spread = chroma_spread(pixels)
    return float(np.count_nonzero(spread > CHROMA_THRESHOLD)) / float(spread.size)


def chroma_spread(pixels: np.ndarray) -> np.ndarray:
    """Each pixel's largest minus smallest of its three 8-bit channels: 0 where it is grey."""
    if not pixels.flags.c_contiguous and pixels.strides[2] == 1:
        # A sample (every k-th pixel of a crop) copied as 3-byte units: numpy copies a strided
        # uint8 array byte by byte, three times slower (0.06 ms for a 1080p crop's 128 px sample).
        pixels = np.ascontiguousarray(pixels.view("V3")).view(np.uint8)
    # OpenCV's per-channel max/min: numpy's reductions over a length-3 last axis are ~10x slower
    b, g, r = cv2.split(np.ascontiguousarray(pixels))
    return cv2.subtract(cv2.max(cv2.max(b, g), r), cv2.min(cv2.min(b, g), r))


def count_annotation_marks(grey: np.ndarray) -> int:
    """How many small thin marks stand far above their neighbourhood: caliper crosses, dotted
    measurement lines, text glyphs burned into the frame.

    Speckle is bright in blobs that a 5x5 median keeps; one- or two-pixel strokes are what the
    median removes, so a pixel more than 70 grey levels above its median (and bright) belongs to a
    mark. Counted on a copy resized to 500 px width so the count does not depend on resolution.
    On BUSI, frames with calipers score 30-150 and clean frames 0-5 (checked by eye on a sample).
    """
    scale = 500.0 / grey.shape[1]
    if abs(scale - 1.0) > 0.05:
        height = max(1, round(grey.shape[0] * scale))
        grey = cv2.resize(grey, (500, height), interpolation=cv2.INTER_AREA)
    above_median = grey.astype(np.int16) - cv2.medianBlur(grey, 5)
    marks = ((above_median > 70) & (grey > 140)).astype(np.uint8)
    _, _, stats, _ = cv2.connectedComponentsWithStats(marks, connectivity=8)
    areas = stats[1:, cv2.CC_STAT_AREA]
    return int(np.sum((areas >= 2) & (areas <= 60)))


def data_fingerprint(samples: Sequence[Sample]) -> str:
    """sha256 over (file name, label, split, fold, size) of every sample: what a model was trained
    (or site-calibrated) on, without reading the images."""
    digest = hashlib.sha256()
    for sample in sorted(samples, key=lambda s: (s.path.name, s.label)):
        size = sample.path.stat().st_size if sample.path.exists() else -1
        digest.update(
            f"{sample.path.name}|{sample.label}|{sample.split}|{sample.fold}|{size}\n".encode()
        )
    return digest.hexdigest()
