"""VGG-16 reference baselines (Simonyan & Zisserman 2015), plain and with BatchNorm, module names as
in torchvision.

Both are registered because the papers compared here use both and a torchvision ImageNet file of
either loads only into its own layout. For training from scratch, as this machine must (nothing is
downloaded), `vgg16_bn` is the one to use: plain VGG-16 needed staged initialisation from a
shallower net to train at all in its paper, and BatchNorm removes that need. `vgg16` is there for
a user who holds torchvision's plain ImageNet file.

torchvision's classifier reads a 7x7 grid of 512 channels through AdaptiveAvgPool2d(7): kept, so
the first Linear's weight has the (4096, 25088) shape of the ImageNet checkpoints. At 224 pixels
the pool is the identity; smaller inputs get their grid repeated up to 7x7. Dropout is the config's
`model.dropout` (torchvision's default is 0.5; the config's default 0.2 is MobileNetV3's).
"""

from __future__ import annotations

from edgebc.optional import require
from edgebc.train.models.registry import ModelSpec, register_model

torch = require("torch", "model definitions")
nn = torch.nn

# configuration "D" of the paper: 3x3 convolutions of these widths, "M" a 2x2 max-pool
_VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class VGG(nn.Module):
    def __init__(
        self,
        widths: tuple[int | str, ...],
        batch_norm: bool,
        hidden: int,
        num_classes: int,
        in_channels: int,
        dropout: float,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for width in widths:
            if width == "M":
                layers.append(nn.MaxPool2d(2, 2))
                continue
            layers.append(nn.Conv2d(channels, int(width), 3, padding=1))
            layers += [nn.BatchNorm2d(int(width))] if batch_norm else []
            layers.append(nn.ReLU(inplace=True))
            channels = int(width)
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(7)
        self.classifier = nn.Sequential(
            nn.Linear(channels * 7 * 7, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
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


def _builder(batch_norm: bool):  # type: ignore[no-untyped-def]
    def build(num_classes: int, in_channels: int, width_mult: float, dropout: float) -> VGG:
        widths = tuple(w if w == "M" else max(8, round(int(w) * width_mult)) for w in _VGG16)
        hidden = max(16, round(4096 * width_mult))
        return VGG(widths, batch_norm, hidden, num_classes, in_channels, dropout)

    return build


def _stages(batch_norm: bool) -> tuple[tuple[str, ...], ...]:
    """The five blocks of `features`, each ending at its max-pool (the stem is the first)."""
    stages: list[tuple[str, ...]] = []
    block: list[str] = []
    index = 0
    for width in _VGG16:
        size = 1 if width == "M" else (3 if batch_norm else 2)  # pool; conv (+ BN) + ReLU
        block += [f"features.{index + k}" for k in range(size)]
        index += size
        if width == "M":
            stages.append(tuple(block))
            block = []
    return tuple(stages)


# Grad-CAM reads the last ReLU, before the final max-pool: twice the final grid's resolution
# (14x14 at 224 pixels), and the pool after it does not write into its output.
for _name, _batch_norm, _last_relu in (("vgg16", False, "features.29"), ("vgg16_bn", True, "features.42")):  # fmt: skip
    register_model(
        ModelSpec(
            _name,
            _builder(_batch_norm),
            classifier="classifier.6",
            first_conv="features.0",
            cam_layer=_last_relu,
            family="baseline",
            torchvision_name=_name,
            stages=_stages(_batch_norm),
        )
    )
