"""The inference backends a benchmark can time on one model, each only where it is available.

Every runner takes the same float32 NCHW batch and returns logits, so the same input goes through
PyTorch eager (CPU; CUDA with synchronisation), PyTorch CUDA FP16 replayed from CUDA graphs, ONNX
Runtime FP32 and INT8 at each thread count, ONNX Runtime's CUDA / TensorRT providers, native
TensorRT FP16 and INT8 engines built here, and OpenCV's DNN module. A backend that is missing or
cannot load the model is reported with the reason instead of a number.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from edgebc.optional import is_installed

Runner = Callable[[np.ndarray], np.ndarray]


@dataclass
class Loaded:
    run: Runner
    sync: Callable[[], object] | None = None  # waits for the device, so timings include the work
    close: Callable[[], object] | None = None  # frees device memory before the next backend


@dataclass
class Candidate:
    name: str
    make: Callable[[], Loaded]
    gpu: bool = False


def candidates(
    fp32: Path,
    int8: Path | None,
    checkpoint: Path | None,
    threads: list[int],
    work: Path | None = None,
    max_batch: int = 1,
) -> list[Candidate]:
    """`work` is where native TensorRT engines are built (they are device-specific, never shipped)."""
    cpu = ["CPUExecutionProvider"]
    out: list[Candidate] = []
    if checkpoint is not None and is_installed("torch"):
        for t in threads:
            out.append(Candidate(f"torch-eager-cpu-t{t}", partial(_torch, checkpoint, "cpu", t)))
        if _cuda():
            out.append(
                Candidate("torch-eager-cuda", partial(_torch, checkpoint, "cuda", 0), gpu=True)
            )
            out.append(
                Candidate(
                    "torch-cuda-fp16-graphs", partial(_torch_cuda_graphs, checkpoint), gpu=True
                )
            )
    for t in threads:
        out.append(Candidate(f"ort-cpu-fp32-t{t}", partial(_ort, fp32, cpu, t)))
        if int8 is not None:
            out.append(Candidate(f"ort-cpu-int8-t{t}", partial(_ort, int8, cpu, t)))
    import onnxruntime

    available = onnxruntime.get_available_providers()
    for provider in ("CUDAExecutionProvider", "TensorrtExecutionProvider"):
        if provider in available:
            name = "ort-" + provider.removesuffix("ExecutionProvider").lower()
            out.append(Candidate(name, partial(_ort, fp32, [provider, *cpu], 0), gpu=True))
    if work is not None and is_installed("tensorrt") and is_installed("cuda"):
        for precision, source in (("fp16", fp32), ("int8", int8)):
            if source is not None:
                make = partial(_tensorrt, source, precision, work, max_batch)
                out.append(Candidate(f"tensorrt-{precision}", make, gpu=True))
    out.append(Candidate("opencv-dnn-cpu", partial(_opencv, fp32)))
    return out


def why_unavailable(exc: Exception) -> str:
    """One line for a table: why a backend could not run (type and the message's first line)."""
    first = (str(exc).splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first[:200]}"


def _cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def _torch_model(checkpoint: Path, device: str) -> Any:
    from edgebc.train.checkpoint import load_checkpoint, model_from_checkpoint

    return model_from_checkpoint(load_checkpoint(checkpoint)).to(device).eval()


def _torch(checkpoint: Path, device: str, threads: int) -> Loaded:
    import torch

    if threads:
        torch.set_num_threads(threads)
    model = _torch_model(checkpoint, device)

    def run(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(batch).to(device)).float().cpu().numpy()

    return Loaded(run, torch.cuda.synchronize if device == "cuda" else None, _release_torch_cuda)


def _torch_cuda_graphs(checkpoint: Path) -> Loaded:
    """FP16, channels-last, and one CUDA graph per batch shape, captured on first use: a replay
    launches the whole network at once instead of one kernel launch per layer from Python."""
    import torch

    model = _torch_model(checkpoint, "cuda").half().to(memory_format=torch.channels_last)
    graphs: dict[tuple[int, ...], tuple[Any, Any, Any]] = {}

    def capture(shape: tuple[int, ...]) -> tuple[Any, Any, Any]:
        static_in = torch.zeros(shape, device="cuda", dtype=torch.float16).contiguous(
            memory_format=torch.channels_last
        )
        side = torch.cuda.Stream()  # warm up on a side stream, as capture requires
        side.wait_stream(torch.cuda.current_stream())
        with torch.no_grad(), torch.cuda.stream(side):
            for _ in range(3):
                model(static_in)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(graph):
            static_out = model(static_in)
        return graph, static_in, static_out

    def run(batch: np.ndarray) -> np.ndarray:
        if batch.shape not in graphs:
            graphs[batch.shape] = capture(batch.shape)
        graph, static_in, static_out = graphs[batch.shape]
        static_in.copy_(torch.from_numpy(batch))  # host to device, to FP16, to channels-last
        graph.replay()
        return static_out.float().cpu().numpy()

    def close() -> None:
        graphs.clear()
        _release_torch_cuda()

    return Loaded(run, torch.cuda.synchronize, close)


def _release_torch_cuda() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _ort(path: Path, providers: list[str], threads: int) -> Loaded:
    from edgebc.backends import open_backend

    backend = open_backend(path, providers, threads, warmup=0)
    return Loaded(backend.run)


def _tensorrt(source: Path, precision: str, work: Path, max_batch: int) -> Loaded:
    """Build the engine on this GPU (from the QDQ model for INT8), then run it natively."""
    from edgebc.backends.tensorrt import TensorRTBackend
    from edgebc.export.tensorrt import build_engine

    engine = build_engine(
        source,
        work / f"{source.stem}-{precision}.engine",
        precision,
        batch=(1, 1, max_batch),
    )
    backend = TensorRTBackend(engine, warmup=3)
    return Loaded(backend.run, None, backend.close)  # run() synchronises its stream itself


def _opencv(path: Path) -> Loaded:
    import cv2

    net = cv2.dnn.readNetFromONNX(str(path))
    net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
    net.setPreferableTarget(cv2.dnn.DNN_TARGET_CPU)

    def run(batch: np.ndarray) -> np.ndarray:
        net.setInput(batch)
        return np.asarray(net.forward(), np.float32)

    return Loaded(run)
