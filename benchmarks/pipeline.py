"""From a 1080p capture frame to a decision on one thread: the core path stage by stage, the live
CPU share at 30 fps, and each optional stage's added cost, in one interleaved run.

    python benchmarks/pipeline.py --model model.onnx [--localiser localiser.onnx] [--quick]
        [--rounds 100] [--seconds 24] [--fps 30] [--out pipeline.json] [--profile FRAMES]

The core path is capture frame -> imaging region -> quality gate -> preprocessing -> inference ->
decision. Variants, each timed on the same 1080p scanner screens (phantoms in one fixed imaging
region, as a capture card delivers them):

- reference: the stages composed one by one, each making its own downscale (the gate its grey
  thumbnail, the preprocessing the model's resize, each a pass of its own, by the native kernel
  where it is loaded):
  the pipeline as it was before the two shared one table;
- core: FrameClassifier (edgebc.classifier), as `serve` and `classify` run it: on the runtime
  and precision the deployment plan beside --model chose (`edgebc model plan`; --no-plan: the
  model file on ONNX Runtime);
- core, model file on ONNX Runtime: where the plan chose another runtime, the same path on the
  model file as given, for comparison (decisions that differ from the core path's are counted);
- core, numpy's table: the gate's copy and the model's resize read by numpy from a stored
  summed-area table, as before the native kernel (edgebc.area_native; its inputs are the same
  arrays, so its decisions must equal the core path's);
- core, OpenCV's area resize: the gate's copy and the model's resize made by cv2.resize, as
  before the summed-area table (edgebc.area);
- core + each optional stage the model allows: mark removal (the model's card with marks
  "inpaint"), the shift check (`shift: mark`), the lesion localiser (--localiser). The fusion
  head has its own interleaved benchmark, benchmarks/fusion.py.

Before anything is timed, every variant's outputs are checked on every frame: the core path's
decisions and probabilities must equal the reference's exactly (the model's input tensor is the
same array), and the shift check's those of the core path (it marks, it does not change them);
another runtime, OpenCV's resize and the gate at another size are compared with the core path
and their differences reported. Then each round runs every variant on the same few frames in a
row (the first call untimed), in an order that rotates from round to round, so a busy machine
slows them alike; what is reported is the median over calls of each variant's time against the
core path's on the same frame of the same round (ratio and added ms), beside the absolute
percentiles per stage: back to back, warm. The live run reads the screens through
edgebc.live.LiveReader
from a source that delivers them at --fps like a capture card (no decoding: the card's DMA does
that), classifies the newest frame in a loop, and reports process CPU time over wall time; the
variants take turns in segments, in rotation; each frame's time from its arrival
to its decision is reported too: between frames 30 fps leaves the core idle, and a frame then
starts on cold caches, which back-to-back rounds do not show. The load average is reported and
runs on a loaded machine (load above the core count) are flagged: their absolute figures must be
measured again on a quiet machine, their ratios hold.

Without --model the embedded demo model is timed as an ordinary model (torch-free; a smoke run:
the figures that mean something are a trained 224 px model's).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from edgebc import sysinfo
from edgebc.area import native_kernel, native_kernel_status, numpy_only
from edgebc.atomic import atomic_write_text
from edgebc.backends import Backend, open_backend
from edgebc.classifier import Decision, FrameClassifier
from edgebc.decision import DecisionRule
from edgebc.demo import DEMO_LINEAGE_KEY, DEMO_MODEL
from edgebc.deployment_plan import open_planned_backend, planned_candidate
from edgebc.live import LiveReader
from edgebc.localiser import Localiser
from edgebc.metrics import softmax
from edgebc.preprocess import preprocess_chw, to_channels, validated_image
from edgebc.quality import GATE_SIZE, QualityGate, gate_at_size
from edgebc.region import Region
from edgebc.sources import Frame, FramePacer
from edgebc.synth import make_ultrasound_phantom, render_scanner_screen
from edgebc.synth.ultrasound import phantom_rng

CLASSES = ("normal", "benign", "malignant")
AS_GIVEN = "core, model file on ONNX Runtime"  # beside a deployment plan's other runtime
OPENCV_AREA = "core, OpenCV's area resize"  # the downscales as before edgebc.area
NUMPY_AREA = "core, numpy's table"  # the downscales as before edgebc.area_native
Outcome = tuple[str | None, str | None, tuple[float, ...] | None]  # label, refusal, probabilities
Timed = Callable[[np.ndarray], tuple[Outcome, dict[str, float]]]


def capture_frames(count: int, height: int = 1080, width: int = 1920) -> tuple[list[np.ndarray], Region]:  # fmt: skip
    """`count` different BGR scanner screens of one layout: the same imaging region (a cart's,
    measured once) around a different phantom each, as a capture card delivers them."""
    screens, region = [], None
    for k in range(count):
        phantom = make_ultrasound_phantom(CLASSES[k % 3], phantom_rng(23, k), 400, 480).image
        screen, where = render_scanner_screen(phantom, phantom_rng(23, 10_000), height, width)
        if region is not None and where != region:
            raise RuntimeError(f"the screens' layouts differ: {where} and {region}")
        region = where
        screens.append(cv2.cvtColor(screen, cv2.COLOR_GRAY2BGR) if screen.ndim == 2 else screen)
    if region is None:
        raise ValueError("capture_frames needs at least one frame")
    return screens, region


class CardAs:
    """A backend seen through another card (the same graph): the demo graph as an ordinary model,
    or a model's preprocessing with an optional stage switched on, to time what it adds."""

    def __init__(self, backend: Backend, **preprocess: Any) -> None:
        card = backend.card
        inputs = tuple(
            dataclasses.replace(i, preprocess=dataclasses.replace(i.preprocess, **preprocess))
            for i in card.inputs
        )
        lineage = {k: v for k, v in card.lineage.items() if k != DEMO_LINEAGE_KEY}
        self.card = dataclasses.replace(card, inputs=inputs, lineage=lineage)
        self._backend = backend
        self.model_sha256 = backend.model_sha256

    def __getattr__(self, name: str) -> Any:
        return getattr(self._backend, name)


