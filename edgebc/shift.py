"""Scanner-shift detection: how unlike the training frames each frame, and the stream, looks.

Training stores in the card what the model saw (`TrainingStatistics`): a handful of image
statistics of its training frames, taken from the model's own input tensor (so the shared
preprocessing defines them on the cart as in training), and the distribution of its penultimate
features as a mean and a PCA basis. Three distances are each about 1 on the training frames: the
Mahalanobis distance of its image statistics, that of its features inside the PCA basis, and the
squared residual of its features outside it; the frame's score is the mean of those the card
chose (`parts`; new cards: the image statistics alone, see SCORE_PARTS). The thresholds that call a frame, or a window of frames, out of distribution were set on
frames the weights did not train on (the calibration split, else validation) at a stated
false-alarm rate. The window's threshold is the same quantile of per-case mean scores, so a stream
of one ordinary case's frames is flagged with at most that rate. Pure numpy and OpenCV: it runs
on the cart, and training fits it with the same functions.
"""

from __future__ import annotations

import base64
import logging
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import cv2
import numpy as np

from edgebc.preprocess import PreprocessCard

log = logging.getLogger(__name__)

PARTS = ("image", "features", "residual")
# The distances a frame's score averages when training fits the statistics. Chosen on the
# leave-one-site-out pair that decides nothing else (a BUS-BRA-only model telling BUSI frames from
# its own held-out ones: AUROC image 0.81, features 0.52, residual 0.61, all three averaged 0.74;
# docs/GENERALISATION.md): the features of a model trained from scratch on a few hundred frames
# do not separate an unseen scanner, and averaged in they drown the image statistics.
SCORE_PARTS: tuple[str, ...] = ("image",)
IMAGE_STATISTICS = ("mean", "std", "p05", "p50", "p95", "dark_fraction", "fine_texture",
                    "texture_ratio")  # fmt: skip
DARK = 0.1  # intensity in [0, 1] under which a pixel counts as dark (shadow, or no echo)
SHIFT_MODES = ("withdraw", "mark", "off")
ShiftMode = Literal["withdraw", "mark", "off"]


def _rounded(values: Any, digits: int = 6) -> tuple[float, ...]:
    return tuple(float(f"{float(v):.{digits}g}") for v in np.ravel(values))


@dataclass(frozen=True)
class PackedArray:
    """A float array kept small in the card's JSON: float16, little-endian, base64 (a 16 x 1024
    PCA basis is 44 kB this way, against about 130 kB as a rounded list of numbers)."""

    shape: tuple[int, ...]
    data: str
    dtype: Literal["float16"] = "float16"

    def __post_init__(self) -> None:
        expected = int(np.prod(self.shape)) * 2
        if len(base64.b64decode(self.data.encode("ascii"), validate=True)) != expected:
            raise ValueError(f"packed array data does not hold shape {list(self.shape)}")

    @classmethod
    def of(cls, values: np.ndarray) -> PackedArray:
        array = np.asarray(values, np.float64)
        if not np.all(np.isfinite(array)) or np.abs(array).max(initial=0) > 65000:
            raise ValueError("a packed array needs finite values within float16's range")
        raw = array.astype("<f2").tobytes()
        return cls(tuple(int(n) for n in array.shape), base64.b64encode(raw).decode("ascii"))

    def array(self) -> np.ndarray:
        raw = base64.b64decode(self.data.encode("ascii"))
        return np.frombuffer(raw, "<f2").astype(np.float64).reshape(self.shape)


@dataclass(frozen=True)
class ImageDistribution:
    """The training frames' image statistics: mean and (regularised) covariance, and each
    statistic's 1st and 99th percentile to say in words which one is out of range."""

    names: tuple[str, ...]
    mean: tuple[float, ...]
    covariance: tuple[tuple[float, ...], ...]
    low: tuple[float, ...]
    high: tuple[float, ...]

    def __post_init__(self) -> None:
        m = len(self.names)
        if not (len(self.mean) == len(self.low) == len(self.high) == m) or len(self.covariance) != m or any(len(r) != m for r in self.covariance):  # fmt: skip
            raise ValueError(f"image statistics need {m} values per statistic")


