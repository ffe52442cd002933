"""The lesion localiser on the cart: find the lesion, crop around it, classify the crop.

A localiser is an ONNX model whose card has a box output beside a two-class presence output
(no_lesion, lesion); it reads the frame through the same shared preprocessing as the classifier
(edgebc.preprocess), and its box (x0, y0, x1, y1 as fractions of its input) is mapped back through
the letterbox onto the frame. Below its card's operating threshold the frame has "no lesion
found": that is reported as the decision's state with its reason and no class, never a guess on
the whole frame. Above it, the box widened by a margin is cropped from the frame and the crop goes
to the classifier, and the decision carries the box. Box geometry and the detection metrics (IoU,
AP50) live here too, so training, evaluation and the cart map boxes one way.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgebc.backends import Backend
from edgebc.errors import EdgebcError
from edgebc.integrity import sha256_file
from edgebc.metrics import softmax
from edgebc.model_card import ModelCard
from edgebc.preprocess import PreprocessCard, letterbox_geometry, preprocess_chw
from edgebc.quality import QualityResult

log = logging.getLogger(__name__)

NO_LESION_CHECK = "no_lesion"
# the smallest crop side in frame pixels: a box of a few pixels is no lesion the classifier
# could judge; widened to this around its centre
MIN_CROP_PIXELS = 16


@dataclass(frozen=True)
class Box:
    """An axis-aligned box in frame pixels (x0, y0 inclusive; x1, y1 exclusive) and its score."""

    x0: float
    y0: float
    x1: float
    y1: float
    score: float = 1.0

    def to_json(self) -> dict[str, float]:
        """x, y, w, h in frame pixels (as BUS-BRA's bbox and the serve region), and the score."""
        return {
            "x": round(self.x0, 1),
            "y": round(self.y0, 1),
            "w": round(self.x1 - self.x0, 1),
            "h": round(self.y1 - self.y0, 1),
            "score": round(self.score, 4),
        }


def check_localiser_card(card: ModelCard) -> None:
    """Refuse a localiser whose input geometry the box mapping cannot undo."""
    if not card.is_localiser:
        raise EdgebcError(
            f"model {card.name} is not a lesion localiser (its card has no box output)"
        )
    prep = card.preprocess
    if prep.breast_crop or prep.laterality != "keep":
        raise EdgebcError(
            f"localiser {card.name}: breast crop and laterality move the frame; a localiser's "
            "box maps back only through the letterbox"
        )


def box_to_input(
    box_xywh: Sequence[float], frame_shape: tuple[int, int], prep: PreprocessCard
) -> np.ndarray:
    """A box (x, y, w, h) in frame pixels as (x0, y0, x1, y1) fractions of the model input."""
    geometry = letterbox_geometry(frame_shape[0], frame_shape[1], prep)
    x, y, w, h = (float(v) for v in box_xywh)
    corners = np.array(
        [
            (x * geometry.scale_x + geometry.left) / prep.input_width,
            (y * geometry.scale_y + geometry.top) / prep.input_height,
            ((x + w) * geometry.scale_x + geometry.left) / prep.input_width,
            ((y + h) * geometry.scale_y + geometry.top) / prep.input_height,
        ],
        np.float32,
    )
    return np.clip(corners, 0.0, 1.0)


def box_to_frame(
    box: Sequence[float], frame_shape: tuple[int, int], prep: PreprocessCard, score: float = 1.0
) -> Box:
    """(x0, y0, x1, y1) fractions of the model input back to frame pixels, clipped to the frame
    (a box over the letterbox bars ends at the image's edge)."""
    height, width = frame_shape
    geometry = letterbox_geometry(height, width, prep)
    x0, y0, x1, y1 = (float(v) for v in box)
    xs = [(v * prep.input_width - geometry.left) / geometry.scale_x for v in (x0, x1)]
    ys = [(v * prep.input_height - geometry.top) / geometry.scale_y for v in (y0, y1)]
    return Box(
        float(np.clip(min(xs), 0, width)), float(np.clip(min(ys), 0, height)),
        float(np.clip(max(xs), 0, width)), float(np.clip(max(ys), 0, height)), float(score),
    )  # fmt: skip


def mask_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """(x, y, w, h) of the nonzero pixels of a mask (the union of a frame's lesions), None if empty."""
    rows, cols = np.nonzero(mask)
    if len(rows) == 0:
        return None
    x0, y0 = int(cols.min()), int(rows.min())
    return x0, y0, int(cols.max()) - x0 + 1, int(rows.max()) - y0 + 1


def crop_box(box: Box, frame_shape: tuple[int, int], margin: float) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) integer pixels to crop: the box widened by `margin` of its width and
    height on each side, at least MIN_CROP_PIXELS a side, inside the frame."""
    height, width = frame_shape
    w, h = box.x1 - box.x0, box.y1 - box.y0
    cx, cy = (box.x0 + box.x1) / 2, (box.y0 + box.y1) / 2
    half_w = max(w * (1 + 2 * margin), MIN_CROP_PIXELS) / 2
    half_h = max(h * (1 + 2 * margin), MIN_CROP_PIXELS) / 2
    x0, x1 = max(0, int(np.floor(cx - half_w))), min(width, int(np.ceil(cx + half_w)))
    y0, y1 = max(0, int(np.floor(cy - half_h))), min(height, int(np.ceil(cy + half_h)))
    if x1 <= x0 or y1 <= y0:
        raise EdgebcError(f"the lesion box {box} lies outside the {width}x{height} frame")
    return x0, y0, x1, y1


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Intersection over union of (N, 4) against (N, 4) boxes (x0, y0, x1, y1), row by row."""
    a, b = np.asarray(a, np.float64).reshape(-1, 4), np.asarray(b, np.float64).reshape(-1, 4)
    left, top = np.maximum(a[:, 0], b[:, 0]), np.maximum(a[:, 1], b[:, 1])
    right, bottom = np.minimum(a[:, 2], b[:, 2]), np.minimum(a[:, 3], b[:, 3])
    inter = np.clip(right - left, 0, None) * np.clip(bottom - top, 0, None)
    area = lambda z: np.clip(z[:, 2] - z[:, 0], 0, None) * np.clip(z[:, 3] - z[:, 1], 0, None)  # noqa: E731
    union = area(a) + area(b) - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def average_precision(scores: np.ndarray, hits: np.ndarray, positives: int) -> float:
    """VOC all-point AP of one detection per frame: `hits` True where the frame has a lesion and
    the box overlaps it enough; every other detection (a normal frame, a missed box) is a false
    positive; `positives` frames have a lesion."""
    if positives == 0:
        return float("nan")
    order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
    tp = np.cumsum(np.asarray(hits, bool)[order])
    fp = np.cumsum(~np.asarray(hits, bool)[order])
    recall = tp / positives
    precision = tp / np.maximum(tp + fp, 1)
    recall = np.concatenate([[0.0], recall, [recall[-1] if len(recall) else 0.0]])
    precision = np.concatenate([[1.0], precision, [0.0]])
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    steps = np.nonzero(recall[1:] != recall[:-1])[0]
    return float(np.sum((recall[steps + 1] - recall[steps]) * precision[steps + 1]))


