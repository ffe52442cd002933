"""Grad-CAM (Selvaraju et al. 2017): where in the frame the model looked for its answer.

The class score's gradient, averaged over each channel of the registered layer's output, weights
those channels; their ReLU'd sum, upsampled to the input, is the heat map. It is drawn over the
model's own input (the cropped, resized frame), which is what the model actually saw.
"""

from __future__ import annotations

import cv2
import numpy as np

from edgebc.optional import require
from edgebc.preprocess import PreprocessCard

torch = require("torch", "Grad-CAM")


def grad_cam(
    model: torch.nn.Module, layer: torch.nn.Module, image: torch.Tensor, target: int
) -> np.ndarray:
    """Heat map in [0, 1] of shape (H, W) for one (C, H, W) input and class index `target`."""
    captured: dict[str, torch.Tensor] = {}

    def keep(_module: torch.nn.Module, _inputs: object, output: torch.Tensor) -> None:
        captured["activation"] = output
        output.register_hook(lambda grad: captured.__setitem__("gradient", grad))

    handle = layer.register_forward_hook(keep)
    try:
        model.eval()
        with torch.enable_grad():
            batch = image.unsqueeze(0).clone().requires_grad_(True)
            model.zero_grad(set_to_none=True)
            logits = model(batch)
            logits[0, target].backward()
    finally:
        handle.remove()
    activation, gradient = captured["activation"][0].detach(), captured["gradient"][0].detach()
    weights = gradient.mean(dim=(1, 2), keepdim=True)
    cam = torch.relu((weights * activation).sum(0)).cpu().numpy().astype(np.float32)
    cam = cv2.resize(cam, (image.shape[2], image.shape[1]), interpolation=cv2.INTER_LINEAR)
    peak = float(cam.max())
    return cam / peak if peak > 0 else cam


def overlay(image: torch.Tensor, cam: np.ndarray, card: PreprocessCard, caption: str) -> np.ndarray:
    """BGR picture: the model input in grey with the heat map blended over it and a caption."""
    mean = np.asarray(card.mean, np.float32).reshape(-1, 1, 1)
    std = np.asarray(card.std, np.float32).reshape(-1, 1, 1)
    grey = np.clip((image.cpu().numpy() * std + mean).mean(0), 0, 1)
    base = cv2.cvtColor((grey * 255).astype(np.uint8), cv2.COLOR_GRAY2BGR)
    heat = cv2.applyColorMap((cam * 255).astype(np.uint8), cv2.COLORMAP_JET)
    picture = cv2.addWeighted(base, 0.6, heat, 0.4, 0)
    cv2.putText(
        picture, caption, (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1, cv2.LINE_AA
    )
    return picture
