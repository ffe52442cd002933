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

With `--crop-classifier` (a classifier trained on this localiser's crops: `data.localiser`), the
crop pipeline runs that one, and the two pipelines are compared paired, per site, on the same
frames: DeLong's test (patient-clustered where patients repeat) on the frames both gave a class,
and end to end over every frame with "no class" scored as the lowest score (the cart called
nothing malignant), and the end-to-end sensitivities by McNemar on the malignant frames.
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
from edgebc.localiser import check_crop_trained, open_localiser
from edgebc.metrics import cluster_bootstrap_ci, delong_test, mcnemar_test, roc_auc


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


def paired_pipelines(
    first: Sequence[Decision],
    second: Sequence[Decision],
    samples: Sequence[Sample],
    positive_class: str,
) -> dict[str, Any]:
    """The two pipelines on the same frames (first minus second): DeLong on the frames both
    decided, DeLong end to end (no class = score -1, below every probability), McNemar on the
    malignant frames' end-to-end calls."""
    positive = np.array([s.label == positive_class for s in samples])
    units = [s.unit for s in samples]

    def scores(decisions: Sequence[Decision]) -> np.ndarray:
        return np.array([-1.0 if d.positive_probability is None else d.positive_probability
                         for d in decisions])  # fmt: skip

    a, b = scores(first), scores(second)
    both = (a >= 0) & (b >= 0)

    def delong(keep: np.ndarray) -> dict[str, Any]:
        y = positive[keep]
        if not (y.any() and (~y).any()):
            return {"frames": int(keep.sum()), "difference": None, "p": None}
        test = delong_test(y, a[keep], b[keep], [u for u, k in zip(units, keep, strict=True) if k])
        return {"frames": int(keep.sum()), "difference": test.difference, "p": test.p_value,
                "method": test.method}  # fmt: skip

    called_a = np.array([d.label == positive_class for d in first])
    called_b = np.array([d.label == positive_class for d in second])
    sens: dict[str, Any] = {"malignant_frames": int(positive.sum())}
    if positive.any():
        test = mcnemar_test(called_a[positive], called_b[positive],
                            [u for u, p in zip(units, positive, strict=True) if p])  # fmt: skip
        sens.update(difference=test.difference, p=test.p_value, method=test.method)
    return {"auc_both_decided": delong(both), "auc_end_to_end": delong(np.ones(len(samples), bool)),
            "sensitivity_end_to_end": sens}  # fmt: skip


def compare(
    classifier_path: str | Path,
    localiser_path: str | Path,
    samples: Sequence[Sample],
    margin: float | None = None,
    n_boot: int = 1000,
    crop_classifier_path: str | Path | None = None,
) -> dict[str, Any]:
    """Both pipelines on `samples` (the classifier's task's frames), overall and per site: the
    classifier on whole frames, and the localiser's crops classified by `crop_classifier_path`
    (trained on them) or, without one, by the same classifier."""
    backend = open_backend(classifier_path, threads=1)
    card = backend.card
    samples = [s for s in samples if card.task.takes(s.label)]
    if not samples:
        raise EdgebcError(f"no frames of the classifier's task ({', '.join(card.task.labels)})")
    crop_backend = (
        backend if crop_classifier_path is None else open_backend(crop_classifier_path, threads=1)
    )
    if crop_backend.card.task != card.task:
        raise EdgebcError(
            f"{crop_classifier_path}: task {crop_backend.card.task.name}, but {classifier_path} "
            f"answers {card.task.name}: pipelines are compared on one task"
        )
    whole = FrameClassifier(backend, shift="off")
    cropped = FrameClassifier(crop_backend, shift="off", localiser=open_localiser(localiser_path),
                              margin=margin)  # fmt: skip
    if crop_classifier_path is not None:  # a model trained on crops: only its localiser's, margin
        check_crop_trained(crop_backend.card, localiser_path, cropped.margin)
    runs = {"whole_frame": run_pipeline(whole, samples), "crop": run_pipeline(cropped, samples)}
    report: dict[str, Any] = {"classifier": str(classifier_path), "localiser": str(localiser_path),
                              "crop_classifier": str(crop_classifier_path or classifier_path),
                              "margin": cropped.margin, "threshold": whole.threshold,
                              "crop_threshold": cropped.threshold}  # fmt: skip
    sites = sorted({s.source or "unknown" for s in samples})
    groups = {"all": list(range(len(samples)))}
    groups.update({site: [k for k, s in enumerate(samples) if (s.source or "unknown") == site]
                   for site in sites})  # fmt: skip
    for name, decisions in runs.items():
        report[name] = {
            group: pipeline_metrics([decisions[k] for k in keep], [samples[k] for k in keep],
                                    card.positive_class, n_boot)
            for group, keep in groups.items()
        }  # fmt: skip
    report["whole_minus_crop"] = {
        group: paired_pipelines([runs["whole_frame"][k] for k in keep], [runs["crop"][k] for k in keep],
                                [samples[k] for k in keep], card.positive_class)
        for group, keep in groups.items()
    }  # fmt: skip
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m edgebc.train.localiser_eval",
                                     description=__doc__.splitlines()[0])  # fmt: skip
    parser.add_argument("--classifier", required=True, help="exported classifier (.onnx)")
    parser.add_argument("--localiser", required=True, help="exported localiser (.onnx)")
    parser.add_argument("--crop-classifier", default=None,
                        help="exported classifier trained on this localiser's crops, for the crop "
                        "pipeline (default: --classifier on crops)")  # fmt: skip
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
        report = compare(args.classifier, args.localiser, samples, args.margin,
                         crop_classifier_path=args.crop_classifier)  # fmt: skip
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
