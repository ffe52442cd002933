"""GoogLeNet (Szegedy et al. 2015) reference baseline, module names as in torchvision, without the
auxiliary classifiers.

The auxiliary heads only add training loss terms in the paper; torchvision drops them at inference
and builds none with `aux_logits=False`, whose state_dict (no `aux1.*`, `aux2.*` keys) is the one
matched here. A torchvision ImageNet file holds them too: remove its `aux1.`/`aux2.` keys before
`--pretrained`. torchvision's version of the design (kept, so keys and shapes match): batch norm
after every convolution, and a 3x3 convolution in the branch the paper calls 5x5. torchvision's
`transform_input` (re-scaling ImageNet-normalised RGB for its ImageNet file) is not here: the
preprocessing card decides the input's normalisation, as for every edgebc model.
"""

from __future__ import annotations

from edgebc.optional import require
from edgebc.train.models.registry import ModelSpec, register_model

torch = require("torch", "model definitions")
nn = torch.nn
F = torch.nn.functional

# name, 1x1, 3x3 reduce, 3x3, "5x5" reduce, "5x5" (a 3x3 in torchvision), pool projection;
# "pool" marks the max-pools between the stages
_INCEPTIONS = (
    ("inception3a", 64, 96, 128, 16, 32, 32),
    ("inception3b", 128, 128, 192, 32, 96, 64),
    ("maxpool3", 3),
    ("inception4a", 192, 96, 208, 16, 48, 64),
    ("inception4b", 160, 112, 224, 24, 64, 64),
    ("inception4c", 128, 128, 256, 24, 64, 64),
    ("inception4d", 112, 144, 288, 32, 64, 64),
    ("inception4e", 256, 160, 320, 32, 128, 128),
    ("maxpool4", 2),
    ("inception5a", 256, 160, 320, 32, 128, 128),
    ("inception5b", 384, 192, 384, 48, 128, 128),
)


class BasicConv2d(nn.Module):
    """conv (no bias) -> BatchNorm (eps 0.001, as torchvision's) -> ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, **options: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, bias=False, **options)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)), inplace=True)


class Inception(nn.Module):
    """Four parallel branches (1x1; 1x1 -> 3x3; 1x1 -> 3x3; 3x3 max-pool -> 1x1), concatenated."""

    def __init__(self, in_channels: int, c1: int, c3r: int, c3: int, c5r: int, c5: int, pool: int):
        super().__init__()
        self.branch1 = BasicConv2d(in_channels, c1, 1)
        self.branch2 = nn.Sequential(
            BasicConv2d(in_channels, c3r, 1), BasicConv2d(c3r, c3, 3, padding=1)
        )
        self.branch3 = nn.Sequential(
            BasicConv2d(in_channels, c5r, 1), BasicConv2d(c5r, c5, 3, padding=1)
        )
        self.branch4 = nn.Sequential(
            nn.MaxPool2d(3, 1, 1, ceil_mode=True), BasicConv2d(in_channels, pool, 1)
        )
        self.out_channels = c1 + c3 + c5 + pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = (self.branch1, self.branch2, self.branch3, self.branch4)
        return torch.cat([branch(x) for branch in branches], 1)


class GoogLeNet(nn.Module):
    def __init__(
        self, num_classes: int, in_channels: int, width_mult: float, dropout: float
    ) -> None:
        super().__init__()

        def scaled(channels: int) -> int:
            return max(4, round(channels * width_mult))

        self.conv1 = BasicConv2d(in_channels, scaled(64), 7, stride=2, padding=3)
        self.maxpool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = BasicConv2d(scaled(64), scaled(64), 1)
        self.conv3 = BasicConv2d(scaled(64), scaled(192), 3, padding=1)
        self.maxpool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.stages: list[str] = []  # the order forward() runs the inceptions and pools in
        channels = scaled(192)
        for name, *sizes in _INCEPTIONS:
            if name.startswith("maxpool"):
                self.add_module(name, nn.MaxPool2d(sizes[0], 2, ceil_mode=True))
            else:
                block = Inception(channels, *(scaled(size) for size in sizes))
                self.add_module(name, block)
                channels = block.out_channels
            self.stages.append(name)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(channels, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d | nn.Linear):
                nn.init.trunc_normal_(module.weight, mean=0.0, std=0.01, a=-2, b=2)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool1(self.conv1(x))
        x = self.maxpool2(self.conv3(self.conv2(x)))
        for name in self.stages:
            x = getattr(self, name)(x)
        return self.fc(self.dropout(torch.flatten(self.avgpool(x), 1)))


def _build(num_classes: int, in_channels: int, width_mult: float, dropout: float) -> GoogLeNet:
    return GoogLeNet(num_classes, in_channels, width_mult, dropout)


register_model(
    ModelSpec(
        "googlenet",
        _build,
        "fc",
        "conv1.conv",
        "inception5b",
        "baseline",
        "googlenet",
        stages=(
            ("conv1",),
            ("conv2", "conv3"),
            ("inception3a", "inception3b"),
            tuple(f"inception4{c}" for c in "abcde"),
            ("inception5a", "inception5b"),
        ),
    )
)
