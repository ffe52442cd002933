"""How a fusion model's exported graphs fit together: one per branch and one for the fusion head.

A fusion model (a `late_fusion` card, or any card with several inputs and no presence input: one
branch per modality) is exported as separate graphs, so that the device can compute a stored
mammogram's embedding once per case and run only the ultrasound branch and the head per frame.
A branch takes one input, or several (a multi-view mammography branch: its views share one
backbone; the card's `arch_options.branch_inputs` names them, one branch per input otherwise):

- `<name>.<branch>.onnx` per branch: its input's (N, C, H, W) tensor -> `<branch>_embedding`,
  (N, width); a multi-view branch takes each view input's (N, C, H, W) tensor and
  `<branch>_present`, (N, views) 1 where a view was given and 0 where absent (fed as zeros);
- `<name>.onnx`, the head: every branch's embedding in the model's order and `present`, (N,
  branches) 1 where that branch was given and 0 where it is absent (its embedding fed as zeros)
  -> the card's outputs (logits, fused features).

Every graph carries the same model card (its inputs, their preprocessing, which are optional) and,
beside it under `edgebc.fusion`, this layout and which of the graphs it is; the device opens any
one of them and finds the others in the same folder, each verified against MANIFEST.sha256.
TensorRT engines of the graphs (`edgebc export --tensorrt`) carry the same layout in their
sidecars, naming the engines as its files.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgebc.errors import EdgebcError
from edgebc.model_card import ModelCard

FUSION_KEY = "edgebc.fusion"
HEAD = "head"
PRESENCE = "present"


FUSION_ARCH = "late_fusion"


def is_fusion(card: ModelCard) -> bool:
    """A card of per-modality branches fused by a head: a trained `late_fusion` card (its presence
    input says which card inputs are given), or several inputs and no presence input (one branch
    each). Not a multi-view model, whose views share one backbone behind a presence input."""
    return len(card.inputs) > 1 and (card.presence_input is None or card.arch == FUSION_ARCH)


def card_branches(card: ModelCard) -> dict[str, tuple[str, ...]]:
    """Each branch's card inputs, in the model's branch order: `arch_options.branch_inputs`, or
    one branch per input."""
    grouping = card.arch_options.get("branch_inputs") or {i.name: [i.name] for i in card.inputs}
    return {str(b): tuple(str(n) for n in names) for b, names in dict(grouping).items()}


def embedding_name(branch: str) -> str:
    return f"{branch}_embedding"


def view_presence_name(branch: str) -> str:
    """A multi-view branch graph's (N, views) presence input."""
    return f"{branch}_present"


@dataclass(frozen=True)
class FusionLayout:
    """The graphs of one exported fusion model. `order` is the head's branch order (the model's),
    `files` names each graph's file (the branches by input name, and `head`), `width` is the
    embedding width, `graph` says which graph the file carrying this layout holds, and `branches`
    each branch's card inputs (empty: each branch is the input of its name)."""

    order: tuple[str, ...]
    files: Mapping[str, str]
    width: int
    graph: str
    presence: str = PRESENCE
    branches: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        branches = {b: tuple(self.branches.get(b, (b,))) for b in self.order}
        if set(self.branches) - set(self.order) or any(not v for v in branches.values()):
            raise EdgebcError(
                f"a fusion layout's branches {dict(self.branches)} are not its order "
                f"{list(self.order)}, each with at least one input"
            )
        object.__setattr__(self, "branches", branches)
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
        shapes = {i.name: i.shape for i in card.inputs}
        names = self.branches[graph]
        if len(names) == 1:
            return [(names[0], shapes[names[0]])]
        return [*((n, shapes[n]) for n in names), (view_presence_name(graph), (len(names),))]

    def outputs_of(self, graph: str, card: ModelCard) -> list[str]:
        return [o.name for o in card.outputs] if graph == HEAD else [embedding_name(graph)]

    def branch_of(self, name: str) -> str:
        """The branch that card input `name` feeds."""
        return next(b for b, names in self.branches.items() if name in names)

    def check_card(self, card: ModelCard) -> None:
        """The layout's branches take the card's inputs, each input in one branch."""
        fed = [n for b in self.order for n in self.branches[b]]
        if sorted(fed) != sorted(i.name for i in card.inputs):
            raise EdgebcError(
                f"the fusion layout's branches {dict(self.branches)} do not take the card's "
                f"inputs {[i.name for i in card.inputs]}, each once"
            )
        own = [self.presence, *map(embedding_name, self.order)]
        own += [view_presence_name(b) for b in self.order if len(self.branches[b]) > 1]
        clash = sorted(set(own) & {i.name for i in card.inputs})
        if clash:
            raise EdgebcError(f"the fusion graphs' own inputs {clash} are named like card inputs")

    def for_graph(self, graph: str) -> FusionLayout:
        return FusionLayout(self.order, dict(self.files), self.width, graph, self.presence,
                            dict(self.branches))  # fmt: skip

    def to_json(self) -> str:
        return json.dumps(
            {"order": list(self.order), "files": dict(self.files), "width": self.width,
             "graph": self.graph, "presence": self.presence,
             "branches": {b: list(v) for b, v in self.branches.items()}}, sort_keys=True,
        )  # fmt: skip

    @classmethod
    def from_json(cls, text: str, source: str = "fusion layout") -> FusionLayout:
        try:
            data: Any = json.loads(text)
            branches = {str(b): tuple(map(str, v)) for b, v in data.get("branches", {}).items()}
            return cls(tuple(data["order"]), dict(data["files"]), int(data["width"]),
                       str(data["graph"]), str(data.get("presence", PRESENCE)), branches)  # fmt: skip
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise EdgebcError(f"{source}: not a readable {FUSION_KEY} entry: {exc}") from exc


def layout_from_metadata(metadata: Mapping[str, str], source: str) -> FusionLayout | None:
    """The fusion layout in an ONNX file's metadata, or None for an ordinary model."""
    text = metadata.get(FUSION_KEY)
    return None if text is None else FusionLayout.from_json(text, f"{source}: {FUSION_KEY}")


def read_layout(path: str | Path) -> FusionLayout | None:
    """The fusion layout of the ONNX file `path`, or of the TensorRT engine `path` (its sidecar's,
    whose files are the engines: read without TensorRT), or None (another model, or neither)."""
    import onnxruntime

    suffix = Path(path).suffix.lower()
    if suffix == ".engine":
        from edgebc.backends.tensorrt.sidecar import read_sidecar, sidecar_layout

        return sidecar_layout(read_sidecar(path), str(path))
    if suffix != ".onnx":
        return None
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return layout_from_metadata(session.get_modelmeta().custom_metadata_map, str(path))
