"""A checkpoint behind the runtime's Backend protocol, in PyTorch: the benchmark's torch rows, the
evaluator's checkpoint path, and the module itself for Grad-CAM. Training side only (it imports
torch); the runtime's backends never need it.
"""

from __future__ import annotations

import gc
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from edgebc.backends import validate_batch, validate_feeds
from edgebc.errors import EdgebcError
from edgebc.integrity import sha256_file
from edgebc.model_card import ModelCard
from edgebc.optional import require

torch = require("torch", "PyTorch backends")


class TorchBackend:
    """Logits of a checkpoint's model for float32 NCHW batches of any size (run in chunks of the
    card's max_batch), with the card the export would write. `threads` sets torch's CPU threads
    for the whole process (torch has no per-model setting); 0 leaves them alone."""

    def __init__(self, checkpoint: Path, device: str = "cpu", threads: int = 0) -> None:
        checkpoint = Path(checkpoint)
        if threads:
            torch.set_num_threads(threads)
        self.device = torch.device(device)
        self.card, model, self.config = _card_and_model(checkpoint)
        self._module: Any = model.to(self.device).eval()
        self._named: Any = None  # the module returning every card output, built when first asked
        self.model_sha256 = sha256_file(checkpoint)
        self.name = f"torch:{device}"

    @property
    def trained_localiser(self) -> list[str]:
        """The localiser file its training read crops through (`data.localiser`), as
        lesion_crop_of's `also`: where a checkpoint's crops come from before an export links one."""
        data = (self.config or {}).get("data") or {}
        return [data["localiser"]] if data.get("localiser") else []

    @property
    def module(self) -> Any:
        """The torch model (eval mode, on `device`), for what needs gradients such as Grad-CAM."""
        if self._module is None:
            raise EdgebcError("this backend was closed")
        return self._module

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Logits (N, classes) for a float32 (N, C, H, W) batch, N >= 1, checked like the runtime
        checks its inputs."""
        if not isinstance(batch, np.ndarray) or batch.ndim != 4 or len(batch) == 0:
            validate_batch(batch, self.card)  # raises, saying what is wrong
        step = self.card.max_batch
        chunks = (
            validate_batch(batch[i : i + step], self.card) for i in range(0, len(batch), step)
        )
        return np.concatenate([self._forward(chunk) for chunk in chunks])

    def run_named(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Every output by name for one batch per card input (several-input models too)."""
        from edgebc.train.models.features import model_for_card

        checked = validate_feeds(feeds, self.card)
        if self._named is None:
            self._named = model_for_card(self.module, self.card)
        with torch.inference_mode():
            produced = self._named(
                *(torch.from_numpy(checked[i.name]).to(self.device) for i in self.card.inputs)
            )
        values = produced if isinstance(produced, (tuple, list)) else (produced,)
        return {
            output.name: np.asarray(value.float().cpu().numpy(), np.float32)
            for output, value in zip(self.card.outputs, values, strict=True)
        }

    def sync(self) -> None:
        """Wait for the device, so a timing around run() includes the work (CUDA runs async)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def close(self) -> None:
        """Drop the model and give its device memory back before the next backend loads."""
        self._module = self._named = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _forward(self, chunk: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            logits = self.module(torch.from_numpy(chunk).to(self.device))
        return np.asarray(logits.float().cpu().numpy(), np.float32)


class CudaGraphsTorchBackend(TorchBackend):
    """FP16, channels-last, and one CUDA graph per batch shape, captured on first use: a replay
    launches the whole network at once instead of one kernel launch per layer from Python."""

    def __init__(self, checkpoint: Path) -> None:
        super().__init__(checkpoint, "cuda")
        self._module = self._module.half().to(memory_format=torch.channels_last)
        self._graphs: dict[tuple[int, ...], tuple[Any, Any, Any]] = {}
        self.name = "torch:cuda-fp16-graphs"

    def close(self) -> None:
        self._graphs.clear()
        super().close()

    def _forward(self, chunk: np.ndarray) -> np.ndarray:
        if chunk.shape not in self._graphs:
            self._graphs[chunk.shape] = self._capture(chunk.shape)
        graph, static_in, static_out = self._graphs[chunk.shape]
        static_in.copy_(torch.from_numpy(chunk))  # host to device, to FP16, to channels-last
        graph.replay()
        return np.asarray(static_out.float().cpu().numpy(), np.float32)

    def _capture(self, shape: tuple[int, ...]) -> tuple[Any, Any, Any]:
        model = self.module
        static_in = torch.zeros(shape, device=self.device, dtype=torch.float16).contiguous(
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


def _card_and_model(checkpoint: Path) -> tuple[ModelCard, Any, dict[str, Any]]:
    """The card the export would embed, the rebuilt model (eval mode, CPU) and the training
    configuration: the one place this module reads a checkpoint, so a change of the checkpoint's
    format changes only this."""
    from edgebc.export.onnx_export import card_for_export
    from edgebc.train.checkpoint import load_checkpoint, model_from_checkpoint
    from edgebc.train.models.features import card_with_features

    loaded = load_checkpoint(checkpoint)
    model = model_from_checkpoint(loaded)
    card = card_for_export(card_with_features(loaded.card, model), name=checkpoint.stem,
                           max_batch=64, source=str(checkpoint))  # fmt: skip
    return card, model, dict(loaded.config or {})
