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

from edgebc.data import read_manifest, write_manifest
from edgebc.data.split import SplitPlan, assign_splits
from edgebc.demo import DEMO_LINEAGE, DEMO_LINEAGE_KEY
from edgebc.export.onnx_export import export_onnx
from edgebc.integrity import write_manifest as write_sha_manifest
from edgebc.synth.dataset import SynthPlan, write_phantom_dataset
from edgebc.train.checkpoint import load_checkpoint, save_checkpoint
from edgebc.train.config import load_train_config
from edgebc.train.loop import train_model

REPO = Path(__file__).resolve().parents[1]
WORK = REPO / "runs" / "demo-model"
TARGET = REPO / "edgebc" / "demo" / "demo-phantom.onnx"


def main() -> int:
    if WORK.exists():
        shutil.rmtree(WORK)
    manifest = write_phantom_dataset(
        WORK / "phantoms", SynthPlan(n_per_class=200, size=160, seed=2026)
    )
    split = write_manifest(
        assign_splits(read_manifest(manifest), SplitPlan(val=0.15, test=0.15, seed=0)),
        WORK / "split.csv",
    )
    config = load_train_config(None, [
        f"data.manifest={split}", f"out_dir={WORK}", "name=run", "seed=0", "device=cpu",
        "model.arch=simple_cnn", "preprocess.input_height=128", "preprocess.input_width=128",
        "optim.epochs=16", "optim.batch_size=32", "optim.warmup_epochs=1", "optim.ema_decay=0",
        "optim.early_stop_patience=0", "augment.enabled=false",
    ])  # fmt: skip
    result = train_model(config)
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
