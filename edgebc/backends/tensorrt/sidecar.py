"""TensorRT engines are not portable: a sidecar says what built one, and loading checks it.

An engine is tied to the TensorRT version and the GPU (compute capability) it was built on;
loading one elsewhere fails inside TensorRT with "version tag does not match" or worse. The
sidecar JSON beside `model.engine` records both, plus the model card, so the runtime can refuse
with a message that says what to do (rebuild on this device) before TensorRT is even asked.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from edgebc.atomic import atomic_write_text
from edgebc.errors import EdgebcError
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
