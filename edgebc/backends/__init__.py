"""Inference backends: one small protocol, NCHW float32 in, logits out, model card attached.

`run(batch)` serves the usual one-input model; `run_named({input: batch, ...})` serves a model
whose card has several inputs (one per modality or view) and returns every output by name
(logits, and features where the card declares them).

`open_backend(path)` picks by file type: `.onnx` runs on ONNX Runtime (CPU, or CUDA / TensorRT
execution providers when present), `.engine` on native TensorRT (its sidecar checked first).
Both verify the file against `MANIFEST.sha256` when one lists it, read the card from the model
(or a release's verified `card.json` beside it: edgebc.release), and validate every input against
the model's declared shape before inference.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from edgebc.errors import EdgebcError
from edgebc.model_card import ModelCard, ModelInput


class Backend(Protocol):
    name: str
    card: ModelCard
    model_sha256: str

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Logits (N, classes) for a float32 (N, C, H, W) batch."""
        ...

    def run_named(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Every output by name for a batch per card input (the same N for all)."""
        ...

    def close(self) -> None: ...


def open_backend(
    path: str | Path,
    providers: Sequence[str] = ("CPUExecutionProvider",),
    threads: int = 0,
    warmup: int = 3,
    spin_wait: bool = True,
    runtime: str = "onnxruntime",
    precision: str | None = None,
) -> Backend:
    """The backend for `path`; `spin_wait=False` for live loops (ONNX Runtime only: see there).
    `runtime` runs an .onnx file; `precision` (fp32, fp16, int8), when given, must be the one the
    file's card declares: ONNX Runtime runs a file at the precision it was exported in, so a
    deployment plan that names one file and another precision is refused, not run."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        if runtime != "onnxruntime":
            raise EdgebcError(f"{path}: unknown runtime {runtime!r}; expected onnxruntime")
        from edgebc.backends.onnxruntime import OnnxRuntimeBackend

        backend = OnnxRuntimeBackend(path, providers, threads, warmup, spin_wait)
        if precision is not None and backend.card.precision != precision:
            backend.close()
            raise EdgebcError(
                f"{path}: holds a {backend.card.precision} model, not {precision}; ONNX Runtime "
                "runs a file at its own precision"
            )
        return backend
    if suffix == ".engine":
        from edgebc.backends.tensorrt import TensorRTBackend

        return TensorRTBackend(path, warmup)
    raise EdgebcError(
        f"{path}: expected an exported .onnx model or a TensorRT .engine (export checkpoints with `edgebc export`)"
    )


def validate_batch(batch: object, card: ModelCard) -> np.ndarray:
    """The batch as float32 NCHW matching the card's one input, or a ValueError saying what is wrong."""
    return validate_input(batch, card.input, card.max_batch)


def validate_feeds(feeds: Mapping[str, object], card: ModelCard) -> dict[str, np.ndarray]:
    """Every input of the card, each checked; a missing or unknown name is named."""
    names = [i.name for i in card.inputs]
    missing = [n for n in names if n not in feeds]
    unknown = [n for n in feeds if n not in names]
    if missing or unknown:
        optional = [n for n in missing if next(i for i in card.inputs if i.name == n).optional]
        raise ValueError(
            f"model {card.name} takes the inputs {', '.join(names)}; "
            + (f"missing {', '.join(missing)}" if missing else f"unknown {', '.join(unknown)}")
            + (f" ({', '.join(optional)} optional in the card: a fusion model answers without "
               "them as branch graphs and a head, run by edgebc.fusion; export it with edgebc "
               "export)" if optional else "")
        )  # fmt: skip
    checked = {i.name: validate_input(feeds[i.name], i, card.max_batch) for i in card.inputs}
    if len({len(v) for v in checked.values()}) != 1:
        sizes = {name: len(v) for name, v in checked.items()}
        raise ValueError(f"every input needs the same batch size, got {sizes}")
    return checked


def validate_input(batch: object, model_input: ModelInput, max_batch: int) -> np.ndarray:
    if not isinstance(batch, np.ndarray):
        raise ValueError(f"expected a numpy array, got {type(batch).__name__}")
    shape = model_input.shape
    if batch.ndim != 4 or tuple(batch.shape[1:]) != shape:
        raise ValueError(
            f"expected {model_input.name} of shape (N, {', '.join(map(str, shape))}), got {batch.shape}"
        )
    if not 1 <= batch.shape[0] <= max_batch:
        raise ValueError(f"batch size must be 1..{max_batch}, got {batch.shape[0]}")
    if batch.dtype != np.float32:
        raise ValueError(f"expected float32 input, got {batch.dtype}")
    if not np.all(np.isfinite(batch)):
        raise ValueError("input contains NaN or infinite values")
    return np.ascontiguousarray(batch)
