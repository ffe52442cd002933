"""Every published protocol config (configs/protocols/) trains for one epoch on phantoms: the
configs read, validate and run with today's schema, so none of them rots. What each design is,
and where it departs from its paper, the configs' comments say."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest

torch = pytest.importorskip("torch", reason="torch (the [train] extra) is not installed")

from edgebc.data import read_manifest, write_manifest
from edgebc.synth.dataset import SynthPlan, write_phantom_dataset
from edgebc.train import loop
from edgebc.train.checkpoint import load_checkpoint
from edgebc.train.config import load_train_config
from edgebc.train.phantom_manifest import ensure_phantom_manifest

PROTOCOLS = Path(__file__).resolve().parents[1] / "configs" / "protocols"
FAST = ["optim.epochs=1", "optim.batch_size=8", "threads=1", "loader_workers=1",
        "preprocess.input_height=32", "preprocess.input_width=32"]  # fmt: skip


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Ultrasound and mammogram phantoms, every class of each modality on every side (a woman's
    films on one side): the single-image protocols."""
    root = tmp_path_factory.mktemp("protocol-images")
    manifest = write_phantom_dataset(
        root / "ph", SynthPlan(n_per_class=10, size=104, seed=4, mammo_women=10)
    )
    sides, seen = ("train", "train", "val", "calibration", "test"), Counter()
    samples = read_manifest(manifest)
    women = sorted({s.patient_id for s in samples if s.modality == "mammo"})
    split = []
    for sample in samples:
        if sample.modality == "mammo":
            side = sides[women.index(sample.patient_id) % len(sides)]
        else:
            side = sides[seen[sample.label] % len(sides)]
            seen[sample.label] += 1
        split.append(replace(sample, split=side))
    return write_manifest(split, root / "split.csv")


def _train(config_path: Path, settings: list[str]) -> Path:
    config = load_train_config(config_path, settings)
    ensure_phantom_manifest(config.data)  # as `edgebc train` does: paired phantoms on first use
    torch.manual_seed(0)
    result = loop.train_model(config, show_progress=False)
    assert result.best_checkpoint.is_file() and len(result.history) == 1
    return result.best_checkpoint


def test_every_protocol_has_a_smoke_run_here():
    assert {p.name for p in PROTOCOLS.glob("*.yaml")} == {
        "thesis_edge_merged.yaml", "two_branch_resnet18_sum.yaml",
        "resnet50_arcface_concat.yaml", "cnn17_ultrasound.yaml"}  # fmt: skip


@pytest.mark.parametrize(
    "arch", ["mobilenet_v3_small", "shufflenet_v2_x1_0", "densenet121", "cnn17"]
)
def test_the_thesis_protocol_trains_each_of_its_architectures(images, tmp_path, arch):
    best = _train(PROTOCOLS / "thesis_edge_merged.yaml",
                  [f"data.manifest={images}", f"out_dir={tmp_path}", f"model.arch={arch}", *FAST])  # fmt: skip
    assert load_checkpoint(best).card.arch == arch


def test_the_17_layer_cnn_protocol_trains_with_minmax_and_a_step_schedule(images, tmp_path):
    best = _train(PROTOCOLS / "cnn17_ultrasound.yaml",
                  [f"data.manifest={images}", f"out_dir={tmp_path}", *FAST])  # fmt: skip
    card = load_checkpoint(best).card
    assert card.arch == "cnn17" and card.preprocess.appearance == "minmax"
    assert card.class_names == ("normal", "benign", "malignant")


@pytest.mark.parametrize("name", ["two_branch_resnet18_sum.yaml", "resnet50_arcface_concat.yaml"])
def test_the_fusion_protocols_train_on_paired_phantoms(tmp_path, name):
    best = _train(PROTOCOLS / name, [
        f"out_dir={tmp_path}", f"data.manifest={tmp_path / 'split.csv'}",
        f"data.phantoms.folder={tmp_path / 'paired'}", "data.phantoms.paired_cases=36",
        "data.phantoms.us_per_case=1", "model.fusion.mg_preprocess.input_height=48",
        "model.fusion.mg_preprocess.input_width=32", *FAST])  # fmt: skip
    card = load_checkpoint(best).card
    assert card.arch == "late_fusion" and {i.modality for i in card.inputs} == {"us", "mg"}
