"""A mammogram + ultrasound fusion model on the device: exported as branch graphs and a head, each
and the whole path matching PyTorch; the mammogram embedded once per case, never per frame; an
absent or refused mammogram answered from ultrasound alone; `edgebc classify` rows per case."""

import csv
import hashlib
import json
import shutil
from dataclasses import replace

import cv2
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch (the [train] extra) is not installed")
pytest.importorskip("onnx", reason="onnx (the [export] extra) is not installed")

from edgebc.archive import iter_frames
from edgebc.backends import open_backend
from edgebc.cli import main
from edgebc.decode import ImageView, read_study
from edgebc.demo import DEMO_MODEL
from edgebc.errors import EdgebcError
from edgebc.export.bundle import ExportOptions, run_export
from edgebc.fusion import FusionClassifier, Mammogram, open_fusion_graphs
from edgebc.fusion_graphs import HEAD, layout_from_metadata
from edgebc.integrity import read_manifest
from edgebc.metrics import softmax
from edgebc.model_card import ModelCard, ModelInput, ModelOutput, read_card
from edgebc.preprocess import PreprocessCard, preprocess_chw
from edgebc.synth.mammogram import draw_breast, make_mammogram
from edgebc.synth.ultrasound import make_ultrasound_phantom, phantom_rng
from edgebc.task import TASKS
from edgebc.train.checkpoint import Checkpoint, build_model, save_checkpoint, sha256_of_state
from tests.test_decode import _dicom_bytes

US_PREP = PreprocessCard(input_height=32, input_width=32)
MG_PREP = PreprocessCard(input_height=48, input_width=40, breast_crop=True, laterality="left")


def _fusion_checkpoint(path, seed=0):
    """An untrained two-branch model (ultrasound required, a left CC mammogram optional, once per
    case), as tests/test_model_record.py builds one; the weights are random but fixed."""
    card = ModelCard(
        name="us-mg", arch="late_fusion", task=TASKS["three_class"],
        inputs=(ModelInput("us", US_PREP), ModelInput("mg_cc", MG_PREP, "mg", "L-CC", optional=True, changes="case")),
        outputs=(ModelOutput("logits", "logits", 3), ModelOutput("features", "features", 16)),
        arch_options={"fusion": "sum", "branch_arch": {"us": "simple_cnn", "mg_cc": "simple_cnn"},
                      "width": 16, "width_mult": 0.5, "dropout": 0.0},
    )  # fmt: skip
    torch.manual_seed(seed)
    model = build_model(card).eval()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    card = replace(card, weights_sha256=sha256_of_state(state))
    save_checkpoint(path, Checkpoint(card, state, {"epoch": 0}))
    return model


def _ultrasound(k):
    return make_ultrasound_phantom(("normal", "benign", "malignant")[k % 3], phantom_rng(40, k), 96, 128).image  # fmt: skip


def _film(side="L", view="CC", seed=3):
    rng = np.random.default_rng(seed)
    return make_mammogram(draw_breast("malignant", rng), rng, side, view, 256, 208, bits=8).image


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("fusion")
    torch.set_num_threads(1)
    model = _fusion_checkpoint(root / "fusion.pt")
    out = root / "export"
    assert main(["export", str(root / "fusion.pt"), "--out", str(out), "--name", "fusion"]) == 0
    return root, model, json.loads((out / "export.json").read_text())


L_CC = ImageView.from_code("L-CC")


def _torch_probs(model, us_frames, film=None, view=L_CC):
    """PyTorch's answer through the shared preprocessing: both branches, or ultrasound alone
    (a zero mammogram embedding marked absent)."""
    us = torch.from_numpy(np.stack([preprocess_chw(f, US_PREP) for f in us_frames]))
    with torch.no_grad():
        embeddings = [model.embed("us", us)]
        present = torch.ones(len(us_frames), 2)
        if film is None:
            embeddings.append(torch.zeros_like(embeddings[0]))
            present[:, 1] = 0
        else:
            mg = torch.from_numpy(preprocess_chw(film, MG_PREP, view=view))[None]
            embeddings.append(model.embed("mg_cc", mg).expand(len(us_frames), -1))
        logits, _ = model.head(embeddings, present)
    return softmax(logits.numpy())


