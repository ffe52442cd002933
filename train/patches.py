"""Patch mode for mammograms: training patches around located findings and on normal tissue, and
the whole-film score of a patch model by the runtime's own sliding grid and aggregation.

Finding patches are centred on a finding's centre, jittered by at most `jitter` of the room the
finding leaves inside the patch (so the whole finding stays inside when it fits), and take the
finding's class (severity M: malignant, B: benign). Normal patches lie at random on the breast
(at least `min_breast` of their area) and clear of every finding (by its radius and as much
again), on normal films and on abnormal films whose findings are all located, and take the class
of "normal" under the task (a task without normals, benign vs malignant, draws none). A film
with a finding that has no centre (mini-MIAS lists some spread calcifications without one) gives
no patches at all: its finding could lie under any of them. Patches are drawn once, from a seed
that depends on the film, so a run is repeatable and a film gives the same patches in any split.

Usage (whole-film AUC of a patch model with a bootstrap CI over women; with --baseline, a
whole-image model's AUC on the same films and the paired difference):
    python -m edgebc.train.patches runs/mias-patches/best.pt --manifest runs/mias-split.csv \
        --split test --baseline runs/mias-mobilenet_v3_small/best.pt
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from edgebc import metrics
from edgebc.data.records import MAMMOGRAPHY_MODALITIES, Finding, Sample
from edgebc.data.sample_image import read_sample, sample_input
from edgebc.optional import require
from edgebc.patches import (
    AGGREGATIONS,
    BreastFrame,
    PatchCard,
    breast_frame,
    film_probabilities,
    patch_tensor,
)
from edgebc.preprocess import PreprocessCard
from edgebc.task import Task

torch = require("torch", "training")
log = logging.getLogger(__name__)

#: Attempts per wanted normal patch before a film is taken to have no room for more.
NORMAL_ATTEMPTS = 50


@dataclass(frozen=True)
class PatchSampling:
    """How many training patches a film gives, and how far a finding patch may move."""

    per_finding: int = 8
    normal_per_film: int = 4
    jitter: float = 0.5  # of the room the finding leaves inside the patch, each way


def severity_label(finding: Finding) -> str:
    """The class name of a finding: malignant for severity M, benign for B."""
    if finding.severity not in ("B", "M"):
        raise ValueError(f"finding {finding}: severity must be B or M")
    return "malignant" if finding.severity == "M" else "benign"


def finding_corners(
    frame: BreastFrame, finding: Finding, card: PatchCard, count: int, jitter: float,
    rng: np.random.Generator,
) -> list[tuple[int, int]]:  # fmt: skip
    """Top-left corners of `count` patches around a located finding (film coordinates)."""
    if finding.x is None or finding.y is None:
        raise ValueError(f"finding {finding} has no centre")
    cx, cy = frame.from_film(finding.x, finding.y)
    room = max(0.0, card.side / 2 - (finding.radius or 0.0)) * jitter
    corners = []
    for _ in range(count):
        dx, dy = rng.uniform(-room, room, size=2)
        corners.append((round(cx + dx - card.side / 2), round(cy + dy - card.side / 2)))
    return corners


def clear_of_findings(
    frame: BreastFrame, x: int, y: int, side: int, findings: Sequence[Finding]
) -> bool:
    """True when the patch at (x, y) keeps at least a finding's radius from each finding's circle."""
    for finding in findings:
        if finding.x is None or finding.y is None:
            return False
        cx, cy = frame.from_film(finding.x, finding.y)
        nearest_x = min(max(cx, x), x + side - 1)
        nearest_y = min(max(cy, y), y + side - 1)
        if math.hypot(cx - nearest_x, cy - nearest_y) <= 2.0 * (finding.radius or 0.0):
            return False
    return True


def normal_corners(
    frame: BreastFrame, findings: Sequence[Finding], card: PatchCard, count: int,
    rng: np.random.Generator,
) -> list[tuple[int, int]]:  # fmt: skip
    """Top-left corners of up to `count` patches on the breast and clear of every finding."""
    corners: list[tuple[int, int]] = []
    for _ in range(NORMAL_ATTEMPTS * count):
        if len(corners) == count:
            break
        x = int(rng.integers(0, max(1, frame.width - card.side + 1)))
        y = int(rng.integers(0, max(1, frame.height - card.side + 1)))
        if frame.breast_share(x, y, card.side) >= card.min_breast and clear_of_findings(
            frame, x, y, card.side, findings
        ):
            corners.append((x, y))
    return corners


def film_patches(
    sample: Sample, image: np.ndarray, prep: PreprocessCard, card: PatchCard, task: Task,
    sampling: PatchSampling, seed: int,
) -> tuple[list[np.ndarray], list[int]]:  # fmt: skip
    """One film's training patches as (C, H, W) tensors and their class indices under `task`."""
    if any(f.x is None or f.y is None for f in sample.findings):
        return [], []
    digest = hashlib.sha256(f"{seed}:{sample.path}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
    frame = breast_frame(image, prep)
    tensors, targets = [], []
    for finding in sample.findings:
        label = severity_label(finding)
        if not task.takes(label):
            continue
        for x, y in finding_corners(
            frame, finding, card, sampling.per_finding, sampling.jitter, rng
        ):
            tensors.append(patch_tensor(frame, x, y, card, prep))
            targets.append(_class_index(task, label))
    if task.takes("normal"):
        for x, y in normal_corners(frame, sample.findings, card, sampling.normal_per_film, rng):
            tensors.append(patch_tensor(frame, x, y, card, prep))
            targets.append(_class_index(task, "normal"))
    return tensors, targets


def cache_patches(
    samples: Sequence[Sample], prep: PreprocessCard, card: PatchCard, task: Task,
    sampling: PatchSampling, seed: int, desc: str = "patches",
) -> tuple[torch.Tensor, torch.Tensor, list[Sample]]:  # fmt: skip
    """Every film's training patches as one (N, C, H, W) tensor, their (N,) targets and the film
    each came from (for its patient and site)."""
    tensors: list[np.ndarray] = []
    targets: list[int] = []
    rows: list[Sample] = []
    for sample in tqdm(samples, desc=desc, unit="film", disable=None, leave=False):
        got, classes = film_patches(
            sample, read_sample(sample)[0], prep, card, task, sampling, seed
        )
        tensors += got
        targets += classes
        rows += [sample] * len(got)
    if not tensors:
        raise ValueError(f"{desc}: no film gave a patch (no located findings, no breast tissue)")
    skipped = sum(1 for s in samples if any(f.x is None for f in s.findings))
    log.info("%s: %d patches from %d films (%d films skipped: a finding without a centre)",
             desc, len(tensors), len(samples) - skipped, skipped)  # fmt: skip
    return torch.from_numpy(np.stack(tensors)), torch.tensor(targets, dtype=torch.long), rows


def torch_probabilities(model: torch.nn.Module, temperature: float = 1.0, batch_size: int = 64):  # type: ignore[no-untyped-def]
    """A run_batch for edgebc.patches.film_probabilities from a torch model (softmax of logits / temperature)."""

    def run(batch: np.ndarray) -> np.ndarray:
        model.eval()
        outputs = []
        with torch.inference_mode():
            for start in range(0, len(batch), batch_size):
                logits = model(torch.from_numpy(batch[start : start + batch_size])).float()
                outputs.append(torch.softmax(logits / temperature, dim=1).numpy())
        return np.concatenate(outputs)

    return run


def evaluate_films(
    checkpoint_path: str, manifest: str, split: str, resamples: int = 2000,
    aggregation: dict[str, Any] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Whole-film scores of a patch model on one split: AUC of the positive class with a
    bootstrap CI over women (patients), and the per-film probabilities. `aggregation` replaces
    the card's aggregate / top_k / stride to compare choices (choose them on validation)."""
    from edgebc.data import read_dataset
    from edgebc.train.checkpoint import load_checkpoint, model_from_checkpoint

    checkpoint = load_checkpoint(checkpoint_path)
    card = checkpoint.card
    patches = card.input.patches
    if patches is None:
        raise ValueError(f"{checkpoint_path}: not a patch model (its input has no patches card)")
    patches = replace(patches, **(aggregation or {}))
    task = card.task
    samples = [s for s in read_dataset(manifest) if s.split == split and task.takes(s.label)
               and s.modality in MAMMOGRAPHY_MODALITIES]  # fmt: skip
    if not samples:
        raise ValueError(f"{manifest}: no mammogram of split {split!r} that task {task.name} takes")
    model = model_from_checkpoint(checkpoint)
    run = torch_probabilities(model, card.temperature)
    probabilities = np.stack([
        film_probabilities(read_sample(s)[0], card.preprocess, patches, task.positive, run)
        for s in tqdm(samples, desc=f"films ({split})", unit="film", disable=None)
    ])  # fmt: skip
    positives = np.array([_class_index(task, s.label) == task.positive for s in samples], dtype=int)
    scores = probabilities[:, task.positive]
    auc = metrics.roc_auc(positives, scores)
    interval = metrics.cluster_bootstrap_ci(
        metrics.roc_auc, [s.unit for s in samples], positives, scores, n_boot=resamples
    )
    return {
        "split": split, "films": len(samples), "positive_films": int(positives.sum()),
        "women": len({s.unit for s in samples}), "auc": auc, "auc_ci": interval,
        "positive_class": task.positive_class, "patches": patches.to_dict(),
        "per_film": [{"path": str(s.path), "unit": s.unit, "view": s.view or "", "positive": int(y),
                      "score": float(p)} for s, y, p in zip(samples, positives, scores, strict=True)],
    }  # fmt: skip


def compare_with(result: dict[str, Any], baseline: str, resamples: int = 2000) -> dict[str, Any]:
    """The same films scored by a whole-image model (its checkpoint, or `edgebc eval`'s
    predictions.csv): its AUC and the patch model's minus it, each with a bootstrap CI over women
    (paired: a resample draws a woman's films for both models)."""
    films = result["per_film"]
    scores = (
        _csv_scores(baseline, f"p_{result['positive_class']}")
        if baseline.endswith(".csv")
        else _checkpoint_scores(baseline, films)
    )
    missing = [f["path"] for f in films if f["path"] not in scores]
    if missing:
        raise ValueError(
            f"{baseline}: scores no film {missing[0]} (and {len(missing) - 1} more) of this split"
        )
    y = np.array([f["positive"] for f in films])
    patch = np.array([f["score"] for f in films])
    whole = np.array([scores[f["path"]] for f in films])
    units = [f["unit"] for f in films]

    def difference(yy: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
        return metrics.roc_auc(yy, a) - metrics.roc_auc(yy, b)

    return {
        "baseline_auc": metrics.roc_auc(y, whole),
        "baseline_auc_ci": metrics.cluster_bootstrap_ci(
            metrics.roc_auc, units, y, whole, n_boot=resamples
        ),
        "auc_difference": difference(y, patch, whole),
        "auc_difference_ci": metrics.cluster_bootstrap_ci(
            difference, units, y, patch, whole, n_boot=resamples
        ),
    }


def _csv_scores(path: str, column: str) -> dict[str, float]:
    """Each film's positive probability from a predictions.csv (rounded to 6 decimals there: a
    model whose outputs differ only below that ties; prefer its checkpoint)."""
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    if rows and column not in rows[0]:
        raise ValueError(f"{path}: no column {column} (columns: {', '.join(rows[0])})")
    return {row["path"]: float(row[column]) for row in rows}


def _checkpoint_scores(path: str, films: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Each film's positive probability from a whole-image checkpoint, at full precision."""
    from edgebc.train.checkpoint import load_checkpoint, model_from_checkpoint

    checkpoint = load_checkpoint(path)
    card = checkpoint.card
    if card.input.patches is not None:
        raise ValueError(f"{path}: a patch model, not a whole-image baseline")
    model = model_from_checkpoint(checkpoint)
    with torch.inference_mode():
        return {
            film["path"]: float(
                torch.softmax(
                    model(torch.from_numpy(sample_input(_film_sample(film), card.preprocess))[None])
                    / card.temperature,
                    dim=1,
                )[0, card.positive]
            )
            for film in films
        }


def _class_index(task: Task, label: str) -> int:
    name = task.class_of(label)
    if name is None:
        raise ValueError(f"task {task.name} does not take label {label!r}")
    return task.classes.index(name)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--manifest", required=True)
    parser.add_argument("--split", default="test")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--aggregate", choices=AGGREGATIONS, help="instead of the card's")
    parser.add_argument("--top-k", type=int, help="instead of the card's")
    parser.add_argument("--stride", type=int, help="instead of the card's (native pixels)")
    parser.add_argument(
        "--baseline",
        help="a whole-image model (best.pt, or its predictions.csv from edgebc eval) on the same "
        "films: its AUC and the paired difference, CIs over women",
    )
    parser.add_argument("--out", help="write the result as JSON here too")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    chosen = {"aggregate": args.aggregate, "top_k": args.top_k, "stride": args.stride}
    aggregation = {k: v for k, v in chosen.items() if v is not None}
    result = evaluate_films(args.checkpoint, args.manifest, args.split, aggregation=aggregation)
    if args.baseline:
        result.update(compare_with(result, args.baseline))
    text = json.dumps(result, indent=2)
    if args.out:
        from edgebc.atomic import atomic_write_text

        atomic_write_text(args.out, text + "\n")
    summary = {k: v for k, v in result.items() if k != "per_film"}
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


def _film_sample(film: dict[str, Any]) -> Sample:
    """A scored film as the sample the whole-image model reads (full depth, its stated view)."""
    return Sample(Path(film["path"]), "", modality="mammo", view=film.get("view") or None)