def detection_metrics(
    scores: np.ndarray,
    boxes: np.ndarray,
    truth: np.ndarray,
    present: np.ndarray,
    threshold: float,
) -> dict[str, float | int | None]:
    """AP50, mean IoU of the top box on lesion frames, and at the operating `threshold`: the share
    of lesion frames found (score at or above it), found with IoU >= 0.5, and the share of
    lesion-free frames left alone (None where there are none). Boxes as input fractions."""
    scores, present = np.asarray(scores, np.float64), np.asarray(present, bool)
    overlap = iou(boxes, truth)
    hits = present & (overlap >= 0.5)
    found = scores >= threshold
    n_pos, n_neg = int(present.sum()), int((~present).sum())
    return {
        "frames": len(scores),
        "lesion_frames": n_pos,
        "lesion_free_frames": n_neg,
        "ap50": average_precision(scores, hits, n_pos),
        "mean_iou": float(overlap[present].mean()) if n_pos else None,
        "iou50_share": float(hits[present].mean()) if n_pos else None,
        "threshold": float(threshold),
        "recall": float(found[present].mean()) if n_pos else None,
        "recall_iou50": float((found & hits)[present].mean()) if n_pos else None,
        "specificity": float((~found[~present]).mean()) if n_neg else None,
    }


def threshold_for_recall(scores: np.ndarray, present: np.ndarray, target: float) -> float:
    """The highest score threshold that still finds `target` of the lesion frames."""
    positives = np.sort(np.asarray(scores, np.float64)[np.asarray(present, bool)])
    if len(positives) == 0:
        raise EdgebcError("no lesion frames to choose the localiser's threshold on")
    keep = int(np.ceil(target * len(positives)))
    return float(positives[len(positives) - keep]) if keep > 0 else 1.0


