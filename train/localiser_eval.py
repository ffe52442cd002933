"""Whole frame against localise -> crop -> classify, on a manifest split, as the cart runs them.

Both pipelines run the exported models on ONNX Runtime through `FrameClassifier` (the same code as
the cart), on the same frames. Reported per site and overall: the classifier's AUC on the frames
it decided, with a patient-clustered 95 % bootstrap interval, and the end-to-end sensitivity and
specificity at the card's operating point over *every* frame of the task, where a frame the
pipeline gave no class (no lesion found, or refused by the quality gate) counts as missed when
it is malignant (the whole system's sensitivity is at most the localiser's recall) and, when
benign, as not a false alarm (the cart called nothing malignant).

    python -m edgebc.train.localiser_eval --classifier model.onnx --localiser localiser.onnx \
        --manifest runs/sites-cal.csv --split test --out runs/localiser/pipeline-test.json
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgebc.atomic import atomic_write_text
from edgebc.backends import open_backend
from edgebc.classifier import Decision, FrameClassifier
from edgebc.data.manifest import read_manifest
from edgebc.data.records import Sample
from edgebc.data.sample_image import read_sample
from edgebc.errors import EdgebcError
from edgebc.localiser import open_localiser
from edgebc.metrics import cluster_bootstrap_ci, roc_auc


def run_pipeline(classifier: FrameClassifier, samples: Sequence[Sample]) -> list[Decision]:
    """One decision per sample, frame by frame."""
    return [classifier.classify(read_sample(sample)[0]) for sample in samples]


def pipeline_metrics(
    decisions: Sequence[Decision],
    samples: Sequence[Sample],
    positive_class: str,
    n_boot: int = 1000,
) -> dict[str, Any]:
    """AUC (decided frames, patient-clustered CI) and end-to-end sensitivity and specificity."""
    positive = np.array([s.label == positive_class for s in samples])
    decided = np.array([d.label is not None for d in decisions])
    scores = np.array([np.nan if d.positive_probability is None else d.positive_probability
                       for d in decisions])  # fmt: skip
    called = np.array([d.label == positive_class for d in decisions])
    units = [s.unit for s in samples]
    kept_units = [u for u, k in zip(units, decided, strict=True) if k]
    y, p = positive[decided], scores[decided]
    auc, interval = float("nan"), [float("nan"), float("nan")]
    if y.any() and (~y).any():  # an AUC needs both classes among the decided frames
        auc = roc_auc(y, p)
        interval = list(cluster_bootstrap_ci(roc_auc, kept_units, y, p, n_boot=n_boot))
    reasons = Counter(d.quality.check or "other" for d in decisions if d.label is None)
    return {
        "frames": len(samples),
        "positives": int(positive.sum()),
        "decided": int(decided.sum()),
        "no_decision": dict(reasons),
        "auc_decided": auc,
        "auc_ci95": interval,
        "sensitivity_end_to_end": float(called[positive].mean()) if positive.any() else None,
        "specificity_end_to_end": float((~called)[~positive].mean()) if (~positive).any() else None,
        "positives_without_decision": int((positive & ~decided).sum()),
    }


def compare(
    classifier_path: str | Path,
    localiser_path: str | Path,
    samples: Sequence[Sample],
    margin: float | None = None,
    n_boot: int = 1000,
) -> dict[str, Any]:
    """Both pipelines on `samples` (the classifier's task's frames), overall and per site."""
    backend = open_backend(classifier_path, threads=1)
    card = backend.card
    samples = [s for s in samples if card.task.takes(s.label)]
    if not samples:
        raise EdgebcError(f"no frames of the classifier's task ({', '.join(card.task.labels)})")
    whole = FrameClassifier(backend, shift="off")
    cropped = FrameClassifier(backend, shift="off", localiser=open_localiser(localiser_path),
                              margin=margin)  # fmt: skip
    runs = {"whole_frame": run_pipeline(whole, samples), "crop": run_pipeline(cropped, samples)}
    report: dict[str, Any] = {"classifier": str(classifier_path), "localiser": str(localiser_path),
                              "margin": cropped.margin, "threshold": whole.threshold}  # fmt: skip
    sites = sorted({s.source or "unknown" for s in samples})
    for name, decisions in runs.items():
        report[name] = {"all": pipeline_metrics(decisions, samples, card.positive_class, n_boot)}
        for site in sites:
            keep = [k for k, s in enumerate(samples) if (s.source or "unknown") == site]
            report[name][site] = pipeline_metrics([decisions[k] for k in keep],
                                                  [samples[k] for k in keep], card.positive_class, n_boot)  # fmt: skip
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m edgebc.train.localiser_eval",
                                     description=__doc__.splitlines()[0])  # fmt: skip
    parser.add_argument("--classifier", required=True, help="exported classifier (.onnx)")
    parser.add_argument("--localiser", required=True, help="exported localiser (.onnx)")
    parser.add_argument("--manifest", required=True)
    parser.add_argument("--split", default="test")
    parser.add_argument("--sources", nargs="*", default=None)
    parser.add_argument("--margin", type=float, default=None)
    parser.add_argument("--out", default=None, help="write the report here as JSON")
    args = parser.parse_args(argv)
    try:
        samples = [s for s in read_manifest(args.manifest) if s.split == args.split]
        if args.sources:
            samples = [s for s in samples if s.source in args.sources]
        report = compare(args.classifier, args.localiser, samples, args.margin)
    except EdgebcError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    text = json.dumps(report, indent=2)
    if args.out:
        atomic_write_text(args.out, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
