"""Distillation: the loss is the formula, the targets are the teachers' tempered average, a teacher
that does not match the run is refused with its reason, and the soft targets really steer training."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch (the [train] extra) is not installed")

from dataclasses import replace

from edgebc.errors import EdgebcError
from edgebc.task import TASKS
from edgebc.train import loop
from edgebc.train.checkpoint import (
    load_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
    sha256_of_state,
)
from edgebc.train.dataset import SampleDataset, cache_tensors
from edgebc.train.distill import Teacher, distillation_loss, load_teachers, soft_targets
from tests.test_training import (  # noqa: F401  (tiny_split is the fixture)
    _config,
    _crash_after_the_first_epoch,
    _split_phantoms,
    tiny_split,
)


def test_the_loss_is_the_weighted_tempered_kl_divergence():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 1.5]])
    targets = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]])
    weights = torch.tensor([1.0, 3.0])
    temperature = 2.0
    z = logits.numpy() / temperature
    log_q = z - np.log(np.exp(z).sum(1, keepdims=True))
    p = targets.numpy()
    kl = (p * (np.log(p) - log_q)).sum(1)
    expected = temperature**2 * (kl * weights.numpy()).sum() / weights.numpy().sum()
    assert float(distillation_loss(logits, targets, temperature, weights)) == pytest.approx(
        expected, rel=1e-6
    )
    # A student that already predicts the targets at T pays nothing.
    matching = torch.log(targets) * temperature
    assert float(distillation_loss(matching, targets, temperature, weights)) == pytest.approx(
        0.0, abs=1e-6
    )


@pytest.fixture(scope="module")
def teacher_run(tiny_split, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("teacher")
    return loop.train_model(_config(tiny_split, out, "teacher"), show_progress=False)


def test_soft_targets_average_the_teachers_tempered_probabilities(teacher_run, tmp_path):
    first = load_checkpoint(teacher_run.best_checkpoint)
    second = replace(first, state_dict={k: v * 1.1 if v.is_floating_point() else v
                                        for k, v in first.state_dict.items()})  # fmt: skip
    images = torch.randn(5, 1, 32, 32)
    targets = soft_targets(
        [Teacher(tmp_path / "a.pt", first), Teacher(tmp_path / "b.pt", second)], images, 3.0
    )
    expected = []
    for record in (first, second):
        with torch.no_grad():
            logits = model_from_checkpoint(record)(images)
        expected.append(torch.softmax(logits.double() / 3.0, dim=1))
    torch.testing.assert_close(targets, ((expected[0] + expected[1]) / 2).float())
    assert not torch.allclose(expected[0], expected[1])  # the two teachers really differ


def test_a_teacher_that_does_not_match_the_run_is_refused(teacher_run):
    card = load_checkpoint(teacher_run.best_checkpoint).card
    path, task = teacher_run.best_checkpoint, card.task
    prep, fingerprint = card.preprocess, card.data_fingerprint
    assert load_teachers([path], task, prep, fingerprint)[0].checkpoint.card.arch == "simple_cnn"
    with pytest.raises(EdgebcError, match=r"predicts classes .* wrong order"):
        load_teachers([path], replace(task, classes=task.classes[::-1]), prep, fingerprint)
    with pytest.raises(EdgebcError, match=r"predicts classes .* mean other classes"):
        load_teachers([path], TASKS["normal_vs_abnormal"], prep, fingerprint)
    with pytest.raises(EdgebcError, match=r"another preprocessing card .* input_height"):
        load_teachers([path], task, replace(prep, input_height=64), fingerprint)
    with pytest.raises(EdgebcError, match=r"other samples .* leak them"):
        load_teachers([path], task, prep, "0" * 64)
    with pytest.raises(EdgebcError, match=r"same weights as .* double weight"):
        load_teachers([path, path], task, prep, fingerprint)
    with pytest.raises(EdgebcError, match=r"data.fold None but this run uses 2: .* validation"):
        load_teachers([path], task, prep, fingerprint, fold=2)


def _opinionated_teacher(run, path):
    """The teacher run's checkpoint rewired to say 'normal' for every frame, whatever it shows."""
    record = load_checkpoint(run.best_checkpoint)
    state = dict(record.state_dict)
    weight_key = next(k for k in state if k.endswith("weight") and state[k].shape[0] == 3)
    bias_key = weight_key.replace("weight", "bias")
    state[weight_key] = torch.zeros_like(state[weight_key])
    state[bias_key] = torch.tensor([4.0, 0.0, 0.0])
    save_checkpoint(
        path, replace(record, state_dict=state).with_card(weights_sha256=sha256_of_state(state))
    )
    return path


