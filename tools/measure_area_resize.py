"""What reading area downscales from a summed-area table (edgebc.area) changed against
cv2.resize's INTER_AREA, which it replaced: the pixels of the quality gate's copy and of a model's
input, and a trained model's answers, over every BUSI and BUS-BRA frame.

    python tools/measure_area_resize.py --model runs/small-us/export/model.onnx \\
        [--data ../shared/data] [--out report.json]

Every frame goes through the model's own preprocessing (edgebc.preprocess.preprocess_chw) twice,
as it is and with the area resize put back to cv2.resize, and through the ultrasound gate's copy
(edgebc.quality.thumbnail) both ways. Reported per set: frames, the share of pixels that differ and
the largest difference (grey levels), for the gate's copy and the model's input; then the model's
largest probability difference and how many decisions (the card's decision rule) changed.
Accuracy only: the cost is timed by benchmarks/pipeline.py. The gate's verdicts are compared frame
by frame with tools/measure_quality_gate.py --verdicts (two versions of the code).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import cv2
import numpy as np

from edgebc import preprocess, quality
from edgebc.atomic import atomic_write_text
from edgebc.backends import Backend, open_backend
from edgebc.data.manifest import read_manifest
from edgebc.data.readers import read_busi
from edgebc.data.records import Sample
from edgebc.decision import DecisionRule
from edgebc.decode import read_image
from edgebc.metrics import softmax
from edgebc.preprocess import preprocess_chw, to_channels
from edgebc.quality import GATE_SIZE, thumbnail


def opencv_area(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """The area resize before edgebc.area: cv2.resize alone."""
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)


def sets(data: Path) -> Iterator[tuple[str, list[Sample]]]:
    if (data / "busi").is_dir():
        yield "BUSI", read_busi(data / "busi")
    if (data / "busbra" / "manifest.csv").is_file():
        yield "BUS-BRA", read_manifest(data / "busbra" / "manifest.csv")


def differences(delta: np.ndarray) -> tuple[int, int, float]:
    """(pixels differing, pixels, largest difference) of a difference in grey levels."""
    return int(np.count_nonzero(delta > 0.5)), int(delta.size), float(np.rint(delta.max()))


def measure_set(samples: list[Sample], backend: Backend, rule: DecisionRule) -> dict:
    prep = backend.card.preprocess
    scale = 255.0 * max(prep.std)  # the tensor's unit back in grey levels
    gate = [0, 0, 0.0]
    model = [0, 0, 0.0]
    largest_dp, changed, frames = 0.0, 0, 0
    for sample in samples:
        image = read_image(sample.path)
        grey = to_channels(image, 1)
        with mock.patch.object(quality, "area_resize", opencv_area):
            gate_before = thumbnail(grey, GATE_SIZE)
        with mock.patch.object(preprocess, "area_resize", opencv_area):
            before = preprocess_chw(image, prep)
        after = preprocess_chw(image, prep)
        gate_delta = np.abs(thumbnail(grey, GATE_SIZE).astype(np.float64) - gate_before)
        model_delta = np.abs(after.astype(np.float64) - before) * scale
        for totals, delta in ((gate, gate_delta), (model, model_delta)):
            differ, size, largest = differences(delta)
            totals[0], totals[1], totals[2] = totals[0] + differ, totals[1] + size, max(totals[2], largest)  # fmt: skip
        logits = backend.run(np.stack([before, after]))
        probs = softmax(logits, backend.card.temperature)
        largest_dp = max(largest_dp, float(np.abs(probs[0] - probs[1]).max()))
        changed += rule.decide(probs[0]) != rule.decide(probs[1])
        frames += 1
    return {
        "frames": frames,
        "gate_copy": {"pixels_differing": gate[0], "pixels": gate[1], "largest": gate[2]},
        "model_input": {"pixels_differing": model[0], "pixels": model[1], "largest": model[2]},
        "largest_probability_difference": largest_dp,
        "decisions_changed": changed,
    }


def markdown(report: dict) -> str:
    lines = [
        f"model {report['model']}",
        "",
        "| set | frames | gate's copy: pixels differing, largest | model's input: pixels differing, "
        "largest | largest probability difference | decisions changed |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in report["sets"].items():
        cells = [name, str(row["frames"])]
        for part in ("gate_copy", "model_input"):
            p = row[part]
            share = p["pixels_differing"] / max(1, p["pixels"])
            cells.append(
                f"{p['pixels_differing']} of {p['pixels']} ({share:.1e}), {p['largest']:g}"
            )
        cells += [f"{row['largest_probability_difference']:.1e}", str(row["decisions_changed"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, required=True, help="a trained classifier (.onnx)")
    parser.add_argument(
        "--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data"
    )
    parser.add_argument("--out", type=Path, default=None, help="also write the report as JSON")
    args = parser.parse_args(argv)
    cv2.setNumThreads(1)
    backend = open_backend(args.model, threads=1)
    prep = backend.card.preprocess
    if backend.card.lineage.get("input_crop"):
        parser.error(f"{args.model} reads lesion-localiser crops: this tool measures whole frames")
    if prep.interpolation != "area":
        parser.error(f"{args.model} resizes with {prep.interpolation!r}: area resizing is not used")
    rule = DecisionRule.of(backend.card)
    found = list(sets(args.data))
    if not found:
        parser.error(f"no BUSI or BUS-BRA under {args.data}")
    report = {
        "model": str(args.model),
        "sets": {name: measure_set(samples, backend, rule) for name, samples in found},
    }
    print(markdown(report))
    if args.out is not None:
        atomic_write_text(args.out, json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
