"""ResNet-18, ResNet-50 (He et al. 2016) and ResNeXt-50 32x4d (Xie et al. 2017) reference
baselines, module names as in torchvision."""

from __future__ import annotations

from edgebc.optional import require
from edgebc.train.models.registry import ModelSpec, register_model

torch = require("torch", "model definitions")
nn = torch.nn


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 -> 1x1; ResNeXt splits the 3x3 into `groups` paths of `base_width`/64 the width."""

    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        groups: int = 1,
        base_width: int = 64,
    ) -> None:
        super().__init__()
        width = max(1, int(planes * (base_width / 64.0))) * groups  # narrow test models keep a path
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


class ResNet(nn.Module):
    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: list[int],
        num_classes: int,
        in_channels: int,
        width: int,
        groups: int = 1,
        width_per_group: int = 64,
    ) -> None:
        super().__init__()
        # ResNeXt's cardinality and path width; plain ResNets have one 64-wide path
        self.block_options = {"groups": groups, "base_width": width_per_group} if groups > 1 else {}
        self.inplanes = width
        self.conv1 = nn.Conv2d(in_channels, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(block, width, layers[0], 1)
        self.layer2 = self._make_layer(block, width * 2, layers[1], 2)
        self.layer3 = self._make_layer(block, width * 4, layers[2], 2)
        self.layer4 = self._make_layer(block, width * 8, layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width * 8 * block.expansion, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def _make_layer(
        self, block: type[BasicBlock] | type[Bottleneck], planes: int, blocks: int, stride: int
    ) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        options = self.block_options
        layers = [block(self.inplanes, planes, stride, downsample, **options)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, **options) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# the stem, then each layer (the feature map halves at each after the first)
_STAGES = (("conv1", "bn1"), ("layer1",), ("layer2",), ("layer3",), ("layer4",))


def _builder(  # type: ignore[no-untyped-def]
    block: type[BasicBlock] | type[Bottleneck],
    layers: list[int],
    groups: int = 1,
    per_group: int = 64,
):
    def build(num_classes: int, in_channels: int, width_mult: float, dropout: float) -> ResNet:
        width = max(8, round(64 * width_mult))
        return ResNet(block, layers, num_classes, in_channels, width, groups, per_group)

    return build


register_model(
    ModelSpec(
        "resnet18",
        _builder(BasicBlock, [2, 2, 2, 2]),
        "fc",
        "conv1",
        "layer4",
        "baseline",
        "resnet18",
        stages=_STAGES,
    )
)
register_model(
    ModelSpec(
        "resnet50",
        _builder(Bottleneck, [3, 4, 6, 3]),
        "fc",
        "conv1",
        "layer4",
        "baseline",
        "resnet50",
        stages=_STAGES,
    )
)
register_model(
    ModelSpec(
        "resnext50_32x4d",
        _builder(Bottleneck, [3, 4, 6, 3], groups=32, per_group=4),
        "fc",
        "conv1",
        "layer4",
        "baseline",
        "resnext50_32x4d",
        stages=_STAGES,
    )
)
