"""Inference backends: one small protocol, NCHW float32 in, logits out, model card attached.

`run(batch)` serves the usual one-input model; `run_named({input: batch, ...})` serves a model
whose card has several inputs (one per modality or view) and returns every output by name
(logits, and features where the card declares them).

`open_backend(path)` picks by file type: `.onnx` runs on ONNX Runtime (CPU, or CUDA / TensorRT
execution providers when present), `.engine` on native TensorRT (its sidecar checked first);
`runtime="openvino"` runs an `.onnx` on OpenVINO at the precision asked for (fp32, bf16, or int8
from the QDQ export: edgebc.backends.openvino). Each verifies the file against `MANIFEST.sha256` when one lists it, read the card from the model
(or a release's verified `card.json` beside it: edgebc.release), and validate every input against
the model's declared shape before inference.

The input checks and the warm-up feeds every backend shares live here (`checked_feeds`,
`declared_inputs`, `warmup_feeds`), so no backend imports another's module for them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from edgebc.errors import EdgebcError
from edgebc.fusion_graphs import HEAD, FusionLayout, view_presence_name
from edgebc.model_card import ModelCard, ModelInput


class Backend(Protocol):
    name: str
    card: ModelCard
    model_sha256: str

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Logits (N, classes) for a float32 (N, C, H, W) batch."""
        ...

    def run_named(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Every output by name for a batch per card input (the same N for all)."""
        ...

    def close(self) -> None: ...


RUNTIMES = ("onnxruntime", "openvino", "tensorrt")


def open_backend(
    path: str | Path,
    providers: Sequence[str] = ("CPUExecutionProvider",),
    threads: int = 0,
    warmup: int = 3,
    spin_wait: bool = True,
    runtime: str | None = None,
    precision: str | None = None,
) -> Backend:
    """The backend for `path`; `spin_wait=False` for live loops (ONNX Runtime only: see there).

    `runtime` None picks by file type (ONNX Runtime for `.onnx`, TensorRT for `.engine`);
    "openvino" runs an `.onnx` on OpenVINO's CPU plugin. `precision` None is the file's own
    (fp32, or int8 for the QDQ export); OpenVINO also takes "bf16" for an FP32 file. A precision
    the runtime cannot give the file is refused, never substituted."""
    path = Path(path)
    suffix = path.suffix.lower()
    if runtime is not None and runtime not in RUNTIMES:
        raise EdgebcError(f"unknown runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}")
    if suffix == ".engine" and runtime in (None, "tensorrt"):
        if precision is not None:
            raise EdgebcError(f"{path}: a TensorRT engine's precision is the one it was built with; give no precision")  # fmt: skip
        from edgebc.backends.tensorrt import TensorRTBackend

        return TensorRTBackend(path, warmup)
    if suffix != ".onnx":
        raise EdgebcError(
            f"{path}: expected an exported .onnx model or a TensorRT .engine (export checkpoints with `edgebc export`)"
        )
    if runtime == "tensorrt":
        raise EdgebcError(f"{path}: TensorRT runs .engine files; build one with `edgebc model engine`")  # fmt: skip
    if runtime == "openvino":
        from edgebc.backends.openvino import OpenVinoBackend

        return OpenVinoBackend(path, precision, threads, warmup)
    from edgebc.backends.onnxruntime import OnnxRuntimeBackend

    backend = OnnxRuntimeBackend(path, providers, threads, warmup, spin_wait)
    if precision is not None and precision != backend.card.precision:
        backend.close()
        raise EdgebcError(
            f"{path}: ONNX Runtime runs this model as {backend.card.precision}, the precision it "
            f"was exported in, not {precision}"
            + (" (bf16 runs on OpenVINO: runtime='openvino')" if precision == "bf16" else "")
        )
    return backend


def validate_batch(batch: object, card: ModelCard) -> np.ndarray:
    """The batch as float32 NCHW matching the card's one input, or a ValueError saying what is wrong."""
    return validate_input(batch, card.input, card.max_batch)


def validate_feeds(feeds: Mapping[str, object], card: ModelCard) -> dict[str, np.ndarray]:
    """Every input of the card, each checked; a missing or unknown name is named."""
    names = [i.name for i in card.inputs]
    missing = [n for n in names if n not in feeds]
    unknown = [n for n in feeds if n not in names]
    if missing or unknown:
        optional = [n for n in missing if next(i for i in card.inputs if i.name == n).optional]
        raise ValueError(
            f"model {card.name} takes the inputs {', '.join(names)}; "
            + (f"missing {', '.join(missing)}" if missing else f"unknown {', '.join(unknown)}")
            + (f" ({', '.join(optional)} optional in the card: a fusion model answers without "
               "them as branch graphs and a head, run by edgebc.fusion; export it with edgebc "
               "export)" if optional else "")
        )  # fmt: skip
    checked = {i.name: validate_input(feeds[i.name], i, card.max_batch) for i in card.inputs}
    if len({len(v) for v in checked.values()}) != 1:
        sizes = {name: len(v) for name, v in checked.items()}
        raise ValueError(f"every input needs the same batch size, got {sizes}")
    return checked


def validate_input(batch: object, model_input: ModelInput, max_batch: int) -> np.ndarray:
    """One of the card's inputs as float32 (N, *its shape), or a ValueError saying what is wrong."""
    return validate_vectors(batch, model_input.name, model_input.shape, max_batch)


def checked_feeds(
    feeds: Mapping[str, np.ndarray], card: ModelCard, layout: FusionLayout | None
) -> dict[str, np.ndarray]:
    """Every input a graph of this card takes, checked as ONNX Runtime checks them: the card's
    inputs (and a multi-view model's presence), or a fusion graph's (a branch's views and their
    presence, the head's embeddings and theirs); a ValueError says what is wrong."""
    if layout is None:
        presence = card.presence_input
        images = {k: v for k, v in feeds.items() if k != presence}
        missing = [i.name for i in card.inputs if i.name not in images]
        if presence is not None and missing:
            raise ValueError(
                f"model {card.name} takes every view input: feed the absent ones "
                f"({', '.join(missing)}) as zeros marked 0 in {presence} (edgebc.cases.case_feeds)"
            )
        checked = validate_feeds(images, card)
        if presence is not None:
            from edgebc.cases import validate_presence

            if presence not in feeds:
                raise ValueError(f"model {card.name} needs {presence}: which views are there")
            rows = len(next(iter(checked.values())))
            checked[presence] = validate_presence(feeds[presence], card, rows)
        return checked
    declared = layout.inputs_of(layout.graph, card)
    names = [name for name, _ in declared]
    if sorted(feeds) != sorted(names):
        raise ValueError(
            f"the {layout.graph} graph of fusion model {card.name} takes {', '.join(names)}; "
            f"got {', '.join(sorted(feeds)) or 'nothing'}"
        )
    views = view_presence_name(layout.graph) if len(layout.branches.get(layout.graph, ())) > 1 else None  # fmt: skip
    checked = {}
    for name, shape in declared:
        if layout.graph != HEAD and name != views:
            model_input = next(i for i in card.inputs if i.name == name)
            checked[name] = validate_input(feeds[name], model_input, card.max_batch)
        else:
            checked[name] = validate_vectors(feeds[name], name, shape, card.max_batch)
    if len({len(v) for v in checked.values()}) != 1:
        sizes = {n: len(v) for n, v in checked.items()}
        raise ValueError(f"every input needs the same batch size, got {sizes}")
    if views is not None:
        validate_view_presence(checked[views], views)
    if layout.graph == HEAD:
        validate_fusion_presence(checked[layout.presence], layout, card)
    return checked


def validate_vectors(
    batch: object, name: str, shape: tuple[int, ...], max_batch: int
) -> np.ndarray:
    """A float32 (N, *shape) batch of finite values, or a ValueError saying what is wrong."""
    if not isinstance(batch, np.ndarray):
        raise ValueError(f"expected {name} as a numpy array, got {type(batch).__name__}")
    if batch.ndim != 1 + len(shape) or tuple(batch.shape[1:]) != shape:
        raise ValueError(
            f"expected {name} of shape (N, {', '.join(map(str, shape))}), got {batch.shape}"
        )
    if not 1 <= batch.shape[0] <= max_batch:
        raise ValueError(f"batch size must be 1..{max_batch}, got {batch.shape[0]}")
    if batch.dtype != np.float32:
        raise ValueError(f"expected {name} as float32, got {batch.dtype}")
    if not np.all(np.isfinite(batch)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return np.ascontiguousarray(batch)


def validate_view_presence(present: np.ndarray, name: str) -> None:
    """A multi-view branch's presence: 0/1 only, at least one view per row (a branch with no view
    is not run: its embedding is marked absent in the head's presence)."""
    if not np.isin(present, (0.0, 1.0)).all():
        raise ValueError(f"{name} holds 1 (present) or 0 (absent) only")
    if (present.sum(axis=1) < 1).any():
        raise ValueError(
            f"every row needs at least one view present in {name} (with none, leave the branch "
            "out and mark it absent in the head's presence)"
        )


def validate_fusion_presence(present: np.ndarray, layout: FusionLayout, card: ModelCard) -> None:
    """0/1 only, at least one branch per row, and every input the card requires present."""
    if not np.isin(present, (0.0, 1.0)).all():
        raise ValueError(f"{layout.presence} holds 1 (present) or 0 (absent) only")
    if (present.sum(axis=1) < 1).any():
        raise ValueError(f"every row needs at least one input present in {layout.presence}")
    optional = {i.name: i.optional for i in card.inputs}
    for column, branch in enumerate(layout.order):
        required = [n for n in layout.branches[branch] if not optional[n]]
        if required and (present[:, column] == 0).any():
            raise ValueError(
                f"model {card.name} requires its input {required[0]} (not optional in the card); "
                f"{layout.presence} marks it absent"
            )


def declared_inputs(
    card: ModelCard, layout: FusionLayout | None
) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape without the batch) of every input an engine of this card (or fusion graph)
    takes: the layout's for a fusion graph, else the card's inputs and presence input."""
    if layout is not None:
        layout.check_card(card)
        return layout.inputs_of(layout.graph, card)
    declared: list[tuple[str, tuple[int, ...]]] = [(i.name, i.shape) for i in card.inputs]
    if card.presence_input is not None:
        declared.append((card.presence_input, (len(card.inputs),)))
    return declared


def warmup_feeds(card: ModelCard, layout: FusionLayout | None,
                 declared: list[tuple[str, tuple[int, ...]]]) -> dict[str, np.ndarray]:  # fmt: skip
    """One row of zeros per input, every presence input all present (what warms an engine up)."""
    feeds = {name: np.zeros((1, *shape), np.float32) for name, shape in declared}
    if layout is None and card.presence_input is not None:
        feeds[card.presence_input][:] = 1.0
    elif layout is not None and layout.graph == HEAD:
        feeds[layout.presence][:] = 1.0
    elif layout is not None and len(layout.branches[layout.graph]) > 1:
        feeds[view_presence_name(layout.graph)][:] = 1.0
    return feeds
