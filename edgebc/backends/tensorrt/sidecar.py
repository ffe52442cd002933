"""TensorRT engines are not portable: a sidecar says what built one, and loading checks it.

An engine is tied to the TensorRT version and the GPU (compute capability) it was built on;
loading one elsewhere fails inside TensorRT with "version tag does not match" or worse. The
sidecar JSON beside `model.engine` records both, plus the model card, so the runtime can refuse
with a message that says what to do (rebuild on this device) before TensorRT is even asked. An
engine of a fusion graph also carries the fusion layout (edgebc.fusion_graphs) with the engines
as its files, so the device finds a fusion export's other engines beside the one it is given.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from edgebc.atomic import atomic_write_text
from edgebc.errors import EdgebcError
from edgebc.fusion_graphs import FUSION_KEY, FusionLayout
from edgebc.sysinfo import nvidia_smi


def sidecar_path(engine: str | Path) -> Path:
    return Path(engine).with_suffix(".engine.json")


def gpu_identity() -> dict[str, str] | None:
    """Name and compute capability of GPU 0 (nvidia-smi), or the Jetson module; None without a GPU."""
    line = nvidia_smi("--query-gpu=name,compute_cap", "--format=csv,noheader", "-i", "0") or ""
    name, _, capability = line.strip().partition(",")
    if name:
        return {"name": name.strip(), "compute_capability": capability.strip()}
    model = Path("/proc/device-tree/model")
    if model.exists():  # Jetson: no nvidia-smi; the module name identifies the GPU generation
        return {
            "name": model.read_text(errors="ignore").strip("\x00 \n"),
            "compute_capability": "tegra",
        }
    return None


def write_sidecar(engine: str | Path, info: dict[str, Any]) -> Path:
    path = sidecar_path(engine)
    atomic_write_text(path, json.dumps(info, indent=2, sort_keys=True) + "\n")
    return path


def read_sidecar(engine: str | Path) -> dict[str, Any]:
    path = sidecar_path(engine)
    if not path.is_file():
        raise EdgebcError(
            f"{engine}: no sidecar {path.name}; engines built outside edgebc are refused because nothing says which GPU and TensorRT made them"
        )
    try:
        return dict(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, json.JSONDecodeError) as exc:
        raise EdgebcError(f"{path}: unreadable engine sidecar: {exc}") from exc


def check_engine_compatible(
    sidecar: dict[str, Any], tensorrt_version: str, gpu: dict[str, str] | None
) -> None:
    """Refuse an engine built for another TensorRT version or GPU, saying how to fix it."""
    rebuild = "engines are not portable: rebuild it on this device with `edgebc model engine` (or `edgebc export CHECKPOINT --tensorrt`)"
    if sidecar.get("tensorrt") != tensorrt_version:
        raise EdgebcError(
            f"engine was built with TensorRT {sidecar.get('tensorrt')} but this device has {tensorrt_version}; {rebuild}"
        )
    if gpu is None:
        raise EdgebcError(
            f"no NVIDIA GPU found, but this engine needs {sidecar.get('gpu', {}).get('name')}"
        )
    built = sidecar.get("gpu") or {}
    if built.get("compute_capability") != gpu.get("compute_capability") or built.get(
        "name"
    ) != gpu.get("name"):
        raise EdgebcError(
            f"engine was built for {built.get('name')} (compute capability {built.get('compute_capability')}) "
            f"but this GPU is {gpu.get('name')} ({gpu.get('compute_capability')}); {rebuild}"
        )


def sidecar_layout(sidecar: dict[str, Any], source: str) -> FusionLayout | None:
    """The fusion layout an engine of a fusion graph carries (its files the engines), or None."""
    entry = sidecar.get(FUSION_KEY)
    if entry is None:
        return None
    return FusionLayout.from_json(json.dumps(entry), f"{source}: sidecar {FUSION_KEY}")


def engine_siblings(engine: str | Path) -> dict[str, Path]:
    """Every engine of the fusion export that `engine` (any of its graphs) belongs to, by graph,
    found from the sidecars alone (before TensorRT or CUDA is touched): each must be there with
    a sidecar naming the same layout, or the message says which and how to build them."""
    engine = Path(engine)
    layout = sidecar_layout(read_sidecar(engine), str(engine))
    if layout is None:
        raise EdgebcError(
            f"{engine}: not an engine of an exported fusion model (its sidecar has no "
            f"{FUSION_KEY} layout); build a fusion model's engines with "
            "`edgebc export CHECKPOINT --tensorrt fp16`"
        )
    found = {}
    for graph, file in layout.files.items():
        sibling = engine.parent / file
        if not sibling.is_file() or not sidecar_path(sibling).is_file():
            raise EdgebcError(
                f"{sibling}: the {graph} engine of {engine.name} (or its sidecar) is missing; "
                "copy the export folder whole, or build every graph's engine on this device "
                "with `edgebc export CHECKPOINT --tensorrt fp16`"
            )
        other = sidecar_layout(read_sidecar(sibling), str(sibling))
        if other is None or other.for_graph(graph) != layout.for_graph(graph):
            raise EdgebcError(
                f"{sibling}: is not the {graph} engine of the same export as {engine.name}; "
                "copy the export folder whole"
            )
        found[graph] = sibling
    return found
