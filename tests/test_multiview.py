"""Multi-view mammography: a breast's views through one shared backbone, pooled by attention or
the mean, trained by the training loop on framed phantoms, exported with one input per view plus
the presence input, and decided per view and per case by `edgebc classify`.

mini-MIAS has one view per breast (MLO), so multi-view is proven on the phantoms only.
"""

import csv
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch (the [train] extra) is not installed")

import edgebc.demo
from edgebc.backends import open_backend
from edgebc.cases import CaseClassifier, case_feeds, group_cases, validate_presence
from edgebc.cli import main
from edgebc.data import read_manifest, write_manifest
from edgebc.data.split import SplitPlan, assign_splits
from edgebc.decode import read_image
from edgebc.errors import ConfigError, EdgebcError
from edgebc.metrics import roc_auc, softmax
from edgebc.model_card import ModelCard, ModelInput, ModelOutput
from edgebc.preprocess import PreprocessCard, preprocess_chw
from edgebc.quality import QualityGate
from edgebc.synth.dataset import SynthPlan, write_phantom_dataset
from edgebc.task import TASKS
from edgebc.train import loop
from edgebc.train.augment import BatchAugmenter
from edgebc.train.checkpoint import load_checkpoint, model_from_checkpoint
from edgebc.train.config import AugmentConfig, load_train_config
from edgebc.train.models import create_model
from edgebc.train.multiview import augment_cases, cache_cases, wrap_views

VIEWS = ("L-CC", "L-MLO", "R-CC", "R-MLO")


def _config(manifest, out, name, *extra):
    return load_train_config(None, [
        f"data.manifest={manifest}", f"out_dir={out}", f"name={name}", "model.arch=simple_cnn",
        "data.modality=mammo", "data.task=normal_vs_abnormal", "threads=1", "loader_workers=1",
        "preprocess.input_height=80", "preprocess.input_width=64", "preprocess.breast_crop=true",
        "preprocess.laterality=left", f"model.views=[{', '.join(VIEWS)}]",
        "optim.epochs=25", "optim.batch_size=8", "optim.warmup_epochs=1", "optim.early_stop_patience=0",
        "augment.hflip=0", "augment.speckle=0", *extra,
    ])  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """90 phantom women split by woman, a multi-view model trained on their breasts (about 20 s
    on one thread) and exported."""
    from edgebc.export.onnx_export import export_onnx

    root = tmp_path_factory.mktemp("multiview")
    plan = SynthPlan(n_per_class=1, size=104, seed=1, mammo_women=90, mammo_bits=8)
    framed = [s for s in read_manifest(write_phantom_dataset(root / "ph", plan)) if s.patient_id]
    split = write_manifest(
        assign_splits(framed, SplitPlan(val=0.25, test=0.25, seed=0)), root / "split.csv"
    )
    config = _config(split, root / "runs", "mv")
    torch.manual_seed(0)
    result = loop.train_model(config, show_progress=False)
    onnx_path, card, parity = export_onnx(result.best_checkpoint, root / "mv.onnx")
    test = write_manifest([s for s in read_manifest(split) if s.split == "test"], root / "test.csv")
    return {"root": root, "config": config, "checkpoint": result.best_checkpoint,
            "onnx": onnx_path, "card": card, "parity": parity, "test": test}  # fmt: skip


def _test_cases(trained):
    config = trained["config"]
    cases = group_cases(read_manifest(trained["test"]), VIEWS)
    tensors, targets, _ = cache_cases(
        read_manifest(trained["test"]), config.preprocess, config.data.resolved_task(), VIEWS, 1
    )
    return cases, tensors, targets.numpy()


def test_a_case_is_a_breast_and_its_views_share_its_label(trained):
    cases, tensors, _ = _test_cases(trained)
    assert {len(c.samples) for c in cases} == {2}  # a breast: CC and MLO of one side
    assert all({v.split("-")[0] for v in c.views} == {c.laterality} for c in cases)
    assert tensors.shape == (len(cases), 4, 1, 80, 64)
    present = torch.isfinite(tensors).flatten(2).all(dim=2)
    for case, row in zip(cases, present, strict=True):
        assert row.tolist() == [v in case.samples for v in VIEWS]
    # the phantoms draw a finding in one breast of a woman and leave the other normal
    labels = {}
    for case in cases:
        labels.setdefault(case.patient_id, []).append(case.label)
    assert all(len(v) == 2 and "normal" in v for v in labels.values())
    assert {tuple(sorted(v)) for v in labels.values()} == {
        ("normal", "normal"), ("benign", "normal"), ("malignant", "normal")}  # fmt: skip


def test_the_card_has_an_optional_case_input_per_view_and_a_presence_input(trained):
    card = load_checkpoint(trained["checkpoint"]).card
    assert [(i.name, i.modality, i.view, i.optional, i.changes) for i in card.inputs] == [
        (f"mg_{v.replace('-', '_')}", "mg", v, True, "case") for v in VIEWS
    ]
    assert card.presence_input == "views_present"
    assert card.arch_options["view_pooling"] == "attention"
    assert card.threshold is not None and card.temperature > 0  # finalised like any model
    assert ModelCard.from_json(card.to_json()) == card


