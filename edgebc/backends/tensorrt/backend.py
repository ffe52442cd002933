"""Native TensorRT backend for `.engine` files (TensorRT 10 API, cuda-python for memory).

The sidecar is checked before TensorRT sees the engine: one built for another GPU or TensorRT
version is refused with a message that says to rebuild it on this device. Device buffers are
allocated once for the largest batch and reused for every frame.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from edgebc.backends import validate_batch, validate_feeds
from edgebc.backends.tensorrt.sidecar import check_engine_compatible, gpu_identity, read_sidecar
from edgebc.errors import EdgebcError
from edgebc.integrity import sha256_file, verify_artifact
from edgebc.model_card import ModelCard
from edgebc.optional import require


class TensorRTBackend:
    def __init__(self, path: Path, warmup: int = 3) -> None:
        trt = require("tensorrt", "TensorRT .engine models")
        self._cudart = require(
            "cuda.bindings.runtime", "TensorRT .engine models (pip install cuda-python)"
        )
        sidecar = read_sidecar(path)
        check_engine_compatible(sidecar, trt.__version__, gpu_identity())
        self.model_sha256 = verify_artifact(path) or sha256_file(path)
        if sidecar.get("engine_sha256") and sidecar["engine_sha256"] != self.model_sha256:
            raise EdgebcError(
                f"{path}: engine bytes differ from those its sidecar recorded; rebuild or recopy it"
            )
        self.card = ModelCard.from_json(sidecar["card"], source=f"{path}: sidecar card")
        if len(self.card.inputs) != 1:
            raise EdgebcError(
                f"{path}: native TensorRT runs one-input models here; run this "
                f"{len(self.card.inputs)}-input model's ONNX file with ONNX Runtime"
            )
        self._engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(
            path.read_bytes()
        )
        if self._engine is None:
            raise EdgebcError(f"{path}: TensorRT could not deserialize this engine")
        self._context = self._engine.create_execution_context()
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        self._input = next(
            n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT
        )
        self._output = next(
            n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT
        )
        self._max_batch = int(sidecar.get("batch", [1, 1, 1])[-1])
        self._in_bytes = self._max_batch * int(np.prod(self.card.input_shape)) * 4
        self._out_bytes = self._max_batch * len(self.card.class_names) * 4
        self._in_ptr, self._out_ptr = self._malloc(self._in_bytes), self._malloc(self._out_bytes)
        err, self._stream = self._cudart.cudaStreamCreate()
        self._check(err)
        self.name = f"tensorrt:{sidecar.get('precision')}"
        # the engine's first output only (the logits): a features output goes unread, and the
        # classifier's shift check says it is off for want of it
        self.outputs = (self.card.output_name,)
        zeros = np.zeros((1, *self.card.input_shape), np.float32)
        for _ in range(warmup):
            self.run(zeros)

    def run(self, batch: np.ndarray) -> np.ndarray:
        batch = validate_batch(batch, self.card)
        if batch.shape[0] > self._max_batch:
            raise ValueError(
                f"this engine was built for batches up to {self._max_batch}, got {batch.shape[0]}"
            )
        cudart = self._cudart
        self._context.set_input_shape(self._input, batch.shape)
        out = np.empty((batch.shape[0], len(self.card.class_names)), np.float32)
        kind = cudart.cudaMemcpyKind
        self._check(
            cudart.cudaMemcpyAsync(
                self._in_ptr,
                batch.ctypes.data,
                batch.nbytes,
                kind.cudaMemcpyHostToDevice,
                self._stream,
            )[0]
        )
        self._context.set_tensor_address(self._input, self._in_ptr)
        self._context.set_tensor_address(self._output, self._out_ptr)
        if not self._context.execute_async_v3(self._stream):
            raise EdgebcError("TensorRT inference failed")
        self._check(
            cudart.cudaMemcpyAsync(
                out.ctypes.data,
                self._out_ptr,
                out.nbytes,
                kind.cudaMemcpyDeviceToHost,
                self._stream,
            )[0]
        )
        self._check(cudart.cudaStreamSynchronize(self._stream)[0])
        return out

    def run_named(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The one input by name (engines are built for one-input models here)."""
        checked = validate_feeds(feeds, self.card)
        return {self.card.output_name: self.run(checked[self.card.input_name])}

    def close(self) -> None:
        for pointer in (self._in_ptr, self._out_ptr):
            self._cudart.cudaFree(pointer)
        self._cudart.cudaStreamDestroy(self._stream)

    def _malloc(self, size: int) -> Any:
        err, pointer = self._cudart.cudaMalloc(size)
        self._check(err)
        return pointer

    def _check(self, err: Any) -> None:
        if err != self._cudart.cudaError_t.cudaSuccess:
            raise EdgebcError(f"CUDA error {err}")


def run_engine(engine_path: str | Path, inputs: np.ndarray) -> np.ndarray:
    """Logits from an engine, one frame at a time, through the backend above (export parity checks)."""
    backend = TensorRTBackend(Path(engine_path), warmup=1)
    try:
        return np.concatenate([backend.run(inputs[i : i + 1]) for i in range(len(inputs))])
    finally:
        backend.close()
