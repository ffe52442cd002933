"""Honest timing: warm-up, perf_counter around each call (with a device sync when one is given),
percentiles and tails, throughput, process CPU time per call, and real-time headroom."""

from __future__ import annotations

import resource
import time
from collections.abc import Callable

import numpy as np


def time_call(
    fn: Callable[[], object],
    warmup: int,
    iterations: int,
    sync: Callable[[], object] | None = None,
    items_per_call: int = 1,
) -> dict[str, float]:
    """Percentiles (ms) of `iterations` calls after `warmup`; throughput in items/s; CPU ms per call."""
    for _ in range(warmup):
        fn()
    if sync:
        sync()
    samples = np.empty(iterations)
    cpu_start = time.process_time()
    for k in range(iterations):
        start = time.perf_counter()
        fn()
        if sync:
            sync()
        samples[k] = time.perf_counter() - start
    cpu = (time.process_time() - cpu_start) / iterations
    ms = samples * 1e3
    return {
        "p50_ms": float(np.percentile(ms, 50)),
        "p90_ms": float(np.percentile(ms, 90)),
        "p99_ms": float(np.percentile(ms, 99)),
        "max_ms": float(ms.max()),
        "per_s": float(items_per_call * 1e3 / ms.mean()),
        "cpu_ms": cpu * 1e3,
        "iterations": iterations,
    }


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports kB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def realtime_headroom(
    process: Callable[[], object], fps: float, seconds: float
) -> dict[str, float]:
    """Feed `process` one frame every 1/fps s for `seconds`, like a scanner; report the share of one
    core used, frames finished after the next one arrived (late), and frames skipped because the
    previous one was still running (dropped: the live reader keeps only the newest)."""
    period = 1.0 / fps
    frames = int(seconds * fps)
    late = dropped = processed = 0
    cpu_start, wall_start = time.process_time(), time.monotonic()
    next_arrival = wall_start
    for k in range(frames):
        arrival = wall_start + k * period
        if arrival < next_arrival - 1e-9:
            dropped += 1  # still busy when this frame came: the newest-frame reader skips it
            continue
        delay = arrival - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        process()
        processed += 1
        finished = time.monotonic()
        if finished > arrival + period:
            late += 1
        next_arrival = finished
    wall = time.monotonic() - wall_start
    return {
        "fps": fps,
        "frames": frames,
        "processed": processed,
        "late": late,
        "dropped": dropped,
        "core_fraction": (time.process_time() - cpu_start) / wall,
    }
