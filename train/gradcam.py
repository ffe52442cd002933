"""Grad-CAM (Selvaraju et al. 2017): where in the frame the model looked for its answer.

The class score's gradient, averaged over each channel of the registered layer's output, weights
those channels; their ReLU'd sum, upsampled to the input, is the heat map. For ultrasound it is
drawn over the model's own input (the cropped, resized frame), which is what the model actually
saw. A mammogram's input is a 4096-pixel film shrunk to a few hundred pixels, where a
microcalcification cluster is a dot: its map is carried back through the letterbox onto the
breast at the film's own resolution (`overlay_on_frame`), where a reader can judge what it covers.
"""

from __future__ import annotations

import cv2
import numpy as np

from edgebc.optional import require
from edgebc.preprocess import PreprocessCard, letterbox_geometry

torch = require("torch", "Grad-CAM")


def grad_cam(
    model: torch.nn.Module, layer: torch.nn.Module, image: torch.Tensor, target: int
) -> np.ndarray:
    """Heat map in [0, 1] of shape (H, W) for one (C, H, W) input and class index `target`."""
    return layer_cams(model, layer, image.unsqueeze(0), target, tuple(image.shape[1:]))[0]


def layer_cams(
    model: torch.nn.Module, layer: torch.nn.Module, batch: torch.Tensor, target: int,
    size: tuple[int, ...],
) -> np.ndarray:  # fmt: skip
    """Heat maps in [0, 1], (R, H, W) at `size`, one per row of `layer`'s output, for the logit
    `target` of the model's first row on `batch`.

    One input is usually one row; a fusion model's packed row (train/models/fusion.py) runs its
    mammogram branch over every view slot of the case at once, so a layer inside that branch
    has a row per view, and each view's map comes from the one backward pass of the fused
    decision's logit (an absent view's row is all zeros, as it carries no gradient)."""
    captured: dict[str, torch.Tensor] = {}

    def keep(_module: torch.nn.Module, _inputs: object, output: torch.Tensor) -> None:
        captured["activation"] = output
        output.register_hook(lambda grad: captured.__setitem__("gradient", grad))

    handle = layer.register_forward_hook(keep)
    try:
        model.eval()
        with torch.enable_grad():
            batch = batch.clone().requires_grad_(True)
            model.zero_grad(set_to_none=True)
            logits = model(batch)
            logits = logits[0] if isinstance(logits, tuple) else logits
            logits[0, target].backward()
    finally:
        handle.remove()
    activation, gradient = captured["activation"].detach(), captured["gradient"].detach()
    weights = gradient.mean(dim=(2, 3), keepdim=True)
    maps = torch.relu((weights * activation).sum(1)).cpu().numpy().astype(np.float32)
    height, width = int(size[-2]), int(size[-1])
    out = []
    for cam in maps:
        cam = cv2.resize(cam, (width, height), interpolation=cv2.INTER_LINEAR)
        peak = float(cam.max())
        out.append(cam / peak if peak > 0 else cam)
    return np.stack(out)


def lesion_attention(
    model: torch.nn.Module,
    layer: torch.nn.Module,
    images: torch.Tensor,
    masks: list[np.ndarray | None],
    targets: np.ndarray,
) -> dict[str, float]:
    """How much of the Grad-CAM evidence for the true class falls on the lesion.

    For each frame with a non-empty lesion mask (coverage on the model input's grid), the share of
    the heat map's mass inside the mask. A model reading calipers or text beside the lesion scores
    low; a map spread evenly over the frame scores the lesion's area share, reported alongside as
    the floor to beat. Frames whose map is blank (no positive evidence at all) are counted apart.
    """
    shares, areas, blank = [], [], 0
    for image, mask, target in zip(images, masks, targets, strict=True):
        if mask is None or float(mask.sum()) == 0:
            continue
        cam = grad_cam(model, layer, image, int(target))
        total = float(cam.sum())
        if total <= 0:
            blank += 1
            continue
        shares.append(float((cam * mask).sum()) / total)
        areas.append(float(mask.mean()))
    return {
        "frames": len(shares),
        "blank_maps": blank,
        "mean_share_on_lesion": float(np.mean(shares)) if shares else float("nan"),
        "mean_lesion_area": float(np.mean(areas)) if areas else float("nan"),
    }


