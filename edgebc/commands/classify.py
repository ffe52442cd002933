"""`edgebc classify`: exported model over files, folders, videos and DICOM; a multi-view
mammography model over the cases of manifests; a fusion model over a case's ultrasound and
mammograms."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from edgebc.commands import HelpFormatter

if TYPE_CHECKING:  # for annotations only; the command imports its modules when it runs
    from edgebc.archive import ClassifySettings


def register_classify(commands: argparse._SubParsersAction) -> None:
    classify = commands.add_parser(
        "classify",
        help="classify image files, folders, videos or DICOM with an exported model; CSV or JSON Lines out",
        description="Classify every frame of the inputs with an exported model (.onnx, or a TensorRT .engine) "
        "through the shared preprocessing, the quality gate and the model card's temperature and "
        "threshold. The classifier's keys are those of `edgebc serve` (model, region or auto_region, "
        "threshold, quality: the ultrasound gate's limits, mammography_quality: the mammography gate's, shift: withdraw|mark|off, shift_window, providers, "
        "threads), so a site's validated threshold and gate apply to archive runs too: --set threshold=0.2 --set quality.min_std=8. Folders are searched "
        "recursively for images, videos and DICOM files (masks left out), as are glob patterns "
        "(quote them; ** crosses folders). A multi-view mammography model classifies cases: give "
        "manifests (.csv with path, patient_id and view columns, as `edgebc synth` and `edgebc data "
        "audit` write them); each breast (a patient's views of one side) gets a row per view, the "
        "model on that view alone, and a row for the case, the model on all its views that pass "
        "the gate. A mammogram + ultrasound fusion model classifies one case: --ultrasound US... "
        "--mammogram MG... (files, folders, DICOM; --case names it); the mammograms pass the "
        "mammography gate and are embedded once, each ultrasound frame (every frame of a cine) is "
        "fused with them, and the case is the mean of its frames; a row per mammogram, per frame and "
        "for the case says which inputs and modalities it used (ultrasound alone where no "
        "mammogram passed). Unreadable inputs are reported and skipped; the exit "
        "status is 1 when any failed.",
        formatter_class=HelpFormatter,
    )
    classify.add_argument("model", nargs="?", default=None,
                          help="exported model: .onnx or .engine (or model: in --config)")  # fmt: skip
    classify.add_argument("inputs", nargs="*",
                          help="image files, folders, glob patterns, videos, DICOM files (or inputs: in --config)")  # fmt: skip
    classify.add_argument("--ultrasound", nargs="+", default=None, metavar="US",
                          help="a fusion model's case: its ultrasound images, cines, videos or folders")  # fmt: skip
    classify.add_argument("--mammogram", nargs="+", default=None, metavar="MG",
                          help="a fusion model's case: its stored mammogram views (files, folders, DICOM); VIEW=PATH (L-CC=cc.png) states the view of files whose header does not")  # fmt: skip
    classify.add_argument("--case", default=None,
                          help="the case's id in every row of a fusion model's results (default: case)")  # fmt: skip
    classify.add_argument("--config", type=Path, default=None,
                          help="YAML archive job (deploy/configs/archive-batch.yaml); arguments and flags override it")  # fmt: skip
    classify.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                          help="override a key of --config (repeatable)")  # fmt: skip
    classify.add_argument(
        "--out", default=None, help="results file: .csv or .jsonl (default runs/results.csv)"
    )
    classify.add_argument(
        "--region", default=None, metavar="X,Y,W,H", help="imaging region to crop from every frame"
    )
    classify.add_argument(
        "--auto-region",
        action="store_true",
        default=None,
        help="detect the imaging region on each input's first frame",
    )
    classify.add_argument("--threshold", type=float, default=None,
                          help="override the card's operating threshold (a site's validated choice)")  # fmt: skip
    classify.add_argument("--providers", default=None,
                          help="ONNX Runtime providers, comma-separated, in order of preference (default CPU)")  # fmt: skip
    classify.add_argument("--threads", type=int, default=None,
                          help="inference threads (default 0: ONNX Runtime's choice)")  # fmt: skip
    classify.add_argument(
        "--batch", type=int, default=None, help="frames per inference batch (default 16)"
    )
    classify.add_argument("--no-plan", dest="use_plan", action="store_false", default=None,
                          help="run the model file as given, not the runtime and precision its "
                          "deployment plan chose (edgebc model plan)")  # fmt: skip
    classify.add_argument("--stride", type=int, default=None,
                          help="classify every Nth frame of videos and cines (default 1)")  # fmt: skip
    classify.set_defaults(handler=run_classify)


def classify_settings(args: argparse.Namespace) -> ClassifySettings:
    """The --config file (or defaults) with --set on top, then the command line's values."""
    from edgebc.archive import ClassifySettings
    from edgebc.config import load_config

    region = None
    if args.region:
        try:
            x, y, w, h = (int(v) for v in args.region.split(","))
        except ValueError as exc:
            raise ValueError(f"--region expects X,Y,W,H in pixels, got {args.region!r}") from exc
        region = (x, y, w, h)
    given = {"model": args.model, "inputs": tuple(args.inputs) or None, "out": args.out,
             "region": region, "auto_region": args.auto_region, "threshold": args.threshold, "threads": args.threads,
             "providers": tuple(p.strip() for p in args.providers.split(",") if p.strip()) if args.providers else None,
             "batch": args.batch, "stride": args.stride, "case": args.case, "use_plan": args.use_plan,
             "ultrasound": tuple(args.ultrasound) if args.ultrasound else None,
             "mammogram": tuple(args.mammogram) if args.mammogram else None}  # fmt: skip
    overrides = [
        *args.overrides,
        *(f"{k}={json.dumps(v)}" for k, v in given.items() if v is not None),
    ]
    return load_config(ClassifySettings, args.config, overrides, flags="the command line")


