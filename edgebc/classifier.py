"""From a frame to a decision: crop, quality gate, shared preprocessing, inference, calibrated
probabilities, shift check.

Probabilities are softmax(logits / temperature) with the card's temperature; the decision is the
one decision rule (edgebc.decision) at the card's operating threshold or a site's override. Where
the card carries its training distribution's statistics and the backend gives the features, each
frame, and the window of frames the classifier has seen, is compared with them (edgebc.shift): an
out-of-distribution decision is withdrawn (`shift="withdraw"`, a no-decision like a failed
quality gate) or kept and marked unreliable (`"mark"`). Every stage is timed, for every frame.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from edgebc.area import area_resizes, native_kernel_status
from edgebc.backends import Backend
from edgebc.breast import BreastRefusal
from edgebc.decision import DecisionRule
from edgebc.decode import ImageView
from edgebc.demo import is_demo_card
from edgebc.errors import EdgebcError
from edgebc.localiser import Box, Localiser, crop_box
from edgebc.metrics import softmax
from edgebc.model_card import DEFAULT_LOCALISER_MARGIN
from edgebc.preprocess import (
    input_tensor,
    letterbox_bars,
    letterbox_geometry,
    preprocess_chw,
    resizes_frame_only,
    to_channels,
    validated_image,
)
from edgebc.quality import (
    Gate,
    MammographyGate,
    QualityGate,
    QualityResult,
    gate_for,
    thumbnail_shape,
)
from edgebc.region import Region
from edgebc.shift import SHIFT_MODES, FrameShift, ShiftMode, shift_check_for

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Decision:
    label: str | None  # None: no decision (see quality)
    probabilities: dict[str, float] | None
    positive_probability: float | None
    threshold: float | None
    quality: QualityResult
    model_sha256: str
    timings_ms: dict[str, float] = field(default_factory=dict)
    shift: FrameShift | None = None  # None: not checked (check off, or the frame failed the gate)
    shift_action: str | None = None  # "withdrawn" or "marked" when the frame or stream is out
    demo: bool = False  # made by the demo model (phantoms only): every answer says so
    # where the lesion localiser found the lesion (frame pixels), when the classifier has one;
    # with quality "no decision" and check "no_lesion" it found none above its threshold
    box: Box | None = None
    # the localiser's model (sha256) when the classifier runs behind one: with the classifier's,
    # the models that made the decision (its box is None where the frame failed the gate first)
    localiser_sha256: str | None = None
    # the runtime and precision that ran the model (the backend's name, e.g. "openvino:CPU:bf16"):
    # one model file answers slightly differently at FP32 and BF16, and the record must say which
    runtime: str | None = None

    @property
    def unreliable(self) -> str | None:
        """Why a decision shown is marked unreliable (shift: mark), or None."""
        return self.shift.reason() if self.shift_action == "marked" and self.shift else None

    def to_json(self) -> dict[str, Any]:
        """The decision as JSON: the one form that the API answers, archive rows and audit records
        are made from. `quality` is "ok" or "no decision", with the reason beside it."""
        return {
            "label": self.label,
            "probabilities": self.probabilities,
            "positive_probability": self.positive_probability,
            "threshold": self.threshold,
            "quality": "ok" if self.quality.ok else "no decision",
            "reason": self.quality.reason,
            "model_sha256": self.model_sha256,
            "timings_ms": rounded_ms(self.timings_ms),
            "shift": None
            if self.shift is None
            else {**self.shift.to_json(), "action": self.shift_action},
            "demo": self.demo,
            "box": None if self.box is None else self.box.to_json(),
            "localiser_sha256": self.localiser_sha256,
            "runtime": self.runtime,
        }


def rounded_ms(timings: dict[str, float]) -> dict[str, float]:
    """Stage timings as reported: milliseconds to the microsecond."""
    return {stage: round(ms, 3) for stage, ms in timings.items()}


class FrameClassifier:
    def __init__(
        self,
        backend: Backend,
        region: Region | None = None,
        gate: Gate | None = None,
        threshold: float | None = None,
        shift: ShiftMode = "off",
        shift_window: int = 30,
        mammography_gate: MammographyGate | None = None,
        localiser: Localiser | None = None,
        margin: float | None = None,
    ) -> None:
        """The model's input modality picks the gate that judges its frames: the ultrasound gate
        (`gate` when it is a QualityGate, else the defaults) or the mammography gate
        (`mammography_gate`, or `gate` when it is a MammographyGate, else the defaults); so a
        classifier made from another's `gate` judges as that one did. `threshold` overrides the
        card's operating threshold (a site's own validated choice); `shift` says what an
        out-of-distribution frame does (withdraw, mark, or off: no check) and `shift_window` how
        many frames the stream verdict averages. `localiser` (edgebc.localiser) finds the lesion
        first: the classifier then sees the lesion's box widened by `margin` (else the card's
        link's margin) on each side, and a frame without a lesion gets no class."""
        if shift not in SHIFT_MODES:
            raise ValueError(f"shift must be one of {', '.join(SHIFT_MODES)}, got {shift!r}")
        if threshold is not None and not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold is a probability in [0, 1], got {threshold}")
        self.backend = backend
        self.card = backend.card
        self.demo = is_demo_card(self.card.lineage)
        if self.demo and shift != "withdraw":  # it knows phantoms only: real tissue gets no answer
            log.warning("the demo model withdraws every frame unlike its phantoms (shift: %s "
                        "is not for the demo)", shift)  # fmt: skip
            shift = "withdraw"
        self.card.require_one_image("a frame classifier")
        if self.card.is_localiser:
            raise EdgebcError(
                f"model {self.card.name} is a lesion localiser, not a classifier: name it as the "
                "classifier's localiser (settings: `localiser: PATH`)"
            )
        if (
            localiser is not None
            and localiser.card.inputs[0].modality != self.card.inputs[0].modality
        ):
            raise EdgebcError(
                f"localiser {localiser.card.name} reads {localiser.card.inputs[0].modality} frames; "
                f"model {self.card.name} classifies {self.card.inputs[0].modality}"
            )
        if localiser is None and self.card.lineage.get("input_crop"):
            raise EdgebcError(
                f"model {self.card.name} was trained on lesion-localiser crops: on whole frames its "
                "threshold and bound do not hold; run it behind its localiser (its export ships "
                "it linked; or set `localiser:`)"
            )
        self.localiser = localiser
        link = self.card.localiser
        trained = self.card.lineage.get("localiser") or {}  # the crops it was trained on
        link_margin = (link.margin if link is not None
                       else float(trained.get("margin", DEFAULT_LOCALISER_MARGIN)))  # fmt: skip
        self.margin = link_margin if margin is None else margin
        self.rule = DecisionRule.of(self.card, threshold)
        self.threshold = self.rule.threshold
        self.region = region
        ultrasound = gate if isinstance(gate, QualityGate) else QualityGate()
        if mammography_gate is None:
            mammography_gate = gate if isinstance(gate, MammographyGate) else MammographyGate()
        self.gate: Gate = gate_for(self.card.inputs[0].modality, ultrasound, mammography_gate)
        # the ultrasound gate that may judge the model's own resize (not where a localiser's box,
        # rather than the whole crop, is what the model sees)
        self._sharing_gate = (
            self.gate
            if isinstance(self.gate, QualityGate)
            and localiser is None
            and resizes_frame_only(self.card.preprocess)
            and self.card.preprocess.interpolation == "area"
            else None
        )
        self.shift_mode: ShiftMode = shift
        outputs = getattr(backend, "outputs", tuple(o.name for o in self.card.outputs))
        self.shift, self.shift_note = shift_check_for(self.card, shift, shift_window, outputs)
        log.debug("shift check: %s", self.shift_note)
        native_kernel_status()  # its one-time check (31-45 ms) here, not on the first frame

    def reset_stream(self) -> None:
        """A new stream begins (a gap in the feed): the shift window starts empty."""
        if self.shift is not None:
            self.shift.reset()

    def classify(self, frame: np.ndarray, view: ImageView | None = None) -> Decision:
        return self.classify_batch([frame], None if view is None else [view])[0]

    def classify_batch(
        self, frames: Sequence[np.ndarray], views: Sequence[ImageView | None] | None = None
    ) -> list[Decision]:
        """Decisions for several frames; frames failing the gate are not sent to the model.
        `views` (mammograms, one per frame) say what a DICOM header or a manifest says of each
        frame's view: the laterality flip and the pectoral step use it (edgebc.breast)."""
        if views is not None and len(views) != len(frames):
            raise ValueError(f"{len(frames)} frames but {len(views)} views")
        clock = time.perf_counter
        start = clock()
        crops = [self.region.crop(f) if self.region else f for f in frames]
        cropped = clock()
        # A grey model's input and the gate both start from the grey crop: convert it once (the
        # same conversion preprocess_chw makes, so the tensor is unchanged).
        greys = [self._grey(c) for c in crops]
        # Where the model's input is the grey crop resized and nothing else, the gate's copy and
        # the model's resize are read from one summed-area table (one array where they agree).
        downscales = [self._downscales(g) for g in greys]
        verdicts = [self._judge(c, g, gate_copy)
                    for c, g, (gate_copy, _) in zip(crops, greys, downscales, strict=True)]  # fmt: skip
        gated = clock()
        boxes: list[Box | None] = [None] * len(frames)
        if self.localiser is not None:
            crops, greys = list(crops), list(greys)
            passing_gate = [i for i, v in enumerate(verdicts) if v.ok]
            found = self.localiser.locate([crops[i] for i in passing_gate])
            for i, where in zip(passing_gate, found, strict=True):
                boxes[i] = self._on_frame(where.box)
                if not where.found:
                    verdicts[i] = where.refusal()
                    continue
                x0, y0, x1, y1 = crop_box(where.box, crops[i].shape[:2], self.margin)
                crops[i], greys[i] = crops[i][y0:y1, x0:x1], greys[i][y0:y1, x0:x1]
        localised = clock()
        prep = self.card.preprocess
        model_inputs = greys if prep.channels == 1 else crops
        prepared = {}
        for i in (i for i, v in enumerate(verdicts) if v.ok):
            resized = downscales[i][1]
            if resized is not None:  # the resize preprocess_chw makes, already made
                prepared[i] = input_tensor(letterbox_bars(resized, prep), prep)
                continue
            try:
                prepared[i] = preprocess_chw(
                    model_inputs[i], prep, view=views[i] if views else None
                )
            except BreastRefusal as exc:
                # the frame cannot be made into the model's input: no decision, said why, and the
                # rest of the batch goes on (a mislabelled film must not cost a night's rows)
                verdicts[i] = QualityResult(False, str(exc), exc.check)
        passing = list(prepared)
        tensors = np.stack([prepared[i] for i in passing]) if passing else None
        preprocessed = clock()
        shifts: list[FrameShift | None] = [None] * len(passing)
        if tensors is None:
            logits = np.empty((0, len(self.card.class_names)))
        elif self.shift is None:
            logits = self.backend.run(tensors)
        else:
            outputs = self.backend.run_named({self.card.input_name: tensors})
            logits = outputs[self.card.output_name]
            features = outputs[self.shift.output]
        inferred = clock()
        if tensors is not None and self.shift is not None:
            shifts = list(self.shift.judge(tensors, features, self.card.preprocess))
        checked = clock()
        probs = softmax(logits, self.card.temperature) if len(logits) else logits
        decisions: list[Decision] = []
        row = {index: k for k, index in enumerate(passing)}
        for index, verdict in enumerate(verdicts):
            if not verdict.ok:
                decisions.append(Decision(None, None, None, self.threshold, verdict,
                                          self.backend.model_sha256, demo=self.demo, box=boxes[index]))  # fmt: skip
                continue
            p, shift = probs[row[index]], shifts[row[index]]
            if shift is not None and shift.flagged and self.shift_mode == "withdraw":
                refused = QualityResult(False, shift.reason(), "shift")
                decisions.append(Decision(None, None, None, self.threshold, refused,
                                          self.backend.model_sha256, {}, shift, "withdrawn", self.demo))  # fmt: skip
                continue
            action = "marked" if shift is not None and shift.flagged else None
            decisions.append(Decision(self.rule.decide(p), dict(zip(self.card.class_names, map(float, p), strict=True)),
                                      float(p[self.rule.positive]), self.threshold, verdict, self.backend.model_sha256,
                                      {}, shift, action, self.demo, boxes[index]))  # fmt: skip
        done = clock()
        per_frame = 1000.0 / max(1, len(frames))
        timings = {"crop": (cropped - start) * per_frame, "quality": (gated - cropped) * per_frame,
                   "preprocess": (preprocessed - gated) * per_frame, "inference": (inferred - preprocessed) * per_frame,
                   "postprocess": (done - checked) * per_frame}  # fmt: skip
        if self.localiser is not None:
            timings["localise"] = (localised - gated) * per_frame
            timings["preprocess"] = (preprocessed - localised) * per_frame
        if self.shift is not None:
            timings["shift"] = (checked - inferred) * per_frame
        localiser_sha256 = None if self.localiser is None else self.localiser.model_sha256
        return [
            replace(
                d,
                timings_ms=dict(timings),
                localiser_sha256=localiser_sha256,
                runtime=self.backend.name,
            )
            for d in decisions
        ]

    def _on_frame(self, box: Box) -> Box:
        """A box on the region-cropped frame in the pixels of the frame as it came."""
        if self.region is None:
            return box
        x, y = self.region.x, self.region.y
        return replace(box, x0=box.x0 + x, y0=box.y0 + y, x1=box.x1 + x, y1=box.y1 + y)

    def _grey(self, crop: np.ndarray) -> np.ndarray:
        return to_channels(validated_image(crop), 1)

    def _judge(self, crop: np.ndarray, grey: np.ndarray, small: np.ndarray | None) -> QualityResult:
        """The gate's verdict on a crop; `small`: its grey copy, already made (ultrasound gate)."""
        if small is not None and self._sharing_gate is not None:
            return self._sharing_gate.check(crop, grey, small)
        return self.gate.check(crop, grey)

    def _downscales(self, grey: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None]:
        """(the ultrasound gate's grey copy, the model's resize of `grey`), equal to what
        `thumbnail` and `resized_for_input` make of it, read from one summed-area table
        (edgebc.area); (None, None) where the model's input is more than the grey crop resized
        by area: the gate and the preprocessing then make their own."""
        if self._sharing_gate is None:
            return None, None
        height, width = grey.shape[:2]
        gate_size, model_size = self._downscale_sizes(grey, self._sharing_gate)
        wanted = [
            size for size in dict.fromkeys((gate_size, model_size)) if size != (width, height)
        ]
        made = dict(zip(wanted, area_resizes(grey, wanted), strict=True))
        made[(width, height)] = grey
        return made[gate_size], made[model_size]

    def _downscale_sizes(self, grey: np.ndarray, gate: QualityGate) -> tuple[tuple[int, int], tuple[int, int]]:  # fmt: skip
        """(width, height) of `gate`'s grey copy of `grey` and of the model's resize of it."""
        height, width = grey.shape[:2]
        placed = letterbox_geometry(height, width, self.card.preprocess)
        thumb_h, thumb_w = thumbnail_shape(height, width, gate.size)
        return (thumb_w, thumb_h), (placed.width, placed.height)
