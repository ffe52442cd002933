"""The training loop: one readable epoch loop with the pieces small medical datasets need.

AdamW with linear warm-up and cosine decay (per step); weight EMA; early stopping on a
validation metric (these models overfit within 4-10 epochs without it); gradient clipping;
class-weighted loss or a balanced sampler; label smoothing; AMP (bf16, or fp16 with a scaler)
and channels-last on CUDA; deterministic seeding with every generator saved in `last.pt` so
`--resume` continues exactly; DistributedDataParallel under torchrun (gloo on CPU, NCCL on
CUDA); an optional auxiliary lesion-mask loss (lesion_mask.py); optional distillation from
trained teachers' soft predictions (distill.py). After the last epoch the best
weights get a temperature fitted on validation and the malignant threshold that reaches the
target sensitivity there, both stored in `best.pt`.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from tqdm import tqdm

from edgebc import metrics
from edgebc.atomic import atomic_write_text
from edgebc.data import read_dataset
from edgebc.data.records import Sample
from edgebc.errors import ConfigError, EdgebcError
from edgebc.optional import require
from edgebc.train.augment import BatchAugmenter
from edgebc.train.checkpoint import (
    data_fingerprint,
    load_checkpoint,
    save_checkpoint,
    sha256_of_state,
)
from edgebc.train.config import TrainConfig, load_train_config
from edgebc.train.dataset import SampleDataset, cache_masks, cache_tensors
from edgebc.train.distill import Teacher, distillation_loss, load_teachers, soft_targets
from edgebc.train.lesion_mask import MaskSupervised, mask_loss
from edgebc.train.models import create_model, model_spec
from edgebc.train.models.heads import ArcFaceHead
from edgebc.train.models.pretrained import load_torchvision_weights

torch = require("torch", "training")
log = logging.getLogger(__name__)


@dataclass
class RunResult:
    run_dir: Path
    best_checkpoint: Path
    best_metrics: dict[str, float]
    history: list[dict[str, float]]


@dataclass(frozen=True)
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def select_samples(config: TrainConfig, role: str) -> list[Sample]:
    """The samples for 'train' or 'val' (or 'test') under the config's split/fold rules."""
    data = config.data
    if not data.manifest:
        raise ConfigError(
            "data.manifest is not set: give a manifest with a split column (edgebc data split)"
        )
    samples = read_dataset(data.manifest)
    if data.modality:
        samples = [s for s in samples if s.modality == data.modality]
    samples = [s for s in samples if s.label in data.classes]
    if data.fold is not None and role in ("train", "val"):
        if role == "val":
            return [s for s in samples if s.split == data.train_split and s.fold == data.fold]
        return [
            s
            for s in samples
            if s.split == data.train_split and s.fold is not None and s.fold != data.fold
        ]
    wanted = {"train": data.train_split, "val": data.val_split, "test": data.test_split}[role]
    return [s for s in samples if s.split == wanted]


def check_teachers(config: TrainConfig, fingerprint: str | None = None) -> list[Teacher]:
    """The run's distillation teachers, each checked against its classes, card, data and fold.

    Cross-validation calls it for every fold before training any, so a wrong teacher for the
    last fold is named at once rather than after hours of training the first ones.
    """
    if fingerprint is None:
        fingerprint = data_fingerprint(
            select_samples(config, "train") + select_samples(config, "val")
        )
    return load_teachers(
        config.optim.distill_from, config.data.classes, config.preprocess.to_dict(), fingerprint,
        config.data.fold,
    )  # fmt: skip


def train_model(
    config: TrainConfig, resume: Path | None = None, show_progress: bool = True
) -> RunResult:
    """Train according to `config` (or continue the run in `resume`); returns where the results are."""
    dist = _init_distributed()
    try:
        result = _train(config, resume, show_progress, dist)
        if dist.world_size > 1:
            # Rank 0 finalises (temperature, threshold, plots) after the last collective; without a
            # barrier the other ranks tear gloo down under it and a worker can abort at exit. Only on
            # success: after a failure a barrier would wait for ranks that never arrive.
            torch.distributed.barrier()
        return result
    finally:
        if dist.world_size > 1:
            torch.distributed.destroy_process_group()


