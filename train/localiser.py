"""Train and evaluate the single-lesion localiser that crops a B-mode frame before classification.

The network is a registered edge backbone's feature extractor (MobileNetV3-Small by default,
from scratch or started from a local checkpoint through model.pretrained's loader: nothing is
downloaded) with two small heads, all plain torch:
- presence: global-average-pooled features -> one logit, "a lesion is in this frame"; BUSI's
  normal frames are the negatives;
- box: on the stride-32 feature grid (7 x 7 at 224 px) a 3x3 conv -> 5 maps: which cell holds the
  lesion's centre (a softmax over cells, trained with cross-entropy on lesion frames only), the
  centre's offset inside that cell and the box's width and height as fractions of the input
  (sigmoids). The graph decodes the best cell's box itself, so the exported model answers
  (logits: no_lesion/lesion, box: x0 y0 x1 y1 as input fractions).
One box per frame, by design: the cart crops one region and classifies it. A frame with several
lesion masks (BUSI's `_mask_1`...) is trained on the union box of its masks, the region the crop
must cover. Boxes come from BUSI's masks and BUS-BRA's `bbox` column and go through the same
letterbox as the frame (edgebc.localiser.box_to_input).

    python -m edgebc.train.localiser --manifest runs/sites-cal.csv --out runs/localiser \
        --minutes 28 --threads 1 [--pretrained runs/cross-site-cal/busi-only/best.pt]
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgebc.atomic import atomic_write_text
from edgebc.data.manifest import read_manifest
from edgebc.data.records import Sample, load_mask
from edgebc.data.sample_image import read_sample
from edgebc.errors import EdgebcError
from edgebc.localiser import (
    box_to_input,
    detection_metrics,
    mask_box,
    threshold_for_recall,
)
from edgebc.model_card import ModelCard, ModelOutput, OperatingPoint, single_input
from edgebc.optional import require
from edgebc.preprocess import PreprocessCard, preprocess_chw
from edgebc.task import Task

torch = require("torch", "training")
nn, F = torch.nn, torch.nn.functional
log = logging.getLogger(__name__)

LOCALISER_TASK = Task("lesion_localiser", ("no_lesion", "lesion"), "lesion")
LOCALISER_ARCH = "lesion_localiser"
TARGET_RECALL = 0.95


class LocaliserNet(nn.Module):
    """A backbone's `features` plus a presence head and a one-box grid head (see module doc)."""

    def __init__(
        self,
        backbone: str = "mobilenet_v3_small",
        in_channels: int = 1,
        width_mult: float = 1.0,
        hidden: int = 128,
        pretrained: str | None = None,
    ) -> None:
        super().__init__()
        from edgebc.train.models import create_model

        model = create_model(backbone, 2, in_channels, width_mult)
        self.pretrained: dict[str, object] | None = None
        if pretrained:
            from edgebc.train.models.pretrained import load_torchvision_weights

            self.pretrained = load_torchvision_weights(model, backbone, pretrained)
        if not hasattr(model, "features"):
            raise EdgebcError(f"backbone {backbone} has no `features` stage to localise on")
        self.features = model.features
        with torch.no_grad():
            channels = self.features(torch.zeros(1, in_channels, 64, 64)).shape[1]
        self.grid = nn.Sequential(
            nn.Conv2d(channels, hidden, 3, padding=1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, 5, 1),
        )
        self.presence = nn.Linear(channels, 1)

    def set_bn_momentum(self, momentum: float) -> None:
        """BatchNorm's running-statistics momentum (MobileNetV3's own is 0.01: slow to follow a
        short run; the classifier's training sets 0.1 the same way)."""
        for module in self.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.momentum = momentum

    def raw(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(presence logit (N,), grid maps (N, 5, H, W)) for training."""
        features = self.features(images)
        return self.presence(features.mean(dim=(2, 3))).squeeze(1), self.grid(features)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (N, 2): no_lesion fixed at 0 and lesion, box (N, 4) x0 y0 x1 y1 in [0, 1])."""
        presence, grid = self.raw(images)
        logits = torch.stack([torch.zeros_like(presence), presence], dim=1)
        cell = grid[:, 0].flatten(1).argmax(dim=1)
        return logits, decode_at(grid, cell)


def decode_at(grid: torch.Tensor, cell: torch.Tensor) -> torch.Tensor:
    """The box (N, 4) the grid predicts at flat cell index `cell` (N,)."""
    n, _, height, width = grid.shape
    regression = grid[:, 1:].flatten(2)
    picked = regression.gather(2, cell.view(n, 1, 1).expand(n, 4, 1)).squeeze(2)
    row = torch.div(cell, width, rounding_mode="floor").to(grid.dtype)
    col = (cell - torch.div(cell, width, rounding_mode="floor") * width).to(grid.dtype)
    offsets, sizes = torch.sigmoid(picked[:, :2]), torch.sigmoid(picked[:, 2:])
    cx, cy = (col + offsets[:, 0]) / width, (row + offsets[:, 1]) / height
    half_w, half_h = sizes[:, 0] / 2, sizes[:, 1] / 2
    return torch.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], 1).clamp(0.0, 1.0)


