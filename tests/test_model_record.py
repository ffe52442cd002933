"""One record from training to the device: older checkpoints migrate, tasks come from config, and a
two-input model is trained, exported, loaded by the runtime and decided through its card."""

import datetime as dt
from dataclasses import replace

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch (the [train] extra) is not installed")

from edgebc.backends import open_backend
from edgebc.classifier import FrameClassifier
from edgebc.data import read_manifest, write_manifest
from edgebc.decision import DecisionRule
from edgebc.errors import EdgebcError
from edgebc.export.onnx_export import export_onnx
from edgebc.metrics import softmax, threshold_for_sensitivity
from edgebc.model_card import ModelCard, ModelInput, ModelOutput, read_card
from edgebc.preprocess import PreprocessCard, preprocess_batch
from edgebc.synth.mammo import make_mammo_phantom
from edgebc.synth.ultrasound import make_ultrasound_phantom, phantom_rng
from edgebc.task import TASKS
from edgebc.train import loop
from edgebc.train.checkpoint import (
    FORMAT,
    Checkpoint,
    build_model,
    load_checkpoint,
    save_checkpoint,
    sha256_of_state,
)
from edgebc.train.evaluate import evaluate_checkpoint
from edgebc.train.models import create_model
from tests.test_training import _config, tiny_split  # noqa: F401  (tiny_split is the fixture)


def _format1(path, **drop):
    """A checkpoint as edgebc wrote it before the card became the record (format 1)."""
    torch.manual_seed(0)
    model = create_model("simple_cnn").eval()
    record = {
        "format": FORMAT, "format_version": 1, "versions": {"torch": torch.__version__}, "saved": "2026-11-20",
        "arch": "simple_cnn", "model": {"arch": "simple_cnn", "width_mult": 1.0, "head": "linear", "dropout": 0.2, "pretrained": None},
        "class_names": ["normal", "benign", "malignant"], "positive_class": "malignant",
        "preprocess": PreprocessCard(input_height=48, input_width=48).to_dict(), "state_dict": model.state_dict(),
        "temperature": 1.5, "epoch": 3, "config": {"data": {"fold": None}},
        "operating_point": {"threshold": 0.3, "target_sensitivity": 0.95, "sensitivity": 0.96, "specificity": 0.5},
        "metrics": {"val_auc_positive": 0.9, "note": "text"}, "weights_sha256": "ab" * 32, "data_fingerprint": "cd" * 32,
        "pretrained": {"source": "/weights/imagenet.pth"},
        "distilled_from": [{"path": "t.pt", "arch": "simple_cnn", "weights_sha256": "ef" * 32}],
    }  # fmt: skip
    for key in drop:
        del record[key]
    torch.save(record, path)
    return path


def test_a_format_1_checkpoint_loads_exports_and_evaluates(tmp_path, tiny_split):  # noqa: F811
    old = load_checkpoint(_format1(tmp_path / "old.pt"))
    card = old.card
    assert card.arch == "simple_cnn" and card.task.name == "three_class"
    assert card.preprocess == PreprocessCard(input_height=48, input_width=48)
    assert card.temperature == 1.5 and card.operating_point.sensitivity == 0.96
    assert card.metrics == {"val_auc_positive": 0.9}  # what a card's metrics can hold: numbers
    assert card.lineage == {"pretrained": "/weights/imagenet.pth",
                            "distilled_from": [{"path": "t.pt", "arch": "simple_cnn", "weights_sha256": "ef" * 32}]}  # fmt: skip
    assert old.training["epoch"] == 3 and old.config == {"data": {"fold": None}}
    path, exported, parity = export_onnx(tmp_path / "old.pt", tmp_path / "old.onnx")
    assert parity.ok and read_card(path) == exported and exported.threshold == 0.3
    report = evaluate_checkpoint(tmp_path / "old.pt", tiny_split, tmp_path / "ev", "test", n_boot=50,
                                 gradcam_per_kind=0)  # fmt: skip
    assert report["n"] == 6 and report["operating_point"]["validation_sensitivity"] == 0.96
    # written again it is format 2 and the same record
    save_checkpoint(tmp_path / "new.pt", old)
    again = load_checkpoint(tmp_path / "new.pt")
    assert again.card == card and again.training == old.training
    with pytest.raises(EdgebcError, match=r"format-1 checkpoint without 'class_names'.*retrain it"):
        load_checkpoint(_format1(tmp_path / "broken.pt", class_names=None))


