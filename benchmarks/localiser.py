"""What the lesion localiser adds to each frame's latency: the classifier alone against localise ->
crop -> classify, interleaved frame by frame on the same frames, after checking both answer.

    python benchmarks/localiser.py --classifier model.onnx --localiser localiser.onnx \
        [--manifest runs/sites-cal.csv --split test --frames 40] [--rounds 5] [--out result.json]

Without a manifest the frames are ultrasound phantoms. Both pipelines are `FrameClassifier`s on
ONNX Runtime's CPU provider with one thread (the cart's setting on a shared core); the shift check
is off in both so the difference is the localiser's alone. Before timing, every frame is run once
through both and checked: the whole-frame pipeline decides or says why not, the crop pipeline
carries a box on every frame it judged. Each round times every frame in both pipelines, in an
order that alternates, so drift on a shared machine falls on both alike. Reported: per-frame
p50 / p90 of each, and the p50 of the per-frame difference (the added latency).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from edgebc.backends import open_backend
from edgebc.classifier import FrameClassifier
from edgebc.data.manifest import read_manifest
from edgebc.data.sample_image import read_sample
from edgebc.localiser import open_localiser
from edgebc.synth.ultrasound import make_ultrasound_phantom, phantom_rng
from edgebc.sysinfo import collect


def frames_for(args: argparse.Namespace) -> list[np.ndarray]:
    if args.manifest:
        samples = [s for s in read_manifest(args.manifest) if s.split == args.split]
        step = max(1, len(samples) // args.frames)
        return [read_sample(s)[0] for s in samples[::step][: args.frames]]
    labels = ("normal", "benign", "malignant")
    return [make_ultrasound_phantom(labels[k % 3], phantom_rng(17, k), 300, 400).image
            for k in range(args.frames)]  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classifier", required=True)
    parser.add_argument("--localiser", required=True)
    parser.add_argument("--manifest")
    parser.add_argument("--split", default="test")
    parser.add_argument("--frames", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out")
    args = parser.parse_args()
    frames = frames_for(args)
    backend = open_backend(args.classifier, threads=1)
    localiser = open_localiser(args.localiser, threads=1)
    # the added cost of the localiser is against the same classifier on whole frames; a
    # classifier trained on crops never runs on whole frames, so it has no such baseline here
    if backend.card.lineage.get("input_crop"):
        parser.error(f"{args.classifier} was trained on localiser crops: give the whole-frame "
                     "classifier (the cost is the same graph's either way)")  # fmt: skip
    whole = FrameClassifier(backend, shift="off")
    crop = FrameClassifier(backend, shift="off", localiser=localiser)
    checked = {"whole_decided": 0, "crop_decided": 0, "crop_no_lesion": 0, "crop_gate": 0}
    for frame in frames:  # outputs first: both answer, the crop pipeline with a box
        a, b = whole.classify(frame), crop.classify(frame)
        if a.label is None and not a.quality.reason:
            raise SystemExit("whole-frame pipeline gave no decision and no reason")
        if a.quality.ok and b.box is None:
            raise SystemExit("the crop pipeline judged a frame without a box")
        checked["whole_decided"] += a.label is not None
        checked["crop_decided"] += b.label is not None
        checked["crop_no_lesion"] += b.quality.check == "no_lesion"
        checked["crop_gate"] += not a.quality.ok
    timings: dict[str, list[float]] = {"whole": [], "crop": []}
    for round_ in range(args.rounds):
        for k, frame in enumerate(frames):
            order = ("whole", "crop") if (round_ + k) % 2 == 0 else ("crop", "whole")
            for name in order:
                pipeline = whole if name == "whole" else crop
                start = time.perf_counter()
                pipeline.classify(frame)
                timings[name].append((time.perf_counter() - start) * 1000.0)
    w, c = np.array(timings["whole"]), np.array(timings["crop"])
    report = {
        "frames": len(frames), "rounds": args.rounds, "source": args.manifest or "phantoms",
        "checked": checked,
        "whole_ms": {"p50": float(np.median(w)), "p90": float(np.percentile(w, 90))},
        "crop_ms": {"p50": float(np.median(c)), "p90": float(np.percentile(c, 90))},
        "added_ms_p50": float(np.median(c - w)),
        "classifier": str(args.classifier), "localiser": str(args.localiser),
        "machine": collect(),
    }  # fmt: skip
    text = json.dumps(report, indent=2, default=str)
    if args.out:
        Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
