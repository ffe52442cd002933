"""`edgebc data audit|split|merge`: dataset audits, group-aware splits, multi-site manifests."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from edgebc.commands import HelpFormatter

log = logging.getLogger("edgebc")


def register_data(commands: argparse._SubParsersAction) -> None:
    data = commands.add_parser(
        "data",
        help="audit a dataset or split it into train/val/test and folds",
        description="Dataset tools. PATH may be a manifest .csv, a BUSI folder, a mini-MIAS folder "
        "or any class-per-folder tree.",
        formatter_class=HelpFormatter,
    )
    actions = data.add_subparsers(dest="action", metavar="ACTION", required=True)
    audit = actions.add_parser(
        "audit",
        help="find duplicates, label conflicts, unreadable, colour and annotated frames",
        description="Audit a dataset and write audit.json, audit.md and manifest.clean.csv "
        "(near-duplicates share a `group` id so later splits keep them together).",
        formatter_class=HelpFormatter,
    )
    audit.add_argument("path", type=Path, help="dataset folder or manifest .csv")
    audit.add_argument(
        "--out",
        type=Path,
        default=Path("runs/audit"),
        help="folder for the report and cleaned manifest",
    )
    audit.add_argument(
        "--conflicts",
        choices=("drop", "keep"),
        default="drop",
        help="what the cleaned manifest does with images whose duplicates carry another class",
    )
    audit.add_argument("--workers", type=int, default=4, help="decoding threads")
    audit.set_defaults(handler=run_audit)
    split = actions.add_parser(
        "split",
        help="stratified, group-aware train/val/test split or k folds, written as a manifest",
        description="Split so that no near-duplicate group and no patient straddles two sides. "
        "Uses the manifest's `group` column (from `edgebc data audit`) when present; otherwise "
        "finds near-duplicates first.",
        formatter_class=HelpFormatter,
    )
    split.add_argument("path", type=Path, help="dataset folder or manifest .csv")
    split.add_argument("--out", type=Path, default=Path("runs/split.csv"), help="manifest to write")
    split.add_argument(
        "--val", type=float, default=0.15, help="validation fraction (0 with --folds)"
    )
    split.add_argument("--test", type=float, default=0.15, help="held-out test fraction")
    split.add_argument(
        "--folds", type=int, default=0, help="k folds over the non-test data (0: none)"
    )
    split.add_argument(
        "--calibration",
        type=float,
        default=0.0,
        help="fraction held out as a calibration side: the temperature and the operating point "
        "(with its sensitivity bound) are fitted there, on cases early stopping never saw",
    )
    split.add_argument(
        "--seed", type=int, default=0, help="random seed; the same seed gives the same split"
    )
    split.set_defaults(handler=run_split)
    merge = actions.add_parser(
        "merge",
        help="one manifest over several sites (a source column), each site split on its own first",
        description="Concatenate the manifests of several sites into one, naming each sample's site "
        "in the source column (the manifest's own source, or SITE=PATH). Split each site first "
        "(edgebc data split), so that every site keeps its own train/val/test by patient or group. "
        "Refuses a file listed twice and a patient id found at two sites.",
        formatter_class=HelpFormatter,
    )
    merge.add_argument("manifests", nargs="+", metavar="[SITE=]PATH",
                       help="a site's manifest .csv or folder; SITE= names the site when the manifest has no source column")  # fmt: skip
    merge.add_argument("--out", type=Path, required=True, help="manifest to write")
    merge.set_defaults(handler=run_merge)


def run_audit(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from edgebc.data import read_dataset
    from edgebc.data.curation import audit_samples, write_audit

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
    if report.mammography:
        mg = report.mammography
        views = ", ".join(f"{view} {n}" for view, n in mg["views"].items())
        print(
            f"  mammograms: {views}; {len(mg['laterality_mismatches'])} laterality mismatches, "
            f"{len(mg['no_breast'])} without a breast (see the report)"
        )
    print(
        f"wrote {paths['markdown']}, {paths['json']}, {paths['manifest']} ({report.cleaning['kept']} kept)"
    )
    return 0


def run_split(args: argparse.Namespace) -> int:
    from edgebc.data import write_manifest
    from edgebc.data.split import SplitPlan, split_dataset, split_summary

    plan = SplitPlan(
        val=0.0 if args.folds else args.val, test=args.test, folds=args.folds, seed=args.seed,
        calibration=args.calibration,
    )  # fmt: skip
    result = split_dataset(args.path, plan)
    write_manifest(result, args.out)
    for side, counts in split_summary(result).items():
        print(f"  {side:6s} " + "  ".join(f"{label}={n}" for label, n in counts.items()))
    print(f"wrote {args.out}")
    return 0


def run_merge(args: argparse.Namespace) -> int:
    from collections import Counter

    from edgebc.data import read_dataset, write_manifest
    from edgebc.data.manifest import merge_sites
    from edgebc.errors import DataLayoutError

    sites = []
    for item in args.manifests:
        name, sep, path = item.partition("=")
        if not sep:
            name, path = "", item
        samples = read_dataset(Path(path))
        sources = {s.source for s in samples if s.source}
        if not name:
            if len(sources) != 1:
                raise DataLayoutError(
                    f"{path}: name its site as SITE={path} (its source column has {sorted(sources) or 'nothing'})"
                )
            name = sources.pop()
        sites.append((name, samples))
    merged = merge_sites(sites)
    write_manifest(merged, args.out)
    for site, count in Counter(s.source for s in merged).items():
        splits = Counter(s.split or "-" for s in merged if s.source == site)
        print(
            f"  {site}: {count} images ({', '.join(f'{k} {v}' for k, v in sorted(splits.items()))})"
        )
    print(f"wrote {args.out}")
    return 0
