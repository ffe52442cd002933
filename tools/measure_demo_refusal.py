"""How often the demo model answers real breast ultrasound (it should never) and its own phantoms.

    python tools/measure_demo_refusal.py [--data ../shared/data]

Every BUSI and BUS-BRA image goes through the classifier `edgebc serve` builds for the demo (each
image its own stream, as an upload is), and so do fresh phantoms of several sizes; it prints, per
set, how many frames got a label and how many were withdrawn as unlike the demo's phantoms.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import cv2

from edgebc.classifier_settings import ClassifierSettings, build_classifier
from edgebc.synth import make_ultrasound_phantom
from edgebc.synth.ultrasound import phantom_rng

SIZES = (48, 64, 96, 128, 160, 256, 320)


def real_images(data: Path) -> dict[str, list[Path]]:
    found = {
        "BUSI": sorted((data / "busi").rglob("*.png")),
        "BUS-BRA": sorted((data / "busbra").rglob("*.png")),
    }
    return {
        name: [p for p in paths if "mask" not in p.name.lower()] for name, paths in found.items()
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data"
    )
    args = parser.parse_args(argv)
    classifier = build_classifier(ClassifierSettings())
    print("| frames | n | labelled | withdrawn as unlike the phantoms | other refusals |")
    print("|---|---|---|---|---|")
    sets: dict[str, list] = {name: paths for name, paths in real_images(args.data).items()}
    for size in SIZES:
        sets[f"phantoms {size} px"] = [(k, size) for k in range(90)]
    for name, items in sets.items():
        counts: Counter[str] = Counter()
        for item in items:
            if isinstance(item, Path):
                image = cv2.imread(str(item), cv2.IMREAD_UNCHANGED)
            else:
                k, size = item
                label = ("normal", "benign", "malignant")[k % 3]
                image = make_ultrasound_phantom(label, phantom_rng(4711, k), size, size).image
            classifier.reset_stream()  # each image on its own, as an upload
            decision = classifier.classify(image)
            counts["labelled" if decision.label else decision.quality.check or "other"] += 1
        n = sum(counts.values())
        other = n - counts["labelled"] - counts["shift"]
        print(f"| {name} | {n} | {counts['labelled']} | {counts['shift']} | {other} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
