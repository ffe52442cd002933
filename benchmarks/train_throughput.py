"""Training throughput (images/s) per architecture, and how much of a step is data vs model.

Run: `python benchmarks/train_throughput.py [--archs ...] [--size 224] [--batch 32] [--device cpu|cuda]`.
A step is: augment a cached batch on the device, forward, backward, AdamW update. The data side
(indexing + augmentation) and the model side (forward/backward/step) are timed separately with
device synchronisation, so the report says which one bounds training; since datasets are cached
as preprocessed tensors on the device, no loader process sits in the loop.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from edgebc.preprocess import PreprocessCard
from edgebc.train.augment import BatchAugmenter
from edgebc.train.config import AugmentConfig
from edgebc.train.models import create_model


def measure(
    arch: str, size: int, batch: int, device: torch.device, steps: int, warmup: int, amp: bool
) -> dict[str, float]:
    prep = PreprocessCard(input_height=size, input_width=size)
    data = torch.randn(batch * 4, 1, size, size, device=device) * 0.25
    targets = torch.randint(0, 3, (batch * 4,), device=device)
    model = create_model(arch, 3, 1).to(device).train()
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), 1e-3)
    augmenter = BatchAugmenter(AugmentConfig(), prep)
    generator = torch.Generator().manual_seed(0)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    data_time = model_time = 0.0
    for step in range(warmup + steps):
        sync()
        t0 = time.perf_counter()
        index = torch.randint(0, len(data), (batch,), generator=generator).to(device)
        images = augmenter(data[index], generator)
        sync()
        t1 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = torch.nn.functional.cross_entropy(model(images), targets[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        sync()
        t2 = time.perf_counter()
        if step >= warmup:
            data_time += t1 - t0
            model_time += t2 - t1
    total = data_time + model_time
    return {
        "images_per_s": steps * batch / total,
        "data_share": data_time / total,
        "model_ms_per_batch": model_time / steps * 1e3,
        "data_ms_per_batch": data_time / steps * 1e3,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument(
        "--archs",
        nargs="+",
        default=["mobilenet_v3_small", "shufflenet_v2_x1_0", "simple_cnn", "resnet18"],
    )
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    rows = {
        arch: measure(arch, args.size, args.batch, device, args.steps, args.warmup, args.amp)
        for arch in args.archs
    }
    print(
        f"| arch | images/s | data share | data ms/batch | model ms/batch |  ({platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads, {args.device}, batch {args.batch}, {args.size}px)"
    )
    print("|---|---|---|---|---|")
    for arch, r in rows.items():
        print(
            f"| {arch} | {r['images_per_s']:.1f} | {r['data_share']:.0%} | {r['data_ms_per_batch']:.1f} | {r['model_ms_per_batch']:.1f} |"
        )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=2)


if __name__ == "__main__":
    main()
