"""Training, resuming, evaluating and cross-validating on tiny phantoms, end to end on CPU."""

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch (the [train] extra) is not installed")

from edgebc.data import read_manifest, write_manifest
from edgebc.data.records import Sample
from edgebc.data.split import SplitPlan, assign_splits
from edgebc.errors import ConfigError, EdgebcError
from edgebc.metrics import sensitivity_lower_bound
from edgebc.synth.dataset import SynthPlan, write_phantom_dataset
from edgebc.train import loop
from edgebc.train.checkpoint import load_checkpoint, sha256_of_state
from edgebc.train.config import load_train_config


def _split_phantoms(root, n_per_class, size, plan):
    manifest = write_phantom_dataset(root, SynthPlan(n_per_class=n_per_class, size=size, seed=3))
    return write_manifest(assign_splits(read_manifest(manifest), plan), root / "split.csv")


@pytest.fixture(scope="module")
def tiny_split(tmp_path_factory):
    return _split_phantoms(
        tmp_path_factory.mktemp("phantoms"), 10, 48, SplitPlan(val=0.2, test=0.2, seed=0)
    )


def _config(manifest, out, name, *extra):
    return load_train_config(None, [
        f"data.manifest={manifest}", f"out_dir={out}", f"name={name}", "model.arch=simple_cnn",
        "preprocess.input_height=32", "preprocess.input_width=32", "optim.epochs=2", "optim.batch_size=8",
        "optim.warmup_epochs=1", "loader_workers=1", *extra,
    ])  # fmt: skip


def test_a_run_writes_everything_a_user_needs(tiny_split, tmp_path):
    result = loop.train_model(_config(tiny_split, tmp_path, "run"), show_progress=False)
    run = tmp_path / "run"
    for name in ("config.yaml", "history.csv", "curves.png", "best.pt", "last.pt", "metrics.json"):
        assert (run / name).is_file(), name
    assert len(result.history) == 2
    best = load_checkpoint(run / "best.pt")
    card = best.card
    assert (
        card.class_names == ("normal", "benign", "malignant") and card.positive_class == "malignant"
    )
    assert card.task.name == "three_class" and card.name == "run"
    assert card.preprocess.input_height == 32 and best.config["optim"]["epochs"] == 2
    assert card.weights_sha256 == sha256_of_state(best.state_dict)
    assert len(card.data_fingerprint) == 64 and best.versions["torch"] == torch.__version__
    assert 0.05 <= card.temperature <= 20 and 0 <= card.threshold <= 1
    point = card.operating_point
    assert point.target_sensitivity == 0.95 and point.sensitivity >= 0.95
    val = [s.label for s in loop.select_samples(_config(tiny_split, tmp_path, "run"), "val")]
    assert (point.positives, point.negatives) == (
        val.count("malignant"),
        len(val) - val.count("malignant"),
    )
    detected = round(point.sensitivity * point.positives)  # phantoms have no patients: frames
    assert point.unit == "frame" and point.sensitivity_bound == pytest.approx(
        sensitivity_lower_bound(detected, point.positives, 0.95)
    )
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0 <= metrics["val_auc_positive"] <= 1 and metrics["val_sensitivity_at_threshold"] >= 0.95
    assert load_train_config(run / "config.yaml") == _config(tiny_split, tmp_path, "run")
    with pytest.raises(EdgebcError, match="already holds a run"):
        loop.train_model(_config(tiny_split, tmp_path, "run"), show_progress=False)


def _crash_after_the_first_epoch(config, monkeypatch):
    """Train `config` until a simulated power cut just after the first epoch's last.pt is written."""
    real_save = loop.save_checkpoint

    def crash_after_first_epoch(path, payload):
        real_save(path, payload)
        if path.name == "last.pt" and payload.training["epoch"] == 0:
            raise KeyboardInterrupt("simulated power cut")

    monkeypatch.setattr(loop, "save_checkpoint", crash_after_first_epoch)
    with pytest.raises(KeyboardInterrupt):
        loop.train_model(config, show_progress=False)
    monkeypatch.setattr(loop, "save_checkpoint", real_save)


@pytest.mark.parametrize("mask_weight", [0.0, 0.5], ids=["plain", "mask-loss"])
def test_resume_after_a_crash_continues_exactly(tiny_split, tmp_path, monkeypatch, mask_weight):
    settings = ("optim.epochs=3", "optim.ema_decay=0.9", "augment.enabled=true",
                f"optim.mask_loss_weight={mask_weight}")  # fmt: skip
    straight = loop.train_model(
        _config(tiny_split, tmp_path, "straight", *settings), show_progress=False
    )
    _crash_after_the_first_epoch(_config(tiny_split, tmp_path, "crashed", *settings), monkeypatch)
    resumed = loop.train_model(
        _config(tiny_split, tmp_path, "ignored"), resume=tmp_path / "crashed", show_progress=False
    )
    a = load_checkpoint(straight.run_dir / "last.pt")
    b = load_checkpoint(resumed.run_dir / "last.pt")
    assert a.card.weights_sha256 == b.card.weights_sha256
    assert [round(h["train_loss"], 6) for h in a.training["history"]] == [
        round(h["train_loss"], 6) for h in b.training["history"]
    ]


