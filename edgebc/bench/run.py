"""What `edgebc bench` and `python benchmarks/latency.py` run: stages, backends, pipeline, headroom.

The models are exported files (`BenchModel`); this runs torch-free, on a device as on a
workstation. The development side (benchmarks/latency.py) makes models from the registry and adds
PyTorch rows and the notebook pipeline to them. Every number comes from this process on this
machine.
"""

from __future__ import annotations

import platform
import tempfile
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from edgebc import __version__, sysinfo
from edgebc.bench.backends import BenchModel, candidates, why_unavailable
from edgebc.bench.timing import peak_rss_mb, realtime_headroom, time_call
from edgebc.decode import decode_image
from edgebc.model_card import read_card
from edgebc.preprocess import PreprocessCard, preprocess, preprocess_chw
from edgebc.region import Region, detect_imaging_region
from edgebc.synth import make_ultrasound_phantom, render_scanner_screen
from edgebc.synth.ultrasound import phantom_rng, phantom_stills

FRAME_SIZES = ((1080, 1920), (480, 640))


def screens() -> dict[str, tuple[np.ndarray, Region]]:
    out = {}
    for height, width in FRAME_SIZES:
        phantom = make_ultrasound_phantom("malignant", phantom_rng(0, 0), 400, 480).image
        screen, region = render_scanner_screen(phantom, phantom_rng(0, 1), height, width)
        out[f"{width}x{height}"] = (
            cv2.cvtColor(screen, cv2.COLOR_GRAY2BGR) if screen.ndim == 2 else screen,
            region,
        )
    return out


def naive_preprocess(frame: np.ndarray, prep: PreprocessCard) -> np.ndarray:
    """The notebook way: float64 first, then resize and normalise (the same maths, slower order)."""
    grey = cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY).astype(np.float64) / 255.0
    resized = cv2.resize(grey, (prep.input_width, prep.input_height), interpolation=cv2.INTER_AREA)
    return ((resized - prep.mean[0]) / prep.std[0])[None, None].astype(np.float32)


