"""The optimiser and learning-rate schedule a run's OptimConfig names (AdamW, Adam, SGD; cosine,
constant, step), built one way for a new run and for `--resume`, whose saved states they load."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from edgebc.optional import require
from edgebc.train.config import OptimConfig

torch = require("torch", "training")

# the warm-up starts here, and the cosine ends here, as fractions of optim.lr
LR_FLOOR = 0.01


def make_optimizer(model: torch.nn.Module, optim: OptimConfig) -> torch.optim.Optimizer:
    """The configured optimiser over `model`'s trainable parameters (frozen ones are left out)."""
    groups = param_groups(model, optim.weight_decay)
    if optim.optimizer == "sgd":
        return torch.optim.SGD(
            groups, lr=optim.lr, momentum=optim.momentum, nesterov=optim.nesterov
        )
    if optim.optimizer == "adam":
        return torch.optim.Adam(groups, lr=optim.lr)
    return torch.optim.AdamW(groups, lr=optim.lr)


def make_schedule(
    optimizer: torch.optim.Optimizer, optim: OptimConfig, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step LambdaLR: the schedule's factor times the linear warm-up. Its state is the step
    count alone (the factor is a pure function of it), so a resumed run's rate is the same."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(optim, steps_per_epoch))


def lr_factor(optim: OptimConfig, steps_per_epoch: int) -> Callable[[int], float]:
    """The multiple of optim.lr at each optimiser step (0-based)."""
    warmup_steps = optim.warmup_epochs * steps_per_epoch
    total_steps = optim.epochs * steps_per_epoch

    def schedule(step: int) -> float:
        if optim.schedule == "constant":
            return 1.0
        if optim.schedule == "step":
            return float(optim.gamma ** (step // (optim.step_size * steps_per_epoch)))
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return LR_FLOOR + (1 - LR_FLOOR) * 0.5 * (1 + math.cos(math.pi * progress))

    def factor(step: int) -> float:
        if step < warmup_steps:
            ramp = LR_FLOOR + (1 - LR_FLOOR) * step / warmup_steps
            # the cosine starts after the warm-up (as it always has); the others run under it
            return ramp if optim.schedule == "cosine" else ramp * schedule(step)
        return schedule(step)

    return factor


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on biases and normalisation parameters (decaying them only hurts)."""
    decay, no_decay = [], []
    for _, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
