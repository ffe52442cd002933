"""A plain conv-BN-ReLU-pool stack, the kind of custom baseline thesis work starts from."""

from __future__ import annotations

from edgebc.optional import require
from edgebc.train.models.registry import ModelSpec, register_model

torch = require("torch", "model definitions")
nn = torch.nn


class SimpleCNN(nn.Module):
    def __init__(self, num_classes: int, in_channels: int, width: int, dropout: float) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for stage in range(5):
            out = width * 2 ** min(stage, 3)
            layers += [
                nn.Conv2d(channels, out, 3, padding=1, bias=False),
                nn.BatchNorm2d(out),
                nn.ReLU(inplace=True),
            ]
            layers += [nn.MaxPool2d(2)] if stage < 4 else []
            channels = out
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Dropout(dropout), nn.Linear(channels, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.avgpool(self.features(x)))


def _build(num_classes: int, in_channels: int, width_mult: float, dropout: float) -> SimpleCNN:
    return SimpleCNN(num_classes, in_channels, max(4, round(16 * width_mult)), dropout)


register_model(
    ModelSpec("simple_cnn", _build, "classifier.2", "features.0", "features", "baseline",
              stages=tuple(tuple(f"features.{i}" for i in range(4 * s, min(4 * s + 4, 19)))
                           for s in range(5)))  # conv, BN, ReLU, max-pool per stage; none last
)  # fmt: skip
