"""Inference backends: one small protocol, NCHW float32 in, logits out, model card attached.

`open_backend(path)` picks by file type: `.onnx` runs on ONNX Runtime (CPU, or CUDA / TensorRT
execution providers when present), `.engine` on native TensorRT (its sidecar checked first).
Both verify the file against `MANIFEST.sha256` when one lists it, read the card from the model,
and validate every input against the model's declared shape before inference.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from edgebc.errors import EdgebcError
from edgebc.model_card import ModelCard


class Backend(Protocol):
    name: str
    card: ModelCard
    model_sha256: str

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Logits (N, classes) for a float32 (N, C, H, W) batch."""
        ...

    def close(self) -> None: ...


def open_backend(
    path: str | Path,
    providers: Sequence[str] = ("CPUExecutionProvider",),
    threads: int = 0,
    warmup: int = 3,
    spin_wait: bool = True,
) -> Backend:
    """The backend for `path`; `spin_wait=False` for live loops (ONNX Runtime only: see there)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        from edgebc.backends.onnxruntime import OnnxRuntimeBackend

        return OnnxRuntimeBackend(path, providers, threads, warmup, spin_wait)
    if suffix == ".engine":
        from edgebc.backends.tensorrt import TensorRTBackend

        return TensorRTBackend(path, warmup)
    raise EdgebcError(
        f"{path}: expected an exported .onnx model or a TensorRT .engine (export checkpoints with `edgebc export`)"
    )


def validate_batch(batch: object, card: ModelCard) -> np.ndarray:
    """The batch as float32 NCHW matching the card, or a ValueError saying what is wrong."""
    if not isinstance(batch, np.ndarray):
        raise ValueError(f"expected a numpy array, got {type(batch).__name__}")
    if batch.ndim != 4 or tuple(batch.shape[1:]) != card.input_shape:
        raise ValueError(
            f"expected input of shape (N, {', '.join(map(str, card.input_shape))}), got {batch.shape}"
        )
    if not 1 <= batch.shape[0] <= card.max_batch:
        raise ValueError(f"batch size must be 1..{card.max_batch}, got {batch.shape[0]}")
    if batch.dtype != np.float32:
        raise ValueError(f"expected float32 input, got {batch.dtype}")
    if not np.all(np.isfinite(batch)):
        raise ValueError("input contains NaN or infinite values")
    return np.ascontiguousarray(batch)
