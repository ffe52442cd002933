"""Native TensorRT backend for `.engine` files (TensorRT 10 API, cuda-python for memory).

The sidecar is checked before TensorRT sees the engine: one built for another GPU or TensorRT
version is refused with a message that says to rebuild it on this device. Every named input and
output gets a device buffer once, sized for the profile's largest batch (edgebc.backends.tensorrt
.io_plan), reused for every frame. A one-input model runs by `run(batch)` as before; a graph of an
exported fusion model (a branch, or the head: its sidecar carries the fusion layout) and a
multi-view model run by `run_named` with every input by name, and give every output by name (the
head its logits and fused features, a branch its embedding). A batch larger than the profile's is
run in pieces by `run_named`; `run` refuses it, as it always did.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from edgebc.backends import checked_feeds, declared_inputs, validate_batch, warmup_feeds
from edgebc.backends.tensorrt.io_plan import TensorSpec, plan_io
from edgebc.backends.tensorrt.sidecar import (
    check_engine_compatible,
    gpu_identity,
    read_sidecar,
    sidecar_layout,
)
from edgebc.errors import EdgebcError
from edgebc.fusion_graphs import FusionLayout
from edgebc.integrity import sha256_file, verify_artifact
from edgebc.model_card import ModelCard
from edgebc.optional import require


class TensorRTBackend:
    def __init__(self, path: Path, warmup: int = 3) -> None:
        trt = require("tensorrt", "TensorRT .engine models")
        self._cudart = require(
            "cuda.bindings.runtime", "TensorRT .engine models (pip install cuda-python)"
        )
        path = Path(path)
        sidecar = read_sidecar(path)
        check_engine_compatible(sidecar, trt.__version__, gpu_identity())
        self.model_sha256 = verify_artifact(path) or sha256_file(path)
        if sidecar.get("engine_sha256") and sidecar["engine_sha256"] != self.model_sha256:
            raise EdgebcError(
                f"{path}: engine bytes differ from those its sidecar recorded; rebuild or recopy it"
            )
        self.card = ModelCard.from_json(sidecar["card"], source=f"{path}: sidecar card")
        self.fusion: FusionLayout | None = sidecar_layout(sidecar, str(path))
        declared = declared_inputs(self.card, self.fusion)
        # the outputs run_named returns: a fusion graph's own (its layout's), else the card's
        # logits only (a single model's features go unread, and the classifier's shift check
        # says it is off for want of them, as before)
        self.outputs: tuple[str, ...] = (
            tuple(self.fusion.outputs_of(self.fusion.graph, self.card))
            if self.fusion is not None
            else (self.card.output_name,)
        )
        self._engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(
            path.read_bytes()
        )
        if self._engine is None:
            raise EdgebcError(f"{path}: TensorRT could not deserialize this engine")
        self._context = self._engine.create_execution_context()
        self._plan = plan_io(engine_tensors(trt, self._engine), declared, self.outputs, str(path))
        self._pointers: dict[str, Any] = {}
        err, self._stream = self._cudart.cudaStreamCreate()
        self._check(err)
        for name, size in self._plan.buffer_bytes().items():
            self._pointers[name] = self._malloc(size)
            self._context.set_tensor_address(name, self._pointers[name])
        self.name = f"tensorrt:{sidecar.get('precision')}"
        self.precision = str(sidecar.get("precision") or self.card.precision)
        for _ in range(warmup):
            self._execute(warmup_feeds(self.card, self.fusion, declared))

    @property
    def max_batch(self) -> int:
        """The largest batch one engine run takes (the profile's)."""
        return self._plan.max_batch

    def run(self, batch: np.ndarray) -> np.ndarray:
        if len(self._plan.inputs) != 1 or self.fusion is not None:
            raise EdgebcError(
                f"model {self.card.name} takes the inputs {', '.join(self._plan.inputs)}; "
                "run it with run_named"
            )
        batch = validate_batch(batch, self.card)
        if batch.shape[0] > self._plan.max_batch:
            raise ValueError(
                f"this engine was built for batches up to {self._plan.max_batch}, got {batch.shape[0]}"
            )
        return self._execute({self.card.input_name: batch})[self.card.output_name]

    def run_named(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Every output by name for every input by name (checked as ONNX Runtime checks them)."""
        return self._execute(self._checked(feeds))

    def _checked(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return checked_feeds(feeds, self.card, self.fusion)

    def _execute(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run checked, C-contiguous float32 feeds in pieces of the profile's largest batch."""
        if self._context is None:
            raise EdgebcError("this backend was closed")
        cudart, plan = self._cudart, self._plan
        rows = len(next(iter(feeds.values())))
        out = {n: np.empty(s, np.float32) for n, s in plan.output_shapes(rows).items()}
        to_device, to_host = (cudart.cudaMemcpyKind.cudaMemcpyHostToDevice,
                              cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost)  # fmt: skip
        for part in plan.runs(rows):
            count = part.stop - part.start
            for name, shape in plan.input_shapes(count).items():
                if not self._context.set_input_shape(name, shape):
                    raise EdgebcError(f"TensorRT refused the shape {shape} for input {name}")
                piece = np.ascontiguousarray(feeds[name][part], np.float32)
                self._check(cudart.cudaMemcpyAsync(self._pointers[name], piece.ctypes.data,
                                                   piece.nbytes, to_device, self._stream)[0])  # fmt: skip
            if not self._context.execute_async_v3(self._stream):
                raise EdgebcError("TensorRT inference failed")
            for name, array in out.items():
                target = array[part]  # rows of a C-contiguous array: one contiguous block
                self._check(cudart.cudaMemcpyAsync(target.ctypes.data, self._pointers[name],
                                                   target.nbytes, to_host, self._stream)[0])  # fmt: skip
            # shapes are set again for the next piece: wait until this one has run
            self._check(cudart.cudaStreamSynchronize(self._stream)[0])
        return out

    def close(self) -> None:
        if self._context is None:
            return
        for pointer in self._pointers.values():
            self._cudart.cudaFree(pointer)
        self._cudart.cudaStreamDestroy(self._stream)
        self._pointers, self._context = {}, None

    def _malloc(self, size: int) -> Any:
        err, pointer = self._cudart.cudaMalloc(size)
        self._check(err)
        return pointer

    def _check(self, err: Any) -> None:
        if err != self._cudart.cudaError_t.cudaSuccess:
            raise EdgebcError(f"CUDA error {err}")


def engine_tensors(trt: Any, engine: Any) -> list[TensorSpec]:
    """Every I/O tensor of a deserialized engine, with each input's profile-0 batch limit."""
    specs = []
    for index in range(engine.num_io_tensors):
        name = engine.get_tensor_name(index)
        is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
        limit = int(engine.get_tensor_profile_shape(name, 0)[2][0]) if is_input else None
        specs.append(TensorSpec(name, is_input, tuple(int(d) for d in engine.get_tensor_shape(name)),
                                np.dtype(trt.nptype(engine.get_tensor_dtype(name))), limit))  # fmt: skip
    return specs


def run_engine(engine_path: str | Path, inputs: np.ndarray) -> np.ndarray:
    """Logits from an engine, one frame at a time, through the backend above (export parity checks)."""
    backend = TensorRTBackend(Path(engine_path), warmup=1)
    try:
        return np.concatenate([backend.run(inputs[i : i + 1]) for i in range(len(inputs))])
    finally:
        backend.close()
