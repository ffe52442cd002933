"""What `edgebc data audit` checks on mammograms: bit depth, laterality (stated vs seen), views.

A mammogram's laterality is stated by its `view` column (`L-CC`, `R-MLO`; mini-MIAS's reader
states only `left` / `right`) and found in the image by `edgebc.breast`: the chest wall is on the
left image edge for a left breast and on the right edge for a right one (the convention of
mini-MIAS and of the phantoms). A disagreement means a mislabelled side or a mirrored film. A
frame on which no breast is found (blank, flat, or not a mammogram) is a finding too.

Near-duplicates: two mammograms of different women correlate up to 0.98 as 64x64 thumbnails
(the breast's silhouette on black film dominates; on mini-MIAS the thumbnail test alone joins
over a hundred women into one group), so a mammogram pair must also share its tissue detail: the
high-pass picture inside the breast at 128x128 correlates at most 0.49 between different
mini-MIAS films, and at least 0.84 between a film and its noisy, shifted or JPEG copy.

Bit depth is read from the decoded pixels: `8` (uint8), `N-in-16` (uint16 whose largest value
needs N bits, as a 12-bit detector stores in 16), or `16`. The audit's fingerprints see a
mammogram stretched from its stored bits to its container's full scale, so a 12-bit image is not
shifted down to levels 0..15 before duplicates are looked for.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from edgebc.breast import NoBreastFoundError, find_breast
from edgebc.data.records import MAMMOGRAPHY_MODALITIES, Sample
from edgebc.decode import to_grey_uint8

#: Sources whose reader states only the side: every film of mini-MIAS is an MLO view.
KNOWN_PROJECTIONS = {"mias": "MLO"}
#: Two mammograms are near-duplicates only if their breast detail correlates at least this much.
MIN_DETAIL_CORRELATION = 0.7
DETAIL_SIDE = 128
_SIDES = {"L": "L", "LEFT": "L", "R": "R", "RIGHT": "R"}
_CHEST_WALL_SIDE = {"left": "L", "right": "R"}


def is_mammogram(sample: Sample) -> bool:
    """Whether the sample's modality names mammography (`mammo`, `mg`, `mammography`)."""
    return sample.modality.strip().lower() in MAMMOGRAPHY_MODALITIES


@dataclass(frozen=True)
class MammogramFacts:
    """What the audit finds on one decoded mammogram."""

    dtype: str
    max_value: int
    bit_depth: str  # "8", "12-in-16", "16", ...
    found_laterality: str | None  # "L" | "R" from the chest-wall side; None without a breast
    no_breast: str | None  # why no breast was found, else None


def stored_bits(image: np.ndarray) -> int:
    """How many bits the pixels use: 8 for uint8, the largest value's bit length (at least 8,
    rounded up to an even count: 10, 12, 14, 16) for uint16."""
    if image.dtype == np.uint8:
        return 8
    if image.dtype != np.uint16:
        raise ValueError(f"a mammogram decodes to uint8 or uint16, got {image.dtype}")
    bits = max(8, int(image.max()).bit_length())
    return bits + bits % 2


def bit_depth_name(image: np.ndarray) -> str:
    """`8`, `N-in-16` or `16` for a decoded frame."""
    bits = stored_bits(image)
    if image.dtype == np.uint8 or bits == 16:
        return str(bits)
    return f"{bits}-in-16"


def to_full_scale(image: np.ndarray) -> np.ndarray:
    """A uint16 frame with its stored bits moved to the top of the container (12-bit values times
    16), so that a view of the top 8 bits sees the picture; uint8 frames are returned as they are."""
    if image.dtype != np.uint16:
        return image
    return image << np.uint16(16 - stored_bits(image))


def examine_mammogram(image: np.ndarray) -> MammogramFacts:
    """Bit depth and the laterality the image itself shows."""
    try:
        found: str | None = _CHEST_WALL_SIDE[find_breast(image).chest_wall]
        no_breast = None
    except NoBreastFoundError as exc:
        found, no_breast = None, str(exc)
    return MammogramFacts(
        dtype=str(image.dtype),
        max_value=int(image.max()),
        bit_depth=bit_depth_name(image),
        found_laterality=found,
        no_breast=no_breast,
    )


