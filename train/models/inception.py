"""Inception-v3 (Szegedy et al. 2016, "Rethinking the Inception Architecture") reference baseline,
module names as in torchvision, without the auxiliary classifier.

The auxiliary head only adds a training loss term (the paper calls it a regulariser); torchvision
builds none with `aux_logits=False`, whose state_dict (no `AuxLogits.*` keys) is the one matched
here, and `--pretrained` leaves a torchvision file's `AuxLogits.` keys out. As in torchvision:
every convolution is conv -> BatchNorm (eps 0.001) -> ReLU; the 7x7 convolutions are factorised
into 1x7 and 7x1 pairs (Mixed_6b-e) and the last blocks split 3x3 into parallel 1x3 and 3x1
(Mixed_7b-c). torchvision's `transform_input` (re-scaling ImageNet-normalised RGB for its ImageNet
file) is not here: the preprocessing card decides the input's normalisation, as for every edgebc
model. The design's input is 299 px; at 224 px (edgebc's usual size) the last grid is 5x5 rather
than 8x8, and it needs at least 75 px.
"""

from __future__ import annotations

from edgebc.optional import require
from edgebc.train.models.googlenet import BasicConv2d
from edgebc.train.models.registry import ModelSpec, register_model

torch = require("torch", "model definitions")
nn = torch.nn
F = torch.nn.functional


class _Concat(nn.Module):
    """Branches on one input, concatenated along channels; `out_channels` their sum."""

    out_channels: int

    def branches(self, x: torch.Tensor) -> list[torch.Tensor]:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(self.branches(x), 1)


class InceptionA(_Concat):
    """35x35 block: 1x1; 1x1 -> 5x5; 1x1 -> 3x3 -> 3x3; 3x3 average pool -> 1x1."""

    def __init__(self, c_in: int, pool: int, s) -> None:  # type: ignore[no-untyped-def]
        super().__init__()
        self.branch1x1 = BasicConv2d(c_in, s(64), 1)
        self.branch5x5_1 = BasicConv2d(c_in, s(48), 1)
        self.branch5x5_2 = BasicConv2d(s(48), s(64), 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(c_in, s(64), 1)
        self.branch3x3dbl_2 = BasicConv2d(s(64), s(96), 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(s(96), s(96), 3, padding=1)
        self.branch_pool = BasicConv2d(c_in, s(pool), 1)
        self.out_channels = s(64) * 2 + s(96) + s(pool)

    def branches(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(F.avg_pool2d(x, 3, 1, 1)),
        ]


class InceptionB(_Concat):
    """35 -> 17 grid reduction: 3x3 stride 2; 1x1 -> 3x3 -> 3x3 stride 2; 3x3 max-pool stride 2."""

    def __init__(self, c_in: int, s) -> None:  # type: ignore[no-untyped-def]
        super().__init__()
        self.branch3x3 = BasicConv2d(c_in, s(384), 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(c_in, s(64), 1)
        self.branch3x3dbl_2 = BasicConv2d(s(64), s(96), 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(s(96), s(96), 3, stride=2)
        self.out_channels = s(384) + s(96) + c_in

    def branches(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, 3, 2),
        ]


class InceptionC(_Concat):
    """17x17 block with 7x7 convolutions factorised into 1x7 and 7x1 (`c7` channels inside)."""

    def __init__(self, c_in: int, c7: int, s) -> None:  # type: ignore[no-untyped-def]
        super().__init__()
        c7, out = s(c7), s(192)
        row, col = {"padding": (0, 3)}, {"padding": (3, 0)}
        self.branch1x1 = BasicConv2d(c_in, out, 1)
        self.branch7x7_1 = BasicConv2d(c_in, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), **row)
        self.branch7x7_3 = BasicConv2d(c7, out, (7, 1), **col)
        self.branch7x7dbl_1 = BasicConv2d(c_in, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), **col)
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), **row)
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), **col)
        self.branch7x7dbl_5 = BasicConv2d(c7, out, (1, 7), **row)
        self.branch_pool = BasicConv2d(c_in, out, 1)
        self.out_channels = 4 * out

    def branches(self, x: torch.Tensor) -> list[torch.Tensor]:
        double = x
        for k in range(1, 6):
            double = getattr(self, f"branch7x7dbl_{k}")(double)
        return [
            self.branch1x1(x),
            self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
            double,
            self.branch_pool(F.avg_pool2d(x, 3, 1, 1)),
        ]


