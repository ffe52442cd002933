"""Lazy imports of heavy or platform-only packages, failing with the command that installs them.

The runtime must start on a cart without torch, TensorRT, picamera2 or pydicom; each is imported
inside the function that needs it, through `require`, so a missing one names its install command
instead of surfacing as a bare ModuleNotFoundError deep in a stack trace.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from edgebc.errors import MissingDependencyError

INSTALL_HINTS: dict[str, str] = {
    "torch": "pip install 'edgebc[train]' (torch==2.13.0: PyPI's is the CUDA build; on a machine "
    "without an NVIDIA GPU first pip install torch==2.13.0 --index-url "
    "https://download.pytorch.org/whl/cpu, see the README's Training install)",
    "onnx": "pip install 'edgebc[export]'",
    "tensorrt": "on Jetson it comes with JetPack; elsewhere pip install 'edgebc[tensorrt]'",
    "picamera2": "on Raspberry Pi OS: sudo apt install python3-picamera2 "
    "(or pip install 'edgebc[picamera]')",
    "pydicom": "pip install 'edgebc[dicom]'",
    "openvino": "pip install 'edgebc[openvino]'",
    "fastapi": "pip install 'edgebc[serve]'",
    "uvicorn": "pip install 'edgebc[serve]'",
    "fastapi_offline": "pip install 'edgebc[serve]'",
    "prometheus_client": "pip install 'edgebc[serve]'",
    "pygame": "pip install 'edgebc[display]' (pygame-ce)",
}


def require(module: str, feature: str) -> ModuleType:
    """Import `module` or raise MissingDependencyError saying which feature needs it and how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        top = module.split(".")[0]
        hint = INSTALL_HINTS.get(top, f"pip install {top}")
        raise MissingDependencyError(f"{top} is needed for {feature}: {hint}") from exc


def is_installed(module: str) -> bool:
    """True when `module` can be imported, without importing it (no side effects, no torch load)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False
