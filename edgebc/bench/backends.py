"""The inference backends a benchmark can time on one model, each only where it is available.

Every runner takes the same float32 NCHW batch and returns logits, so the same input goes through
ONNX Runtime FP32 and INT8 at each thread count, ONNX Runtime's CUDA / TensorRT providers, native
TensorRT FP16 and INT8 engines built here, and OpenCV's DNN module; the development side
(benchmarks/latency.py) adds PyTorch rows on the model's checkpoint before them. A backend that is
missing or cannot load the model is reported with the reason instead of a number.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Protocol

import numpy as np

from edgebc.backends.tensorrt.build import Precision
from edgebc.optional import is_installed
from edgebc.region import Region


class Runner(Protocol):
    """What a benchmark times: a runtime Backend satisfies it. A runner on an asynchronous device
    also has `sync()`, which waits for the device so a timing includes the work."""

    def run(self, batch: np.ndarray) -> np.ndarray: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class Candidate:
    name: str
    make: Callable[[], Runner]
    gpu: bool = False


@dataclass(frozen=True)
class BenchModel:
    """One model to time: its exported files, and what the development side adds to a run
    (benchmarks/latency.py: PyTorch on its checkpoint, the notebook pipeline); a device gives
    only the files."""

    name: str
    fp32: Path
    int8: Path | None = None
    extra_backends: Sequence[Candidate] = ()  # timed before the runtime's own backends
    # makes the notebook pipeline (frame, region -> probabilities) the full pipeline is compared with
    notebook: Callable[[], Callable[[np.ndarray, Region], object]] | None = None


def given_model(fp32: Path, int8: Path | None = None) -> BenchModel:
    """An exported model (and its INT8 export), named by its card."""
    from edgebc.model_card import read_card

    return BenchModel(read_card(fp32).name, fp32, int8)


def candidates(
    model: BenchModel, threads: list[int], work: Path | None = None, max_batch: int = 1
) -> list[Candidate]:
    """`work` is where native TensorRT engines are built (they are device-specific, never shipped)."""
    cpu = ["CPUExecutionProvider"]
    out = list(model.extra_backends)
    for t in threads:
        out.append(Candidate(f"ort-cpu-fp32-t{t}", partial(_ort, model.fp32, cpu, t)))
        if model.int8 is not None:
            out.append(Candidate(f"ort-cpu-int8-t{t}", partial(_ort, model.int8, cpu, t)))
    import onnxruntime

    available = onnxruntime.get_available_providers()
    for provider in ("CUDAExecutionProvider", "TensorrtExecutionProvider"):
        if provider in available:
            name = "ort-" + provider.removesuffix("ExecutionProvider").lower()
            out.append(Candidate(name, partial(_ort, model.fp32, [provider, *cpu], 0), gpu=True))
    if work is not None and is_installed("tensorrt") and is_installed("cuda"):
        engines: tuple[tuple[Precision, Path | None], ...] = (
            ("fp16", model.fp32),
            ("int8", model.int8),
        )
        for precision, source in engines:
            if source is not None:
                make = partial(_tensorrt, source, precision, work, max_batch)
                out.append(Candidate(f"tensorrt-{precision}", make, gpu=True))
    out.append(Candidate("opencv-dnn-cpu", partial(_OpenCvDnn, model.fp32)))
    if is_installed("openvino"):
        out.extend(_openvino_candidates(model, threads))
    return out


def why_unavailable(exc: Exception) -> str:
    """One line for a table: why a backend could not run (type and the message's first line)."""
    first = (str(exc).splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first[:200]}"


def _ort(path: Path, providers: list[str], threads: int) -> Runner:
    from edgebc.backends import open_backend

    return open_backend(path, providers, threads, warmup=0)


def _tensorrt(source: Path, precision: Precision, work: Path, max_batch: int) -> Runner:
    """Build the engine on this GPU (from the QDQ model for INT8), then run it natively; run()
    synchronises its stream itself."""
    from edgebc.backends.tensorrt import TensorRTBackend, build_engine

    engine = build_engine(
        source,
        work / f"{source.stem}-{precision}.engine",
        precision,
        batch=(1, 1, max_batch),
    )
    return TensorRTBackend(engine, warmup=3)


class _OpenCvDnn:
    def __init__(self, path: Path) -> None:
        import cv2

        self._net = cv2.dnn.readNetFromONNX(str(path))
        self._net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
        # the CPU is the target already; OpenCV 5's graph engine warns on any setPreferableTarget

    def run(self, batch: np.ndarray) -> np.ndarray:
        self._net.setInput(batch)
        return np.asarray(self._net.forward(), np.float32)

    def close(self) -> None:
        """Nothing to free early: the network goes with this object."""


def _openvino_candidates(model: BenchModel, threads: list[int]) -> list[Candidate]:
    """OpenVINO FP32 and BF16 (precision stated: its default on a BF16 CPU is bf16) on the FP32
    model, INT8 on the QDQ export; one that cannot run here (no BF16 instructions, a QOperator
    INT8 model) is reported with the reason, as every candidate is."""
    out = []
    for t in threads:
        for precision in ("fp32", "bf16"):
            make = partial(_openvino, model.fp32, precision, t)
            out.append(Candidate(f"openvino-cpu-{precision}-t{t}", make))
        if model.int8 is not None:
            make = partial(_openvino, model.int8, "int8", t)
            out.append(Candidate(f"openvino-cpu-int8-t{t}", make))
    return out


def _openvino(path: Path, precision: str, threads: int) -> Runner:
    from edgebc.backends import open_backend

    return open_backend(path, threads=threads, warmup=0, runtime="openvino", precision=precision)