def test_a_resumed_run_still_names_the_weights_it_started_from(tiny_split, tmp_path, monkeypatch):
    from edgebc.train.models import create_model

    imagenet = tmp_path / "mobilenet_v3_small-imagenet.pth"
    torch.save(create_model("mobilenet_v3_small", 1000, 3).state_dict(), imagenet)
    settings = ("model.arch=mobilenet_v3_small", f"model.pretrained={imagenet}")
    _crash_after_the_first_epoch(_config(tiny_split, tmp_path, "crashed", *settings), monkeypatch)
    resumed = loop.train_model(
        _config(tiny_split, tmp_path, "ignored"), resume=tmp_path / "crashed", show_progress=False
    )
    last = load_checkpoint(resumed.run_dir / "last.pt")  # rewritten after the resume
    assert last.training["epoch"] == 1 and last.training["pretrained"]["source"] == str(imagenet)
    assert last.card.lineage == {
        "pretrained": str(imagenet),
        "distilled_from": [],
    }


def test_bad_configuration_is_named(tiny_split, tmp_path):
    with pytest.raises(ConfigError, match=r"TrainConfig has no setting 'optim\.lr_max'"):
        _config(tiny_split, tmp_path, "x", "optim.lr_max=1")
    with pytest.raises(EdgebcError, match="no validation samples"):
        loop.train_model(
            _config(tiny_split, tmp_path, "x", "data.val_split=nope"), show_progress=False
        )


def test_eval_report_has_intervals_operating_point_and_pictures(tiny_split, tmp_path):
    from edgebc.train.evaluate import evaluate_checkpoint

    run = loop.train_model(_config(tiny_split, tmp_path, "run"), show_progress=False)
    report = evaluate_checkpoint(
        run.best_checkpoint, tiny_split, tmp_path / "eval", "test", n_boot=200, gradcam_per_kind=2
    )
    low, high = report["auc_positive_ci"]
    assert 0 <= low <= report["auc_positive"] <= high <= 1
    assert report["n"] == 6 and np.array(report["confusion_matrix"]).sum() == 6
    assert (
        report["operating_point"]["threshold"]
        == load_checkpoint(run.best_checkpoint).card.threshold
    )
    for name in (
        "report.md",
        "report.json",
        "predictions.csv",
        "roc.png",
        "pr.png",
        "confusion.png",
        "calibration.png",
    ):
        assert (tmp_path / "eval" / name).is_file(), name
    assert report["gradcam"] and all(p.endswith(".png") for p in report["gradcam"])
    assert "malignant-vs-rest AUC" in (tmp_path / "eval" / "report.md").read_text()
    attention = report["lesion_attention"]  # the phantoms have lesion masks
    assert attention["frames"] + attention["blank_maps"] == 4  # the test split's 4 lesions
    assert 0 <= attention["mean_share_on_lesion"] <= 1 and 0 < attention["mean_lesion_area"] < 1


def test_cross_validation_summarises_every_fold(tmp_path):
    from edgebc.train.crossval import cross_validate

    manifest = _split_phantoms(
        tmp_path / "ph", 8, 48, SplitPlan(val=0.0, test=0.2, folds=2, seed=0)
    )
    report = cross_validate(
        _config(manifest, tmp_path, "cv", "optim.epochs=1"), show_progress=False
    )
    assert [f["fold"] for f in report["folds"]] == [0, 1]
    assert "val_auc_positive" in (tmp_path / "cv" / "cv_summary.md").read_text()


@pytest.mark.slow
def test_distributed_data_parallel_on_cpu_with_gloo(tiny_split, tmp_path):
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517", "-m", "edgebc.train",
        "--set", f"data.manifest={tiny_split}", "--set", "model.arch=simple_cnn", "--set", "preprocess.input_height=32",
        "--set", "preprocess.input_width=32", "--set", "optim.batch_size=4", "--set", "threads=1",
        "--set", "optim.mask_loss_weight=0.5",  # the mask head is synchronised too
        "--epochs", "2", "--out", str(tmp_path), "--name", "ddp",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert metrics["ddp_world_size"] == 2 and metrics["ddp_weights_identical"] == 1.0


