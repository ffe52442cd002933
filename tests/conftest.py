"""Shared fixtures and the skip rules for hardware markers (gpu, tensorrt, camera) and real data."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path | None:
    """$EDGEBC_DATA, else ../shared/data beside the repository; None when absent."""
    candidate = Path(os.environ.get("EDGEBC_DATA", REPO.parent / "shared" / "data"))
    return candidate if candidate.is_dir() else None


def _gpu_available() -> bool:
    if shutil.which("nvidia-smi") is None:
        return False
    try:
        return subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reasons = {
        "gpu": None
        if _gpu_available()
        else "no NVIDIA GPU visible (nvidia-smi -L failed or absent)",
        "tensorrt": None
        if importlib.util.find_spec("tensorrt")
        else "TensorRT Python bindings not installed",
        "camera": None if list(Path("/dev").glob("video*")) else "no capture device at /dev/video*",
        "data": None
        if shared_data_dir()
        else "real datasets absent (set EDGEBC_DATA or provide ../shared/data)",
    }
    for item in items:
        for marker, reason in reasons.items():
            if reason and marker in item.keywords:
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture
def data_dir() -> Path:
    found = shared_data_dir()
    if found is None:
        pytest.skip("real datasets absent")
    return found


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture(autouse=True)
def _audit_state_in_tmp(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The audit trail's key and anchors go to the user's state folder by default: in tests (and
    the servers they start) that is a temporary one, never the real home."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path_factory.mktemp("state")))
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
