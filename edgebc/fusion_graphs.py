"""How a fusion model's exported graphs fit together: one per branch and one for the fusion head.

A fusion model (a card with several inputs and no presence input: one branch per modality) is
exported as separate graphs, so that the device can compute a stored mammogram's embedding once
per case and run only the ultrasound branch and the head per frame:

- `<name>.<input>.onnx` per branch: the input's (N, C, H, W) tensor -> `<input>_embedding`, (N, width);
- `<name>.onnx`, the head: every branch's embedding in the model's order and `present`, (N,
  branches) 1 where that input was given and 0 where it is absent (its embedding fed as zeros) ->
  the card's outputs (logits, fused features).

Every graph carries the same model card (its inputs, their preprocessing, which are optional) and,
beside it under `edgebc.fusion`, this layout and which of the graphs it is; the device opens any
one of them and finds the others in the same folder, each verified against MANIFEST.sha256.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgebc.errors import EdgebcError
from edgebc.model_card import ModelCard

FUSION_KEY = "edgebc.fusion"
HEAD = "head"
PRESENCE = "present"


def is_fusion(card: ModelCard) -> bool:
    """A card of per-modality branches fused by a head (not a multi-view model, whose views share
    one backbone behind a presence input)."""
    return len(card.inputs) > 1 and card.presence_input is None


def embedding_name(branch: str) -> str:
    return f"{branch}_embedding"


@dataclass(frozen=True)
class FusionLayout:
    """The graphs of one exported fusion model. `order` is the head's branch order (the model's),
    `files` names each graph's file (the branches by input name, and `head`), `width` is the
    embedding width, and `graph` says which graph the file carrying this layout holds."""

    order: tuple[str, ...]
    files: Mapping[str, str]
    width: int
    graph: str
    presence: str = PRESENCE

    def __post_init__(self) -> None:
        expected = {*self.order, HEAD}
        if set(self.files) != expected:
            raise EdgebcError(
                f"a fusion layout names the files of {sorted(expected)}, got {sorted(self.files)}"
            )
        if self.graph not in expected:
            raise EdgebcError(
                f"a fusion layout's graph is one of {sorted(expected)}, got {self.graph!r}"
            )
        if self.width < 1:
            raise EdgebcError(
                f"a fusion layout's embedding width must be positive, got {self.width}"
            )

    def inputs_of(self, graph: str, card: ModelCard) -> list[tuple[str, tuple[int, ...]]]:
        """(name, shape without the batch) of every input of `graph`."""
        declared: list[tuple[str, tuple[int, ...]]]
        if graph == HEAD:
            declared = [(embedding_name(n), (self.width,)) for n in self.order]
            return [*declared, (self.presence, (len(self.order),))]
        shape = next(i.shape for i in card.inputs if i.name == graph)
        return [(graph, shape)]

    def outputs_of(self, graph: str, card: ModelCard) -> list[str]:
        return [o.name for o in card.outputs] if graph == HEAD else [embedding_name(graph)]

    def check_card(self, card: ModelCard) -> None:
        """The layout's branches are the card's inputs, one each."""
        if sorted(self.order) != sorted(i.name for i in card.inputs):
            raise EdgebcError(
                f"the fusion layout's branches {list(self.order)} are not the card's inputs "
                f"{[i.name for i in card.inputs]}"
            )

    def for_graph(self, graph: str) -> FusionLayout:
        return FusionLayout(self.order, dict(self.files), self.width, graph, self.presence)

    def to_json(self) -> str:
        return json.dumps(
            {"order": list(self.order), "files": dict(self.files), "width": self.width,
             "graph": self.graph, "presence": self.presence}, sort_keys=True,
        )  # fmt: skip

    @classmethod
    def from_json(cls, text: str, source: str = "fusion layout") -> FusionLayout:
        try:
            data: Any = json.loads(text)
            return cls(tuple(data["order"]), dict(data["files"]), int(data["width"]),
                       str(data["graph"]), str(data.get("presence", PRESENCE)))  # fmt: skip
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise EdgebcError(f"{source}: not a readable {FUSION_KEY} entry: {exc}") from exc


def layout_from_metadata(metadata: Mapping[str, str], source: str) -> FusionLayout | None:
    """The fusion layout in an ONNX file's metadata, or None for an ordinary model."""
    text = metadata.get(FUSION_KEY)
    return None if text is None else FusionLayout.from_json(text, f"{source}: {FUSION_KEY}")


def read_layout(path: str | Path) -> FusionLayout | None:
    """The fusion layout of the ONNX file `path`, or None (another model, or not ONNX)."""
    import onnxruntime

    if Path(path).suffix.lower() != ".onnx":
        return None
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return layout_from_metadata(session.get_modelmeta().custom_metadata_map, str(path))
