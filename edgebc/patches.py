"""Region-of-interest patches for mammograms: where a patch lies on the breast, the grid that slides
over it, and how the patches' probabilities become the film's, shared by training and the device.

A mammogram is large and a finding small (a mini-MIAS mass is ~50 pixels across on a 1024-pixel
film): shrinking the whole breast to a model input loses it. A patch model is trained on square
crops at native resolution around findings and on normal tissue, and classifies a whole film by
sliding a grid of such crops over the breast and aggregating their probabilities. Every number
that defines this lives in `PatchCard`, carried by the model card's input (ModelInput.patches),
so training's evaluation and the runtime slide and aggregate alike.

Geometry, explicitly: the film is first turned into its *breast frame* exactly as the shared
preprocessing does (edgebc.breast: crop to the breast's box with the rest blacked out, then, for
laterality "left", mirror a breast whose chest wall is on the right). A point (x, y) of the film
(origin top-left, as edgebc.data.records.Finding) lies at (x - box.x, y - box.y) in the crop,
and at (crop_width - 1 - that x, that y) after the mirror. Patches are cut from the breast frame
(zero-padded past its edge), then each goes through the shared preprocessing with the breast
step switched off (already done), so a patch tensor is what preprocess_chw gives for that crop.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Literal

import cv2
import numpy as np

from edgebc.breast import LATERALITY_MODES, find_breast
from edgebc.config import from_mapping, to_mapping
from edgebc.preprocess import PreprocessCard, preprocess_chw, validated_image

AGGREGATIONS = ("max", "top_k_mean")


@dataclass(frozen=True)
class PatchCard:
    """How a patch model sees a film: square patches of `side` native pixels (resized to the
    preprocessing's input size), a grid stepping `stride` native pixels over the breast frame,
    keeping the patches with at least `min_breast` of their area on the breast, and the film's
    probabilities from the patch(es) most likely positive: `max` takes that patch's row,
    `top_k_mean` the mean of the `top_k` most positive rows."""

    side: int = 256
    stride: int = 128
    min_breast: float = 0.5
    aggregate: Literal["max", "top_k_mean"] = "max"
    top_k: int = 3

    def __post_init__(self) -> None:
        if not 16 <= self.side <= 4096:
            raise ValueError(f"patches.side must be 16..4096 native pixels, got {self.side}")
        if not 1 <= self.stride <= self.side:
            raise ValueError(
                f"patches.stride must be 1..side ({self.side}) pixels so the grid leaves no gap, "
                f"got {self.stride}"
            )
        if not 0.0 < self.min_breast <= 1.0:
            raise ValueError(f"patches.min_breast is a share in (0, 1], got {self.min_breast}")
        if self.aggregate not in AGGREGATIONS:
            raise ValueError(
                f"patches.aggregate must be one of {list(AGGREGATIONS)}, got {self.aggregate!r}"
            )
        if self.top_k < 1:
            raise ValueError(f"patches.top_k must be at least 1, got {self.top_k}")

    def to_dict(self) -> dict[str, object]:
        return to_mapping(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, object], source: str = "patch card") -> PatchCard:
        return from_mapping(cls, data, source=source)


@dataclass(frozen=True, eq=False)
class BreastFrame:
    """A film turned into its breast frame (cropped, blacked out off the breast, mirrored as the
    preprocessing does), its breast mask on the same pixels, and the map from film coordinates."""

    image: np.ndarray  # the breast frame, same dtype and channels as the film
    breast: np.ndarray  # uint8, 1 on the breast, same height and width as `image`
    box_x: int  # the crop's top-left corner on the film
    box_y: int
    mirrored: bool  # True when the crop was mirrored left-right

    @property
    def height(self) -> int:
        return int(self.image.shape[0])

    @property
    def width(self) -> int:
        return int(self.image.shape[1])

    def from_film(self, x: float, y: float) -> tuple[float, float]:
        """A film point (origin top-left) in breast-frame pixels."""
        fx, fy = x - self.box_x, y - self.box_y
        return (self.width - 1 - fx if self.mirrored else fx), fy

    def to_film(self, x: float, y: float) -> tuple[float, float]:
        """A breast-frame point back on the film (the inverse of from_film)."""
        fx = self.width - 1 - x if self.mirrored else x
        return fx + self.box_x, y + self.box_y

    def breast_share(self, x: int, y: int, side: int) -> float:
        """The share of the side x side patch with top-left (x, y) that lies on the breast."""
        window = self.breast[max(0, y) : max(0, y + side), max(0, x) : max(0, x + side)]
        return float(window.sum()) / float(side * side)


def breast_frame(image: np.ndarray, prep: PreprocessCard) -> BreastFrame:
    """The film's breast frame under `prep` (breast_crop, laterality), as preprocess_chw makes it:
    without breast_crop the frame is the whole film, its breast the found breast's mask."""
    image = validated_image(image)
    if prep.laterality not in LATERALITY_MODES:
        raise ValueError(
            f"laterality must be one of {list(LATERALITY_MODES)}, got {prep.laterality!r}"
        )
    found = find_breast(image)
    height, width = image.shape[:2]
    mask = cv2.resize(found.mask, (width, height), interpolation=cv2.INTER_NEAREST)
    box_x = box_y = 0
    if prep.breast_crop:
        image = found.isolate(image)
        mask = found.crop(mask)
        box_x, box_y = found.x, found.y
    mirrored = prep.laterality == "left" and found.chest_wall == "right"
    if mirrored:
        image, mask = image[:, ::-1], mask[:, ::-1]
    return BreastFrame(
        np.ascontiguousarray(image), np.ascontiguousarray(mask), box_x, box_y, mirrored
    )


def cut_patch(frame: BreastFrame, x: int, y: int, side: int) -> np.ndarray:
    """The side x side patch of the breast frame with top-left (x, y), black past its edges."""
    shape = (side, side, *frame.image.shape[2:])
    patch = np.zeros(shape, frame.image.dtype)
    top, left = max(0, y), max(0, x)
    bottom, right = min(frame.height, y + side), min(frame.width, x + side)
    if bottom > top and right > left:
        patch[top - y : bottom - y, left - x : right - x] = frame.image[top:bottom, left:right]
    return patch


def patch_preprocess(prep: PreprocessCard) -> PreprocessCard:
    """The preprocessing a patch goes through: the model's own, with the breast steps already
    done on the whole film (a patch holds no whole breast to find, nor a chest wall to look for a
    pectoral muscle at; CLAHE's tiles would be the patch's, not the film's)."""
    return replace(prep, breast_crop=False, laterality="keep", pectoral="keep", clahe_clip=0.0)


def patch_tensor(
    frame: BreastFrame, x: int, y: int, card: PatchCard, prep: PreprocessCard
) -> np.ndarray:
    """One patch as the (C, H, W) float32 tensor the model takes."""
    return preprocess_chw(cut_patch(frame, x, y, card.side), patch_preprocess(prep))


def grid(frame: BreastFrame, card: PatchCard) -> list[tuple[int, int]]:
    """Top-left corners of the sliding grid over the breast frame: steps of `stride` with the last
    patch flush with the far edge (so every pixel is covered), keeping the patches with at least
    `min_breast` of their area on the breast; when none has, the one with the most breast."""
    xs = _starts(frame.width, card.side, card.stride)
    ys = _starts(frame.height, card.side, card.stride)
    corners = [(x, y) for y in ys for x in xs]
    shares = [frame.breast_share(x, y, card.side) for x, y in corners]
    kept = [c for c, s in zip(corners, shares, strict=True) if s >= card.min_breast]
    return kept or [corners[int(np.argmax(shares))]]


def grid_tensors(
    image: np.ndarray, prep: PreprocessCard, card: PatchCard
) -> tuple[np.ndarray, list[tuple[int, int]], BreastFrame]:
    """A film's grid patches as one (N, C, H, W) float32 batch, their corners and its frame."""
    frame = breast_frame(image, prep)
    corners = grid(frame, card)
    batch = np.stack([patch_tensor(frame, x, y, card, prep) for x, y in corners])
    return batch, corners, frame


def aggregate(probabilities: np.ndarray, positive: int, card: PatchCard) -> np.ndarray:
    """The film's class probabilities from its patches' (N, classes): the row of the most
    positive patch (`max`), or the mean of the `top_k` most positive rows (`top_k_mean`); either
    way a probability vector, whose positive entry is the max / top-k mean of the patches'."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if probabilities.ndim != 2 or len(probabilities) == 0:
        raise ValueError(
            f"aggregate needs an (N, classes) array with N >= 1, got shape {probabilities.shape}"
        )
    if not 0 <= positive < probabilities.shape[1]:
        raise ValueError(
            f"positive class index {positive} is outside {probabilities.shape[1]} classes"
        )
    order = np.argsort(-probabilities[:, positive], kind="stable")
    k = 1 if card.aggregate == "max" else min(card.top_k, len(order))
    return probabilities[order[:k]].mean(axis=0)


def film_probabilities(
    image: np.ndarray, prep: PreprocessCard, card: PatchCard, positive: int,
    run_batch: Callable[[np.ndarray], np.ndarray], max_batch: int = 64,
) -> np.ndarray:  # fmt: skip
    """A film's class probabilities from a patch model: its grid patches, `run_batch` mapping
    (n, C, H, W) patches (n <= max_batch) to (n, classes) probabilities, then `aggregate`."""
    batch, _, _ = grid_tensors(image, prep, card)
    step = max(1, max_batch)
    rows = [run_batch(batch[start : start + step]) for start in range(0, len(batch), step)]
    return aggregate(np.concatenate(rows), positive, card)


def _starts(length: int, side: int, stride: int) -> Sequence[int]:
    """Patch starts along one axis: 0, stride, ... and one flush with the end; 0 alone when the
    axis is shorter than a patch (the patch is padded)."""
    if length <= side:
        return [0]
    starts = list(range(0, length - side + 1, stride))
    if starts[-1] != length - side:
        starts.append(length - side)
    return starts
