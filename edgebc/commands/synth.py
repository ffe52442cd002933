"""`edgebc synth`: write a synthetic phantom dataset."""

from __future__ import annotations

import argparse
from pathlib import Path

from edgebc.commands import HelpFormatter


def register_synth(commands: argparse._SubParsersAction) -> None:
    synth = commands.add_parser(
        "synth",
        help="write a labelled synthetic phantom dataset (ultrasound, mammography, screens, cine)",
        description="Write B-mode ultrasound phantoms (and optionally mammography phantoms, scanner "
        "screens and cine clips) with masks and a manifest.csv. Deterministic by --seed.",
        formatter_class=HelpFormatter,
    )
    synth.add_argument("out", type=Path, help="output folder (created if missing)")
    synth.add_argument(
        "--n-per-class",
        type=int,
        default=None,
        help="images per class (normal, benign, malignant); default 20, or 0 with --paired-cases",
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
    synth.add_argument(
        "--mammo-women",
        type=int,
        default=0,
        help="framed mammogram sets to write (L/R x CC/MLO per woman, labels and markers, "
        "a view column and truth.json)",
    )
    synth.add_argument(
        "--mammo-bits",
        type=int,
        choices=(8, 12),
        default=8,
        help="framed mammogram depth: 8-bit PNG, or 12-bit values in a 16-bit PNG (as FFDM)",
    )
    synth.add_argument(
        "--paired-cases",
        type=int,
        default=0,
        help="paired cases to write (one breast each: ultrasound frames and its CC and MLO views "
        "of one lesion, a patient_id per case; OUT/paired)",
    )
    synth.add_argument(
        "--us-signal",
        type=float,
        default=1.0,
        help="paired cases: how much of the class the ultrasound lesion shows (1 follows the "
        "class, 0 is drawn independently of it)",
    )
    synth.add_argument(
        "--mg-signal", type=float, default=1.0, help="paired cases: the same for the mammograms"
    )
    synth.add_argument(
        "--us-per-case", type=int, default=1, help="paired cases: ultrasound frames per case"
    )
    synth.set_defaults(handler=run_synth)


def run_synth(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from edgebc.synth.dataset import SynthPlan, write_phantom_dataset

    plan = SynthPlan(
        (0 if args.paired_cases else 20) if args.n_per_class is None else args.n_per_class,
        args.size,
        args.seed,
        args.modality,
        args.screens,
        args.cine,
        args.cine_frames,
        mammo_women=args.mammo_women,
        mammo_bits=args.mammo_bits,
        paired_cases=args.paired_cases,
        us_signal=args.us_signal,
        mg_signal=args.mg_signal,
        paired_us_images=args.us_per_case,
    )
    total = (plan.n_per_class * 3 + plan.cine_per_class * 3 + plan.mammo_women
             + plan.paired_cases)  # fmt: skip
    with tqdm(total=total, desc="synth", unit="item", disable=None) as bar:
        manifest = write_phantom_dataset(args.out, plan, progress=bar.update)
    print(f"wrote {manifest}")
    return 0
