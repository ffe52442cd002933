"""The `edgebc` command: one tool with subcommands for every part of the product.

Errors the user can act on print one line and exit 1 (2 for usage errors); `--verbose` shows
the traceback. Each subcommand's module adds its own parser, so this file only wires them.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from edgebc import __version__

if TYPE_CHECKING:  # for annotations only; each command imports its modules when it runs
    from edgebc.backends import Backend
    from edgebc.classifier import FrameClassifier

log = logging.getLogger("edgebc")


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Show defaults in --help and keep the description's line breaks."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgebc",
        description="Breast-lesion classification for point-of-care ultrasound (research use only, "
        "not a medical device).",
        formatter_class=_Formatter,
    )
    parser.add_argument("--version", action="version", version=f"edgebc {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="debug logging, and full tracebacks on errors"
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_info(commands)
    _add_synth(commands)
    _add_data(commands)
    _add_train(commands)
    _add_eval(commands)
    _add_export(commands)
    _add_classify(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        print("edgebc: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.verbose:
            traceback.print_exc()
        message = str(exc) or type(exc).__name__
        print(f"edgebc: error: {message}", file=sys.stderr)
        if not args.verbose:
            print("edgebc: run with --verbose for the full traceback", file=sys.stderr)
        return 1


def _add_info(commands: argparse._SubParsersAction) -> None:
    info = commands.add_parser(
        "info",
        help="versions, inference providers, GPU, CPU features and cameras on this machine",
        description="Report what this machine offers edgebc. Imports no torch, TensorRT or camera library.",
        formatter_class=_Formatter,
    )
    info.add_argument(
        "--json", action="store_true", help="print machine-readable JSON instead of text"
    )
    info.set_defaults(handler=_run_info)


def _run_info(args: argparse.Namespace) -> int:
    from edgebc import sysinfo

    facts = sysinfo.collect()
    if args.json:
        print(json.dumps(facts, indent=2))
        return 0
    cpu = facts["cpu"]
    print(
        f"edgebc {facts['packages']['edgebc'] or __version__} on Python {facts['python']} ({facts['platform']})"
    )
    print(
        f"CPU: {cpu['model']}, {cpu['logical_cores']} logical cores, features: {', '.join(cpu['features']) or 'none detected'}"
    )
    print("Packages:")
    for name, version in facts["packages"].items():
        print(f"  {name:24s} {version or '-'}")
    print(
        f"ONNX Runtime providers: {', '.join(facts['onnxruntime_providers']) or 'onnxruntime not installed'}"
    )
    print(f"GPUs: {'; '.join(facts['gpus']) or 'none found (nvidia-smi absent or no device)'}")
    if facts["jetson"]:
        print(f"Jetson: {facts['jetson']}")
    backends = ", ".join(k for k, v in facts["camera_backends"].items() if v) or "none"
    print(
        f"Video devices: {', '.join(facts['video_devices']) or 'none'}; camera backends: {backends}"
    )
    return 0


def _add_synth(commands: argparse._SubParsersAction) -> None:
    synth = commands.add_parser(
        "synth",
        help="write a labelled synthetic phantom dataset (ultrasound, mammography, screens, cine)",
        description="Write B-mode ultrasound phantoms (and optionally mammography phantoms, scanner "
        "screens and cine clips) with masks and a manifest.csv. Deterministic by --seed.",
        formatter_class=_Formatter,
    )
    synth.add_argument("out", type=Path, help="output folder (created if missing)")
    synth.add_argument(
        "--n-per-class", type=int, default=20, help="images per class (normal, benign, malignant)"
    )
    synth.add_argument("--size", type=int, default=256, help="image side in pixels")
    synth.add_argument(
        "--seed", type=int, default=0, help="random seed; the same seed writes the same files"
    )
    synth.add_argument(
        "--modality", choices=("us", "mammo", "both"), default="us", help="which phantoms to write"
    )
    synth.add_argument(
        "--screens",
        type=int,
        default=0,
        help="scanner-screen framings to write (with true regions)",
    )
    synth.add_argument(
        "--cine", type=int, default=0, help="cine clips per class (AVI video plus frame folder)"
    )
    synth.add_argument("--cine-frames", type=int, default=30, help="frames per cine clip")
    synth.set_defaults(handler=_run_synth)


def _run_synth(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from edgebc.synth.dataset import SynthPlan, write_phantom_dataset

    plan = SynthPlan(
        args.n_per_class,
        args.size,
        args.seed,
        args.modality,
        args.screens,
        args.cine,
        args.cine_frames,
    )
    total = plan.n_per_class * 3 + plan.cine_per_class * 3
    with tqdm(total=total, desc="synth", unit="item", disable=None) as bar:
        manifest = write_phantom_dataset(args.out, plan, progress=bar.update)
    print(f"wrote {manifest}")
    return 0


def _add_data(commands: argparse._SubParsersAction) -> None:
    data = commands.add_parser(
        "data",
        help="audit a dataset or split it into train/val/test and folds",
        description="Dataset tools. PATH may be a manifest .csv, a BUSI folder, a mini-MIAS folder "
        "or any class-per-folder tree.",
        formatter_class=_Formatter,
    )
    actions = data.add_subparsers(dest="action", metavar="ACTION", required=True)
    audit = actions.add_parser(
        "audit",
        help="find duplicates, label conflicts, unreadable, colour and annotated frames",
        description="Audit a dataset and write audit.json, audit.md and manifest.clean.csv "
        "(near-duplicates share a `group` id so later splits keep them together).",
        formatter_class=_Formatter,
    )
    audit.add_argument("path", type=Path, help="dataset folder or manifest .csv")
    audit.add_argument(
        "--out", type=Path, default=Path("audit"), help="folder for the report and cleaned manifest"
    )
    audit.add_argument(
        "--conflicts",
        choices=("drop", "keep"),
        default="drop",
        help="what the cleaned manifest does with images whose duplicates carry another class",
    )
    audit.add_argument("--workers", type=int, default=4, help="decoding threads")
    audit.set_defaults(handler=_run_audit)
    split = actions.add_parser(
        "split",
        help="stratified, group-aware train/val/test split or k folds, written as a manifest",
        description="Split so that no near-duplicate group and no patient straddles two sides. "
        "Uses the manifest's `group` column (from `edgebc data audit`) when present; otherwise "
        "finds near-duplicates first.",
        formatter_class=_Formatter,
    )
    split.add_argument("path", type=Path, help="dataset folder or manifest .csv")
    split.add_argument(
        "--out", type=Path, default=Path("manifest.split.csv"), help="manifest to write"
    )
    split.add_argument(
        "--val", type=float, default=0.15, help="validation fraction (0 with --folds)"
    )
    split.add_argument("--test", type=float, default=0.15, help="held-out test fraction")
    split.add_argument(
        "--folds", type=int, default=0, help="k folds over the non-test data (0: none)"
    )
    split.add_argument(
        "--seed", type=int, default=0, help="random seed; the same seed gives the same split"
    )
    split.set_defaults(handler=_run_split)


def _run_audit(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from edgebc.data import read_dataset
    from edgebc.data.audit import audit_samples, write_audit

    samples = read_dataset(args.path)
    with tqdm(total=len(samples), desc="audit", unit="img", disable=None) as bar:
        result = audit_samples(
            samples,
            str(args.path),
            conflicts=args.conflicts,
            workers=args.workers,
            progress=bar.update,
        )
    paths = write_audit(result, args.out)
    report = result.report
    print(
        f"{report.n_samples} images: {len(report.unreadable)} unreadable, {len(report.exact_duplicates)} exact-duplicate "
        f"sets, {len(report.near_duplicate_groups)} near-duplicate groups, {len(report.label_conflicts)} label conflicts, "
        f"{len(report.colour_frames)} colour frames, {len(report.suspected_annotations)} with burned-in marks"
    )
    for conflict in report.label_conflicts:
        names = ", ".join(f"{Path(m['path']).name} ({m['label']})" for m in conflict["members"])
        print(f"  label conflict ({conflict['kind']}): {names}")
    print(
        f"wrote {paths['markdown']}, {paths['json']}, {paths['manifest']} ({report.cleaning['kept']} kept)"
    )
    return 0


def _run_split(args: argparse.Namespace) -> int:
    from edgebc.data import read_dataset, write_manifest
    from edgebc.data.audit import audit_samples
    from edgebc.data.split import SplitPlan, assign_splits, split_summary

    plan = SplitPlan(
        val=0.0 if args.folds else args.val, test=args.test, folds=args.folds, seed=args.seed
    )
    samples = read_dataset(args.path)
    if not any(s.group for s in samples):
        log.info(
            "no `group` column: finding near-duplicates first (run `edgebc data audit` to review them)"
        )
        samples = audit_samples(samples, str(args.path), conflicts="keep").cleaned
    result = assign_splits(samples, plan)
    write_manifest(result, args.out)
    for side, counts in split_summary(result).items():
        print(f"  {side:6s} " + "  ".join(f"{label}={n}" for label, n in counts.items()))
    print(f"wrote {args.out}")
    return 0


def _add_train(commands: argparse._SubParsersAction) -> None:
    train = commands.add_parser(
        "train",
        help="train a classifier (needs the [train] extra: torch)",
        description="Train from a YAML config (see configs/) with optional overrides. The run folder "
        "gets config.yaml, history.csv, curves.png, best.pt (with temperature and operating threshold), "
        "last.pt (for --resume) and metrics.json. Under torchrun it trains data-parallel.",
        formatter_class=_Formatter,
    )
    train.add_argument(
        "--config",
        type=Path,
        default=None,
        help="YAML training configuration (defaults when omitted)",
    )
    train.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set optim.lr=1e-3 (repeatable)",
    )
    train.add_argument("--manifest", default=None, help="shortcut for --set data.manifest=PATH")
    train.add_argument("--arch", default=None, help="shortcut for --set model.arch=NAME")
    train.add_argument(
        "--pretrained",
        default=None,
        help="torchvision ImageNet weights file on disk (never downloaded)",
    )
    train.add_argument("--epochs", type=int, default=None, help="shortcut for --set optim.epochs=N")
    train.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default=None,
        help="shortcut for --set device=...",
    )
    train.add_argument("--name", default=None, help="run name (folder under out_dir)")
    train.add_argument("--out", default=None, help="shortcut for --set out_dir=PATH")
    train.add_argument(
        "--resume",
        type=Path,
        default=None,
        help="continue the run in this folder exactly where last.pt left it",
    )
    train.add_argument(
        "--cross-validate",
        action="store_true",
        help="train one model per fold of a --folds manifest and summarise",
    )
    train.set_defaults(handler=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    from edgebc.train.config import load_train_config
    from edgebc.train.engine import train_model

    if args.resume is not None:
        result = train_model(load_train_config(args.resume / "config.yaml"), resume=args.resume)
    else:
        shortcuts = {"data.manifest": args.manifest, "model.arch": args.arch, "model.pretrained": args.pretrained,
                     "optim.epochs": args.epochs, "device": args.device, "name": args.name, "out_dir": args.out}  # fmt: skip
        overrides = [*args.overrides, *(f"{k}={v}" for k, v in shortcuts.items() if v is not None)]
        config = load_train_config(args.config, overrides)
        if args.cross_validate:
            from edgebc.train.crossval import cross_validate

            report = cross_validate(config)
            for key, stats in report["summary"].items():
                print(f"  {key:32s} {stats['mean']:.3f} +- {stats['sd']:.3f}")
            print(f"wrote {Path(config.out_dir) / config.name / 'cv_summary.md'}")
            return 0
        result = train_model(config)
    if result.best_metrics:
        m = result.best_metrics
        print(f"best epoch {m['best_epoch']}: val AUC {m['val_auc_positive']:.3f}, macro AUC {m['val_macro_auc']:.3f}, "
              f"balanced accuracy {m['val_balanced_accuracy']:.3f}, threshold {m['threshold']:.3f} "
              f"(val sensitivity {m['val_sensitivity_at_threshold']:.3f}, specificity {m['val_specificity_at_threshold']:.3f})")  # fmt: skip
        print(f"wrote {result.best_checkpoint}")
    return 0


def _add_eval(commands: argparse._SubParsersAction) -> None:
    evaluate = commands.add_parser(
        "eval",
        help="score a checkpoint or ONNX model: AUC with CIs, sensitivity at the operating point, calibration, Grad-CAM",
        description="Evaluate a checkpoint on a manifest or folder and write report.md, report.json, "
        "predictions.csv, ROC/PR/confusion/calibration PNGs and Grad-CAM overlays.",
        formatter_class=_Formatter,
    )
    evaluate.add_argument(
        "checkpoint", type=Path, help="best.pt from a training run, or an exported .onnx model"
    )
    evaluate.add_argument("data", type=Path, help="manifest .csv or dataset folder")
    evaluate.add_argument(
        "--split", default="test", help="which split to score; 'all' for every sample"
    )
    evaluate.add_argument(
        "--out",
        type=Path,
        default=None,
        help="report folder (default: eval-<split> beside the checkpoint)",
    )
    evaluate.add_argument(
        "--bootstrap", type=int, default=1000, help="bootstrap resamples for confidence intervals"
    )
    evaluate.add_argument(
        "--gradcam", type=int, default=4, help="Grad-CAM overlays per kind (correct, wrong)"
    )
    evaluate.add_argument(
        "--subgroup",
        action="append",
        default=None,
        metavar="COLUMN",
        help="manifest column for the subgroup table (repeatable; default: source, modality, view)",
    )
    evaluate.add_argument(
        "--device", default="cpu", help="torch device for inference, e.g. cpu or cuda:0"
    )
    evaluate.set_defaults(handler=_run_eval)


def _run_eval(args: argparse.Namespace) -> int:
    from edgebc.train.evaluate import evaluate_checkpoint

    split = None if args.split == "all" else args.split
    out = args.out or args.checkpoint.parent / f"eval-{args.split}"
    report = evaluate_checkpoint(args.checkpoint, args.data, out, split, args.bootstrap, args.gradcam,
                                 args.subgroup or ("source", "modality", "view"), args.device)  # fmt: skip
    low, high = report["auc_positive_ci"]
    print(f"{report['positive_class']}-vs-rest AUC {report['auc_positive']:.3f} (95% CI {low:.3f}-{high:.3f}), "
          f"macro AUC {report['macro_auc']:.3f}, balanced accuracy {report['balanced_accuracy']:.3f}, ECE {report['ece']:.3f}")  # fmt: skip
    if report.get("operating_point"):
        op = report["operating_point"]
        print(
            f"at threshold {op['threshold']:.3f}: sensitivity {op['sensitivity']:.3f}, specificity {op['specificity']:.3f}"
        )
    print(f"wrote {out / 'report.md'}")
    return 0


def _add_export(commands: argparse._SubParsersAction) -> None:
    export = commands.add_parser(
        "export",
        help="checkpoint to ONNX with its model card; optional FP16, INT8 with evidence, TensorRT, Triton",
        description="Export a checkpoint to ONNX (card embedded, checked against PyTorch) and optionally "
        "FP16, INT8 (calibrated on real frames, parity report, accuracy budget, latency) , a TensorRT "
        "engine and a Triton repository. Writes export.json, export.md and MANIFEST.sha256.",
        formatter_class=_Formatter,
    )
    export.add_argument("checkpoint", type=Path, help="best.pt from a training run")
    export.add_argument("--out", type=Path, default=Path("export"), help="output folder")
    export.add_argument("--name", default="model", help="artifact base name")
    export.add_argument("--opset", type=int, default=18, help="ONNX opset")
    export.add_argument(
        "--max-batch", type=int, default=64, help="largest batch the dynamic batch axis allows"
    )
    export.add_argument(
        "--exporter",
        choices=("dynamo", "torchscript"),
        default="dynamo",
        help="torch.onnx exporter",
    )
    export.add_argument(
        "--verify",
        dest="verify_data",
        default=None,
        help="frames (manifest/folder) added to the parity inputs",
    )
    export.add_argument(
        "--fp16", action="store_true", help="also write an FP16 model (float32 in/out) for GPUs"
    )
    export.add_argument(
        "--int8",
        action="store_true",
        help="also write a static INT8 model (needs --calibration and --check)",
    )
    export.add_argument(
        "--calibration", default=None, help="calibration frames: manifest, dataset folder or video"
    )
    export.add_argument(
        "--calibration-split",
        default="train",
        help="split of a manifest to calibrate on ('all' for every sample)",
    )
    export.add_argument(
        "--calibration-size", type=int, default=200, help="calibration frames to use"
    )
    export.add_argument(
        "--calibration-method",
        choices=("minmax", "entropy", "percentile"),
        default="minmax",
        help="calibration method",
    )
    export.add_argument(
        "--check",
        dest="check_data",
        default=None,
        help="labelled frames for the FP32 vs INT8 parity report",
    )
    export.add_argument(
        "--check-split", default="val", help="split of --check to use ('all' for every sample)"
    )
    export.add_argument(
        "--check-count", type=int, default=500, help="labelled frames to check with"
    )
    export.add_argument(
        "--no-int8-search",
        dest="int8_search",
        action="store_false",
        help="quantize QDQ per-channel only instead of timing every format and keeping the fastest within budget",
    )
    export.add_argument(
        "--tensorrt",
        choices=("fp16", "int8"),
        default=None,
        help="also build a TensorRT engine (on the target device)",
    )
    export.add_argument(
        "--triton", action="store_true", help="also write a Triton model repository"
    )
    export.set_defaults(handler=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    from edgebc.export.pipeline import ExportOptions, run_export

    def split(value):
        return None if value == "all" else value

    options = ExportOptions(
        out_dir=args.out, name=args.name, opset=args.opset, max_batch=args.max_batch, exporter=args.exporter,
        verify_data=args.verify_data, fp16=args.fp16, int8=args.int8, calibration=args.calibration,
        calibration_size=args.calibration_size, calibration_split=split(args.calibration_split),
        calibration_method=args.calibration_method, check_data=args.check_data, check_split=split(args.check_split),
        check_count=args.check_count, int8_search=args.int8_search, tensorrt=args.tensorrt, triton=args.triton,
    )  # fmt: skip
    report = run_export(args.checkpoint, options)
    print((args.out / "export.md").read_text().rstrip())
    print(
        f"wrote {args.out} ({', '.join(k for k in ('onnx', 'fp16', 'int8', 'tensorrt', 'triton') if k in report)} + MANIFEST.sha256)"
    )
    return 0


def _add_classify(commands: argparse._SubParsersAction) -> None:
    classify = commands.add_parser(
        "classify",
        help="classify image files, folders, videos or DICOM with an exported model; CSV or JSON Lines out",
        description="Classify every frame of the inputs with an exported model (.onnx, or a TensorRT .engine) "
        "through the shared preprocessing, the quality gate and the model card's temperature and "
        "threshold. Unreadable inputs are reported and skipped; the exit status is 1 when any failed.",
        formatter_class=_Formatter,
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
    classify.set_defaults(handler=_run_classify)


def _run_classify(args: argparse.Namespace) -> int:
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
        classifier = _auto_region_classifier(backend, args.inputs)
    with tqdm(desc="classify", unit="frame", disable=None) as bar:
        written, errors = classify_inputs(classifier, args.inputs, args.out, args.batch, args.stride,
                                          on_error=lambda m: print(f"edgebc: error: {m}", file=sys.stderr), progress=bar.update)  # fmt: skip
    print(
        f"wrote {args.out}: {written} frames classified with {backend.name}, {errors} inputs unreadable"
    )
    return 1 if errors else 0


def _auto_region_classifier(backend: Backend, inputs: Sequence[str]) -> FrameClassifier:
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
