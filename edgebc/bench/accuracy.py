"""Accuracy alongside speed: the same labelled frames through every available backend.

A faster backend (INT8, FP16, another runtime) is only a choice if it decides as the reference
does, so this runs one labelled set through each backend `edgebc bench` would time and reports,
per backend: malignant-vs-rest AUC with a bootstrap 95% interval, accuracy and sensitivity of the
decisions at the model's operating threshold, and agreement with the reference backend (PyTorch
eager on the checkpoint when one is given, else ONNX Runtime FP32 on one thread): the share of
identical decisions and the largest change in the malignant probability.

    python benchmarks/accuracy.py                        # the demo model on synthetic phantoms
    python benchmarks/accuracy.py --model m.onnx --int8 m-int8.onnx --checkpoint m.pt \\
        --data ../shared/data/busi/manifest.csv --split test
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgebc import __version__, sysinfo
from edgebc.atomic import atomic_write_text
from edgebc.bench.backends import candidates, why_unavailable
from edgebc.decision import DecisionRule
from edgebc.errors import EdgebcError
from edgebc.metrics import bootstrap_ci, roc_auc, softmax
from edgebc.model_card import ModelCard, read_card
from edgebc.preprocess import preprocess_chw

BATCH = 8


@dataclass(frozen=True)
class LabelledSet:
    description: str
    frames: list[np.ndarray]
    labels: list[str]


def phantom_set(per_class: int, seed: int = 77) -> LabelledSet:
    """Synthetic phantoms of every class, from seeds the demo model was not trained on."""
    from edgebc.synth.ultrasound import phantom_stills

    frames, labels = phantom_stills(3 * per_class, seed)
    return LabelledSet(f"{len(frames)} synthetic phantoms (seed {seed})", frames, labels)


def dataset_set(path: Path, split: str | None, limit: int | None, seed: int = 0) -> LabelledSet:
    """Frames of a manifest or dataset folder (one split of it, `limit` drawn at random)."""
    from edgebc.data.readers import read_dataset
    from edgebc.decode import read_image

    samples = read_dataset(path)
    if split is not None:
        samples = [s for s in samples if s.split == split]
        if not samples:
            raise EdgebcError(f"{path}: no samples in split {split!r} (is it a split manifest?)")
    if limit is not None and limit < len(samples):
        chosen = np.random.default_rng(seed).choice(len(samples), limit, replace=False)
        samples = [samples[i] for i in sorted(chosen)]
    frames = [read_image(s.path) for s in samples]
    where = f"{path}" + (f" split {split}" if split else "")
    return LabelledSet(f"{len(frames)} frames of {where}", frames, [s.label for s in samples])


def evaluate(
    models: dict[str, Path | None], labelled: LabelledSet, work: Path, n_boot: int = 1000
) -> dict[str, Any]:
    """Every available backend on the same preprocessed frames; metrics and agreement per backend."""
    fp32 = models["fp32"]
    assert fp32 is not None
    card = read_card(fp32)
    unknown = sorted(set(labelled.labels) - set(card.class_names))
    if unknown:
        raise EdgebcError(f"labels {unknown} are not classes of this model ({card.class_names})")
    tensors = np.stack([preprocess_chw(f, card.preprocess) for f in labelled.frames])
    y = np.array([card.class_names.index(label) for label in labelled.labels])
    backends: dict[str, Any] = {}
    reference: dict[str, Any] | None = None
    for candidate in candidates(
        fp32, models.get("int8"), models.get("checkpoint"), [1], work, BATCH
    ):
        try:
            loaded = candidate.make()
            logits = np.concatenate(
                [loaded.run(tensors[i : i + BATCH]) for i in range(0, len(tensors), BATCH)]
            )
        except Exception as exc:  # reported in the table, like the latency benchmark does
            backends[candidate.name] = {"unavailable": why_unavailable(exc)}
            continue
        result = _scores(logits, y, card, n_boot)
        if reference is None:
            reference = {"name": candidate.name, **result}
        result["agreement"] = float(
            np.mean(np.array(result.pop("decisions")) == reference["decisions"])
        )
        result["max_positive_prob_change"] = float(
            np.max(np.abs(np.array(result.pop("positive_probs")) - reference["positive_probs"]))
        )
        backends[candidate.name] = result
        if loaded.close is not None:
            loaded.close()
    if reference is None:
        raise EdgebcError("no backend could run this model (see the reasons above)")
    return {
        "edgebc": __version__,
        "date": time.strftime("%Y-%m-%d"),
        "machine": {"cpu": sysinfo.cpu_description(), "gpus": sysinfo.nvidia_gpus()},
        "model": card.name,
        "threshold": card.threshold,
        "data": labelled.description,
        "class_counts": {n: int(np.sum(y == k)) for k, n in enumerate(card.class_names)},
        "reference": reference["name"],
        "backends": backends,
    }


def _scores(logits: np.ndarray, y: np.ndarray, card: ModelCard, n_boot: int) -> dict[str, Any]:
    probs = softmax(logits, card.temperature)
    positive = card.class_names.index(card.positive_class)
    decisions = DecisionRule.of(card).labels(probs)
    truth = y == positive
    called = np.array([d == card.positive_class for d in decisions])
    low, high = bootstrap_ci(roc_auc, truth, probs[:, positive], n_boot=n_boot)
    return {
        "auc_positive": roc_auc(truth, probs[:, positive]),
        "auc_ci95": [low, high],
        "accuracy": float(np.mean(np.array(decisions) == np.array(card.class_names)[y])),
        "sensitivity": float(called[truth].mean()) if truth.any() else float("nan"),
        "specificity": float((~called[~truth]).mean()) if (~truth).any() else float("nan"),
        "decisions": decisions,
        "positive_probs": probs[:, positive].tolist(),
    }


def to_markdown(report: dict[str, Any]) -> str:
    lines = [
        f"edgebc {report['edgebc']}, {report['date']}: {report['model']} on {report['data']}; "
        f"decisions at threshold {_threshold(report['threshold'])}; agreement against {report['reference']}",
        "",
        "| backend | AUC malignant (95% CI) | accuracy | sensitivity | specificity | agreement | max Δp |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in report["backends"].items():
        if "unavailable" in r:
            lines.append(f"| {name} | not available: {r['unavailable']} ||||||")
            continue
        low, high = r["auc_ci95"]
        lines.append(
            f"| {name} | {r['auc_positive']:.3f} ({low:.3f}–{high:.3f}) | {r['accuracy']:.3f} | "
            f"{r['sensitivity']:.3f} | {r['specificity']:.3f} | {r['agreement']:.1%} | "
            f"{r['max_positive_prob_change']:.4f} |"
        )
    return "\n".join(lines)


def make_int8(fp32: Path, calibration: LabelledSet, out: Path) -> Path:
    """Quantize `fp32` with frames that are not in the evaluated set (needs the [export] extra)."""
    from edgebc.export.quantize import QuantPlan, quantize_int8

    quantize_int8(
        fp32,
        out,
        calibration.frames,
        calibration.frames,
        calibration.labels,
        # Every node quantized: the table shows what INT8 itself does to the decisions. (The export's
        # budget loop would keep nodes in float until the decisions agree, which on the tiny demo
        # model means all of them, and an "INT8" row that is FP32 in disguise.)
        QuantPlan(calibration_size=len(calibration.frames), max_excluded_nodes=0),
    )
    return out


def main(argv: Sequence[str] | None = None) -> int:
    from edgebc.demo import DEMO_MODEL

    parser = argparse.ArgumentParser(
        description="Accuracy per backend: the same labelled frames through every available "
        "backend, with AUC, decisions at the operating threshold and agreement",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model", type=Path, default=DEMO_MODEL, help="exported FP32 .onnx")
    parser.add_argument("--int8", type=Path, default=None, help="its INT8 .onnx")
    parser.add_argument("--checkpoint", type=Path, default=None, help="its checkpoint (torch rows)")
    parser.add_argument(
        "--make-int8",
        action="store_true",
        help="quantize --model here (calibrated on frames outside the evaluated set: other "
        "phantom seeds, or --calibration-split of --data)",
    )
    parser.add_argument(
        "--data",
        type=Path,
        default=None,
        help="labelled manifest .csv or dataset folder (default: synthetic phantoms)",
    )
    parser.add_argument("--split", default=None, help="evaluate only this split of --data")
    parser.add_argument("--calibration-split", default="val", help="--make-int8 frames from --data")
    parser.add_argument("--limit", type=int, default=None, help="at most this many frames")
    parser.add_argument("--per-class", type=int, default=40, help="phantoms per class")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for CIs")
    parser.add_argument("--out", type=Path, default=None, help="write OUT.json and OUT.md")
    args = parser.parse_args(argv)
    try:
        if args.data is None:
            labelled = phantom_set(args.per_class)
        else:
            labelled = dataset_set(args.data, args.split, args.limit)
        with tempfile.TemporaryDirectory(prefix="edgebc-accuracy-") as folder:
            work = Path(folder)
            int8 = args.int8
            if args.make_int8:
                calibration = (
                    phantom_set(16, seed=78)
                    if args.data is None
                    else dataset_set(args.data, args.calibration_split, 200)
                )
                int8 = make_int8(args.model, calibration, work / "int8.onnx")
            models = {"fp32": args.model, "int8": int8, "checkpoint": args.checkpoint}
            report = evaluate(models, labelled, work, args.bootstrap)
    except EdgebcError as exc:
        print(f"error: {exc}")
        return 2
    markdown = to_markdown(report)
    print(markdown)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out.with_suffix(".json"), json.dumps(report, indent=2) + "\n")
        atomic_write_text(args.out.with_suffix(".md"), markdown + "\n")
        print(f"\nwrote {args.out.with_suffix('.json')} and .md")
    return 0


def _threshold(value: float | None) -> str:
    return "none (most probable class)" if value is None else f"{value:.3f}"
