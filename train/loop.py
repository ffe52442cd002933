"""The training loop: one readable epoch loop with the pieces small medical datasets need.

AdamW (or Adam, SGD) with linear warm-up and cosine decay (or a constant or step rate), per
step (optim.py); the first stages of the backbone frozen where asked (freeze.py); weight EMA;
early stopping on a validation metric (these models overfit within 4-10 epochs without it);
gradient clipping; class-weighted loss or a balanced sampler; label smoothing; AMP (bf16, or
fp16 with a scaler) and channels-last on CUDA; deterministic seeding with every generator (and
the optimiser's and schedule's state) saved in `last.pt` so `--resume` continues exactly; DistributedDataParallel under torchrun (gloo on CPU, NCCL on
CUDA); an optional auxiliary lesion-mask loss (lesion_mask.py); optional distillation from
trained teachers' soft predictions (distill.py); with `model.views`, multi-view mammography
cases instead of images (multiview.py); with `model.fusion`, mammography + ultrasound cases
cross-combined into packed instances (fusion_data.py, models/fusion.py). `_prepare` builds the
run, `_fit` is the epoch loop; after the last epoch finalize.py fits the temperature and the
operating point on validation and writes them into the card of `best.pt`.
"""

from __future__ import annotations

import csv
import functools
import io
import logging
import math
import os
import random
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from tqdm import tqdm

from edgebc import metrics
from edgebc.atomic import atomic_write_text
from edgebc.data import read_dataset
from edgebc.data.records import Sample, card_modality
from edgebc.decision import DecisionRule
from edgebc.errors import ConfigError, EdgebcError
from edgebc.localiser import CROP_TRAINED, LesionCrop, open_lesion_crop
from edgebc.model_card import ModelCard, ModelInput, ModelOutput, single_input
from edgebc.optional import require
from edgebc.task import Task
from edgebc.train.augment import BatchAugmenter
from edgebc.train.checkpoint import (
    Checkpoint,
    data_fingerprint,
    lineage_of,
    load_checkpoint,
    save_checkpoint,
    sha256_of_state,
)
from edgebc.train.config import OptimConfig, TrainConfig, load_train_config
from edgebc.train.dataset import SampleDataset, cache_masks, cache_tensors
from edgebc.train.distill import Teacher, distillation_loss, load_teachers, soft_targets
from edgebc.train.freeze import freeze, frozen_prefixes, keep_frozen_in_eval
from edgebc.train.lesion_mask import MaskSupervised, mask_loss
from edgebc.train.models import create_model, model_spec
from edgebc.train.models.heads import arcface_of
from edgebc.train.models.pretrained import load_torchvision_weights
from edgebc.train.multiview import augment_cases, cache_cases, with_views, wrap_views
from edgebc.train.optim import make_optimizer, make_schedule

# fusion (model.fusion) is imported where used: train/fusion_data.py and train/models/fusion.py

torch = require("torch", "training")
log = logging.getLogger(__name__)


@dataclass
class RunResult:
    run_dir: Path
    best_checkpoint: Path
    best_metrics: dict[str, Any]
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
    """The samples for 'train' or 'val' (or 'test') under the config's task and split/fold rules."""
    data = config.data
    if not data.manifest:
        raise ConfigError(
            "data.manifest is not set: give a manifest with a split column (edgebc data split)"
        )
    samples = read_dataset(data.manifest)
    if data.modality:
        samples = [s for s in samples if s.modality == data.modality]
    if data.sources:
        unknown = sorted(set(data.sources) - {s.site(data.site_column) for s in samples})
        if unknown:
            raise ConfigError(
                f"data.sources names {unknown}, which {data.manifest} does not have in its "
                f"{data.site_column} column"
            )
        samples = [s for s in samples if s.site(data.site_column) in data.sources]
    task = data.resolved_task()
    samples = [s for s in samples if task.takes(s.label)]
    if data.fold is not None and role in ("train", "val"):
        if role == "val":
            return [s for s in samples if s.split == data.train_split and s.fold == data.fold]
        return [
            s
            for s in samples
            if s.split == data.train_split and s.fold is not None and s.fold != data.fold
        ]
    wanted = {"train": data.train_split, "val": data.val_split, "test": data.test_split,
              "calibration": data.calibration_split}[role]  # fmt: skip
    return [s for s in samples if s.split == wanted]


