"""Runtime x precision on trained models: ONNX Runtime FP32 and INT8, OpenVINO FP32, BF16 and INT8,
each checked against ONNX Runtime FP32 on real frames before it is timed, natively and with a
typical Intel cart's CPU features emulated.

    python benchmarks/runtimes.py --checkpoint runs/small-us/best.pt \\
        --checkpoint runs/cmp-shufflenet/best.pt --data runs/sites-cal.csv --out results/runtimes

Each checkpoint is exported (FP32 ONNX) and quantized to QDQ INT8 with every node quantized
(calibrated on --calibration-split; the table shows what INT8 itself does, not what the export's
budget loop keeps in float), into --work. Each CPU setting is measured in its own process: native,
and `ONEDNN_MAX_CPU_ISA=AVX2` (oneDNN, under OpenVINO's CPU plugin, reads it; ONNX Runtime's MLAS
reads CPUID and has no such cap, so its rows there are this CPU's). Batch 1, one thread, the
variants interleaved in a rotating order, round by round; wall and process CPU time per call; the
load average before and after. A variant whose decisions agree with ONNX Runtime FP32 on fewer than
--min-agreement of the check frames is reported as wrong and not timed. Needs the [train],
[export] and [openvino] extras.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from edgebc import sysinfo
from edgebc.bench.report import write_report
from edgebc.bench.timing import Variant, time_interleaved

VARIANTS = (  # name, runtime, precision, file
    ("ort-fp32", None, None, "fp32"),
    ("ort-int8", None, None, "int8"),
    ("openvino-fp32", "openvino", "fp32", "fp32"),
    ("openvino-bf16", "openvino", "bf16", "fp32"),
    ("openvino-int8", "openvino", "int8", "int8"),
)
SETTINGS = {"native": {}, "avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2"}}


def prepare(checkpoint: Path, data: Path, args: argparse.Namespace) -> Path:
    """--work/NAME/: model.onnx, model.int8.onnx (QDQ, every node quantized) and check.npy (the
    check frames through the shared preprocessing); reused when already there."""
    from edgebc.bench.accuracy import check_frames, dataset_set
    from edgebc.export.onnx_export import export_onnx
    from edgebc.export.quantize import QuantPlan, quantize_int8
    from edgebc.model_card import read_card

    folder = args.work / checkpoint.parent.name
    folder.mkdir(parents=True, exist_ok=True)
    fp32, int8, check = folder / "model.onnx", folder / "model.int8.onnx", folder / "check.npy"
    if not fp32.exists():
        export_onnx(checkpoint, fp32)
    if not int8.exists():
        calibration = dataset_set(data, args.calibration_split, args.calibration)
        checking = dataset_set(data, args.check_split, 64, seed=1)
        plan = QuantPlan(calibration_size=len(calibration.frames), max_excluded_nodes=0)
        quantize_int8(fp32, int8, calibration.frames, checking.frames, checking.labels, plan)
    if not check.exists():
        np.save(check, check_frames(read_card(fp32), dataset_set(data, args.check_split, args.check, seed=2)))  # fmt: skip
    return folder


def measure(folder: Path, rounds: int, per_round: int, min_agreement: float) -> dict[str, Any]:
    """In this process (its environment is the CPU setting): outputs first, then interleaved timing."""
    from edgebc.backends import open_backend
    from edgebc.bench.accuracy import run_batched
    from edgebc.errors import EdgebcError
    from edgebc.metrics import softmax

    check = np.load(folder / "check.npy")
    files = {"fp32": folder / "model.onnx", "int8": folder / "model.int8.onnx"}
    backends, rows = {}, {}
    for name, runtime, precision, file in VARIANTS:
        try:
            backends[name] = open_backend(files[file], threads=1, runtime=runtime, precision=precision)  # fmt: skip
        except EdgebcError as exc:
            rows[name] = {"status": f"cannot run here: {exc}"}
    reference = backends["ort-fp32"]
    temperature = reference.card.temperature
    ref_logits = run_batched(reference, check)
    ref_p = softmax(ref_logits.astype(np.float64), temperature)
    for name, backend in list(backends.items()):
        try:
            logits = ref_logits if backend is reference else run_batched(backend, check)
        except EdgebcError as exc:
            rows[name] = {"status": f"wrong: {exc}"}
            del backends[name]
            continue
        p = softmax(logits.astype(np.float64), temperature)
        agreement = float((p.argmax(1) == ref_p.argmax(1)).mean())
        rows[name] = {"top1_agreement": agreement, "max_dp": float(np.abs(p - ref_p).max()),
                      "max_logit_diff": float(np.abs(logits - ref_logits).max())}  # fmt: skip
        if agreement < min_agreement:
            rows[name]["status"] = f"wrong: top-1 agreement {agreement:.3f} < {min_agreement}"
            del backends[name]
    frame = check[:1]
    load_before = os.getloadavg()[0]
    # the benchmarks' interleaved timer: per round a block of per_round + 1 calls of each variant
    # (the first untimed), the order rotating round by round
    variants = {name: Variant(partial(backend.run, frame)) for name, backend in backends.items()}
    timed = time_interleaved(
        variants, warmup=20, iterations=rounds * per_round, block=per_round + 1
    )
    base = timed["ort-fp32"]
    for name, t in timed.items():
        rows[name].update(
            status="timed", p50_ms=t["p50_ms"], p99_ms=t["p99_ms"], cpu_ms=t["cpu_ms"],
            p50_ratio=t["p50_ms"] / base["p50_ms"], p99_ratio=t["p99_ms"] / base["p99_ms"],
        )  # fmt: skip
    return {
        "rows": rows,
        "calls_per_variant": rounds * per_round,
        "loadavg": [load_before, os.getloadavg()[0]],
        "openvino_kernels": openvino_kernels(folder / "model.onnx"),
        "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA"),
    }


def openvino_kernels(fp32: Path) -> dict[str, int]:
    """The instruction sets OpenVINO's compiled FP32 graph runs on (its execution graph's primitive
    types, e.g. brgconv_avx512_1x1_f32): whether the ISA cap took effect, node by node."""
    import openvino

    core = openvino.Core()
    compiled = core.compile_model(str(fp32), "CPU", {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": 1})  # fmt: skip
    counts: collections.Counter[str] = collections.Counter()
    for op in compiled.get_runtime_model().get_ordered_ops():
        kind = op.get_rt_info()["primitiveType"].astype(str)
        isa = next((i for i in ("avx512", "avx2", "sse41", "ref") if i in kind), None)
        if isa:
            counts[isa] += 1
    return dict(counts)


def to_markdown(results: dict[str, Any]) -> str:
    lines = [f"CPU: {results['cpu']}; batch 1, one thread, {results['rounds']} rounds x "
             f"{results['per_round']} calls per variant, interleaved in rotating order", ""]  # fmt: skip
    for model, settings in results["models"].items():
        for setting, got in settings.items():
            isa = got["onednn_max_cpu_isa"] or "native"
            lines += [f"### {model}, {setting} (ONEDNN_MAX_CPU_ISA={isa}; OpenVINO FP32 kernels "
                      f"{got['openvino_kernels']}; load average {got['loadavg'][0]:.1f} -> "
                      f"{got['loadavg'][1]:.1f})", "",
                      "| variant | p50 ms | p99 ms | CPU ms/call | p50 / ORT FP32 | p99 / ORT FP32 "
                      "| top-1 vs ORT FP32 | max Δp |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
            for name, row in got["rows"].items():
                if row.get("status") != "timed":
                    agreement = f"{row['top1_agreement']:.3f}" if "top1_agreement" in row else "—"
                    status = row["status"].splitlines()[0][:160] + (" …" if "\n" in row["status"] else "")  # fmt: skip
                    lines.append(f"| {name} | {status} | | | | | {agreement} | |")
                    continue
                lines.append(
                    f"| {name} | {row['p50_ms']:.3f} | {row['p99_ms']:.3f} | {row['cpu_ms']:.3f} "
                    f"| {row['p50_ratio']:.2f} | {row['p99_ratio']:.2f} "
                    f"| {row['top1_agreement']:.3f} | {row['max_dp']:.4f} |"
                )
            lines.append("")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, action="append", required=False, default=[])
    parser.add_argument("--data", type=Path, help="labelled split manifest (real frames)")
    parser.add_argument("--calibration-split", default="calibration")
    parser.add_argument("--calibration", type=int, default=200, help="INT8 calibration frames")
    parser.add_argument("--check-split", default="test")
    parser.add_argument("--check", type=int, default=300, help="frames the outputs are checked on")
    parser.add_argument("--min-agreement", type=float, default=0.9)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--per-round", type=int, default=10)
    parser.add_argument("--settings", nargs="+", choices=sorted(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--work", type=Path, default=Path("results/runtimes-work"))
    parser.add_argument("--out", type=Path, default=None, help="writes OUT.json and OUT.md")
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)  # the child's folder
    args = parser.parse_args(argv)
    if args.measure is not None:
        got = measure(args.measure, args.rounds, args.per_round, args.min_agreement)
        print(json.dumps(got))
        return 0
    if not args.checkpoint or args.data is None:
        parser.error("give --checkpoint (one or more) and --data")
    torch = __import__("torch")
    torch.set_num_threads(1)
    results: dict[str, Any] = {"cpu": sysinfo.cpu_line(sysinfo.cpu_description()), "rounds": args.rounds,
                               "per_round": args.per_round, "models": {}}  # fmt: skip
    for checkpoint in args.checkpoint:
        folder = prepare(checkpoint, args.data, args)
        results["models"][folder.name] = {}
        for setting in args.settings:
            env = {**os.environ, "OMP_NUM_THREADS": "1", **SETTINGS[setting]}
            command = [sys.executable, __file__, "--measure", str(folder), "--rounds",
                       str(args.rounds), "--per-round", str(args.per_round),
                       "--min-agreement", str(args.min_agreement)]  # fmt: skip
            done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                print(done.stderr, file=sys.stderr)
                return 1
            results["models"][folder.name][setting] = json.loads(done.stdout.splitlines()[-1])
    markdown = to_markdown(results)
    print(markdown)
    if args.out:
        write_report(args.out, results, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
