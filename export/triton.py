"""A Triton Inference Server model repository for sites that centralise inference.

`model_repository/<name>/1/model.onnx` and `config.pbtxt` with the model's real input and output
(names, dtypes, dims without the batch axis), its maximum batch size, dynamic batching, and the
model card as a parameter so a client can fetch the preprocessing from Triton's model config.
"""

from __future__ import annotations

import json
from pathlib import Path

from edgebc.atomic import atomic_write_bytes, atomic_write_text
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
    def tensors(kind: str, items: list) -> str:  # type: ignore[type-arg]
        blocks = []
        for item in items:
            dims = ", ".join(str(d) for d in item.shape[1:])
            blocks.append(
                f'  {{\n    name: "{item.name}"\n    data_type: {_TYPES[item.type]}\n    dims: [ {dims} ]\n  }}'
            )
        return f"{kind} [\n" + ",\n".join(blocks) + "\n]\n"

    card_text = json.dumps(card.to_json())  # a JSON string literal is a valid protobuf text string
    batches = ", ".join(str(b) for b in preferred_batch if b <= card.max_batch)
    return (
        f'name: "{name}"\nplatform: "onnxruntime_onnx"\nmax_batch_size: {card.max_batch}\n'
        + tensors("input", session.get_inputs())  # type: ignore[attr-defined]
        + tensors("output", session.get_outputs())  # type: ignore[attr-defined]
        + f"dynamic_batching {{\n  preferred_batch_size: [ {batches} ]\n  max_queue_delay_microseconds: {queue_delay_us}\n}}\n"
        + f"instance_group [ {{ count: 1\n  kind: {'KIND_GPU' if gpu else 'KIND_CPU'} }} ]\n"
        + f'parameters {{\n  key: "edgebc.card"\n  value: {{ string_value: {card_text} }}\n}}\n'
    )