@dataclass(frozen=True)
class FeatureDistribution:
    """The penultimate features of the training frames: their mean, the top principal directions
    (orthonormal rows) with their variances, and the mean squared residual outside them."""

    output: str  # the model output that carries the features
    mean: PackedArray
    components: PackedArray  # (k, d)
    eigenvalues: tuple[float, ...]
    residual_mean: float

    def __post_init__(self) -> None:
        k, d = self.components.shape if len(self.components.shape) == 2 else (0, 0)
        if k != len(self.eigenvalues) or self.mean.shape != (d,) or k == 0:
            raise ValueError(
                f"feature statistics disagree: components {list(self.components.shape)}, "
                f"{len(self.eigenvalues)} eigenvalues, mean {list(self.mean.shape)}"
            )
        if min(self.eigenvalues) <= 0 or self.residual_mean <= 0:
            raise ValueError("feature variances must be positive")


@dataclass(frozen=True)
class ShiftThresholds:
    """Scores above `frame` (one frame) or `window` (a window's mean) are out of distribution; both
    set so that frames the weights did not train on cross them at `false_alarm_rate`."""

    false_alarm_rate: float
    frame: float
    window: float
    fitted_on: str  # "calibration split" or "validation split"
    frames: int  # frames behind the thresholds
    units: int  # cases (patients, else images) behind the window threshold

    def __post_init__(self) -> None:
        if not 0.0 < self.false_alarm_rate < 0.5:
            raise ValueError(f"false_alarm_rate is in (0, 0.5), got {self.false_alarm_rate}")


@dataclass(frozen=True)
class TrainingStatistics:
    """What the model saw, compactly, and where it stops: the card's `training_statistics`."""

    image: ImageDistribution
    features: FeatureDistribution
    thresholds: ShiftThresholds
    training_frames: int
    version: int = 1
    # the distances the score averages (see SCORE_PARTS); cards written before this field
    # averaged all three
    parts: tuple[str, ...] = PARTS

    def __post_init__(self) -> None:
        if (
            not self.parts
            or len(set(self.parts)) != len(self.parts)
            or set(self.parts) - set(PARTS)
        ):
            raise ValueError(
                f"shift score parts are a non-empty set of {list(PARTS)}, got {list(self.parts)}"
            )


# -- per-frame measurements ---------------------------------------------------------------------
def image_statistics(batch: np.ndarray, prep: PreprocessCard) -> np.ndarray:
    """(N, len(IMAGE_STATISTICS)) statistics of model-input tensors (N, C, H, W), in the [0, 1]
    intensities before normalisation, over the image without its letterbox bars."""
    batch = np.asarray(batch, np.float32)
    mean = np.asarray(prep.mean, np.float32)[None, :, None, None]
    std = np.asarray(prep.std, np.float32)[None, :, None, None]
    grey = (batch * std + mean).mean(axis=1)
    return np.stack([_frame_statistics(g, prep.pad_value) for g in grey])


def _frame_statistics(image: np.ndarray, pad_value: float) -> np.ndarray:
    bar = np.abs(image - np.float32(pad_value)) < 1e-4
    rows, cols = ~bar.all(axis=1), ~bar.all(axis=0)
    content = image[rows][:, cols] if rows.any() and cols.any() else image
    values = content.ravel()
    p05, p50, p95 = np.quantile(values, (0.05, 0.5, 0.95))
    fine = float(np.abs(content - cv2.blur(content, (3, 3))).mean())
    coarse = float(np.abs(content - cv2.blur(content, (9, 9))).mean())
    return np.array([values.mean(), values.std(), p05, p50, p95, (values < DARK).mean(), fine,
                     fine / (coarse + 1e-3)], np.float64)  # fmt: skip


# -- fitting (training, and adding statistics to an existing checkpoint) -----------------------
def fit_image_distribution(stats: np.ndarray) -> ImageDistribution:
    stats = np.asarray(stats, np.float64)
    covariance = np.cov(stats, rowvar=False)
    # shrink toward the diagonal so a statistic that hardly varies in training cannot dominate
    covariance = covariance + np.diag(0.05 * np.diag(covariance) + 1e-8)
    low, high = np.quantile(stats, (0.01, 0.99), axis=0)
    return ImageDistribution(IMAGE_STATISTICS, _rounded(stats.mean(axis=0)),
                             tuple(_rounded(row) for row in covariance), _rounded(low), _rounded(high))  # fmt: skip