def test_a_fusion_checkpoint_exports_branch_graphs_and_a_head_each_matching_torch(exported):
    root, model, report = exported
    folder = root / "export"
    files = {"us": "fusion.us.onnx", "mg_cc": "fusion.mg_cc.onnx", HEAD: "fusion.onnx"}
    assert report["onnx"]["graphs"] == files
    assert set(read_manifest(folder)) == set(files.values())  # every graph is verified
    cards = [read_card(folder / f) for f in files.values()]
    assert all(c == cards[0] for c in cards)  # one card, in every graph
    assert [(i.name, i.modality, i.optional, i.changes) for i in cards[0].inputs] == [
        ("us", "us", False, "frame"), ("mg_cc", "mg", True, "case")]  # fmt: skip
    import onnxruntime

    for graph, file in files.items():
        session = onnxruntime.InferenceSession(
            str(folder / file), providers=["CPUExecutionProvider"]
        )
        layout = layout_from_metadata(session.get_modelmeta().custom_metadata_map, file)
        assert layout.graph == graph and layout.files == files and layout.order == ("us", "mg_cc")
        names = [i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()]
        assert names == ((["us_embedding", "mg_cc_embedding", "present"], ["logits", "features"])
                         if graph == HEAD else ([graph], [f"{graph}_embedding"]))  # fmt: skip
    parity = report["onnx"]["fusion_parity_vs_torch"]
    assert set(parity["end_to_end"]) == {"us+mg_cc", "us", "mg_cc"}  # each modality absent in turn
    assert max(parity["branches"].values()) < 1e-5 and parity["head"]["max_abs_logit_diff"] < 1e-5
    assert all(p["decision_agreement"] == 1.0 for p in parity["end_to_end"].values())
    # and, apart from the export's own check, the graphs on new inputs against the torch model
    us = np.stack([preprocess_chw(_ultrasound(k), US_PREP) for k in range(3)])
    mg = np.repeat(preprocess_chw(_film(), MG_PREP, view=ImageView.from_code("L-CC"))[None], 3, 0)
    graphs = open_fusion_graphs(folder / "fusion.onnx")
    fed = {"us_embedding": graphs["us"].run_named({"us": us})["us_embedding"],
           "mg_cc_embedding": graphs["mg_cc"].run_named({"mg_cc": mg})["mg_cc_embedding"],
           "present": np.ones((3, 2), np.float32)}  # fmt: skip
    outputs = graphs[HEAD].run_named(fed)
    with torch.no_grad():
        logits, features = model(torch.from_numpy(us), torch.from_numpy(mg))
    np.testing.assert_allclose(outputs["logits"], logits.numpy(), atol=1e-4)
    np.testing.assert_allclose(outputs["features"], features.numpy(), atol=1e-4)
    assert "end to end with us present" in (folder / "export.md").read_text()


def test_the_graphs_refuse_bad_feeds_and_strangers(exported, tmp_path):
    root, _model, _report = exported
    folder = root / "export"
    head = open_backend(folder / "fusion.onnx")
    zeros = {"us_embedding": np.zeros((1, 16), np.float32),
             "mg_cc_embedding": np.zeros((1, 16), np.float32)}  # fmt: skip
    with pytest.raises(ValueError, match=r"requires its input us \(not optional"):
        head.run_named({**zeros, "present": np.array([[0, 1]], np.float32)})
    with pytest.raises(ValueError, match="takes us_embedding, mg_cc_embedding, present"):
        head.run_named(zeros)
    with pytest.raises(ValueError, match=r"expected us_embedding of shape \(N, 16\)"):
        head.run_named({**zeros, "us_embedding": np.zeros((1, 8), np.float32),
                        "present": np.ones((1, 2), np.float32)})  # fmt: skip
    # a branch graph from another export (other weights) put beside this head is refused
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    (copy / "MANIFEST.sha256").unlink()
    _fusion_checkpoint(tmp_path / "other.pt", seed=1)
    run_export(tmp_path / "other.pt", ExportOptions(out_dir=tmp_path / "other", name="fusion"))
    shutil.copy(tmp_path / "other" / "fusion.mg_cc.onnx", copy / "fusion.mg_cc.onnx")
    with pytest.raises(EdgebcError, match="is not the mg_cc graph of the same export"):
        open_fusion_graphs(copy / "fusion.onnx")
    # and with the manifest, a damaged graph is refused before it is run
    (copy / "fusion.us.onnx").write_bytes(b"damaged")
    shutil.copy(folder / "MANIFEST.sha256", copy / "MANIFEST.sha256")
    with pytest.raises(EdgebcError, match=r"does not match MANIFEST\.sha256"):
        open_fusion_graphs(copy / "fusion.onnx")
    with pytest.raises(EdgebcError, match=r"--fp16 not done for fusion models"):
        run_export(root / "fusion.pt", ExportOptions(out_dir=tmp_path / "x", fp16=True))
    assert not (tmp_path / "x").exists()  # a refused export leaves nothing behind