def stage_timings(
    frames: dict[str, tuple[np.ndarray, Region]], warmup: int, iterations: int
) -> dict[str, Any]:
    prep = PreprocessCard(resize="stretch")  # the stage timings' own fixed preprocessing
    few = max(5, iterations // 5)
    results: dict[str, Any] = {}
    for tag, (screen, region) in frames.items():
        png = cv2.imencode(".png", screen)[1].tobytes()
        jpeg = cv2.imencode(".jpg", screen, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()
        results[f"decode_png_{tag}"] = time_call(partial(decode_image, png), warmup, few)
        results[f"decode_jpeg_{tag}"] = time_call(partial(decode_image, jpeg), warmup, iterations)
        results[f"detect_region_{tag}"] = time_call(
            partial(detect_imaging_region, screen), warmup, few
        )
        results[f"crop_preprocess_{tag}"] = time_call(
            partial(preprocess, screen, prep, region), warmup, iterations
        )
        results[f"baseline_naive_preprocess_{tag}"] = time_call(
            partial(naive_preprocess, region.crop(screen), prep), warmup, iterations
        )
    return results


def model_section(
    model: BenchModel,
    size: int,
    batches: list[int],
    threads: list[int],
    warmup: int,
    iterations: int,
    work: Path | None = None,
) -> dict[str, Any]:
    """Every available backend on the same preprocessed phantom frames, at each batch size; for
    GPU backends also the device memory this process held while it ran."""
    frames, _ = phantom_stills(max(batches), seed=33)
    prep = read_card(model.fp32).preprocess  # the model's own preprocessing, whatever its input
    inputs = np.stack([preprocess_chw(f, prep) for f in frames]).astype(np.float32)
    out: dict[str, Any] = {}
    for candidate in candidates(model, threads, work, max(batches)):
        try:
            loaded = candidate.make()
            reference = loaded.run(inputs[:1])
        except Exception as exc:  # a backend that cannot run this model is reported, not fatal
            out[candidate.name] = {"unavailable": why_unavailable(exc)}
            continue
        rows: dict[str, dict[str, Any]] = {}
        for batch in batches:
            x = np.ascontiguousarray(inputs[:batch])
            try:
                calls = max(20, iterations // batch)  # same number of frames per batch size
                rows[f"b{batch}"] = time_call(
                    partial(loaded.run, x), warmup, calls, getattr(loaded, "sync", None), batch
                )
            except Exception as exc:
                rows[f"b{batch}"] = {"unavailable": why_unavailable(exc)}
        out[candidate.name] = {"batches": rows, "logits_b1": reference[0].tolist()}
        if candidate.gpu:
            out[candidate.name].update(gpu=True, device_memory_mb=sysinfo.process_gpu_memory_mb())
        loaded.close()
    return out


def pipeline_section(
    model: BenchModel,
    frames: dict[str, tuple[np.ndarray, Region]],
    warmup: int,
    iterations: int,
    fps: float,
    seconds: float,
) -> dict[str, Any]:
    """Raw frame to decision through FrameClassifier (one thread), its stages, the real-time
    headroom at `fps`, and the notebook pipeline on the same frame when the model brings one."""
    from edgebc.backends import open_backend
    from edgebc.classifier import FrameClassifier

    out: dict[str, Any] = {}
    for precision, path in (("fp32", model.fp32), ("int8", model.int8)):
        if path is None:
            continue
        backend = open_backend(path, threads=1, spin_wait=False)
        for tag, (screen, region) in frames.items():
            stages: dict[str, list[float]] = {}
            classify = partial(_classify_into, FrameClassifier(backend, region), screen, stages)
            timing: dict[str, Any] = dict(time_call(classify, warmup, iterations))
            timing["stages_p50_ms"] = {k: float(np.percentile(v, 50)) for k, v in stages.items()}
            out[f"{precision}_{tag}"] = timing
        if precision == "fp32":
            screen, region = frames["1920x1080"]
            live = FrameClassifier(backend, region)
            out["headroom_1920x1080_fp32"] = realtime_headroom(
                partial(live.classify, screen), fps, seconds
            )
    if model.notebook is not None:
        naive = model.notebook()
        for tag, (screen, region) in frames.items():
            out[f"naive_pil_torch_{tag}"] = time_call(
                partial(naive, screen, region), warmup, max(5, iterations // 2)
            )
            out[f"speedup_vs_naive_{tag}"] = (
                out[f"naive_pil_torch_{tag}"]["p50_ms"] / out[f"fp32_{tag}"]["p50_ms"]
            )
    return out


def _classify_into(classifier: Any, screen: np.ndarray, stages: dict[str, list[float]]) -> None:
    for name, value in classifier.classify(screen).timings_ms.items():
        stages.setdefault(name, []).append(value)


def run(
    quick: bool,
    batches: list[int],
    threads: list[int],
    models: Sequence[BenchModel],
    fps: float = 30.0,
) -> dict[str, Any]:
    cv2.setNumThreads(1)
    warmup, iterations = (3, 30) if quick else (20, 300)
    seconds = 2.0 if quick else 10.0
    started = time.monotonic()
    frames = screens()
    report: dict[str, Any] = {
        "edgebc": __version__,
        "date": time.strftime("%Y-%m-%d"),
        "quick": quick,
        "machine": {
            "python": platform.python_version(),
            "opencv": cv2.__version__,
            "numpy": np.__version__,
            "cpu": sysinfo.cpu_description(),
            "versions": sysinfo.collect().get("packages", {}),
            "gpus": sysinfo.nvidia_gpus(),
        },
        "settings": {
            "warmup": warmup,
            "iterations": iterations,
            "batches": batches,
            "threads": threads,
            "fps": fps,
            "opencv_threads": 1,
        },
        "stages": stage_timings(frames, warmup, iterations),
        "models": {},
    }
    with tempfile.TemporaryDirectory(prefix="edgebc-bench-") as work:
        for model in models:
            size = read_card(model.fp32).input_shape[1]
            report["models"][model.name] = {
                "input": size,
                "backends": model_section(
                    model, size, batches, threads, warmup, iterations, Path(work)
                ),
                "pipeline": pipeline_section(model, frames, warmup, iterations, fps, seconds),
            }
    report["peak_rss_mb"] = peak_rss_mb()
    report["seconds"] = time.monotonic() - started
    return report
