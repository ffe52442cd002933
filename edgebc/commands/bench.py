"""`edgebc bench`: the device's torch-free latency benchmark (benchmarks/latency.py extends it)."""

from __future__ import annotations

import argparse

from edgebc.commands import HelpFormatter


def register_bench(commands: argparse._SubParsersAction) -> None:
    bench = commands.add_parser(
        "bench",
        help="measure latency of every stage, backend and the full pipeline on this machine",
        description="Time decode, region detection and preprocessing on 1920x1080 and 640x480 frames; "
        "every available backend (ONNX Runtime FP32/INT8 per thread count, CUDA/TensorRT providers, "
        "native TensorRT FP16/INT8 engines built here, OpenCV DNN) on the same model and input at "
        "each batch size, with GPU memory, each only after its outputs on the check frames "
        "(phantoms, or --check-data) agreed with ONNX Runtime FP32: a backend that disagrees is "
        "reported WRONG and not timed; variants timed interleaved, CPU time beside wall time, a "
        "busy machine flagged; the full pipeline to a decision with its stages; and the "
        "share of a core used at 30 fps. It times an exported model (--model, and its INT8 export "
        "with --int8; without --model, the embedded demo model) and needs no torch. PyTorch rows, "
        "the PIL + torch notebook pipeline and models made from the registry with random weights: "
        "python benchmarks/latency.py (the [train] and [export] extras). Accuracy per backend: "
        "python benchmarks/accuracy.py.",
        formatter_class=HelpFormatter,
    )
    from edgebc.bench.cli import add_arguments

    add_arguments(bench)
    bench.set_defaults(handler=run_bench)


def run_bench(args: argparse.Namespace) -> int:
    from edgebc.bench.cli import main_from_args

    return main_from_args(args)