class Counting:
    """A real backend, its runs counted (which graph ran, how often)."""

    def __init__(self, backend, calls, fed=None):
        self.backend, self.calls, self.fed = backend, calls, fed if fed is not None else []

    def __getattr__(self, name):
        return getattr(self.backend, name)

    def run_named(self, feeds):
        self.calls.append(self.backend.fusion.graph)
        self.fed.append(feeds)
        return self.backend.run_named(feeds)


def test_the_mammogram_branch_runs_once_per_case_and_each_frame_is_fused(exported):
    root, model, _report = exported
    calls = []
    graphs = {
        g: Counting(b, calls)
        for g, b in open_fusion_graphs(root / "export" / "fusion.onnx").items()
    }
    classifier = FusionClassifier(graphs)
    film = _film()
    context = classifier.attach("case-7", [Mammogram(film, source="cc.png")])
    assert calls == ["mg_cc"] and context.inputs == ("mg_cc",)
    frames = [_ultrasound(k) for k in range(5)]
    first = classifier.classify_batch(frames[:3])
    second = [classifier.classify(f) for f in frames[3:]]
    # five frames: the mammogram branch still ran once; ultrasound and head once per call
    assert calls.count("mg_cc") == 1 and calls.count("us") == 3 and calls.count(HEAD) == 3
    decisions = first + second
    assert all(d.inputs == ("us", "mg_cc") and d.modalities == ("us", "mg") for d in decisions)
    assert all(d.case == "case-7" for d in decisions)
    probs = np.array([list(d.decision.probabilities.values()) for d in decisions])
    np.testing.assert_allclose(probs, _torch_probs(model, frames, film), atol=1e-5)
    record = decisions[0].to_json()
    assert record["modalities"] == ["us", "mg"] and record["mammograms"][0]["input"] == "mg_cc"
    assert len(record["mammograms"][0]["pixels_sha256"]) == 64 and "image" not in record
    # a new case embeds its own mammogram once more
    classifier.attach("case-8", [Mammogram(_film(seed=9), source="cc2.png")])
    assert calls.count("mg_cc") == 2


