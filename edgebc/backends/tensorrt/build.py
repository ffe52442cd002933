"""TensorRT engines from an exported ONNX: FP16, and INT8 from the QDQ model (explicit quantization).

Follows the TensorRT 10 Python API. Implicit INT8 calibrators are deprecated in TensorRT 10, so
INT8 engines are built from the Q/DQ graph `edgebc export --int8` writes: its scales are the
ones whose accuracy was already checked. The build uses a workspace limit, a timing cache (reused
across builds on the same device: minutes become seconds) and an optimisation profile over the
batch range. The sidecar records TensorRT version, GPU, compute capability and the model card.
It needs TensorRT and nothing of the training side, so a device builds its own engines. TensorRT
is absent on CI; this is exercised by tests marked `tensorrt`. A fusion export's graphs get an
engine each (`fusion_engine_plan`, `build_fusion_engines`), each sidecar carrying the engines'
fusion layout so the device opens them together.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from edgebc.atomic import atomic_write_bytes
from edgebc.backends.tensorrt.sidecar import gpu_identity, write_sidecar
from edgebc.errors import EdgebcError
from edgebc.fusion_graphs import FUSION_KEY, HEAD, FusionLayout, read_layout
from edgebc.integrity import sha256_file
from edgebc.model_card import ModelCard
from edgebc.optional import require
from edgebc.release import card_for_model

Precision = Literal["fp16", "int8"]


def build_engine(
    onnx_path: str | Path,
    out: str | Path,
    precision: Precision = "fp16",
    workspace_mb: int = 1024,
    batch: tuple[int, int, int] = (1, 1, 8),
    timing_cache: str | Path | None = None,
    fusion: FusionLayout | None = None,
) -> Path:
    """Build and write a serialized engine plus its sidecar; `batch` is (min, opt, max).
    `fusion`: the layout of the engines of a fusion export, for the graph this one is."""
    trt = require("tensorrt", "building TensorRT engines")
    onnx_path, out = Path(onnx_path), Path(out)
    card = card_for_model(onnx_path)  # a release's site card.json, else the embedded one
    if precision == "int8" and card.precision != "int8":
        raise EdgebcError(
            f"{onnx_path}: INT8 engines are built from the QDQ model (edgebc export --int8), not from a {card.precision} one"
        )
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EdgebcError(f"{onnx_path}: TensorRT cannot parse this model: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    config.set_flag(trt.BuilderFlag.FP16)
    if precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)  # scales come from the graph's Q/DQ nodes
    cache_path = Path(timing_cache) if timing_cache else out.with_suffix(".timing.cache")
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.exists() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    shapes = optimisation_profiles(card, batch, graph_inputs(onnx_path))
    profile = builder.create_optimization_profile()
    for index in range(network.num_inputs):  # one (min, opt, max) shape per named input
        tensor = network.get_input(index)
        if tensor.name not in shapes:
            raise EdgebcError(
                f"{onnx_path}: the network input {tensor.name!r} is none of {sorted(shapes)}"
            )
        profile.set_shape(tensor.name, *shapes[tensor.name])
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EdgebcError(
            f"TensorRT failed to build an engine from {onnx_path} (see the TensorRT log above)"
        )
    atomic_write_bytes(out, bytes(serialized))
    atomic_write_bytes(cache_path, bytes(config.get_timing_cache().serialize()))
    write_sidecar(out, {
        "tensorrt": trt.__version__, "gpu": gpu_identity(), "engine_sha256": sha256_file(out),
        "built": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        **engine_description(onnx_path, card, precision, batch, workspace_mb, fusion),
    })  # fmt: skip
    return out


def engine_description(onnx_path: Path, card: ModelCard, precision: Precision,
                       batch: tuple[int, int, int], workspace_mb: int,
                       fusion: FusionLayout | None = None) -> dict[str, Any]:  # fmt: skip
    """What a sidecar says of an engine beyond the TensorRT, GPU and engine bytes that built it:
    its precision, batch range, source ONNX and the card it runs by (a fusion graph's also the
    engines' layout, under the key the ONNX graphs use)."""
    described: dict[str, Any] = {
        "precision": precision, "batch": list(batch), "workspace_mb": workspace_mb,
        "onnx": onnx_path.name, "onnx_sha256": sha256_file(onnx_path), "card": card.to_json(),
    }  # fmt: skip
    if fusion is not None:
        described[FUSION_KEY] = json.loads(fusion.to_json())
    return described


Shape = tuple[int, ...]


def engine_batch(card: ModelCard, cap: int = 8) -> tuple[int, int, int]:
    """The (min, opt, max) batch of an engine for `card`: one frame at a time is the device's
    case (live ultrasound, a case's mammograms), up to the card's max batch, at most `cap`."""
    return 1, 1, max(1, min(cap, card.max_batch))


def graph_inputs(onnx_path: str | Path) -> dict[str, Shape] | None:
    """Each input's shape without the batch axis of a fusion graph (its layout names them: views,
    presence, embeddings), or None for a model whose inputs are its card's."""
    layout = read_layout(onnx_path)
    if layout is None:
        return None
    card = card_for_model(Path(onnx_path))
    return dict(layout.inputs_of(layout.graph, card))


def optimisation_profiles(card: ModelCard, batch: tuple[int, int, int],
                          inputs: dict[str, Shape] | None = None) -> dict[str, tuple[Shape, Shape, Shape]]:  # fmt: skip
    """The (min, opt, max) shape of every named input: `inputs` (name -> shape without the batch;
    a fusion graph's) or the card's inputs and presence input, each with `batch` in front."""
    low, opt, high = batch
    if not 1 <= low <= opt <= high:
        raise EdgebcError(f"batch range must satisfy 1 <= min <= opt <= max, got {batch}")
    if inputs is None:
        inputs = {i.name: tuple(i.shape) for i in card.inputs}
        if card.presence_input is not None:
            inputs[card.presence_input] = (len(card.inputs),)
    return {name: ((low, *shape), (opt, *shape), (high, *shape)) for name, shape in inputs.items()}


def engine_files(
    name: str, order: list[str] | tuple[str, ...], precision: Precision
) -> dict[str, str]:
    """The engines of a fusion export built at `precision`, named as its ONNX variants are:
    `<name>.<precision>.engine` is the head (the file to name), `<name>.<precision>.<branch>.engine`
    a branch. The INT8 set's head is FP16 inside, as `<name>.int8.onnx` holds an FP32 head."""
    return {
        **{n: f"{name}.{precision}.{n}.engine" for n in order},
        HEAD: f"{name}.{precision}.engine",
    }


@dataclass(frozen=True)
class PlannedEngine:
    """One graph's engine: the ONNX it is built from, its file, precision, batch range, the
    (min, opt, max) shape of each named input, and the engines' layout as this graph sees it."""

    graph: str
    source: Path
    engine: str
    precision: Precision
    batch: tuple[int, int, int]
    profiles: dict[str, tuple[Shape, Shape, Shape]]
    layout: FusionLayout


def fusion_engine_plan(head_path: str | Path, precision: Precision = "fp16",
                       name: str | None = None) -> list[PlannedEngine]:  # fmt: skip
    """The engines of the fusion export whose head is `head_path` (the FP32 `<name>.onnx` for
    FP16, the INT8 variant's `<name>.int8.onnx` for INT8), without TensorRT: the branches at
    `precision` (INT8 from the variant's QDQ branch graphs), the head at FP16 (the INT8 variant
    keeps its head in float: edgebc.export.fusion_quantize), named by `engine_files`."""
    head_path = Path(head_path)
    layout = read_layout(head_path) if head_path.suffix.lower() == ".onnx" else None
    if layout is None:
        raise EdgebcError(f"{head_path}: not the head graph (.onnx) of an exported fusion model")
    card = card_for_model(head_path)
    if precision == "int8" and card.precision != "int8":
        raise EdgebcError(
            f"{head_path}: INT8 engines are built from the INT8 variant's graphs (edgebc export "
            f"--int8 writes <name>.int8.onnx), not from a {card.precision} export"
        )
    # the INT8 variant's head is <name>.int8.onnx (fusion_quantize.int8_files)
    base = name or head_path.stem.removesuffix(".int8")
    engines = replace(layout, files=engine_files(base, layout.order, precision))
    batch = engine_batch(card)
    planned = []
    for graph, file in layout.files.items():
        source = head_path.parent / file
        planned.append(PlannedEngine(
            graph, source, engines.files[graph], "fp16" if graph == HEAD else precision, batch,
            optimisation_profiles(card, batch, dict(layout.inputs_of(graph, card))),
            engines.for_graph(graph),
        ))  # fmt: skip
    return planned


def build_fusion_engines(head_path: str | Path, out_dir: str | Path, precision: Precision = "fp16",
                         name: str | None = None) -> dict[str, Path]:  # fmt: skip
    """An engine per graph of the fusion export whose head is `head_path` (`fusion_engine_plan`),
    each with a profile per named input (views, presence, embeddings) and a sidecar carrying the
    card and the engines' layout; one timing cache for all of them."""
    out_dir = Path(out_dir)
    planned = fusion_engine_plan(head_path, precision, name)
    head = next(p for p in planned if p.graph == HEAD)
    cache = out_dir / f"{Path(head.engine).stem}.timing.cache"
    return {
        p.graph: build_engine(
            p.source,
            out_dir / p.engine,
            p.precision,
            batch=p.batch,
            timing_cache=cache,
            fusion=p.layout,
        )
        for p in planned
    }
