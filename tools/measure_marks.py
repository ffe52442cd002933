"""Measure burned-in mark removal (issue 17, the caliper shortcut): its cost, how much it removes,
and what it changes in the models.

    python tools/measure_marks.py cost --data runs/sites-cal.csv [--frames 60]
    python tools/measure_marks.py prevalence --data runs/sites-cal.csv
    python tools/measure_marks.py montage --data runs/sites-cal.csv --out /tmp/marks [--frames 6]
    python tools/measure_marks.py models --data runs/sites-cal.csv \
        --before runs/remedies/baseline --after runs/remedies/marks [--arms busi-only,busbra-only]

cost: detection + inpainting (edgebc.marks) per frame at native resolution, OpenCV on one thread;
median and 90th percentile milliseconds per site. prevalence: per site, how many frames have
marks, the share of pixels painted, and how the count agrees with the audit's `annotations` flag.
montage: before/after pictures of a few frames per site (marks in red, then the painted frame),
written OUTSIDE the repository (they reproduce data set images, which are never committed).
models: for each arm (ARM/best.pt under --before and --after; each checkpoint preprocesses with
its own card, so the --after model sees painted frames), on each site's test split: AUC of the
task's positive class on annotated and on clean frames, with 95% bootstrap intervals, and
Grad-CAM's mean share of heat on the lesion (BUSI's lesion masks, BUS-BRA's bbox). Annotated
means the audit flagged the frame (`annotations` = yes), except on --detector-sites (BUS-BRA by
default, whose flag misses most of its dimmer calipers), where it means the detector finds at
least --min-marks marks.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from edgebc import metrics
from edgebc.data import Sample, read_dataset
from edgebc.decode import read_image
from edgebc.marks import find_marks, remove_marks

REPO = Path(__file__).resolve().parent.parent


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("cost", "prevalence", "montage", "models"):
        p = sub.add_parser(name)
        p.add_argument("--data", required=True, type=Path, help="manifest with a source column")
        p.add_argument("--frames", type=int, default=0, help="frames per site (0: all)")
        p.add_argument("--json", type=Path, help="also write the numbers here")
        if name == "montage":
            p.add_argument("--out", required=True, type=Path, help="folder outside the repo")
        if name == "models":
            p.add_argument("--before", required=True, type=Path)
            p.add_argument("--after", required=True, type=Path)
            p.add_argument("--arms", default="busi-only,busbra-only")
            p.add_argument("--split", default="test",
                           help="the split scored, or 'unseen': every frame of the sites an arm X-only never saw")  # fmt: skip
            # BUS-BRA's audit flag misses most of its (dimmer) calipers: split it by the detector.
            p.add_argument("--detector-sites", default="busbra")
            p.add_argument("--min-marks", type=int, default=4)
            p.add_argument("--boot", type=int, default=1000)
    args = parser.parse_args(argv)
    cv2.setNumThreads(1)
    samples = read_dataset(args.data)
    by_site = _by_site(samples, args.frames)
    if args.command == "cost":
        result: dict[str, Any] = {"cpu": cpu_name(), "sites": measure_cost(by_site)}
        for site, row in result["sites"].items():
            print(f"{site}: {row['frames']} frames, median {row['median_ms']:.2f} ms, "
                  f"p90 {row['p90_ms']:.2f} ms, median size {row['median_size']}  ({result['cpu']})")  # fmt: skip
    elif args.command == "prevalence":
        result = measure_prevalence(by_site)
        for site, row in result.items():
            print(f"{site}: {row['with_marks']}/{row['frames']} frames with marks "
                  f"({row['share_with_marks']:.1%}; >= 2 marks: {row['with_two_or_more']}), pixels painted mean {row['mean_fraction']:.3%} "
                  f"(max {row['max_fraction']:.2%}); audit flag yes: {row['audit_yes']}, "
                  f"of those with marks found: {row['audit_yes_found']}")  # fmt: skip
    elif args.command == "montage":
        result = {"written": [str(p) for p in write_montages(by_site, args.out)]}
        print("\n".join(result["written"]))
    else:
        if args.split != "unseen":
            samples = [s for s in samples if s.split == args.split]
        result = measure_models(samples, args.before, args.after, args.arms.split(","),
                                args.detector_sites.split(","), args.min_marks, args.boot,
                                unseen_only=args.split == "unseen")  # fmt: skip
        print(render_models(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=float) + "\n")
    return 0


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:  # fmt: skip
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _by_site(samples: Sequence[Sample], frames: int) -> dict[str, list[Sample]]:
    sites: dict[str, list[Sample]] = {}
    for sample in samples:
        sites.setdefault(sample.source or "unknown", []).append(sample)
    if frames > 0:  # an even spread over the manifest, not its first rows
        sites = {k: v[:: max(1, len(v) // frames)][:frames] for k, v in sites.items()}
    return sites


def measure_cost(by_site: dict[str, list[Sample]]) -> dict[str, dict[str, Any]]:
    """Milliseconds of find_marks + remove_marks per frame (decoding not counted)."""
    out = {}
    for site, samples in by_site.items():
        images = [read_image(s.path) for s in samples]
        remove_marks(images[0])  # warm-up: OpenCV's first call allocates
        times = []
        for image in images:
            start = time.perf_counter()
            remove_marks(image, find_marks(image))
            times.append((time.perf_counter() - start) * 1000.0)
        sizes = sorted(f"{i.shape[1]}x{i.shape[0]}" for i in images)
        out[site] = {
            "frames": len(images),
            "median_ms": statistics.median(times),
            "p90_ms": float(np.percentile(times, 90)),
            "median_size": sizes[len(sizes) // 2],
        }
    return out


def measure_prevalence(by_site: dict[str, list[Sample]]) -> dict[str, dict[str, Any]]:
    out = {}
    for site, samples in by_site.items():
        found = [find_marks(read_image(s.path)) for s in samples]
        flags = [dict(s.extra).get("annotations") == "yes" for s in samples]
        fractions = np.array([m.fraction for m in found])
        has = np.array([m.count > 0 for m in found])
        out[site] = {
            "frames": len(samples),
            "with_marks": int(has.sum()),
            # one mark alone is often the vendor's logo in a corner; calipers come in twos
            "with_two_or_more": int(sum(m.count >= 2 for m in found)),
            "share_with_marks": float(has.mean()),
            "mean_fraction": float(fractions.mean()),
            "mean_fraction_marked": float(fractions[has].mean()) if has.any() else 0.0,
            "max_fraction": float(fractions.max()),
            "median_count_marked": float(np.median([m.count for m in found if m.count > 0] or [0])),
            "audit_yes": int(sum(flags)),
            "audit_yes_found": int(sum(f and h for f, h in zip(flags, has, strict=True))),
        }
    return out


def write_montages(by_site: dict[str, list[Sample]], out: Path) -> list[Path]:
    """One picture per site: each frame as it is with its marks in red, beside the painted frame."""
    out = out.resolve()
    if out == REPO or REPO in out.parents:
        raise SystemExit(f"{out}: montages reproduce data set images; write them outside {REPO}")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for site, samples in by_site.items():
        rows = []
        for sample in samples:
            image = read_image(sample.path)
            marks = find_marks(image)
            grey = _grey8(image)
            shown = cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR)
            shown[marks.mask > 0] = (0, 0, 255)
            row = np.hstack([shown, cv2.cvtColor(_grey8(remove_marks(image, marks)), cv2.COLOR_GRAY2BGR)])  # fmt: skip
            cv2.putText(row, f"{sample.path.name}: {marks.count} marks, {marks.fraction:.2%}",
                        (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 255, 0), 1, cv2.LINE_AA)  # fmt: skip
            rows.append(row)
        width = max(r.shape[1] for r in rows)
        rows = [cv2.copyMakeBorder(r, 0, 4, 0, width - r.shape[1], cv2.BORDER_CONSTANT) for r in rows]  # fmt: skip
        path = out / f"marks-{site}.png"
        cv2.imwrite(str(path), np.vstack(rows))
        written.append(path)
    return written


def _grey8(image: np.ndarray) -> np.ndarray:
    from edgebc.decode import to_grey_uint8

    return to_grey_uint8(image)


def annotated(sample: Sample, sites_with_flags: set[str], min_marks: int) -> bool:
    if sample.source in sites_with_flags:
        return dict(sample.extra).get("annotations") == "yes"
    return find_marks(read_image(sample.path)).count >= min_marks


def lesion_mask(sample: Sample, prep: Any) -> np.ndarray | None:
    """Lesion coverage on the model input: the site's mask file, else its bbox, else None."""
    from dataclasses import replace

    from edgebc.preprocess import resize_to_input
    from edgebc.train.dataset import lesion_mask_on_input

    if sample.masks:
        return lesion_mask_on_input(sample, prep)
    box = sample.lesion_box
    if box is None:
        return None
    height, width = read_image(sample.path).shape[:2]
    mask = np.zeros((height, width), np.uint8)
    x, y, w, h = box
    mask[y : y + h, x : x + w] = 255
    return resize_to_input(mask, replace(prep, pad_value=0.0)).astype(np.float32) / 255.0