def test_without_a_passing_mammogram_the_answer_is_the_ultrasound_only_one(exported):
    root, model, _report = exported
    fed = []
    graphs = open_fusion_graphs(root / "export" / "fusion.onnx")
    classifier = FusionClassifier(
        {g: Counting(b, [], fed if g == HEAD else None) for g, b in graphs.items()}
    )
    frames = [_ultrasound(k) for k in range(3)]
    us_only = _torch_probs(model, frames)
    fused = _torch_probs(model, frames, _film())
    assert np.abs(fused - us_only).max() > 1e-3  # the mammogram does change the answer here

    def probs(decisions):
        return np.array([list(d.decision.probabilities.values()) for d in decisions])

    alone = classifier.classify_batch(frames)  # nothing attached
    assert all(d.inputs == ("us",) and d.modalities == ("us",) for d in alone)
    # the head is told the mammogram is absent (what it holds then does not count)
    assert fed[-1]["present"].tolist() == [[1, 0]] * 3 and not fed[-1]["mg_cc_embedding"].any()
    np.testing.assert_allclose(probs(alone), us_only, atol=1e-5)
    # an ultrasound frame given as the mammogram: the mammography gate refuses it
    context = classifier.attach("c1", [Mammogram(frames[0], source="wrong.png")])
    assert context.inputs == () and context.mammograms[0].input is None
    assert context.mammograms[0].quality.check == "ultrasound"
    refused = classifier.classify_batch(frames)
    assert all(d.modalities == ("us",) for d in refused)
    np.testing.assert_allclose(probs(refused), us_only, atol=1e-5)
    # a mammogram of another view than the model's (its DICOM header says R-MLO) is left out
    context = classifier.attach(
        "c2", [Mammogram(_film("R", "MLO"), ImageView.from_code("R-MLO"), "r.dcm")]
    )
    assert (
        context.inputs == ()
        and "its view R-MLO is none of the model's (L-CC)" in context.mammograms[0].quality.reason
    )
    # a header that gives only the side, and the wrong one, is refused too (never read as L-CC)
    context = classifier.attach(
        "c2b", [Mammogram(_film("R"), ImageView("R", None, "right"), "r.dcm")]
    )
    assert (
        context.inputs == ()
        and "its side R (its DICOM header) is not the model's L-CC"
        in context.mammograms[0].quality.reason
    )
    # attached, then detached: back to ultrasound alone
    classifier.attach("c3", [Mammogram(_film(), source="cc.png")])
    assert classifier.classify(frames[0]).modalities == ("us", "mg")
    assert fed[-1]["present"].tolist() == [[1, 1]]
    classifier.detach()
    np.testing.assert_allclose(probs([classifier.classify(frames[0])]), us_only[:1], atol=1e-5)
    # a blank ultrasound frame gets no decision and uses nothing
    blank = classifier.classify(np.zeros((96, 128), np.uint8))
    assert (
        blank.decision.label is None
        and blank.inputs == ()
        and "uniform" in str(blank.decision.quality)
    )
    with pytest.raises(EdgebcError, match="requires its ultrasound input us"):
        classifier.classify_mammograms()


