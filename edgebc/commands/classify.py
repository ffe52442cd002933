"""`edgebc classify`: exported model over files, folders, videos and DICOM."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from edgebc.commands import HelpFormatter

if TYPE_CHECKING:  # for annotations only; the command imports its modules when it runs
    from edgebc.backends import Backend
    from edgebc.classifier import FrameClassifier


def register_classify(commands: argparse._SubParsersAction) -> None:
    classify = commands.add_parser(
        "classify",
        help="classify image files, folders, videos or DICOM with an exported model; CSV or JSON Lines out",
        description="Classify every frame of the inputs with an exported model (.onnx, or a TensorRT .engine) "
        "through the shared preprocessing, the quality gate and the model card's temperature and "
        "threshold. Unreadable inputs are reported and skipped; the exit status is 1 when any failed.",
        formatter_class=HelpFormatter,
    )
    classify.add_argument("model", type=Path, help="exported model: .onnx or .engine")
    classify.add_argument(
        "inputs", nargs="+", help="image files, folders, glob patterns, videos, DICOM files"
    )
    classify.add_argument(
        "--out", type=Path, default=Path("results.csv"), help="results file: .csv or .jsonl"
    )
    classify.add_argument(
        "--region", default=None, metavar="X,Y,W,H", help="imaging region to crop from every frame"
    )
    classify.add_argument(
        "--auto-region",
        action="store_true",
        help="detect the imaging region on each input's first frame",
    )
    classify.add_argument(
        "--providers",
        default="CPUExecutionProvider",
        help="ONNX Runtime providers, comma-separated, in order of preference",
    )
    classify.add_argument(
        "--threads", type=int, default=0, help="inference threads (0: ONNX Runtime's default)"
    )
    classify.add_argument("--batch", type=int, default=16, help="frames per inference batch")
    classify.add_argument(
        "--stride", type=int, default=1, help="classify every Nth frame of videos and cines"
    )
    classify.set_defaults(handler=run_classify)


def run_classify(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from edgebc.backends import open_backend
    from edgebc.batch import classify_inputs
    from edgebc.classifier import FrameClassifier
    from edgebc.region import Region

    if args.region and args.auto_region:
        raise ValueError("give either --region or --auto-region, not both")
    if args.batch < 1 or args.stride < 1:
        raise ValueError("--batch and --stride must be at least 1")
    region = None
    if args.region:
        try:
            region = Region(*(int(v) for v in args.region.split(",")))
        except (TypeError, ValueError) as exc:
            raise ValueError(
                f"--region expects X,Y,W,H in pixels, got {args.region!r}: {exc}"
            ) from exc
    backend = open_backend(
        args.model,
        providers=[p.strip() for p in args.providers.split(",") if p.strip()],
        threads=args.threads,
    )
    classifier = FrameClassifier(backend, region)
    if args.auto_region:
        classifier = auto_region_classifier(backend, args.inputs)
    with tqdm(desc="classify", unit="frame", disable=None) as bar:
        written, errors = classify_inputs(classifier, args.inputs, args.out, args.batch, args.stride,
                                          on_error=lambda m: print(f"edgebc: error: {m}", file=sys.stderr), progress=bar.update)  # fmt: skip
    print(
        f"wrote {args.out}: {written} frames classified with {backend.name}, {errors} inputs unreadable"
    )
    return 1 if errors else 0


def auto_region_classifier(backend: Backend, inputs: Sequence[str]) -> FrameClassifier:
    from edgebc.batch import expand_inputs, iter_frames
    from edgebc.classifier import FrameClassifier
    from edgebc.region import detect_imaging_region

    first = next(
        (item for item in iter_frames(expand_inputs(inputs)) if item.image is not None), None
    )
    if first is None or first.image is None:
        raise ValueError("no readable frame to detect the imaging region on")
    region = detect_imaging_region(first.image)
    if region is None:
        raise ValueError(f"{first.source}: no imaging region found; give --region X,Y,W,H")
    print(
        f"imaging region from {first.source}: x={region.x} y={region.y} w={region.w} h={region.h}",
        file=sys.stderr,
    )
    return FrameClassifier(backend, region)