def fit_feature_distribution(features: np.ndarray, output: str, k: int = 16) -> FeatureDistribution:
    features = np.asarray(features, np.float64)
    n, d = features.shape
    k = min(k, n - 1, d)
    if k < 1:
        raise ValueError(f"feature statistics need at least 2 frames, got {n}")
    mean = PackedArray.of(features.mean(axis=0))
    centred = features - mean.array()
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    components = PackedArray.of(vt[:k])
    basis = _orthonormal(components.array())
    projected = centred @ basis.T
    eigenvalues = np.maximum(projected.var(axis=0), 1e-12)
    residual = ((centred - projected @ basis) ** 2).sum(axis=1)
    return FeatureDistribution(output, mean, components, _rounded(eigenvalues),
                               float(f"{max(residual.mean(), 1e-12):.6g}"))  # fmt: skip


def fit_training_statistics(
    train_images: np.ndarray, train_features: np.ndarray, held_images: np.ndarray,
    held_features: np.ndarray, held_units: Sequence[str], fitted_on: str, output: str = "features",
    false_alarm_rate: float = 0.01, k: int = 16, parts: tuple[str, ...] = SCORE_PARTS,
) -> TrainingStatistics:  # fmt: skip
    """The distribution from the training frames' image statistics and features; the thresholds
    from held-out frames (the model's own, never trained on) at `false_alarm_rate`."""
    if len(held_images) != len(held_features) or len(held_units) != len(held_images):
        raise ValueError("held-out image statistics, features and units must be equally many")
    if len(held_images) < 2:
        raise ValueError("the thresholds need held-out frames (a calibration or validation split)")
    provisional = TrainingStatistics(
        fit_image_distribution(train_images),
        fit_feature_distribution(train_features, output, k),
        ShiftThresholds(false_alarm_rate, 1.0, 1.0, fitted_on, 0, 0),
        len(train_images),
        parts=parts,
    )
    scores = ShiftScorer(provisional).scores(held_images, held_features)
    per_unit: dict[str, list[float]] = {}
    for unit, score in zip(held_units, scores, strict=True):
        per_unit.setdefault(unit, []).append(float(score))
    unit_means = np.array([np.mean(v) for v in per_unit.values()])
    q = 1.0 - false_alarm_rate
    thresholds = ShiftThresholds(
        false_alarm_rate,
        float(f"{np.quantile(scores, q, method='higher'):.6g}"),
        float(f"{np.quantile(unit_means, q, method='higher'):.6g}"),
        fitted_on,
        len(scores),
        len(unit_means),
    )
    return replace(provisional, thresholds=thresholds)


def _orthonormal(rows: np.ndarray) -> np.ndarray:
    """The stored (float16-rounded) basis made orthonormal again, spanning the same directions."""
    q, r = np.linalg.qr(rows.T)
    return (q * np.sign(np.diag(r))).T


# -- scoring on the cart ------------------------------------------------------------------------
@dataclass(frozen=True)
class FrameShift:
    """One frame against the training distribution; `stream_*` is the window it closes."""

    score: float
    image: float
    features: float
    residual: float
    out: bool
    stream_score: float | None
    stream_out: bool
    unusual: tuple[str, ...] = ()  # image statistics outside the training frames' 1-99 % range

    @property
    def flagged(self) -> bool:
        return self.out or self.stream_out

    def reason(self) -> str:
        what = "the stream" if self.stream_out and not self.out else "this frame"
        unusual = f"; {', '.join(self.unusual)} outside the training range" if self.unusual else ""
        return f"out of distribution: {what} is unlike the frames the model was trained on{unusual}"

    def to_json(self) -> dict[str, Any]:
        return {"out_of_distribution": self.flagged, "frame_out": self.out,
                "stream_out": self.stream_out, "score": round(self.score, 3),
                "stream_score": None if self.stream_score is None else round(self.stream_score, 3),
                "parts": {"image": round(self.image, 3), "features": round(self.features, 3),
                          "residual": round(self.residual, 3)}, "unusual": list(self.unusual)}  # fmt: skip


