"""Where the live loop's results go: the audit trail, the page broadcast and the statistics.

Each is a `Sink` (edgebc/serve/live_loop.py): `handle(result)` on the loop's thread for every
result, quick (queue a record, wake the pages, count), and `close()` once at shutdown. The audit
sink is handed each result first, and an exception from it withdraws the result; the local
display (edgebc/serve/display.py) is another sink.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from edgebc.audit_trail import AuditTrail, described_source, record_of

if TYPE_CHECKING:
    from edgebc.serve.live_loop import LiveResult

# The stages whose latency percentiles the statistics report (/v1/status, /metrics).
STAGES = (
    "capture_wait",
    "read",
    "crop",
    "quality",
    "preprocess",
    "inference",
    "shift",
    "postprocess",
    "smoothing",
    "audit",
    "end_to_end",
)


class AuditSink:
    """Every result into the audit trail (`record="every_frame"`), or only the results whose
    displayed state changed plus one every `sample_interval_s` (`"changes"`): queued here,
    committed by the trail's own thread. The displayed state is what a clinician could have acted
    on: the smoothed decision, the frame's quality verdict and the shift check's action."""

    name = "audit"

    def __init__(self, trail: AuditTrail, source_names: str = "hash", record: str = "every_frame",
                 sample_interval_s: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:  # fmt: skip
        if record not in ("every_frame", "changes"):
            raise ValueError(f"audit.record is 'every_frame' or 'changes', not {record!r}")
        self.trail = trail
        self.source_names = source_names
        self.record = record
        self.sample_interval_s = sample_interval_s
        self._clock = clock
        self._last: tuple[Any, ...] | None = None  # the displayed state last recorded
        self._last_at = 0.0
        self.skipped = 0  # results not recorded ("changes": nothing changed, no sample due)

    def _due(self, result: LiveResult) -> bool:
        if self.record == "every_frame":
            return True
        state = (result.smoothed.label, str(result.decision.quality), result.decision.shift_action,
                 repr(result.context))  # fmt: skip
        now = self._clock()
        if state != self._last or now - self._last_at >= self.sample_interval_s:
            return True
        self.skipped += 1
        return False

    def handle(self, result: LiveResult) -> bool:
        """Record the result when it is due; whether it was recorded (False: skipped, "changes")."""
        if not self._due(result):
            return False
        frame = result.frame
        source = described_source(frame.source, self.source_names)
        if result.context is not None:  # a fusion model's: the case and mammograms it used, too
            source = json.dumps({"frame": source, **result.context}, separators=(",", ":"))
        self.trail.record(
            record_of(
                result.decision,
                smoothed_decision=result.smoothed.label,
                captured_at=frame.captured,
                source=source,
                frame_index=frame.index,
                frame_sha256=result.frame_sha256,
                latencies_ms=dict(result.timings_ms),
                pixels=frame.image if self.trail.store_pixels else None,
            )
        )
        # only once the trail took it: a withheld record is tried again with the next frame
        self._last = (
            result.smoothed.label,
            str(result.decision.quality),
            result.decision.shift_action,
            repr(result.context),
        )
        self._last_at = self._clock()
        return True

    def close(self) -> None:
        """Commit every queued record."""
        self.trail.close()


class PageBroadcast:
    """Wakes every page watching /v1/live when a result arrives; each then sends the view."""

    name = "broadcast"

    def __init__(self) -> None:
        self._wakers: list[Callable[[], object]] = []
        self._lock = threading.Lock()

    def subscribe(self, wake: Callable[[], object]) -> None:
        """`wake` is called from the loop's thread: it must only schedule work, not do it."""
        with self._lock:
            self._wakers.append(wake)

    def unsubscribe(self, wake: Callable[[], object]) -> None:
        with self._lock:
            if wake in self._wakers:
                self._wakers.remove(wake)

    def handle(self, result: LiveResult) -> None:
        with self._lock:
            wakers = list(self._wakers)
        for wake in wakers:
            wake()

    def close(self) -> None:
        with self._lock:
            self._wakers.clear()


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


class LiveStatistics:
    """Counts, frame rate and latency percentiles of the results so far.

    The percentiles (10 stages over 600 results) are computed at most once per result, however
    many pages and scrapes ask: every page watching asks with every frame."""

    name = "statistics"

    def __init__(self, class_names: Sequence[str], window: int = 600) -> None:
        self.rolling = RollingStats(window)
        self.counts: dict[str, int] = {"frames": 0, "decided": 0, "no_decision": 0, "errors": 0,
                                       "out_of_distribution": 0}  # fmt: skip
        self.label_counts: dict[str, int] = dict.fromkeys(class_names, 0)
        self._sequence = 0
        self._latency: tuple[int, dict[str, dict[str, float] | None]] | None = None
        self._lock = threading.Lock()

    def handle(self, result: LiveResult) -> None:
        self.rolling.add(result.finished_monotonic, result.timings_ms)  # never changed: no copy
        self.counts["frames"] += 1
        label = result.decision.label
        if (
            result.decision.shift_action is not None
        ):  # withdrawn or marked: the frame or stream was out
            self.counts["out_of_distribution"] += 1
        if label is None:
            self.counts["no_decision"] += 1
        else:
            self.counts["decided"] += 1
            self.label_counts[label] += 1
        with self._lock:
            self._sequence = result.sequence

    def failed(self) -> None:
        """A frame the loop could not process, or a sink that failed on a result."""
        self.counts["errors"] += 1

    def close(self) -> None:
        """Nothing to release: the numbers stay readable after the loop stops."""

    def latency(self) -> dict[str, dict[str, float] | None]:
        """Per-stage percentiles over the window, computed once per new result."""
        with self._lock:
            if self._latency is None or self._latency[0] != self._sequence:
                computed = {stage: self.rolling.percentiles(stage) for stage in STAGES}
                self._latency = (self._sequence, computed)
            return dict(self._latency[1])

    def summary(self) -> dict[str, Any]:
        """Counts and rates, for /v1/status and /metrics."""
        return {
            "fps": round(self.rolling.fps(time.monotonic()), 2),
            "latency_ms": self.latency(),
            "counts": dict(self.counts),
            "decisions_by_class": dict(self.label_counts),
        }