@pytest.mark.slow
def test_phantoms_are_learnable_well_above_chance(tmp_path):
    manifest = _split_phantoms(tmp_path / "ph", 90, 128, SplitPlan(val=0.2, test=0.2, seed=0))
    config = _config(manifest, tmp_path, "learn", "preprocess.input_height=96", "preprocess.input_width=96",
                     "optim.epochs=10", "optim.batch_size=16", "optim.ema_decay=0", "augment.enabled=false")  # fmt: skip
    result = loop.train_model(config, show_progress=False)
    first = result.history[0]
    assert first["val_accuracy"] < 0.9  # not trivial: one epoch does not solve it
    assert result.best_metrics["val_auc_positive"] > 0.75


def test_domain_balanced_sampling_gives_domains_the_shares_asked_for():
    import torch

    from edgebc.data import Sample
    from edgebc.train.config import OptimConfig
    from edgebc.train.loop import sampling_weights

    samples = (
        [Sample(Path(f"a{k}.png"), "benign", source="busi") for k in range(90)]
        + [Sample(Path(f"b{k}.png"), "benign", source="busbra", extra=(("device", "logiq 7"),)) for k in range(9)]
        + [Sample(Path(f"c{k}.png"), "malignant", source="busbra", extra=(("device", "aplio"),)) for k in range(1)]
    )  # fmt: skip
    targets = torch.tensor([0] * 99 + [1])

    def shares(**optim):
        w = sampling_weights(samples, targets, OptimConfig(**optim)).double()
        return [
            float(w[:90].sum() / w.sum()),
            float(w[90:99].sum() / w.sum()),
            float(w[99:].sum() / w.sum()),
        ]

    assert shares() == pytest.approx([0.9, 0.09, 0.01])  # off: natural shares
    assert shares(domain_balance=1.0, domain_column="device") == pytest.approx([1 / 3] * 3)
    sqrt = np.sqrt([90, 9, 1])
    assert shares(domain_balance=0.5, domain_column="device") == pytest.approx(sqrt / sqrt.sum())
    # by site, BUS-BRA's two scanners are one domain
    assert shares(domain_balance=1.0)[0] == pytest.approx(0.5)
    # with the class-balanced sampler too: the one malignant frame weighs as much as 99 benign
    both = sampling_weights(samples, targets, OptimConfig(balanced_sampler=True))
    assert float(both[99] / both[:99].sum()) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="domain_balance must be in"):
        OptimConfig(domain_balance=1.5)


def test_early_stopping_waits_for_the_minimum_number_of_epochs(tiny_split, tmp_path):
    common = ("optim.epochs=5", "optim.early_stop_patience=1", "optim.early_stop_metric=val_loss",
              "optim.lr=0", "optim.ema_decay=0", "augment.enabled=false")  # fmt: skip
    # with a zero learning rate nothing improves after the first epoch: patience 1 stops at 2
    early = loop.train_model(_config(tiny_split, tmp_path, "early", *common), show_progress=False)
    assert len(early.history) == 2
    late = loop.train_model(
        _config(tiny_split, tmp_path, "late", *common, "optim.early_stop_min_epochs=4"),
        show_progress=False,
    )
    assert len(late.history) == 4


def test_the_smoke_config_makes_its_phantoms_and_split_on_first_use(tmp_path, capsys):
    """A new user's first training is one command on a fresh clone: the phantom run's data are
    made when its manifest is missing; a real dataset's missing manifest stays an error."""
    from edgebc.cli import main
    from edgebc.train.phantom_manifest import ensure_phantom_manifest

    config = load_train_config(Path("configs/smoke_phantoms.yaml"))
    assert config.data.phantoms is not None and config.data.manifest == "runs/phantoms-split.csv"
    recipe = {"folder": str(tmp_path / "phantoms"), "n_per_class": 6, "size": 64, "seed": 1}
    manifest = tmp_path / "split.csv"
    tiny = load_train_config(Path("configs/smoke_phantoms.yaml"),
                             [f"data.manifest={manifest}", f"data.phantoms={json.dumps(recipe)}"])  # fmt: skip
    assert ensure_phantom_manifest(tiny.data) is True
    samples = read_manifest(manifest)
    assert len(samples) == 18 and {s.split for s in samples} == {
        "train",
        "val",
        "test",
        "calibration",
    }
    assert all(Path(s.path).is_file() for s in samples)
    before = manifest.read_bytes()
    assert ensure_phantom_manifest(tiny.data) is False and manifest.read_bytes() == before

    missing = tmp_path / "real-split.csv"  # no phantoms: nothing is made up
    code = main(["train", "--config", "configs/smoke_phantoms.yaml", "--set", "data.phantoms=null",
                 "--set", f"data.manifest={missing}", "--set", "optim.epochs=1"])  # fmt: skip
    assert code == 1 and not missing.exists() and "real-split.csv" in capsys.readouterr().err