def test_classify_writes_rows_per_mammogram_frame_and_case(exported, tmp_path, capsys):
    root, model, _report = exported
    frames = [_ultrasound(k) for k in range(3)]
    cv2.imwrite(str(tmp_path / "still.png"), frames[0])
    (tmp_path / "cine.dcm").write_bytes(_dicom_bytes(np.stack(frames), frames=3))
    film = _film()
    (tmp_path / "mg").mkdir()
    (tmp_path / "mg" / "cc.dcm").write_bytes(
        _dicom_bytes(film, ImageLaterality="L", ViewPosition="CC")
    )
    out = tmp_path / "rows.csv"
    code = main(["classify", str(root / "export" / "fusion.onnx"), "--ultrasound", str(tmp_path / "still.png"),
                 str(tmp_path / "cine.dcm"), "--mammogram", str(tmp_path / "mg"), "--case", "p-12",
                 "--out", str(out)])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    rows = list(csv.DictReader(out.open()))
    assert [(r["level"], r["frame"]) for r in rows] == [
        ("mammogram", ""), ("frame", ""), ("frame", "0"), ("frame", "1"), ("frame", "2"), ("case", "")]  # fmt: skip
    assert (
        rows[0]["inputs"] == "mg_cc"
        and rows[0]["source"].endswith("cc.dcm")
        and rows[0]["quality"] == "ok"
    )
    assert all(r["case"] == "p-12" for r in rows)
    decided = rows[1:]
    assert all(
        r["inputs"] == "us+mg_cc" and r["modalities"] == "us+mg" and r["decision"] for r in decided
    )
    # each frame as the device reads it (the cine's frames from the DICOM) gets torch's answer
    cine = [item.image for item in iter_frames([tmp_path / "cine.dcm"])]
    expected = _torch_probs(model, [frames[0], *cine], film, ImageView("L", "CC", "left"))
    np.testing.assert_allclose(
        [float(r["p_malignant"]) for r in rows[1:5]], expected[:, 2], atol=1e-5
    )
    mean = np.mean(
        [[float(r[f"p_{c}"]) for c in ("normal", "benign", "malignant")] for r in rows[1:5]], axis=0
    )
    assert float(rows[5]["p_malignant"]) == pytest.approx(mean[2], abs=1e-5)
    # no mammogram: every row says ultrasound alone, and the answer is the ultrasound-only one
    out = tmp_path / "us.jsonl"
    assert main(["classify", str(root / "export" / "fusion.onnx"), "--ultrasound", str(tmp_path / "still.png"),
                 "--out", str(out)]) == 0  # fmt: skip
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["level"], r["modalities"], r["case"]) for r in rows] == [
        ("frame", "us", "case"),
        ("case", "us", "case"),
    ]
    assert rows[0]["p_malignant"] == pytest.approx(_torch_probs(model, frames[:1])[0, 2], abs=1e-5)
    # a PNG says no view: R-MLO=... states it, and the L-CC model leaves it out saying why
    cv2.imwrite(str(tmp_path / "film.png"), film)
    out = tmp_path / "stated.csv"
    assert main(["classify", str(root / "export" / "fusion.onnx"), "--ultrasound", str(tmp_path / "still.png"),
                 "--mammogram", f"R-MLO={tmp_path / 'film.png'}", "--out", str(out)]) == 0  # fmt: skip
    rows = list(csv.DictReader(out.open()))
    assert rows[0]["level"] == "mammogram" and rows[0]["inputs"] == ""
    assert "its view R-MLO is none of the model's (L-CC)" in rows[0]["quality"]
    assert rows[-1]["modalities"] == "us"
    # a stated view its DICOM header contradicts is an error row, never read as the stated one
    out = tmp_path / "contradicted.csv"
    assert main(["classify", str(root / "export" / "fusion.onnx"), "--ultrasound", str(tmp_path / "still.png"),
                 "--mammogram", f"L-MLO={tmp_path / 'mg' / 'cc.dcm'}", "--out", str(out)]) == 1  # fmt: skip
    rows = list(csv.DictReader(out.open()))
    assert rows[0]["level"] == "mammogram" and "header says view position CC" in rows[0]["error"]
    assert rows[-1]["modalities"] == "us"
    # a one-image model (the demo) is no fusion model; INPUTS beside --ultrasound are refused
    capsys.readouterr()
    assert main(["classify", str(DEMO_MODEL), "--ultrasound", str(tmp_path / "still.png"),
                 "--out", str(out)]) == 1  # fmt: skip
    assert "not a graph of an exported fusion model" in capsys.readouterr().err
    assert main(["classify", str(root / "export" / "fusion.onnx"), str(tmp_path / "still.png"),
                 "--ultrasound", str(tmp_path / "still.png"), "--out", str(out)]) == 1  # fmt: skip
    assert "not both" in capsys.readouterr().err
    # the fusion model given images without saying which modality each is: told how
    assert main(["classify", str(root / "export" / "fusion.onnx"), str(tmp_path / "still.png"),
                 "--out", str(out)]) == 1  # fmt: skip
    assert "--ultrasound US... and --mammogram MG..." in capsys.readouterr().err
    # a lesion localiser is not done for fusion models: refused, never silently left out
    assert main(["classify", str(root / "export" / "fusion.onnx"), "--ultrasound", str(tmp_path / "still.png"),
                 "--set", "localiser=loc.onnx", "--out", str(out)]) == 1  # fmt: skip
    assert "localiser is not done for fusion models" in capsys.readouterr().err


def test_the_model_store_refuses_a_fusion_export_rather_than_install_its_head_alone(
    exported, tmp_path
):
    from edgebc.errors import EdgebcError
    from edgebc.model_store import ModelStore

    root, _model, _report = exported
    with pytest.raises(EdgebcError, match=r"has 2 inputs .* run it from the folder"):
        ModelStore(tmp_path / "store").install(root / "export" / "fusion.onnx")
    assert not (tmp_path / "store" / "current").exists()


def _study_film(path, study, patient="p-1", side="L", view="CC", seed=3):
    """A DICOM mammogram of `study` and `patient` (the header's view: `side` and `view`)."""
    path.write_bytes(_dicom_bytes(_film(side, view, seed), ImageLaterality=side, ViewPosition=view,
                                  StudyInstanceUID=study, PatientID=patient))  # fmt: skip
    return path


def _patient_sha(patient):
    return hashlib.sha256(f"PatientID={patient}".encode()).hexdigest()


def _study_scan(path, study, patient, first=0):
    """A two-frame DICOM ultrasound cine of `study` and `patient` (None: no PatientID)."""
    tags = {"StudyInstanceUID": study} | ({} if patient is None else {"PatientID": patient})
    path.write_bytes(_dicom_bytes(np.stack([_ultrasound(first), _ultrasound(first + 1)]),
                                  frames=2, **tags))  # fmt: skip
    return path