def breast_detail(image: np.ndarray) -> np.ndarray:
    """Zero-mean, unit-norm high-pass picture inside the breast at DETAIL_SIDE x DETAIL_SIDE (the
    skin line and the background masked out): tissue texture, which differs between women even
    where their silhouettes match. The dot product of two is their correlation."""
    grey = to_grey_uint8(to_full_scale(image))
    small = cv2.resize(grey, (DETAIL_SIDE, DETAIL_SIDE), interpolation=cv2.INTER_AREA)
    small = small.astype(np.float32)
    detail = small - cv2.GaussianBlur(small, (0, 0), 3)
    # Inside = above a tenth of the brightest level, eroded past the skin line's strong edge.
    inside = cv2.erode(
        (small > 0.1 * float(small.max())).astype(np.uint8), np.ones((9, 9), np.uint8)
    )
    detail[inside == 0] = 0
    detail -= detail.mean()
    norm = float(np.linalg.norm(detail))
    return (detail / norm if norm > 0 else detail).ravel()


def stated_view(sample: Sample) -> tuple[str | None, str | None]:
    """(laterality "L"/"R", projection such as "CC"/"MLO") as the sample's `view` states them;
    None where it states nothing. `L-CC`, `R MLO`, `LCC`, `left` and `right` are understood."""
    text = (sample.view or "").strip().upper().replace("_", "-").replace(" ", "-")
    side: str | None = None
    projection: str | None = None
    if text in _SIDES:
        side = _SIDES[text]
    elif "-" in text:
        head, _, tail = text.partition("-")
        if head in _SIDES:
            side, projection = _SIDES[head], tail or None
    elif len(text) > 1 and text[0] in "LR":
        side, projection = text[0], text[1:]
    if side is None and text:
        projection = text
    if projection is None and sample.source:
        projection = KNOWN_PROJECTIONS.get(sample.source.lower())
    return side, projection


def summarise_mammograms(
    samples: Sequence[Sample], facts: dict[int, MammogramFacts], pairs_rejected: int = 0
) -> dict[str, Any]:
    """The report's `mammography` block for the readable mammograms in `facts` (by sample index)."""
    images, mismatches, no_breast = [], [], []
    views: Counter[str] = Counter()
    depths: Counter[str] = Counter()
    unstated = 0
    for index, fact in sorted(facts.items()):
        sample = samples[index]
        side, projection = stated_view(sample)
        views[f"{side or '?'}-{projection or '?'}"] += 1
        depths[fact.bit_depth] += 1
        unstated += side is None
        path = str(sample.path)
        images.append({"path": path, "stated_laterality": side, "view": projection, **asdict(fact)})
        if fact.no_breast is not None:
            no_breast.append({"path": path, "why": fact.no_breast})
        elif side is not None and fact.found_laterality != side:
            mismatches.append({"path": path, "stated": side, "found": fact.found_laterality})
    return {
        "n_images": len(facts),
        "bit_depths": dict(sorted(depths.items())),
        "views": dict(sorted(views.items())),
        "laterality_unstated": unstated,
        "laterality_mismatches": mismatches,
        "no_breast": no_breast,
        "images": images,
        "near_duplicate_pairs_rejected_by_detail": pairs_rejected,
        "min_detail_correlation": MIN_DETAIL_CORRELATION,
        "note": "laterality found = the chest wall's image edge (left edge: left breast), "
        "as in mini-MIAS and the phantoms",
    }


def render_mammography(block: dict[str, Any]) -> list[str]:
    """The audit.md section for the `mammography` block."""
    lines = [
        "## Mammography",
        "",
        f"- mammograms: {block['n_images']}",
        "- bit depth: " + ", ".join(f"{k}: {v}" for k, v in block["bit_depths"].items()),
        "- views: " + ", ".join(f"{k}: {v}" for k, v in block["views"].items()),
        f"- laterality not stated: {block['laterality_unstated']}",
        f"- laterality mismatches (stated vs found in the image): "
        f"{len(block['laterality_mismatches'])}",
        f"- no breast found (blank or not a mammogram): {len(block['no_breast'])}",
        f"- look-alike pairs not counted as near-duplicates (breast detail correlates below "
        f"{block['min_detail_correlation']}): {block['near_duplicate_pairs_rejected_by_detail']}",
        "",
    ]
    for m in block["laterality_mismatches"]:
        lines.append(
            f"- mismatch: `{Path(m['path']).name}` stated {m['stated']}, found {m['found']}"
        )
    for m in block["no_breast"]:
        lines.append(f"- no breast: `{Path(m['path']).name}`: {m['why']}")
    if block["laterality_mismatches"] or block["no_breast"]:
        lines.append("")
    return lines
