"""A classifier trained on the lesion localiser's crops: training reads the crop the cart cuts
(the same tensor), the card's lineage names the localiser and margin, and the cart runs it only
behind that localiser with that margin."""

from __future__ import annotations

import dataclasses
from dataclasses import replace

import numpy as np
import pytest

from edgebc.classifier import FrameClassifier
from edgebc.data.records import Sample
from edgebc.data.sample_image import sample_input
from edgebc.errors import EdgebcError
from edgebc.integrity import sha256_file
from edgebc.localiser import (
    CROP_TRAINED,
    check_crop_trained,
    crop_box,
    lesion_crop_of,
    open_lesion_crop,
)
from edgebc.quality import QualityGate
from tests.test_localiser import (
    box_to_input,
    classifier_card,
    lesion_frame,
    localiser_card,
    write_graph,
)


def _localiser(path, bias: float = 66.4):
    prep = localiser_card().preprocess
    box = box_to_input((150, 60, 60, 60), (200, 300), prep).tolist()  # on lesion_frame's square
    return write_graph(path, localiser_card(0.5), box, gain=50.0, bias=bias)


class Recording:
    """A backend that keeps the tensors the cart sends it."""

    def __init__(self, backend):
        self.inner, self.seen = backend, []
        self.name, self.card, self.model_sha256 = backend.name, backend.card, backend.model_sha256

    def run(self, batch):
        self.seen.append(batch.copy())
        return self.inner.run(batch)

    def run_named(self, feeds):
        return self.inner.run_named(feeds)

    def close(self):
        self.inner.close()


def test_training_reads_exactly_the_tensor_the_cart_classifies(tmp_path):
    """One preprocessing for crops too: the frame read for training through the localiser's crop
    gives the tensor the cart sends its classifier after localise -> crop."""
    import cv2

    from edgebc.backends import open_backend
    from edgebc.localiser import open_localiser

    loc = _localiser(tmp_path / "loc.onnx")
    cls = write_graph(tmp_path / "cls.onnx", classifier_card(), None, gain=4.0, bias=0.0)
    frame = lesion_frame()
    cv2.imwrite(str(tmp_path / "frame.png"), frame)
    sample = Sample(path=tmp_path / "frame.png", label="malignant")

    backend = Recording(open_backend(cls, threads=1))
    cart = FrameClassifier(backend, gate=QualityGate(), localiser=open_localiser(loc),
                           margin=0.15)  # fmt: skip
    decision = cart.classify(frame)
    assert decision.label == "malignant" and decision.box is not None
    crop = open_lesion_crop(loc, 0.15)
    trained_on = sample_input(sample, cart.card.preprocess, crop)
    np.testing.assert_array_equal(trained_on, backend.seen[0][0])
    # and it is the crop, not the frame: the box widened by the margin
    x0, y0, x1, y1 = crop_box(decision.box, frame.shape, 0.15)
    assert (x0, y0, x1, y1) == (141, 51, 219, 130)
    assert not np.array_equal(trained_on, sample_input(sample, cart.card.preprocess))
    assert crop.lineage(loc) == {"model": str(loc), "sha256": sha256_file(loc), "margin": 0.15}


def test_a_crop_trained_classifier_runs_only_behind_its_localiser_and_margin(tmp_path):
    from edgebc.classifier_settings import ClassifierSettings, build_classifier

    loc = _localiser(tmp_path / "loc.onnx")
    other = _localiser(tmp_path / "other.onnx", bias=60.0)  # another localiser: other crops
    trained = {"model": str(loc), "sha256": sha256_file(loc), "margin": 0.15}
    card = dataclasses.replace(
        classifier_card(), lineage={"input_crop": CROP_TRAINED, "localiser": trained}
    )
    cls = write_graph(tmp_path / "cls.onnx", card, None, gain=4.0, bias=0.0)
    check_crop_trained(card, loc, 0.15)
    with pytest.raises(EdgebcError, match="another localiser"):
        check_crop_trained(card, other, 0.15)
    with pytest.raises(EdgebcError, match=r"margin 0\.15, not 0\.3"):
        check_crop_trained(card, loc, 0.3)
    built = build_classifier(ClassifierSettings(model=str(cls), threads=1, localiser=str(loc)))
    assert built.margin == 0.15  # the trained margin, with none set
    for wrong in (
        ClassifierSettings(model=str(cls), threads=1, localiser=str(other)),
        ClassifierSettings(model=str(cls), threads=1, localiser=str(loc), localiser_margin=0.3),
    ):
        with pytest.raises(EdgebcError, match=r"another localiser|margin"):
            build_classifier(wrong)
    # evaluation reads crops through the localiser named in the lineage, and no other file
    assert lesion_crop_of(card).margin == 0.15
    (tmp_path / "loc.onnx").write_bytes(other.read_bytes())
    with pytest.raises(EdgebcError, match="not the localiser model"):
        lesion_crop_of(card)


