"""Freezing the first N stages of a backbone (ModelSpec.stages): their parameters get no gradient
and are left out of the optimiser, and their BatchNorm layers stay in evaluation mode, so the
running statistics a pretrained backbone brought are used and never overwritten."""

from __future__ import annotations

from edgebc.errors import ConfigError
from edgebc.optional import require
from edgebc.train.models import model_spec

torch = require("torch", "training")


def frozen_prefixes(arch: str, n: int) -> tuple[str, ...]:
    """The module prefixes of `arch`'s first `n` stages; a count it lacks is refused."""
    if n == 0:
        return ()
    stages = model_spec(arch).stages
    if not stages:
        raise ConfigError(
            f"model.freeze_stages is {n} but architecture {arch} declares no stages to freeze "
            "(ModelSpec.stages); set it to 0"
        )
    if not 0 <= n <= len(stages):
        raise ConfigError(
            f"model.freeze_stages must be 0..{len(stages)} for {arch} (its stages: "
            f"{', '.join('+'.join(stage) for stage in stages)}), got {n}"
        )
    return tuple(prefix for stage in stages[:n] for prefix in stage)


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def freeze(model: torch.nn.Module, prefixes: tuple[str, ...]) -> int:
    """Stop gradients for the parameters under `prefixes` (before the optimiser is built, which
    takes trainable parameters only); returns how many tensors were frozen."""
    frozen = 0
    for name, param in model.named_parameters():
        if _under(name, prefixes):
            param.requires_grad_(False)
            frozen += 1
    if prefixes and not frozen:
        raise ConfigError(f"no parameters under the stages {list(prefixes)}: a wrong ModelSpec")
    return frozen


def keep_frozen_in_eval(model: torch.nn.Module, prefixes: tuple[str, ...]) -> None:
    """After `model.train()`: BatchNorm under `prefixes` back to evaluation mode (it would
    otherwise normalise with the batch's statistics and update its running ones)."""
    for name, module in model.named_modules():
        if _under(name, prefixes) and isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.eval()