def test_it_learns_beyond_chance_on_held_out_women_also_from_one_view(trained):
    _, tensors, targets = _test_cases(trained)
    model = model_from_checkpoint(load_checkpoint(trained["checkpoint"]))
    positive = targets == 1
    assert 8 <= positive.sum() <= len(targets) - 8
    with torch.no_grad():
        both = softmax(model(tensors).numpy())[:, 1]
        # the same cases with every MLO view missing: the CC view alone still answers
        cc_only = tensors.clone()
        cc_only[:, [1, 3]] = float("nan")
        one = softmax(model(cc_only).numpy())[:, 1]
    assert roc_auc(positive, both) >= 0.75  # chance is 0.5; about 2.6 SD above it here
    assert np.isfinite(one).all() and roc_auc(positive, one) >= 0.65
    assert not np.allclose(one, both)


def test_absent_views_are_masked_whatever_they_hold(trained):
    """An absent view's pixels never reach the answer: zeros, noise or NaN give the same logits."""
    _, tensors, _ = _test_cases(trained)
    model = model_from_checkpoint(load_checkpoint(trained["checkpoint"]))
    present = torch.isfinite(tensors).flatten(2).all(dim=2).float()
    zeros = torch.nan_to_num(tensors, nan=0.0)
    noise = torch.where(torch.isfinite(tensors), tensors, torch.randn_like(tensors) * 5)
    with torch.no_grad():
        a, b, c = model(tensors), model(zeros, present), model(noise, present)
        all_present = model(noise, torch.ones_like(present))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    torch.testing.assert_close(b, c, atol=1e-5, rtol=0)
    assert (all_present - b).abs().max() > 1e-3  # the mask is what keeps them out


def test_mean_pooling_is_the_mean_of_the_present_views_features():
    torch.manual_seed(0)
    model = wrap_views(create_model("simple_cnn", 2, 1, 0.5), "simple_cnn", VIEWS, "mean").eval()
    x = torch.randn(3, 4, 1, 32, 32)
    present = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 1], [1, 1, 1, 1]], dtype=torch.float32)
    with torch.no_grad():
        features = model.backbone(x.flatten(0, 1)).view(3, 4, -1)
        by_hand = torch.stack([
            model.head(features[k][present[k] > 0].mean(dim=0)) for k in range(3)
        ])  # fmt: skip
        torch.testing.assert_close(model(x, present), by_hand, atol=1e-5, rtol=0)


def test_training_drops_views_but_never_all_and_augments_present_views_only():
    cases = torch.randn(200, 4, 1, 16, 16)
    cases[:, 2:] = float("nan")  # a breast: two of the four views
    generator = torch.Generator().manual_seed(0)
    augmenter = BatchAugmenter(AugmentConfig(), PreprocessCard(input_height=16, input_width=16))
    out = augment_cases(augmenter, cases, generator, 0.4)
    present = torch.isfinite(out).flatten(2).all(dim=2)
    assert not present[:, 2:].any() and present.any(dim=1).all()
    kept = present[:, :2].sum(dim=1)
    assert 20 <= int((kept == 1).sum()) <= 140 and int((kept == 2).sum()) >= 40  # 0.4 dropout
    assert not torch.equal(out[present], cases[present])  # augmented
    assert torch.equal(augment_cases(augmenter, cases, generator, 0.0).isnan(), cases.isnan())


def test_the_exported_model_gives_torchs_probabilities_with_views_missing(trained):
    assert trained["parity"].ok and trained["parity"].max_abs_prob_diff < 1e-4
    cases, tensors, _ = _test_cases(trained)
    backend = open_backend(trained["onnx"])
    card = backend.card
    assert card.presence_input == "views_present" and len(card.inputs) == 4
    model = model_from_checkpoint(load_checkpoint(trained["checkpoint"]))
    rows = []
    for k, case in enumerate(cases[:30]):  # 60 rows: within the card's max batch
        views = {v: tensors[k, VIEWS.index(v)].numpy() for v in case.samples}
        rows += [views, {v: views[v] for v in list(views)[k % 2 : k % 2 + 1]}]  # both; one alone
    feeds = case_feeds(card, rows)
    onnx = softmax(backend.run_named(feeds)["logits"], card.temperature)
    stacked = torch.stack([torch.from_numpy(feeds[i.name]) for i in card.inputs], dim=1)
    with torch.no_grad():
        expected = softmax(model(stacked, torch.from_numpy(feeds["views_present"])).numpy(),
                           card.temperature)  # fmt: skip
    np.testing.assert_allclose(onnx, expected, atol=1e-4)
    with pytest.raises(ValueError, match="at least one view present"):
        backend.run_named({**feeds, "views_present": np.zeros_like(feeds["views_present"])})
    with pytest.raises(ValueError, match="needs views_present"):
        backend.run_named({k: v for k, v in feeds.items() if k != "views_present"})
    with pytest.raises(ValueError, match=r"feed the absent ones \(mg_R_MLO\) as zeros"):
        backend.run_named({k: v for k, v in feeds.items() if k != "mg_R_MLO"})


