"""Ultrasound augmentation on whole batches, on the training device (the GPU on CUDA).

Preprocessed tensors are mapped back to [0, 1] intensities with the preprocessing mean/std, then:
horizontal flip (breast anatomy has no left-right convention in a frame), small rotation,
scale and translation (probe angle and pressure), a smooth elastic warp (tissue compression),
brightness, contrast and gamma (gain and dynamic-range knobs), and multiplicative speckle-like
noise; then normalised again. Areas moved in from outside the image are black, like the bars of
a letterboxed frame. Vertical flips are not used: depth runs down and shadows fall downward.

Every random draw comes from the `generator` passed in (seeded, and saved in checkpoints), so
a resumed run continues with exactly the augmentations it would have seen.
"""

from __future__ import annotations

import math

from edgebc.optional import require
from edgebc.preprocess import PreprocessCard
from edgebc.train.config import AugmentConfig

torch = require("torch", "training")
F = torch.nn.functional


class BatchAugmenter:
    def __init__(self, config: AugmentConfig, prep: PreprocessCard) -> None:
        self.config = config
        self.mean = torch.tensor(prep.mean).view(1, -1, 1, 1)
        self.std = torch.tensor(prep.std).view(1, -1, 1, 1)

    def __call__(self, batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return self.with_masks(batch, None, generator)[0]

    def with_masks(
        self, batch: torch.Tensor, masks: torch.Tensor | None, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Augment `batch`; move `masks` (N x 1 x H x W lesion masks) with the same geometry.

        The masks take the flip, rotation, scale, translation and elastic warp, not the intensity
        changes, so a lesion mask keeps covering its lesion. Masks draw no random numbers, so a run
        with masks sees exactly the image augmentations a run without them sees.
        """
        if not self.config.enabled:
            return batch, masks
        c = self.config
        n, _, height, width = batch.shape
        device = batch.device
        mean, std = self.mean.to(device), self.std.to(device)
        x = batch * std + mean  # back to [0, 1] intensities

        def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
            return (torch.rand(*(shape or (n,)), generator=generator) * (high - low) + low).to(
                device
            )

        angle = uniform(-c.rotate_degrees, c.rotate_degrees) * math.pi / 180
        scale = uniform(c.scale[0], c.scale[1])
        flip = torch.where(uniform(0, 1) < c.hflip, -1.0, 1.0)
        shift = uniform(-c.translate, c.translate, n, 2) * 2
        cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
        theta = torch.stack(
            [
                torch.stack([cos * flip, -sin, shift[:, 0]], 1),
                torch.stack([sin * flip, cos, shift[:, 1]], 1),
            ],
            1,
        )
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        if c.elastic > 0:
            coarse = (
                (torch.rand(n, 2, 6, 6, generator=generator) * 2 - 1).to(device) * c.elastic * 2
            )
            grid = grid + F.interpolate(
                coarse, size=(height, width), mode="bicubic", align_corners=False
            ).permute(0, 2, 3, 1)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        if masks is not None:
            masks = F.grid_sample(
                masks, grid, mode="bilinear", padding_mode="zeros", align_corners=False
            )
        view = (n, 1, 1, 1)
        contrast = uniform(1 - c.contrast, 1 + c.contrast).view(view)
        brightness = uniform(-c.brightness, c.brightness).view(view)
        gamma = uniform(c.gamma[0], c.gamma[1]).view(view)
        centre = x.mean(dim=(1, 2, 3), keepdim=True)
        x = ((x - centre) * contrast + centre + brightness).clamp(0, 1) ** gamma
        if c.speckle > 0:
            noise = torch.randn(x.shape, generator=generator).to(device)
            noise = (
                F.avg_pool2d(noise, 3, stride=1, padding=1) * 3
            )  # correlated over ~3 px, unit-ish std
            x = x * (1 + c.speckle * noise)
        return (x.clamp(0, 1) - mean) / std, masks