def test_a_cases_films_are_one_study_of_one_patient(exported, tmp_path, capsys):
    """Films of several studies (even of one patient: this year's CC, last year's MLO), or of
    several patients, are refused together, naming them, never fused; a film that is not DICOM
    has no study, and the context says so; the patient's hash stays in memory."""
    root, _model, _report = exported
    classifier = FusionClassifier.open(root / "export" / "fusion.onnx")
    mg = tmp_path / "mg"
    mg.mkdir()
    _study_film(mg / "a.dcm", "1.2.3.1")
    _study_film(mg / "b.dcm", "1.2.3.2", view="MLO")  # the same patient's other study
    cv2.imwrite(str(tmp_path / "still.png"), _ultrasound(0))
    out = tmp_path / "rows.csv"
    args = ["classify", str(root / "export" / "fusion.onnx"), "--ultrasound", str(tmp_path / "still.png"),
            "--out", str(out), "--mammogram"]  # fmt: skip
    assert main([*args, str(mg)]) == 1
    err = capsys.readouterr().err
    assert "films of several studies (2 different StudyInstanceUIDs; " in err, err
    assert "A: " + str(mg / "a.dcm") in err and "B: " + str(mg / "b.dcm") in err
    assert not out.exists()  # nothing written, nothing fused
    # one study, two patients: refused as well (the PatientIDs compared as hashes)
    _study_film(mg / "b.dcm", "1.2.3.1", patient="p-2", view="MLO")
    assert main([*args, str(mg)]) == 1
    err += capsys.readouterr().err
    assert "films of several patients (2 different PatientIDs; " in err
    assert "p-1" not in err and "1.2.3.1" not in err and _patient_sha("p-1") not in err
    # through the library: refused before anything changes
    films = [Mammogram(_film(), L_CC, "a", study=read_study((mg / "a.dcm").read_bytes())),
             Mammogram(_film(), L_CC, "b", study=read_study((mg / "b.dcm").read_bytes()))]  # fmt: skip
    kept = classifier.attach("kept", [Mammogram(_film(), L_CC, "cc.png")])
    with pytest.raises(ValueError, match="A: a; B: b"):
        classifier.attach("mixed", films)
    assert classifier.context is kept
    # one study: fused; the context names its study (hashed), a PNG's is unknown; the patient's
    # hash is kept for comparing, out of every text the context gives
    (mg / "b.dcm").unlink()
    cv2.imwrite(str(mg / "c.png"), _film())
    assert main([*args, str(mg / "a.dcm"), f"L-CC={mg / 'c.png'}"]) == 0
    context = classifier.attach("one", [films[0], Mammogram(_film(), L_CC, "c.png")])
    study = hashlib.sha256(b"StudyInstanceUID=1.2.3.1").hexdigest()
    assert context.study_sha256 == study and context.patient_sha256 == _patient_sha("p-1")
    assert [m.study_sha256 for m in context.mammograms] == [study, None]
    assert context.study_note() == (
        f"mammography DICOM study {study}; study unknown for c.png (not DICOM, or no "
        "StudyInstanceUID): not checked against the other films' study; a DICOM ultrasound frame "
        "of another patient (PatientID) is never fused"
    )
    assert _patient_sha("p-1") not in repr(context) + json.dumps([m.to_json() for m in context.mammograms])  # fmt: skip
    alone = classifier.attach("png", [Mammogram(_film(), L_CC, "c.png")])
    assert alone.patient_sha256 is None and alone.study_note().endswith(
        "no film names its patient (PatientID): the ultrasound is not checked against one"
    )