def outcome(decision: Decision) -> Outcome:
    probabilities = decision.probabilities
    return (
        decision.label,
        decision.quality.check,
        None if probabilities is None else tuple(probabilities.values()),
    )


def classifier_variant(classifier: FrameClassifier) -> Timed:
    def run(frame: np.ndarray) -> tuple[Outcome, dict[str, float]]:
        decision = classifier.classify(frame)
        return outcome(decision), decision.timings_ms

    return run


def numpy_area_variant(classifier: FrameClassifier) -> Timed:
    """The core path with its downscales held to numpy's reading of the summed-area table."""

    def run(frame: np.ndarray) -> tuple[Outcome, dict[str, float]]:
        with numpy_only():
            decision = classifier.classify(frame)
        return outcome(decision), decision.timings_ms

    return run


def reference_variant(backend: Backend, region: Region) -> Timed:
    """The core path's stages one by one, as they ran before the gate and the model shared one
    downscale: the gate makes its own grey thumbnail, preprocess_chw its own resize."""
    gate, card = QualityGate(), backend.card
    rule, prep = DecisionRule.of(card, None), card.preprocess
    clock = time.perf_counter

    def run(frame: np.ndarray) -> tuple[Outcome, dict[str, float]]:
        start = clock()
        crop = region.crop(frame)
        cropped = clock()
        grey = to_channels(validated_image(crop), 1)
        verdict = gate.check(crop, grey)
        gated = clock()
        if not verdict.ok:
            return (None, verdict.check, None), {"crop": (cropped - start) * 1e3}
        tensor = preprocess_chw(grey if prep.channels == 1 else crop, prep)[np.newaxis]
        prepared = clock()
        p = softmax(backend.run(tensor), card.temperature)[0]
        inferred = clock()
        label = rule.decide(p)
        done = clock()
        stages = {"crop": cropped - start, "quality": gated - cropped,
                  "preprocess": prepared - gated, "inference": inferred - prepared,
                  "postprocess": done - inferred}  # fmt: skip
        return (label, None, tuple(map(float, p))), {k: v * 1e3 for k, v in stages.items()}

    return run


class OpenCVDownscales(FrameClassifier):
    """The core path with the gate's copy and the model's resize each made by cv2.resize's area
    mode from the grey crop, as before edgebc.area: what the summed-area table saves, in the same
    run (its inputs differ from the table's on a few pixels by one grey level)."""

    def _downscales(self, grey: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None]:
        if self._sharing_gate is None:
            return None, None
        height, width = grey.shape[:2]
        made = [grey if size == (width, height) else cv2.resize(grey, size, interpolation=cv2.INTER_AREA)
                for size in self._downscale_sizes(grey, self._sharing_gate)]  # fmt: skip
        return made[0], made[1]


