"""The penultimate features of a one-input classifier as a second output, its weights untouched.

Shift detection on the cart compares each frame's features with the training distribution, so
every backend must produce them: the exported graph returns (logits, features). The classifier
itself keeps returning logits alone, and its state_dict keys stay torchvision's: `WithFeatures`
is a view over it that shares its modules and parameters, the trunk (the model with its final
Linear, or ArcFace head, replaced by the identity in a shallow copy) and that final layer.
"""

from __future__ import annotations

import copy
from dataclasses import replace

from edgebc.model_card import ModelCard, ModelOutput
from edgebc.optional import require
from edgebc.train.models.registry import model_spec

torch = require("torch", "model definitions")
nn = torch.nn

FEATURES = "features"


class WithFeatures(nn.Module):
    """(logits, features) of `model`, whose final layer sits at the dotted path `head`."""

    def __init__(self, model: nn.Module, head: str) -> None:
        super().__init__()
        self.head = model.get_submodule(head)
        self.trunk = _without(model, head)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.trunk(x)
        return self.head(features), features


def _without(model: nn.Module, path: str) -> nn.Module:
    """A shallow copy of `model` with the module at `path` replaced by the identity; every other
    module and parameter is shared, and `model` itself is unchanged."""
    top = copy.copy(model)
    top._modules = dict(model._modules)  # type: ignore[assignment]
    parent = top
    *parents, last = path.split(".")
    for name in parents:
        child = copy.copy(parent._modules[name])
        child._modules = dict(child._modules)  # type: ignore[union-attr, assignment]
        parent._modules[name] = child
        parent = child  # type: ignore[assignment]
    parent._modules[last] = nn.Identity()
    return top


def feature_width(model: nn.Module, arch: str) -> int:
    return int(model.get_submodule(model_spec(arch).classifier).in_features)


def card_with_features(card: ModelCard, model: nn.Module) -> ModelCard:
    """The card with a `features` output after the logits, for a one-input model that lacks one
    (a several-input model's card names its own outputs)."""
    if len(card.inputs) != 1 or any(o.kind == "features" for o in card.outputs):
        return card
    features = ModelOutput(FEATURES, "features", feature_width(model, card.arch))
    return replace(card, outputs=(*card.outputs, features))


def model_for_card(model: nn.Module, card: ModelCard) -> nn.Module:
    """The module whose outputs are the card's: the model itself where the card lists only logits
    or the model is a fusion (which returns its features already), else its features view."""
    if len(card.inputs) != 1 or len(card.outputs) == 1:
        return model
    return WithFeatures(model, model_spec(card.arch).classifier).eval()