# -- the runtime -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Localisation:
    """What the localiser said of one frame: the box (frame pixels) and whether it counts."""

    box: Box
    found: bool
    threshold: float
    on_image: bool = True  # False: the box has no area on the image (in the letterbox bars)

    def refusal(self) -> QualityResult:
        why = (
            f"localiser score {self.box.score:.2f} < {self.threshold:.2f}"
            if self.on_image
            else "the localiser's box lies off the image, in the letterbox bars"
        )
        return QualityResult(
            False,
            f"no lesion found ({why}): no class is given; scan the lesion into view, or judge "
            "the frame without the model",
            NO_LESION_CHECK,
        )


class Localiser:
    """An exported localiser on a backend (ONNX Runtime): frames in, boxes and scores out."""

    def __init__(self, backend: Backend, threshold: float | None = None) -> None:
        card = backend.card
        check_localiser_card(card)
        chosen = card.threshold if threshold is None else threshold
        if chosen is None:
            raise EdgebcError(
                f"localiser {card.name} has no operating threshold in its card; give one"
            )
        self.backend = backend
        self.card = card
        self.threshold = float(chosen)
        self.model_sha256 = backend.model_sha256

    def locate(self, frames: Sequence[np.ndarray]) -> list[Localisation]:
        """One localisation per frame (each an already region-cropped frame)."""
        if not frames:
            return []
        prep = self.card.preprocess
        tensors = np.stack([preprocess_chw(frame, prep) for frame in frames])
        outputs = self.backend.run_named({self.card.input_name: tensors})
        probs = softmax(outputs[self.card.output_name], self.card.temperature)
        boxes = outputs[self.card.box_output]
        found = []
        for frame, p, box in zip(frames, probs, boxes, strict=True):
            score = float(p[self.card.positive])
            if not np.all(np.isfinite(box)):  # a broken output is no lesion, not a crash
                box = np.zeros(4, np.float32)
            mapped = box_to_frame(box, frame.shape[:2], prep, score)
            # a box clipped to nothing (it lay in the letterbox bars) is no lesion on the image:
            # widening it to the smallest crop would classify a strip of the frame's edge
            on_image = mapped.x1 > mapped.x0 and mapped.y1 > mapped.y0
            found.append(Localisation(mapped, score >= self.threshold and on_image,
                                      self.threshold, on_image))  # fmt: skip
        return found

    def close(self) -> None:
        self.backend.close()


def open_localiser(path: str | Path, threads: int = 1, threshold: float | None = None) -> Localiser:
    """The localiser exported to `path` (ONNX), checked to be one."""
    from edgebc.backends import open_backend

    return Localiser(open_backend(path, threads=threads), threshold)


# what a classifier's card lineage says when it was trained on localiser crops (its threshold,
# bound and shift statistics then hold for crops); `lineage["localiser"]` then names the localiser
# whose crops it saw: {"model": path, "sha256": ..., "margin": ...}
CROP_TRAINED = "lesion localiser crops"


class LesionCrop:
    """The crop the cart classifies, made the cart's way (locate, widen by the margin, cut), for
    reading frames in training, evaluation and calibration: one crop for the device and the
    data it learnt from. Unlike the cart it crops every frame, a frame below the localiser's
    threshold too (at its best box): a model must learn what a crop of lesion-free tissue looks
    like, and the cart gives those frames no class anyway. A box wholly in the letterbox bars
    (no area on the image) leaves the frame whole; `uncropped` counts them."""

    def __init__(self, localiser: Localiser, margin: float, path: Path | None = None) -> None:
        self.localiser = localiser
        self.margin = float(margin)
        self.path = path  # the localiser's file, where known
        self.uncropped = 0

    def __call__(self, frame: np.ndarray) -> np.ndarray:
        where = self.localiser.locate([frame])[0]
        if not where.on_image:
            self.uncropped += 1
            return frame
        x0, y0, x1, y1 = crop_box(where.box, frame.shape[:2], self.margin)
        return frame[y0:y1, x0:x1]

    def lineage(self, path: str | Path) -> dict[str, object]:
        """What a card trained on these crops records of them."""
        return {"model": str(path), "sha256": self.localiser.model_sha256, "margin": self.margin}


def open_lesion_crop(path: str | Path, margin: float, threads: int = 1) -> LesionCrop:
    """The localiser at `path` as a frame cropper for training-side reading."""
    return LesionCrop(open_localiser(path, threads=threads), margin, Path(path))


