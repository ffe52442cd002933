"""The live loop of the cart: read the newest frame -> classify -> smooth -> hand the result to each sink.

One thread takes the newest frame from a `LiveReader` (never a stale or repeated one), classifies
it (region crop, quality gate, shared preprocessing, inference, calibrated probabilities), folds
it into the temporal smoother and hands the `LiveResult` to each `Sink` (edgebc/serve/sinks.py):
the audit trail first, and only a result it accepted is published, to `latest()`, the page
broadcast, a local display and the statistics. `display()` is what a screen may show *now*: a
decision is withdrawn, with the reason in words, whenever the feed is not delivering (stalled,
frozen, garbage, reopening), the audit trail refused the newest result, the frame failed the
quality gate or was out of distribution (with `shift: withdraw`; with `mark` the decision is shown
with a warning), or the newest result is older than `max_result_age`. Nothing here imports a web
framework.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

import numpy as np

from edgebc.audit_trail import AuditUnavailableError
from edgebc.classifier import Decision, FrameClassifier, rounded_ms
from edgebc.live import FeedState, LiveReader
from edgebc.quality import QualityResult
from edgebc.region import Region, detect_imaging_region
from edgebc.serve.case_context import LiveFusion
from edgebc.serve.sinks import LiveStatistics
from edgebc.smoothing import Smoothed, SmoothingConfig, TemporalSmoother
from edgebc.sources import Frame

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LiveResult:
    """One classified frame: the per-frame decision, the smoothed one, the imaging region it was
    cropped to, and where the time went. Never changed once built: the audit trail records it
    with the stages up to smoothing, and the result published after it carries the audit's time
    and the end-to-end latency too (the later sinks' hand-off times are `LivePipeline.handoff_ms`)."""

    sequence: int
    frame: Frame
    decision: Decision
    smoothed: Smoothed
    frame_sha256: str
    timings_ms: dict[str, float]
    finished_monotonic: float
    region: Region | None = None  # None: the whole frame
    # a fusion model's: the case, inputs and modalities the decision used, and the hashes and
    # views of the mammograms it used (edgebc.serve.case_context.used_context); None otherwise
    context: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        """The decision's JSON (`Decision.to_json()`) with the loop's timings, the smoothed
        decision and the frame it was made on."""
        height, width = self.frame.image.shape[:2]
        frame = {"sequence": self.sequence, "index": self.frame.index, "captured_at": self.frame.captured,
                 "width": width, "height": height, "sha256": self.frame_sha256, "source": self.frame.source}  # fmt: skip
        return {
            **self.decision.to_json(),
            **({} if self.context is None else {"fusion": self.context}),
            "timings_ms": rounded_ms(self.timings_ms),
            "smoothed": {
                "label": self.smoothed.label,
                "probabilities": self.smoothed.probabilities,
            },
            "frame": frame,
        }


class Sink(Protocol):
    """Where results go: the audit trail, the page broadcast, the statistics, a local display.

    `handle` runs on the loop's thread for every result, so it must be quick (queue, wake, count);
    `close` runs once when the service stops. An exception from the audit sink withdraws the
    result; from any other sink it is counted and logged, and the others still get the result.
    What `handle` returns is ignored, except the audit sink's False: nothing was recorded (its
    `changes` mode skipped the result), so it proves nothing about a trail that was refusing."""

    name: str  # the stage its hand-off time is reported under

    def handle(self, result: LiveResult) -> object: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class Display:
    """What the screen may show now: a label, or no decision and the reason why."""

    label: str | None
    probabilities: dict[str, float] | None
    reason: str | None
    result: LiveResult | None
    warning: str | None = None  # a decision shown but marked unreliable (shift: mark)


class LivePipeline:
    def __init__(
        self,
        classifier: FrameClassifier | LiveFusion,
        reader: LiveReader,
        sinks: Sequence[Sink] = (),
        smoothing: SmoothingConfig | None = None,
        auto_region: bool = False,
        max_result_age: float = 1.0,
        audit: Sink | None = None,
    ) -> None:
        """Each result goes to `audit` first (the audit trail: what it refuses is never shown),
        then, published, to `sinks` in order and to the pipeline's own statistics."""
        self.classifier = classifier
        self.reader = reader
        self.auto_region = auto_region
        self.region_note = "configured" if classifier.region else "whole frame"
        self.max_result_age = max_result_age
        card = classifier.card
        self.smoother = TemporalSmoother(
            card.class_names, card.positive_class, classifier.threshold, smoothing
        )
        self.statistics = LiveStatistics(card.class_names)
        self.audit = audit
        self.screens: list[Sink] = list(sinks)
        # in hand-over order: the audit trail, then the screens, then the statistics
        self.sinks: list[Sink] = [*([audit] if audit else []), *self.screens, self.statistics]
        self._latest: LiveResult | None = None
        self._refused: str | None = None  # why the newest result was withdrawn by the audit trail
        self._refusals = 0  # results refused in a row: logged once when it starts and when it ends
        self._handoff: tuple[int, dict[str, float]] = (0, {})  # the latest's sinks' hand-off times
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="edgebc-live-pipeline", daemon=True)
        self._sequence = 0
        self._case: tuple[str | None, tuple[str, ...]] | None = None  # a fusion frame's context
        self.last_beat = time.monotonic()  # each turn of the loop; the systemd watchdog reads it

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> LivePipeline:
        self.reader.start()
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the loop, release the source, and close every sink (the audit trail commits)."""
        self._stop.set()
        self._thread.join(timeout)
        self.reader.stop()
        for sink in self.sinks:
            try:
                sink.close()
            except Exception:  # one sink failing to close must not keep the audit trail open
                log.exception("closing the %s sink failed", sink.name)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    # -- the loop --------------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            self.last_beat = time.monotonic()
            frame, waited_ms = self._read_newest()
            if frame is None:
                continue
            try:
                decision, context = self._classify(frame)
                result = self._smooth(frame, decision, waited_ms, context)
            except Exception:  # the loop outlives any one frame: counted and logged
                self.statistics.failed()
                log.exception("frame %s from %s could not be processed", frame.index, frame.source)
                continue
            self._hand_over(result)

    def _read_newest(self) -> tuple[Frame | None, float]:
        waited = time.perf_counter()
        frame = self.reader.latest(timeout=0.1)
        if frame is None and isinstance(self.classifier, LiveFusion):
            self.classifier.expire_if_idle()  # a fusion model's case ends after its idle time
        if frame is None and not self.reader.state().ok:
            self.smoother.reset()  # a gap in the feed must not be averaged across
            self.classifier.reset_stream()  # nor judged as one stream
        return frame, (time.perf_counter() - waited) * 1000.0

    def _classify(self, frame: Frame) -> tuple[Decision, dict[str, Any] | None]:
        """The frame's decision and, for a fusion model, what it used (its case context)."""
        if self.auto_region and self.classifier.region is None:
            self._detect_region(frame.image)
        try:
            # a fusion model: a frame from before the case, or of another patient or
            # ultrasound study, is not fused
            if isinstance(self.classifier, LiveFusion):
                fused, context = self.classifier.classify(
                    frame.image, frame.view, frame.captured_monotonic, frame.study
                )
                return fused.decision, context
            return self.classifier.classify(frame.image, frame.view), None
        except ValueError as exc:  # the region no longer fits: capture resolution changed
            return Decision(None, None, None, self.classifier.threshold,
                            QualityResult(False, str(exc)), self.classifier.backend.model_sha256,
                            demo=self.classifier.demo), None  # fmt: skip

    def _smooth(self, frame: Frame, decision: Decision, waited_ms: float,
                context: dict[str, Any] | None = None) -> LiveResult:  # fmt: skip
        started = time.perf_counter()
        case = None if context is None else (context["case"], tuple(context["inputs_used"]))
        if case != self._case:  # never average a case's fused frames with another's (or none)
            self.smoother.reset()
            self._case = case
        smoothed = self.smoother.update(decision.probabilities, frame.captured_monotonic)
        timings = {"capture_wait": waited_ms, "read": frame.read_ms, **decision.timings_ms,
                   "smoothing": (time.perf_counter() - started) * 1000.0}  # fmt: skip
        digest = hashlib.sha256(np.ascontiguousarray(frame.image).data).hexdigest()
        self._sequence += 1
        return LiveResult(self._sequence, frame, decision, smoothed, digest, timings,
                          time.monotonic(), self.classifier.region, context)  # fmt: skip

    def _hand_over(self, result: LiveResult) -> None:
        """The audit trail first; a result it accepted (queued, or counted as lost by the trail's
        own rules when its backlog is full) is published, one it refused is withdrawn."""
        published = self._audited(result)
        if published is None:
            return
        with self._lock:
            self._latest, self._refused = published, None
        handoff: dict[str, float] = {}  # this result's own: the published result is never changed
        for sink in (*self.screens, self.statistics):
            started = time.perf_counter()
            try:
                sink.handle(published)
            except Exception:  # one sink failing must not keep the result from the others
                self.statistics.failed()
                log.exception("the %s sink failed on frame %s", sink.name, result.frame.index)
            handoff[sink.name] = (time.perf_counter() - started) * 1000.0
        with self._lock:
            self._handoff = (published.sequence, handoff)

    def _audited(self, result: LiveResult) -> LiveResult | None:
        """The result to publish, with the audit's time and the end-to-end latency; None when the
        audit trail refused it (counted, logged, and the screens withdraw the decision)."""
        timings: dict[str, float] = {}
        if self.audit is not None:
            started = time.perf_counter()
            try:
                recorded = self.audit.handle(result)
            except Exception as exc:  # never show a decision that was not logged
                self.statistics.failed()
                self._refusals += 1
                if self._refusals == 1:  # once, not 30 tracebacks a second while the disk is full
                    log.error("the audit trail refused frame %s; decisions are withheld until it "
                              "records again: %s", result.frame.index, exc,
                              exc_info=not isinstance(exc, AuditUnavailableError))  # fmt: skip
                with self._lock:
                    self._refused = f"the audit trail could not record the newest result ({exc})"
                return None
            if self._refusals and recorded is not False:  # a skipped result proves nothing
                log.warning("the audit trail records again; %d results were withheld meanwhile",
                            self._refusals)  # fmt: skip
                self._refusals = 0
            timings[self.audit.name] = (time.perf_counter() - started) * 1000.0
        finished = time.monotonic()
        timings["end_to_end"] = (finished - result.frame.captured_monotonic) * 1000.0
        return replace(result, timings_ms={**result.timings_ms, **timings},
                       finished_monotonic=finished)  # fmt: skip

    def _detect_region(self, image: np.ndarray) -> None:
        """Detect the imaging region once, on the first frame; fall back to the whole frame, loudly."""
        self.auto_region = False
        region: Region | None = detect_imaging_region(image)
        if region is None:
            self.region_note = "auto-detection found no imaging region; using the whole frame"
            log.warning("imaging region: %s", self.region_note)
            return
        self.classifier.region = region
        self.region_note = "detected on the first frame"
        log.info(
            "imaging region detected: x=%d y=%d w=%d h=%d", region.x, region.y, region.w, region.h
        )

    # -- what the screen may show ----------------------------------------------------------------
    def latest(self) -> LiveResult | None:
        """The newest result the audit trail accepted."""
        with self._lock:
            return self._latest

    def handoff_ms(self, sequence: int) -> dict[str, float]:
        """How long each sink after the audit trail took with result `sequence` (the screens'
        and the statistics' hand-off times); empty until they all had it, or once it is old."""
        with self._lock:
            handed, times = self._handoff
            return dict(times) if handed == sequence else {}

    def feed(self) -> FeedState:
        return self.reader.state()

    def display(self) -> Display:
        """What a screen may show now; the frame, region and decision it describes are all from
        `Display.result`, one result."""
        feed = self.reader.state()
        result = self.latest()
        refused = self._refused  # read after it: a result published since has cleared it
        if not feed.ok:
            detail = f" ({feed.detail})" if feed.detail else ""
            reason = (
                "waiting for the first frame"
                if feed.status == "starting"
                else f"{feed.status} feed{detail}"
            )
            return Display(None, None, reason, result)
        if result is None:
            return Display(None, None, "waiting for the first frame", None)
        if refused is not None:
            return Display(None, None, refused, result)
        age = time.monotonic() - result.frame.captured_monotonic
        if age > self.max_result_age:
            return Display(None, None, f"newest result is {age:.1f} s old", result)
        if result.smoothed.label is None:
            return Display(None, None, result.decision.quality.reason or "no decision", result)
        return Display(result.smoothed.label, result.smoothed.probabilities, None, result,
                       result.decision.unreliable)  # fmt: skip

    @property
    def counts(self) -> dict[str, int]:
        return self.statistics.counts

    def summary(self) -> dict[str, Any]:
        """Counts and rates, for /v1/status and /metrics."""
        return self.statistics.summary()
