"""DenseNet-121 reference baseline (Huang et al. 2017), module names as in torchvision."""

from __future__ import annotations

from collections import OrderedDict

from edgebc.optional import require
from edgebc.train.models.registry import ModelSpec, register_model

torch = require("torch", "model definitions")
nn = torch.nn
F = torch.nn.functional


class DenseLayer(nn.Module):
    def __init__(self, in_features: int, growth: int, bn_size: int) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(in_features)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_features, bn_size * growth, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth, growth, 3, padding=1, bias=False)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        x = self.conv1(self.relu1(self.norm1(torch.cat(features, 1))))
        return self.conv2(self.relu2(self.norm2(x)))


class DenseBlock(nn.ModuleDict):
    def __init__(self, layers: int, in_features: int, growth: int, bn_size: int) -> None:
        super().__init__()
        for i in range(layers):
            self.add_module(
                f"denselayer{i + 1}", DenseLayer(in_features + i * growth, growth, bn_size)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)


class Transition(nn.Sequential):
    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(in_features)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(in_features, out_features, 1, bias=False)
        self.pool = nn.AvgPool2d(2, 2)


class DenseNet(nn.Module):
    def __init__(
        self,
        growth: int,
        blocks: tuple[int, ...],
        init_features: int,
        num_classes: int,
        in_channels: int,
    ) -> None:
        super().__init__()
        self.features = nn.Sequential(
            OrderedDict(
                conv0=nn.Conv2d(in_channels, init_features, 7, 2, 3, bias=False),
                norm0=nn.BatchNorm2d(init_features),
                relu0=nn.ReLU(inplace=True),
                pool0=nn.MaxPool2d(3, 2, 1),
            )
        )
        channels = init_features
        for i, layers in enumerate(blocks):
            self.features.add_module(f"denseblock{i + 1}", DenseBlock(layers, channels, growth, 4))
            channels += layers * growth
            if i != len(blocks) - 1:
                self.features.add_module(f"transition{i + 1}", Transition(channels, channels // 2))
                channels //= 2
        self.features.add_module("norm5", nn.BatchNorm2d(channels))
        self.classifier = nn.Linear(channels, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.features(x))
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _build(num_classes: int, in_channels: int, width_mult: float, dropout: float) -> DenseNet:
    return DenseNet(
        max(4, round(32 * width_mult)),
        (6, 12, 24, 16),
        max(8, round(64 * width_mult)),
        num_classes,
        in_channels,
    )


register_model(
    ModelSpec(
        "densenet121", _build, "classifier", "features.conv0", "features", "baseline", "densenet121",
        stages=(("features.conv0", "features.norm0"),
                *((f"features.denseblock{i}", f"features.transition{i}") for i in (1, 2, 3)),
                ("features.denseblock4", "features.norm5")),
    )
)  # fmt: skip
