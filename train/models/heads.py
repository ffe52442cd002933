"""ArcFace: additive angular margin (Deng et al. 2019) as a drop-in for the final Linear layer.

Logits are s * cos(theta) between the L2-normalised embedding and class weights; in training,
the target class's angle is widened by the margin m, which pulls classes apart on the sphere.
The weight is stored under the same key as the Linear it replaces (without bias).
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
