"""The live loop of the cart: read the newest frame -> classify -> smooth -> hand the result to each sink.

One thread takes the newest frame from a `LiveReader` (never a stale or repeated one), classifies
it (region crop, quality gate, shared preprocessing, inference, calibrated probabilities), folds
it into the temporal smoother and hands the `LiveResult` to each `Sink`: the page broadcast, a
local display, the audit trail, the statistics (edgebc/serve/sinks.py). `display()` is what a
screen may show *now*: a decision is withdrawn, with the reason in words, whenever the feed is not
delivering (stalled, frozen, garbage, reopening), the frame failed the quality gate, or the newest
result is older than `max_result_age`. Nothing here imports a web framework.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from edgebc.classifier import Decision, FrameClassifier, rounded_ms
from edgebc.live import FeedState, LiveReader
from edgebc.quality import QualityResult
from edgebc.region import Region, detect_imaging_region
from edgebc.serve.sinks import LiveStatistics
from edgebc.smoothing import Smoothed, SmoothingConfig, TemporalSmoother
from edgebc.sources import Frame

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LiveResult:
    """One classified frame: the per-frame decision, the smoothed one, and where the time went.

    `timings_ms` gains each sink's hand-off time (under the sink's name) as the result passes
    them; the statistics, the last sink, see them all."""

    sequence: int
    frame: Frame
    decision: Decision
    smoothed: Smoothed
    frame_sha256: str
    timings_ms: dict[str, float]
    finished_monotonic: float

    def to_json(self) -> dict[str, Any]:
        """The decision's JSON (`Decision.to_json()`) with the loop's timings, the smoothed
        decision and the frame it was made on."""
        height, width = self.frame.image.shape[:2]
        frame = {"sequence": self.sequence, "index": self.frame.index, "captured_at": self.frame.captured,
                 "width": width, "height": height, "sha256": self.frame_sha256, "source": self.frame.source}  # fmt: skip
        return {
            **self.decision.to_json(),
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
    `close` runs once when the service stops."""

    name: str  # the stage its hand-off time is reported under

    def handle(self, result: LiveResult) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class Display:
    """What the screen may show now: a label, or no decision and the reason why."""

    label: str | None
    probabilities: dict[str, float] | None
    reason: str | None
    result: LiveResult | None


class LivePipeline:
    def __init__(
        self,
        classifier: FrameClassifier,
        reader: LiveReader,
        sinks: Sequence[Sink] = (),
        smoothing: SmoothingConfig | None = None,
        auto_region: bool = False,
        max_result_age: float = 1.0,
    ) -> None:
        """Results go to `sinks` in order, then to the pipeline's own statistics."""
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
        self.sinks: list[Sink] = [*sinks, self.statistics]
        self._latest: LiveResult | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="edgebc-live-pipeline", daemon=True)
        self._sequence = 0
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
                decision = self._classify(frame)
                result = self._smooth(frame, decision, waited_ms)
            except Exception:  # the loop outlives any one frame: counted and logged
                self.statistics.failed()
                log.exception("frame %s from %s could not be processed", frame.index, frame.source)
                continue
            self._hand_over(result)

    def _read_newest(self) -> tuple[Frame | None, float]:
        waited = time.perf_counter()
        frame = self.reader.latest(timeout=0.1)
        if frame is None and not self.reader.state().ok:
            self.smoother.reset()  # a gap in the feed must not be averaged across
        return frame, (time.perf_counter() - waited) * 1000.0

    def _classify(self, frame: Frame) -> Decision:
        if self.auto_region and self.classifier.region is None:
            self._detect_region(frame.image)
        try:
            return self.classifier.classify(frame.image)
        except ValueError as exc:  # the region no longer fits: capture resolution changed
            return Decision(None, None, None, self.classifier.threshold,
                            QualityResult(False, str(exc)), self.classifier.backend.model_sha256)  # fmt: skip

    def _smooth(self, frame: Frame, decision: Decision, waited_ms: float) -> LiveResult:
        started = time.perf_counter()
        smoothed = self.smoother.update(decision.probabilities, frame.captured_monotonic)
        timings = {"capture_wait": waited_ms, "read": frame.read_ms, **decision.timings_ms,
                   "smoothing": (time.perf_counter() - started) * 1000.0}  # fmt: skip
        digest = hashlib.sha256(np.ascontiguousarray(frame.image).data).hexdigest()
        finished = time.monotonic()
        timings["end_to_end"] = (finished - frame.captured_monotonic) * 1000.0
        self._sequence += 1
        return LiveResult(self._sequence, frame, decision, smoothed, digest, timings, finished)

    def _hand_over(self, result: LiveResult) -> None:
        with self._lock:
            self._latest = result
        for sink in self.sinks:
            started = time.perf_counter()
            try:
                sink.handle(result)
            except Exception:  # one sink failing must not keep the result from the others
                self.statistics.failed()
                log.exception("the %s sink failed on frame %s", sink.name, result.frame.index)
            result.timings_ms[sink.name] = (time.perf_counter() - started) * 1000.0

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
        with self._lock:
            return self._latest

    def feed(self) -> FeedState:
        return self.reader.state()

    def display(self) -> Display:
        feed = self.reader.state()
        result = self.latest()
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
        age = time.monotonic() - result.frame.captured_monotonic
        if age > self.max_result_age:
            return Display(None, None, f"newest result is {age:.1f} s old", result)
        if result.smoothed.label is None:
            return Display(None, None, result.decision.quality.reason or "no decision", result)
        return Display(result.smoothed.label, result.smoothed.probabilities, None, result)

    @property
    def counts(self) -> dict[str, int]:
        return self.statistics.counts

    def summary(self) -> dict[str, Any]:
        """Counts and rates, for /v1/status and /metrics."""
        return self.statistics.summary()