def test_classify_writes_a_row_per_view_and_per_case(trained, tmp_path):
    samples = read_manifest(trained["test"])
    dropped = next(s for s in samples if s.view == "R-MLO")  # that breast keeps its CC view only
    kept = [s for s in samples if s.path != dropped.path]
    spot = dropped.with_(view="R-SPOT")  # a view the model does not take: a row says so
    manifest = write_manifest([*kept, spot], tmp_path / "cases.csv")
    out = tmp_path / "results.csv"
    # 104 px phantoms have a grain the mammography gate reads as speckle (full-size films pass)
    lenient = ["--set", "mammography_quality.max_speckle_contrast=0.5"]
    assert main(["classify", str(trained["onnx"]), str(manifest), "--out", str(out), *lenient]) == 0
    rows = list(csv.DictReader(out.open()))
    cases = group_cases(kept, VIEWS)
    assert sum(r["level"] == "case" for r in rows) == len(cases)
    left_out = [r for r in rows if r["error"]]
    assert [(r["views"], r["error"].split(":")[0]) for r in left_out] == [("R-SPOT", "left out")]
    assert sum(r["level"] == "view" and not r["error"] for r in rows) == len(kept)
    lone = f"{dropped.patient_id}/R"
    case_row = next(r for r in rows if r["case"] == lone and r["level"] == "case")
    view_row = next(r for r in rows if r["case"] == lone and r["level"] == "view")
    assert case_row["views"] == view_row["views"] == "R-CC" and case_row["decision"] in (
        "normal",
        "abnormal",
    )
    # one view alone: the case is that view's answer
    assert case_row["p_abnormal"] == view_row["p_abnormal"]
    # the case row is the model on the case's views, decided by the card's rule
    backend = open_backend(trained["onnx"])
    card = backend.card
    full = next(c for c in cases if len(c.samples) == 2)
    images = {v: read_image(s.path) for v, s in full.samples.items()}
    result = CaseClassifier(backend, QualityGate()).classify(full.name, images)
    grey = {v: preprocess_chw(images[v], card.inputs[0].preprocess) for v in images}
    p = softmax(backend.run_named(case_feeds(card, [grey]))["logits"], card.temperature)[0]
    row = next(r for r in rows if r["case"] == full.name and r["level"] == "case")
    assert (
        float(row["p_abnormal"])
        == pytest.approx(p[1], abs=1e-6)
        == result.decision.positive_probability
    )
    assert row["decision"] == ("abnormal" if p[1] >= card.threshold else "normal")
    assert row["views"] == "+".join(full.samples) and row["source"] == str(manifest)


def test_a_multi_view_model_refuses_what_is_not_a_case(trained, tmp_path, capsys):
    samples = read_manifest(trained["test"])
    out = str(tmp_path / "r.csv")
    # images are not cases, and a one-image model takes no manifest of cases
    assert main(["classify", str(trained["onnx"]), str(samples[0].path), "--out", out]) == 1
    assert "has 4 inputs" in capsys.readouterr().err
    demo = Path(edgebc.demo.__file__).parent / "demo-phantom.onnx"
    assert main(["classify", str(demo), str(trained["test"]), "--out", out]) == 1
    assert "manifests (.csv) are for multi-view models" in capsys.readouterr().err
    assert not Path(out).exists()
    with pytest.raises(EdgebcError, match="different labels"):
        group_cases([samples[0], replace(samples[1], label="malignant" if samples[0].label == "normal" else "normal")],
                    VIEWS)  # fmt: skip
    with pytest.raises(EdgebcError, match="two L-CC images"):
        group_cases([samples[0], replace(samples[1], view=samples[0].view)], VIEWS)
    with pytest.raises(EdgebcError, match="no patient_id"):
        group_cases([replace(samples[0], patient_id=None)], VIEWS)
    card = open_backend(trained["onnx"]).card
    with pytest.raises(ValueError, match="1 \\(present\\) or 0"):
        validate_presence(np.full((1, 4), 0.5, np.float32), card, 1)
    with pytest.raises(ValueError, match="takes the views"):
        case_feeds(card, [{"L-XCCL": np.zeros((1, 80, 64), np.float32)}])


def test_views_need_no_mask_loss_or_distillation(tmp_path):
    with pytest.raises(ConfigError, match=r"trains without optim\.mask_loss_weight"):
        _config("x.csv", tmp_path, "m", "optim.mask_loss_weight=0.5")


def test_a_one_image_card_is_unchanged_and_all_optional_inputs_need_a_presence_input():
    prep = PreprocessCard(input_height=32, input_width=32)
    card = ModelCard("m", "simple_cnn", TASKS["three_class"], (ModelInput("input", prep),),
                     (ModelOutput("logits", "logits", 3),))  # fmt: skip
    assert "presence_input" not in card.to_dict()
    optional = (ModelInput("mg_L_CC", prep, "mg", "L-CC", optional=True, changes="case"),)
    with pytest.raises(ValueError, match="presence input"):
        replace(card, inputs=optional)
    assert replace(card, inputs=optional, presence_input="views_present").presence_input