def localiser_loss(
    presence: torch.Tensor, grid: torch.Tensor, boxes: torch.Tensor, present: torch.Tensor
) -> torch.Tensor:
    """Presence BCE on every frame; on lesion frames, cross-entropy for the centre's cell plus
    L1 and GIoU of the box decoded at the true cell."""
    loss = F.binary_cross_entropy_with_logits(presence, present.float())
    if not bool(present.any()):
        return loss
    grid, boxes = grid[present], boxes[present]
    _, _, height, width = grid.shape
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    col = (cx * width).long().clamp(0, width - 1)
    row = (cy * height).long().clamp(0, height - 1)
    cell = row * width + col
    loss = loss + F.cross_entropy(grid[:, 0].flatten(1), cell)
    predicted = decode_at(grid, cell)
    return loss + 5.0 * F.l1_loss(predicted, boxes) + (1.0 - giou(predicted, boxes)).mean()


def giou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Generalised IoU of (N, 4) box pairs (x0, y0, x1, y1)."""
    area = lambda z: (z[:, 2] - z[:, 0]).clamp(min=0) * (z[:, 3] - z[:, 1]).clamp(min=0)  # noqa: E731
    inter = (torch.min(a[:, 2], b[:, 2]) - torch.max(a[:, 0], b[:, 0])).clamp(min=0) * (
        torch.min(a[:, 3], b[:, 3]) - torch.max(a[:, 1], b[:, 1])
    ).clamp(min=0)
    union = area(a) + area(b) - inter + 1e-7
    hull = (torch.max(a[:, 2], b[:, 2]) - torch.min(a[:, 0], b[:, 0])) * (
        torch.max(a[:, 3], b[:, 3]) - torch.min(a[:, 1], b[:, 1])
    ) + 1e-7
    return inter / union - (hull - union) / hull


# -- data ----------------------------------------------------------------------------------------


@dataclass
class BoxSet:
    """Preprocessed frames with their lesion boxes (input fractions) and where they came from."""

    images: torch.Tensor  # (N, C, H, W) float16, preprocessed
    boxes: torch.Tensor  # (N, 4) float32; zeros on lesion-free frames
    present: torch.Tensor  # (N,) bool
    sources: list[str]
    samples: list[Sample]

    def where(self, keep: np.ndarray) -> BoxSet:
        index = torch.from_numpy(np.nonzero(keep)[0])
        return BoxSet(self.images[index], self.boxes[index], self.present[index],
                      [self.sources[i] for i in index.tolist()], [self.samples[i] for i in index.tolist()])  # fmt: skip


def lesion_box_of(sample: Sample, frame_shape: tuple[int, int]) -> tuple[int, ...] | bool | None:
    """The frame's lesion box (x, y, w, h): BUS-BRA's bbox, else the union of BUSI's masks; None
    for a lesion-free frame (BUSI normal); False when a lesion frame has no box (left out)."""
    given = sample.lesion_box
    if given is not None:
        return given
    mask = load_mask(sample)
    if mask is not None:
        if mask.shape != frame_shape:
            raise EdgebcError(f"{sample.path}: mask is {mask.shape}, frame {frame_shape}")
        box = mask_box(mask)
        if box is not None:
            return box
    return None if sample.label == "normal" else False


def load_boxes(samples: Sequence[Sample], prep: PreprocessCard) -> BoxSet:
    """Every sample with a known box or known to be lesion-free, preprocessed as the cart does."""
    kept, images, boxes, present = [], [], [], []
    skipped = 0
    for sample in samples:
        frame, view = read_sample(sample)
        box = lesion_box_of(sample, frame.shape[:2])
        if box is False:
            skipped += 1
            continue
        images.append(torch.from_numpy(preprocess_chw(frame, prep, view=view)).half())
        if box is None:
            boxes.append(np.zeros(4, np.float32))
            present.append(False)
        else:
            boxes.append(box_to_input(box, frame.shape[:2], prep))  # type: ignore[arg-type]
            present.append(True)
        kept.append(sample)
    if skipped:
        log.warning("%d lesion frames without a mask or bbox left out", skipped)
    if not kept:
        raise EdgebcError("no frames with a lesion box or known to be lesion-free")
    return BoxSet(torch.stack(images), torch.from_numpy(np.stack(boxes)),
                  torch.tensor(present), [s.source or "unknown" for s in kept], kept)  # fmt: skip


def augment(
    images: torch.Tensor, boxes: torch.Tensor, prep: PreprocessCard, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Horizontal flip, zoom 0.85-1.2 and shift up to 10 % (boxes moved alike), gain and contrast."""
    n = len(images)
    flip = torch.rand(n, generator=generator) < 0.5
    images = torch.where(flip.view(n, 1, 1, 1), images.flip(3), images)
    boxes = boxes.clone()
    flipped = torch.stack([1 - boxes[:, 2], boxes[:, 1], 1 - boxes[:, 0], boxes[:, 3]], 1)
    boxes = torch.where(flip.view(n, 1), flipped, boxes)
    zoom = 0.85 + 0.35 * torch.rand(n, generator=generator)
    shift = (torch.rand(n, 2, generator=generator) - 0.5) * 0.2
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1] = 1 / zoom, 1 / zoom
    theta[:, :, 2] = shift
    fill = torch.tensor(
        [(prep.pad_value - m) / s for m, s in zip(prep.mean, prep.std, strict=True)]
    )
    fill = fill.view(1, -1, 1, 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    images = F.grid_sample(images - fill, grid, align_corners=False) + fill
    signed = boxes * 2 - 1
    xs = (signed[:, [0, 2]] - shift[:, :1]) * zoom[:, None]
    ys = (signed[:, [1, 3]] - shift[:, 1:]) * zoom[:, None]
    boxes = torch.stack([xs[:, 0], ys[:, 0], xs[:, 1], ys[:, 1]], 1).add(1).div(2).clamp(0, 1)
    gain = 1 + (torch.rand(n, 1, 1, 1, generator=generator) - 0.5) * 0.3
    offset = (torch.rand(n, 1, 1, 1, generator=generator) - 0.5) * 0.3
    return images * gain + offset, boxes


@torch.no_grad()
def predict(
    model: nn.Module, images: torch.Tensor, batch: int = 64
) -> tuple[np.ndarray, np.ndarray]:
    """(lesion scores (N,), boxes (N, 4) input fractions) of the model in eval mode."""
    model.eval()
    scores, boxes = [], []
    for start in range(0, len(images), batch):
        logits, box = model(images[start : start + batch].float())
        scores.append(torch.softmax(logits, 1)[:, 1].numpy())
        boxes.append(box.numpy())
    return np.concatenate(scores), np.concatenate(boxes)


def evaluate(
    model: nn.Module, data: BoxSet, threshold: float
) -> dict[str, dict[str, float | int | None]]:
    """Detection metrics overall and per site (source)."""
    scores, boxes = predict(model, data.images)
    truth, present = data.boxes.numpy(), data.present.numpy()
    out = {"all": detection_metrics(scores, boxes, truth, present, threshold)}
    for site in sorted(set(data.sources)):
        keep = np.array([s == site for s in data.sources])
        out[site] = detection_metrics(
            scores[keep], boxes[keep], truth[keep], present[keep], threshold
        )
    return out


# -- the run -------------------------------------------------------------------------------------


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Train on the manifest's train split, pick the epoch and threshold on val, score test."""
    from edgebc.train.checkpoint import (
        Checkpoint,
        data_fingerprint,
        lineage_of,
        save_checkpoint,
        sha256_of_state,
    )

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    prep = PreprocessCard(input_height=args.size, input_width=args.size)
    samples = [s for s in read_manifest(args.manifest) if s.modality == "us"]
    if args.sources:
        samples = [s for s in samples if s.source in args.sources]
    if args.limit:
        rng = np.random.default_rng(args.seed)
        samples = [samples[i] for i in sorted(rng.permutation(len(samples))[: args.limit])]
    splits = {}
    for split in ("train", "val", "test"):
        chosen = [s for s in samples if s.split == split]
        if not chosen:
            raise EdgebcError(f"{args.manifest}: no {split} frames")
        started = time.perf_counter()
        splits[split] = load_boxes(chosen, prep)
        log.info("%s: %d frames (%d with a lesion) in %.0f s", split, len(splits[split].samples),
                 int(splits[split].present.sum()), time.perf_counter() - started)  # fmt: skip
    model = LocaliserNet(args.backbone, prep.channels, pretrained=args.pretrained)
    if args.bn_momentum is not None:
        model.set_bn_momentum(args.bn_momentum)
    optimiser = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(args.seed)
    data = splits["train"]
    steps_per_epoch = math.ceil(len(data.samples) / args.batch)
    budget = args.minutes * 60
    history_path = out / "history.csv"
    columns = ["epoch", "seconds", "train_loss", "val_ap50", "val_mean_iou", "val_recall", "lr"]
    with history_path.open("w", newline="") as handle:
        csv.writer(handle).writerow(columns)
    best: tuple[float, dict[str, torch.Tensor], int] | None = None
    began = time.perf_counter()
    epoch = 0
    for epoch in range(1, args.epochs + 1):
        model.train()
        order = torch.randperm(len(data.samples), generator=generator)
        losses = []
        for start in range(0, len(order), args.batch):
            index = order[start : start + args.batch]
            if len(index) < 2:
                continue
            images, boxes = augment(data.images[index].float(), data.boxes[index], prep, generator)
            presence, grid = model.raw(images)
            loss = localiser_loss(presence, grid, boxes, data.present[index])
            step = (epoch - 1) * steps_per_epoch + start // args.batch
            lr = learning_rate(args.lr, step / (args.epochs * steps_per_epoch),
                               (time.perf_counter() - began) / budget)  # fmt: skip
            for group in optimiser.param_groups:
                group["lr"] = lr
            optimiser.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            optimiser.step()
            losses.append(float(loss.detach()))
        val = evaluate(model, splits["val"], 0.5)["all"]
        score = float(val["ap50"]) + float(val["mean_iou"] or 0.0)
        if best is None or score > best[0]:
            best = (score, {k: v.clone() for k, v in model.state_dict().items()}, epoch)
        elapsed = time.perf_counter() - began
        row = [epoch, round(elapsed), round(float(np.mean(losses)), 4), round(float(val["ap50"]), 4),
               round(float(val["mean_iou"] or 0), 4), round(float(val["recall"] or 0), 4),
               f"{lr:.2e}"]  # fmt: skip
        with history_path.open("a", newline="") as handle:
            csv.writer(handle).writerow(row)
        log.info("epoch %d: %s", epoch, dict(zip(columns, row, strict=True)))
        if elapsed / epoch * (epoch + 1) > args.minutes * 60:
            log.info(
                "stopping after epoch %d: the %.0f-minute budget would be passed",
                epoch,
                args.minutes,
            )
            break
    assert best is not None
    model.load_state_dict(best[1])
    val_scores, _ = predict(model, splits["val"].images)
    threshold = threshold_for_recall(val_scores, splits["val"].present.numpy(), args.target_recall)
    val_metrics = evaluate(model, splits["val"], threshold)
    test_metrics = evaluate(model, splits["test"], threshold)
    state = model.state_dict()
    card = ModelCard(
        name=out.name, arch=LOCALISER_ARCH, task=LOCALISER_TASK, inputs=single_input(prep),
        outputs=(ModelOutput("logits", "logits", 2), ModelOutput("box", "box", 4)),
        arch_options={"backbone": args.backbone, "hidden": 128, "width_mult": 1.0},
        operating_point=OperatingPoint(
            threshold, args.target_recall, val_metrics["all"]["recall"],
            val_metrics["all"]["specificity"], val_metrics["all"]["lesion_frames"],
            val_metrics["all"]["lesion_free_frames"],
        ),
        metrics={"val": val_metrics, "test": test_metrics, "best_epoch": best[2]},
        weights_sha256=sha256_of_state(state),
        data_fingerprint=data_fingerprint([s for d in splits.values() for s in d.samples]),
        lineage=lineage_of(model.pretrained, None),
    )  # fmt: skip
    config = {k: v for k, v in vars(args).items()}
    training = {"config": config, "epoch": best[2], "epochs_run": epoch,
                "seconds": round(time.perf_counter() - began), "command": " ".join(sys.argv)}  # fmt: skip
    save_checkpoint(out / "best.pt", Checkpoint(card, state, training))
    report = {"threshold": threshold, "best_epoch": best[2], "epochs_run": epoch,
              "train_seconds": training["seconds"], "val": val_metrics, "test": test_metrics,
              "config": config}  # fmt: skip
    atomic_write_text(out / "metrics.json", json.dumps(report, indent=2, default=str))
    return report


def learning_rate(peak: float, by_steps: float, by_time: float) -> float:
    """Warm-up over the first 5 %, then cosine to zero, of whichever runs out first: the epochs
    or the wall-time budget (so a run stopped by its budget has still annealed)."""
    progress = min(1.0, max(by_steps, by_time))
    if progress < 0.05:
        return peak * (0.1 + 0.9 * progress / 0.05)
    return peak * 0.5 * (1 + math.cos(math.pi * (progress - 0.05) / 0.95))


def localiser_from_checkpoint(path: str | Path) -> tuple[LocaliserNet, ModelCard]:
    """The trained localiser a checkpoint holds (eval mode) and its card."""
    from edgebc.train.checkpoint import load_checkpoint

    checkpoint = load_checkpoint(path)
    card = checkpoint.card
    if not card.is_localiser:
        raise EdgebcError(f"{path}: not a lesion localiser's checkpoint ({card.arch})")
    model = LocaliserNet(str(card.arch_options.get("backbone", "mobilenet_v3_small")),
                         card.preprocess.channels, hidden=int(card.arch_options.get("hidden", 128)))  # fmt: skip
    model.load_state_dict(checkpoint.state_dict)
    return model.eval(), card


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m edgebc.train.localiser", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--manifest", required=True, help="split manifest (split: train/val/test)")
    parser.add_argument(
        "--out", required=True, help="run folder (best.pt, history.csv, metrics.json)"
    )
    parser.add_argument(
        "--sources", nargs="*", default=None, help="only these sites (source column)"
    )
    parser.add_argument("--backbone", default="mobilenet_v3_small")
    parser.add_argument(
        "--pretrained", default=None, help="a local checkpoint to start the backbone"
    )
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument(
        "--epochs", type=int, default=60, help="upper bound; --minutes may stop sooner"
    )
    parser.add_argument(
        "--minutes", type=float, default=28.0, help="wall-time budget of the training loop"
    )
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--target-recall", type=float, default=TARGET_RECALL,
                        help="lesion-frame recall the operating threshold keeps on val")  # fmt: skip
    parser.add_argument(
        "--limit", type=int, default=0, help="use only this many frames (smoke runs)"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    try:
        report = train(parse_args(argv))
    except EdgebcError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"threshold": report["threshold"], "test": report["test"]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