FUSION_HINT = (
    "a mammogram + ultrasound fusion model classifies a case: give its images with "
    "--ultrasound US... and --mammogram MG..."
)


def _is_fusion_graph(path: Path) -> bool:
    from edgebc.fusion_graphs import read_layout

    try:
        return read_layout(path) is not None
    except Exception:  # not a loadable ONNX file: the original error says what is wrong
        return False


def run_classify(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from edgebc.archive import classify_inputs
    from edgebc.classifier_settings import build_classifier
    from edgebc.errors import EdgebcError

    settings = classify_settings(args)
    if settings.ultrasound or settings.mammogram:
        return _classify_fusion(settings)
    if all(Path(i).suffix.lower() == ".csv" for i in settings.inputs):
        return _classify_cases(settings)
    try:
        classifier = build_classifier(settings)
    except EdgebcError as exc:
        if _is_fusion_graph(settings.model_path):
            raise EdgebcError(f"{settings.model}: {FUSION_HINT}") from exc
        raise
    out = Path(settings.out)
    with tqdm(desc="classify", unit="frame", disable=None) as bar:
        written, errors = classify_inputs(classifier, settings.inputs, out, settings.batch, settings.stride,
                                          on_error=lambda m: print(f"edgebc: error: {m}", file=sys.stderr),
                                          progress=bar.update, auto_region=settings.auto_region)  # fmt: skip
    print(
        f"wrote {out}: {written} frames classified with {classifier.backend.name}, "
        f"{errors} inputs unreadable; shift check {classifier.shift_note}"
    )
    return 1 if errors else 0


def _classify_cases(settings: ClassifySettings) -> int:
    """Manifests in: the cases of a multi-view model, a row per view and per case."""
    from tqdm import tqdm

    from edgebc.backends import open_backend
    from edgebc.cases import CaseClassifier, classify_case_manifests
    from edgebc.data.sample_image import read_sample
    from edgebc.errors import EdgebcError
    from edgebc.quality import gate_for

    if settings.region or settings.auto_region:
        raise ValueError(
            "--region and --auto-region crop ultrasound frames; a mammogram is read whole"
        )
    backend = open_backend(
        settings.model_path, settings.providers, settings.threads, spin_wait=settings.spin_wait
    )
    if getattr(backend, "fusion", None) is not None:
        raise EdgebcError(f"{settings.model}: {FUSION_HINT}")
    if backend.card.presence_input is None:
        raise EdgebcError(
            f"{settings.model}: takes one image, not cases; manifests (.csv) are for multi-view "
            "models: give the images themselves"
        )
    # every view of a multi-view model is a mammogram: the mammography gate, full depth
    gate = gate_for("mg", settings.quality, settings.mammography_quality)
    classifier = CaseClassifier(backend, gate, settings.threshold)
    out = Path(settings.out)
    with tqdm(desc="classify", unit="case", disable=None) as bar:
        decided, views, errors = classify_case_manifests(
            classifier, settings.inputs, out,
            lambda sample: read_sample(sample.with_(modality="mammo")),  # every view is one
            on_error=lambda m: print(f"edgebc: error: {m}", file=sys.stderr), progress=bar.update,
        )  # fmt: skip
    print(
        f"wrote {out}: {decided} cases decided ({views} view rows) with {backend.name}, "
        f"{errors} inputs unreadable; shift check off (it covers one-input models)"
    )
    return 1 if errors else 0


def _classify_fusion(settings: ClassifySettings) -> int:
    """--ultrasound/--mammogram: one case of a fusion model, a row per mammogram, frame and case."""
    from tqdm import tqdm

    from edgebc.archive import classify_fusion_case
    from edgebc.fusion import FusionClassifier

    if settings.region or settings.auto_region:
        raise ValueError("--region and --auto-region are not done for fusion models yet")
    if settings.localiser is not None:
        raise ValueError("a lesion localiser is not done for fusion models yet; give none")
    classifier = FusionClassifier.open(
        settings.model_path, settings.quality, settings.mammography_quality, settings.threshold,
        settings.providers, settings.threads, settings.spin_wait,
    )  # fmt: skip
    out = Path(settings.out)
    with tqdm(desc="classify", unit="frame", disable=None) as bar:
        decided, errors = classify_fusion_case(
            classifier, settings.case, settings.ultrasound, settings.mammogram, out,
            settings.batch, settings.stride,
            on_error=lambda m: print(f"edgebc: error: {m}", file=sys.stderr), progress=bar.update,
        )  # fmt: skip
    context = classifier.context
    used = ", ".join(context.inputs) if context and context.inputs else "none"
    print(
        f"wrote {out}: case {settings.case}, {decided} ultrasound frames decided, mammogram "
        f"inputs used: {used}, {errors} inputs unreadable; shift check off (fusion models)"
    )
    return 1 if errors else 0