class ShiftScorer:
    """Scores frames against a card's training statistics (stateless; the window is ShiftWindow)."""

    def __init__(self, stats: TrainingStatistics) -> None:
        self.stats = stats
        image = stats.image
        self._image_mean = np.asarray(image.mean)
        self._image_precision = np.linalg.inv(np.asarray(image.covariance))
        self._low, self._high = np.asarray(image.low), np.asarray(image.high)
        features = stats.features
        self._feature_mean = features.mean.array()
        self._basis = _orthonormal(features.components.array())
        self._inv_eigen = 1.0 / np.asarray(features.eigenvalues)
        self._residual_mean = features.residual_mean
        self._chosen = [PARTS.index(p) for p in stats.parts]

    def parts(self, images: np.ndarray, features: np.ndarray) -> np.ndarray:
        """(N, 3): image, in-basis feature and residual distances, each about 1 in training."""
        delta = np.asarray(images, np.float64) - self._image_mean
        image = np.einsum("ni,ij,nj->n", delta, self._image_precision, delta) / len(
            self._image_mean
        )
        centred = np.asarray(features, np.float64).reshape(len(delta), -1) - self._feature_mean
        projected = centred @ self._basis.T
        inside = (projected**2 * self._inv_eigen).sum(axis=1) / len(self._inv_eigen)
        residual = ((centred - projected @ self._basis) ** 2).sum(axis=1) / self._residual_mean
        return np.stack([image, inside, residual], axis=1)

    def scores(self, images: np.ndarray, features: np.ndarray) -> np.ndarray:
        """Each frame's score: the mean of the card's chosen distances."""
        return self.combine(self.parts(images, features))

    def combine(self, parts: np.ndarray) -> np.ndarray:
        return np.asarray(parts)[..., self._chosen].mean(axis=-1)

    def unusual(self, image: np.ndarray) -> tuple[str, ...]:
        outside = (image < self._low) | (image > self._high)
        return tuple(n for n, o in zip(self.stats.image.names, outside, strict=True) if o)


class ShiftWindow:
    """The rolling mean of the last `length` frame scores, judged against the window threshold
    once the window is full."""

    def __init__(self, length: int) -> None:
        if length < 1:
            raise ValueError(f"the shift window holds at least 1 frame, got {length}")
        self._scores: deque[float] = deque(maxlen=length)

    def update(self, score: float) -> float | None:
        self._scores.append(score)
        return float(np.mean(self._scores)) if len(self._scores) == self._scores.maxlen else None

    def reset(self) -> None:
        self._scores.clear()


class ShiftCheck:
    """The check a classifier runs: scores, window, and the verdict for each frame."""

    def __init__(self, stats: TrainingStatistics, window: int = 30) -> None:
        self.scorer = ShiftScorer(stats)
        self.thresholds = stats.thresholds
        self.output = stats.features.output
        self.window = ShiftWindow(window)

    def judge(
        self, tensors: np.ndarray, features: np.ndarray, prep: PreprocessCard
    ) -> list[FrameShift]:
        """Verdicts for a batch of model inputs and their features, in order (the window moves)."""
        images = image_statistics(tensors, prep)
        verdicts = []
        for image, parts in zip(images, self.scorer.parts(images, features), strict=True):
            score = float(self.scorer.combine(parts))
            stream = self.window.update(score)
            verdicts.append(FrameShift(score, float(parts[0]), float(parts[1]), float(parts[2]),
                                       score > self.thresholds.frame, stream,
                                       stream is not None and stream > self.thresholds.window,
                                       self.scorer.unusual(image)))  # fmt: skip
        return verdicts

    def reset(self) -> None:
        """Forget the window (a gap in the feed: the next frames are a new stream)."""
        self.window.reset()


def shift_check_for(card: Any, mode: ShiftMode, window: int, outputs: Sequence[str]) -> tuple[ShiftCheck | None, str]:  # fmt: skip
    """The shift check a card and the settings ask for, or None with the reason it is off."""
    if mode == "off":
        return None, "off (settings: shift: off)"
    stats = card.training_statistics
    if stats is None:
        return None, ("off: the model card has no training-distribution statistics "
                      "(add them with `python -m edgebc.train.shift_stats`, or retrain)")  # fmt: skip
    if len(card.inputs) != 1:
        return None, "off: shift detection covers one-input models"
    if stats.features.output not in outputs:
        return None, (f"off: the model or its backend gives no {stats.features.output!r} "
                      "output (native TensorRT engines give logits only; run the ONNX file)")  # fmt: skip
    return ShiftCheck(stats, window), f"on ({mode}; window {window} frames)"
