"""A fusion checkpoint -> one ONNX graph per branch and one for the fusion head, each proven to
agree with PyTorch alone and end to end with each modality absent in turn.

Separate graphs rather than one graph with a presence input: a stored mammogram does not change
during a case, so the device computes its embedding once (the costly backbone) and then runs only
the ultrasound branch and the small head per frame; one whole graph would run every backbone on
every frame, or need the embedding as an input anyway. An absent input is no tensor of zeros run
through a backbone but a zero embedding marked 0 in the head's presence input, which the model's
`head` ignores (train/models/fusion.py). A multi-view branch (the mammogram views behind one
backbone) is one graph taking each view and the views' presence, so the device embeds a case's
views once. The layout is edgebc.fusion_graphs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgebc.errors import EdgebcError
from edgebc.export.onnx_export import (
    DEFAULT_OPSET,
    ParityResult,
    card_for_export,
    embed_card,
    parity_of,
    presence_patterns,
    run_onnx,
    verification_feeds,
    write_graph,
)
from edgebc.fusion_graphs import (
    FUSION_KEY,
    HEAD,
    FusionLayout,
    card_branches,
    embedding_name,
    is_fusion,
    view_presence_name,
)
from edgebc.model_card import ModelCard
from edgebc.optional import require

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FusionParity:
    """ONNX Runtime against PyTorch: each branch's embedding, the head on the torch embeddings
    under every presence pattern, and the whole path (ONNX branches into the ONNX head) with
    every modality present and with each one alone (the others absent), by pattern name."""

    branches: dict[str, float]  # largest absolute embedding difference per branch
    head: ParityResult
    head_features: float  # largest absolute difference of the fused features
    end_to_end: dict[str, ParityResult]  # "us+mg", "us", "mg": the branches present
    tolerance: float

    @property
    def worst(self) -> float:
        return max([*self.branches.values(), self.head.max_abs_logit_diff, self.head_features,
                    *(p.max_abs_logit_diff for p in self.end_to_end.values())])  # fmt: skip

    @property
    def ok(self) -> bool:
        return self.worst <= self.tolerance


@dataclass(frozen=True)
class FusionExport:
    head: Path  # the file to name as the model (`edgebc classify MODEL`); its siblings beside it
    files: dict[str, Path]  # graph name (branch name, or "head") -> file
    card: ModelCard
    layout: FusionLayout
    parity: FusionParity


def fusion_files(name: str, order: list[str]) -> dict[str, str]:
    return {**{n: f"{name}.{n}.onnx" for n in order}, HEAD: f"{name}.onnx"}


def export_fusion(
    checkpoint: str | Path,
    out_dir: str | Path,
    name: str = "model",
    opset: int = DEFAULT_OPSET,
    max_batch: int = 64,
    exporter: str = "dynamo",
    tolerance: float = 1e-3,
) -> FusionExport:
    """Export a fusion checkpoint as its branch graphs and head graph into `out_dir`."""
    torch = require("torch", "ONNX export")
    from edgebc.train.checkpoint import load_checkpoint, model_from_checkpoint

    loaded = load_checkpoint(checkpoint)
    if not is_fusion(loaded.card):
        raise EdgebcError(
            f"{checkpoint}: not a fusion model (branches fused by a head); use export_onnx"
        )
    model = model_from_checkpoint(loaded)
    order = list(model.order)
    card = card_for_export(loaded.card, name, max_batch, str(checkpoint))
    width = int(model.project[order[0]].out_features)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    branches = card_branches(card)
    if list(branches) != order:
        raise EdgebcError(
            f"{checkpoint}: the card's branches {list(branches)} are not the model's {order}"
        )
    layout = FusionLayout(tuple(order), fusion_files(name, order), width, HEAD, branches=branches)
    layout.check_card(card)
    modules = _graph_modules(model, layout)
    files: dict[str, Path] = {}
    for graph in [*order, HEAD]:
        path = out / layout.files[graph]
        inputs = [n for n, _ in layout.inputs_of(graph, card)]
        examples = tuple(torch.zeros(2, *shape) for _, shape in layout.inputs_of(graph, card))
        if graph == HEAD or len(layout.branches[graph]) > 1:  # the last input is a presence
            examples = (*examples[:-1], torch.ones_like(examples[-1]))
        write_graph(modules[graph], examples, inputs, layout.outputs_of(graph, card), path, opset,
                    max_batch, exporter, describe_graph(card, layout.for_graph(graph)))  # fmt: skip
        files[graph] = path
    parity = compare_fusion_with_torch(model, card, layout, files, tolerance)
    if not parity.ok:
        for path in files.values():
            path.unlink()
        raise EdgebcError(
            f"{out}: ONNX Runtime and PyTorch disagree by up to {parity.worst:.3g} in a fusion "
            f"graph (tolerance {tolerance:g}); export refused"
        )
    return FusionExport(files[HEAD], files, card, layout, parity)


def describe_graph(card: ModelCard, layout: FusionLayout) -> Any:
    """A function that puts `card` and `layout` (which graph this is) into a graph's metadata."""

    def describe(graph: Any) -> None:
        embed_card(graph, card)
        for index in reversed(range(len(graph.metadata_props))):
            if graph.metadata_props[index].key == FUSION_KEY:
                del graph.metadata_props[index]
        entry = graph.metadata_props.add()
        entry.key, entry.value = FUSION_KEY, layout.to_json()
        role = "fusion head" if layout.graph == HEAD else f"{layout.graph} branch"
        graph.doc_string += f" ({role} of the fusion model {card.name})"

    return describe


