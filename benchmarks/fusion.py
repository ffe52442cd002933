"""Per-frame cost of mammogram + ultrasound fusion with the case's mammogram embedding kept,
against the ultrasound-only model of the same backbone, in one run.

    python benchmarks/fusion.py [--fusion fusion.onnx --us-model us.onnx] [--iterations 50] [--out DIR]

The device embeds a case's mammogram once (FusionClassifier.attach) and then, per ultrasound
frame, runs the ultrasound gate, preprocessing, the ultrasound branch and the fusion head; the
ultrasound-only model (FrameClassifier) runs the same gate, preprocessing and backbone with its
own classifier layer. The two are timed frame by frame, interleaved, on the same phantom frames,
so their difference holds on a shared, noisy machine even when the absolute numbers do not; the
one-off cost of attaching the mammogram (gate, breast crop, MG branch) is timed apart. Without
models, random-weight MobileNetV3-Small branches (ultrasound 224x224, mammogram 512x320 with
breast crop and laterality; speed does not depend on the weights) and a random-weight
MobileNetV3-Small ultrasound model are exported first ([train] and [export] extras); with
--fusion and --us-model only the device's own packages are used.

Before timing, both paths are checked: the fusion classifier's probabilities against the graphs
run directly (the mammogram branch run afresh, not from the cache, then the ultrasound branch and
the head), and the ultrasound-only classifier's against its backend run directly; they must agree
to 1e-5. The machine is its CPU model (edgebc.sysinfo).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from edgebc.backends import open_backend
from edgebc.classifier import FrameClassifier
from edgebc.decode import ImageView
from edgebc.fusion import FusionClassifier, Mammogram
from edgebc.fusion_graphs import HEAD, embedding_name
from edgebc.metrics import softmax
from edgebc.preprocess import PreprocessCard, preprocess_chw, to_channels
from edgebc.sysinfo import cpu_description

MG_PREPROCESS = PreprocessCard(input_height=512, input_width=320, breast_crop=True,
                               laterality="left")  # fmt: skip
MG_VIEW = ImageView("L", "CC", "left")


def untrained_models(folder: Path) -> tuple[Path, Path]:
    """A random-weight fusion model (MobileNetV3-Small per branch) and the ultrasound-only
    MobileNetV3-Small of the same ultrasound preprocessing, both exported."""
    import torch

    from edgebc.export.fusion_export import export_fusion
    from edgebc.export.onnx_export import export_onnx
    from edgebc.model_card import ModelInput, ModelOutput
    from edgebc.train.checkpoint import (
        Checkpoint,
        build_model,
        load_checkpoint,
        save_checkpoint,
        save_untrained_checkpoint,
    )

    us_path = save_untrained_checkpoint(folder / "us.pt", "mobilenet_v3_small", 224)
    us_card = load_checkpoint(us_path).card
    us_model = export_onnx(us_path, folder / "us.onnx")[0]
    card = replace(
        us_card, name="fusion", arch="late_fusion",
        inputs=(ModelInput("us", us_card.preprocess),
                ModelInput("mg", MG_PREPROCESS, "mg", "L-CC", optional=True, changes="case")),
        outputs=(ModelOutput("logits", "logits", len(us_card.class_names)),
                 ModelOutput("features", "features", 128)),
        arch_options={"fusion": "sum", "width": 128, "dropout": 0.2,
                      "branch_arch": {"us": "mobilenet_v3_small", "mg": "mobilenet_v3_small"}},
        training_statistics=None,
    )  # fmt: skip
    torch.manual_seed(0)
    model = build_model(card).eval()
    save_checkpoint(folder / "fusion.pt", Checkpoint(card, model.state_dict(), {"epoch": 0}))
    return export_fusion(folder / "fusion.pt", folder / "fusion", "fusion").head, us_model


def phantom_inputs(count: int) -> tuple[list[np.ndarray], np.ndarray]:
    """Ultrasound phantom frames (480x640, a scanner's size) and a 1024x832 8-bit mammogram."""
    from edgebc.synth.mammogram import draw_breast, make_mammogram
    from edgebc.synth.ultrasound import make_ultrasound_phantom, phantom_rng

    labels = ("normal", "benign", "malignant")
    frames = [make_ultrasound_phantom(labels[k % 3], phantom_rng(50, k), 480, 640).image
              for k in range(count)]  # fmt: skip
    rng = np.random.default_rng(20)
    film = make_mammogram(draw_breast("malignant", rng), rng, "L", "CC", 1024, 832, bits=8).image
    return frames, film


def check_fusion(classifier: FusionClassifier, frame: np.ndarray, film: np.ndarray) -> float:
    """Largest probability difference between the classifier (cached embedding) and the graphs
    run directly on the same frame and mammogram."""
    card, graphs = classifier.card, classifier.graphs
    us, mg = (i.name for i in card.inputs)
    mg_prep = card.inputs[1].preprocess
    film_tensor = preprocess_chw(to_channels(film, mg_prep.channels), mg_prep, view=MG_VIEW)
    mg_embedding = graphs[mg].run_named({mg: film_tensor[None]})[embedding_name(mg)]
    us_prep = card.inputs[0].preprocess
    us_tensor = preprocess_chw(to_channels(frame, us_prep.channels), us_prep)
    us_embedding = graphs[us].run_named({us: us_tensor[None]})[embedding_name(us)]
    logits = graphs[HEAD].run_named({embedding_name(us): us_embedding,
                                     embedding_name(mg): mg_embedding,
                                     classifier.layout.presence: np.ones((1, 2), np.float32)})  # fmt: skip
    direct = softmax(logits[card.output_name], card.temperature)[0]
    decision = classifier.classify(frame).decision
    if (
        decision.probabilities is None
        or classifier.context is None
        or not classifier.context.inputs
    ):
        raise SystemExit(f"the fusion path gave no fused decision: {decision.quality}")
    return float(np.abs(np.array(list(decision.probabilities.values())) - direct).max())


def check_us_only(classifier: FrameClassifier, frame: np.ndarray) -> float:
    prep = classifier.card.preprocess
    tensor = preprocess_chw(to_channels(frame, prep.channels), prep)[None]
    direct = softmax(classifier.backend.run(tensor), classifier.card.temperature)[0]
    decision = classifier.classify(frame)
    if decision.probabilities is None:
        raise SystemExit(f"the ultrasound-only path gave no decision: {decision.quality}")
    return float(np.abs(np.array(list(decision.probabilities.values())) - direct).max())


def time_interleaved(fusion: FusionClassifier, us_only: FrameClassifier, frames: list[np.ndarray],
                     iterations: int, warmup: int = 5) -> dict[str, dict[str, list[float]]]:  # fmt: skip
    """ms per frame, total and per stage, the two paths alternating frame by frame."""
    times: dict[str, dict[str, list[float]]] = {"fusion (MG cached)": {}, "ultrasound only": {}}
    for k in range(warmup + iterations):
        frame = frames[k % len(frames)]
        for name, classify in (("fusion (MG cached)", lambda f: fusion.classify(f).decision),
                               ("ultrasound only", us_only.classify)):  # fmt: skip
            start = time.perf_counter()
            decision = classify(frame)
            elapsed = (time.perf_counter() - start) * 1e3
            if k < warmup:
                continue
            times[name].setdefault("total", []).append(elapsed)
            for stage, ms in decision.timings_ms.items():
                times[name].setdefault(stage, []).append(ms)
    return times


def time_attach(fusion: FusionClassifier, film: np.ndarray, repeats: int) -> list[float]:
    """ms to attach a case's mammogram (gate, breast crop, preprocessing, MG branch)."""
    out = []
    for k in range(repeats):
        start = time.perf_counter()
        fusion.attach(f"bench-{k}", [Mammogram(film, MG_VIEW, "phantom")])
        out.append((time.perf_counter() - start) * 1e3)
    return out


def render(report: dict) -> str:
    fused, alone = report["p50_ms"]["fusion (MG cached)"], report["p50_ms"]["ultrasound only"]
    lines = [
        f"Machine: {report['cpu']}, {report['threads']} inference thread(s); "
        f"{report['iterations']} frames per path, interleaved; models: {report['models']}",
        "",
        "| per ultrasound frame | fusion, MG embedding cached: p50 ms | ultrasound only: p50 ms |",
        "|---|---|---|",
        f"| quality gate | {fused['quality']:.2f} | {alone['quality']:.2f} |",
        f"| preprocessing | {fused['preprocess']:.2f} | {alone['preprocess']:.2f} |",
        f"| inference | {fused['ultrasound_branch']:.2f} (US branch) + {fused['head']:.2f} (head) | "
        f"{alone['inference']:.2f} |",
        f"| total (wall, p50; p90) | {fused['total']:.2f}; {report['p90_ms']['fusion (MG cached)']:.2f} | "
        f"{alone['total']:.2f}; {report['p90_ms']['ultrasound only']:.2f} |",
        "",
        f"Once per case: attaching the 1024x832 mammogram (gate, breast crop, preprocessing, MG "
        f"branch) p50 {report['attach_p50_ms']:.1f} ms.",
        f"Checks before timing: fusion vs its graphs run directly max |dp| = "
        f"{report['check_fusion']:.1e}; ultrasound only vs its backend {report['check_us_only']:.1e}.",
    ]  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fusion", type=Path, help="an exported fusion model (its head .onnx)")
    parser.add_argument("--us-model", type=Path, help="the ultrasound-only model (.onnx)")
    parser.add_argument("--iterations", type=int, default=50, help="timed frames per path")
    parser.add_argument("--threads", type=int, default=1, help="inference threads")
    parser.add_argument("--out", type=Path, help="folder for fusion.json and fusion.md")
    args = parser.parse_args(argv)
    if (args.fusion is None) != (args.us_model is None):
        parser.error("give both --fusion and --us-model, or neither (random-weight models)")
    frames, film = phantom_inputs(6)
    with tempfile.TemporaryDirectory() as folder:
        fusion_path, us_path = (
            (args.fusion, args.us_model) if args.fusion else untrained_models(Path(folder))
        )
        fusion = FusionClassifier.open(fusion_path, threads=args.threads)
        us_only = FrameClassifier(open_backend(us_path, threads=args.threads))
        fusion.attach("check", [Mammogram(film, MG_VIEW, "phantom")])
        checks = (check_fusion(fusion, frames[0], film), check_us_only(us_only, frames[0]))
        if max(checks) > 1e-5:
            raise SystemExit(f"the timed paths disagree with their models: max |dp| {checks}")
        attach = time_attach(fusion, film, 5)
        times = time_interleaved(fusion, us_only, frames, args.iterations)
    report = {
        "cpu": cpu_description()["model"], "threads": args.threads, "iterations": args.iterations,
        "models": f"{fusion_path.name} + {us_path.name}" if args.fusion else
                  "random-weight MobileNetV3-Small branches (US 224x224, MG 512x320) and US-only model",
        "check_fusion": checks[0], "check_us_only": checks[1],
        "attach_p50_ms": float(np.median(attach)),
        "p50_ms": {n: {s: float(np.median(v)) for s, v in st.items()} for n, st in times.items()},
        "p90_ms": {n: float(np.percentile(st["total"], 90)) for n, st in times.items()},
    }  # fmt: skip
    text = render(report)
    print(text)
    if args.out:
        from edgebc.bench.report import write_report

        write_report(args.out / "fusion", report, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