def test_the_config_refuses_a_localiser_where_crops_cannot_be_made():
    from edgebc.train.config import load_train_config

    base = ["data.localiser=loc.onnx"]
    assert load_train_config(None, base).data.localiser == "loc.onnx"
    for setting in ("data.modality=mg", "optim.mask_loss_weight=0.5"):
        with pytest.raises(ValueError, match=r"data\.localiser"):
            load_train_config(None, [*base, setting])
    with pytest.raises(ValueError, match="localiser_margin"):
        load_train_config(None, [*base, "data.localiser_margin=3"])


def test_a_run_on_crops_says_so_in_its_card_and_is_evaluated_on_crops(tmp_path):
    torch = pytest.importorskip("torch", reason="torch (the [train] extra) is not installed")
    pytest.importorskip("onnx", reason="onnx (the [export] extra) is not installed")
    import cv2

    from edgebc.data import read_manifest, write_manifest
    from edgebc.synth.dataset import SynthPlan, write_phantom_dataset
    from edgebc.train import loop
    from edgebc.train.checkpoint import load_checkpoint
    from edgebc.train.config import load_train_config
    from edgebc.train.evaluate import evaluate_checkpoint

    manifest = write_phantom_dataset(tmp_path / "ph", SynthPlan(n_per_class=6, size=96, seed=3))
    sides = ("train", "train", "val", "calibration", "test")
    split = [replace(s, split=sides[i % 5]) for i, s in enumerate(read_manifest(manifest))]
    manifest = write_manifest(split, tmp_path / "split.csv")
    loc = _localiser(tmp_path / "loc.onnx")
    config = load_train_config(None, [
        f"data.manifest={manifest}", f"data.localiser={loc}", "data.localiser_margin=0.2",
        "data.task=malignant_vs_rest", "optim.epochs=1", "optim.batch_size=8", "threads=1",
        "loader_workers=1", "preprocess.input_height=32", "preprocess.input_width=32",
        f"out_dir={tmp_path}", "name=crops",
    ])  # fmt: skip
    torch.manual_seed(0)
    best = loop.train_model(config, show_progress=False).best_checkpoint
    card = load_checkpoint(best).card
    assert card.lineage["input_crop"] == CROP_TRAINED
    assert card.lineage["localiser"] == {"model": str(loc.resolve()), "sha256": sha256_file(loc),
                                         "margin": 0.2}  # fmt: skip
    report = evaluate_checkpoint(
        best, manifest, tmp_path / "eval", split="test", n_boot=50, gradcam_per_kind=0
    )
    assert report["n"] > 0
    # the export ships the localiser beside the model, linked, under one manifest: the cart
    # localises and crops with the trained margin without being told
    from edgebc.classifier_settings import ClassifierSettings, build_classifier
    from edgebc.export.bundle import ExportOptions, run_export
    from edgebc.integrity import verify_artifact

    out = tmp_path / "export"
    run_export(best, ExportOptions(out_dir=out, verify_data=str(manifest), verify_count=4))
    shipped = out / "model.localiser.onnx"
    assert sha256_file(shipped) == sha256_file(loc)
    assert verify_artifact(out / "model.onnx") and verify_artifact(shipped)  # listed and whole
    cart = build_classifier(ClassifierSettings(model=str(out / "model.onnx"), threads=1))
    assert cart.localiser is not None and cart.margin == 0.2
    frame = cv2.imread(str(split[0].path), cv2.IMREAD_UNCHANGED)
    assert cart.classify(frame).box is not None
    # the model store installs the localiser with it (under the manifest), so the cart starts
    from edgebc.model_store import ModelStore

    release = ModelStore(tmp_path / "store").install(out / "model.onnx")
    assert (release.path / "model.localiser.onnx").read_bytes() == loc.read_bytes()
    installed = build_classifier(ClassifierSettings(model=str(release.model), threads=1))
    assert installed.localiser is not None and installed.classify(frame).box is not None
    # a release that lost its localiser is not healthy (a reinstall copies it again)
    (release.path / "model.localiser.onnx").unlink()
    store = ModelStore(tmp_path / "store")
    assert "model.localiser.onnx" in (
        next(r for r in store.list() if r.id == release.id).problem or ""
    )
    again = store.install(out / "model.onnx")
    assert (again.path / "model.localiser.onnx").read_bytes() == loc.read_bytes()
    # a site calibration's release carries it too (torch-free; the shipped file, not training's)
    from edgebc.release import write_release

    site = write_release(tmp_path / "site", out / "model.onnx", cart.card)
    assert (site / "model.localiser.onnx").is_file()
    assert build_classifier(ClassifierSettings(model=str(site / "model.onnx"), threads=1)).localiser
    (tmp_path / "loc.onnx").write_bytes(b"not the localiser")
    with pytest.raises(EdgebcError, match="not the localiser model"):
        evaluate_checkpoint(
            best, manifest, tmp_path / "eval", split="test", n_boot=50, gradcam_per_kind=0
        )
