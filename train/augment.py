"""Ultrasound augmentation on whole batches, on the training device (the GPU on CUDA).

Preprocessed tensors are mapped back to [0, 1] intensities with the preprocessing mean/std, then:
horizontal flip (breast anatomy has no left-right convention in a frame), small rotation,
scale and translation (probe angle and pressure), a smooth elastic warp (tissue compression),
brightness, contrast and gamma (gain and dynamic-range knobs), and multiplicative speckle-like
noise; then, where the recipe asks, another scanner's look (overall and depth-dependent gain, a
log-compression transfer curve, coarser resolution, blur, electronic noise, speckle grain); then
normalised again. Areas moved in from outside the image are black, like the bars of
a letterboxed frame. Vertical flips are off unless the recipe asks (augment.vflip): depth runs
down and shadows fall downward; designs that flip both ways set it.

Every random draw comes from the `generator` passed in (seeded, and saved in checkpoints), so
a resumed run continues with exactly the augmentations it would have seen.
"""

from __future__ import annotations

import math
from typing import Any

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
        # drawn only when asked, so a recipe without it sees what it saw before the option existed
        vflip = torch.where(uniform(0, 1) < c.vflip, -1.0, 1.0) if c.vflip > 0 else None
        cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
        theta = torch.stack(
            [
                torch.stack([cos * flip, -sin, shift[:, 0]], 1),
                torch.stack([sin * flip, cos, shift[:, 1]], 1),
            ],
            1,
        )
        if vflip is not None:  # mirrors the rows as `flip` mirrors the columns
            theta[:, :, 1] = theta[:, :, 1] * vflip[:, None]
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
            grain = c.speckle_grain[0]
            if len(c.speckle_grain) > 1:
                pick = torch.randint(len(c.speckle_grain), (1,), generator=generator)
                grain = c.speckle_grain[int(pick)]
            noise = torch.randn(x.shape, generator=generator).to(device)
            # correlated over `grain` px; times grain keeps the std near one
            noise = F.avg_pool2d(noise, grain, stride=1, padding=grain // 2) * grain
            x = x * (1 + c.speckle * noise)
        x = self._scanner(x.clamp(0, 1), uniform, generator)
        return (x.clamp(0, 1) - mean) / std, masks

    def _scanner(self, x: torch.Tensor, uniform: Any, generator: torch.Generator) -> torch.Tensor:
        """Another scanner's look: overall and depth gain, transfer curve, resolution, blur, noise.

        Each draws random numbers only when enabled, so a recipe without them is unchanged.
        """
        c = self.config
        n, _, height, _ = x.shape
        view = (n, 1, 1, 1)
        if c.gain > 0:
            x = x * torch.exp(uniform(-c.gain, c.gain)).view(view)
        if c.tgc > 0:  # a smooth gain curve down the rows (depth), from five control points
            knots = uniform(-c.tgc, c.tgc, n, 1, 5)
            curve = F.interpolate(knots, size=height, mode="linear", align_corners=True)
            x = x * torch.exp(curve).view(n, 1, height, 1)
        if c.dynamic_range > 0:
            a = uniform(-c.dynamic_range, c.dynamic_range).view(view)
            a = torch.where(a.abs() < 1e-3, torch.full_like(a, 1e-3), a)
            x = torch.expm1(a * x.clamp(0, 1)) / torch.expm1(a)
        if c.resolution > 1:
            factors = uniform(1.0, c.resolution).tolist()
            x = torch.cat([_resampled(x[i : i + 1], f) for i, f in enumerate(factors)])
        if c.blur > 0:
            x = _gaussian_blur(x, uniform(0.0, c.blur))
        if c.noise > 0:
            x = x + c.noise * torch.randn(x.shape, generator=generator).to(x.device)
        return x


def _resampled(image: torch.Tensor, factor: float) -> torch.Tensor:
    """Down by `factor` (antialiased) and back up: the detail a coarser scanner would resolve."""
    if factor < 1.05:
        return image
    size = image.shape[-2:]
    small = [max(4, round(s / factor)) for s in size]
    down = F.interpolate(image, size=small, mode="bilinear", antialias=True, align_corners=False)
    return F.interpolate(down, size=size, mode="bilinear", align_corners=False)


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur with one sigma per image (a grouped convolution)."""
    n, channels, _, _ = x.shape
    radius = max(1, math.ceil(3 * float(sigma.max())))
    offsets = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    s = sigma.clamp(min=1e-3).view(n, 1)
    kernel = torch.exp(-0.5 * (offsets.view(1, -1) / s) ** 2)
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(channels, 0)
    flat = x.reshape(1, n * channels, *x.shape[-2:])
    flat = F.pad(flat, (radius, radius, radius, radius), mode="reflect")
    flat = F.conv2d(flat, kernel.view(n * channels, 1, 1, -1), groups=n * channels)
    flat = F.conv2d(flat, kernel.view(n * channels, 1, -1, 1), groups=n * channels)
    return flat.view_as(x)