def test_classify_fuses_the_patients_ultrasound_study_never_another_patients(exported, tmp_path, capsys):  # fmt: skip
    """A woman's mammograms and her ultrasound are separate DICOM studies: her ultrasound of its
    own study is fused with her films; another patient's frames are error rows, never fused,
    and nothing written names a patient; a case's ultrasound of two studies is refused."""
    root, _model, _report = exported
    model = str(root / "export" / "fusion.onnx")
    film = _study_film(tmp_path / "cc.dcm", "1.2.3.1", patient="p-1")  # the mammography study
    same = _study_scan(tmp_path / "same.dcm", "1.2.3.7", "p-1")  # her ultrasound study
    unnamed = _study_scan(tmp_path / "unnamed.dcm", "1.2.3.7", None, first=4)  # no PatientID
    other = _study_scan(tmp_path / "other.dcm", "1.2.3.8", "p-2", first=2)  # another woman's
    out = tmp_path / "rows.jsonl"
    args = ["classify", model, "--mammogram", str(film), "--case", "A1", "--out", str(out)]
    assert main([*args, "--ultrasound", str(same), str(unnamed), str(other)]) == 1
    err = capsys.readouterr().err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["level"], r["modalities"]) for r in rows
            if r["source"].endswith(("same.dcm", "unnamed.dcm"))] == [("frame", "us+mg")] * 4  # fmt: skip
    refused = [r for r in rows if r["source"].endswith("other.dcm")]
    assert len(refused) == 2 and all(r.get("decision", "") == "" for r in refused)
    assert all(r["error"].endswith("DICOM of another patient (PatientID) than the case's "
                                   "mammograms; never fused") for r in refused)  # fmt: skip
    assert "another patient" in err
    # the fused frames are what her films and her frames give; the case row is theirs alone
    classifier = FusionClassifier.open(model)
    classifier.attach("A1", [Mammogram(_film(), L_CC, "cc.dcm")])
    fused = classifier.classify_batch([_ultrasound(k) for k in (0, 1, 4, 5)])
    (case,) = [r for r in rows if r["level"] == "case"]
    expected = classifier.case_decision(fused).decision.positive_probability
    assert case["modalities"] == "us+mg"
    assert case["positive_probability"] == pytest.approx(expected, abs=1e-4)
    text = out.read_text() + err
    for secret in ("p-1", "p-2", _patient_sha("p-1"), _patient_sha("p-2")):
        assert secret not in text
    # her ultrasound of two studies is not one case: refused, naming the files, nothing written
    later = _study_scan(tmp_path / "later.dcm", "1.2.3.9", "p-1")
    out.unlink()
    assert main([*args, "--ultrasound", str(same), str(later), str(other)]) == 1
    err = capsys.readouterr().err
    assert (f"the case's ultrasound is of several DICOM studies (2 different StudyInstanceUIDs; "
            f"A: {same}; B: {later}): a case is one ultrasound study") in err  # fmt: skip
    assert not out.exists()
    # films that name no patient (a PNG): her ultrasound and another's are not one case either
    cv2.imwrite(str(tmp_path / "cc.png"), _film())
    assert main([*args[:3], f"L-CC={tmp_path / 'cc.png'}", *args[4:], "--ultrasound", str(same),
                 str(other)]) == 1  # fmt: skip
    err = capsys.readouterr().err
    assert (f"the case's ultrasound is of several patients (2 different PatientIDs; A: {same}; "
            f"B: {other}): never fused as one case") in err  # fmt: skip
    assert not out.exists() and "p-2" not in err and _patient_sha("p-2") not in err


def test_the_view_used_is_recorded_and_a_header_position_must_agree(exported):
    """A film is recorded with the view the model read it as (its header's beside it), and a
    header that gives only the view position must agree with the input's (no side needed)."""
    root, _model, _report = exported
    classifier = FusionClassifier.open(root / "export" / "fusion.onnx")
    context = classifier.attach("c", [Mammogram(_film(), source="cc.png")])  # no view said
    use = context.mammograms[0]
    assert (use.input, use.view, use.header_view) == ("mg_cc", "L-CC", None)
    assert context.views == ("L-CC",)
    assert use.to_json()["view"] == "L-CC" and use.to_json()["header_view"] is None
    mlo = Mammogram(_film("L", "MLO"), ImageView(None, "MLO", None), "mlo.dcm")  # no side
    context = classifier.attach("c", [mlo])
    use = context.mammograms[0]
    assert context.inputs == () and use.input is None and use.header_view == "MLO"
    assert "its view position MLO (its DICOM header) is not the model's L-CC" in use.quality.reason
    side_only = Mammogram(_film(), ImageView("L", None, "left"), "l.dcm")
    use = classifier.attach("c", [side_only]).mammograms[0]
    assert (use.input, use.view, use.header_view) == ("mg_cc", "L-CC", "L")
