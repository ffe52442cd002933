"""ONNX Runtime backend: provider choice, thread settings, warm-up, integrity and shape checks."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime

from edgebc.backends import validate_batch
from edgebc.errors import EdgebcError
from edgebc.integrity import sha256_file, verify_artifact
from edgebc.model_card import read_card


class OnnxRuntimeBackend:
    def __init__(
        self,
        path: Path,
        providers: Sequence[str] = ("CPUExecutionProvider",),
        threads: int = 0,
        warmup: int = 3,
        spin_wait: bool = True,
    ) -> None:
        """`spin_wait=False` stops ONNX Runtime's worker threads from spinning between runs: a live
        loop at 30 fps otherwise burns most of a core waiting (seen: 87 % of a core for 3 % work)."""
        available = onnxruntime.get_available_providers()
        missing = [p for p in providers if p not in available]
        if missing:
            raise EdgebcError(
                f"ONNX Runtime here has no {', '.join(missing)} (available: {', '.join(available)}); "
                "CUDA and TensorRT providers come with the onnxruntime-gpu package"
            )
        self.model_sha256 = verify_artifact(path) or sha256_file(path)
        self.card = read_card(path)
        options = onnxruntime.SessionOptions()
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        if not spin_wait:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        try:
            self._session: onnxruntime.InferenceSession | None = onnxruntime.InferenceSession(
                str(path), options, providers=list(providers)
            )
        except Exception as exc:
            raise EdgebcError(f"{path}: ONNX Runtime could not load the model: {exc}") from exc
        model_input = self._session.get_inputs()[0]
        if (
            model_input.name != self.card.input_name
            or tuple(model_input.shape[1:]) != self.card.input_shape
        ):
            raise EdgebcError(
                f"{path}: the graph's input {model_input.name} {model_input.shape} disagrees with its card {self.card.input_shape}"
            )
        self.name = f"onnxruntime:{self._session.get_providers()[0]}"
        zeros = np.zeros((1, *self.card.input_shape), np.float32)
        for _ in range(warmup):
            self.run(zeros)

    def run(self, batch: np.ndarray) -> np.ndarray:
        if self._session is None:
            raise EdgebcError("this backend was closed")
        feed = {self.card.input_name: validate_batch(batch, self.card)}
        return np.asarray(self._session.run([self.card.output_name], feed)[0], np.float32)

    def close(self) -> None:
        self._session = None
