"""Classifier heads in place of a backbone's final Linear: ArcFace, and hidden layers before it.

ArcFace (additive angular margin, Deng et al. 2019): logits are s * cos(theta) between the
L2-normalised embedding and class weights; in training, the target class's angle is widened by
the margin m, which pulls classes apart on the sphere. The weight is stored under the same key as
the Linear it replaces (without bias).

HiddenLayersHead: Linear -> LeakyReLU -> Dropout per hidden size, then the final layer (Linear or
ArcFace), as designs with a 2048 -> 1024 -> 512 head do.
"""

from __future__ import annotations

import math

from edgebc.optional import require

torch = require("torch", "model definitions")
nn = torch.nn
F = torch.nn.functional


class ArcFaceHead(nn.Module):
    def __init__(
        self, in_features: int, num_classes: int, scale: float = 30.0, margin: float = 0.3
    ) -> None:
        super().__init__()
        self.in_features, self.num_classes = in_features, num_classes
        self.scale, self.margin = scale, margin
        self.weight = nn.Parameter(torch.empty(num_classes, in_features))
        nn.init.xavier_uniform_(self.weight)
        self.targets: torch.Tensor | None = None  # set by the training step, cleared after

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cosine = F.linear(F.normalize(x), F.normalize(self.weight)).clamp(-1 + 1e-7, 1 - 1e-7)
        if self.training and self.targets is not None:
            theta = torch.acos(cosine)
            target = F.one_hot(self.targets, self.num_classes).to(cosine.dtype)
            # Beyond pi - m, adding m would wrap the angle; fall back to a linear penalty there.
            widened = torch.where(
                theta + self.margin < math.pi,
                torch.cos(theta + self.margin),
                cosine - self.margin * math.sin(self.margin),
            )
            cosine = cosine * (1 - target) + widened * target
        return self.scale * cosine


# LeakyReLU's slope below zero (torch's default), fixed so a card's head_hidden rebuilds it
LEAKY_SLOPE = 0.01


class HiddenLayersHead(nn.Module):
    """Hidden layers (`hidden`: Linear, LeakyReLU, Dropout per size) and the final layer (`out`)."""

    def __init__(
        self, in_features: int, sizes: tuple[int, ...], out: nn.Module, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.in_features = in_features  # the backbone's feature width, as the Linear it replaces
        layers: list[nn.Module] = []
        width = in_features
        for size in sizes:
            layers += [nn.Linear(width, size), nn.LeakyReLU(LEAKY_SLOPE), nn.Dropout(dropout)]
            width = size
        self.hidden = nn.Sequential(*layers)
        self.out = out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.hidden(x))


def arcface_of(head: nn.Module) -> ArcFaceHead | None:
    """The ArcFace layer of a head (itself, or the final layer after hidden ones), else None."""
    if isinstance(head, ArcFaceHead):
        return head
    if isinstance(head, HiddenLayersHead) and isinstance(head.out, ArcFaceHead):
        return head.out
    return None