def measure_models(samples: Sequence[Sample], before: Path, after: Path, arms: Sequence[str],
                   detector_sites: Sequence[str], min_marks: int,
                   n_boot: int, unseen_only: bool = False) -> dict[str, Any]:  # fmt: skip
    from edgebc.optional import require
    from edgebc.preprocess import preprocess_chw
    from edgebc.train.gradcam import lesion_attention
    from edgebc.train.models import model_spec
    from edgebc.train.torch_backend import TorchBackend

    torch = require("torch", "tools/measure_marks.py models")
    torch.set_num_threads(1)
    flagged_sites = {s.source or "unknown" for s in samples} - set(detector_sites)
    marked = {s.path: annotated(s, flagged_sites, min_marks) for s in samples}
    result: dict[str, Any] = {
        "split_by": {"audit flag": sorted(flagged_sites), "detector": sorted(detector_sites)},
        "min_marks": min_marks,
        "rows": [],
    }
    for arm in arms:
        for when, folder in (("before", before), ("after", after)):
            checkpoint = folder / arm / "best.pt"
            if not checkpoint.is_file():
                result["rows"].append({"arm": arm, "when": when, "missing": str(checkpoint)})
                continue
            backend = TorchBackend(checkpoint, "cpu", threads=1)
            card, prep = backend.card, backend.card.preprocess
            layer = backend.module.get_submodule(model_spec(card.arch).cam_layer)
            sites = sorted({s.source or "unknown" for s in samples})
            if unseen_only:  # leave-one-site-out: an arm "X-only" is scored on the other sites only
                sites = [site for site in sites if arm != f"{site}-only"]
            for site in sites:
                keep, _ = card.task.partition([s.label for s in samples if s.source == site], site)
                chosen = [s for s, k in zip([s for s in samples if s.source == site], keep, strict=True) if k]  # fmt: skip
                images = np.stack([preprocess_chw(read_image(s.path), prep) for s in chosen])
                y = card.task.encode(s.label for s in chosen)
                logits = np.concatenate([backend.run(images[i : i + 32]) for i in range(0, len(images), 32)])  # fmt: skip
                scores = metrics.softmax(logits, card.temperature)[:, card.positive]
                positive = (y == card.positive).astype(int)
                row: dict[str, Any] = {"arm": arm, "when": when, "marks": prep.marks, "site": site}
                for group, want in (("annotated", True), ("clean", False)):
                    pick = np.array([marked[s.path] == want for s in chosen])
                    units = [s.unit for s, p in zip(chosen, pick, strict=True) if p]
                    row[group] = _auc_row(positive[pick], scores[pick], units, n_boot)
                masks = [lesion_mask(s, prep) for s in chosen]
                row["lesion_share"] = lesion_attention(
                    backend.module, layer, torch.from_numpy(images), masks, y
                )
                result["rows"].append(row)
    return result


