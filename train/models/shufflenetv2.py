"""ShuffleNetV2 x0.5 / x1.0 / x1.5 / x2.0 (Ma et al. 2018), module names as in torchvision.

The channel shuffle is a reshape-transpose-reshape; written exactly so, it exports to ONNX as
Reshape/Transpose/Reshape, which TensorRT and ONNX Runtime both handle.
"""

from __future__ import annotations

from edgebc.optional import require
from edgebc.train.models.registry import ModelSpec, register_model

torch = require("torch", "model definitions")
nn = torch.nn

_WIDTHS = {
    "shufflenet_v2_x0_5": [24, 48, 96, 192, 1024],
    "shufflenet_v2_x1_0": [24, 116, 232, 464, 1024],
    "shufflenet_v2_x1_5": [24, 176, 352, 704, 1024],
    "shufflenet_v2_x2_0": [24, 244, 488, 976, 2048],
}
_REPEATS = (4, 8, 4)


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    batch, channels, height, width = x.shape
    x = x.view(batch, groups, channels // groups, height, width).transpose(1, 2).contiguous()
    return x.view(batch, channels, height, width)


class ShuffleBlock(nn.Module):
    def __init__(self, inp: int, oup: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        branch = oup // 2
        if stride > 1:
            self.branch1 = nn.Sequential(
                nn.Conv2d(inp, inp, 3, stride, 1, bias=False, groups=inp),
                nn.BatchNorm2d(inp),
                nn.Conv2d(inp, branch, 1, 1, 0, bias=False),
                nn.BatchNorm2d(branch),
                nn.ReLU(inplace=True),
            )
        else:
            self.branch1 = nn.Sequential()
        self.branch2 = nn.Sequential(
            nn.Conv2d(inp if stride > 1 else branch, branch, 1, 1, 0, bias=False),
            nn.BatchNorm2d(branch),
            nn.ReLU(inplace=True),
            nn.Conv2d(branch, branch, 3, stride, 1, bias=False, groups=branch),
            nn.BatchNorm2d(branch),
            nn.Conv2d(branch, branch, 1, 1, 0, bias=False),
            nn.BatchNorm2d(branch),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2)


class ShuffleNetV2(nn.Module):
    def __init__(self, widths: list[int], num_classes: int, in_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, 2, 1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
        )
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        channels = widths[0]
        for index, (repeats, out) in enumerate(zip(_REPEATS, widths[1:4], strict=True)):
            blocks = [ShuffleBlock(channels, out, 2)] + [
                ShuffleBlock(out, out, 1) for _ in range(repeats - 1)
            ]
            setattr(self, f"stage{index + 2}", nn.Sequential(*blocks))
            channels = out
        self.conv5 = nn.Sequential(
            nn.Conv2d(channels, widths[-1], 1, 1, 0, bias=False),
            nn.BatchNorm2d(widths[-1]),
            nn.ReLU(inplace=True),
        )
        self.fc = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.conv1(x))
        x = self.conv5(self.stage4(self.stage3(self.stage2(x))))
        return self.fc(x.mean([2, 3]))


def _builder(widths: list[int]):  # type: ignore[no-untyped-def]
    def build(
        num_classes: int, in_channels: int, width_mult: float, dropout: float
    ) -> ShuffleNetV2:
        if width_mult != 1.0:
            raise ValueError(
                "ShuffleNetV2 widths are chosen by name (x0_5 .. x2_0); leave width_mult at 1.0"
            )
        return ShuffleNetV2(widths, num_classes, in_channels)

    return build


for _name, _widths in _WIDTHS.items():
    register_model(
        ModelSpec(
            _name,
            _builder(_widths),
            classifier="fc",
            first_conv="conv1.0",
            cam_layer="conv5",
            family="edge",
            torchvision_name=_name,
            stages=(("conv1",), ("stage2",), ("stage3",), ("stage4", "conv5")),
        )
    )
