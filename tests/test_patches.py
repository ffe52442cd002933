"""Patch mode on mammogram phantoms: finding coordinates follow the breast crop and the mirror,
finding patches hold their finding, normal patches stay on the breast and off findings, the
grid covers the breast, aggregation gives the stated values, and the device's whole-film score
equals the torch one."""

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from edgebc.breast import prepare_breast
from edgebc.data.records import Finding, Sample
from edgebc.model_card import ModelCard
from edgebc.patches import (
    PatchCard,
    aggregate,
    breast_frame,
    cut_patch,
    film_probabilities,
    grid,
    grid_tensors,
    patch_preprocess,
)
from edgebc.preprocess import PreprocessCard, preprocess_chw
from edgebc.synth.mammogram import draw_breast, make_mammogram
from edgebc.synth.ultrasound import phantom_rng
from edgebc.task import task_for
from tests.test_breast_crop import MIAS_LATERALITY_MISSES

PREP = PreprocessCard(input_height=48, input_width=48, breast_crop=True, laterality="left")
CARD = PatchCard(side=64, stride=32, min_breast=0.5)


def _mammogram(label="malignant", laterality="R", view="MLO", seed=0):
    breast = draw_breast(label, phantom_rng(seed, 1))
    return make_mammogram(breast, phantom_rng(seed, 2), laterality, view, 320, 256, 12)


def _in_frame(frame, truth_mask):
    """A film-sized truth mask carried into the breast frame by the frame's own box and mirror."""
    crop = truth_mask[
        frame.box_y : frame.box_y + frame.height, frame.box_x : frame.box_x + frame.width
    ]
    return crop[:, ::-1] if frame.mirrored else crop


def _window(mask, x, y, side):
    return mask[max(0, y) : max(0, y + side), max(0, x) : max(0, x + side)]