class InceptionD(_Concat):
    """17 -> 8 grid reduction: 1x1 -> 3x3 stride 2; 1x1 -> 1x7 -> 7x1 -> 3x3 stride 2; max-pool."""

    def __init__(self, c_in: int, s) -> None:  # type: ignore[no-untyped-def]
        super().__init__()
        self.branch3x3_1 = BasicConv2d(c_in, s(192), 1)
        self.branch3x3_2 = BasicConv2d(s(192), s(320), 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(c_in, s(192), 1)
        self.branch7x7x3_2 = BasicConv2d(s(192), s(192), (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(s(192), s(192), (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(s(192), s(192), 3, stride=2)
        self.out_channels = s(320) + s(192) + c_in

    def branches(self, x: torch.Tensor) -> list[torch.Tensor]:
        seven = self.branch7x7x3_1(x)
        for k in (2, 3, 4):
            seven = getattr(self, f"branch7x7x3_{k}")(seven)
        return [self.branch3x3_2(self.branch3x3_1(x)), seven, F.max_pool2d(x, 3, 2)]


class InceptionE(_Concat):
    """8x8 block whose 3x3 convolutions split into parallel 1x3 and 3x1, both kept."""

    def __init__(self, c_in: int, s) -> None:  # type: ignore[no-untyped-def]
        super().__init__()
        row, col = {"padding": (0, 1)}, {"padding": (1, 0)}
        self.branch1x1 = BasicConv2d(c_in, s(320), 1)
        self.branch3x3_1 = BasicConv2d(c_in, s(384), 1)
        self.branch3x3_2a = BasicConv2d(s(384), s(384), (1, 3), **row)
        self.branch3x3_2b = BasicConv2d(s(384), s(384), (3, 1), **col)
        self.branch3x3dbl_1 = BasicConv2d(c_in, s(448), 1)
        self.branch3x3dbl_2 = BasicConv2d(s(448), s(384), 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(s(384), s(384), (1, 3), **row)
        self.branch3x3dbl_3b = BasicConv2d(s(384), s(384), (3, 1), **col)
        self.branch_pool = BasicConv2d(c_in, s(192), 1)
        self.out_channels = s(320) + 4 * s(384) + s(192)

    def branches(self, x: torch.Tensor) -> list[torch.Tensor]:
        single = self.branch3x3_1(x)
        double = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        return [
            self.branch1x1(x),
            self.branch3x3_2a(single), self.branch3x3_2b(single),
            self.branch3x3dbl_3a(double), self.branch3x3dbl_3b(double),
            self.branch_pool(F.avg_pool2d(x, 3, 1, 1)),
        ]  # fmt: skip


# the blocks after the stem, in order: (name, kind, its one size argument or None)
_MIXED = (
    ("Mixed_5b", InceptionA, 32), ("Mixed_5c", InceptionA, 64), ("Mixed_5d", InceptionA, 64),
    ("Mixed_6a", InceptionB, None),
    ("Mixed_6b", InceptionC, 128), ("Mixed_6c", InceptionC, 160), ("Mixed_6d", InceptionC, 160),
    ("Mixed_6e", InceptionC, 192),
    ("Mixed_7a", InceptionD, None), ("Mixed_7b", InceptionE, None), ("Mixed_7c", InceptionE, None),
)  # fmt: skip


class Inception3(nn.Module):
    def __init__(
        self, num_classes: int, in_channels: int, width_mult: float, dropout: float
    ) -> None:
        super().__init__()

        def s(channels: int) -> int:
            return max(4, round(channels * width_mult))

        self.Conv2d_1a_3x3 = BasicConv2d(in_channels, s(32), 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(s(32), s(32), 3)
        self.Conv2d_2b_3x3 = BasicConv2d(s(32), s(64), 3, padding=1)
        self.maxpool1 = nn.MaxPool2d(3, 2)
        self.Conv2d_3b_1x1 = BasicConv2d(s(64), s(80), 1)
        self.Conv2d_4a_3x3 = BasicConv2d(s(80), s(192), 3)
        self.maxpool2 = nn.MaxPool2d(3, 2)
        channels = s(192)
        for name, kind, size in _MIXED:
            block = kind(channels, s) if size is None else kind(channels, size, s)
            self.add_module(name, block)
            channels = block.out_channels
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(channels, num_classes)
        # He initialisation, not torchvision's truncated normal of std 0.1: through 94 convolutions
        # that grows an untrained net's logits to ~1e7 (BatchNorm in eval mode starts with unit
        # statistics), beyond what any float32 check of an export can compare; He keeps them O(1)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
            elif isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, mean=0.0, std=0.01, a=-2, b=2)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool1(self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x))))
        x = self.maxpool2(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)))
        for name, _kind, _size in _MIXED:
            x = getattr(self, name)(x)
        return self.fc(self.dropout(torch.flatten(self.avgpool(x), 1)))


def _build(num_classes: int, in_channels: int, width_mult: float, dropout: float) -> Inception3:
    return Inception3(num_classes, in_channels, width_mult, dropout)


register_model(
    ModelSpec(
        "inception_v3", _build, "fc", "Conv2d_1a_3x3.conv", "Mixed_7c", "baseline", "inception_v3",
        stages=(
            ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3"),
            ("Conv2d_3b_1x1", "Conv2d_4a_3x3"),
            ("Mixed_5b", "Mixed_5c", "Mixed_5d"),
            ("Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"),
            ("Mixed_7a", "Mixed_7b", "Mixed_7c"),
        ),
    )
)  # fmt: skip
