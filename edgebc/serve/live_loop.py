"""The live loop of the cart: newest frame -> decision -> smoothed display -> audit trail.

One thread takes the newest frame from a `LiveReader` (never a stale or repeated one), classifies
it (region crop, quality gate, shared preprocessing, inference, calibrated probabilities),
folds it into the temporal smoother and queues an audit record. `view()` is what the screen
may show *now*: a decision is withdrawn, with the reason in words, whenever the feed is not
delivering (stalled, frozen, garbage, reopening), the frame failed the quality gate, or the
newest result is older than `max_result_age`. Nothing here imports a web framework, so the
same loop can drive another display.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgebc.audit_trail import AuditTrail, record_of
from edgebc.classifier import Decision, FrameClassifier
from edgebc.live import FeedState, LiveReader
from edgebc.quality import QualityResult
from edgebc.region import Region, detect_imaging_region
from edgebc.smoothing import Smoothed, SmoothingConfig, TemporalSmoother
from edgebc.sources import Frame

log = logging.getLogger(__name__)

STAGES = (
    "capture_wait",
    "read",
    "crop",
    "quality",
    "preprocess",
    "inference",
    "postprocess",
    "smoothing",
    "audit",
    "end_to_end",
)


@dataclass(frozen=True)
class LiveResult:
    """One classified frame: the per-frame decision, the smoothed one, and where the time went."""

    sequence: int
    frame: Frame
    decision: Decision
    smoothed: Smoothed
    frame_sha256: str
    timings_ms: dict[str, float]
    finished_monotonic: float


class RollingStats:
    """Frame rate and latency percentiles over the last `window` results (seconds and ms)."""

    def __init__(self, window: int = 600) -> None:
        self._results: deque[tuple[float, dict[str, float]]] = deque(maxlen=window)
        self._lock = threading.Lock()

    def add(self, finished: float, timings_ms: dict[str, float]) -> None:
        with self._lock:
            self._results.append((finished, timings_ms))

    def fps(self, now: float, span: float = 2.0) -> float:
        with self._lock:
            times = [t for t, _ in self._results if now - t <= span]
        if len(times) < 2:
            return 0.0
        return (len(times) - 1) / max(times[-1] - times[0], 1e-9)

    def percentiles(
        self, stage: str, quantiles: tuple[float, ...] = (0.5, 0.9, 0.99)
    ) -> dict[str, float] | None:
        with self._lock:
            values = sorted(t[stage] for _, t in self._results if stage in t)
        if not values:
            return None
        out = {
            f"p{round(q * 100)}": values[min(len(values) - 1, int(q * len(values)))]
            for q in quantiles
        }
        out["max"] = values[-1]
        return out


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
        audit: AuditTrail | None = None,
        smoothing: SmoothingConfig | None = None,
        auto_region: bool = False,
        max_result_age: float = 1.0,
    ) -> None:
        self.classifier = classifier
        self.reader = reader
        self.audit = audit
        self.auto_region = auto_region
        self.region_note = "configured" if classifier.region else "whole frame"
        self.max_result_age = max_result_age
        card = classifier.card
        self.smoother = TemporalSmoother(
            card.class_names, card.positive_class, classifier.threshold, smoothing
        )
        self.stats = RollingStats()
        self.counts: dict[str, int] = {"frames": 0, "decided": 0, "no_decision": 0, "errors": 0}
        self.label_counts: dict[str, int] = dict.fromkeys(card.class_names, 0)
        self._latest: LiveResult | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._listeners: list[Callable[[], object]] = []
        self._thread = threading.Thread(target=self._run, name="edgebc-live-pipeline", daemon=True)
        self._sequence = 0
        self.last_beat = time.monotonic()  # each turn of the loop; the systemd watchdog reads it

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> LivePipeline:
        self.reader.start()
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the loop, release the source, and commit every queued audit record."""
        self._stop.set()
        self._thread.join(timeout)
        self.reader.stop()
        if self.audit is not None:
            self.audit.close(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def add_listener(self, callback: Callable[[], object]) -> None:
        """Call `callback` (from the pipeline thread; keep it cheap) after every new result."""
        self._listeners.append(callback)

    def remove_listener(self, callback: Callable[[], object]) -> None:
        if callback in self._listeners:
            self._listeners.remove(callback)

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

    # -- the loop --------------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            self.last_beat = time.monotonic()
            waited = time.perf_counter()
            frame = self.reader.latest(timeout=0.1)
            if frame is None:
                if not self.reader.state().ok:
                    self.smoother.reset()  # a gap in the feed must not be averaged across
                continue
            try:
                self._process(frame, (time.perf_counter() - waited) * 1000.0)
            except (
                Exception
            ):  # the loop must outlive any one frame; the error is counted and logged
                self.counts["errors"] += 1
                log.exception("frame %s from %s could not be processed", frame.index, frame.source)

    def _process(self, frame: Frame, waited_ms: float) -> None:
        if self.auto_region and self.classifier.region is None:
            self._detect_region(frame.image)
        try:
            decision = self.classifier.classify(frame.image)
        except ValueError as exc:  # the region no longer fits: capture resolution changed
            decision = Decision(
                None,
                None,
                None,
                self.classifier.threshold,
                QualityResult(False, str(exc)),
                self.classifier.backend.model_sha256,
            )
        clock = time.perf_counter()
        smoothed = self.smoother.update(decision.probabilities, frame.captured_monotonic)
        smoothed_at = time.perf_counter()
        digest = hashlib.sha256(np.ascontiguousarray(frame.image).data).hexdigest()
        timings = {
            "capture_wait": waited_ms,
            "read": frame.read_ms,
            **decision.timings_ms,
            "smoothing": (smoothed_at - clock) * 1000.0,
        }
        if self.audit is not None:
            self.audit.record(
                record_of(
                    decision,
                    smoothed_decision=smoothed.label,
                    captured_at=frame.captured,
                    source=frame.source,
                    frame_index=frame.index,
                    frame_sha256=digest,
                    latencies_ms=timings,
                    pixels=frame.image if self.audit.store_pixels else None,
                )
            )
        finished = time.monotonic()
        timings["audit"] = (time.perf_counter() - smoothed_at) * 1000.0
        timings["end_to_end"] = (finished - frame.captured_monotonic) * 1000.0
        self.stats.add(finished, timings)
        self.counts["frames"] += 1
        if decision.label is None:
            self.counts["no_decision"] += 1
        else:
            self.counts["decided"] += 1
            self.label_counts[decision.label] += 1
        with self._lock:
            self._sequence += 1
            self._latest = LiveResult(
                self._sequence, frame, decision, smoothed, digest, timings, finished
            )
        for callback in list(self._listeners):
            callback()

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

    def summary(self) -> dict[str, Any]:
        """Counts and rates, for /v1/status and /metrics."""
        now = time.monotonic()
        return {
            "fps": round(self.stats.fps(now), 2),
            "latency_ms": {stage: self.stats.percentiles(stage) for stage in STAGES},
            "counts": dict(self.counts),
            "decisions_by_class": dict(self.label_counts),
        }