def check_outputs(variants: dict[str, Timed], frames: list[np.ndarray]) -> dict[str, str]:
    """The core path against the reference, and the shift check against the core path, on every
    frame: decisions and probabilities exactly equal, or this refuses to time them."""
    must_equal = {"core": "reference", NUMPY_AREA: "core", "core + shift check": "core"}
    checked = {}
    for name, reference in must_equal.items():
        if name not in variants:
            continue
        for k, frame in enumerate(frames):
            got, want = variants[name](frame)[0], variants[reference](frame)[0]
            if got != want:
                raise SystemExit(f"{name} differs from {reference} on frame {k}: {got} != {want}; "
                                 "not timed")  # fmt: skip
        checked[name] = f"equal to {reference} on {len(frames)} frames"
    # another precision (within the plan's accuracy budget), OpenCV's resize (a few pixels one
    # grey level apart) or the gate at another size: close to the core path, reported, not refused
    gate_at = [n for n in variants if n.startswith("core, gate at")]  # other verdicts, by design
    for name in (n for n in (AS_GIVEN, OPENCV_AREA, *gate_at) if n in variants):
        largest, differing = 0.0, 0
        for frame in frames:
            (label, refusal, p), (want_label, want_refusal, q) = (variants[n](frame)[0] for n in (name, "core"))  # fmt: skip
            differing += (label, refusal) != (want_label, want_refusal)
            if p is not None and q is not None:
                largest = max(largest, float(np.max(np.abs(np.subtract(p, q)))))
        checked[name] = (f"{differing} of {len(frames)} decisions differ from the core path's, "
                         f"max |dp| {largest:.4f}")  # fmt: skip
    return checked


def time_interleaved(
    variants: dict[str, Timed], frames: list[np.ndarray], rounds: int, warmup: int, block: int = 5
) -> dict[str, Any]:
    """Each round runs every variant on the same `block` frames in a row (the first call left
    out: it pays for the caches the variant before it used), the variants in an order rotated
    every round: back to back and warm, as a pipeline runs alone (one call per variant per round,
    as this first did, timed each with the others' caches, mark removal's 40 ms among them). The
    live run is where the cold frame of a 30 fps cart is measured."""
    names = list(variants)
    totals: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    stages: dict[str, dict[str, list[float]]] = {n: {} for n in names}
    for r in range(warmup + rounds):
        for j in range(len(names)):
            name = names[(r + j) % len(names)]
            for call in range(block):
                frame = frames[(r * block + call) % len(frames)]
                cpu_start, start = time.process_time(), time.perf_counter()
                _, timings = variants[name](frame)
                wall = (time.perf_counter() - start) * 1e3
                if r < warmup or (call == 0 and block > 1):
                    continue
                cpu[name].append((time.process_time() - cpu_start) * 1e3)
                totals[name].append(wall)
                for stage, ms in timings.items():
                    stages[name].setdefault(stage, []).append(ms)
    core, core_cpu = np.array(totals["core"]), np.array(cpu["core"])
    out: dict[str, Any] = {}
    for name in names:
        walls, cpu_ms = np.array(totals[name]), np.array(cpu[name])
        out[name] = {
            "p50_ms": float(np.percentile(walls, 50)),
            "p99_ms": float(np.percentile(walls, 99)),
            "cpu_p50_ms": float(np.percentile(cpu_ms, 50)),
            "cpu_p99_ms": float(np.percentile(cpu_ms, 99)),
            "vs_core_ratio_median": float(np.median(walls / core)),
            "vs_core_added_ms_median": float(np.median(walls - core)),
            "vs_core_cpu_ratio_median": float(np.median(cpu_ms / core_cpu)),
            "vs_core_added_cpu_ms_median": float(np.median(cpu_ms - core_cpu)),
            "stages_p50_ms": {s: float(np.percentile(v, 50)) for s, v in stages[name].items()},
            "stages_p99_ms": {s: float(np.percentile(v, 99)) for s, v in stages[name].items()},
        }
    return out