def test_a_task_from_config_trains_and_scores_sets_with_different_labels(tmp_path, tiny_split):  # noqa: F811
    # A second site without a normal class joins the first site's manifest, as BUS-BRA joins BUSI.
    site_a = read_manifest(tiny_split)
    site_b = [s.with_(source="site-b") for s in site_a if s.label != "normal"]
    mixed = write_manifest(
        [*(s.with_(source="site-a") for s in site_a), *site_b], tmp_path / "mixed.csv"
    )
    run = loop.train_model(_config(mixed, tmp_path, "bvm", "data.task=benign_vs_malignant"),
                           show_progress=False)  # fmt: skip
    card = load_checkpoint(run.best_checkpoint).card
    assert card.task == TASKS["benign_vs_malignant"] and card.class_names == ("benign", "malignant")
    # training stores what the model saw (edgebc.shift) and the features output it describes
    assert card.outputs == (
        ModelOutput("logits", "logits", 2),
        ModelOutput("features", "features", 128),
    )
    assert (
        card.training_statistics is not None
        and card.training_statistics.features.output == "features"
    )
    report = evaluate_checkpoint(run.best_checkpoint, mixed, tmp_path / "ev", "test", n_boot=50,
                                 gradcam_per_kind=0)  # fmt: skip
    test = [s for s in read_manifest(mixed) if s.split == "test"]
    assert report["task"] == "benign_vs_malignant"
    assert report["excluded_labels"] == {"normal": sum(s.label == "normal" for s in test)}
    assert report["n"] == sum(s.label != "normal" for s in test)
    assert np.array(report["confusion_matrix"]).shape == (2, 2)
    assert [row["value"] for row in report["subgroups"]["source"]] == ["site-a", "site-b"]

    merged = loop.train_model(_config(tiny_split, tmp_path, "mvr", "data.task=malignant_vs_rest"),
                              show_progress=False)  # fmt: skip
    report = evaluate_checkpoint(merged.best_checkpoint, tiny_split, tmp_path / "ev2", "test",
                                 n_boot=50, gradcam_per_kind=0)  # fmt: skip
    assert report["n"] == 6 and report["excluded_labels"] == {}
    assert report["per_class"].keys() == {"not_malignant", "malignant"}


def _case(label, seed):
    """One case: an ultrasound frame and a mammogram view of the same finding (phantoms)."""
    us = make_ultrasound_phantom(label, phantom_rng(seed, 0), 96, 128).image
    mg = make_mammo_phantom(label, phantom_rng(seed, 1), 128).image
    return us, mg


