"""Mammography + ultrasound fusion, training side: paired phantom cases, cases cross-combined into
training instances, the fusion model's presence masking and modality dropout, and short trainings
on paired phantoms that show fusion beating each single modality when both carry the class, and
matching ultrasound alone when the mammograms are noise.

No public dataset pairs a woman's mammogram with her ultrasound, so fusion is proven on phantoms.
"""

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch (the [train] extra) is not installed")

from edgebc.cli import main
from edgebc.data import read_manifest, write_manifest
from edgebc.data.records import Sample
from edgebc.data.split import SplitPlan, assign_splits
from edgebc.errors import EdgebcError
from edgebc.model_card import ModelCard, ModelInput, ModelOutput
from edgebc.preprocess import PreprocessCard
from edgebc.synth.dataset import SynthPlan, write_phantom_dataset
from edgebc.synth.paired import make_paired_case
from edgebc.task import TASKS
from edgebc.train import loop
from edgebc.train.checkpoint import build_model, load_checkpoint, model_from_checkpoint
from edgebc.train.config import load_train_config
from edgebc.train.evaluate import evaluate_checkpoint
from edgebc.train.fusion_data import (
    augment_instances,
    cross_combine,
    group_fusion_cases,
)
from edgebc.train.fusion_eval import evaluate_combinations
from edgebc.train.models.fusion import FUSIONS, pack

VIEWS = ("L-CC", "L-MLO", "R-CC", "R-MLO")
US_PREP = PreprocessCard(input_height=24, input_width=24)
MG_PREP = PreprocessCard(input_height=28, input_width=24, resize="stretch")


# -- paired phantoms ----------------------------------------------------------------------------


def test_a_paired_case_is_deterministic_and_its_modalities_show_one_lesion():
    first = make_paired_case(4, 7, 1.0, 1.0, size=112, us_images=2)
    again = make_paired_case(4, 7, 1.0, 1.0, size=112, us_images=2)
    pairs = zip(
        first.ultrasound + first.mammograms, again.ultrasound + again.mammograms, strict=True
    )
    for a, b in pairs:
        assert np.array_equal(a.image, b.image)
    assert first.label == first.us_appearance == first.mg_appearance == "benign"  # 4 mod 3
    assert [m.view_code for m in first.mammograms] == [f"{first.laterality}-CC",
                                                       f"{first.laterality}-MLO"]  # fmt: skip
    # one lesion size behind both: the ultrasound width and the mammographic radius invert to it
    us_size = (first.ultrasound[0].lesion.width / 112 - 0.12) / 0.2
    mg_size = (first.mammograms[0].findings[0].radius / 112 - 0.05) / 0.04
    assert us_size == pytest.approx(first.lesion.size, abs=1e-6)
    assert mg_size == pytest.approx(first.lesion.size, abs=1e-6)
    assert first.ultrasound[0].lesion.width == first.ultrasound[1].lesion.width
    assert not np.array_equal(first.ultrasound[0].image, first.ultrasound[1].image)


def test_signal_sets_how_much_of_the_class_a_modality_shows():
    cases = [make_paired_case(k, 0, 1.0, 0.0, size=104) for k in range(60)]
    assert all(c.us_appearance == c.label for c in cases)
    agree = np.mean([c.mg_appearance == c.label for c in cases])
    assert 0.15 < agree < 0.55  # chance is 1/3: the mammograms' look ignores the class
    normal_looks = [c for c in cases if c.mg_appearance == "normal"]
    assert normal_looks and all(not c.mammograms[0].findings for c in normal_looks)
    with pytest.raises(ValueError, match="mg_signal"):
        make_paired_case(0, 0, 1.0, 1.5)