class CaptureCardSource:
    """A live source that delivers prepared frames at `fps` like a capture card: no decoding (the
    card's DMA delivers pixels), only the wait for the next frame."""

    live = True

    def __init__(self, frames: list[np.ndarray], fps: float) -> None:
        self.frames, self.fps, self.name = frames, fps, "capture card (prepared frames)"
        self._pacer = FramePacer(fps)
        self._index = 0

    def open(self) -> None:
        self._pacer.start()

    def read(self) -> Frame | None:
        self._pacer.wait()
        image = self.frames[self._index % len(self.frames)]
        self._index += 1
        return Frame(image, self._index, time.time(), time.monotonic(), self.name)

    def close(self) -> None:
        pass


def live_share(classify: Callable[[np.ndarray], object], frames: list[np.ndarray], fps: float,
               seconds: float) -> dict[str, Any]:  # fmt: skip
    """Process CPU time over wall time while the newest frame is classified live at `fps`, and
    each frame's time from its arrival to its decision: at 30 fps the core idles between frames
    and each starts with cold caches, unlike the back-to-back rounds (docs/RUNTIME.md)."""
    reader = LiveReader(lambda: CaptureCardSource(frames, fps)).start()
    try:
        for _ in range(5):  # warm-up, and the reader reaches its pace
            frame = reader.latest(1.0)
            if frame is not None:
                classify(frame.image)
        before = reader.state()
        cpu_start, wall_start = time.process_time(), time.monotonic()
        classified, latencies = 0, []
        while time.monotonic() - wall_start < seconds:
            frame = reader.latest(1.0)
            if frame is None:
                continue
            classify(frame.image)
            latencies.append(frame.age())
            classified += 1
        wall = time.monotonic() - wall_start
        cpu = time.process_time() - cpu_start
        after = reader.state()
    finally:
        reader.stop()
    return {
        "core_share": cpu / wall,
        "classified_per_s": classified / wall,
        "dropped": after.dropped - before.dropped,
        "seconds": wall,
        "latencies_ms": [1000.0 * t for t in latencies],
    }


def live_interleaved(variants: dict[str, Callable[[np.ndarray], object]], frames: list[np.ndarray],
                     fps: float, seconds: float, segments: int) -> dict[str, Any]:  # fmt: skip
    """Segments of `seconds / segments` each, the variants taking turns in a rotating order."""
    names = list(variants)
    shares: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    for s in range(segments):
        for name in names[s % len(names) :] + names[: s % len(names)]:
            shares[name].append(live_share(variants[name], frames, fps, seconds / segments))
    out: dict[str, Any] = {}
    for name, runs in shares.items():
        latencies = [t for r in runs for t in r["latencies_ms"]]
        out[name] = {
            "core_share_median": float(np.median([r["core_share"] for r in runs])),
            "core_shares": [round(r["core_share"], 4) for r in runs],
            "classified_per_s_median": float(np.median([r["classified_per_s"] for r in runs])),
            "dropped": int(sum(r["dropped"] for r in runs)),
            "latency_p50_ms": float(np.percentile(latencies, 50)) if latencies else None,
            "latency_p99_ms": float(np.percentile(latencies, 99)) if latencies else None,
        }
    for name in (n for n in shares if n != "reference" and "reference" in shares):
        ratios = [c["core_share"] / r["core_share"]
                  for c, r in zip(shares[name], shares["reference"], strict=True)]  # fmt: skip
        out[name]["vs_reference_ratio_median"] = float(np.median(ratios))
    return out