def _auc_row(
    positive: np.ndarray, scores: np.ndarray, units: Sequence[str], n_boot: int
) -> dict[str, Any]:
    """AUC with a 95 % interval that resamples cases (a patient's frames together)."""
    n, n_pos = len(positive), int(positive.sum())
    if n_pos == 0 or n_pos == n:
        return {"n": n, "positives": n_pos, "auc": float("nan"), "ci": [float("nan")] * 2}
    auc = metrics.roc_auc(positive, scores)
    low, high = metrics.cluster_bootstrap_ci(
        metrics.roc_auc, list(units), positive, scores, n_boot=n_boot
    )
    return {"n": n, "positives": n_pos, "auc": auc, "ci": [low, high]}


def render_models(result: dict[str, Any]) -> str:
    lines = [
        "| arm | model | site | AUC annotated (n) | AUC clean (n) | Grad-CAM on lesion (area) |",
        "|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        if "missing" in row:
            lines.append(f"| {row['arm']} | {row['when']} | missing: {row['missing']} | | | |")
            continue
        cells = [
            f"{r['auc']:.3f} [{r['ci'][0]:.3f}, {r['ci'][1]:.3f}] ({r['n']})"
            for r in (row["annotated"], row["clean"])
        ]
        share = row["lesion_share"]
        cam = f"{share['mean_share_on_lesion']:.3f} ({share['mean_lesion_area']:.3f}, n={share['frames']})"  # fmt: skip
        lines.append(f"| {row['arm']} | {row['when']} (marks={row['marks']}) | {row['site']} | "
                     f"{cells[0]} | {cells[1]} | {cam} |")  # fmt: skip
    split = result["split_by"]
    lines.append(f"Annotated = the audit flag on {', '.join(split['audit flag']) or 'no site'}; "
                 f"at least {result['min_marks']} marks found on {', '.join(split['detector'])}.")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
