"""The inference backends a benchmark can time on one model, each only where it is available.

Every runner takes the same float32 NCHW batch and returns logits, so the same input goes through
PyTorch eager, ONNX Runtime FP32 and INT8 at each thread count, ONNX Runtime's CUDA / TensorRT
providers, and OpenCV's DNN module. A backend that is missing or cannot load the model is
reported with the reason instead of a number.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from edgebc.optional import is_installed

Runner = Callable[[np.ndarray], np.ndarray]


@dataclass
class Candidate:
    name: str
    make: Callable[[], tuple[Runner, Callable[[], object] | None]]  # runner, device sync


def candidates(
    fp32: Path, int8: Path | None, checkpoint: Path | None, threads: list[int]
) -> list[Candidate]:
    cpu = ["CPUExecutionProvider"]
    out: list[Candidate] = []
    if checkpoint is not None and is_installed("torch"):
        for t in threads:
            out.append(Candidate(f"torch-eager-cpu-t{t}", partial(_torch, checkpoint, "cpu", t)))
        if _cuda():
            out.append(Candidate("torch-eager-cuda", partial(_torch, checkpoint, "cuda", 0)))
    for t in threads:
        out.append(Candidate(f"ort-cpu-fp32-t{t}", partial(_ort, fp32, cpu, t)))
        if int8 is not None:
            out.append(Candidate(f"ort-cpu-int8-t{t}", partial(_ort, int8, cpu, t)))
    import onnxruntime

    available = onnxruntime.get_available_providers()
    for provider in ("CUDAExecutionProvider", "TensorrtExecutionProvider"):
        if provider in available:
            name = "ort-" + provider.removesuffix("ExecutionProvider").lower()
            out.append(Candidate(name, partial(_ort, fp32, [provider, *cpu], 0)))
    out.append(Candidate("opencv-dnn-cpu", partial(_opencv, fp32)))
    return out


def _cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def _torch(
    checkpoint: Path, device: str, threads: int
) -> tuple[Runner, Callable[[], object] | None]:
    import torch

    from edgebc.train.checkpoint import load_checkpoint
    from edgebc.train.engine import model_from_checkpoint

    if threads:
        torch.set_num_threads(threads)
    model = model_from_checkpoint(load_checkpoint(checkpoint)).to(device).eval()

    def run(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(batch).to(device)).float().cpu().numpy()

    sync = torch.cuda.synchronize if device == "cuda" else None
    return run, sync


def _ort(
    path: Path, providers: list[str], threads: int
) -> tuple[Runner, Callable[[], object] | None]:
    from edgebc.backends import open_backend

    backend = open_backend(path, providers, threads, warmup=0)
    return backend.run, None


def _opencv(path: Path) -> tuple[Runner, Callable[[], object] | None]:
    import cv2

    net = cv2.dnn.readNetFromONNX(str(path))
    net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
    net.setPreferableTarget(cv2.dnn.DNN_TARGET_CPU)

    def run(batch: np.ndarray) -> np.ndarray:
        net.setInput(batch)
        return np.asarray(net.forward(), np.float32)

    return run, None
