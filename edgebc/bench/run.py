"""What `edgebc bench` and `python benchmarks/latency.py` run: stages, backends, pipeline, headroom.

The models are exported files (`BenchModel`); this runs torch-free, on a device as on a
workstation. The development side (benchmarks/latency.py) makes models from the registry and adds
PyTorch rows and the notebook pipeline to them. Every number comes from this process on this
machine.
"""

from __future__ import annotations

import logging
import os
import platform
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from edgebc import __version__, sysinfo
from edgebc.backends import open_backend
from edgebc.bench.accuracy import BATCH, LabelledSet, check_frames, check_outputs, run_batched
from edgebc.bench.backends import BenchModel, candidates, why_unavailable
from edgebc.bench.timing import (
    Variant,
    busy_warning,
    load_per_core,
    peak_rss_mb,
    realtime_headroom,
    time_call,
    time_interleaved,
)
from edgebc.decode import decode_image
from edgebc.model_card import read_card
from edgebc.preprocess import PreprocessCard, preprocess, preprocess_chw
from edgebc.region import Region, detect_imaging_region
from edgebc.synth import make_ultrasound_phantom, render_scanner_screen
from edgebc.synth.ultrasound import phantom_rng, phantom_stills

log = logging.getLogger(__name__)
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
        compared = {  # the same maths in two orders: a ratio, so timed interleaved
            f"crop_preprocess_{tag}": Variant(partial(preprocess, screen, prep, region)),
            f"baseline_naive_preprocess_{tag}": Variant(
                partial(naive_preprocess, region.crop(screen), prep)
            ),
        }
        results.update(time_interleaved(compared, warmup, iterations))
    return results


@dataclass(frozen=True)
class CheckReference:
    """The check frames preprocessed for one model and ONNX Runtime FP32's logits on them: what
    every backend (model_section) and the INT8 classifier (pipeline_section) are compared with,
    made once per model by `run` (each section made it again)."""

    frames: np.ndarray
    logits: np.ndarray


def check_reference(
    fp32: Path, check_set: LabelledSet | None, batch: int = BATCH
) -> CheckReference:
    """ONNX Runtime FP32 (CPU, one thread) on the check frames, `batch` frames a call."""
    checked = check_frames(read_card(fp32), check_set)
    backend = open_backend(fp32, ("CPUExecutionProvider",), 1, warmup=0)
    try:
        return CheckReference(checked, run_batched(backend, checked, batch))
    finally:
        backend.close()