@pytest.mark.parametrize("laterality", ["L", "R"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_finding_coordinates_follow_the_crop_and_the_mirror(laterality, seed):
    film = _mammogram(laterality=laterality, seed=seed)
    frame = breast_frame(film.image, PREP)
    # the frame is the shared preprocessing's breast step, pixel for pixel
    assert np.array_equal(frame.image, prepare_breast(film.image, True, "left"))
    assert frame.mirrored == (laterality == "R")
    mask = _in_frame(frame, film.mask)
    assert mask.sum() == film.mask.sum() > 0  # the crop keeps the whole finding
    (finding,) = film.findings
    x, y = frame.from_film(finding.x, finding.y)
    rows, cols = np.nonzero(mask)
    # the mapped centre is the centre of the finding's own pixels in the frame
    assert abs(cols.mean() - x) < 2.0 and abs(rows.mean() - y) < 2.0
    assert frame.to_film(x, y) == pytest.approx((finding.x, finding.y))
    # the frame's breast mask is the phantom's breast, carried the same way (but for the margin)
    truth = _in_frame(frame, film.breast).astype(bool)
    found = frame.breast.astype(bool)
    assert (truth & ~found).sum() <= 0.01 * truth.sum()


def test_a_hand_computed_point_through_crop_and_mirror():
    film = _mammogram(laterality="R", seed=3)
    frame = breast_frame(film.image, PREP)
    assert frame.mirrored
    assert frame.from_film(frame.box_x, frame.box_y) == (frame.width - 1, 0)
    assert frame.from_film(frame.box_x + 10, frame.box_y + 7) == (frame.width - 11, 7)


def test_patches_centred_on_a_finding_contain_it():
    from edgebc.train.patches import finding_corners

    for seed in range(4):
        film = _mammogram(seed=seed)
        frame = breast_frame(film.image, PREP)
        mask = _in_frame(frame, film.mask)
        rng = np.random.default_rng(seed)
        corners = finding_corners(frame, film.findings[0], CARD, 20, 1.0, rng)
        assert len(set(corners)) > 1  # jittered
        for x, y in corners:
            assert _window(mask, x, y, CARD.side).sum() == mask.sum()


def test_normal_patches_avoid_findings_and_stay_on_the_breast():
    from edgebc.train.patches import normal_corners

    for seed in range(4):
        film = _mammogram(seed=seed)
        frame = breast_frame(film.image, PREP)
        mask = _in_frame(frame, film.mask)
        truth = _in_frame(frame, film.breast)
        corners = normal_corners(frame, film.findings, CARD, 6, np.random.default_rng(seed))
        assert corners
        for x, y in corners:
            assert _window(mask, x, y, CARD.side).sum() == 0
            assert _window(truth, x, y, CARD.side).sum() >= 0.45 * CARD.side**2


def test_the_sliding_grid_covers_the_breast():
    for laterality, view in (("L", "MLO"), ("R", "CC"), ("R", "MLO")):
        film = _mammogram(laterality=laterality, view=view, seed=5)
        frame = breast_frame(film.image, PREP)
        covered = np.zeros_like(frame.breast, bool)
        corners = grid(frame, CARD)
        for x, y in corners:
            covered[max(0, y) : y + CARD.side, max(0, x) : x + CARD.side] = True
            assert frame.breast_share(x, y, CARD.side) >= CARD.min_breast
        truth = _in_frame(frame, film.breast).astype(bool)
        # min_breast may drop a patch of mostly background: what it leaves uncovered is a thin rim
        assert (truth & ~covered).sum() <= 0.03 * truth.sum()
        full = grid(frame, replace(CARD, min_breast=1e-6))
        covered[:] = False
        for x, y in full:
            covered[max(0, y) : y + CARD.side, max(0, x) : x + CARD.side] = True
        assert covered[frame.breast.astype(bool)].all()


def test_grid_patches_are_the_shared_preprocessing_of_their_crop():
    film = _mammogram(seed=1)
    batch, corners, frame = grid_tensors(film.image, PREP, CARD)
    assert batch.shape == (len(corners), 1, 48, 48)
    x, y = corners[-1]
    crop = frame.image[y : y + CARD.side, x : x + CARD.side]
    assert np.array_equal(batch[-1], preprocess_chw(crop, patch_preprocess(PREP)))
    edge = cut_patch(frame, frame.width - 10, -5, 16)  # past two edges: black there
    assert edge.shape == (16, 16) and not edge[:5].any() and not edge[:, 10:].any()
    assert np.array_equal(edge[5:, :10], frame.image[:11, frame.width - 10 :])


def test_aggregation_values():
    p = np.array([[0.9, 0.1], [0.2, 0.8], [0.5, 0.5], [0.4, 0.6]])
    assert aggregate(p, 1, PatchCard(aggregate="max")) == pytest.approx([0.2, 0.8])
    assert aggregate(p, 1, PatchCard(aggregate="top_k_mean", top_k=2)) == pytest.approx([0.3, 0.7])
    assert aggregate(p, 0, PatchCard(aggregate="top_k_mean", top_k=2)) == pytest.approx([0.7, 0.3])
    assert aggregate(p, 1, PatchCard(aggregate="top_k_mean", top_k=9)) == pytest.approx([0.5, 0.5])
    with pytest.raises(ValueError, match="N >= 1"):
        aggregate(np.zeros((0, 2)), 1, PatchCard())


def test_patch_card_refuses_impossible_values():
    with pytest.raises(ValueError, match="stride"):
        PatchCard(side=64, stride=65)
    with pytest.raises(ValueError, match="aggregate"):
        PatchCard(aggregate="mean")  # type: ignore[arg-type]


def test_training_patches_take_their_finding_class_and_skip_unlocated_films():
    from edgebc.train.patches import PatchSampling, film_patches

    film = _mammogram(seed=2)
    task = task_for("malignant_vs_rest")
    sample = Sample(path="phantom.png", label="malignant", findings=film.findings, modality="mammo")
    sampling = PatchSampling(per_finding=3, normal_per_film=2)
    tensors, targets = film_patches(sample, film.image, PREP, CARD, task, sampling, seed=0)
    assert targets == [task.positive] * 3 + [1 - task.positive] * 2
    assert all(t.shape == (1, 48, 48) for t in tensors)
    unlocated = replace(sample, findings=(*film.findings, Finding("CALC", "M")))
    assert film_patches(unlocated, film.image, PREP, CARD, task, sampling, seed=0) == ([], [])
    benign_only = film_patches(sample, film.image, PREP, CARD, task_for("benign_vs_malignant"),
                               sampling, seed=0)  # fmt: skip
    assert len(benign_only[1]) == 3  # no normal class in that task: no normal patches


def test_a_patch_card_round_trips_and_a_whole_image_card_is_unchanged(tmp_path):
    from edgebc.train.checkpoint import load_checkpoint
    from tests.helpers import make_checkpoint

    card = load_checkpoint(make_checkpoint(tmp_path / "c.pt")).card
    assert "patches" not in card.to_dict()["inputs"][0]
    patched = replace(card, inputs=(replace(card.input, patches=CARD),))
    again = ModelCard.from_json(patched.to_json())
    assert again.input.patches == CARD and again == patched


def test_device_and_torch_give_the_same_whole_film_score(tmp_path):
    from edgebc.backends.onnxruntime import OnnxRuntimeBackend
    from edgebc.export.onnx_export import export_onnx
    from edgebc.metrics import softmax
    from edgebc.train.checkpoint import (
        Checkpoint,
        load_checkpoint,
        model_from_checkpoint,
        save_checkpoint,
    )
    from edgebc.train.patches import torch_probabilities
    from tests.helpers import make_checkpoint

    plain = load_checkpoint(make_checkpoint(tmp_path / "plain.pt"))
    card = replace(plain.card, inputs=(replace(plain.card.input, preprocess=PREP, patches=CARD),))
    path = save_checkpoint(
        tmp_path / "patch.pt", Checkpoint(card, plain.state_dict, plain.training)
    )
    onnx_path, exported, _ = export_onnx(path, tmp_path / "patch.onnx")
    assert exported.input.patches == CARD
    backend = OnnxRuntimeBackend(onnx_path, warmup=0)
    assert backend.card.input.patches == CARD

    def device(batch):
        return softmax(backend.run(batch), backend.card.temperature)

    torch_run = torch_probabilities(model_from_checkpoint(load_checkpoint(path)), card.temperature)
    for seed in range(3):
        film = _mammogram(seed=seed).image
        on_device = film_probabilities(film, backend.card.preprocess, backend.card.input.patches,
                                       card.positive, device, backend.card.max_batch)  # fmt: skip
        in_torch = film_probabilities(film, card.preprocess, CARD, card.positive, torch_run)
        assert on_device == pytest.approx(in_torch, abs=1e-5)
        assert on_device.sum() == pytest.approx(1.0)
    # the frame classifier and eval do not answer with it (a threshold fitted on patches)
    from edgebc.classifier import FrameClassifier
    from edgebc.errors import EdgebcError
    from edgebc.train.evaluate import evaluate_checkpoint

    with pytest.raises(EdgebcError, match="classifies patches of a film"):
        FrameClassifier(backend)
    with pytest.raises(EdgebcError, match="edgebc eval does not decide with patch models"):
        evaluate_checkpoint(path, tmp_path / "none.csv", tmp_path / "eval")


def test_a_patch_run_trains_on_phantom_films_and_scores_them_whole(tmp_path):
    from edgebc.data import read_manifest, write_manifest
    from edgebc.synth.dataset import SynthPlan, write_phantom_dataset
    from edgebc.train import loop
    from edgebc.train.config import load_train_config
    from edgebc.train.patches import compare_with, evaluate_films

    plan = SynthPlan(n_per_class=1, size=112, seed=4, mammo_women=8, mammo_bits=8)
    films = [s for s in read_manifest(write_phantom_dataset(tmp_path, plan)) if s.view]
    # by woman, so that validation and test each hold normal and abnormal films
    sides = {"mg-0004": "val", "mg-0006": "val", "mg-0005": "test", "mg-0007": "test"}
    split = [replace(s, split=sides.get(s.patient_id or "", "train")) for s in films]
    manifest = write_manifest(split, tmp_path / "split.csv")
    config = load_train_config(None, [
        f"data.manifest={manifest}", f"out_dir={tmp_path}", "name=patches", "data.modality=mammo",
        "data.task=normal_vs_abnormal", "model.arch=simple_cnn", "preprocess.input_height=32",
        "preprocess.input_width=32", "preprocess.breast_crop=true", "preprocess.laterality=left",
        "patches={side: 48, stride: 24, per_finding: 2, normal_per_film: 2}", "optim.epochs=1",
        "optim.batch_size=16", "optim.warmup_epochs=0", "loader_workers=1", "threads=1",
    ])  # fmt: skip
    run = loop.train_model(config, show_progress=False)
    from edgebc.train.checkpoint import load_checkpoint

    card = load_checkpoint(run.best_checkpoint).card
    assert card.input.patches == PatchCard(side=48, stride=24)
    assert card.input.modality == "mg"
    result = evaluate_films(str(run.best_checkpoint), str(manifest), "test", resamples=50)
    test_films = [s for s in split if s.split == "test"]
    assert result["films"] == len(test_films) == len(result["per_film"])
    assert 0.0 <= result["auc"] <= 1.0
    baseline = tmp_path / "predictions.csv"
    assert {f["positive"] for f in result["per_film"]} == {0, 1}
    lines = ["path,label,predicted,p_abnormal,p_normal"]
    # full precision: a model one epoch old scores films within 1e-6 of each other
    lines += [f"{f['path']},x,x,{f['score']!r},{1 - f['score']!r}" for f in result["per_film"]]
    baseline.write_text("\n".join(lines) + "\n")
    same = compare_with(result, str(baseline), resamples=50)
    assert same["auc_difference"] == pytest.approx(0.0, abs=1e-6)
    assert same["baseline_auc"] == pytest.approx(result["auc"], abs=1e-5)
    with pytest.raises(ValueError, match="not a whole-image baseline"):
        compare_with(result, str(run.best_checkpoint))


@pytest.mark.data
def test_mini_mias_findings_land_on_the_breast_after_crop_and_mirror(data_dir):
    from edgebc.data import read_dataset
    from edgebc.decode import read_image

    mias = data_dir / "mias"
    if not (mias / "Info.txt").is_file():
        pytest.skip(f"mini-MIAS absent at {mias}")
    prep = PreprocessCard(input_height=224, input_width=224, breast_crop=True, laterality="left")
    located = [s for s in read_dataset(mias) if s.findings and s.findings[0].x is not None]
    assert len(located) >= 80  # mini-MIAS: 90 of its 115 abnormal films give a centre
    mirrored, misses, off_breast = 0, set(), set()
    for sample in located:
        frame = breast_frame(read_image(sample.path), prep)
        # even numbers are left breasts (chest wall on the left edge): only the right ones turn,
        # but for the films whose side the image itself reads the other way (test_breast_crop)
        if frame.mirrored != (sample.view == "R-MLO"):
            misses.add(Path(sample.path).stem)
        mirrored += frame.mirrored
        for finding in sample.findings:
            x, y = frame.from_film(finding.x, finding.y)
            assert 0 <= x < frame.width and 0 <= y < frame.height, (sample.path, finding)
            if frame.breast[int(y), int(x)] != 1:
                off_breast.add(Path(sample.path).stem)
    assert misses <= MIAS_LATERALITY_MISSES, sorted(misses)
    # two calcification centres in Info.txt fall on the black background (levels 3 and 12):
    # the annotation's own error, not the mapping's (every other of the 97 centres is on tissue)
    assert off_breast <= {"mdb212", "mdb214"}, sorted(off_breast)
    assert 0 < mirrored < len(located)


def test_patch_mode_refuses_the_film_steps_it_cannot_apply_to_patches():
    from edgebc.errors import ConfigError
    from edgebc.train.config import load_train_config

    for setting in ("preprocess.pectoral=suppress", "preprocess.clahe_clip=2"):
        with pytest.raises(ConfigError, match="patch mode cuts patches"):
            load_train_config(None, ["patches={side: 48, stride: 24}", setting])