def check_teachers(config: TrainConfig, fingerprint: str | None = None) -> list[Teacher]:
    """The run's distillation teachers, each checked against its task, preprocessing, data and fold.

    Cross-validation calls it for every fold before training any, so a wrong teacher for the
    last fold is named at once rather than after hours of training the first ones.
    """
    if fingerprint is None:
        fingerprint = data_fingerprint(
            select_samples(config, "train") + select_samples(config, "val")
        )
    return load_teachers(
        config.optim.distill_from, config.data.resolved_task(), config.preprocess, fingerprint,
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
    run = _prepare(config, resume, dist)
    _fit(run, show_progress, dist)
    if run.supervised is not None:
        run.supervised.release()
    ddp_identical = _weights_identical_across_ranks(run.trained, dist)
    best_metrics: dict[str, Any] = {}
    if dist.is_main:
        from edgebc.train.finalize import finalize_run

        fit_x, fit_y, fit_units, fitted_on = run.calibration or (
            run.val_x,
            run.val_y,
            run.val_units,
            "validation split",
        )
        best_metrics = finalize_run(run.run_dir, fit_x, fit_y, fit_units, fitted_on, run.device, run.config,
                                    run.history, dist.world_size, ddp_identical, run.train_x)  # fmt: skip
    return RunResult(run.run_dir, run.run_dir / "best.pt", best_metrics, run.history)


@dataclass
class _Run:
    """Everything one training run holds between epochs (what `last.pt` saves, and more)."""

    config: TrainConfig
    run_dir: Path
    device: torch.device
    task: Task
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    val_units: list[str]
    # (images, targets, units, "calibration split") when the manifest has a calibration side
    calibration: tuple[torch.Tensor, torch.Tensor, list[str], str] | None
    train_masks: torch.Tensor | None
    has_mask: torch.Tensor | None
    train_soft: torch.Tensor | None
    fingerprint: str
    lineage: dict[str, Any]
    pretrained_report: Any
    model: torch.nn.Module
    ema: Any
    supervised: MaskSupervised | None
    trained: torch.nn.Module
    train_module: torch.nn.Module
    loss_fn: torch.nn.CrossEntropyLoss
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Any
    augmenter: Any  # a BatchAugmenter, or one per fusion branch
    generator: torch.Generator
    sample_weights: torch.Tensor
    memory_format: Any
    amp_dtype: Any
    frozen: tuple[str, ...]  # module prefixes of the frozen stages (freeze.py)
    history: list[dict[str, float]] = field(default_factory=list)
    best_score: float = -math.inf
    best_epoch: int = -1
    stale: int = 0
    start_epoch: int = 0


def _prepare(config: TrainConfig, resume: Path | None, dist: Distributed) -> _Run:
    """Data cached as tensors, teachers checked, model, optimiser and schedule built, and on
    `--resume` every piece of state restored from `last.pt`."""
    run_dir = Path(resume) if resume else Path(config.out_dir) / config.name
    state: Checkpoint | None = None
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
    task = config.data.resolved_task()
    train_samples, val_samples = select_samples(config, "train"), select_samples(config, "val")
    for role, chosen in (("training", train_samples), ("validation", val_samples)):
        if not chosen:
            raise EdgebcError(
                f"no {role} samples in {config.data.manifest} for the configured split/fold"
            )
    missing = sorted(set(task.classes) - {task.class_of(s.label) for s in train_samples})
    if missing:
        raise EdgebcError(f"the training split has no samples of class {', '.join(missing)}")
    _warn_if_merged(config, train_samples)
    if config.turned_laterality != "keep" and config.augment.enabled and config.augment.hflip:
        log.warning(
            "preprocess.laterality is %r but augment.hflip is %s: the augmentation mirrors "
            "breasts the preprocessing turned; set augment.hflip: 0",
            config.turned_laterality, config.augment.hflip,
        )  # fmt: skip
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(
            run_dir / "config.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False)
        )
    prep = config.preprocess
    views = config.model.views
    train_set = SampleDataset(train_samples, prep, task, lesion_crop(config))
    train_x, train_y, train_rows = _cache_split(config, train_samples, "cache train")
    train_masks = has_mask = None
    if config.optim.mask_loss_weight > 0:
        train_masks, has_mask = cache_masks(train_set, config.loader_workers, "cache masks")
        if not bool(has_mask.any()):
            raise EdgebcError(
                f"optim.mask_loss_weight is {config.optim.mask_loss_weight} but none of the "
                f"{len(train_samples)} training samples in {config.data.manifest} has a lesion mask "
                "(manifest column masks); set it to 0 for data without masks"
            )
    val_x, val_y, val_rows = _cache_split(config, val_samples, "cache val")
    calibration_samples = select_samples(config, "calibration")
    calibration = None
    if calibration_samples:
        cal_x, cal_y, cal_rows = _cache_split(config, calibration_samples, "cache calibration")
        calibration = _of_card_modality(config, cal_x, cal_y, cal_rows, "calibration split")
    elif config.model.fusion is None and not config.data.modality:
        calibration = _of_card_modality(config, val_x, val_y, val_rows, "validation split")
    fingerprint = data_fingerprint(train_samples + val_samples + calibration_samples)
    teachers = check_teachers(config, fingerprint)
    provenance = [t.provenance() for t in teachers]
    if state is not None and state.card.lineage.get("distilled_from", []) != provenance:
        raise EdgebcError(
            f"the teachers of {run_dir} changed since the run started (recorded "
            f"{state.card.lineage.get('distilled_from')}, now {provenance}): resuming would not continue exactly"
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

    if config.model.fusion is not None:  # the branches, heads and layout from the run's card
        from edgebc.train.models.fusion import build_fusion

        model = build_fusion(card_of_run(config, "", {}, "", {}))
    else:
        m = config.model
        model = create_model(m.arch, len(task.classes), prep.channels, m.width_mult, m.head,
                             m.dropout, m.head_hidden, m.head_dropout)  # fmt: skip
    if config.optim.bn_momentum > 0:
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.momentum = config.optim.bn_momentum
    # A resumed run starts from its own weights, but still descends from the pretrained file.
    pretrained_report = state.training.get("pretrained") if state is not None else None
    if config.model.pretrained and not resume:
        pretrained_report = load_torchvision_weights(
            model, config.model.arch, config.model.pretrained
        )
    # after the pretrained weights, before the optimiser (which takes trainable parameters only)
    frozen = frozen_prefixes(config.model.arch, config.model.freeze_stages)
    if frozen:
        log.info("frozen: %d parameter tensors of %s", freeze(model, frozen), ", ".join(frozen))
        if not config.model.pretrained:
            log.warning("model.freeze_stages without model.pretrained freezes random weights")
    if views:  # the registered model becomes the backbone shared by every view
        model = wrap_views(model, config.model.arch, views, config.model.view_pooling)
    model.to(device)
    memory_format = (
        torch.channels_last
        if (
            device.type == "cuda"
            and config.channels_last
            and not views
            and config.model.fusion is None
        )  # 5-D cases and packed rows: no NHWC
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
        MaskSupervised(model, model_spec(config.model.arch).cam_layer, prep).to(device)
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
    counts = torch.bincount(train_y.cpu(), minlength=len(task.classes)).float()
    weights = (
        (counts.sum() / (len(task.classes) * counts.clamp(min=1)))
        if optim.class_weights and not optim.balanced_sampler
        else torch.ones(len(task.classes))
    )
    loss_fn = torch.nn.CrossEntropyLoss(
        weight=weights.to(device), label_smoothing=optim.label_smoothing
    )
    optimizer = make_optimizer(trained, optim)
    per_rank = math.ceil(len(train_y) / dist.world_size)
    scheduler = make_schedule(optimizer, optim, max(1, math.ceil(per_rank / optim.batch_size)))
    amp_dtype = _amp_dtype(config, device)
    run = _Run(
        config, run_dir, device, task, train_x, train_y, val_x, val_y, [s.unit for s in val_rows], calibration,
        train_masks, has_mask,
        train_soft, fingerprint, {**lineage_of(pretrained_report, provenance), **crop_lineage(config)},
        pretrained_report,
        model, ema, supervised, trained, train_module, loss_fn, optimizer, scheduler,
        torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16),
        _augmenter(config), torch.Generator().manual_seed(config.seed),
        sampling_weights(train_rows, train_y.cpu(), optim), memory_format, amp_dtype, frozen,
    )  # fmt: skip
    if state is not None:
        _restore(run, state)
        log.info("resuming %s at epoch %d", run_dir, run.start_epoch + 1)
    return run


def _cache_split(
    config: TrainConfig, samples: list[Sample], desc: str
) -> tuple[torch.Tensor, torch.Tensor, list[Sample]]:
    """One split as cached model inputs, their targets and the sample behind each row: an image
    each; with model.views a case each (a breast's views, multiview.py); in patch mode
    (config.patches) the patches cut from the images (train/patches.py)."""
    task, patches = config.data.resolved_task(), config.patches
    if config.model.fusion is not None:
        from edgebc.train.fusion_data import cache_fusion

        fusion = config.model.fusion
        return cache_fusion(samples, config.preprocess, fusion.mg_preprocess or config.preprocess,
                            task, fusion.mg_views, config.loader_workers, desc)  # fmt: skip
    if config.model.views:
        return cache_cases(samples, config.preprocess, task, config.model.views,
                           config.loader_workers, desc)  # fmt: skip
    if patches is None:
        crop = lesion_crop(config)
        x, y = cache_tensors(
            SampleDataset(samples, config.preprocess, task, crop), config.loader_workers, desc
        )
        if crop is not None and crop.uncropped:
            log.warning("%s: %d frames left whole (the localiser's box lay off the image)",
                        desc, crop.uncropped)  # fmt: skip
            crop.uncropped = 0
        return x, y, samples
    from edgebc.train.patches import PatchSampling, cache_patches

    sampling = PatchSampling(patches.per_finding, patches.normal_per_film, patches.jitter)
    return cache_patches(
        samples, config.preprocess, patches.card(), task, sampling, config.seed, desc
    )


@functools.cache
def _open_crop(path: str, margin: float) -> LesionCrop:
    return open_lesion_crop(path, margin)


def lesion_crop(config: TrainConfig) -> LesionCrop | None:
    """The localiser's crop every frame is read through (data.localiser), None for whole frames;
    opened once per run."""
    if not config.data.localiser:
        return None
    return _open_crop(str(Path(config.data.localiser).resolve()), config.data.localiser_margin)


def crop_lineage(config: TrainConfig) -> dict[str, Any]:
    """What the card records of the crops the model was trained on (edgebc.localiser)."""
    crop = lesion_crop(config)
    if crop is None:
        return {}
    return {"input_crop": CROP_TRAINED,
            "localiser": crop.lineage(Path(config.data.localiser or "").resolve())}  # fmt: skip


def _restore(run: _Run, state: Checkpoint) -> None:
    """Continue exactly where `last.pt` left off: weights, EMA, mask head, optimiser, schedule,
    loss scaler, every random generator, history and the early-stopping counters."""
    training = state.training
    run.model.load_state_dict(state.state_dict)
    if run.supervised is not None:
        run.supervised.head.load_state_dict(training["mask_head_state"])
    if run.ema is not None and training.get("ema_state") is not None:
        run.ema.load_state_dict(training["ema_state"])
    run.optimizer.load_state_dict(training["optimizer"])
    run.scheduler.load_state_dict(training["scheduler"])
    run.scaler.load_state_dict(training["scaler"])
    run.generator.set_state(training["rng"]["generator"])
    _restore_rng(training["rng"])
    run.history = training["history"]
    run.best_score, run.best_epoch = training["best_score"], training["best_epoch"]
    run.stale, run.start_epoch = training["stale"], training["epoch"] + 1


def _fit(run: _Run, show_progress: bool, dist: Distributed) -> None:
    """The epoch loop: train, validate, keep the best, save `last.pt`, stop early."""
    config, optim, task = run.config, run.config.optim, run.task
    device, model, ema = run.device, run.model, run.ema
    views = config.model.views
    fusion = config.model.fusion
    arcface = arcface_of(model.get_submodule(
        "classifier" if fusion else "head" if views else model_spec(config.model.arch).classifier
    ))  # fmt: skip
    for epoch in range(run.start_epoch, optim.epochs):
        run.train_module.train()
        keep_frozen_in_eval(model, run.frozen)
        if optim.balanced_sampler or optim.domain_balance > 0:
            order = torch.multinomial(
                run.sample_weights, len(run.train_y), replacement=True, generator=run.generator
            )
        else:
            order = torch.randperm(len(run.train_y), generator=run.generator)
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
            index = order[start : start + optim.batch_size].to(run.train_x.device)
            if fusion is not None:  # present inputs augmented, modality dropout (fusion_data.py)
                from edgebc.train.fusion_data import augment_instances

                images, masks = augment_instances(
                    run.train_x[index].to(device), model.layout, run.augmenter, run.generator,
                    fusion.modality_dropout, fusion.view_dropout), None  # fmt: skip
            elif views:  # present views augmented, views dropped at random (multiview.py)
                images, masks = augment_cases(run.augmenter, run.train_x[index].to(device),
                                              run.generator, config.model.view_dropout), None  # fmt: skip
            else:
                images, masks = run.augmenter.with_masks(
                    run.train_x[index].to(device, non_blocking=True),
                    None if run.train_masks is None else run.train_masks[index].to(device),
                    run.generator,
                )
            images = images.contiguous(memory_format=run.memory_format)
            targets = run.train_y[index].to(device)
            if arcface is not None:
                arcface.targets = targets
            if fusion is not None and fusion.arcface_weight > 0:  # per-branch ArcFace (fusion.py)
                model.targets = targets
            with torch.autocast(device.type, dtype=run.amp_dtype or torch.float32,
                                enabled=run.amp_dtype is not None):  # fmt: skip
                if run.supervised is None:
                    logits = run.train_module(images)
                else:
                    logits, mask_logits = run.train_module(images)
                loss = run.loss_fn(logits, targets)
                if fusion is not None and model.aux_loss is not None:
                    loss = loss + fusion.arcface_weight * model.aux_loss
                if run.train_soft is not None:
                    soft_loss = distillation_loss(
                        logits, run.train_soft[index].to(device), optim.distill_temperature,
                        run.loss_fn.weight[targets],
                    )  # fmt: skip
                    loss = (1 - optim.distill_weight) * loss + optim.distill_weight * soft_loss
                if run.supervised is not None:
                    if run.has_mask is None or masks is None:
                        raise RuntimeError("mask supervision without cached masks")
                    lesion_loss = mask_loss(mask_logits, masks, run.has_mask[index].to(device))
                    loss = loss + optim.mask_loss_weight * lesion_loss
                    mask_loss_sum += float(lesion_loss.detach()) * len(index)
            run.optimizer.zero_grad(set_to_none=True)
            run.scaler.scale(loss).backward()
            if optim.grad_clip > 0:
                run.scaler.unscale_(run.optimizer)
                torch.nn.utils.clip_grad_norm_(run.trained.parameters(), optim.grad_clip)
            run.scaler.step(run.optimizer)
            run.scaler.update()
            run.scheduler.step()
            if ema is not None:
                ema.update_parameters(model)
            loss_sum += float(loss.detach()) * len(index)
            seen += len(index)
            bar.set_postfix(
                loss=f"{loss_sum / seen:.4f}", lr=f"{run.scheduler.get_last_lr()[0]:.2e}"
            )
        if arcface is not None:
            arcface.targets = None
        if fusion is not None:
            model.targets = model.aux_loss = None
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - started
        evaluated = ema.module if ema is not None else model
        row: dict[str, float] = {
            "epoch": epoch + 1,
            "train_loss": loss_sum / max(1, seen),
            "images_per_s": seen * dist.world_size / elapsed,
            "lr": run.scheduler.get_last_lr()[0],
        }
        if run.supervised is not None:
            row["train_mask_loss"] = mask_loss_sum / max(1, seen)
        if dist.is_main:
            logits = predict_logits(
                evaluated, run.val_x, device, optim.batch_size * 2, run.memory_format
            )
            row.update(validation_metrics(logits, run.val_y.numpy(), task, run.loss_fn))
            run.history.append(row)
            score = (
                -row["val_loss"]
                if optim.early_stop_metric == "val_loss"
                else row[optim.early_stop_metric]
            )
            improved = score > run.best_score
            if improved:
                run.best_score, run.best_epoch, run.stale = score, epoch + 1, 0
                save_checkpoint(run.run_dir / "best.pt", _checkpoint_of(run, evaluated, row, epoch))
            else:
                run.stale += 1
            _write_history(run.run_dir / "history.csv", run.history)
            log.info(
                "epoch %d: %s%s",
                epoch + 1,
                ", ".join(f"{k}={v:.4g}" for k, v in row.items() if k != "epoch"),
                " (best)" if improved else "",
            )
            last = _checkpoint_of(run, model, row, epoch)
            last.training.update({
                "ema_state": ema.state_dict() if ema is not None else None,
                "mask_head_state": run.supervised.head.state_dict() if run.supervised is not None else None,
                "optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(),
                "scaler": run.scaler.state_dict(), "rng": {**_rng_state(), "generator": run.generator.get_state()},
                "history": run.history, "best_score": run.best_score, "best_epoch": run.best_epoch, "stale": run.stale,
            })  # fmt: skip
            save_checkpoint(run.run_dir / "last.pt", last)
        stopping = (
            dist.is_main
            and optim.early_stop_patience
            and run.stale >= optim.early_stop_patience
            and epoch + 1 >= optim.early_stop_min_epochs
        )
        stop = torch.tensor([1 if stopping else 0])
        if dist.world_size > 1:
            torch.distributed.broadcast(stop, src=0)
        if int(stop):
            log.info(
                "early stop: no improvement in %s for %d epochs (best at epoch %d)",
                optim.early_stop_metric,
                run.stale,
                run.best_epoch,
            )
            break


def sampling_weights(
    samples: Sequence[Sample], targets: torch.Tensor, optim: OptimConfig
) -> torch.Tensor:
    """Each training frame's draw weight: 1 / its class's count with the balanced sampler, times
    1 / its domain's count ** domain_balance (see OptimConfig.domain_balance)."""
    weights = torch.ones(len(samples), dtype=torch.float64)
    if optim.balanced_sampler:
        counts = torch.bincount(targets, minlength=int(targets.max()) + 1).double()
        weights = weights / counts.clamp(min=1)[targets]
    if optim.domain_balance > 0:
        domains = [s.site(optim.domain_column) or "unknown" for s in samples]
        sizes = Counter(domains)
        weights = weights * torch.tensor(
            [sizes[d] ** -optim.domain_balance for d in domains], dtype=torch.float64
        )
    return weights.float()


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
    logits: np.ndarray, y: np.ndarray, task: Task, loss_fn: Any
) -> dict[str, float]:
    """The epoch's validation row, scored by the one scoring function (no threshold exists yet,
    so the rule decides the most probable class)."""
    scores = metrics.score_predictions(
        metrics.softmax(logits), y, DecisionRule(task.classes, task.positive)
    )
    loss = float(
        loss_fn(
            torch.from_numpy(logits).to(loss_fn.weight.device),
            torch.from_numpy(y).to(loss_fn.weight.device),
        )
    )
    return {
        "val_loss": loss,
        "val_accuracy": scores["accuracy"],
        "val_balanced_accuracy": scores["balanced_accuracy"],
        "val_auc_positive": scores["auc_positive"],
        "val_macro_auc": scores["macro_auc"],
    }


def _of_card_modality(
    config: TrainConfig, x: torch.Tensor, y: torch.Tensor, rows: Sequence[Sample], fitted_on: str
) -> tuple[Any, ...]:
    """Where the operating point is fitted: `rows` (cached as x, y), and for a merged run (one
    classifier over both modalities) only those of the modality its card names (ultrasound): a
    threshold and sensitivity bound fitted on ultrasound and mammograms together would be shown
    on the cart as the ultrasound answers' (edgebc eval scores the mammograms, per modality, at
    that threshold)."""
    card = card_modality(config.data.modality)
    keep = [config.model.fusion is not None or card_modality(s.modality) == card for s in rows]
    if all(keep):
        return (x, y, [s.unit for s in rows], fitted_on)
    if not any(keep):
        raise EdgebcError(f"the {fitted_on} has no {card} sample to fit the operating point on")
    index = torch.tensor([i for i, k in enumerate(keep) if k])
    log.info("the operating point is fitted on the %s's %d %s samples of %d (a merged run: its "
             "card names one %s input)", fitted_on, len(index), card, len(keep), card)  # fmt: skip
    return (x[index], y[index], [rows[i].unit for i in index.tolist()], fitted_on)


def _warn_if_merged(config: TrainConfig, samples: Sequence[Sample]) -> None:
    """Say what a merged model (one image classifier over both modalities) is on a device: its
    card has one input, named ultrasound, so the device checks every frame with the ultrasound
    gate and refuses mammograms; its mammogram figures are `edgebc eval`'s, not the cart's."""
    modalities = {card_modality(s.modality) for s in samples}
    if config.model.fusion is None and len(modalities) > 1:
        log.warning(
            "training one classifier on ultrasound and mammograms together (the merged "
            "protocol): its card names one ultrasound input, so a device refuses mammograms "
            "at the ultrasound gate; score both modalities with edgebc eval --subgroup modality"
        )


def card_of_run(config: TrainConfig, weights_sha256: str, row: dict[str, float], fingerprint: str,
                lineage: dict[str, Any]) -> ModelCard:  # fmt: skip
    """The card of a model this run trained, before finalisation adds temperature and threshold."""
    task = config.data.resolved_task()
    model = config.model
    card = ModelCard(
        name=config.name, arch=model.arch, task=task,
        inputs=_with_patches(single_input(config.preprocess, modality=card_modality(config.data.modality)),
                             config),
        outputs=(ModelOutput("logits", "logits", len(task.classes)),),
        arch_options=_arch_options(model),
        metrics={k: float(v) for k, v in row.items()}, weights_sha256=weights_sha256,
        data_fingerprint=fingerprint, lineage=lineage,
    )  # fmt: skip
    if model.fusion is not None:
        from edgebc.train.fusion_data import fusion_card

        f = model.fusion
        return fusion_card(card, f.branches, f.fusion, f.width, f.tokens,
                           f.mg_preprocess or config.preprocess, f.mg_views, f.view_pooling,
                           f.modality_dropout, f.arcface_weight > 0)  # fmt: skip
    return with_views(card, model.views, model.view_pooling) if model.views else card


def _arch_options(model: Any) -> dict[str, Any]:
    """What rebuilds the network (checkpoint.build_model); the hidden head only where there is
    one, so the cards of models without it read as they always have."""
    options = {"width_mult": model.width_mult, "head": model.head, "dropout": model.dropout}
    if model.head_hidden:
        options.update(head_hidden=list(model.head_hidden), head_dropout=model.head_dropout)
    return options


def _augmenter(config: TrainConfig) -> Any:
    """The batch augmenter: one for the model's input, or one per fusion branch (each on its own
    preprocessing's grid)."""
    if config.model.fusion is None:
        return BatchAugmenter(config.augment, config.preprocess)
    mg_prep = config.model.fusion.mg_preprocess or config.preprocess
    return {"us": BatchAugmenter(config.augment, config.preprocess),
            "mg": BatchAugmenter(config.augment, mg_prep)}  # fmt: skip


def _with_patches(inputs: tuple[ModelInput, ...], config: TrainConfig) -> tuple[ModelInput, ...]:
    """The inputs, carrying the patch card in patch mode so the device slides the same grid."""
    if config.patches is None:
        return inputs
    return tuple(replace(i, patches=config.patches.card()) for i in inputs)


def _checkpoint_of(
    run: _Run, model: torch.nn.Module, row: dict[str, float], epoch: int
) -> Checkpoint:
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    card = card_of_run(run.config, sha256_of_state(state), row, run.fingerprint, run.lineage)
    training = {"config": run.config.to_dict(), "epoch": epoch, "pretrained": run.pretrained_report}
    return Checkpoint(card, state, training)


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
