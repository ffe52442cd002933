"""Latency and throughput of every pipeline stage, every available backend and the full pipeline.

    python benchmarks/latency.py [--quick] [--arch NAME ...] [--out results/bench] [--compare previous.json]
    python benchmarks/latency.py --model m.onnx [--int8 m-int8.onnx] [--checkpoint m.pt]

The device's own benchmark (`edgebc bench`, torch-free, in edgebc/bench/) plus what needs torch,
composed here on the development side: PyTorch rows on the checkpoint (eager on CPU per thread
count; on CUDA, eager and FP16 replayed from CUDA graphs), the research-notebook pipeline (PIL +
torch) beside the edgebc pipeline, and, without --model, models made from the registry with random
weights (speed does not depend on them): checkpoint -> ONNX FP32 -> INT8 QDQ calibrated on phantom
frames (the [train] and [export] extras). Before any backend is timed its outputs on the check
frames (phantoms, or --check-data's real frames) are compared with ONNX Runtime FP32 on the same
model; one that disagrees is reported WRONG with the figures and never timed. Use a trained model
(--model with --checkpoint) for that check to mean much: on random weights only whether the
outputs follow the input is judged. Compared variants (the backends at each batch size; the edgebc
pipeline, its INT8 twin and the notebook pipeline on each frame) are timed interleaved, in
rotating order, after a warm-up, with perf_counter (and a device sync on GPUs): p50/p90/p99/max,
throughput, process CPU time per call beside the wall time, peak RSS, real-time headroom at
30 fps, the machine's CPU as /proc/cpuinfo names it, and a flag when the load average from other
processes was high. Compare ratios measured in one run, not absolute numbers.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np

from edgebc.bench.backends import BenchModel, Candidate, given_model
from edgebc.bench.cli import add_arguments, batches_and_threads, main_from_args
from edgebc.errors import EdgebcError
from edgebc.optional import is_installed, require
from edgebc.region import Region

DEFAULT_ARCHS = ["mobilenet_v3_small", "shufflenet_v2_x1_0", "mobilenet_v3_large"]


def torch_candidates(checkpoint: Path, threads: Sequence[int]) -> list[Candidate]:
    """PyTorch eager on the CPU at each thread count; where CUDA is, eager CUDA and CUDA FP16
    replayed from CUDA graphs."""
    import torch

    from edgebc.train.torch_backend import CudaGraphsTorchBackend, TorchBackend

    out = [
        Candidate(f"torch-eager-cpu-t{t}", partial(TorchBackend, checkpoint, "cpu", t))
        for t in threads
    ]
    if torch.cuda.is_available():
        out.append(
            Candidate("torch-eager-cuda", partial(TorchBackend, checkpoint, "cuda"), gpu=True)
        )
        out.append(
            Candidate(
                "torch-cuda-fp16-graphs", partial(CudaGraphsTorchBackend, checkpoint), gpu=True
            )
        )
    return out


def notebook_pipeline(checkpoint: Path) -> Callable[[np.ndarray, Region], np.ndarray]:
    """The research-notebook pipeline: PIL crop/convert/resize, torch tensor maths, eager model."""
    import torch
    from PIL import Image

    from edgebc.train.torch_backend import TorchBackend

    backend = TorchBackend(checkpoint)
    model, prep = backend.module, backend.card.preprocess
    mean, std = prep.mean[0], prep.std[0]

    def run(frame: np.ndarray, region: Region) -> np.ndarray:
        image = Image.fromarray(frame[:, :, ::-1]).crop(
            (region.x, region.y, region.x + region.w, region.y + region.h)
        )
        image = image.convert("L").resize(
            (prep.input_width, prep.input_height), Image.Resampling.BILINEAR
        )
        tensor = torch.tensor(np.array(image), dtype=torch.float32).div(255.0).sub(mean).div(std)
        with torch.no_grad():
            return torch.softmax(model(tensor[None, None]), dim=1).numpy()

    return run


def with_torch_rows(
    model: BenchModel, checkpoint: Path | None, threads: Sequence[int]
) -> BenchModel:
    """`model` with PyTorch rows and the notebook pipeline on its checkpoint, where torch is."""
    if checkpoint is None or not is_installed("torch"):
        return model
    return replace(
        model,
        extra_backends=torch_candidates(checkpoint, threads),
        notebook=partial(notebook_pipeline, checkpoint),
    )


def make_model(
    arch: str, size: int, folder: Path, int8: bool, threads: Sequence[int]
) -> BenchModel:
    """Random-weight checkpoint -> ONNX FP32 -> INT8 QDQ (calibrated on phantoms), with its torch rows."""
    why = "making benchmark models from the registry (on a device: edgebc bench --model M.onnx)"
    require("torch", why)
    require("onnx", why)
    from edgebc.export.onnx_export import export_onnx
    from edgebc.export.quantize import QuantPlan, quantize_int8
    from edgebc.synth.ultrasound import phantom_stills
    from edgebc.train.checkpoint import save_untrained_checkpoint

    checkpoint = save_untrained_checkpoint(folder / f"{arch}.pt", arch, size)
    fp32, _, _ = export_onnx(checkpoint, folder / f"{arch}.onnx")
    int8_path = None
    if int8:
        frames, labels = phantom_stills(24, seed=21)
        int8_path = folder / f"{arch}-int8.onnx"
        plan = QuantPlan(calibration_size=24, max_excluded_nodes=0)
        quantize_int8(fp32, int8_path, frames, frames, labels, plan)
    return with_torch_rows(BenchModel(arch, fp32, int8_path), checkpoint, threads)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="edgebc latency benchmark: stages, backends, full pipeline, headroom; with "
        "PyTorch rows and the notebook pipeline where torch is",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_arguments(parser, without_model="models made from the registry, see --arch")
    parser.add_argument("--arch", action="append", default=None,
                        help="registry architecture to make with random weights, without --model (repeatable)")  # fmt: skip
    parser.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="its checkpoint for the torch rows, with --model",
    )
    parser.add_argument(
        "--no-int8", action="store_true", help="skip INT8 quantization of made models"
    )
    args = parser.parse_args(argv)
    _, threads = batches_and_threads(args)
    with tempfile.TemporaryDirectory(prefix="edgebc-bench-models-") as folder:
        try:
            if args.model is not None:
                models = [with_torch_rows(given_model(args.model, args.int8), args.checkpoint, threads)]  # fmt: skip
            elif args.int8 is not None or args.checkpoint is not None:
                raise EdgebcError("--int8 and --checkpoint go with --model")
            else:
                archs = args.arch or (DEFAULT_ARCHS[:1] if args.quick else DEFAULT_ARCHS)
                int8 = not args.no_int8 and not args.quick
                models = [make_model(a, 224, Path(folder), int8, threads) for a in archs]
        except EdgebcError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        return main_from_args(args, models)


if __name__ == "__main__":
    sys.exit(main())
