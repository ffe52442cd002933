"""Live feeds: the newest frame only, never the same frame twice, and a watchdog that speaks up.

OpenCV and V4L2 buffer several frames by default; classifying a buffered frame during a live scan
shows the clinician a result for where the probe *was*. `LiveReader` reads the source on its own
thread and keeps only the newest frame; `latest()` hands each frame out at most once, with its
capture time so its age is known. Frames nobody took in time are counted as dropped.

The watchdog reports, within `stall_seconds`, a source that stops delivering (unplugged card,
hung driver), a frozen feed (identical frames for `freeze_seconds`), and garbage (not an image).
A failing source is closed and reopened with exponential back-off; a read that hangs past
`hang_seconds` is abandoned (a blocked driver call cannot be interrupted) and a fresh source is
opened from the factory. Whoever shows results withdraws them while `state().ok` is False.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from edgebc.sources import Frame, FrameSource

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FeedState:
    status: str  # starting | ok | stalled | frozen | garbage | reopening | ended | stopped
    detail: str
    frames: int
    dropped: int
    reopenings: int
    last_frame_age: float | None

    @property
    def ok(self) -> bool:
        return self.status == "ok"


class LiveReader:
    def __init__(
        self,
        source_factory: Callable[[], FrameSource],
        stall_seconds: float = 1.0,
        freeze_seconds: float = 1.0,
        hang_seconds: float = 5.0,
        backoff: tuple[float, float] = (0.25, 8.0),
    ) -> None:
        self._factory = source_factory
        self.stall_seconds, self.freeze_seconds, self.hang_seconds = (
            stall_seconds,
            freeze_seconds,
            hang_seconds,
        )
        self._backoff = backoff
        self._lock = threading.Condition()
        self._newest: Frame | None = None
        self._taken = True
        self._last_index_given = -1
        self._generation = 0
        self._stop = threading.Event()
        self._status, self._detail = "starting", ""
        self._frames = self._dropped = self._reopenings = 0
        self._last_frame_at: float | None = None
        self._started_at = time.monotonic()
        self._identical_since: float | None = None
        self._previous: np.ndarray | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> LiveReader:
        self._spawn()
        return self

    def stop(self, timeout: float = 2.0) -> None:
        """Stop reading and release the source (waits up to `timeout` for the worker)."""
        self._stop.set()
        with self._lock:
            self._status, self._detail = "stopped", ""
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        """True while this reader's worker thread runs."""
        return self._thread is not None and self._thread.is_alive()

    def latest(self, timeout: float = 1.0) -> Frame | None:
        """The newest frame not handed out before, waiting up to `timeout`; None if none came."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._taken or self._newest is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._stop.is_set():
                    self._check_hang()
                    return None
                self._lock.wait(min(remaining, 0.1))
            self._taken = True
            self._last_index_given = self._newest.index
            return self._newest

    def state(self) -> FeedState:
        """What the feed is doing now, with the watchdog's verdict."""
        self._check_hang()
        now = time.monotonic()
        with self._lock:
            status, detail = self._status, self._detail
            age = None if self._last_frame_at is None else now - self._last_frame_at
            reference = self._last_frame_at if self._last_frame_at is not None else self._started_at
            if status in ("ok", "starting") and now - reference > self.stall_seconds:
                status, detail = "stalled", f"no frame for {now - reference:.1f} s"
            return FeedState(status, detail, self._frames, self._dropped, self._reopenings, age)

    def _spawn(self) -> None:
        self._generation += 1
        self._thread = threading.Thread(
            target=self._run, args=(self._generation,), name="edgebc-live-reader", daemon=True
        )
        self._thread.start()

    def _check_hang(self) -> None:
        """Abandon a worker stuck inside read() and start a fresh one with a new source."""
        now = time.monotonic()
        with self._lock:
            reference = self._last_frame_at if self._last_frame_at is not None else self._started_at
            # Only a worker inside read() or open() can hang; one backing off between reopenings is fine.
            if (
                self._stop.is_set()
                or self._status not in ("ok", "starting")
                or now - reference < self.hang_seconds
            ):
                return
            self._reopenings += 1
            self._status, self._detail = (
                "reopening",
                f"read hung for {now - reference:.1f} s; opening the source again",
            )
            self._last_frame_at = now  # give the new worker its own hang window
            log.warning("live source hung; starting a fresh reader")
            self._spawn()

    def _set(self, status: str, detail: str = "") -> None:
        with self._lock:
            before, self._status, self._detail = self._status, status, detail
        self._log_change(before, status, detail)

    def _log_change(self, before: str, now: str, detail: str) -> None:
        """One edgebc line when the feed's state changes, not one per failed attempt: a missing
        device is said once, with why, and so is its return."""
        if before == now or now in ("starting", "stopped"):
            return
        if now == "ok":
            if before != "starting":
                log.info("source delivers frames again (it was %s)", before)
        elif now == "ended":
            log.info("source ended: %s", detail)
        else:
            log.warning("source %s: %s", now, detail)

    def _run(self, generation: int) -> None:
        source: FrameSource | None = None
        delay = self._backoff[0]
        while not self._stop.is_set() and generation == self._generation:
            try:
                if source is None:
                    source = self._factory()
                    source.open()
                    delay = self._backoff[0]
                started = time.perf_counter()
                frame = source.read()
                if frame is not None:
                    frame = dataclasses.replace(
                        frame, read_ms=(time.perf_counter() - started) * 1000.0
                    )
            except (
                Exception
            ) as exc:  # a failing source must not kill the reader: report, back off, reopen
                self._set("reopening", str(exc))
                with self._lock:
                    self._reopenings += 1
                if source is not None:
                    _close_quietly(source)
                    source = None
                self._stop.wait(delay)
                delay = min(delay * 2, self._backoff[1])
                continue
            if generation != self._generation:
                break
            if frame is None:
                self._set("ended", "the source has no more frames")
                break
            self._publish(frame)
        if source is not None:
            _close_quietly(source)

    def _publish(self, frame: Frame) -> None:
        image = frame.image
        now = time.monotonic()
        if (
            not isinstance(image, np.ndarray)
            or image.size == 0
            or image.ndim not in (2, 3)
            or image.dtype not in (np.uint8, np.uint16)
        ):
            self._set(
                "garbage",
                f"source returned {type(image).__name__} {getattr(image, 'shape', '')} {getattr(image, 'dtype', '')}",
            )
            return
        with self._lock:
            before = self._status
            self._last_frame_at = now
            if self._previous is not None and same_picture(self._previous, image):
                self._identical_since = self._identical_since or now
                if now - self._identical_since >= self.freeze_seconds:
                    self._status, self._detail = (
                        "frozen",
                        f"identical frames for {now - self._identical_since:.1f} s",
                    )
                status, detail = self._status, self._detail
            else:
                self._identical_since = None
                self._previous = image
                if not self._taken:
                    self._dropped += 1
                self._newest, self._taken = frame, False
                self._frames += 1
                self._status, self._detail = status, detail = "ok", ""
                self._lock.notify_all()
        self._log_change(before, status, detail)  # an identical frame is never classified again


def same_picture(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two frames are identical, pixel for pixel. Eight whole rows are compared first:
    live frames differ nearly everywhere (speckle, capture noise), so that settles almost every
    pair for a hundredth of the cost of comparing whole 1080p frames (0.2-0.3 ms a frame, about
    1 % of a core at 30 fps); only frames equal on those rows are compared whole."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    rows = slice(None, None, max(1, a.shape[0] // 8))  # whole rows: contiguous, cheap to read
    return bool(np.array_equal(a[rows], b[rows]) and np.array_equal(a, b))


def _close_quietly(source: FrameSource) -> None:
    try:
        source.close()
    except Exception as exc:
        log.debug("closing %s failed: %s", getattr(source, "name", source), exc)
