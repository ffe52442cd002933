"""Honest timing: warm-up, perf_counter around each call (with a device sync when one is given),
percentiles and tails, throughput, process CPU time per call, variants compared interleaved, the
machine's load around a run, and real-time headroom."""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

# Load average per core (other processes' runnable threads) above which a run's timings are
# flagged: on a shared core the wall times stretch, only ratios of interleaved variants hold.
BUSY_LOAD_PER_CORE = 0.5


@dataclass(frozen=True)
class Variant:
    """One of the things compared in an interleaved timing."""

    call: Callable[[], object]
    sync: Callable[[], object] | None = None
    items_per_call: int = 1


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
    return summary(samples * 1e3, cpu * 1e3, items_per_call)


def summary(ms: np.ndarray, cpu_ms: float, items_per_call: int = 1) -> dict[str, float]:
    """The statistics a timing reports of its calls' milliseconds and mean CPU ms per call."""
    return {
        "p50_ms": float(np.percentile(ms, 50)),
        "p90_ms": float(np.percentile(ms, 90)),
        "p99_ms": float(np.percentile(ms, 99)),
        "max_ms": float(ms.max()),
        "per_s": float(items_per_call * 1e3 / ms.mean()),
        "cpu_ms": float(cpu_ms),
        "iterations": len(ms),
    }


def time_interleaved(
    variants: Mapping[str, Variant],
    warmup: int,
    iterations: int,
    block: int = 5,
    pace: float = 0.0,
) -> dict[str, dict[str, float]]:
    """Time the variants in blocks, A B C, B C A, C A B, ... (the order rotated every round), so
    a change in the machine's load falls on all of them alike and their ratios hold; per variant
    the statistics of `time_call`, CPU time measured around each call. Each block is `block`
    consecutive calls of one variant, its first left out: alternating single calls would time
    every model with the cache the others left (measured: ONNX Runtime FP32 1.01 vs 0.85 ms warm,
    OpenVINO BF16 1.04 vs 0.68 ms, which reverses their order), while a cart runs one model.

    `pace` > 0: the calls of a block start `1 / pace` s apart (the first one period after the
    block begins), as a live source delivers frames; a call that overruns its period is followed
    at once by the next, and the schedule restarts from there (a live reader hands over the newest
    frame, not a backlog); 0: back to back. Not the same figure: between frames at 30 fps the core
    idles and each call starts cold, and runtimes differ in what that costs them (measured:
    OpenVINO BF16 0.70 vs ONNX Runtime FP32 0.90 ms back to back, 2.15 vs 1.61 at 30 fps,
    docs/EXPORT.md)."""
    if not 0 <= pace < float("inf"):  # NaN too
        raise ValueError(f"pace is calls per second (0: back to back), got {pace}")
    period = 1.0 / pace if pace else 0.0
    names = list(variants)
    for variant in variants.values():
        for _ in range(warmup):
            variant.call()
        if variant.sync:
            variant.sync()
    wall = {name: np.empty(iterations) for name in names}
    cpu = {name: np.empty(iterations) for name in names}
    kept = max(1, block - 1)  # timed calls per block
    done = 0
    for k in range(-(-iterations // kept)):
        shift = k % len(names)
        for name in names[shift:] + names[:shift]:
            variant = variants[name]
            tick = time.perf_counter()
            for call in range(kept + (block > 1)):
                if period:  # the next frame's arrival; after a late call, the newest frame now
                    tick = max(tick + period, time.perf_counter())
                    time.sleep(max(0.0, tick - time.perf_counter()))
                cpu_start, start = time.process_time(), time.perf_counter()
                variant.call()
                if variant.sync:
                    variant.sync()
                elapsed, used = time.perf_counter() - start, time.process_time() - cpu_start
                index = done + call - (block > 1)
                if (call or block == 1) and index < iterations:
                    wall[name][index], cpu[name][index] = elapsed, used
        done += kept
    return {name: summary(wall[name] * 1e3, cpu[name].mean() * 1e3, variants[name].items_per_call)
            for name in names}  # fmt: skip


def load_per_core() -> float | None:
    """The 1-minute load average per logical core, or None where the system has none."""
    try:
        return os.getloadavg()[0] / (os.cpu_count() or 1)
    except OSError:
        return None


def busy_warning(
    before: float | None, after: float | None, own_threads_per_core: float
) -> str | None:
    """Why a run's timings are suspect, or None. `before` and `after` are load per core around the
    run; the run's own threads count in `after` (one busy thread on a 2-core machine: 0.5), so
    they are taken off it before it is compared with BUSY_LOAD_PER_CORE."""
    seen = [
        value
        for value in (before, None if after is None else after - own_threads_per_core)
        if value is not None
    ]
    if not seen or max(seen) <= BUSY_LOAD_PER_CORE:
        return None
    return (
        f"busy machine: load average {max(seen):.2f} per core from other processes "
        f"(before {_or_unknown(before)}, after {_or_unknown(after)} including this run's "
        f"{own_threads_per_core:.2f}); wall times are inflated, compare only the ratios of "
        "interleaved variants"
    )


def _or_unknown(value: float | None) -> str:
    return "unknown" if value is None else f"{value:.2f}"


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
