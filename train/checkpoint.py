"""Checkpoints that describe themselves, written atomically, refused clearly when damaged.

A checkpoint carries what is needed to use it without its run folder: architecture and model
options, class names and the positive class, the preprocessing card, the full training config,
a fingerprint of the training data, the best validation metrics, the fitted temperature and the
operating threshold, and the versions that produced it. `last.pt` adds optimiser, scheduler,
EMA and every random generator's state so `--resume` continues exactly.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgebc import __version__
from edgebc.atomic import atomic_open
from edgebc.data.records import Sample
from edgebc.errors import EdgebcError
from edgebc.optional import require

torch = require("torch", "checkpoints")

FORMAT = "edgebc-checkpoint"
FORMAT_VERSION = 1


def data_fingerprint(samples: Sequence[Sample]) -> str:
    """sha256 over (file name, label, split, fold, size) of every sample: what a model was trained on."""
    digest = hashlib.sha256()
    for sample in sorted(samples, key=lambda s: (s.path.name, s.label)):
        size = sample.path.stat().st_size if sample.path.exists() else -1
        digest.update(
            f"{sample.path.name}|{sample.label}|{sample.split}|{sample.fold}|{size}\n".encode()
        )
    return digest.hexdigest()


def versions() -> dict[str, str]:
    return {
        "edgebc": __version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write `payload` plus format, versions and time, atomically (a crash leaves the old file)."""
    path = Path(path)
    record = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "versions": versions(),
        "saved": dt.datetime.now(dt.timezone.utc).isoformat(),
        **payload,
    }
    with atomic_open(path, "wb") as handle:
        torch.save(record, handle)
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint, with one clear line for a missing, truncated, corrupt or foreign file."""
    path = Path(path)
    if not path.is_file():
        raise EdgebcError(f"{path}: checkpoint not found")
    try:
        record = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise EdgebcError(
            f"{path}: not a readable checkpoint (truncated or corrupt?): {exc}"
        ) from exc
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise EdgebcError(
            f"{path}: not an edgebc checkpoint (a bare torchvision state_dict goes to --pretrained)"
        )
    if record.get("format_version") != FORMAT_VERSION:
        raise EdgebcError(
            f"{path}: checkpoint format {record.get('format_version')} is not supported by edgebc {__version__}"
        )
    return record


def sha256_of_state(state_dict: dict[str, Any]) -> str:
    """A hash of the weights themselves, independent of pickling details."""
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        value = state_dict[key]
        digest.update(key.encode())
        if torch.is_tensor(value):
            digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def save_untrained_checkpoint(
    path: str | Path, arch: str = "simple_cnn", size: int = 48, seed: int = 0
) -> Path:
    """A real, self-describing checkpoint of an untrained `arch` (random weights, fixed seed).

    For latency benchmarks (speed does not depend on the weights) and for export and runtime
    tests; its card says so through zeroed hashes and made-up validation numbers.
    """
    import torch

    from edgebc.preprocess import PreprocessCard
    from edgebc.train.models import create_model

    torch.manual_seed(seed)
    model = create_model(arch).eval()
    card = PreprocessCard(input_height=size, input_width=size)
    options = {
        "arch": arch,
        "width_mult": 1.0,
        "head": "linear",
        "dropout": 0.2,
        "pretrained": None,
    }
    return save_checkpoint(path, {
        "arch": arch, "model": options, "class_names": ["normal", "benign", "malignant"], "positive_class": "malignant",
        "preprocess": card.to_dict(), "state_dict": model.state_dict(), "temperature": 1.5, "epoch": 3,
        "operating_point": {"threshold": 0.3, "target_sensitivity": 0.95, "sensitivity": 0.96, "specificity": 0.5},
        "metrics": {"val_auc_positive": 0.9}, "weights_sha256": "ab" * 32, "data_fingerprint": "cd" * 32,
    })  # fmt: skip
