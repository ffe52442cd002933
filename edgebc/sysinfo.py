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
        "area_kernel": area_kernel(),
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


def area_kernel() -> str:
    """How the native area kernel stands (edgebc.area_native): loaded and equal to the numpy path,
    or why the numpy path makes every frame's downscales instead (0.4 ms a cart frame slower)."""
    from edgebc.area import native_kernel_status

    return native_kernel_status()[1]


# Features the runtimes choose kernels by: AVX-512 VNNI / AVX-VNNI and AMX for INT8, AVX-512 BF16
# and AMX for BF16 (OpenVINO runs BF16 by default where they are), NEON dot products on ARM.
_CPU_FEATURES = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16",
                 "amx_int8", "neon", "asimd", "asimddp")  # fmt: skip


def cpu_description(cpuinfo: str | None = None) -> dict[str, Any]:
    """The CPU as lscpu names it: /proc/cpuinfo's model name (platform.processor() says only
    "x86_64" or nothing on Linux), vendor, family/model/stepping (which tell generations apart
    where a VM's model name is as vague as "AMD EPYC"), whether a hypervisor runs it, and the
    features the runtimes choose kernels by. `cpuinfo` is /proc/cpuinfo's text (read when None)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())  # the first processor's
    flags = set(fields.get("flags", fields.get("Features", "")).split())
    model = fields.get("model name") or fields.get("Model") or platform.processor() or "unknown"
    out: dict[str, Any] = {
        "model": model,
        "logical_cores": os.cpu_count(),
        "features": [f for f in _CPU_FEATURES if f in flags],
    }
    if "vendor_id" in fields:
        out["vendor"] = fields["vendor_id"]
    if "cpu family" in fields:
        out["family_model_stepping"] = "/".join(
            fields.get(k, "?") for k in ("cpu family", "model", "stepping")
        )
    if flags:
        out["hypervisor"] = "hypervisor" in flags
    return out


def cpu_line(cpu: dict[str, Any]) -> str:
    """One line naming the CPU for a report's header: model name, family/model/stepping, whether
    virtualised, logical cores."""
    details = [
        f"family/model/stepping {cpu['family_model_stepping']}"
        if "family_model_stepping" in cpu
        else "",
        "virtual machine" if cpu.get("hypervisor") else "",
        f"{cpu.get('logical_cores', '?')} logical cores",
    ]
    return f"{cpu.get('model', 'unknown')} ({', '.join(d for d in details if d)})"


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
