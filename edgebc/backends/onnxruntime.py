"""ONNX Runtime backend: provider choice, thread settings, warm-up, integrity and shape checks,
and the card a release gives the model (edgebc.release). A multi-view model's presence input
(edgebc.cases) is fed beside its views and checked like them. A graph of an exported fusion model
(edgebc.fusion_graphs: a branch, or the fusion head) takes and gives what its layout says: a
branch its input's image batch (a multi-view branch its views' and their presence) and its
embedding, the head the embeddings and their presence."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnxruntime

from edgebc.backends import checked_feeds, validate_batch
from edgebc.errors import EdgebcError
from edgebc.fusion_graphs import HEAD, FusionLayout, layout_from_metadata, view_presence_name
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
        metadata = self._session.get_modelmeta().custom_metadata_map
        self.fusion: FusionLayout | None = layout_from_metadata(metadata, str(path))
        graph = [(i.name, tuple(i.shape[1:])) for i in self._session.get_inputs()]
        declared = self._declared_inputs()
        if graph != declared:
            raise EdgebcError(
                f"{path}: the graph's inputs {graph} disagree with its card {declared}"
            )
        outputs = {o.name for o in self._session.get_outputs()}
        # the outputs run_named returns: the card's, or a fusion graph's own (a branch's embedding)
        self.outputs: tuple[str, ...] = tuple(o.name for o in self.card.outputs)
        if self.fusion is not None:
            self.outputs = tuple(self.fusion.outputs_of(self.fusion.graph, self.card))
        if any(name not in outputs for name in self.outputs):
            raise EdgebcError(
                f"{path}: the graph's outputs {sorted(outputs)} lack the card's {list(self.outputs)}"
            )
        self.name = f"onnxruntime:{self._session.get_providers()[0]}"
        zeros = {name: np.zeros((1, *shape), np.float32) for name, shape in declared}
        if self.card.presence_input is not None and self.fusion is None:
            zeros[self.card.presence_input] = np.ones((1, len(self.card.inputs)), np.float32)
        if self.fusion is not None and self.fusion.graph == HEAD:
            zeros[self.fusion.presence] = np.ones((1, len(self.fusion.order)), np.float32)
        elif self.fusion is not None and len(self.fusion.branches[self.fusion.graph]) > 1:
            views = len(self.fusion.branches[self.fusion.graph])
            zeros[view_presence_name(self.fusion.graph)] = np.ones((1, views), np.float32)
        for _ in range(warmup):
            self.run_named(zeros)

    def _declared_inputs(self) -> list[tuple[str, tuple[int, ...]]]:
        """(name, shape without the batch) of every input the card (or fusion layout) declares."""
        if self.fusion is not None:
            self.fusion.check_card(self.card)
            return self.fusion.inputs_of(self.fusion.graph, self.card)
        declared: list[tuple[str, tuple[int, ...]]] = [(i.name, i.shape) for i in self.card.inputs]
        if self.card.presence_input is not None:
            declared.append((self.card.presence_input, (len(self.card.inputs),)))
        return declared

    def run(self, batch: np.ndarray) -> np.ndarray:
        if self._session is None:
            raise EdgebcError("this backend was closed")
        feed = {self.card.input_name: validate_batch(batch, self.card)}
        return np.asarray(self._session.run([self.card.output_name], feed)[0], np.float32)

    def run_named(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._session is None:
            raise EdgebcError("this backend was closed")
        # one check of the feeds for every backend (edgebc.backends.checked_feeds)
        checked = checked_feeds(feeds, self.card, self.fusion)
        names = list(self.outputs)
        values = self._session.run(names, checked)
        return {n: np.asarray(v, np.float32) for n, v in zip(names, values, strict=True)}

    def close(self) -> None:
        self._session = None