def test_synth_writes_a_row_per_image_with_case_modality_and_view(tmp_path):
    assert main(["synth", str(tmp_path / "p"), "--paired-cases", "6", "--us-signal", "0.5",
                 "--mg-signal", "0", "--size", "104", "--us-per-case", "2"]) == 0  # fmt: skip
    rows = read_manifest(tmp_path / "p" / "manifest.csv")
    assert len(rows) == 6 * (2 + 2)  # no unpaired phantoms with --paired-cases
    by_case: dict[str, list[Sample]] = {}
    for row in rows:
        by_case.setdefault(str(row.patient_id), []).append(row)
    assert len(by_case) == 6
    for case in by_case.values():
        assert len({r.label for r in case}) == 1
        assert sorted(r.modality for r in case) == ["mammo", "mammo", "us", "us"]
        assert {r.view for r in case if r.modality == "mammo"} in ({"L-CC", "L-MLO"},
                                                                   {"R-CC", "R-MLO"})  # fmt: skip
    truth = json.loads((tmp_path / "p" / "paired" / "truth.json").read_text())
    assert truth["mg_signal"] == 0 and len(truth["cases"]) == 6
    again = tmp_path / "q"
    main(["synth", str(again), "--paired-cases", "6", "--us-signal", "0.5", "--mg-signal", "0",
          "--size", "104", "--us-per-case", "2"])  # fmt: skip
    for row in rows:
        assert (tmp_path / "p" / row.path).read_bytes() == (again / row.path).read_bytes()


# -- cases and cross-combination -----------------------------------------------------------------


def _sample(patient, label, modality="us", view=None, k=0):
    return Sample(Path(f"{patient}_{modality}_{view}_{k}.png"), label, patient, modality, view)


def test_cross_combination_gives_every_us_image_with_the_case_views_and_single_modality_cases():
    samples = [
        *(_sample("a", "benign", k=k) for k in range(3)),
        _sample("a", "benign", "mammo", "L-CC"), _sample("a", "benign", "mammo", "L-MLO"),
        _sample("b", "normal", k=0), _sample("b", "normal", k=1),  # ultrasound only
        _sample("c", "malignant", "mammo", "R-MLO"),  # mammogram only
        _sample("d", "normal", "mammo", "L-XCCL"),  # a view the model does not take: left out
    ]  # fmt: skip
    cases = group_fusion_cases(samples, VIEWS)
    assert [(c.patient_id, len(c.ultrasound), sorted(c.mammograms)) for c in cases] == [
        ("a", 3, ["L-CC", "L-MLO"]), ("b", 2, []), ("c", 0, ["R-MLO"])]  # fmt: skip
    instances = cross_combine(cases)
    assert [(i.case, i.us) for i in instances] == [
        (0, 0),
        (0, 1),
        (0, 2),
        (1, 0),
        (1, 1),
        (2, None),
    ]
    with pytest.raises(EdgebcError, match="different labels"):
        group_fusion_cases([_sample("a", "benign"), _sample("a", "malignant", "mammo", "L-CC")],
                           VIEWS)  # fmt: skip
    with pytest.raises(EdgebcError, match="both breasts"):
        group_fusion_cases([_sample("a", "benign", "mammo", "L-CC"),
                            _sample("a", "benign", "mammo", "R-CC")], VIEWS)  # fmt: skip


# -- the model -----------------------------------------------------------------------------------


def _card(fusion):
    inputs = (ModelInput("us", US_PREP, optional=True),
              *(ModelInput("mg_" + v.replace("-", "_"), MG_PREP, "mg", v, optional=True,
                           changes="case") for v in VIEWS))  # fmt: skip
    return ModelCard(
        name="f", arch="late_fusion", task=TASKS["malignant_vs_rest"], inputs=inputs,
        outputs=(ModelOutput("logits", "logits", 2),), presence_input="inputs_present",
        arch_options={"fusion": fusion, "branch_arch": {"us": "simple_cnn", "mg": "simple_cnn"},
                      "branch_inputs": {"us": ["us"], "mg": [i.name for i in inputs[1:]]},
                      "width": 16, "width_mult": 0.5, "dropout": 0.0, "tokens": 4},
    )  # fmt: skip