def lesion_crop_of(
    card: ModelCard, model_path: str | Path | None = None, also: Sequence[str | Path] = ()
) -> LesionCrop | None:
    """The crop a classifier was trained on, from its card's lineage (None: whole frames), so
    evaluation and calibration read frames as training did. The localiser is the file whose
    sha256 the lineage holds, looked for where the lineage names it, beside the model
    (`model_path`: an export ships it there), where the card's link names it, and in `also` (a
    checkpoint's training configuration); a file of another sha256 is refused, never used."""
    if card.lineage.get("input_crop") != CROP_TRAINED:
        return None
    trained = card.lineage.get("localiser") or {}
    named = Path(str(trained.get("model", "")))
    places = [named, *map(Path, also)]
    if model_path is not None:
        places.append(Path(model_path).parent / named.name)
        if card.localiser is not None:
            places.append(Path(model_path).parent / card.localiser.model)
    present = [p for p in places if p.is_file()]
    for path in present:
        if sha256_file(path) == trained.get("sha256"):
            return open_lesion_crop(path, float(trained.get("margin", 0.15)))
    if present:
        raise EdgebcError(
            f"{present[0]}: not the localiser model {card.name} was trained behind (its sha256 "
            "differs from the card's lineage)"
        )
    raise EdgebcError(
        f"model {card.name} was trained on crops of the localiser {named}, which is not there "
        "(nor beside the model): its frames cannot be read as it was trained on"
    )


def check_crop_trained(card: ModelCard, localiser: str | Path, margin: float | None = None) -> None:
    """Refuse to put a localiser in front of a classifier that was not trained on its crops: a
    classifier trained on whole frames has its operating point, sensitivity bound and shift
    statistics fitted on whole frames, and on crops it answers worse than it says
    (docs/LOCALISER.md: the then recommended model's AUC 0.862 -> 0.741 and end-to-end sensitivity
    0.950 -> 0.813 on the shared test split); one trained behind another localiser, or with
    another margin, saw other crops."""
    if card.lineage.get("input_crop") != CROP_TRAINED:
        raise EdgebcError(
            f"model {card.name} was trained on whole frames, not on crops of {localiser}: its "
            "threshold and sensitivity bound do not hold for crops (measured: docs/LOCALISER.md); "
            "train the classifier on localiser crops, or run it without the localiser"
        )
    trained = card.lineage.get("localiser") or {}
    expected = trained.get("sha256")
    if expected and Path(localiser).is_file() and sha256_file(localiser) != expected:
        raise EdgebcError(
            f"model {card.name} was trained on the crops of another localiser than {localiser} "
            "(sha256 differs from its card's lineage): its threshold does not hold for this "
            "one's crops; use the localiser it was trained behind"
        )
    if margin is not None and "margin" in trained and abs(float(trained["margin"]) - margin) > 1e-9:
        raise EdgebcError(
            f"model {card.name} was trained on crops with margin {trained['margin']}, not "
            f"{margin}: set localiser_margin: {trained['margin']}"
        )


def linked_localiser_path(card: ModelCard, model_path: str | Path) -> Path | None:
    """Where the classifier's card says its localiser is (relative to the classifier's folder),
    refused when the file there is not the one it was linked with."""
    if card.localiser is None:
        return None
    named = Path(card.localiser.model)
    path = named if named.is_absolute() else Path(model_path).parent / named
    expected = card.localiser.sha256
    if expected and path.is_file() and sha256_file(path) != expected:
        raise EdgebcError(
            f"{path}: not the localiser model {card.name} was linked with (its sha256 differs from "
            "the one in the card's link); link the classifier to this localiser again, or restore it"
        )
    return path


def localiser_behind(card: ModelCard, model_path: str | Path, threads: int = 1) -> Localiser | None:
    """The localiser a classifier runs behind, opened: the one its card links (beside it), for
    tools that open a model file themselves (benchmarks); None for a whole-frame classifier."""
    path = linked_localiser_path(card, model_path)
    if path is None:
        return None
    check_crop_trained(card, path)
    return open_localiser(path, threads)


def shipped_localiser(card: ModelCard, model_path: str | Path) -> tuple[str, Path] | None:
    """(name in the model's folder, file) of the localiser a classifier's card links, for copying
    the two together into a release; refused when the link leaves the folder (a release is one
    folder) or the file is missing or another (its sha256 differs from the link's)."""
    if card.localiser is None:
        return None
    name = Path(card.localiser.model)
    if name.is_absolute() or len(name.parts) != 1:
        raise EdgebcError(
            f"{model_path}: its localiser {card.localiser.model} is not a file beside it; a "
            "release is one folder of files: export the model with its localiser beside it"
        )
    path = linked_localiser_path(card, model_path)  # refuses another file under the name
    if path is None or not path.is_file():
        raise EdgebcError(
            f"{model_path}: the localiser its card links ({card.localiser.model}) is not beside it; "
            "without it the model cannot run (it classifies the localiser's crops)"
        )
    return name.as_posix(), path
