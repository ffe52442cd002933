"""Checkpoints: a model card plus the training state, written atomically, refused clearly when damaged.

A checkpoint is `Checkpoint(card, state_dict, training)`: the `ModelCard` is the same typed record
an exported model carries (task, inputs, temperature, operating point, metrics, hashes, data
fingerprint, lineage, and `arch_options` to rebuild the network), so evaluation, export and the
device read one schema through one constructor. `training` holds what only training needs: the
resolved config, the epoch and its validation row, and in `last.pt` the optimiser, scheduler, EMA
and every random generator's state so `--resume` continues exactly. Checkpoints of format 1 (an
untyped dict) are migrated on reading.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import platform
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from edgebc import __version__
from edgebc.atomic import atomic_open
from edgebc.data.fingerprint import data_fingerprint as data_fingerprint  # training's name for it
from edgebc.errors import EdgebcError
from edgebc.model_card import ModelCard, OperatingPoint, single_input
from edgebc.optional import require
from edgebc.preprocess import PreprocessCard
from edgebc.task import task_for

torch = require("torch", "checkpoints")

FORMAT = "edgebc-checkpoint"
FORMAT_VERSION = 2
_RECORD_KEYS = ("format", "format_version", "versions", "saved")


@dataclass
class Checkpoint:
    """What a checkpoint file holds: the model's card, its weights, and the training state."""

    card: ModelCard
    state_dict: dict[str, Any]
    training: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    saved: str = ""

    @property
    def config(self) -> dict[str, Any]:
        """The resolved training configuration (empty for checkpoints not made by training)."""
        return dict(self.training.get("config") or {})

    def with_card(self, **changes: Any) -> Checkpoint:
        return replace(self, card=replace(self.card, **changes))


def versions() -> dict[str, str]:
    return {
        "edgebc": __version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def save_checkpoint(path: str | Path, checkpoint: Checkpoint) -> Path:
    """Write `checkpoint` plus format, versions and time, atomically (a crash leaves the old file)."""
    path = Path(path)
    record = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "versions": versions(),
        "saved": dt.datetime.now(dt.timezone.utc).isoformat(),
        "card": checkpoint.card.to_dict(),
        "state_dict": checkpoint.state_dict,
        "training": checkpoint.training,
    }
    with atomic_open(path, "wb") as handle:
        torch.save(record, handle)
    return path


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint (migrating format 1), with one clear line for a missing, truncated,
    corrupt or foreign file."""
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
    version = record.get("format_version")
    if version == 1:
        record = migrate_format1(record, path)
    elif version != FORMAT_VERSION:
        raise EdgebcError(
            f"{path}: checkpoint format {version} is not supported by edgebc {__version__}"
        )
    return Checkpoint(
        card=ModelCard.from_dict(record["card"], source=f"{path}: card"),
        state_dict=record["state_dict"],
        training=record.get("training") or {},
        versions=record.get("versions") or {},
        saved=record.get("saved", ""),
    )


def migrate_format1(record: dict[str, Any], path: Path | str = "checkpoint") -> dict[str, Any]:
    """A format-1 checkpoint (a flat dict: arch, class_names, preprocess, operating_point, ...)
    in format-2 form: its card built from those keys, the rest kept as training state."""
    try:
        options = dict(record.get("model") or {"arch": record["arch"]})
        point = record.get("operating_point")
        card = ModelCard(
            name=Path(path).parent.name or Path(path).stem, arch=record["arch"],
            task=task_for(None, record["class_names"], record["positive_class"]),
            inputs=single_input(PreprocessCard.from_dict(record["preprocess"])),
            arch_options={k: options[k] for k in ("width_mult", "head", "dropout") if k in options},
            temperature=float(record.get("temperature") or 1.0),
            operating_point=None if not point else OperatingPoint(**point),
            metrics={k: v for k, v in (record.get("metrics") or {}).items() if isinstance(v, (int, float))},
            calibration=dict(record.get("calibration") or {}),
            weights_sha256=record.get("weights_sha256", ""), data_fingerprint=record.get("data_fingerprint", ""),
            lineage=lineage_of(record.get("pretrained"), record.get("distilled_from")),
        )  # fmt: skip
    except (KeyError, TypeError, ValueError) as exc:
        raise EdgebcError(
            f"{path}: a format-1 checkpoint without {exc}: it cannot be migrated; retrain it or "
            "export it with the edgebc version that wrote it"
        ) from exc
    moved = {"arch", "model", "class_names", "positive_class", "preprocess", "state_dict",
             "temperature", "operating_point", "calibration", "weights_sha256",
             "data_fingerprint", "distilled_from", *_RECORD_KEYS}  # fmt: skip
    # Everything else stays, as training state (metrics too: the card keeps their numbers only).
    training = {k: v for k, v in record.items() if k not in moved}
    return {**{k: record.get(k) for k in _RECORD_KEYS}, "card": card.to_dict(),
            "state_dict": record["state_dict"], "training": training}  # fmt: skip


def lineage_of(
    pretrained: dict[str, Any] | None, teachers: Sequence[dict[str, str]] | None
) -> dict[str, Any]:
    """Where the weights came from, so an audit can trace a deployed model back to every model
    whose knowledge it carries: the torchvision file it started from, the teachers it learned from."""
    return {
        "pretrained": (pretrained or {}).get("source"),
        "distilled_from": [dict(teacher) for teacher in teachers or []],
    }


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
    from edgebc.train.models import create_model

    torch.manual_seed(seed)
    model = create_model(arch).eval()
    card = ModelCard(
        name=Path(path).stem, arch=arch, task=task_for("three_class"),
        inputs=single_input(PreprocessCard(input_height=size, input_width=size)),
        arch_options={"width_mult": 1.0, "head": "linear", "dropout": 0.2},
        temperature=1.5, operating_point=OperatingPoint(0.3, 0.95, 0.96, 0.5),
        metrics={"val_auc_positive": 0.9}, weights_sha256="ab" * 32, data_fingerprint="cd" * 32,
        lineage=lineage_of(None, None),
    )  # fmt: skip
    return save_checkpoint(path, Checkpoint(card, model.state_dict(), {"epoch": 3}))


def build_model(card: ModelCard) -> torch.nn.Module:
    """The network a card describes, with fresh weights: a registered architecture for a
    one-input card, one backbone shared by the views of a multi-view card (its presence input
    says so), a fusion of per-input branches for another card with several inputs."""
    if card.arch == "late_fusion":  # before the presence input, which fusion cards have too
        from edgebc.train.models.fusion import build_fusion

        return build_fusion(card)
    if card.presence_input is not None:
        from edgebc.train.multiview import build_multiview

        return build_multiview(card)
    if len(card.inputs) > 1:
        from edgebc.train.models.fusion import build_fusion

        return build_fusion(card)
    from edgebc.train.models import create_model

    options = card.arch_options
    return create_model(
        card.arch,
        len(card.class_names),
        card.preprocess.channels,
        float(options.get("width_mult", 1.0)),
        str(options.get("head", "linear")),
        float(options.get("dropout", 0.2)),
        tuple(int(size) for size in options.get("head_hidden", ())),
        float(options.get("head_dropout", 0.0)),
    )


def model_from_checkpoint(checkpoint: Checkpoint) -> torch.nn.Module:
    """Rebuild the model a checkpoint describes and load its weights (eval mode)."""
    model = build_model(checkpoint.card)
    model.load_state_dict(checkpoint.state_dict)
    return model.eval()
