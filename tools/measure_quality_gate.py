"""Measure the quality gate's refusal rates: phantoms and BUSI should pass, non-ultrasound should not.

    python tools/measure_quality_gate.py [--data ../shared/data] [--non-us FOLDER ...]

Groups: synthetic phantom frames (still, cine, and cine through an MJPG video as a capture card
would deliver it), BUSI frames (ultrasound, should pass), mini-MIAS mammograms, synthetic desktops
and documents, and any folders of other non-ultrasound pictures given with --non-us (photos,
screenshots). Prints refusal rates per group and the reasons; nothing is written.
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import cv2
import numpy as np

from edgebc.data.records import CLASS_NAMES
from edgebc.decode import read_image
from edgebc.quality import QualityGate
from edgebc.sources import IMAGE_SUFFIXES, open_source
from edgebc.synth import make_cine
from edgebc.synth.cine import write_video
from edgebc.synth.decoys import make_desktop_screen, make_document
from edgebc.synth.ultrasound import phantom_rng, phantom_stills


def phantom_cine_through_video(n_per_class: int) -> Iterator[np.ndarray]:
    with tempfile.TemporaryDirectory() as folder:
        for number, label in enumerate(CLASS_NAMES):
            frames, _ = make_cine(label, phantom_rng(number, 9), n_per_class, 256, 256)
            path = write_video(frames, Path(folder) / f"{label}.avi", fps=30)
            source = open_source(str(path))
            source.open()
            while (frame := source.read()) is not None:
                yield frame.image
            source.close()


def decoys(n: int) -> Iterator[np.ndarray]:
    rng = np.random.default_rng(2026)
    for k in range(n):
        yield make_desktop_screen(rng) if k % 2 == 0 else make_document(rng)


def image_files(
    folders: Iterable[Path], exclude: str = "_mask", gate: QualityGate | None = None
) -> Iterator[np.ndarray]:
    """Every image under the folders; with `gate`, names the ones it lets through (non-US sets)."""
    for folder in folders:
        for path in sorted(folder.rglob("*")):
            if path.suffix.lower() not in (*IMAGE_SUFFIXES, ".pgm") or exclude in path.stem:
                continue
            image = read_image(path) if path.suffix.lower() != ".pgm" else cv2.imread(str(path), 0)
            if image is None:
                continue
            if gate is not None and gate.check(image).ok:
                print(f"    passed the gate: {path}")
            yield image


def report(name: str, frames: Iterable[np.ndarray], gate: QualityGate) -> None:
    reasons: collections.Counter[str] = collections.Counter()
    total = 0
    for frame in frames:
        total += 1
        verdict = gate.check(frame)
        if not verdict.ok:
            reasons[" ".join((verdict.reason or "").split(":")[0].split()[:3])] += 1
    refused = sum(reasons.values())
    share = refused / total if total else float("nan")
    print(f"{name:38s} {total:5d} frames  refused {refused:5d} ({share:6.1%})  {dict(reasons)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data"
    )
    parser.add_argument(
        "--non-us", type=Path, nargs="*", default=[], help="folders of non-ultrasound pictures"
    )
    args = parser.parse_args(argv)
    gate = QualityGate()
    report("phantom stills (256 px)", phantom_stills(300, seed=5)[0], gate)
    report("phantom cine via MJPG video", phantom_cine_through_video(60), gate)
    if (args.data / "busi").is_dir():
        report("BUSI (ultrasound)", image_files([args.data / "busi"]), gate)
    if (args.data / "mias").is_dir():
        report("mini-MIAS (mammograms, not US)", image_files([args.data / "mias"], gate=gate), gate)
    report("synthetic desktops + documents", decoys(40), gate)
    for folder in args.non_us:
        report(f"{folder.name} (not US)", image_files([folder], gate=gate), gate)
    return 0


if __name__ == "__main__":
    sys.exit(main())
