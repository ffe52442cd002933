"""edgebc compare: DeLong and McNemar against worked examples and bootstraps, and the table on
tiny phantom runs against evaluate_checkpoint's own numbers."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from edgebc import metrics
from edgebc.errors import EdgebcError

# A hand-worked example: cases 0-2 positive, 3-4 negative, two models scored on all five.
POSITIVE = np.array([True, True, True, False, False])
FIRST = np.array([0.9, 0.6, 0.4, 0.5, 0.3])  # V10 = 1, 1, 1/2; V01 = 2/3, 1; AUC 5/6
SECOND = np.array([0.8, 0.2, 0.7, 0.1, 0.75])  # V10 = 1, 1/2, 1/2; V01 = 1, 1/3; AUC 2/3


def test_delong_structural_components_and_variance_match_the_hand_worked_example():
    auc, v10, v01 = metrics.placement_values(POSITIVE, FIRST)
    assert auc == pytest.approx(5 / 6)
    np.testing.assert_allclose(v10, [1, 1, 0.5])
    np.testing.assert_allclose(v01, [2 / 3, 1])
    aucs, cov = metrics.delong_covariance(POSITIVE, FIRST, SECOND)
    np.testing.assert_allclose(aucs, [5 / 6, 2 / 3])
    # var = S10/m + S01/n: (1/12)/3 + (1/18)/2 = 1/18; (1/12)/3 + (2/9)/2 = 5/36;
    # cov = (1/24)/3 + (-1/9)/2 = -1/24
    np.testing.assert_allclose(cov, [[1 / 18, -1 / 24], [-1 / 24, 5 / 36]])
    test = metrics.delong_test(POSITIVE, FIRST, SECOND)
    # difference 1/6, variance 1/18 + 5/36 + 2/24 = 5/18, so z = sqrt(1/10)
    assert test.difference == pytest.approx(1 / 6)
    assert test.standard_error == pytest.approx(math.sqrt(5 / 18))
    assert test.statistic == pytest.approx(math.sqrt(0.1))
    assert test.p_value == pytest.approx(math.erfc(math.sqrt(0.1) / math.sqrt(2)))
    assert test.p_value == pytest.approx(0.7518, abs=1e-4)


def _correlated(n, rng, shift=0.8):
    positive = rng.random(n) < 0.4
    shared = rng.normal(size=n)
    first = shared + rng.normal(size=n) + shift * positive
    second = shared + rng.normal(size=n) + 0.5 * shift * positive
    return positive, first, second


def test_delong_variance_of_the_difference_agrees_with_a_bootstrap():
    rng = np.random.default_rng(1)
    positive, first, second = _correlated(300, rng)
    test = metrics.delong_test(positive, first, second)
    draws = []
    for _ in range(800):
        i = rng.integers(0, len(positive), len(positive))
        draws.append(
            metrics.roc_auc(positive[i], first[i]) - metrics.roc_auc(positive[i], second[i])
        )
    assert test.difference == pytest.approx(
        metrics.roc_auc(positive, first) - metrics.roc_auc(positive, second)
    )
    assert test.standard_error == pytest.approx(np.std(draws), rel=0.1)


def test_clustered_delong_is_delong_with_one_case_per_patient_and_widens_with_repeats():
    rng = np.random.default_rng(2)
    positive, first, second = _correlated(120, rng)
    singletons = [f"p{k}" for k in range(120)]
    _, plain = metrics.delong_covariance(positive, first, second)
    _, clustered = metrics.clustered_auc_covariance(positive, singletons, first, second)
    np.testing.assert_allclose(clustered, plain, rtol=1e-12)
    # 60 patients, each seen twice with nearly the same frame: the clustered variance is about
    # the patient bootstrap's, and larger than DeLong's, which counts each frame as a case
    patient_pos = rng.random(60) < 0.4
    base = rng.normal(size=60) + 0.8 * patient_pos
    pos = np.repeat(patient_pos, 2)
    a = np.repeat(base, 2) + 0.2 * rng.normal(size=120)
    b = np.repeat(base + rng.normal(size=60), 2) + 0.2 * rng.normal(size=120)
    patients = [f"p{k}" for k in range(60) for _ in range(2)]
    clustered_test = metrics.delong_test(pos, a, b, patients)
    assert clustered_test.method.startswith("clustered DeLong")
    naive = metrics.delong_test(pos, a, b)
    assert clustered_test.standard_error > 1.2 * naive.standard_error
    draws = []
    for _ in range(800):
        chosen = rng.integers(0, 60, 60)
        i = np.concatenate([[2 * c, 2 * c + 1] for c in chosen])
        draws.append(metrics.roc_auc(pos[i], a[i]) - metrics.roc_auc(pos[i], b[i]))
    assert clustered_test.standard_error == pytest.approx(np.nanstd(draws), rel=0.15)


def test_mcnemar_exact_on_the_discordant_pairs():
    # 1 case only the first gets right, 6 only the second: p = 2 * (1 + 7) / 2**7
    first = np.array([1, 0, 0, 0, 0, 0, 0, 1, 1, 0], bool)
    second = np.array([0, 1, 1, 1, 1, 1, 1, 1, 1, 0], bool)
    test = metrics.mcnemar_test(first, second)
    assert test.statistic == 7 and test.p_value == pytest.approx(16 / 128)
    assert test.difference == pytest.approx(0.3 - 0.8)
    assert metrics.mcnemar_test(first, first).p_value == 1.0
    assert metrics.mcnemar_test(np.ones(3, bool), np.array([1, 1, 0], bool)).p_value == 1.0


def test_mcnemar_clusters_by_patient_only_where_patients_repeat():
    rng = np.random.default_rng(3)
    first, second = rng.random(80) < 0.7, rng.random(80) < 0.5
    singletons = metrics.mcnemar_test(first, second, [str(k) for k in range(80)])
    assert singletons.method.startswith("McNemar exact")  # no patient repeats: the exact test
    patients = [str(k // 2) for k in range(80)]
    clustered = metrics.mcnemar_test(first, second, patients)
    per = np.add.reduceat((first & ~second).astype(int) - (~first & second), np.arange(0, 80, 2))
    assert clustered.statistic == pytest.approx(per.sum() ** 2 / (per**2).sum())
    assert clustered.p_value == pytest.approx(math.erfc(math.sqrt(clustered.statistic / 2)))
    assert clustered.method.startswith("clustered McNemar")


def _train_two(root):
    """Two tiny simple_cnn runs on one phantom split (a few seconds each on one CPU thread)."""
    torch = pytest.importorskip("torch", reason="torch (the [train] extra) is not installed")
    torch.set_num_threads(1)
    from edgebc.data import read_manifest, write_manifest
    from edgebc.data.split import SplitPlan, assign_splits
    from edgebc.synth.dataset import SynthPlan, write_phantom_dataset
    from edgebc.train import loop
    from edgebc.train.config import load_train_config

    manifest = write_phantom_dataset(root / "data", SynthPlan(n_per_class=10, size=48, seed=3))
    split = write_manifest(
        assign_splits(read_manifest(manifest), SplitPlan(val=0.2, test=0.2, seed=0)),
        root / "split.csv",
    )
    for name, seed in (("small", 0), ("other", 1)):
        loop.train_model(load_train_config(None, [
            f"data.manifest={split}", f"out_dir={root / 'runs'}", f"name={name}", f"seed={seed}",
            "model.arch=simple_cnn", "preprocess.input_height=32", "preprocess.input_width=32",
            "optim.epochs=2", "optim.batch_size=8", "optim.warmup_epochs=1", "loader_workers=1",
        ]), show_progress=False)  # fmt: skip
    return split, root / "runs"


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    return _train_two(tmp_path_factory.mktemp("compare"))


def test_the_table_holds_evaluate_checkpoints_numbers_and_the_paired_tests(two_runs, tmp_path):
    from edgebc.cli import main
    from edgebc.train.evaluate import evaluate_checkpoint

    split, runs = two_runs
    reported = tmp_path / "reported.yaml"
    reported.write_text(
        "small:\n  source: Smith 2024, Table 3\n  data: BUSI, 5-fold\n  accuracy: 0.97\n  auc: 0.99\n"
    )
    out = tmp_path / "cmp"
    code = main(["compare", f"small={runs / 'small'}", str(runs / "other" / "best.pt"), "--out", str(out),
                 "--bootstrap", "50", "--latency-rounds", "3", "--reported", str(reported),
                 "--reduced", "other=2 of 100 epochs", "--hardware", "small=2-core CPU"])  # fmt: skip
    assert code == 0
    report = json.loads((out / "comparison.json").read_text())
    for name in (
        "comparison.md",
        "roc.png",
        "models/small/report.json",
        "models/other/predictions.csv",
    ):
        assert (out / name).is_file(), name
    rows = {r["name"]: r for r in report["rows"]}
    assert set(rows) == {"small", "other"}
    for name in rows:
        own = evaluate_checkpoint(
            runs / name / "best.pt", split, tmp_path / f"eval-{name}", "test", 50, 0
        )
        row = rows[name]
        positive = own["per_class"]["malignant"]
        assert row["accuracy"] == own["accuracy"] and row["auc"] == own["auc_positive"]
        assert row["auc_ci"] == own["auc_positive_ci"] and row["kappa"] == own["cohen_kappa"]
        assert (row["sensitivity"], row["specificity"]) == (own["sensitivity"], own["specificity"])
        assert (row["precision"], row["f1"]) == (positive["precision"], positive["f1"])
        assert row["confusion_matrix"] == own["confusion_matrix"]
        assert row["budget"]["epochs_run"] == 2 and row["budget"]["epochs_planned"] == 2
        assert row["latency"]["p50_ms"] > 0 and row["latency"]["parameters"] > 0
        assert row["latency"]["parity_max_prob_diff"] <= 1e-3
    assert (
        rows["other"]["reduced_budget"] == "2 of 100 epochs" and rows["other"]["reported"] is None
    )
    assert rows["small"]["reported"]["accuracy"] == 0.97
    assert rows["small"]["budget"]["hardware"] == "2-core CPU"
    # the paired tests are the metrics' own on the scored probabilities
    small = np.loadtxt(
        out / "models/small/predictions.csv", delimiter=",", skiprows=1, usecols=(5,)
    )
    other = np.loadtxt(
        out / "models/other/predictions.csv", delimiter=",", skiprows=1, usecols=(5,)
    )
    labels = np.loadtxt(
        out / "models/small/predictions.csv", delimiter=",", skiprows=1, usecols=(1,), dtype=str
    )
    expected = metrics.delong_test(labels == "malignant", small, other)
    pair = report["paired"][0]
    assert pair["auc"]["difference"] == pytest.approx(expected.difference, abs=1e-5)
    assert pair["auc"]["p_value"] == pytest.approx(expected.p_value, abs=1e-3)
    assert pair["decisions"]["method"].startswith("McNemar exact")
    text = (out / "comparison.md").read_text()
    assert "as reported, on other data" in text and "Smith 2024, Table 3" in text
    assert "reduced budget: 2 of 100 epochs" in text


def test_models_scored_on_different_cases_are_refused_and_nothing_is_written(two_runs, tmp_path):
    from edgebc.data import read_manifest, write_manifest
    from edgebc.train.compare import ModelEntry, compare_models

    split, runs = two_runs
    samples = read_manifest(split)
    dropped = next(s for s in samples if s.split == "test")
    fewer = write_manifest([s for s in samples if s is not dropped], tmp_path / "fewer.csv")
    config = (runs / "other" / "config.yaml").read_text().replace(str(split), str(fewer))
    moved = tmp_path / "moved"
    moved.mkdir()
    (moved / "config.yaml").write_text(config)
    (moved / "best.pt").symlink_to(runs / "other" / "best.pt")
    out = tmp_path / "cmp"
    with pytest.raises(EdgebcError, match=r"different cases \(1 only in small.*0 only in moved"):
        compare_models([ModelEntry("small", runs / "small"), ModelEntry("moved", moved)], out,
                       n_boot=20, latency_rounds=0)  # fmt: skip
    assert not out.exists()


def test_reported_numbers_must_name_a_row_their_source_and_data(tmp_path):
    from edgebc.train.compare import read_reported

    bad = tmp_path / "r.yaml"
    bad.write_text("resnet:\n  source: A 2023\n  data: BUSI\n  auc: 0.9\n")
    with pytest.raises(EdgebcError, match="'resnet' is none of the compared models"):
        read_reported(bad, ["mnv3", "cnn"])
    bad.write_text("mnv3:\n  auc: 0.9\n")
    with pytest.raises(EdgebcError, match="says no 'source'"):
        read_reported(bad, ["mnv3", "cnn"])
    bad.write_text("mnv3:\n  source: A\n  data: B\n  AUC: 0.9\n")
    with pytest.raises(EdgebcError, match=r"unknown keys \['AUC'\]"):
        read_reported(bad, ["mnv3", "cnn"])
    bad.write_text("mnv3:\n  source: A\n  data: B\n  accuracy: 97\n")
    with pytest.raises(EdgebcError, match="fraction"):
        read_reported(bad, ["mnv3", "cnn"])


def test_a_cross_validation_run_is_scored_out_of_fold_with_mean_and_sd(tmp_path):
    torch = pytest.importorskip("torch", reason="torch (the [train] extra) is not installed")
    torch.set_num_threads(1)
    from edgebc.data import read_manifest, write_manifest
    from edgebc.data.split import SplitPlan, assign_splits
    from edgebc.synth.dataset import SynthPlan, write_phantom_dataset
    from edgebc.train.compare import ModelEntry, compare_models
    from edgebc.train.config import load_train_config
    from edgebc.train.crossval import cross_validate
    from edgebc.train.evaluate import evaluate_with_predictions

    phantoms = write_phantom_dataset(tmp_path / "ph", SynthPlan(n_per_class=8, size=48, seed=3))
    plan = SplitPlan(val=0.0, test=0.2, folds=2, seed=0)
    split = write_manifest(assign_splits(read_manifest(phantoms), plan), tmp_path / "folds.csv")
    cross_validate(load_train_config(None, [
        f"data.manifest={split}", f"out_dir={tmp_path / 'runs'}", "name=cv", "model.arch=simple_cnn",
        "preprocess.input_height=32", "preprocess.input_width=32", "optim.epochs=2",
        "optim.batch_size=8", "optim.warmup_epochs=1", "loader_workers=1",
    ]), show_progress=False)  # fmt: skip
    cv = tmp_path / "runs" / "cv"
    report = compare_models([ModelEntry("a", cv), ModelEntry("b", cv)], tmp_path / "cmp",
                            n_boot=20, latency_rounds=0)  # fmt: skip
    row = report["rows"][0]
    folds = [
        evaluate_with_predictions(
            cv / f"fold{k}" / "best.pt", split, tmp_path / f"e{k}", "train", 20, 0, fold=k
        )[0]
        for k in (0, 1)
    ]  # each fold's model on the fold it validated on, by the one scoring path
    assert [f["accuracy"] for f in row["folds"]] == [f["accuracy"] for f in folds]
    assert [f["auc"] for f in row["folds"]] == [f["auc_positive"] for f in folds]
    samples = [s for s in read_manifest(split) if s.split == "train"]
    assert [d["fold"] for d in row["data"]] == [0, 1]
    assert sum(d["n"] for d in row["data"]) == report["cases"]["n"] == len(samples)
    assert row["kind"] == "cross-validation" and len(row["folds"]) == 2
    accuracies = [f["accuracy"] for f in row["folds"]]
    assert row["accuracy"] == pytest.approx(np.mean(accuracies))
    assert row["accuracy_sd"] == pytest.approx(np.std(accuracies, ddof=1))
    assert np.sum(row["confusion_matrix"]) == len(samples)
    assert report["paired"][0]["auc"]["difference"] == 0.0
    assert row["budget"]["folds"] == 2 and row["budget"]["epochs_run"] == 4


def test_a_difference_with_no_estimable_variance_has_no_p_value():
    positive = np.array([True, False, False])  # one positive case: S10 cannot be estimated
    test = metrics.delong_test(positive, np.array([0.9, 0.1, 0.2]), np.array([0.1, 0.9, 0.2]))
    assert test.difference == pytest.approx(1.0) and np.isnan(test.p_value)
    assert "not estimable" in test.method
    same = metrics.delong_test(positive, np.array([0.9, 0.1, 0.2]), np.array([0.8, 0.1, 0.2]))
    assert same.difference == 0 and same.p_value == 1.0


def test_models_of_different_tasks_are_tested_on_the_positive_class_they_share():
    from edgebc.data.records import Sample
    from edgebc.model_card import ModelCard, OperatingPoint, single_input
    from edgebc.preprocess import PreprocessCard
    from edgebc.task import task_for
    from edgebc.train.compare import ModelEntry, Scored, paired_tests
    from edgebc.train.evaluate import Predictions

    labels = ["normal", "benign", "malignant", "malignant", "benign", "normal"]
    samples = [Sample(Path(f"{k}.png"), label) for k, label in enumerate(labels)]

    def scored(task_name, probs):
        task = task_for(task_name)
        card = ModelCard(name=task_name, arch="x", task=task,
                         inputs=single_input(PreprocessCard()), operating_point=OperatingPoint(0.5))  # fmt: skip
        predictions = Predictions(samples, task.encode(labels), np.array(probs), card)
        return Scored(ModelEntry(task_name, Path(task_name)), "onnx", [], [predictions])

    # three classes (normal, benign, malignant): it calls both malignant cases, and benign
    # case 1 malignant; its three-class accuracy (4 of 6) is not the question the other answers
    three = scored("three_class", [[.8, .1, .1], [.1, .3, .6], [.1, .1, .8], [.1, .2, .7],
                                   [.2, .7, .1], [.7, .2, .1]])  # fmt: skip
    # normal vs abnormal: its positive class, abnormal, is no raw label
    abnormal = scored("normal_vs_abnormal", [[.9, .1], [.2, .8], [.3, .7], [.4, .6],
                                             [.1, .9], [.8, .2]])  # fmt: skip
    rest = scored(
        "malignant_vs_rest",
        [[0.9, 0.1], [0.8, 0.2], [0.1, 0.9], [0.4, 0.6], [0.7, 0.3], [0.9, 0.1]],
    )
    assert list(abnormal.positive) == [False, True, True, True, True, False]
    assert list(three.correct) == [True, False, True, True, True, True]  # right about malignant
    assert list(rest.correct) == [True] * 6
    pairs = paired_tests([three, rest], [s.unit for s in samples])
    assert pairs[0]["decisions"]["difference"] == pytest.approx(-1 / 6)
    assert paired_tests([abnormal, abnormal], [s.unit for s in samples])[0]["auc"]["p_value"] == 1.0
