"""The training distribution's statistics for a checkpoint's card: at finalisation, or added later.

`with_training_statistics` runs the model over its training frames (image statistics and
penultimate features, edgebc.shift's definitions) and over held-out frames it did not train on
(the calibration split, else validation) to set the out-of-distribution thresholds; finalize.py
calls it on every new `best.pt`. `add_training_statistics` gives an existing checkpoint the same,
reading its frames again from the manifest its resolved configuration names:

    python -m edgebc.train.shift_stats runs/busi/best.pt [--manifest M] [--false-alarm-rate 0.01]
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from edgebc.optional import require
from edgebc.shift import SCORE_PARTS, fit_training_statistics, image_statistics
from edgebc.train.checkpoint import (
    Checkpoint,
    load_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
)
from edgebc.train.models.features import FEATURES, WithFeatures, card_with_features

torch = require("torch", "training")
log = logging.getLogger(__name__)
MAX_TRAINING_FRAMES = 4000  # a fixed random subset beyond this: the statistics settle long before


def frame_measurements(
    checkpoint: Checkpoint, images: Any, device: Any = "cpu", batch_size: int = 64
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Image statistics, penultimate features and logits of cached model inputs (N, C, H, W)."""
    from edgebc.train.models.registry import model_spec

    card = checkpoint.card
    model = WithFeatures(model_from_checkpoint(checkpoint), model_spec(card.arch).classifier)
    model = model.to(device).eval()
    features, logits = [], []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            out, feat = model(images[start : start + batch_size].to(device))
            logits.append(out.float().cpu().numpy())
            features.append(feat.float().cpu().numpy())
    array = images.cpu().numpy() if hasattr(images, "cpu") else np.asarray(images)
    stats = np.concatenate([
        image_statistics(array[i : i + 256], card.preprocess) for i in range(0, len(array), 256)
    ])  # fmt: skip
    return stats, np.concatenate(features), np.concatenate(logits)


def with_training_statistics(
    checkpoint: Checkpoint, train_images: Any, held_images: Any, held_units: Sequence[str],
    fitted_on: str, device: Any = "cpu", false_alarm_rate: float = 0.01,
    parts: tuple[str, ...] = SCORE_PARTS,
) -> Checkpoint:  # fmt: skip
    """The checkpoint with a features output and the training statistics in its card; `parts`
    are the distances its score averages (edgebc.shift.PARTS)."""
    if len(checkpoint.card.inputs) != 1:
        log.info("no training statistics: shift detection covers one-input models")
        return checkpoint
    if len(train_images) > MAX_TRAINING_FRAMES:
        keep = np.sort(
            np.random.default_rng(0).choice(len(train_images), MAX_TRAINING_FRAMES, replace=False)
        )
        train_images = train_images[torch.from_numpy(keep)]  # fmt: skip
    train_stats, train_features, _ = frame_measurements(checkpoint, train_images, device)
    held_stats, held_features, _ = frame_measurements(checkpoint, held_images, device)
    stats = fit_training_statistics(train_stats, train_features, held_stats, held_features,
                                    held_units, fitted_on, FEATURES, false_alarm_rate, parts=parts)  # fmt: skip
    card = card_with_features(checkpoint.card, model_from_checkpoint(checkpoint))
    log.info("training statistics: %d training frames; out of distribution above %.3g per frame, "
             "%.3g per window (%s, %.0f %% false alarms)", len(train_images), stats.thresholds.frame,
             stats.thresholds.window, fitted_on, 100 * false_alarm_rate)  # fmt: skip
    return replace(checkpoint, card=replace(card, training_statistics=stats))


def cached_split(config: Any, role: str) -> tuple[Any, list[str]]:
    """The model inputs of one split of a training configuration, and their units (patients, or
    images), read through the shared preprocessing as training read them."""
    from edgebc.train.dataset import SampleDataset, cache_tensors
    from edgebc.train.loop import lesion_crop, select_samples

    samples = select_samples(config, role)
    if not samples:
        return None, []
    task = config.data.resolved_task()
    dataset = SampleDataset(samples, config.preprocess, task, lesion_crop(config))
    images, _ = cache_tensors(dataset, config.loader_workers, f"cache {role}")
    return images, [s.unit for s in samples]


def add_training_statistics(
    path: str | Path, out: str | Path | None = None, manifest: str | None = None,
    false_alarm_rate: float = 0.01, device: str = "cpu", parts: tuple[str, ...] = SCORE_PARTS,
) -> Checkpoint:  # fmt: skip
    """Give an existing checkpoint its training statistics (written to `out`, by default in place),
    from the frames its own configuration trained on, thresholds from its calibration split (else
    its validation split)."""
    from edgebc.config import from_mapping
    from edgebc.train.config import TrainConfig

    checkpoint = load_checkpoint(path)
    resolved = checkpoint.config
    if not resolved:
        raise ValueError(f"{path}: has no training configuration to find its training frames by")
    if manifest is not None:
        resolved = {**resolved, "data": {**resolved.get("data", {}), "manifest": manifest}}
    config = from_mapping(TrainConfig, resolved, source=f"{path}: its training configuration")
    train_images, _ = cached_split(config, "train")
    if train_images is None:
        raise ValueError(f"{path}: its configuration selects no training frames")
    held, units = cached_split(config, "calibration")
    fitted_on = "calibration split"
    if held is None:
        held, units = cached_split(config, "val")
        fitted_on = "validation split"
    updated = with_training_statistics(checkpoint, train_images, held, units, fitted_on, device,
                                       false_alarm_rate, parts)  # fmt: skip
    save_checkpoint(out or path, updated)
    return updated


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m edgebc.train.shift_stats",
                                     description="add training-distribution statistics to a checkpoint")  # fmt: skip
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--out", type=Path, help="write here instead of in place")
    parser.add_argument("--manifest", help="the split manifest, if it moved since training")
    parser.add_argument("--false-alarm-rate", type=float, default=0.01)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: its choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    updated = add_training_statistics(
        args.checkpoint, args.out, args.manifest, args.false_alarm_rate
    )
    stats = updated.card.training_statistics
    if stats is not None:
        t = stats.thresholds
        print(f"{args.out or args.checkpoint}: {stats.training_frames} training frames; "
              f"thresholds frame {t.frame:.3g}, window {t.window:.3g} "
              f"({t.fitted_on}, {t.frames} frames, {t.false_alarm_rate:g} false alarms)")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