def _graph_modules(model: Any, layout: FusionLayout) -> dict[str, Any]:
    """The torch modules the graphs are exported from: each branch's `embed` (a multi-view
    branch's views stacked, then their presence), and `head`."""
    torch = require("torch", "ONNX export")

    class Branch(torch.nn.Module):
        def __init__(self, name: str) -> None:
            super().__init__()
            self.model, self.name = model, name
            self.views = len(layout.branches[name]) > 1

        def forward(self, *inputs: Any) -> Any:
            if self.views:
                return self.model.embed(self.name, torch.stack(inputs[:-1], dim=1), inputs[-1])
            return self.model.embed(self.name, inputs[0])

    class Head(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *inputs: Any) -> Any:  # the embeddings in order, then the presence
            return self.model.head(list(inputs[:-1]), inputs[-1])

    return {**{n: Branch(n).eval() for n in model.order}, HEAD: Head().eval()}


GraphRun = Callable[[str, dict[str, np.ndarray]], dict[str, np.ndarray]]
"""Runs one graph of a fusion model (a branch name, or "head") on feeds: its outputs by name."""


def compare_fusion_with_torch(
    model: Any, card: ModelCard, layout: FusionLayout, files: dict[str, Path], tolerance: float
) -> FusionParity:
    """Each graph and the whole path against PyTorch on the verification inputs (fixed random
    tensors and phantoms of every class for each input's modality)."""
    torch = require("torch", "ONNX export")

    def torch_run(graph: str, fed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.inference_mode():
            if graph == HEAD:
                logits, features = model.head(
                    [torch.from_numpy(fed[embedding_name(n)]) for n in layout.order],
                    torch.from_numpy(fed[layout.presence]),
                )
                features_name = next((o.name for o in card.outputs if o.kind == "features"), "")
                return {card.output_name: logits.numpy(), features_name: features.numpy()}
            names = layout.branches[graph]
            if len(names) == 1:
                embedded = model.embed(graph, torch.from_numpy(fed[names[0]]))
            else:
                views = torch.stack([torch.from_numpy(fed[v]) for v in names], dim=1)
                present = torch.from_numpy(fed[view_presence_name(graph)])
                embedded = model.embed(graph, views, present)
            return {embedding_name(graph): embedded.numpy()}

    return compare_fusion_runs(card, layout, torch_run, onnx_run(card, layout, files), tolerance)


def onnx_run(card: ModelCard, layout: FusionLayout, files: Mapping[str, Path]) -> GraphRun:
    """The fusion graphs `files` on ONNX Runtime's CPU provider."""

    def run(graph: str, fed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {o: run_onnx(files[graph], fed, o) for o in layout.outputs_of(graph, card)}

    return run


def compare_fusion_runs(
    card: ModelCard, layout: FusionLayout, reference: GraphRun, candidate: GraphRun,
    tolerance: float,
) -> FusionParity:  # fmt: skip
    """`candidate`'s graphs against `reference`'s on the verification inputs: each branch's
    embedding, the head on the reference embeddings under every presence pattern (logits and
    fused features), and the whole path (each side's branches into its own head) with every
    modality present and with each one alone."""
    feeds = verification_feeds(card)
    order = list(layout.order)
    rows = len(feeds[card.inputs[0].name])
    branch_feeds = {n: _branch_feeds(layout, n, feeds, rows) for n in order}
    expected = {n: reference(n, branch_feeds[n])[embedding_name(n)] for n in order}
    actual = {n: candidate(n, branch_feeds[n])[embedding_name(n)] for n in order}
    branches = {n: _max_diff(expected[n], actual[n]) for n in order}

    def head_feeds(embeddings: dict[str, np.ndarray], present: np.ndarray) -> dict[str, np.ndarray]:
        # an absent branch is fed as zeros, as the device feeds it
        fed = {embedding_name(n): embeddings[n] * present[:, [k]] for k, n in enumerate(order)}
        return {**fed, layout.presence: present}

    features_name = next((o.name for o in card.outputs if o.kind == "features"), None)
    fed = head_feeds(expected, presence_patterns(rows, len(order)))
    want, got = reference(HEAD, fed), candidate(HEAD, fed)
    head = parity_of(want[card.output_name], got[card.output_name], tolerance, card)
    head_features = _max_diff(want[features_name], got[features_name]) if features_name else 0.0
    end_to_end = {}
    for present in [tuple(order), *((n,) for n in order)]:
        mask = np.tile(np.array([[n in present for n in order]], np.float32), (rows, 1))
        want_logits = reference(HEAD, head_feeds(expected, mask))[card.output_name]
        got_logits = candidate(HEAD, head_feeds(actual, mask))[card.output_name]
        end_to_end["+".join(present)] = parity_of(want_logits, got_logits, tolerance, card)
    return FusionParity(branches, head, head_features, end_to_end, tolerance)


def compare_fusion_engines(
    onnx_head: str | Path, engines: Mapping[str, Path], tolerance: float = 0.05
) -> FusionParity:
    """A fusion export's TensorRT engines (edgebc.backends.tensorrt.build_fusion_engines) against
    the ONNX graphs they were built from (`onnx_head` and its siblings), every presence pattern;
    the tolerance is the single-model engine check's (FP16 arithmetic, not FP32)."""
    from edgebc.backends.tensorrt import TensorRTBackend
    from edgebc.fusion_graphs import read_layout
    from edgebc.model_card import read_card

    onnx_head = Path(onnx_head)
    layout, card = read_layout(onnx_head), read_card(onnx_head)
    if layout is None:
        raise EdgebcError(f"{onnx_head}: not the head of an exported fusion model")
    files = {g: onnx_head.parent / f for g, f in layout.files.items()}
    opened: dict[str, TensorRTBackend] = {}
    try:
        for graph, engine in engines.items():
            opened[graph] = TensorRTBackend(Path(engine), warmup=1)
        return compare_fusion_runs(card, layout, onnx_run(card, layout, files),
                                   lambda g, fed: opened[g].run_named(fed), tolerance)  # fmt: skip
    finally:
        for backend in opened.values():
            backend.close()


def _branch_feeds(
    layout: FusionLayout, branch: str, feeds: dict[str, np.ndarray], rows: int
) -> dict[str, np.ndarray]:
    """A branch graph's verification feeds: its input's, or its views' under every presence
    pattern (an absent view fed as zeros, as the device feeds it)."""
    names = layout.branches[branch]
    if len(names) == 1:
        return {names[0]: feeds[names[0]]}
    present = presence_patterns(rows, len(names))
    fed = {v: feeds[v] * present[:, k, None, None, None] for k, v in enumerate(names)}
    return {**fed, view_presence_name(branch): present}


def _max_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b).max())
