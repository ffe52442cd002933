"""MobileNetV3-Small and -Large (Howard et al. 2019), module names as in torchvision.

Hard-swish, squeeze-excitation and depthwise convolutions make it the edge model of choice and
the one quantization and some exporters trip on; keep this definition plain so both see the
standard pattern.

`mobilenet_v3_small_minimal` is the paper's "minimalistic" Small (section 6.1.2 and TensorFlow's
MobileNetV3SmallMinimalistic): no squeeze-excite, ReLU wherever Small has hard-swish (stem, blocks,
last convolution, classifier) and every depthwise kernel 3x3, for hardware and INT8 kernels that
run those poorly. Same widths, strides and module names as Small (torchvision has no such model;
its keys are Small's without the `block.N.fc1/fc2` of squeeze-excite, the projection one index
earlier where a block drops it).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

from edgebc.optional import require
from edgebc.train.models.layers import ConvNormActivation, SqueezeExcitation, make_divisible
from edgebc.train.models.registry import ModelSpec, register_model

torch = require("torch", "model definitions")
nn = torch.nn

_norm = partial(nn.BatchNorm2d, eps=0.001, momentum=0.01)


@dataclass(frozen=True)
class BlockConfig:
    in_channels: int
    kernel: int
    expanded: int
    out_channels: int
    use_se: bool
    hard_swish: bool
    stride: int


def _scaled(blocks: list[tuple], width_mult: float) -> list[BlockConfig]:
    return [
        BlockConfig(
            make_divisible(i * width_mult),
            k,
            make_divisible(e * width_mult),
            make_divisible(o * width_mult),
            se,
            act == "HS",
            s,
        )
        for i, k, e, o, se, act, s in blocks
    ]


_SMALL = [
    (16, 3, 16, 16, True, "RE", 2), (16, 3, 72, 24, False, "RE", 2), (24, 3, 88, 24, False, "RE", 1),
    (24, 5, 96, 40, True, "HS", 2), (40, 5, 240, 40, True, "HS", 1), (40, 5, 240, 40, True, "HS", 1),
    (40, 5, 120, 48, True, "HS", 1), (48, 5, 144, 48, True, "HS", 1), (48, 5, 288, 96, True, "HS", 2),
    (96, 5, 576, 96, True, "HS", 1), (96, 5, 576, 96, True, "HS", 1),
]  # fmt: skip
_SMALL_MINIMAL = [(i, 3, e, o, False, "RE", s) for i, _, e, o, _, _, s in _SMALL]
_LARGE = [
    (16, 3, 16, 16, False, "RE", 1), (16, 3, 64, 24, False, "RE", 2), (24, 3, 72, 24, False, "RE", 1),
    (24, 5, 72, 40, True, "RE", 2), (40, 5, 120, 40, True, "RE", 1), (40, 5, 120, 40, True, "RE", 1),
    (40, 3, 240, 80, False, "HS", 2), (80, 3, 200, 80, False, "HS", 1), (80, 3, 184, 80, False, "HS", 1),
    (80, 3, 184, 80, False, "HS", 1), (80, 3, 480, 112, True, "HS", 1), (112, 3, 672, 112, True, "HS", 1),
    (112, 5, 672, 160, True, "HS", 2), (160, 5, 960, 160, True, "HS", 1), (160, 5, 960, 160, True, "HS", 1),
]  # fmt: skip


class InvertedResidual(nn.Module):
    def __init__(self, cfg: BlockConfig) -> None:
        super().__init__()
        self.use_res_connect = cfg.stride == 1 and cfg.in_channels == cfg.out_channels
        activation = nn.Hardswish if cfg.hard_swish else nn.ReLU
        layers: list[nn.Module] = []
        if cfg.expanded != cfg.in_channels:
            layers.append(
                ConvNormActivation(
                    cfg.in_channels, cfg.expanded, 1, norm_layer=_norm, activation=activation
                )
            )
        layers.append(
            ConvNormActivation(
                cfg.expanded,
                cfg.expanded,
                cfg.kernel,
                cfg.stride,
                groups=cfg.expanded,
                norm_layer=_norm,
                activation=activation,
            )
        )
        if cfg.use_se:
            layers.append(SqueezeExcitation(cfg.expanded, make_divisible(cfg.expanded // 4, 8)))
        layers.append(
            ConvNormActivation(cfg.expanded, cfg.out_channels, 1, norm_layer=_norm, activation=None)
        )
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return out + x if self.use_res_connect else out


class MobileNetV3(nn.Module):
    def __init__(
        self,
        blocks: list[BlockConfig],
        last_channel: int,
        num_classes: int,
        in_channels: int,
        dropout: float,
        activation: type[nn.Module] = nn.Hardswish,
    ) -> None:
        """`activation`: the stem's, the last convolution's and the classifier's (the blocks say
        their own); ReLU in the minimalistic variant."""
        super().__init__()
        layers: list[nn.Module] = [
            ConvNormActivation(
                in_channels, blocks[0].in_channels, 3, 2, norm_layer=_norm, activation=activation
            )
        ]
        layers += [InvertedResidual(cfg) for cfg in blocks]
        last_in = blocks[-1].out_channels
        layers.append(
            ConvNormActivation(last_in, 6 * last_in, 1, norm_layer=_norm, activation=activation)
        )
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Linear(6 * last_in, last_channel),
            activation(inplace=True),
            nn.Dropout(p=dropout),  # not in place: a ReLU before it needs its output in backward
            nn.Linear(last_channel, num_classes),
        )
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0, 0.01)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def _builder(blocks: list[tuple], last_channel: int, activation: type[nn.Module] = nn.Hardswish):  # type: ignore[no-untyped-def]
    def build(num_classes: int, in_channels: int, width_mult: float, dropout: float) -> MobileNetV3:
        return MobileNetV3(
            _scaled(blocks, width_mult),
            make_divisible(last_channel * width_mult),
            num_classes,
            in_channels,
            dropout,
            activation,
        )

    return build


def _stages(blocks: list[tuple]) -> tuple[tuple[str, ...], ...]:
    """The stem, then a stage from each block that halves the feature map; the last 1x1
    convolution joins the last stage."""
    stages = [["features.0"]]
    for index, block in enumerate(blocks, start=1):
        if block[-1] == 2:
            stages.append([])
        stages[-1].append(f"features.{index}")
    stages[-1].append(f"features.{len(blocks) + 1}")
    return tuple(tuple(stage) for stage in stages)


for _name, _blocks, _last, _activation, _tv_name in (
    ("mobilenet_v3_small", _SMALL, 1024, nn.Hardswish, "mobilenet_v3_small"),
    ("mobilenet_v3_large", _LARGE, 1280, nn.Hardswish, "mobilenet_v3_large"),
    ("mobilenet_v3_small_minimal", _SMALL_MINIMAL, 1024, nn.ReLU, None),
):
    register_model(
        ModelSpec(_name, _builder(_blocks, _last, _activation), classifier="classifier.3", first_conv="features.0.0",
                  cam_layer="features", family="edge", torchvision_name=_tv_name, stages=_stages(_blocks))
    )  # fmt: skip