def overlay(image: torch.Tensor, cam: np.ndarray, prep: PreprocessCard, caption: str) -> np.ndarray:
    """BGR picture: the model input in grey with the heat map blended over it and a caption."""
    mean = np.asarray(prep.mean, np.float32).reshape(-1, 1, 1)
    std = np.asarray(prep.std, np.float32).reshape(-1, 1, 1)
    grey = np.clip((image.cpu().numpy() * std + mean).mean(0), 0, 1)
    base = cv2.cvtColor((grey * 255).astype(np.uint8), cv2.COLOR_GRAY2BGR)
    heat = cv2.applyColorMap((cam * 255).astype(np.uint8), cv2.COLORMAP_JET)
    picture = cv2.addWeighted(base, 0.6, heat, 0.4, 0)
    cv2.putText(
        picture, caption, (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1, cv2.LINE_AA
    )
    return picture


def map_on_frame(cam: np.ndarray, frame_shape: tuple[int, ...], prep: PreprocessCard) -> np.ndarray:
    """`cam` (on the model input's grid) cut out of the letterbox bars and stretched back over
    the frame of `frame_shape` the input was resized from: the heat map at the frame's own
    resolution, pixel for pixel with it (so a lesion mask of the frame can be laid on it)."""
    height, width = frame_shape[:2]
    geometry = letterbox_geometry(height, width, prep)
    inner = cam[geometry.top : geometry.top + geometry.height,
                geometry.left : geometry.left + geometry.width]  # fmt: skip
    return cv2.resize(inner, (width, height), interpolation=cv2.INTER_LINEAR)


def overlay_on_frame(
    frame: np.ndarray, cam: np.ndarray, prep: PreprocessCard, caption: str
) -> np.ndarray:
    """BGR picture at `frame`'s own resolution: `cam` carried back onto the frame the input was
    resized from (`map_on_frame`; for a mammogram, the cropped, laterality-normalised breast),
    blended over it, with a caption.

    `frame` is grey or BGR, uint8 or uint16 (shown between its own 0.5th and 99.5th percentiles,
    so a 12-bit film in 16 bits is not black)."""
    height, width = frame.shape[:2]
    heat_map = map_on_frame(cam, frame.shape, prep)
    grey = frame if frame.ndim == 2 else cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)
    low, high = (
        float(v)
        for v in np.percentile(grey[:: max(1, height // 512), :: max(1, width // 512)], (0.5, 99.5))
    )
    scaled = np.clip((grey.astype(np.float32) - low) * (255.0 / max(high - low, 1e-6)), 0, 255)
    base = cv2.cvtColor(scaled.astype(np.uint8), cv2.COLOR_GRAY2BGR)
    heat = cv2.applyColorMap((np.clip(heat_map, 0, 1) * 255).astype(np.uint8), cv2.COLORMAP_JET)
    picture = cv2.addWeighted(base, 0.6, heat, 0.4, 0)
    scale = max(0.4, height / 1024)
    cv2.putText(picture, caption, (8, int(24 * scale)), cv2.FONT_HERSHEY_SIMPLEX, 0.6 * scale,
                (255, 255, 255), max(1, round(scale)), cv2.LINE_AA)  # fmt: skip
    return picture


def branch_cams(
    model: torch.nn.Module, packed: torch.Tensor, target: int, arches: dict[str, str]
) -> dict[str, np.ndarray]:
    """Each branch's heat maps for the fused logit `target` of one packed fusion instance, a
    (1, D) row of train/models/fusion.py (`arches`: each branch's registered architecture, the
    card's `branch_arch`): the one backward pass of the fused decision, read at each branch's
    own Grad-CAM layer. A one-input branch gives (1, H, W) on its input's grid, the multi-view
    mammogram branch (V, H, W), a map per view slot; an absent input's map is zeros."""
    from edgebc.train.models.fusion import ViewPooledBranch
    from edgebc.train.models.registry import model_spec

    maps = {}
    for name, shape in model.layout:
        branch = model.branches[name]
        backbone = branch.pooled.backbone if isinstance(branch, ViewPooledBranch) else branch
        layer = backbone.get_submodule(model_spec(arches[name]).cam_layer)
        maps[name] = layer_cams(model, layer, packed, target, shape)
    return maps