def test_a_mammography_run_has_an_mg_card_and_heat_maps_on_the_full_resolution_breast(tmp_path):
    from edgebc.decode import read_image
    from edgebc.preprocess import prepared_frame
    from edgebc.train.evaluate import evaluate_checkpoint

    manifest = write_phantom_dataset(
        tmp_path / "ph", SynthPlan(n_per_class=1, size=128, seed=3, mammo_women=9)
    )
    samples = read_manifest(manifest)
    split = write_manifest(
        assign_splits(samples, SplitPlan(val=0.25, test=0.25, seed=1)), tmp_path / "split.csv"
    )
    config = _config(split, tmp_path, "mg", "data.modality=mammo", "data.task=malignant_vs_rest",
                     "preprocess.breast_crop=true", "preprocess.laterality=left",
                     "preprocess.input_height=48", "augment.hflip=0")  # fmt: skip
    run = loop.train_model(config, show_progress=False)
    card = load_checkpoint(run.best_checkpoint).card
    assert [(i.modality, i.preprocess.breast_crop) for i in card.inputs] == [("mg", True)]
    report = evaluate_checkpoint(
        run.best_checkpoint, split, tmp_path / "eval", "test", n_boot=20, gradcam_per_kind=1
    )
    tested = [s for s in read_manifest(split) if s.split == "test" and s.modality == "mammo"]
    assert report["n"] == len(tested) and report["gradcam"]
    sizes = {prepared_frame(read_image(s.path), card.preprocess).shape for s in tested}
    for path in report["gradcam"]:  # drawn on the cropped breast at its own size, not at 48x32
        picture = cv2.imread(path)
        assert picture.shape[:2] in {size[:2] for size in sizes} and picture.shape[0] > 48


def test_the_merged_protocol_trains_one_classifier_on_both_modalities_and_scores_each(
    tmp_path, caplog
):
    from edgebc.train.evaluate import evaluate_checkpoint

    manifest = write_phantom_dataset(
        tmp_path / "ph", SynthPlan(n_per_class=6, size=104, seed=5, mammo_women=8)
    )
    # each modality on every side (by woman for the mammograms: her films stay together)
    samples, sides = read_manifest(manifest), ("train", "train", "val", "test")
    women = sorted({s.patient_id for s in samples if s.modality == "mammo"})
    split = write_manifest([
        replace(s, split=sides[women.index(s.patient_id) % 4 if s.modality == "mammo" else i % 4])
        for i, s in enumerate(samples)
    ], tmp_path / "split.csv")  # fmt: skip
    config = _config(split, tmp_path, "merged", "data.modality=null", "data.task=malignant_vs_rest")
    with caplog.at_level("INFO", logger="edgebc.train.loop"):
        run = loop.train_model(config, show_progress=False)
    assert "merged protocol" in caplog.text  # the card cannot say both: the log says what it means
    val = [s for s in read_manifest(split) if s.split == "val"]
    us = sum(s.modality == "us" for s in val)
    assert 0 < us < len(val)  # its one threshold is fitted on the ultrasound it will answer
    assert f"fitted on the validation split's {us} us samples of {len(val)}" in caplog.text
    assert [i.modality for i in load_checkpoint(run.best_checkpoint).card.inputs] == ["us"]
    report = evaluate_checkpoint(
        run.best_checkpoint, split, tmp_path / "eval", "test", n_boot=50, gradcam_per_kind=0,
        subgroups=("modality",),
    )  # fmt: skip
    tested = [s for s in read_manifest(split) if s.split == "test"]
    rows = {r["value"]: r for r in report["subgroups"]["modality"]}
    assert set(rows) == {"us", "mammo"} and report["n"] == len(tested)
    for modality, row in rows.items():
        mine = [s for s in tested if s.modality == modality]
        assert row["n"] == len(mine)
        assert row["positives"] == sum(s.label == "malignant" for s in mine)
        if 0 < row["positives"] < row["n"]:  # an AUC (and its CI) needs both classes
            low, high = row["auc_positive_ci"]
            assert 0 <= low <= row["auc_positive"] <= high <= 1
            assert 0 <= row["sensitivity"] <= 1 and 0 <= row["specificity"] <= 1
    assert "auc_positive_ci" in rows["us"]
    assert "| mammo |" in (tmp_path / "eval" / "report.md").read_text()


def test_a_single_modality_run_does_not_call_itself_merged(tmp_path, caplog):
    samples = [Sample(Path(f"{m}.png"), "benign", modality=m) for m in ("us", "US")]
    with caplog.at_level("WARNING", logger="edgebc.train.loop"):
        loop._warn_if_merged(_config("m.csv", tmp_path, "x", "data.modality=null"), samples)
    assert not caplog.text
    with caplog.at_level("WARNING", logger="edgebc.train.loop"):
        loop._warn_if_merged(
            _config("m.csv", tmp_path, "x", "data.modality=null"),
            [*samples, Sample(Path("m.png"), "benign", modality="mammo")],
        )
    assert "merged protocol" in caplog.text