@pytest.mark.parametrize("fusion", FUSIONS)
def test_an_absent_input_does_not_change_the_answer(fusion):
    torch.manual_seed(0)
    model = build_model(_card(fusion)).eval()
    n = 5
    us = torch.rand(n, *US_PREP.input_shape)
    mg = torch.rand(n, len(VIEWS), *MG_PREP.input_shape)
    mg[:, 2:] = float("nan")  # a left breast: the right views are absent
    layout = model.layout
    with torch.no_grad():
        both = model(pack([us, mg], layout, n))
        us_alone = model(pack([us, None], layout, n))
        mg_alone = model(pack([None, mg], layout, n))
        # the export form: every input given (absent ones holding garbage) and the presence
        views = [torch.where(mg[:, v].isnan(), torch.rand_like(mg[:, v]) * 50, mg[:, v])
                 for v in range(len(VIEWS))]  # fmt: skip
        garbage_us = torch.rand_like(us) * 50
        present = torch.tensor([[0.0, 1, 1, 0, 0]]).repeat(n, 1)
        named, _ = model(garbage_us, *views, present)
        present[:, 0] = 1
        named_both, _ = model(us, *views, present)
        # the device's split: a branch's embedding, then the head with the presence mask
        noise = torch.rand(n, 16) * 1e3
        mg_embedding = model.embed("mg", torch.nan_to_num(mg), present[:, 1:])
        head, _ = model.head([noise, mg_embedding], torch.tensor([[0.0, 1.0]]).repeat(n, 1))
    torch.testing.assert_close(named, mg_alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(head, mg_alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(named_both, both, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(both, us_alone) and not torch.allclose(both, mg_alone)


def test_modality_dropout_drops_one_modality_never_both_and_never_the_only_one():
    n = 400
    layout = [("us", US_PREP.input_shape), ("mg", (len(VIEWS), *MG_PREP.input_shape))]
    us = torch.rand(n, *US_PREP.input_shape)
    mg = torch.rand(n, len(VIEWS), *MG_PREP.input_shape)
    mg[:, 2:] = float("nan")
    us[300:350] = float("nan")  # mammograms only
    mg[350:] = float("nan")  # ultrasound only
    packed = pack([us, mg], layout, n)
    identity = {"us": lambda x, g: x, "mg": lambda x, g: x}
    out = augment_instances(packed, layout, identity, torch.Generator().manual_seed(0), 0.5)
    out_us = out[:, : us[0].numel()].isfinite().all(dim=1)
    out_mg = out[:, us[0].numel() :].view(n, len(VIEWS), -1).isfinite().all(dim=2).any(dim=1)
    assert bool((out_us | out_mg).all())  # never both
    assert bool(out_mg[300:350].all()) and bool(out_us[350:].all())  # never the only one
    dropped_us, dropped_mg = int((~out_us[:300]).sum()), int((~out_mg[:300]).sum())
    assert 50 < dropped_us < 100 and 50 < dropped_mg < 100  # 300 * 0.5 * 0.5 = 75 each
    kept = out_us[:300] & out_mg[:300]
    torch.testing.assert_close(out[:300][kept], packed[:300][kept], equal_nan=True)


# -- training on paired phantoms -----------------------------------------------------------------


def _train_paired(root, us_signal, mg_signal, fusion="concat"):
    """240 paired cases split by case (84 held out), a fusion model trained by the training loop
    with modality dropout (about 25 s on one thread), scored US only / MG only / both."""
    plan = SynthPlan(n_per_class=0, size=104, seed=3, paired_cases=240, us_signal=us_signal,
                     mg_signal=mg_signal)  # fmt: skip
    rows = read_manifest(write_phantom_dataset(root / "ph", plan))
    split = write_manifest(
        assign_splits(rows, SplitPlan(val=0.2, test=0.35, seed=0)), root / "split.csv"
    )
    config = load_train_config(None, [
        f"data.manifest={split}", f"out_dir={root / 'runs'}", "name=f", "model.arch=simple_cnn",
        "data.modality=null", "data.task=normal_vs_abnormal", "threads=1", "loader_workers=1",
        "preprocess.input_height=40", "preprocess.input_width=40",
        f"model.fusion={{branches: {{us: simple_cnn, mg: simple_cnn}}, fusion: {fusion}, "
        "width: 32, modality_dropout: 0.3, mg_preprocess: {input_height: 64, input_width: 48, "
        "resize: stretch, breast_crop: true, laterality: left}}",
        "optim.epochs=20", "optim.batch_size=16", "optim.warmup_epochs=1",
        "optim.early_stop_patience=0", "optim.ema_decay=0",
    ])  # fmt: skip
    torch.manual_seed(0)
    result = loop.train_model(config, show_progress=False)
    return result, evaluate_combinations(result.best_checkpoint, split="test", resamples=500)


def _auc(report, combination):
    return report["combinations"][combination]["auc"]


def test_fusion_beats_each_modality_when_both_carry_the_class(tmp_path):
    result, report = _train_paired(tmp_path, 0.7, 0.7)
    card = load_checkpoint(result.best_checkpoint).card
    assert card.arch == "late_fusion" and card.presence_input == "inputs_present"
    assert all(i.optional for i in card.inputs) and card.operating_point is not None
    assert [(i.modality, i.changes) for i in card.inputs][:2] == [("us", "frame"), ("mg", "case")]
    assert report["cases"] == 84
    print(report["combinations"], report["both_minus_us_only"], report["both_minus_mg_only"])
    # measured: US only 0.79, MG only 0.79, both 0.84 (CIs about +-0.1; differences +0.05 with
    # CIs from -0.03 to +0.13): each alone is well above chance, both clearly above each alone
    assert _auc(report, "us_only") > 0.7 and _auc(report, "mg_only") > 0.7
    assert _auc(report, "both") > max(_auc(report, "us_only"), _auc(report, "mg_only")) + 0.02
    with pytest.raises(EdgebcError, match="fusion_eval"):  # edgebc eval feeds images
        evaluate_checkpoint(result.best_checkpoint, tmp_path / "split.csv", tmp_path / "eval")
    share = report["share_by_ablation"]
    assert share["us"] + share["mg"] == pytest.approx(1.0) and 0.2 < share["us"] < 0.8


def test_when_the_mammograms_are_noise_fusion_answers_as_ultrasound_alone(tmp_path):
    result, report = _train_paired(tmp_path, 0.7, 0.0)
    print(report["combinations"], report["both_minus_us_only"], report["share_by_ablation"])
    assert _auc(report, "us_only") > 0.7
    assert _auc(report, "mg_only") < 0.65  # the mammograms know nothing of the class
    assert abs(report["both_minus_us_only"]["auc_difference"]) <= 0.03
    assert report["share_by_ablation"]["us"] > 0.6
    # a separately trained ultrasound-only model on the same cases: what fusion with no
    # mammogram must match (the issue's +-0.02 is on point values; the CI is reported beside)
    config = load_train_config(result.run_dir / "config.yaml", [
        "name=us", "model.fusion=null", "data.modality=us"])  # fmt: skip
    torch.manual_seed(0)
    baseline = loop.train_model(config, show_progress=False).best_checkpoint
    compared = evaluate_combinations(result.best_checkpoint, split="test", resamples=200,
                                     us_baseline=baseline)  # fmt: skip
    print(compared["us_model"], compared["us_only_minus_us_model"])
    difference = compared["us_only_minus_us_model"]
    assert difference["auc_difference"] == pytest.approx(
        _auc(compared, "us_only") - compared["us_model"]["auc"]
    )
    # measured: the US-only model 0.802, fusion without MG 0.788: -0.014 [-0.059, +0.030]
    assert compared["us_model"]["auc"] > 0.7 and abs(difference["auc_difference"]) < 0.05
    with pytest.raises(
        EdgebcError, match=r"an ultrasound baseline feeds one image \(a fusion model"
    ):
        evaluate_combinations(
            result.best_checkpoint, split="test", us_baseline=result.best_checkpoint
        )


def test_arcface_per_branch_trains_each_embedding_and_never_touches_the_logits():
    card = _card("concat")
    card = replace(card, arch_options={**card.arch_options, "arcface": True})
    torch.manual_seed(0)
    model = build_model(card)
    n = 6
    us = torch.rand(n, *US_PREP.input_shape)
    mg = torch.rand(n, len(VIEWS), *MG_PREP.input_shape)
    mg[:, 2:] = float("nan")
    us[4:] = float("nan")  # two cases without ultrasound: their rows are not in its ArcFace loss
    packed = pack([us, mg], model.layout, n)
    model.train()
    model.targets = torch.tensor([0, 1, 0, 1, 1, 0])
    model(packed)
    assert model.aux_loss is not None and float(model.aux_loss.detach()) > 0
    model.aux_loss.backward()
    assert model.branches["us"].features[0].weight.grad.abs().sum() > 0
    assert model.classifier[-1].weight.grad is None  # the ArcFace loss reaches no logit weight
    model.eval()
    with torch.no_grad():
        first = model(packed)
        model.arcface = None
        assert torch.equal(model(packed), first)
    assert model.aux_loss is None


# -- end to end: trained, exported, classified --------------------------------------------------


def test_a_trained_fusion_model_exports_and_classify_answers_as_torch_with_and_without_mg(
    tmp_path, capsys
):
    """The phantom config trained briefly by `edgebc train`, exported by `edgebc export` (a graph
    per branch: the ultrasound one and the four-view mammogram one, and the head), then
    `edgebc classify --ultrasound --mammogram` on a held-out paired case: its probabilities are
    PyTorch's, with the case's mammograms and with ultrasound alone."""
    import csv

    from edgebc.archive import iter_frames
    from edgebc.decode import ImageView
    from edgebc.fusion_graphs import HEAD, read_layout
    from edgebc.metrics import softmax
    from edgebc.preprocess import preprocess_chw, to_channels

    config = Path(__file__).resolve().parents[1] / "configs" / "fusion_phantoms.yaml"
    settings = [f"out_dir={tmp_path / 'runs'}", f"data.manifest={tmp_path / 'split.csv'}",
                f"data.phantoms.folder={tmp_path / 'paired'}", "data.phantoms.paired_cases=48",
                "data.phantoms.us_per_case=1",
                "optim.epochs=2", "threads=1", "loader_workers=1"]  # fmt: skip
    torch.manual_seed(0)
    assert (
        main(["train", "--config", str(config), *(a for s in settings for a in ("--set", s))]) == 0
    )
    printed = capsys.readouterr().out  # the one threshold, at each combination of inputs
    assert all(f"  {c}: " in printed for c in ("us_only", "mg_only", "both")), printed
    checkpoint = tmp_path / "runs" / "fusion-phantoms" / "best.pt"
    out = tmp_path / "export"
    assert main(["export", str(checkpoint), "--out", str(out), "--name", "fusion"]) == 0
    report = json.loads((out / "export.json").read_text())
    assert report["onnx"]["graphs"] == {"us": "fusion.us.onnx", "mg": "fusion.mg.onnx",
                                        HEAD: "fusion.onnx"}  # fmt: skip
    parity = report["onnx"]["fusion_parity_vs_torch"]
    assert set(parity["end_to_end"]) == {"us+mg", "us", "mg"}
    assert max(parity["branches"].values()) < 1e-4
    assert max(p["max_abs_logit_diff"] for p in parity["end_to_end"].values()) < 1e-4
    layout = read_layout(out / "fusion.mg.onnx")
    assert layout.branches["mg"] == ("mg_L_CC", "mg_L_MLO", "mg_R_CC", "mg_R_MLO")

    # a held-out case with both modalities
    rows = read_manifest(tmp_path / "split.csv")
    cases: dict[str, list] = {}
    for row in rows:
        if row.split == "test":
            cases.setdefault(row.patient_id, []).append(row)
    case = next(c for c in cases.values() if len({r.modality == "us" for r in c}) == 2)
    us_path = next(r.path for r in case if r.modality == "us")
    films = [(r.view, r.path) for r in case if r.modality != "us"]  # the manifest's `mammo`
    assert films

    loaded = load_checkpoint(checkpoint)
    card = loaded.card
    model = model_from_checkpoint(loaded).eval()
    by_name = {i.name: i for i in card.inputs}
    us_image = next(iter(iter_frames([us_path]))).image
    us = preprocess_chw(to_channels(us_image, 1), by_name["us"].preprocess)[None]
    views = {}
    for code, path in films:
        image = next(iter(iter_frames([path], 1, full_depth=True))).image
        stated = ImageView.from_code(code)
        view = ImageView.hung(stated.laterality or "L", stated.position, ImageView())
        name = "mg_" + code.replace("-", "_")
        views[name] = preprocess_chw(to_channels(image, 1), by_name[name].preprocess, view=view)

    def torch_probs(with_mg):
        names = [i.name for i in card.inputs][1:]
        feeds = [torch.from_numpy(us)]
        present = [1.0]
        for name in names:
            given = with_mg and name in views
            tensor = views[name][None] if given else np.zeros((1, *by_name[name].shape), np.float32)
            feeds.append(torch.from_numpy(tensor))
            present.append(float(given))
        with torch.no_grad():
            logits, _ = model(*feeds, torch.tensor([present]))
        return softmax(logits.numpy(), card.temperature)[0]

    def classify(extra):
        result = tmp_path / f"rows{len(extra)}.csv"
        code = main(["classify", str(out / "fusion.onnx"), "--ultrasound", str(us_path), *extra,
                     "--case", "held-out", "--out", str(result)])  # fmt: skip
        assert code == 0, capsys.readouterr().err
        return list(csv.DictReader(result.open()))

    # the 104 px paired phantoms' mammograms read as speckled (contrast about 0.07) to the gate
    # tuned on real films (0.052): the gate is loosened here, for phantoms only
    both = classify(["--mammogram", *(f"{code}={path}" for code, path in films),
                     "--set", "mammography_quality.max_speckle_contrast=0.12"])  # fmt: skip
    assert [r["level"] for r in both] == ["mammogram"] * len(films) + ["frame", "case"]
    frame = both[len(films)]
    assert frame["modalities"] == "us+mg", both
    assert frame["inputs"] == "+".join(["us", *(n for n in by_name if n in views)])
    expected = torch_probs(True)
    got = [float(frame[f"p_{c}"]) for c in card.class_names]
    np.testing.assert_allclose(got, expected, atol=1e-4)
    alone = classify([])
    assert alone[0]["modalities"] == "us"
    np.testing.assert_allclose([float(alone[0][f"p_{c}"]) for c in card.class_names],
                               torch_probs(False), atol=1e-4)  # fmt: skip
    # the mammograms do change the answer here: both paths were really compared
    assert np.abs(expected - torch_probs(False)).max() > 1e-4

    # on the device: the case's views embedded by one run of the mammogram branch, kept for every
    # frame; and, the ultrasound input being optional, the case from its mammograms alone
    from edgebc.fusion import FusionClassifier, Mammogram, open_fusion_graphs
    from edgebc.quality import MammographyGate

    calls = []

    class Counted:
        def __init__(self, graph, backend):
            self.graph, self.backend = graph, backend

        def __getattr__(self, name):
            return getattr(self.backend, name)

        def run_named(self, feeds):
            calls.append(self.graph)
            return self.backend.run_named(feeds)

    graphs = open_fusion_graphs(out / "fusion.mg.onnx")
    classifier = FusionClassifier(
        {g: Counted(g, b) for g, b in graphs.items()},
        mammography_gate=MammographyGate(max_speckle_contrast=0.12),
    )
    mammograms = [
        Mammogram(next(iter(iter_frames([path], 1, full_depth=True))).image,
                  ImageView.from_code(code), str(path))
        for code, path in films
    ]  # fmt: skip
    context = classifier.attach("held-out", mammograms)
    assert calls == ["mg"] and set(context.embeddings) == {"mg"}
    assert context.inputs == tuple(n for n in by_name if n in views)
    decisions = classifier.classify_batch([us_image, us_image])
    assert calls == ["mg", "us", HEAD] and all(d.modalities == ("us", "mg") for d in decisions)
    np.testing.assert_allclose(
        list(decisions[0].decision.probabilities.values()), expected, atol=1e-4
    )
    names = [i.name for i in card.inputs]
    feeds = [torch.zeros(1, *by_name["us"].shape)]
    feeds += [torch.from_numpy(views[n][None]) if n in views
              else torch.zeros(1, *by_name[n].shape) for n in names[1:]]  # fmt: skip
    with torch.no_grad():
        logits, _ = model(*feeds, torch.tensor([[0.0, *(float(n in views) for n in names[1:])]]))
    mg_alone = classifier.classify_mammograms()
    assert mg_alone.modalities == ("mg",) and mg_alone.inputs == context.inputs
    np.testing.assert_allclose(list(mg_alone.decision.probabilities.values()),
                               softmax(logits.numpy(), card.temperature)[0], atol=1e-4)  # fmt: skip
    classifier.detach()
    assert classifier.classify(us_image).modalities == ("us",)
    # a case is one breast: a film of the other side is left out, saying why, never fused
    other = "R" if films[0][0].startswith("L") else "L"
    stray = Mammogram(mammograms[0].image[:, ::-1], ImageView.from_code(f"{other}-CC"), "stray.png")
    mixed = classifier.attach("mixed", [mammograms[0], stray])
    assert [u.input is None for u in mixed.mammograms] == [False, True]
    assert "a case is one breast" in str(mixed.mammograms[1].quality.reason)