def model_section(
    model: BenchModel,
    size: int,
    batches: list[int],
    threads: list[int],
    warmup: int,
    iterations: int,
    work: Path | None = None,
    check_set: LabelledSet | None = None,
    reference: CheckReference | None = None,
) -> dict[str, Any]:
    """Every available backend on the same preprocessed phantom frames, at each batch size, after
    its outputs on the check frames (`check_set`, else phantoms) passed the comparison with ONNX
    Runtime FP32: a backend that gives other answers is reported wrong, with the figures, and not
    timed. The backends that passed are timed interleaved, batch size by batch size; for GPU
    backends also the device memory this process held once each was loaded."""
    card = read_card(model.fp32)
    frames, _ = phantom_stills(max(batches), seed=33)
    prep = card.preprocess  # the model's own preprocessing, whatever its input
    inputs = np.stack([preprocess_chw(f, prep) for f in frames]).astype(np.float32)
    check_batch = min(BATCH, max(batches))  # native engines are built for max(batches)
    if reference is None:
        reference = check_reference(model.fp32, check_set, check_batch)
    checked = reference.frames
    out: dict[str, Any] = {}
    loaded: dict[str, Any] = {}
    for candidate in candidates(model, threads, work, max(batches)):
        try:
            runner = candidate.make()
            logits = run_batched(runner, checked, check_batch)
            first = runner.run(inputs[:1])
        except Exception as exc:  # a backend that cannot run this model is reported, not fatal
            out[candidate.name] = {"unavailable": why_unavailable(exc)}
            continue
        check = check_outputs(reference.logits, logits, card.temperature)
        out[candidate.name] = {"check": check.as_dict(), "logits_b1": first[0].tolist()}
        if candidate.gpu:
            out[candidate.name].update(gpu=True, device_memory_mb=sysinfo.process_gpu_memory_mb())
        if check.wrong:
            log.warning("%s: %s; not timed", candidate.name, check.wrong)
            runner.close()
            continue
        loaded[candidate.name] = runner
    for name in loaded:
        out[name]["batches"] = {}
    for batch in batches:
        x = np.ascontiguousarray(inputs[:batch])
        variants = {}
        for name, runner in loaded.items():
            try:
                runner.run(x)  # a batch size a backend cannot take is reported, not fatal
            except Exception as exc:
                out[name]["batches"][f"b{batch}"] = {"unavailable": why_unavailable(exc)}
                continue
            variants[name] = Variant(partial(runner.run, x), getattr(runner, "sync", None), batch)
        calls = max(20, iterations // batch)  # same number of frames per batch size
        for name, timing in time_interleaved(variants, warmup, calls).items():
            out[name]["batches"][f"b{batch}"] = timing
    for runner in loaded.values():
        runner.close()
    return out


def pipeline_section(
    model: BenchModel,
    frames: dict[str, tuple[np.ndarray, Region]],
    warmup: int,
    iterations: int,
    fps: float,
    seconds: float,
    check_set: LabelledSet | None = None,
    reference: CheckReference | None = None,
) -> dict[str, Any]:
    """Raw frame to decision through FrameClassifier (one thread), its stages, the real-time
    headroom at `fps`, and the notebook pipeline on the same frame when the model brings one: FP32,
    INT8 and the notebook timed interleaved on each frame size, so the speed-up over the notebook
    is a ratio of one run. An INT8 model whose outputs on the check frames disagree with FP32's
    is not timed (`not_timed` says why)."""
    from edgebc.classifier import FrameClassifier
    from edgebc.localiser import localiser_behind

    out: dict[str, Any] = {}
    backends = {
        precision: open_backend(path, threads=1, spin_wait=False)
        for precision, path in (("fp32", model.fp32), ("int8", model.int8))
        if path is not None
    }
    if "int8" in backends:
        card = read_card(model.fp32)
        if reference is None:
            reference = check_reference(model.fp32, check_set)
        int8_logits = run_batched(backends["int8"], reference.frames)
        check = check_outputs(reference.logits, int8_logits, card.temperature)
        if check.wrong:
            out["not_timed"] = {"int8": check.wrong}
            del backends["int8"]
    naive = model.notebook() if model.notebook is not None else None
    # a classifier trained on lesion-localiser crops runs behind its linked localiser: opened once
    behind = {precision: localiser_behind(backend.card, model.int8 if precision == "int8" and model.int8 else model.fp32)
              for precision, backend in backends.items()}  # fmt: skip
    for tag, (screen, region) in frames.items():
        stages: dict[str, dict[str, list[float]]] = {}
        variants = {}
        for precision, backend in backends.items():
            classifier = FrameClassifier(backend, region, localiser=behind[precision])
            stages[precision] = {}
            call = partial(_classify_into, classifier, screen, stages[precision])
            variants[f"{precision}_{tag}"] = Variant(call)
        if naive is not None:
            variants[f"naive_pil_torch_{tag}"] = Variant(partial(naive, screen, region))
        for name, timing in time_interleaved(variants, warmup, iterations).items():
            out[name] = dict(timing)
        for precision, per_stage in stages.items():
            out[f"{precision}_{tag}"]["stages_p50_ms"] = {
                k: float(np.percentile(v, 50)) for k, v in per_stage.items()
            }
        if naive is not None:
            naive_timing, fp32 = out[f"naive_pil_torch_{tag}"], out[f"fp32_{tag}"]
            out[f"speedup_vs_naive_{tag}"] = naive_timing["p50_ms"] / fp32["p50_ms"]
            # in CPU time too: on a shared core the wall times stretch, the CPU times much less
            out[f"cpu_speedup_vs_naive_{tag}"] = naive_timing["cpu_ms"] / fp32["cpu_ms"]
    if "fp32" in backends:
        screen, region = frames["1920x1080"]
        live = FrameClassifier(backends["fp32"], region, localiser=behind["fp32"])
        out["headroom_1920x1080_fp32"] = realtime_headroom(
            partial(live.classify, screen), fps, seconds
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
    check_set: LabelledSet | None = None,
) -> dict[str, Any]:
    """The whole benchmark; `check_set` holds the real frames each backend's outputs are checked
    on before it is timed (default: phantoms)."""
    cv2.setNumThreads(1)
    warmup, iterations = (3, 30) if quick else (20, 300)
    seconds = 2.0 if quick else 10.0
    started = time.monotonic()
    load_before = load_per_core()
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
        "check": {
            "reference": "ONNX Runtime FP32, 1 thread, on the same model",
            "frames": check_set.description if check_set else "24 synthetic phantoms (seed 91)",
        },
        "stages": stage_timings(frames, warmup, iterations),
        "models": {},
    }
    with tempfile.TemporaryDirectory(prefix="edgebc-bench-") as work:
        for model in models:
            size = read_card(model.fp32).input_shape[1]
            reference = check_reference(model.fp32, check_set, min(BATCH, max(batches)))
            backends = model_section(
                model, size, batches, threads, warmup, iterations, Path(work), check_set, reference
            )
            pipeline = pipeline_section(
                model, frames, warmup, iterations, fps, seconds, check_set, reference
            )
            report["models"][model.name] = {
                "input": size,
                "backends": backends,
                "pipeline": pipeline,
            }
    report["peak_rss_mb"] = peak_rss_mb()
    report["seconds"] = time.monotonic() - started
    load_after = load_per_core()
    report["load"] = {
        "per_core_before": load_before,
        "per_core_after": load_after,
        # mostly one busy thread of this run's own in the last minute's average
        "busy": busy_warning(load_before, load_after, 1 / (os.cpu_count() or 1)),
    }
    return report
