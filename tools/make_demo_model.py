"""Make the embedded demo model (edgebc/demo/demo-phantom.onnx) from synthetic phantoms only.

Reproducible: fixed seeds, no real data, no download. Run from the repository root with the
[train] and [export] extras installed:  python tools/make_demo_model.py
It writes the phantoms and the run into runs/demo-model/ and the exported model, its card and
MANIFEST.sha256 into edgebc/demo/. Takes a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import replace
from pathlib import Path

import cv2

from edgebc.data import read_manifest, write_manifest
from edgebc.data.records import CLASS_NAMES, Sample
from edgebc.data.split import SplitPlan, assign_splits
from edgebc.demo import DEMO_LINEAGE, DEMO_LINEAGE_KEY
from edgebc.export.onnx_export import export_onnx
from edgebc.integrity import write_manifest as write_sha_manifest
from edgebc.shift import PARTS
from edgebc.synth.cine import make_cine
from edgebc.synth.dataset import SynthPlan, write_phantom_dataset
from edgebc.synth.ultrasound import phantom_rng
from edgebc.train.checkpoint import load_checkpoint, save_checkpoint
from edgebc.train.config import load_train_config
from edgebc.train.loop import train_model
from edgebc.train.shift_stats import add_training_statistics

REPO = Path(__file__).resolve().parents[1]
WORK = REPO / "runs" / "demo-model"
TARGET = REPO / "edgebc" / "demo" / "demo-phantom.onnx"
SIZES = (64, 96, 128, 160, 200, 256)


def sweep_frames(folder: Path, clips: int = 4, every: int = 6) -> list[Sample]:
    """Frames of phantom sweeps (what `phantom:tour` plays) at every size, each clip one group so
    its near-identical frames stay on one side of the split."""
    samples = []
    for size in SIZES:
        for number, label in enumerate(CLASS_NAMES):
            for clip in range(clips):
                rng = phantom_rng(3030 + size, 10 * number + clip)
                sweep, _ = make_cine(label, rng, 60, size, size)  # as long as the tour's
                group = f"sweep-{size}-{label}-{clip}"
                for index in range(0, len(sweep), every):
                    path = folder / f"{group}-{index:02d}.png"
                    path.parent.mkdir(parents=True, exist_ok=True)
                    cv2.imwrite(str(path), sweep[index])
                    samples.append(Sample(path, label, patient_id=group, group=group))
    return samples


def main() -> int:
    if WORK.exists():
        shutil.rmtree(WORK)
    # Phantoms of several sizes: the demo is shown phantoms from 64 px up (the tour, tests, users'
    # `edgebc synth`), and its shift check must know all of them while refusing real tissue.
    samples = [sample for k, size in enumerate(SIZES) for sample in read_manifest(write_phantom_dataset(
        WORK / f"phantoms-{size}", SynthPlan(n_per_class=30, size=size, seed=2026 + k)))]  # fmt: skip
    samples += sweep_frames(WORK / "sweeps")
    split = write_manifest(
        assign_splits(samples, SplitPlan(val=0.15, test=0.15, calibration=0.15, seed=0)),
        WORK / "split.csv",
    )
    config = load_train_config(None, [
        f"data.manifest={split}", f"out_dir={WORK}", "name=run", "seed=0", "device=cpu",
        "model.arch=simple_cnn", "preprocess.input_height=128", "preprocess.input_width=128",
        "optim.epochs=16", "optim.batch_size=32", "optim.warmup_epochs=1", "optim.ema_decay=0",
        "optim.early_stop_patience=0", "augment.enabled=false",
    ])  # fmt: skip
    result = train_model(config)
    # All three distances (image statistics, features, residual): the demo must refuse every real
    # frame, and its features know phantoms only.
    add_training_statistics(result.best_checkpoint, parts=PARTS)
    trained = load_checkpoint(result.best_checkpoint)  # the card marks the model as the demo
    lineage = {**trained.card.lineage, DEMO_LINEAGE_KEY: DEMO_LINEAGE}
    save_checkpoint(
        result.best_checkpoint, replace(trained, card=replace(trained.card, lineage=lineage))
    )
    path, card, parity = export_onnx(result.best_checkpoint, TARGET)
    write_sha_manifest(TARGET.parent, [path])
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB): val malignant AUC {result.best_metrics['val_auc_positive']:.3f}, "
          f"threshold {card.threshold:.3f}, ONNX vs torch {parity.max_abs_logit_diff:.1e}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