def _train(
    config: TrainConfig, resume: Path | None, show_progress: bool, dist: Distributed
) -> RunResult:
    run_dir = Path(resume) if resume else Path(config.out_dir) / config.name
    state: dict[str, Any] | None = None
    if resume:
        state = load_checkpoint(run_dir / "last.pt")
        config = load_train_config(run_dir / "config.yaml")
    elif (run_dir / "last.pt").exists():
        raise EdgebcError(
            f"{run_dir} already holds a run: continue it with --resume {run_dir} or choose another --name"
        )
    device = _device(config, dist)
    if config.threads:
        torch.set_num_threads(config.threads)
    _seed_everything(config.seed + dist.rank)
    classes = config.data.classes
    positive = classes.index(config.data.positive_class)
    train_samples, val_samples = select_samples(config, "train"), select_samples(config, "val")
    for role, chosen in (("training", train_samples), ("validation", val_samples)):
        if not chosen:
            raise EdgebcError(
                f"no {role} samples in {config.data.manifest} for the configured split/fold"
            )
    missing = sorted(set(classes) - {s.label for s in train_samples})
    if missing:
        raise EdgebcError(f"the training split has no samples of class {', '.join(missing)}")
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(
            run_dir / "config.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False)
        )
    card = config.preprocess
    train_set = SampleDataset(train_samples, card, classes)
    train_x, train_y = cache_tensors(train_set, config.loader_workers, "cache train")
    train_masks = has_mask = None
    if config.optim.mask_loss_weight > 0:
        train_masks, has_mask = cache_masks(train_set, config.loader_workers, "cache masks")
        if not bool(has_mask.any()):
            raise EdgebcError(
                f"optim.mask_loss_weight is {config.optim.mask_loss_weight} but none of the "
                f"{len(train_samples)} training samples in {config.data.manifest} has a lesion mask "
                "(manifest column masks); set it to 0 for data without masks"
            )
    val_x, val_y = cache_tensors(
        SampleDataset(val_samples, card, classes), config.loader_workers, "cache val"
    )
    fingerprint = data_fingerprint(train_samples + val_samples)
    teachers = check_teachers(config, fingerprint)
    provenance = [t.provenance() for t in teachers]
    if state is not None and state.get("distilled_from", []) != provenance:
        raise EdgebcError(
            f"the teachers of {run_dir} changed since the run started (recorded "
            f"{state.get('distilled_from')}, now {provenance}): resuming would not continue exactly"
        )
    if device.type == "cuda":  # small datasets live on the GPU: no loader can starve it
        train_x, train_y = train_x.to(device), train_y.to(device)
        if train_masks is not None and has_mask is not None:
            train_masks, has_mask = train_masks.to(device), has_mask.to(device)
    train_soft = (  # computed once, where the cached images already are
        soft_targets(teachers, train_x, config.optim.distill_temperature).to(train_x.device)
        if teachers
        else None
    )

    model = create_model(
        config.model.arch,
        len(classes),
        card.channels,
        config.model.width_mult,
        config.model.head,
        config.model.dropout,
    )
    if config.optim.bn_momentum > 0:
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.momentum = config.optim.bn_momentum
    # A resumed run starts from its own weights, but still descends from the pretrained file.
    pretrained_report = state.get("pretrained") if state is not None else None
    if config.model.pretrained and not resume:
        pretrained_report = load_torchvision_weights(
            model, config.model.arch, config.model.pretrained
        )
    model.to(device)
    memory_format = (
        torch.channels_last
        if (device.type == "cuda" and config.channels_last)
        else torch.contiguous_format
    )
    model.to(memory_format=memory_format)
    ema = None
    if config.optim.ema_decay > 0:
        ema = torch.optim.swa_utils.AveragedModel(
            model, multi_avg_fn=_warmup_ema(config.optim.ema_decay), use_buffers=True
        )
    # Created after the EMA copy, so the EMA model carries no hook. The mask head trains with the
    # model (and under DDP is synchronised with it) but is never part of the model's state_dict.
    supervised = (
        MaskSupervised(model, model_spec(config.model.arch).cam_layer, card).to(device)
        if train_masks is not None
        else None
    )
    trained: torch.nn.Module = supervised if supervised is not None else model
    train_module = trained
    if dist.world_size > 1:
        train_module = torch.nn.parallel.DistributedDataParallel(
            trained, device_ids=[device.index] if device.type == "cuda" else None
        )

    optim = config.optim
    counts = torch.bincount(train_y.cpu(), minlength=len(classes)).float()
    weights = (
        (counts.sum() / (len(classes) * counts.clamp(min=1)))
        if optim.class_weights and not optim.balanced_sampler
        else torch.ones(len(classes))
    )
    loss_fn = torch.nn.CrossEntropyLoss(
        weight=weights.to(device), label_smoothing=optim.label_smoothing
    )
    optimizer = torch.optim.AdamW(_param_groups(trained, optim.weight_decay), lr=optim.lr)
    per_rank = math.ceil(len(train_y) / dist.world_size)
    steps_per_epoch = max(1, math.ceil(per_rank / optim.batch_size))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _lr_lambda(optim.warmup_epochs * steps_per_epoch, optim.epochs * steps_per_epoch)
    )
    amp_dtype = _amp_dtype(config, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    augmenter = BatchAugmenter(config.augment, card)
    generator = torch.Generator().manual_seed(config.seed)
    sample_weights = (1.0 / counts.clamp(min=1))[train_y.cpu()]

    history: list[dict[str, float]] = []
    best_score, best_epoch, stale, start_epoch = -math.inf, -1, 0, 0
    if state is not None:
        model.load_state_dict(state["state_dict"])
        if supervised is not None:
            supervised.head.load_state_dict(state["mask_head_state"])
        if ema is not None and state.get("ema_state") is not None:
            ema.load_state_dict(state["ema_state"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        generator.set_state(state["rng"]["generator"])
        _restore_rng(state["rng"])
        history = state["history"]
        best_score, best_epoch, stale = state["best_score"], state["best_epoch"], state["stale"]
        start_epoch = state["epoch"] + 1
        log.info("resuming %s at epoch %d", run_dir, start_epoch + 1)
    head = model.get_submodule(model_spec(config.model.arch).classifier)

    for epoch in range(start_epoch, optim.epochs):
        train_module.train()
        if optim.balanced_sampler:
            order = torch.multinomial(
                sample_weights, len(train_y), replacement=True, generator=generator
            )
        else:
            order = torch.randperm(len(train_y), generator=generator)
        order = order[dist.rank :: dist.world_size]
        started, seen, loss_sum, mask_loss_sum = time.perf_counter(), 0, 0.0, 0.0
        batches = range(0, len(order), optim.batch_size)
        bar = tqdm(
            batches,
            desc=f"epoch {epoch + 1}/{optim.epochs}",
            unit="batch",
            disable=not (show_progress and dist.is_main) or None,
            leave=False,
        )
        for start in bar:
            index = order[start : start + optim.batch_size].to(train_x.device)
            images, masks = augmenter.with_masks(
                train_x[index].to(device, non_blocking=True),
                None if train_masks is None else train_masks[index].to(device),
                generator,
            )
            images = images.contiguous(memory_format=memory_format)
            targets = train_y[index].to(device)
            if isinstance(head, ArcFaceHead):
                head.targets = targets
            with torch.autocast(
                device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None
            ):
                if supervised is None:
                    logits = train_module(images)
                else:
                    logits, mask_logits = train_module(images)
                loss = loss_fn(logits, targets)
                if train_soft is not None:
                    soft_loss = distillation_loss(
                        logits, train_soft[index].to(device), optim.distill_temperature,
                        loss_fn.weight[targets],
                    )  # fmt: skip
                    loss = (1 - optim.distill_weight) * loss + optim.distill_weight * soft_loss
                if supervised is not None:
                    assert has_mask is not None and masks is not None
                    lesion_loss = mask_loss(mask_logits, masks, has_mask[index].to(device))
                    loss = loss + optim.mask_loss_weight * lesion_loss
                    mask_loss_sum += float(lesion_loss.detach()) * len(index)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if optim.grad_clip > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(trained.parameters(), optim.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            if ema is not None:
                ema.update_parameters(model)
            loss_sum += float(loss.detach()) * len(index)
            seen += len(index)
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
        if isinstance(head, ArcFaceHead):
            head.targets = None
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - started
        evaluated = ema.module if ema is not None else model
        row: dict[str, float] = {
            "epoch": epoch + 1,
            "train_loss": loss_sum / max(1, seen),
            "images_per_s": seen * dist.world_size / elapsed,
            "lr": scheduler.get_last_lr()[0],
        }
        if supervised is not None:
            row["train_mask_loss"] = mask_loss_sum / max(1, seen)
        if dist.is_main:
            logits = predict_logits(evaluated, val_x, device, optim.batch_size * 2, memory_format)
            row.update(validation_metrics(logits, val_y.numpy(), positive, loss_fn, len(classes)))
            history.append(row)
            score = (
                -row["val_loss"]
                if optim.early_stop_metric == "val_loss"
                else row[optim.early_stop_metric]
            )
            improved = score > best_score
            if improved:
                best_score, best_epoch, stale = score, epoch + 1, 0
                save_checkpoint(
                    run_dir / "best.pt",
                    _describe(
                        config, evaluated, row, fingerprint, epoch, pretrained_report, provenance
                    ),
                )
            else:
                stale += 1
            _write_history(run_dir / "history.csv", history)
            log.info(
                "epoch %d: %s%s",
                epoch + 1,
                ", ".join(f"{k}={v:.4g}" for k, v in row.items() if k != "epoch"),
                " (best)" if improved else "",
            )
            save_checkpoint(run_dir / "last.pt", {
                **_describe(config, model, row, fingerprint, epoch, pretrained_report, provenance),
                "ema_state": ema.state_dict() if ema is not None else None,
                "mask_head_state": supervised.head.state_dict() if supervised is not None else None,
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                "rng": {**_rng_state(), "generator": generator.get_state()},
                "history": history, "best_score": best_score, "best_epoch": best_epoch, "stale": stale,
            })  # fmt: skip
        stop = torch.tensor(
            [
                1
                if (
                    dist.is_main
                    and optim.early_stop_patience
                    and stale >= optim.early_stop_patience
                )
                else 0
            ]
        )
        if dist.world_size > 1:
            torch.distributed.broadcast(stop, src=0)
        if int(stop):
            log.info(
                "early stop: no improvement in %s for %d epochs (best at epoch %d)",
                optim.early_stop_metric,
                stale,
                best_epoch,
            )
            break

    if supervised is not None:
        supervised.release()
    ddp_identical = _weights_identical_across_ranks(trained, dist)
    best_metrics: dict[str, float] = {}
    if dist.is_main:
        best_metrics = finalize_best(run_dir / "best.pt", val_x, val_y, device, config, positive)
        best_metrics["ddp_world_size"] = dist.world_size
        if dist.world_size > 1:
            best_metrics["ddp_weights_identical"] = float(ddp_identical)
        atomic_write_text(run_dir / "metrics.json", json.dumps(best_metrics, indent=2) + "\n")
        from edgebc.train.plots import training_curves

        training_curves(history, run_dir / "curves.png", optim.early_stop_metric)
    return RunResult(run_dir, run_dir / "best.pt", best_metrics, history)


def predict_logits(
    model: torch.nn.Module,
    images: torch.Tensor,
    device: torch.device,
    batch_size: int = 64,
    memory_format: Any = None,
) -> np.ndarray:
    """Logits for a cached tensor dataset, in evaluation mode, without gradients."""
    model.eval()
    outputs = []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size].to(device)
            if memory_format is not None:
                batch = batch.contiguous(memory_format=memory_format)
            outputs.append(model(batch).float().cpu())
    return torch.cat(outputs).numpy()


def validation_metrics(
    logits: np.ndarray, y: np.ndarray, positive: int, loss_fn: Any, num_classes: int
) -> dict[str, float]:
    probs = metrics.softmax(logits)
    matrix = metrics.confusion_matrix(y, probs.argmax(1), num_classes)
    recalls = [s.sensitivity for s in metrics.per_class_stats(matrix)]
    aucs = [metrics.roc_auc(y == k, probs[:, k]) for k in range(num_classes)]
    loss = float(
        loss_fn(
            torch.from_numpy(logits).to(loss_fn.weight.device),
            torch.from_numpy(y).to(loss_fn.weight.device),
        )
    )
    return {
        "val_loss": loss,
        "val_accuracy": float(np.trace(matrix) / matrix.sum()),
        "val_balanced_accuracy": float(np.nanmean(recalls)),
        "val_auc_positive": aucs[positive],
        "val_macro_auc": float(np.nanmean(aucs)),
    }


def finalize_best(
    path: Path,
    val_x: torch.Tensor,
    val_y: torch.Tensor,
    device: torch.device,
    config: TrainConfig,
    positive: int,
) -> dict[str, float]:
    """Fit the temperature and the operating threshold on validation; store both in best.pt."""
    record = load_checkpoint(path)
    model = model_from_checkpoint(record).to(device)
    logits = predict_logits(model, val_x, device)
    y = val_y.numpy()
    temperature = metrics.fit_temperature(logits, y)
    probs = metrics.softmax(logits, temperature)
    point = metrics.threshold_for_sensitivity(
        y == positive, probs[:, positive], config.optim.target_sensitivity
    )
    ece_before, _ = metrics.expected_calibration_error(metrics.softmax(logits), y)
    ece_after, _ = metrics.expected_calibration_error(probs, y)
    record.update(
        temperature=temperature,
        operating_point=point.__dict__,
        calibration={"val_ece_before": ece_before, "val_ece_after": ece_after},
    )
    save_checkpoint(
        path,
        {
            k: v
            for k, v in record.items()
            if k not in ("format", "format_version", "versions", "saved")
        },
    )
    return {**record["metrics"], "best_epoch": record["epoch"] + 1, "temperature": temperature, "val_ece_before": ece_before,
            "val_ece_after": ece_after, "threshold": point.threshold, "val_sensitivity_at_threshold": point.sensitivity,
            "val_specificity_at_threshold": point.specificity}  # fmt: skip


def model_from_checkpoint(record: dict[str, Any]) -> torch.nn.Module:
    """Rebuild the model a checkpoint describes and load its weights (eval mode)."""
    options = record["model"]
    model = create_model(
        options["arch"],
        len(record["class_names"]),
        record["preprocess"]["channels"],
        options["width_mult"],
        options["head"],
        options["dropout"],
    )
    model.load_state_dict(record["state_dict"])
    return model.eval()


def _describe(
    config: TrainConfig,
    model: torch.nn.Module,
    row: dict[str, float],
    fingerprint: str,
    epoch: int,
    pretrained: Any,
    distilled_from: list[dict[str, str]],
) -> dict[str, Any]:
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return {
        "arch": config.model.arch, "model": config.to_dict()["model"], "class_names": list(config.data.classes),
        "positive_class": config.data.positive_class, "preprocess": config.preprocess.to_dict(), "config": config.to_dict(),
        "state_dict": state, "weights_sha256": sha256_of_state(state), "metrics": dict(row), "epoch": epoch,
        "data_fingerprint": fingerprint, "pretrained": pretrained, "distilled_from": distilled_from,
        "temperature": 1.0, "operating_point": None,
    }  # fmt: skip


def _warmup_ema(decay: float):  # type: ignore[no-untyped-def]
    """EMA whose decay ramps up as (1 + n) / (10 + n): early averages follow the model instead of
    staying pinned to the random initialisation (a plain 0.998 needs ~500 steps to forget it)."""

    def update(
        ema_params: list[torch.Tensor], params: list[torch.Tensor], num_averaged: torch.Tensor
    ) -> None:
        n = float(num_averaged)
        step_decay = min(decay, (1 + n) / (10 + n))
        floats = [(e, p) for e, p in zip(ema_params, params, strict=True) if e.is_floating_point()]
        if floats:
            torch._foreach_lerp_([e for e, _ in floats], [p for _, p in floats], 1 - step_decay)
        for e, p in zip(ema_params, params, strict=True):
            if not e.is_floating_point():  # BatchNorm's num_batches_tracked: copy, do not average
                e.copy_(p)

    return update


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on biases and normalisation parameters (decaying them only hurts)."""
    decay, no_decay = [], []
    for _, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def _lr_lambda(warmup_steps: int, total_steps: int, floor: float = 0.01):  # type: ignore[no-untyped-def]
    def factor(step: int) -> float:
        if step < warmup_steps:
            return floor + (1 - floor) * step / max(1, warmup_steps)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def _amp_dtype(config: TrainConfig, device: torch.device) -> Any:
    if config.amp == "off" or (config.amp == "auto" and device.type != "cuda"):
        return None
    if config.amp == "fp16":
        return torch.float16
    if config.amp == "bf16" or (device.type == "cuda" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float16


def _device(config: TrainConfig, dist: Distributed) -> torch.device:
    if config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise EdgebcError(
                "device cuda was asked for but torch sees no CUDA GPU (CPU build of torch, or no driver)"
            )
        torch.cuda.set_device(dist.local_rank)
        return torch.device("cuda", dist.local_rank)
    return torch.device("cpu")


def _init_distributed() -> Distributed:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Distributed()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    torch.distributed.init_process_group(backend=backend)
    return Distributed(torch.distributed.get_rank(), world, int(os.environ.get("LOCAL_RANK", "0")))


def _weights_identical_across_ranks(model: torch.nn.Module, dist: Distributed) -> bool:
    if dist.world_size == 1:
        return True
    checksum = torch.tensor(
        [float(sum(p.detach().double().sum().cpu() for p in model.parameters()))],
        dtype=torch.float64,
    )
    gathered = [torch.zeros_like(checksum) for _ in range(dist.world_size)]
    torch.distributed.all_gather(gathered, checksum)
    return all(torch.equal(g, gathered[0]) for g in gathered)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}  # fmt: skip


def _restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _write_history(path: Path, history: list[dict[str, float]]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(history[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    atomic_write_text(path, buffer.getvalue())