def profile(classifier: FrameClassifier, frames: list[np.ndarray], count: int) -> str:
    """cProfile of `count` core-path frames back to back (after a warm-up): where the time goes,
    by function, per frame."""
    import cProfile
    import io
    import pstats

    for k in range(20):
        classifier.classify(frames[k % len(frames)])
    profiler = cProfile.Profile()
    profiler.enable()
    for k in range(count):
        classifier.classify(frames[k % len(frames)])
    profiler.disable()
    out = io.StringIO()
    print(f"{classifier.backend.name}, {count} frames: a total of T seconds is {1000 / count:g} * T ms a frame",
          file=out)  # fmt: skip
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(25)
    return out.getvalue()


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def markdown(report: dict[str, Any]) -> str:
    timed = report["core_path"]
    stages = ["crop", "quality", "preprocess", "inference", "postprocess", "localise", "shift"]
    lines = [
        f"{report['machine']['cpu'].get('model', 'unknown CPU')}, model {report['model']}, "
        f"runtime {report['runtime']['backend']} ({report['runtime']['plan']}), "
        f"1920x1080 frames, one thread, area downscales: native kernel "
        f"{report['machine']['area_kernel']}; load average {report['load_average']['before']} before, "
        f"{report['load_average']['after']} after"
        + (" (LOADED: re-measure the absolute figures quietly)" if report["loaded"] else ""),
        "",
        "| variant | p50 ms | p99 ms | CPU p50 / p99 ms | vs core: wall, CPU (median over calls) "
        "| added ms: wall, CPU | " + " | ".join(f"{s} p50" for s in stages) + " |",
        "|---|---|---|---|---|---|" + "---|" * len(stages),
    ]
    for name, row in timed.items():
        cells = [
            f"{row['stages_p50_ms'][s]:.3f}" if s in row["stages_p50_ms"] else "" for s in stages
        ]
        lines.append(
            f"| {name} | {row['p50_ms']:.2f} | {row['p99_ms']:.2f} | {row['cpu_p50_ms']:.2f} / "
            f"{row['cpu_p99_ms']:.2f} | {row['vs_core_ratio_median']:.2f}x, "
            f"{row['vs_core_cpu_ratio_median']:.2f}x | {row['vs_core_added_ms_median']:+.2f}, "
            f"{row['vs_core_added_cpu_ms_median']:+.2f} | " + " | ".join(cells) + " |"
        )
    for name, why in report["unavailable"].items():
        lines.append(f"| {name} | not timed: {why} |")
    live = report["live"]
    lines += ["", f"Live at {report['settings']['fps']:.0f} fps (LiveReader, newest frame):"]
    for name, row in live.items():
        lines.append(f"- {name}: {row['core_share_median']:.1%} of one core (segments "
                     f"{row['core_shares']}), {row['classified_per_s_median']:.1f} frames/s "
                     f"classified, {row['dropped']} dropped; arrival to decision p50 / p99 "
                     f"{_ms(row['latency_p50_ms'])} / {_ms(row['latency_p99_ms'])} ms")  # fmt: skip
        if "vs_reference_ratio_median" in row:
            lines.append(f"  ({name} / reference, median of segment pairs: "
                         f"{row['vs_reference_ratio_median']:.2f})")  # fmt: skip
    lines.append(f"\nOutputs checked before timing: {report['checked']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    parser.add_argument("--model", type=Path, default=None,
                        help="the classifier (.onnx); default: the embedded demo model")  # fmt: skip
    parser.add_argument("--localiser", type=Path, default=None, help="a lesion localiser (.onnx)")
    parser.add_argument("--quick", action="store_true", help="a smoke run (CI): a few seconds")
    parser.add_argument("--rounds", type=int, default=None, help="rounds of 5 calls per variant, 4 timed (default 100; 10 quick)")  # fmt: skip
    parser.add_argument("--seconds", type=float, default=None,
                        help="live run, all segments together (default 24; 2 quick)")  # fmt: skip
    parser.add_argument("--fps", type=float, default=30.0)
    parser.add_argument("--no-plan", action="store_true",
                        help="run the model file as given (ONNX Runtime), not the runtime and "
                        "precision its deployment plan chose, as serve does")  # fmt: skip
    parser.add_argument("--out", type=Path, default=None, help="also write the report as JSON")
    parser.add_argument("--profile", type=int, default=0, metavar="FRAMES",
                        help="only profile the core path over this many frames back to back "
                        "(cProfile, the functions that take the most time) and stop")  # fmt: skip
    args = parser.parse_args(argv)
    for flag, value in (
        ("--rounds", args.rounds),
        ("--seconds", args.seconds),
        ("--fps", args.fps),
    ):
        if value is not None and not value > 0:
            parser.error(f"{flag} must be above 0, got {value}")
    rounds = args.rounds or (10 if args.quick else 100)
    seconds = args.seconds or (2.0 if args.quick else 24.0)
    segments = 2 if args.quick else 6
    cv2.setNumThreads(1)
    load_before = os.getloadavg()[0]
    frames, region = capture_frames(6 if args.quick else 12)
    if args.model is not None:  # as serve runs it: the runtime its deployment plan chose
        backend, plan_note = open_planned_backend(args.model, threads=1, spin_wait=False,
                                                  use_plan=not args.no_plan)  # fmt: skip
    else:
        backend, plan_note = open_backend(DEMO_MODEL, threads=1, spin_wait=False), "demo model"
    if args.model is None:
        backend = CardAs(backend)  # the demo graph, answering
    if backend.card.lineage.get("input_crop"):
        parser.error(
            f"{args.model} was trained on lesion-localiser crops and never runs on whole frames: "
            "time a whole-frame classifier here (its + lesion localiser row is the localiser's "
            "cost), or localise -> crop -> classify with benchmarks/localiser.py"
        )
    core = FrameClassifier(backend, region)
    if args.profile > 0:
        print(profile(core, frames, args.profile))
        return 0
    variants: dict[str, Timed] = {
        "reference": reference_variant(backend, region),
        "core": classifier_variant(core),
    }
    unavailable: dict[str, str] = {}
    prep = backend.card.preprocess
    side = max(prep.input_height, prep.input_width)
    at_model_size = f"core, gate at {side} px"
    if side != GATE_SIZE:  # the gate judging the model's own resize: fewer steps, other verdicts
        sharing = FrameClassifier(backend, region, gate=gate_at_size(side))
        variants[at_model_size] = classifier_variant(sharing)
    as_given = None
    planned = planned_candidate(args.model)[0] if args.model is not None and not args.no_plan else None  # fmt: skip
    if planned is not None and (planned.runtime, planned.precision, planned.model) != ("onnxruntime", "fp32", args.model.name):  # fmt: skip
        # the plan chose another runtime: the model file on ONNX Runtime beside it, back to back
        # and live (a runtime faster back to back need not be cheaper at 30 fps)
        as_given = AS_GIVEN
        plain = open_backend(args.model, threads=1, spin_wait=False)
        variants[as_given] = classifier_variant(FrameClassifier(plain, region))
    if native_kernel() is not None:
        variants[NUMPY_AREA] = numpy_area_variant(core)
    else:
        unavailable[NUMPY_AREA] = f"the native area kernel is {native_kernel_status()[1]}: core is numpy's table"  # fmt: skip
    variants[OPENCV_AREA] = classifier_variant(OpenCVDownscales(backend, region))
    marks = FrameClassifier(CardAs(backend, marks="inpaint"), region)
    variants["core + mark removal"] = classifier_variant(marks)
    shift = FrameClassifier(backend, region, shift="mark")
    if shift.shift is not None:
        variants["core + shift check"] = classifier_variant(shift)
    else:
        unavailable["core + shift check"] = shift.shift_note
    if args.localiser is not None:
        localiser = Localiser(open_backend(args.localiser, threads=1, spin_wait=False))
        variants["core + lesion localiser"] = classifier_variant(
            FrameClassifier(backend, region, localiser=localiser)
        )
    else:
        unavailable["core + lesion localiser"] = "no --localiser given"
    unavailable["core + fusion head"] = "timed by benchmarks/fusion.py (interleaved, same frames)"
    checked = check_outputs(variants, frames)
    started = time.monotonic()
    core_path = time_interleaved(variants, frames, rounds, warmup=max(5, rounds // 20))
    live_variants: dict[str, Callable[[np.ndarray], object]] = {
        "reference": variants["reference"],
        "core": core.classify,
    }
    for name in (at_model_size, as_given, NUMPY_AREA, OPENCV_AREA):
        if name in variants:
            live_variants[name] = variants[name]
    live = live_interleaved(
        live_variants,
        frames, args.fps, seconds, segments,
    )  # fmt: skip
    load_after = os.getloadavg()[0]
    cores = os.cpu_count() or 1
    report = {
        "model": str(args.model or "embedded demo model (as an ordinary model)"),
        "input": list(backend.card.preprocess.input_shape),
        "runtime": {"backend": backend.name, "plan": plan_note},
        "region": dataclasses.asdict(region),
        "machine": {
            "cpu": sysinfo.cpu_description(),
            "cores": cores,
            "opencv": cv2.__version__,
            "area_kernel": native_kernel_status()[1],
            "numpy": np.__version__,
        },
        "settings": {
            "rounds": rounds,
            "live_seconds": seconds,
            "live_segments": segments,
            "fps": args.fps,
            "threads": 1,
            "frames": len(frames),
        },
        "load_average": {"before": round(load_before, 2), "after": round(load_after, 2)},
        "loaded": max(load_before, load_after) > cores,
        "checked": checked,
        "unavailable": unavailable,
        "core_path": core_path,
        "live": live,
        "seconds": time.monotonic() - started,
    }
    print(markdown(report))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out, json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
