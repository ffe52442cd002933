"""Auxiliary lesion-mask supervision: teach the backbone where the lesion is, at training time only.

BUSI frames carry burned-in calipers and text next to most lesions, and a classifier trained on a
few hundred images learns them: Grad-CAM of our first BUSI models lit up the caliper crosses.
Where the data has lesion masks (BUSI has one per lesion, and an empty one per normal frame), a
1x1 convolution on the Grad-CAM layer's feature map predicts the mask at that layer's
resolution, and its loss pulls the features toward the lesion and away from whatever merely sits
next to it. The head lives outside the model: checkpoints, exports and state_dict keys stay those
of the plain architecture, and the cart runs exactly the network it would run without it.
"""

from __future__ import annotations

from typing import Any

from edgebc.optional import require
from edgebc.preprocess import PreprocessCard

torch = require("torch", "training")
nn, F = torch.nn, torch.nn.functional


class MaskSupervised(nn.Module):
    """`model` plus a lesion-mask head on its `layer`; forward gives (class logits, mask logits)."""

    def __init__(self, model: nn.Module, layer: str, prep: PreprocessCard) -> None:
        super().__init__()
        self.model = model
        self.head = nn.Conv2d(feature_channels(model, layer, prep), 1, kernel_size=1)
        self._features: torch.Tensor | None = None
        self._hook = model.get_submodule(layer).register_forward_hook(self._keep)

    def _keep(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        self._features = output

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(images)
        features, self._features = self._features, None
        if features is None:
            raise RuntimeError("the mask head's feature layer did not run in the model's forward")
        return logits, self.head(features)

    def release(self) -> None:
        """Take the hook off the model (the model itself is left as it was built)."""
        self._hook.remove()


def feature_channels(model: nn.Module, layer: str, prep: PreprocessCard) -> int:
    """How many channels `layer` puts out, found by one forward pass on a blank input."""
    seen: list[int] = []
    hook = model.get_submodule(layer).register_forward_hook(
        lambda module, inputs, output: seen.append(output.shape[1])
    )
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros((1, *prep.input_shape)))
    finally:
        hook.remove()
        model.train(was_training)
    return seen[0]


def mask_loss(
    mask_logits: torch.Tensor, masks: torch.Tensor, present: torch.Tensor
) -> torch.Tensor:
    """Binary cross-entropy between the predicted mask and the lesion's coverage of each feature cell.

    `masks` (N x 1 x H x W, coverage in [0, 1]) are area-averaged down to the feature map, so a cell
    half covered by the lesion has target 0.5. Samples whose `present` is False (no mask file) add
    nothing; the mean is over the samples that have one.
    """
    target = F.adaptive_avg_pool2d(masks.float(), mask_logits.shape[-2:])
    per_sample = F.binary_cross_entropy_with_logits(
        mask_logits.float(), target, reduction="none"
    ).mean(dim=(1, 2, 3))
    weights = present.to(per_sample.dtype)
    return (per_sample * weights).sum() / weights.sum().clamp(min=1)
