"""ONNX Runtime backend: provider choice, thread settings, warm-up, integrity and shape checks,
and the card a release gives the model (edgebc.release). A multi-view model's presence input
(edgebc.cases) is fed beside its views and checked like them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnxruntime

from edgebc.backends import validate_batch, validate_feeds
from edgebc.cases import validate_presence
from edgebc.errors import EdgebcError
from edgebc.integrity import sha256_file, verify_artifact
from edgebc.release import card_for_model


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
        self.card = card_for_model(path)  # a release's site card.json, else the embedded one
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
        graph = [(i.name, tuple(i.shape[1:])) for i in self._session.get_inputs()]
        declared: list[tuple[str, tuple[int, ...]]] = [(i.name, i.shape) for i in self.card.inputs]
        presence = self.card.presence_input
        if presence is not None:
            declared.append((presence, (len(self.card.inputs),)))
        if graph != declared:
            raise EdgebcError(
                f"{path}: the graph's inputs {graph} disagree with its card {declared}"
            )
        outputs = {o.name for o in self._session.get_outputs()}
        if any(o.name not in outputs for o in self.card.outputs):
            raise EdgebcError(
                f"{path}: the graph's outputs {sorted(outputs)} lack the card's "
                f"{[o.name for o in self.card.outputs]}"
            )
        self.name = f"onnxruntime:{self._session.get_providers()[0]}"
        zeros = {i.name: np.zeros((1, *i.shape), np.float32) for i in self.card.inputs}
        if presence is not None:
            zeros[presence] = np.ones((1, len(self.card.inputs)), np.float32)
        for _ in range(warmup):
            self.run_named(zeros)

    def run(self, batch: np.ndarray) -> np.ndarray:
        if self._session is None:
            raise EdgebcError("this backend was closed")
        feed = {self.card.input_name: validate_batch(batch, self.card)}
        return np.asarray(self._session.run([self.card.output_name], feed)[0], np.float32)

    def run_named(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._session is None:
            raise EdgebcError("this backend was closed")
        names = [o.name for o in self.card.outputs]
        presence = self.card.presence_input
        images = {k: v for k, v in feeds.items() if k != presence}
        missing = [i.name for i in self.card.inputs if i.name not in images]
        if presence is not None and missing:
            raise ValueError(
                f"model {self.card.name} takes every view input: feed the absent ones "
                f"({', '.join(missing)}) as zeros marked 0 in {presence} (edgebc.cases.case_feeds)"
            )
        checked = validate_feeds(images, self.card)
        if presence is not None:
            if presence not in feeds:
                raise ValueError(f"model {self.card.name} needs {presence}: which views are there")
            rows = len(next(iter(checked.values())))
            checked[presence] = validate_presence(feeds[presence], self.card, rows)
        values = self._session.run(names, checked)
        return {n: np.asarray(v, np.float32) for n, v in zip(names, values, strict=True)}

    def close(self) -> None:
        self._session = None
