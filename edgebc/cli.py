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

from edgebc import __version__

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