def test_soft_targets_steer_the_student_and_the_checkpoint_names_its_teachers(
    teacher_run,
    tiny_split,  # noqa: F811
    tmp_path,
):
    teacher = _opinionated_teacher(teacher_run, tmp_path / "always-normal.pt")
    settings = (f"optim.distill_from=[{teacher}]", "optim.distill_weight=1.0",
                "optim.distill_temperature=1.0", "optim.epochs=6", "optim.lr=0.02",
                "optim.ema_decay=0", "optim.early_stop_patience=0")  # fmt: skip
    student = loop.train_model(
        _config(tiny_split, tmp_path, "student", *settings), show_progress=False
    )
    record = load_checkpoint(student.run_dir / "last.pt")
    # The card (which its ONNX export carries to the device) names the teacher by weights hash.
    assert record.card.lineage == {
        "pretrained": None,
        "distilled_from": [{"path": str(teacher), "arch": "simple_cnn",
                            "weights_sha256": load_checkpoint(teacher).card.weights_sha256}],
    }  # fmt: skip
    config = _config(tiny_split, tmp_path, "x")
    val = loop.select_samples(config, "val")
    images, labels = cache_tensors(SampleDataset(val, config.preprocess, record.card.task), 1)
    probabilities = torch.softmax(
        torch.from_numpy(loop.predict_logits(model_from_checkpoint(record), images,
                                               torch.device("cpu"))), dim=1)  # fmt: skip
    # With the hard labels weighted 0 the student learns the teacher's one opinion, although
    # two thirds of the validation frames are not normal.
    assert (labels != 0).float().mean() > 0.5
    assert float(probabilities[:, 0].mean()) > 0.8


def test_resuming_a_distilled_run_is_exact_and_refuses_a_changed_teacher(
    teacher_run,
    tiny_split,  # noqa: F811
    tmp_path,
    monkeypatch,
):
    teacher = tmp_path / "teacher.pt"
    teacher.write_bytes(teacher_run.best_checkpoint.read_bytes())
    settings = (f"optim.distill_from=[{teacher}]", "optim.epochs=3", "optim.ema_decay=0.9")
    straight = loop.train_model(
        _config(tiny_split, tmp_path, "straight", *settings), show_progress=False
    )
    _crash_after_the_first_epoch(_config(tiny_split, tmp_path, "crashed", *settings), monkeypatch)
    crashed = tmp_path / "crashed"
    (tmp_path / "crashed-copy").mkdir()
    for name in ("last.pt", "config.yaml"):
        (tmp_path / "crashed-copy" / name).write_bytes((crashed / name).read_bytes())
    resumed = loop.train_model(_config(tiny_split, tmp_path, "x"), resume=crashed,
                                 show_progress=False)  # fmt: skip
    a, b = (load_checkpoint(r.run_dir / "last.pt") for r in (straight, resumed))
    assert a.card.weights_sha256 == b.card.weights_sha256

    _opinionated_teacher(teacher_run, teacher)  # the teacher file is replaced mid-run
    with pytest.raises(EdgebcError, match=r"teachers of .* changed since the run started"):
        loop.train_model(_config(tiny_split, tmp_path, "x"), resume=tmp_path / "crashed-copy",
                           show_progress=False)  # fmt: skip


def test_the_command_line_names_teachers_even_with_commas_and_spaces(
    teacher_run,
    tiny_split,  # noqa: F811
    tmp_path,
):
    import yaml

    from edgebc.cli import main

    teacher = tmp_path / "teachers, v1" / "best model.pt"
    teacher.parent.mkdir()
    teacher.write_bytes(teacher_run.best_checkpoint.read_bytes())
    settings = [f"--set={item}" for item in (
        f"data.manifest={tiny_split}", "model.arch=simple_cnn", "preprocess.input_height=32",
        "preprocess.input_width=32", "optim.batch_size=8", "loader_workers=1")]  # fmt: skip
    code = main(["train", *settings, "--epochs", "1", "--out", str(tmp_path), "--name", "cli",
                 "--distill-from", str(teacher)])  # fmt: skip
    assert code == 0
    written = yaml.safe_load((tmp_path / "cli" / "config.yaml").read_text())
    assert written["optim"]["distill_from"] == [str(teacher)]
    lineage = load_checkpoint(tmp_path / "cli" / "best.pt").card.lineage
    assert lineage["distilled_from"][0]["path"] == str(teacher)


def test_cross_validation_gives_each_fold_its_own_teacher_and_checks_all_first(tmp_path):
    from edgebc.data.split import SplitPlan
    from edgebc.train.crossval import cross_validate

    manifest = _split_phantoms(
        tmp_path / "ph", 8, 48, SplitPlan(val=0.0, test=0.2, folds=2, seed=0)
    )
    cross_validate(_config(manifest, tmp_path, "teachers", "optim.epochs=1"), show_progress=False)
    per_fold = str(tmp_path / "teachers" / "fold{fold}" / "best.pt")
    cross_validate(_config(manifest, tmp_path, "students", "optim.epochs=1",
                           f"optim.distill_from={json.dumps([per_fold])}"), show_progress=False)  # fmt: skip
    for fold in (0, 1):
        record = load_checkpoint(tmp_path / "students" / f"fold{fold}" / "best.pt")
        assert record.card.lineage["distilled_from"][0]["path"] == per_fold.format(fold=fold)

    # One fixed teacher fits fold 0 only: refused before fold 0 trains, with the way out named.
    fixed = per_fold.format(fold=0)
    with pytest.raises(EdgebcError, match=r"data.fold 0 but this run uses 1.*\{fold\} in the path"):
        cross_validate(_config(manifest, tmp_path, "wrong", "optim.epochs=1",
                               f"optim.distill_from={json.dumps([fixed])}"), show_progress=False)  # fmt: skip
    assert not (tmp_path / "wrong").exists()
    # Outside cross-validation nothing fills the placeholder in.
    with pytest.raises(EdgebcError, match=r"only --cross-validate fills in \{fold\}"):
        loop.train_model(_config(manifest, tmp_path, "single", "data.fold=0",
                                   f"optim.distill_from={json.dumps([per_fold])}"), show_progress=False)  # fmt: skip
