"""What this machine offers edgebc: versions, inference providers, GPU, CPU features, cameras.

Nothing heavy is imported to find out: torch, TensorRT, picamera2 and pydicom are looked up by
package metadata, so `edgebc info` runs on a cart that has none of them.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

_PACKAGES = (
    "edgebc",
    "numpy",
    "opencv-python-headless",
    "onnxruntime",
    "onnxruntime-gpu",
    "PyYAML",
    "torch",
    "onnx",
    "tensorrt",
    "picamera2",
    "pydicom",
    "fastapi",
    "uvicorn",
)


def collect() -> dict[str, Any]:
    """Everything `edgebc info` reports, as a JSON-ready mapping."""
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": cpu_description(),
        "packages": {name: _version(name) for name in _PACKAGES},
        "onnxruntime_providers": onnxruntime_providers(),
        "gpus": nvidia_gpus(),
        "jetson": jetson_release(),
        "video_devices": sorted(str(p) for p in Path("/dev").glob("video*")),
        "camera_backends": {
            "opencv_v4l2": _opencv_has_backend("V4L2"),
            "opencv_gstreamer": _opencv_has_backend("GSTREAMER"),
            "picamera2": _version("picamera2") is not None,
        },
    }


def cpu_description() -> dict[str, Any]:
    model, flags = platform.processor() or "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model in ("", "unknown"):
                model = value.strip()
            if key.strip() in ("flags", "Features"):
                flags = set(value.split())
    except OSError:
        pass
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "neon", "asimd", "asimddp")
    import os

    return {
        "model": model,
        "logical_cores": os.cpu_count(),
        "features": [f for f in wanted if f in flags],
    }


def onnxruntime_providers() -> list[str]:
    try:
        import onnxruntime
    except ImportError:
        return []
    return list(onnxruntime.get_available_providers())


def nvidia_gpus() -> list[str]:
    """GPU names from nvidia-smi, or [] where there is none (or no driver)."""
    out = nvidia_smi("--query-gpu=name,memory.total,driver_version", "--format=csv,noheader")
    return [line.strip() for line in (out or "").splitlines() if line.strip()]


def process_gpu_memory_mb() -> float | None:
    """GPU memory this process holds now, from nvidia-smi (all runtimes, not only PyTorch's
    allocator); None without a GPU or driver, or when the driver does not report it (Jetson)."""
    out = nvidia_smi("--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits")
    used = [
        float(fields[1])
        for fields in (line.split(",") for line in (out or "").splitlines())
        if len(fields) == 2
        and fields[0].strip() == str(os.getpid())
        and fields[1].strip().isdigit()
    ]
    return sum(used) if used else None


def nvidia_smi(*arguments: str) -> str | None:
    """nvidia-smi's output, or None where it is missing or fails (no GPU, no driver)."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        return subprocess.run(["nvidia-smi", *arguments], capture_output=True, text=True,
                              timeout=10, check=True).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None


def jetson_release() -> str | None:
    try:
        return Path("/etc/nv_tegra_release").read_text().splitlines()[0].strip()
    except (OSError, IndexError):
        return None


def _opencv_has_backend(name: str) -> bool:
    import cv2

    try:
        return any(
            cv2.videoio_registry.getBackendName(b) == name
            for b in cv2.videoio_registry.getCameraBackends()
        )
    except (AttributeError, cv2.error):
        return False


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None
