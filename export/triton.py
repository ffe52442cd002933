"""A Triton Inference Server model repository for sites that centralise inference.

`model_repository/<name>/1/model.onnx` and `config.pbtxt` with the model's real input and output
(names, dtypes, dims without the batch axis), its maximum batch size, dynamic batching, and the
model card as a parameter so a client can fetch the preprocessing from Triton's model config.

A fusion model (edgebc.fusion_graphs) becomes one such entry per graph (`<name>_<branch>`,
`<name>_head`) and an ensemble `<name>` taking every card input (one per modality or view), each
multi-view branch's view presence and the head's branch presence, with the head's outputs. The
ensemble runs every branch on every request (a client feeds an absent input as zeros marked 0);
a client that keeps a case's mammogram embedding calls the ultrasound branch and the head itself.
Dynamic batching is set on the graphs the ensemble schedules (an ensemble has none of its own).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edgebc.atomic import atomic_write_bytes, atomic_write_text
from edgebc.errors import EdgebcError
from edgebc.model_card import ModelCard, read_card

_TYPES = {"tensor(float)": "TYPE_FP32", "tensor(float16)": "TYPE_FP16"}


def write_triton_repository(onnx_path: str | Path, repository: str | Path, name: str | None = None, gpu: bool = False,
                            preferred_batch: tuple[int, ...] = (4, 8), queue_delay_us: int = 2000) -> Path:  # fmt: skip
    """Write the repository entry for `onnx_path`; returns the model folder."""
    import onnxruntime

    onnx_path = Path(onnx_path)
    card = read_card(onnx_path)
    name = name or card.name
    folder = Path(repository) / name
    atomic_write_bytes(folder / "1" / "model.onnx", onnx_path.read_bytes())
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    atomic_write_text(
        folder / "config.pbtxt",
        render_config(name, card, session, gpu, preferred_batch, queue_delay_us),
    )
    return folder


def render_config(
    name: str,
    card: ModelCard,
    session: object,
    gpu: bool,
    preferred_batch: tuple[int, ...],
    queue_delay_us: int,
) -> str:
    card_text = json.dumps(card.to_json())  # a JSON string literal is a valid protobuf text string
    batches = ", ".join(str(b) for b in preferred_batch if b <= card.max_batch)
    return (
        f'name: "{name}"\nplatform: "onnxruntime_onnx"\nmax_batch_size: {card.max_batch}\n'
        + _tensors("input", session.get_inputs())  # type: ignore[attr-defined]
        + _tensors("output", session.get_outputs())  # type: ignore[attr-defined]
        + f"dynamic_batching {{\n  preferred_batch_size: [ {batches} ]\n  max_queue_delay_microseconds: {queue_delay_us}\n}}\n"
        + f"instance_group [ {{ count: 1\n  kind: {'KIND_GPU' if gpu else 'KIND_CPU'} }} ]\n"
        + f'parameters {{\n  key: "edgebc.card"\n  value: {{ string_value: {card_text} }}\n}}\n'
    )


def write_fusion_repository(head_path: str | Path, repository: str | Path, name: str | None = None,
                            gpu: bool = False) -> Path:  # fmt: skip
    """Write a fusion export's graphs (the head at `head_path`, its branches beside it) and the
    ensemble over them; returns the ensemble's folder."""
    import onnxruntime

    from edgebc.fusion_graphs import HEAD, read_layout

    head_path = Path(head_path)
    layout, card = read_layout(head_path), read_card(head_path)
    if layout is None:
        raise EdgebcError(f"{head_path}: not the head graph of an exported fusion model")
    name = name or card.name
    sessions: dict[str, Any] = {}
    for graph in [*layout.order, HEAD]:
        path = head_path.parent / layout.files[graph]
        write_triton_repository(path, repository, f"{name}_{graph}", gpu)
        sessions[graph] = onnxruntime.InferenceSession(
            str(path), providers=["CPUExecutionProvider"]
        )
    folder = Path(repository) / name
    (folder / "1").mkdir(parents=True, exist_ok=True)  # Triton wants a version folder, even empty
    atomic_write_text(folder / "config.pbtxt", render_ensemble(name, card, layout.order, sessions))
    return folder


def render_ensemble(
    name: str, card: ModelCard, order: Sequence[str], sessions: dict[str, Any]
) -> str:
    """The ensemble's config: its inputs are every branch graph's inputs and the head's presence,
    its outputs the head's; one step per branch, then the head fed the branches' embeddings."""
    from edgebc.fusion_graphs import HEAD

    made = {o.name for b in order for o in sessions[b].get_outputs()}
    inputs = [i for b in order for i in sessions[b].get_inputs()]
    inputs += [i for i in sessions[HEAD].get_inputs() if i.name not in made]
    steps = []
    for graph in [*order, HEAD]:
        ins = "".join(f'      input_map {{ key: "{i.name}" value: "{i.name}" }}\n'
                      for i in sessions[graph].get_inputs())  # fmt: skip
        outs = "".join(f'      output_map {{ key: "{o.name}" value: "{o.name}" }}\n'
                       for o in sessions[graph].get_outputs())  # fmt: skip
        steps.append(
            f'    {{\n      model_name: "{name}_{graph}"\n      model_version: -1\n{ins}{outs}    }}'
        )
    card_text = json.dumps(card.to_json())
    return (
        f'name: "{name}"\nplatform: "ensemble"\nmax_batch_size: {card.max_batch}\n'
        + _tensors("input", inputs)
        + _tensors("output", sessions[HEAD].get_outputs())
        + "ensemble_scheduling {\n  step [\n"
        + ",\n".join(steps)
        + "\n  ]\n}\n"
        + f'parameters {{\n  key: "edgebc.card"\n  value: {{ string_value: {card_text} }}\n}}\n'
    )


def _tensors(kind: str, items: Sequence[Any]) -> str:
    """A config's `input [...]` or `output [...]` from ONNX Runtime's node args (batch axis off)."""
    blocks = []
    for item in items:
        dims = ", ".join(str(d) for d in item.shape[1:])
        blocks.append(
            f'  {{\n    name: "{item.name}"\n    data_type: {_TYPES[item.type]}\n    dims: [ {dims} ]\n  }}'
        )
    return f"{kind} [\n" + ",\n".join(blocks) + "\n]\n"
