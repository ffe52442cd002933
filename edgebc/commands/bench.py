"""`edgebc bench`: the latency benchmark (also `python benchmarks/latency.py`)."""

from __future__ import annotations

import argparse

from edgebc.commands import HelpFormatter


def register_bench(commands: argparse._SubParsersAction) -> None:
    bench = commands.add_parser(
        "bench",
        help="measure latency of every stage, backend and the full pipeline on this machine",
        description="Time decode, region detection and preprocessing on 1920x1080 and 640x480 frames; "
        "every available backend (PyTorch eager, PyTorch CUDA FP16 with CUDA graphs, ONNX Runtime FP32/INT8 "
        "per thread count, CUDA/TensorRT providers, native TensorRT FP16/INT8, OpenCV DNN) on the same "
        "model and input at each batch size, with GPU memory; the full pipeline to a "
        "decision with its stages; the PIL + torch notebook pipeline for comparison; and the share of a "
        "core used at 30 fps. Without --model, models are made from the registry with random weights "
        "(needs the [train] and [export] extras). Accuracy per backend: python benchmarks/accuracy.py.",
        formatter_class=HelpFormatter,
    )
    from edgebc.bench.cli import add_arguments

    add_arguments(bench)
    bench.set_defaults(handler=run_bench)


def run_bench(args: argparse.Namespace) -> int:
    from edgebc.bench.cli import main_from_args

    return main_from_args(args)
