"""The 17-layer custom CNN of the cross-modality breast design (mammogram and ultrasound), as its
description allows it to be rebuilt.

The design is published as a plain 17-layer stack of convolution, batch normalisation, ReLU,
pooling and fully connected layers ending in softmax, trained from scratch. The text available
here gives that kind-and-count, not the layer table, so this module fixes the rest and says so.
It is not a torchvision model (no ImageNet file exists for it); its keys are its own.

| #  | layer                              | output at 224x224, width_mult 1 | key                  |
|----|------------------------------------|---------------------------------|----------------------|
| 1  | conv 3x3, 32, stride 1, pad 1      | 32 x 224 x 224                  | features.0           |
| 2  | batch norm                         | 32 x 224 x 224                  | features.1           |
| 3  | ReLU                               |                                 | features.2           |
| 4  | max-pool 2x2, stride 2             | 32 x 112 x 112                  | features.3           |
| 5  | conv 3x3, 64, stride 1, pad 1      | 64 x 112 x 112                  | features.4           |
| 6  | batch norm                         |                                 | features.5           |
| 7  | ReLU                               |                                 | features.6           |
| 8  | max-pool 2x2, stride 2             | 64 x 56 x 56                    | features.7           |
| 9  | conv 3x3, 128, stride 1, pad 1     | 128 x 56 x 56                   | features.8           |
| 10 | batch norm                         |                                 | features.9           |
| 11 | ReLU                               |                                 | features.10          |
| 12 | max-pool 2x2, stride 2             | 128 x 28 x 28                   | features.11          |
| 13 | conv 3x3, 256, stride 1, pad 1     | 256 x 28 x 28                   | features.12          |
| 14 | batch norm                         |                                 | features.13          |
| 15 | ReLU (Grad-CAM reads this)         |                                 | features.14          |
| 16 | global average pool                | 256 x 1 x 1                     | features.15          |
| 17 | fully connected, 256 -> classes    | classes                         | classifier           |
|    | softmax                            | class probabilities             | (outside the graph)  |

Where the description leaves a choice open, and what was chosen:
- How the 17 are counted. Counted here: every layer inside the network (convolution, batch norm,
  ReLU, pooling, fully connected). Softmax is the output function: the network returns logits,
  as every edgebc model does, and softmax is applied by the training loss and by the runtime's one
  decision rule (with the card's temperature), so it is not a module. A count that also takes in
  an input layer and softmax/classification layers would leave two or three fewer inside.
- Kernel sizes, widths, strides: 3x3 convolutions with padding 1, widths doubling from 32
  (32, 64, 128, 256; scaled by `width_mult`), 2x2 max-pooling with stride 2.
- The last pooling layer is a global average pool rather than a fourth max-pool feeding a
  flattened grid: the fully connected layer then does not depend on the input size (ultrasound at
  224, mammograms at 512x320) and holds 256 x classes weights instead of millions.
- No dropout layer (none is named in the description); `model.dropout` is ignored, as ResNet's
  builder ignores it. Weight initialisation: Kaiming-normal for convolutions, as for the others.
- Convolutions carry no bias, since the batch norm after each has its own shift.
"""

from __future__ import annotations

from edgebc.optional import require
from edgebc.train.models.registry import ModelSpec, register_model

torch = require("torch", "model definitions")
nn = torch.nn


class CNN17(nn.Module):
    def __init__(self, num_classes: int, in_channels: int, width: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for stage in range(4):
            out = width * 2**stage
            layers += [
                nn.Conv2d(channels, out, 3, padding=1, bias=False),
                nn.BatchNorm2d(out),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2, 2) if stage < 3 else nn.AdaptiveAvgPool2d(1),
            ]
            channels = out
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(channels, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


def _build(num_classes: int, in_channels: int, width_mult: float, dropout: float) -> CNN17:
    return CNN17(num_classes, in_channels, max(4, round(32 * width_mult)))


# each block (conv, BN, ReLU, pool) is a stage: the pool closes it
_STAGES = tuple(tuple(f"features.{4 * b + k}" for k in range(4)) for b in range(4))
register_model(
    ModelSpec(
        "cnn17", _build, "classifier", "features.0", "features.14", "baseline", stages=_STAGES
    )
)
