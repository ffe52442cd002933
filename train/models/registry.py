"""Architectures registered by name; a duplicate name is an error, an unknown one names the choices.

Each entry knows where its classifier sits (to re-initialise it for our classes or swap in an
ArcFace head or a multi-layer head), where its first convolution sits (to adapt ImageNet RGB
weights to grey input), which layer Grad-CAM should read and what its stages are (to freeze the
first N), so none of that is guessed from module shapes elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from edgebc.config import look_up_option
from edgebc.optional import require

torch = require("torch", "model definitions")
nn = torch.nn


@dataclass(frozen=True)
class ModelSpec:
    name: str
    build: Callable[..., nn.Module]
    classifier: str  # dotted path of the final Linear layer
    first_conv: str  # dotted path of the input convolution
    cam_layer: str  # dotted path of the module whose output Grad-CAM reads
    family: str  # "edge" models are the ones carts run; "baseline" ones are for comparison
    torchvision_name: str | None = None  # the torchvision builder with the same state_dict keys
    # The backbone's stages from the input on, each the module prefixes it holds: a stage ends
    # where the feature map is next halved (the stem is the first). model.freeze_stages N freezes
    # the first N (train/freeze.py); () = this architecture cannot be frozen by stage.
    stages: tuple[tuple[str, ...], ...] = ()


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(spec: ModelSpec) -> ModelSpec:
    if spec.name in _REGISTRY:
        raise ValueError(f"model name {spec.name!r} is registered twice")
    _REGISTRY[spec.name] = spec
    return spec


def list_models(family: str | None = None) -> list[str]:
    return sorted(
        name for name, spec in _REGISTRY.items() if family is None or spec.family == family
    )


def model_spec(name: str) -> ModelSpec:
    return _REGISTRY[look_up_option(name, list_models(), what="architecture")]


def create_model(
    name: str,
    num_classes: int = 3,
    in_channels: int = 1,
    width_mult: float = 1.0,
    head: str = "linear",
    dropout: float = 0.2,
    head_hidden: tuple[int, ...] = (),
    head_dropout: float = 0.0,
) -> nn.Module:
    """Build architecture `name` for `num_classes` classes and `in_channels` input channels.

    head="arcface" replaces the final Linear with an additive-angular-margin layer (same weight
    key, no bias), which produces scaled cosine logits at inference and margin logits in training.
    head_hidden (e.g. (1024, 512)) puts hidden Linear + LeakyReLU + Dropout(head_dropout) layers
    before that final layer (heads.HiddenLayersHead, in the final layer's place); the backbone's
    keys stay torchvision's.
    """
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    if in_channels not in (1, 3):
        raise ValueError(f"in_channels must be 1 or 3, got {in_channels}")
    if width_mult <= 0:
        raise ValueError(f"width_mult must be positive, got {width_mult}")
    look_up_option(head, ("linear", "arcface"), what="head")
    if any(size < 1 for size in head_hidden) or not 0 <= head_dropout < 1:
        raise ValueError(
            f"head_hidden sizes must be >= 1 and head_dropout in [0, 1), got {list(head_hidden)} "
            f"and {head_dropout}"
        )
    spec = model_spec(name)
    model = spec.build(
        num_classes=num_classes, in_channels=in_channels, width_mult=width_mult, dropout=dropout
    )
    if head == "arcface" or head_hidden:
        from edgebc.train.models.heads import ArcFaceHead, HiddenLayersHead

        width = get_submodule(model, spec.classifier).in_features
        final = (
            ArcFaceHead(head_hidden[-1] if head_hidden else width, num_classes)
            if head == "arcface"
            else nn.Linear(head_hidden[-1], num_classes)
        )
        if head_hidden:
            final = HiddenLayersHead(width, head_hidden, final, head_dropout)
        set_submodule(model, spec.classifier, final)
    model.edgebc_arch = name  # type: ignore[assignment]
    return model


def get_submodule(model: nn.Module, path: str) -> nn.Module:
    return model.get_submodule(path)


def set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, name, module) if not name.isdigit() else parent.__setitem__(int(name), module)