def test_a_two_input_model_is_trained_exported_loaded_and_decided(tmp_path):
    us_prep = PreprocessCard(input_height=32, input_width=32)
    mg_prep = PreprocessCard(input_height=48, input_width=48, resize="stretch")
    card = ModelCard(
        name="us-mg", arch="late_fusion", task=TASKS["three_class"],
        inputs=(ModelInput("us", us_prep), ModelInput("mg_cc", mg_prep, "mg", "L-CC", optional=True, changes="case")),
        outputs=(ModelOutput("logits", "logits", 3), ModelOutput("features", "features", 16)),
        arch_options={"fusion": "sum", "branch_arch": {"us": "simple_cnn", "mg_cc": "simple_cnn"},
                      "width": 16, "width_mult": 0.5, "dropout": 0.0},
    )  # fmt: skip
    labels = ("normal", "benign", "malignant")

    def batch(seeds):
        cases = [(_case(labels[k % 3], seed), k % 3) for k, seed in enumerate(seeds)]
        us = preprocess_batch([c[0][0] for c in cases], us_prep)
        mg = preprocess_batch([c[0][1] for c in cases], mg_prep)
        return torch.from_numpy(us), torch.from_numpy(mg), torch.tensor([c[1] for c in cases])

    train_us, train_mg, train_y = batch(range(100, 124))
    torch.manual_seed(0)
    model = build_model(card)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(60):
        logits, _features = model(train_us, train_mg)
        loss = torch.nn.functional.cross_entropy(logits, train_y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        fitted = softmax(model(train_us, train_mg)[0].numpy())
    point = threshold_for_sensitivity(train_y.numpy() == 2, fitted[:, 2], 0.95)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    trained = replace(card, operating_point=point, weights_sha256=sha256_of_state(state))
    save_checkpoint(tmp_path / "fusion.pt", Checkpoint(trained, state, {"epoch": 59}))

    path, exported, parity = export_onnx(
        tmp_path / "fusion.pt", tmp_path / "fusion.onnx", max_batch=32
    )
    assert parity.ok and parity.max_abs_logit_diff < 1e-3
    backend = open_backend(path)
    assert backend.card == read_card(path) == exported
    assert [(i.name, i.modality, i.view, i.optional, i.changes) for i in backend.card.inputs] == [
        ("us", "us", None, False, "frame"), ("mg_cc", "mg", "L-CC", True, "case")]  # fmt: skip
    rule = DecisionRule.of(backend.card)
    # The device decides its training cases as trained (the toy learns them; it is no classifier
    # to trust on new cases after 24 examples) ...
    fed = backend.run_named({"us": train_us.numpy(), "mg_cc": train_mg.numpy()})
    decided = rule.indices(softmax(fed["logits"], backend.card.temperature))
    assert (decided == train_y.numpy()).mean() >= 0.9  # chance is 1/3
    # ... and new cases exactly as the torch model does, with the features beside the logits.
    test_us, test_mg, _ = batch(range(500, 506))
    outputs = backend.run_named({"us": test_us.numpy(), "mg_cc": test_mg.numpy()})
    assert outputs["logits"].shape == (6, 3) and outputs["features"].shape == (6, 16)
    with torch.no_grad():
        torch_logits, torch_features = model(test_us, test_mg)
    np.testing.assert_allclose(outputs["features"], torch_features.numpy(), atol=1e-4)
    assert (
        rule.indices(softmax(outputs["logits"])).tolist()
        == rule.indices(softmax(torch_logits.numpy())).tolist()
    )
    with pytest.raises(
        ValueError, match=r"takes the inputs us, mg_cc; missing mg_cc \(mg_cc optional in the card"
    ):
        backend.run_named({"us": test_us.numpy()})
    with pytest.raises(EdgebcError, match="has 2 inputs"):  # a frame classifier needs one input
        FrameClassifier(backend)
    assert dt.date.fromisoformat(exported.exported[:10]) <= dt.date.today()


def test_the_operating_point_counts_patients_not_frames():
    from edgebc.calibration import operating_point

    # three malignant patients with two panels each, two benign patients: 3 positive units
    units = ["patient:a", "patient:a", "patient:b", "patient:b", "patient:c", "patient:c",
             "patient:d", "patient:e"]  # fmt: skip
    y = np.array([1, 1, 1, 1, 1, 1, 0, 0])
    p_malignant = np.array([0.9, 0.7, 0.6, 0.2, 0.8, 0.8, 0.3, 0.1])
    probs = np.stack([1 - p_malignant, p_malignant], axis=1)
    point = operating_point(probs, y, units, 1, target=1.0, confidence=0.95)
    # patient means 0.8, 0.4, 0.8: the threshold keeps all three (0.4), the bound rests on 3
    assert point.unit == "patient" and (point.positives, point.negatives) == (3, 2)
    assert point.threshold == pytest.approx(0.4) and point.sensitivity == 1.0
    assert point.sensitivity_bound == pytest.approx(0.05 ** (1 / 3))  # 3 of 3: 1 - bound^3 = 0.95
    frames = operating_point(probs, y, [f"frame:{k}" for k in range(8)], 1, 1.0, 0.95)
    assert frames.unit == "frame" and frames.positives == 6


def _as_format1(path):
    """Rewrite a checkpoint the way edgebc wrote it before the card became the record."""
    new = load_checkpoint(path)
    card = new.card
    point = card.operating_point
    record = {
        "format": FORMAT, "format_version": 1, "versions": new.versions, "saved": new.saved,
        "arch": card.arch, "model": {"arch": card.arch, **card.arch_options}, "class_names": list(card.class_names),
        "positive_class": card.positive_class, "preprocess": card.preprocess.to_dict(), "state_dict": new.state_dict,
        "temperature": card.temperature, "metrics": dict(card.metrics), "weights_sha256": card.weights_sha256,
        "data_fingerprint": card.data_fingerprint, "distilled_from": card.lineage["distilled_from"],
        "operating_point": None if point is None else {"threshold": point.threshold, "target_sensitivity": point.target_sensitivity,
                                                       "sensitivity": point.sensitivity, "specificity": point.specificity},
        **new.training,
    }  # fmt: skip
    torch.save(record, path)


def test_a_run_crashed_under_format_1_resumes_exactly(tmp_path, tiny_split, monkeypatch):  # noqa: F811
    from tests.test_training import _crash_after_the_first_epoch

    settings = ("optim.epochs=3", "optim.ema_decay=0.9", "augment.enabled=true")
    straight = loop.train_model(
        _config(tiny_split, tmp_path, "straight", *settings), show_progress=False
    )
    _crash_after_the_first_epoch(_config(tiny_split, tmp_path, "crashed", *settings), monkeypatch)
    _as_format1(tmp_path / "crashed" / "last.pt")  # as an older edgebc left it
    assert torch.load(tmp_path / "crashed" / "last.pt", weights_only=False)["format_version"] == 1
    resumed = loop.train_model(_config(tiny_split, tmp_path, "x"), resume=tmp_path / "crashed",
                               show_progress=False)  # fmt: skip
    a, b = (load_checkpoint(r.run_dir / "last.pt") for r in (straight, resumed))
    assert a.card.weights_sha256 == b.card.weights_sha256
    assert [h["val_loss"] for h in a.training["history"]] == [
        h["val_loss"] for h in b.training["history"]
    ]


def test_int8_and_the_accuracy_benchmark_score_a_task_that_leaves_labels_out(tmp_path, tiny_split):  # noqa: F811
    pytest.importorskip("onnx", reason="onnx (the [export] extra) is not installed")
    from edgebc.bench.accuracy import LabelledSet, evaluate
    from edgebc.bench.backends import BenchModel
    from edgebc.decode import read_image
    from edgebc.export.quantize import QuantPlan, quantize_int8

    run = loop.train_model(_config(tiny_split, tmp_path, "bvm", "data.task=benign_vs_malignant"),
                           show_progress=False)  # fmt: skip
    fp32, _, _ = export_onnx(run.best_checkpoint, tmp_path / "bvm.onnx")
    samples = read_manifest(tiny_split)
    frames, labels = [read_image(s.path) for s in samples], [s.label for s in samples]
    report = quantize_int8(fp32, tmp_path / "bvm.int8.onnx", frames, frames, labels,
                           QuantPlan(calibration_size=len(frames), max_excluded_nodes=0))  # fmt: skip
    assert report.check_labels_left_out == {"normal": labels.count("normal")}
    assert report.check_frames == len(labels) - labels.count("normal")
    accuracy = evaluate(
        BenchModel("bvm", fp32), LabelledSet("phantoms", frames, labels), tmp_path, 50
    )
    assert accuracy["task"] == "benign_vs_malignant" and accuracy["labels_left_out"] == {
        "normal": 10
    }
    assert accuracy["class_counts"] == {"benign": 10, "malignant": 10}
    with pytest.raises(EdgebcError, match=r"labels \['cyst'\] are not classes of this model"):
        evaluate(BenchModel("bvm", fp32), LabelledSet("x", frames[:1], ["cyst"]), tmp_path, 50)


def test_the_torch_backend_runs_named_inputs_like_the_runtime(tmp_path):
    from edgebc.train.checkpoint import save_untrained_checkpoint
    from edgebc.train.torch_backend import TorchBackend

    checkpoint = save_untrained_checkpoint(tmp_path / "m.pt", size=32)
    path, _, _ = export_onnx(checkpoint, tmp_path / "m.onnx")
    batch = np.random.default_rng(0).normal(0, 1, (3, 1, 32, 32)).astype(np.float32)
    torch_out = TorchBackend(checkpoint).run_named({"input": batch})
    onnx_out = open_backend(path).run_named({"input": batch})
    assert torch_out.keys() == onnx_out.keys() == {"logits", "features"}  # features: edgebc.shift
    np.testing.assert_allclose(torch_out["logits"], onnx_out["logits"], atol=1e-4)
    np.testing.assert_allclose(torch_out["features"], onnx_out["features"], atol=1e-4)


def test_a_calibration_split_fits_the_operating_point_on_cases_early_stopping_never_saw(tmp_path):
    from edgebc.data.split import SplitPlan, assign_splits
    from edgebc.synth.dataset import SynthPlan, write_phantom_dataset

    phantoms = read_manifest(
        write_phantom_dataset(tmp_path / "ph", SynthPlan(n_per_class=16, size=48, seed=5))
    )
    plan = SplitPlan(val=0.2, test=0.2, calibration=0.25, seed=0)
    manifest = write_manifest(assign_splits(phantoms, plan), tmp_path / "split.csv")
    split = read_manifest(manifest)
    calibration = [s for s in split if s.split == "calibration"]
    assert calibration and not {s.path for s in calibration} & {
        s.path for s in split if s.split == "val"
    }
    run = loop.train_model(_config(manifest, tmp_path, "cal"), show_progress=False)
    card = load_checkpoint(run.best_checkpoint).card
    assert card.calibration["fitted_on"] == "calibration split"
    point = card.operating_point
    malignant = sum(s.label == "malignant" for s in calibration)
    assert (point.positives, point.negatives) == (malignant, len(calibration) - malignant)
    # without a calibration side the validation split is used, and the card says so
    plain = loop.train_model(
        _config(tiny_split_of(tmp_path, phantoms), tmp_path, "val"), show_progress=False
    )
    assert (
        load_checkpoint(plain.best_checkpoint).card.calibration["fitted_on"] == "validation split"
    )


def tiny_split_of(tmp_path, phantoms):
    from edgebc.data.split import SplitPlan, assign_splits

    return write_manifest(
        assign_splits(phantoms, SplitPlan(val=0.2, test=0.2, seed=0)), tmp_path / "plain.csv"
    )
