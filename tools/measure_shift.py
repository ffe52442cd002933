"""Measure scanner-shift detection for one trained model: does it tell an unseen scanner's frames
from held-out frames of its own, at what false-alarm rate, at what cost, and are the frames it
flags the ones the model gets wrong?

The checkpoint (read, never written) gets its training statistics in a scratch copy, exactly as
finalisation would give them (train/shift_stats.py: training frames of its own configuration,
thresholds from its calibration split, else validation). Then every frame of `--shifted-source`
(all splits) and the held-out test frames of the sources it trained on are scored by
edgebc.shift's runtime scorer; the features come from the checkpoint in PyTorch (the exported
model gives the same within the export's tolerance: tests/test_shift.py).

    .venv/bin/python tools/measure_shift.py --checkpoint /work/main/runs/cross-site-cal/busi-only/best.pt \\
        --manifest /work/main/runs/sites-cal.csv --shifted-source busbra --threads 1
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from edgebc import metrics
from edgebc.decision import DecisionRule
from edgebc.shift import ShiftScorer, image_statistics


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown CPU"
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--manifest", required=True, help="the split manifest (both sites)")
    parser.add_argument(
        "--shifted-source", default="busbra", help="the scanner the model never saw"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--window", type=int, default=30, help="frames in a simulated stream")
    parser.add_argument("--repeats", type=int, default=300, help="timed repetitions per frame cost")
    parser.add_argument("--out", type=Path, default=None, help="write the numbers as JSON here")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from edgebc.config import from_mapping
    from edgebc.train.config import TrainConfig
    from edgebc.train.shift_stats import add_training_statistics, cached_split, frame_measurements

    with tempfile.TemporaryDirectory() as scratch:
        copy = Path(scratch) / "with-stats.pt"
        checkpoint = add_training_statistics(args.checkpoint, copy, args.manifest)
    card = checkpoint.card
    stats = card.training_statistics
    if stats is None:
        raise SystemExit("the checkpoint got no training statistics (not a one-input model?)")
    resolved = {
        **checkpoint.config,
        "data": {**checkpoint.config["data"], "manifest": args.manifest},
    }
    own = from_mapping(TrainConfig, resolved, source="checkpoint configuration")
    shifted = from_mapping(TrainConfig, {**resolved, "data": {**resolved["data"], "sources": [args.shifted_source]}},
                           source="shifted configuration")  # fmt: skip
    sets = {"held_out": cached_split(own, "test")}
    shifted_parts = [
        cached_split(shifted, role) for role in ("train", "val", "calibration", "test")
    ]
    sets["shifted"] = (torch.cat([p[0] for p in shifted_parts if p[0] is not None]),
                       [u for p in shifted_parts for u in p[1]])  # fmt: skip
    labels = {}
    for name, config in (("held_out", own), ("shifted", shifted)):
        from edgebc.train.loop import select_samples

        task = config.data.resolved_task()
        roles = ("test",) if name == "held_out" else ("train", "val", "calibration", "test")
        labels[name] = task.encode(s.label for r in roles for s in select_samples(config, r))
    scorer = ShiftScorer(stats)
    rule = DecisionRule.of(card)
    measured = {}
    for name, (images, units) in sets.items():
        image_stats, features, logits = frame_measurements(checkpoint, images)
        parts = scorer.parts(image_stats, features)
        measured[name] = {"parts": parts, "scores": scorer.combine(parts), "units": list(units),
                          "probs": metrics.softmax(logits, card.temperature), "y": labels[name]}  # fmt: skip
    held, out = measured["held_out"], measured["shifted"]
    t = stats.thresholds
    is_shifted = np.r_[np.zeros(len(held["scores"])), np.ones(len(out["scores"]))].astype(bool)
    scores = np.r_[held["scores"], out["scores"]]
    parts = np.r_[held["parts"], out["parts"]]
    auroc = metrics.roc_auc(is_shifted, scores)
    low, high = metrics.bootstrap_ci(metrics.roc_auc, is_shifted, scores, 1000, seed=0)
    flagged = scores > t.frame
    probs = np.r_[held["probs"], out["probs"]]
    y = np.r_[held["y"], out["y"]]
    decided = rule.indices(probs)
    wrong = decided != y
    positive = y == card.positive

    def group(mask: np.ndarray) -> dict[str, object]:
        n = int(mask.sum())
        both = len(set(positive[mask].tolist())) == 2
        return {"frames": n, "error_rate": round(float(wrong[mask].mean()), 3) if n else None,
                "auc": round(metrics.roc_auc(positive[mask], probs[mask, card.positive]), 3) if both else None}  # fmt: skip

    # the device's per-frame cost: image statistics of the model input and the three distances
    tensor = sets["shifted"][0][:1].numpy()
    feature = np.asarray(frame_measurements(checkpoint, sets["shifted"][0][:1])[1])
    timings = []
    for _ in range(args.repeats):
        started = time.perf_counter()
        scorer.parts(image_statistics(tensor, card.preprocess), feature)
        timings.append((time.perf_counter() - started) * 1000.0)
    report = {
        "checkpoint": str(args.checkpoint), "arch": card.arch, "training_frames": stats.training_frames,
        "thresholds": {"frame": t.frame, "window": t.window, "false_alarm_rate": t.false_alarm_rate,
                       "fitted_on": t.fitted_on, "frames": t.frames, "units": t.units},
        "held_out_frames": len(held["scores"]), "shifted_frames": len(out["scores"]),
        "auroc": round(auroc, 3), "auroc_ci95": [round(low, 3), round(high, 3)],
        "auroc_by_part": {n: round(metrics.roc_auc(is_shifted, parts[:, k]), 3)
                          for k, n in enumerate(("image", "features", "residual"))},
        "score_parts": list(stats.parts),
        "auroc_all_three": round(metrics.roc_auc(is_shifted, parts.mean(axis=1)), 3),
        "false_alarm_rate_held_out": round(float(flagged[~is_shifted].mean()), 3),
        "stream": _streams(held["scores"], out["scores"], t.window, args.window),
        "cases": _cases(held, out, t.window),
        "flagged_rate_shifted": round(float(flagged[is_shifted].mean()), 3),
        "errors": {"flagged": group(flagged), "unflagged": group(~flagged),
                   "shifted_flagged": group(flagged & is_shifted), "shifted_unflagged": group(~flagged & is_shifted)},
        "cost_ms_median": round(float(np.median(timings)), 3), "cost_ms_p90": round(float(np.quantile(timings, 0.9)), 3),
        "cpu": cpu_name(), "threads": args.threads,
        "card_statistics_json_bytes": len(json.dumps(replace(card, training_statistics=stats).to_dict()["training_statistics"])),
    }  # fmt: skip
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n", encoding="utf-8")
    return 0


def _cases(held: dict[str, Any], shifted: dict[str, Any], threshold: float) -> dict[str, object]:
    """A cart's window holds one patient's frames: the share of cases whose mean frame score is
    above the window threshold, on the unseen site and on held-out cases of the model's own."""

    def rate(measured: dict[str, Any]) -> tuple[float, int]:
        by_case: dict[str, list[float]] = {}
        for unit, score in zip(measured["units"], measured["scores"], strict=True):
            by_case.setdefault(unit, []).append(float(score))
        means = np.array([np.mean(v) for v in by_case.values()])
        return round(float(np.mean(means > threshold)), 3), len(means)

    (held_rate, held_n), (shifted_rate, shifted_n) = rate(held), rate(shifted)
    return {"threshold": threshold, "false_alarm_rate_held_out": held_rate, "held_out_cases": held_n,
            "flagged_rate_shifted": shifted_rate, "shifted_cases": shifted_n}  # fmt: skip


def _streams(held: np.ndarray, shifted: np.ndarray, threshold: float, length: int,
             draws: int = 2000) -> dict[str, object]:  # fmt: skip
    """Streams of `length` frames drawn at random from each set, mixing patients (a day at the cart
    rather than one patient's cine): how often the window's mean crosses the window threshold."""
    rng = np.random.default_rng(0)

    def rate(scores: np.ndarray) -> float | None:
        if len(scores) < length:
            return None
        means = [rng.choice(scores, length, replace=False).mean() for _ in range(draws)]
        return round(float(np.mean(np.asarray(means) > threshold)), 3)

    return {"window": length, "threshold": threshold, "false_alarm_rate_held_out": rate(held),
            "flagged_rate_shifted": rate(shifted)}  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
