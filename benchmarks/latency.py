"""Latency of every pipeline stage edgebc has, on capture-sized frames, timed honestly.

Run: `python benchmarks/latency.py [--quick] [--json out.json]`. Each stage is warmed up, then
timed with perf_counter over enough iterations for stable tails; p50/p90/p99/max, throughput and
process CPU time per frame are reported with a machine description. Ratios against a baseline
measured in the same process (a plain float64 numpy resize+normalise, the way a notebook
writes it) are what to compare across machines, not absolute numbers.
Stages so far: PNG/JPEG decode, imaging-region detection, crop + preprocessing. Model inference
and the full serve loop join as the runtime lands.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

from edgebc import __version__, sysinfo
from edgebc.decode import decode_image
from edgebc.preprocess import PreprocessCard, preprocess
from edgebc.region import detect_imaging_region
from edgebc.synth import make_ultrasound_phantom, render_scanner_screen
from edgebc.synth.ultrasound import phantom_rng


def time_stage(fn: Callable[[], object], warmup: int, iterations: int) -> dict[str, float]:
    """Percentiles (ms) of `iterations` calls after `warmup`, and CPU ms per call."""
    for _ in range(warmup):
        fn()
    samples = np.empty(iterations)
    cpu_start = time.process_time()
    for k in range(iterations):
        start = time.perf_counter()
        fn()
        samples[k] = time.perf_counter() - start
    cpu = (time.process_time() - cpu_start) / iterations
    ms = samples * 1e3
    return {
        "p50_ms": float(np.percentile(ms, 50)),
        "p90_ms": float(np.percentile(ms, 90)),
        "p99_ms": float(np.percentile(ms, 99)),
        "max_ms": float(ms.max()),
        "per_s": float(1e3 / ms.mean()),
        "cpu_ms": cpu * 1e3,
        "iterations": iterations,
    }


def naive_preprocess(frame: np.ndarray, card: PreprocessCard) -> np.ndarray:
    """The notebook way: float64 first, then resize and normalise (the same maths, slower order)."""
    grey = cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY).astype(np.float64) / 255.0
    resized = cv2.resize(grey, (card.input_width, card.input_height), interpolation=cv2.INTER_AREA)
    return ((resized - card.mean[0]) / card.std[0])[None, None].astype(np.float32)


def run(quick: bool) -> dict[str, object]:
    cv2.setNumThreads(1)
    warmup, iterations = (5, 50) if quick else (20, 500)
    card = PreprocessCard(resize="stretch")
    results: dict[str, dict[str, float]] = {}
    for height, width in ((1080, 1920), (480, 640)):
        phantom = make_ultrasound_phantom("malignant", phantom_rng(0, 0), 400, 480).image
        screen, region = render_scanner_screen(phantom, phantom_rng(0, 1), height, width)
        png = cv2.imencode(".png", screen)[1].tobytes()
        jpeg = cv2.imencode(".jpg", screen, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()
        tag = f"{width}x{height}"
        results[f"decode_png_{tag}"] = time_stage(
            lambda png=png: decode_image(png), warmup, iterations // 5
        )
        results[f"decode_jpeg_{tag}"] = time_stage(
            lambda jpeg=jpeg: decode_image(jpeg), warmup, iterations
        )
        results[f"detect_region_{tag}"] = time_stage(
            lambda s=screen: detect_imaging_region(s), warmup, iterations // 5
        )
        results[f"crop_preprocess_{tag}"] = time_stage(
            lambda s=screen, r=region: preprocess(s, card, r), warmup, iterations
        )
        results[f"baseline_naive_{tag}"] = time_stage(
            lambda s=screen, r=region: naive_preprocess(r.crop(s), card), warmup, iterations
        )
    ratios = {
        tag: results[f"baseline_naive_{tag}"]["p50_ms"]
        / results[f"crop_preprocess_{tag}"]["p50_ms"]
        for tag in ("1920x1080", "640x480")
    }
    return {
        "edgebc": __version__,
        "python": platform.python_version(),
        "opencv": cv2.__version__,
        "numpy": np.__version__,
        "cpu": sysinfo.cpu_description(),
        "opencv_threads": 1,
        "stages": results,
        "speedup_vs_naive_p50": ratios,
    }


def to_markdown(report: dict[str, object]) -> str:
    stages = report["stages"]
    assert isinstance(stages, dict)
    lines = [
        "| stage | p50 ms | p90 ms | p99 ms | max ms | per s | CPU ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in stages.items():
        lines.append(
            f"| {name} | {r['p50_ms']:.3f} | {r['p90_ms']:.3f} | {r['p99_ms']:.3f} | {r['max_ms']:.3f} | {r['per_s']:.0f} | {r['cpu_ms']:.3f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="few iterations, for a smoke run (under a minute)"
    )
    parser.add_argument(
        "--json", type=Path, default=None, help="also write the full report as JSON here"
    )
    args = parser.parse_args(argv)
    report = run(args.quick)
    print(to_markdown(report))
    print(f"\nCPU: {report['cpu']}; OpenCV {report['opencv']} with 1 thread")
    print(
        "crop+preprocess speed-up over the naive float64 order (p50): "
        + ", ".join(f"{k}: {v:.1f}x" for k, v in report["speedup_vs_naive_p50"].items())
    )  # type: ignore[union-attr]
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
