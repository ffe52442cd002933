"""The model card: everything the device needs to run a model, carried inside the model file.

Exported ONNX files hold the card as JSON in their metadata under `edgebc.card`. The runtime
reads it with ONNX Runtime alone (no onnx, no torch) and never re-declares what it says:
class names, the preprocessing card, input/output names and shape, temperature, the operating
threshold and the sensitivity it was chosen for, evaluation metrics, the weights' sha256, the
training data fingerprint, the model's lineage (the pretrained file it started from and the
teachers it was distilled from, each by weights hash), the edgebc version and the export date.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgebc.config import from_mapping, to_mapping
from edgebc.errors import EdgebcError
from edgebc.preprocess import PreprocessCard

CARD_KEY = "edgebc.card"
CARD_SCHEMA = 1


@dataclass(frozen=True)
class ModelCard:
    name: str
    arch: str
    class_names: tuple[str, ...]
    positive_class: str
    preprocess: PreprocessCard
    input_name: str
    output_name: str
    temperature: float = 1.0
    threshold: float | None = None
    target_sensitivity: float | None = None
    precision: str = "fp32"  # fp32 | fp16 | int8
    max_batch: int = 64
    metrics: dict[str, Any] = field(default_factory=dict)
    weights_sha256: str = ""
    data_fingerprint: str = ""
    edgebc_version: str = ""
    exported: str = ""
    source_checkpoint: str = ""
    quantization: dict[str, Any] | None = None
    lineage: dict[str, Any] = field(default_factory=dict)
    schema: int = CARD_SCHEMA

    def __post_init__(self) -> None:
        if self.positive_class not in self.class_names:
            raise ValueError(
                f"positive_class {self.positive_class!r} is not among class_names {list(self.class_names)}"
            )
        if self.temperature <= 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold is a probability in [0, 1], got {self.threshold}")
        if self.schema != CARD_SCHEMA:
            raise ValueError(
                f"model card schema {self.schema} is not supported (expected {CARD_SCHEMA}); upgrade edgebc"
            )

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.preprocess.input_shape

    def to_json(self) -> str:
        return json.dumps(to_mapping(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str, source: str = "model card") -> ModelCard:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise EdgebcError(f"{source}: model card is not valid JSON: {exc}") from exc
        return from_mapping(cls, data, source=source)


def read_card(model_path: str | Path) -> ModelCard:
    """The card embedded in an ONNX file, read through ONNX Runtime's metadata (no onnx package)."""
    import onnxruntime

    path = Path(model_path)
    if not path.is_file():
        raise EdgebcError(f"{path}: model file not found")
    try:
        options = onnxruntime.SessionOptions()
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
        session = onnxruntime.InferenceSession(
            str(path), options, providers=["CPUExecutionProvider"]
        )
    except Exception as exc:
        raise EdgebcError(
            f"{path}: not a loadable ONNX model (truncated or corrupt?): {exc}"
        ) from exc
    metadata = session.get_modelmeta().custom_metadata_map
    if CARD_KEY not in metadata:
        raise EdgebcError(
            f"{path}: has no edgebc model card; export it with `edgebc export` so the device knows its preprocessing"
        )
    return ModelCard.from_json(metadata[CARD_KEY], source=f"{path}: {CARD_KEY}")
