"""OpenVINO backend (x86 carts are mostly Intel): the same guarantees as the ONNX Runtime backend
(manifest check, the card from the model or its release, every input validated) with the
precision stated, never left to the CPU.

OpenVINO's CPU plugin runs a float model in BF16 by itself on a CPU with BF16 instructions (its
inference precision hint defaults to bf16 there), which changes the outputs; the hint is therefore
always set here and read back from the compiled model: "fp32" runs f32, "bf16" runs bf16 (refused
on a CPU without BF16, where OpenVINO would run f32 under that name), and "int8" runs the QDQ model
`edgebc export --int8` writes (its quantized convolutions in u8/i8, the rest in f32). OpenVINO is
imported inside the constructor, failing with its install command.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from edgebc.backends import checked_feeds, declared_inputs, warmup_feeds
from edgebc.errors import EdgebcError
from edgebc.fusion_graphs import FusionLayout, read_layout
from edgebc.integrity import sha256_file, verify_artifact
from edgebc.optional import require
from edgebc.release import card_for_model

PRECISIONS = ("fp32", "bf16", "int8")
# the inference precision hint per precision: int8 keeps the graph's float parts in f32, as
# ONNX Runtime runs them
_HINT = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}


class OpenVinoBackend:
    def __init__(
        self,
        path: Path,
        precision: str | None = None,
        threads: int = 1,
        warmup: int = 3,
        device: str = "CPU",
    ) -> None:
        """`precision` None is the file's own (int8 for the QDQ export, else fp32); `threads` 0
        leaves the thread count to OpenVINO (with the latency hint: every core)."""
        ov = require("openvino", "the OpenVINO backend")
        path = Path(path)
        if precision is not None and precision not in PRECISIONS:
            raise EdgebcError(f"OpenVINO precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")  # fmt: skip
        if threads < 0:
            raise EdgebcError(f"threads must be 0 (OpenVINO's choice) or more, got {threads}")
        self.model_sha256 = verify_artifact(path) or sha256_file(path)
        self.card = card_for_model(path)
        quantized = self.card.precision == "int8"
        precision = precision or ("int8" if quantized else "fp32")
        if quantized != (precision == "int8"):
            raise EdgebcError(
                f"{path}: a model exported as {self.card.precision} cannot run as OpenVINO "
                f"{precision}: "
                + ("int8 runs the QDQ model `edgebc export --int8` writes (model.int8.onnx)"
                   if precision == "int8" else "run it as int8, or give the FP32 model.onnx")
            )  # fmt: skip
        quant_format = (self.card.quantization or {}).get("format", "qdq") if quantized else None
        if quant_format not in (None, "qdq"):
            raise EdgebcError(
                f"{path}: OpenVINO runs INT8 from the QDQ export, and this model is {quant_format} "
                "(the INT8 search kept the format fastest on ONNX Runtime); export a QDQ model "
                "with `edgebc export --int8 --no-int8-search`"
            )
        core = ov.Core()
        if device not in core.available_devices:
            raise EdgebcError(f"OpenVINO has no device {device} here (available: {', '.join(core.available_devices)})")  # fmt: skip
        if precision == "bf16" and "BF16" not in core.get_property(device, "OPTIMIZATION_CAPABILITIES"):  # fmt: skip
            raise EdgebcError(
                f"this {device} has no BF16 instructions: OpenVINO would run FP32 under the name "
                "bf16; choose fp32 (or int8)"
            )
        self.fusion: FusionLayout | None = read_layout(path)
        declared = declared_inputs(self.card, self.fusion)
        config: dict[str, Any] = {
            "INFERENCE_PRECISION_HINT": _HINT[precision],
            "PERFORMANCE_HINT": "LATENCY",
        }
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        try:
            self._compiled: Any = core.compile_model(core.read_model(str(path)), device, config)
        except Exception as exc:
            raise EdgebcError(f"{path}: OpenVINO could not load the model: {exc}") from exc
        # the precision is checked where it takes effect, not assumed from the request
        ran = self._compiled.get_property("INFERENCE_PRECISION_HINT").to_string()
        if ran != _HINT[precision]:
            raise EdgebcError(
                f"{path}: OpenVINO compiled the model for {ran}, not the {_HINT[precision]} asked for"
            )
        graph = [(i.get_any_name(), _shape_after_batch(i)) for i in self._compiled.inputs]
        if graph != declared:
            raise EdgebcError(f"{path}: the graph's inputs {graph} disagree with its card {declared}")  # fmt: skip
        outputs = {name for o in self._compiled.outputs for name in o.get_names()}
        self.outputs: tuple[str, ...] = (
            tuple(self.fusion.outputs_of(self.fusion.graph, self.card))
            if self.fusion is not None
            else tuple(o.name for o in self.card.outputs)
        )
        if any(name not in outputs for name in self.outputs):
            raise EdgebcError(
                f"{path}: the graph's outputs {sorted(outputs)} lack the card's {list(self.outputs)}"
            )
        self.precision = precision
        self.name = f"openvino:{device}:{precision}"
        self._request: Any = self._compiled.create_infer_request()
        # one infer request, which is not thread-safe (an ONNX Runtime session is): runs queue
        self._lock = threading.Lock()
        feeds = warmup_feeds(self.card, self.fusion, declared)
        for _ in range(warmup):
            self._infer(feeds)

    def run(self, batch: np.ndarray) -> np.ndarray:
        if self.fusion is not None or len(self.card.inputs) != 1 or self.card.presence_input:
            raise EdgebcError(f"model {self.card.name} takes several inputs; run it with run_named")  # fmt: skip
        checked = checked_feeds({self.card.input_name: batch}, self.card, None)
        return self._infer(checked)[self.card.output_name]

    def run_named(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Every output by name for every input by name (checked as ONNX Runtime checks them)."""
        return self._infer(checked_feeds(feeds, self.card, self.fusion))

    def _infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._request is None:
            raise EdgebcError("this backend was closed")
        rows = len(next(iter(feeds.values())))
        with self._lock:
            results = self._request.infer(dict(feeds))
            out = {
                name: np.array(results[self._compiled.output(name)], np.float32)
                for name in self.outputs
            }
        # seen: BF16 under ONEDNN_MAX_CPU_ISA=AVX2 gave (0, classes) for any batch, no error
        wrong = {name: v.shape for name, v in out.items() if v.ndim < 1 or len(v) != rows}
        if wrong:
            raise EdgebcError(f"OpenVINO ({self.name}) answered {wrong} for a batch of {rows}: refusing the result")  # fmt: skip
        return out

    def close(self) -> None:
        self._request, self._compiled = None, None


def _shape_after_batch(port: Any) -> tuple[int, ...]:
    """An input's shape without its batch dimension (-1 where the graph leaves a size open)."""
    return tuple(d.get_length() if d.is_static else -1 for d in list(port.get_partial_shape())[1:])
