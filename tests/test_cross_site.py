"""The cross-site report on two phantom sites: every arm trained, every site scored the right way,
intervals resampled by patient, the reference reader beside the model, finished arms reused."""

import dataclasses
import json

import numpy as np
import pytest

from edgebc import metrics
from edgebc.data import read_manifest, write_manifest
from edgebc.data.manifest import merge_sites
from edgebc.data.split import SplitPlan, assign_splits
from edgebc.errors import DataLayoutError, EdgebcError
from edgebc.synth.dataset import SynthPlan, write_phantom_dataset


def test_a_cluster_bootstrap_counts_patients_not_frames():
    rng = np.random.default_rng(0)
    truth = rng.random(40) < 0.4
    score = truth * 0.3 + rng.random(40)
    # every patient imaged twice, identically: resampling patients gives the interval of the
    # patients themselves; resampling frames would pretend to twice as many cases
    twice = np.repeat(np.arange(40), 2)
    clustered = metrics.cluster_bootstrap_ci(
        metrics.roc_auc, [f"p{k}" for k in twice], truth[twice], score[twice], n_boot=300, seed=1
    )
    single = metrics.cluster_bootstrap_ci(
        metrics.roc_auc, [f"p{k}" for k in range(40)], truth, score, n_boot=300, seed=1
    )
    assert clustered == pytest.approx(single)
    naive = metrics.bootstrap_ci(metrics.roc_auc, truth[twice], score[twice], n_boot=300, seed=1)
    assert naive[1] - naive[0] < 0.85 * (clustered[1] - clustered[0])


def test_merging_sites_keeps_them_apart_and_refuses_collisions(tmp_path):
    a = [s.with_(group="g0000") for s in read_manifest(_site(tmp_path, "a", 1))[:4]]
    b = [s.with_(group="g0000") for s in read_manifest(_site(tmp_path, "b", 2))[:4]]
    merged = merge_sites([("a", a), ("b", b)])
    assert {s.source for s in merged} == {"a", "b"}
    assert {s.group for s in merged} == {"a:g0000", "b:g0000"}  # two groups, not one
    with pytest.raises(DataLayoutError, match="listed by site 'a' and by 'b'"):
        merge_sites([("a", a), ("b", [s.with_(source=None) for s in a])])
    with pytest.raises(
        DataLayoutError, match="its source column says 'a' but it is merged as site 'b'"
    ):
        merge_sites([("b", a)])
    twin = [b[0].with_(patient_id=a[0].patient_id)]
    with pytest.raises(DataLayoutError, match="appears at site 'a' and at 'b'"):
        merge_sites([("a", a), ("b", twin)])


def _site(root, name, seed, n_per_class=12):
    """A phantom site: patients with two frames each, a scanner per patient, a BI-RADS per frame."""
    folder = root / name
    manifest = write_phantom_dataset(folder, SynthPlan(n_per_class=n_per_class, size=48, seed=seed))
    rng = np.random.default_rng(seed)
    samples = []
    for label in ("normal", "benign", "malignant"):
        of_label = [s for s in read_manifest(manifest) if s.label == label]
        for k, sample in enumerate(of_label):
            patient = f"{name}-{label}-{k // 2}"
            grade = {
                "normal": "2",
                "benign": rng.choice(["2", "3", "4"]),
                "malignant": rng.choice(["4", "5", "3"]),
            }[label]
            extra = (("device", f"{name}-scanner-{k % 2}"), ("birads", str(grade)))
            samples.append(sample.with_(patient_id=patient, source=name, extra=extra))
    return write_manifest(
        assign_splits(samples, SplitPlan(val=0.25, test=0.25, seed=seed)), folder / "split.csv"
    )


def _recipe(tmp_path, epochs):
    """A tiny training recipe for the phantom sites (a few seconds an arm)."""
    import yaml

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"arch": "simple_cnn"}, "preprocess": {"input_height": 32, "input_width": 32},
        "data": {"task": "benign_vs_malignant"}, "loader_workers": 1,
        "optim": {"epochs": epochs, "batch_size": 8, "warmup_epochs": 1, "ema_decay": 0, "early_stop_patience": 0},
    }))  # fmt: skip
    return recipe


@pytest.mark.slow
def test_the_cross_site_report_trains_every_arm_and_scores_every_site(tmp_path, capsys):
    pytest.importorskip("torch", reason="torch (the [train] extra) is not installed")
    import yaml

    from edgebc.cli import main

    sites = {
        name: read_manifest(_site(tmp_path, name, seed))
        for name, seed in (("north", 3), ("south", 4))
    }
    manifest = write_manifest(merge_sites(sites.items()), tmp_path / "sites.csv")
    recipe = _recipe(tmp_path, epochs=2)
    config = tmp_path / "cross.yaml"
    config.write_text(yaml.safe_dump({"train_config": str(recipe), "manifest": str(manifest),
                                      "out_dir": str(tmp_path / "out"), "bootstrap": 200}))  # fmt: skip
    assert main(["cross-site", "--config", str(config)]) == 0
    report = json.loads((tmp_path / "out" / "cross_site.json").read_text())
    rows = {(r["arm"], r["site"]): r for r in report["rows"]}
    assert set(rows) == {
        (arm, site) for arm in ("north-only", "south-only", "pooled") for site in ("north", "south")
    }
    lesions = {site: [s for s in samples if s.label != "normal"] for site, samples in sites.items()}
    # a site the arm never saw: every one of its (benign/malignant) frames; a site it trained on: its test split
    assert rows[("north-only", "south")]["frames"] == len(lesions["south"])
    assert rows[("north-only", "south")]["scored_on"] == "every shared patient"
    assert rows[("north-only", "north")]["frames"] == sum(
        s.split == "test" for s in lesions["north"]
    )
    assert rows[("pooled", "south")]["labels_left_out"] == {
        "normal": sum(s.split == "test" and s.label == "normal" for s in sites["south"])
    }
    row = rows[("north-only", "south")]
    assert row["units"] == len(
        {s.patient_id for s in lesions["south"]}
    )  # patients, two frames each
    low, high = row["auc"]["ci95"]
    assert low <= row["auc"]["value"] <= high
    assert {d["value"] for d in row["by_device"]} == {"south-scanner-0", "south-scanner-1"}
    assert sum(d["frames"] for d in row["by_device"]) == row["frames"]
    reader = row["reference_reader"]
    assert (
        0.5 < reader["reader_auc"]["value"] <= 1
    )  # the phantom BI-RADS leans malignant for malignant
    assert reader["model_minus_reader"]["value"] == pytest.approx(
        reader["model_auc"]["value"] - reader["reader_auc"]["value"]
    )
    assert "bound" in row and row["bound"]["confidence"] == 0.95
    markdown = (tmp_path / "out" / "cross_site.md").read_text()
    assert "| north | south (every shared patient) |" in markdown and "## By scanner" in markdown
    # a second run reuses the finished arms instead of training them again
    best = tmp_path / "out" / "north-only" / "best.pt"
    before = best.stat().st_mtime_ns
    assert main(["cross-site", "--config", str(config), "--set", "arms=[north-only]"]) == 0
    assert best.stat().st_mtime_ns == before
    # ... but not a finished arm of another recipe: its numbers would be this recipe's
    report_before = (tmp_path / "out" / "cross_site.json").read_bytes()
    assert main(["cross-site", "--config", str(config), "--set", "arms=[north-only]",
                 "--set", "overrides=[model.arch=mobilenet_v3_small]"]) == 1  # fmt: skip
    said = capsys.readouterr().err
    assert "holds a run of another recipe" in said
    assert "model.arch: 'simple_cnn' in the run, 'mobilenet_v3_small' in the recipe" in said
    assert best.stat().st_mtime_ns == before
    assert (tmp_path / "out" / "cross_site.json").read_bytes() == report_before
    # nor resumes an interrupted run of another recipe (resuming trains what the run recorded)
    (tmp_path / "out" / "north-only" / "metrics.json").unlink()
    last = tmp_path / "out" / "north-only" / "last.pt"
    interrupted_at = last.stat().st_mtime_ns
    assert main(["cross-site", "--config", str(config), "--set", "arms=[north-only]",
                 "--set", "overrides=[optim.lr=0.5]"]) == 1  # fmt: skip
    assert "optim.lr: 0.002 in the run, 0.5 in the recipe" in capsys.readouterr().err
    assert last.stat().st_mtime_ns == interrupted_at
    # and a run on other frames (a manifest with another split) is another recipe's too
    (tmp_path / "out" / "north-only" / "metrics.json").write_text("{}")
    moved = [dataclasses.replace(s, split="train" if s.split == "val" else s.split)
             for s in read_manifest(manifest)]  # fmt: skip
    other = write_manifest(moved, tmp_path / "resplit.csv")
    assert main(["cross-site", "--config", str(config), "--set", "arms=[north-only]",
                 "--set", f"manifest={other}"]) == 1  # fmt: skip
    assert "data: trained on other frames" in capsys.readouterr().err


@pytest.mark.slow
def test_remedies_train_leave_one_site_out_and_compare_paired_against_the_baseline(tmp_path):
    pytest.importorskip("torch", reason="torch (the [train] extra) is not installed")
    import yaml

    from edgebc.cli import main

    sites = {name: read_manifest(_site(tmp_path, name, seed, n_per_class=8))
             for name, seed in (("east", 5), ("west", 6), ("north", 7))}  # fmt: skip
    manifest = write_manifest(merge_sites(sites.items()), tmp_path / "sites.csv")
    recipe = _recipe(tmp_path, epochs=1)
    out = tmp_path / "remedies"
    config = tmp_path / "remedies.yaml"
    config.write_text(yaml.safe_dump({
        "train_config": str(recipe), "manifest": str(manifest), "out_dir": str(out), "bootstrap": 200,
        "pooled": False, "leave_one_out": True, "own_split": "val",
        "variants": {"baseline": [], "equalise": ["preprocess.appearance=equalise"], "untrained": ["seed=9"]},
    }))  # fmt: skip
    for variant in ("baseline", "equalise"):
        assert main(["cross-site", "--config", str(config), "--set", f"variant={variant}"]) == 0
    report = json.loads((out / "equalise" / "cross_site.json").read_text())
    rows = {(r["arm"], r["site"]): r for r in report["rows"]}
    assert set(rows) == {(f"without-{a}", s) for a in sites for s in sites}
    assert rows[("without-east", "west")]["trained_on"] == ["north", "west"]
    lesions = {site: [s for s in samples if s.label != "normal"] for site, samples in sites.items()}
    # the left-out site on all its frames, a site the arm trained on on its validation split only
    assert rows[("without-east", "east")]["frames"] == len(lesions["east"])
    assert rows[("without-east", "west")]["scored_on"] == "val split"
    assert rows[("without-east", "west")]["frames"] == sum(
        s.split == "val" for s in lesions["west"]
    )
    trained = yaml.safe_load((out / "equalise" / "without-east" / "config.yaml").read_text())
    assert trained["preprocess"]["appearance"] == "equalise"

    before = (out / "baseline" / "without-east" / "best.pt").stat().st_mtime_ns
    assert main(["cross-site", "--config", str(config), "--compare"]) == 0
    assert (out / "baseline" / "without-east" / "best.pt").stat().st_mtime_ns == before
    assert not (out / "untrained").exists()  # --compare trains nothing
    table = json.loads((out / "remedies.json").read_text())
    assert table["skipped"] and table["skipped"][0].startswith("untrained:")
    by = {(r["variant"], r["arm"], r["site"]): r for r in table["rows"]}
    assert by[("baseline", "without-east", "east")]["delta_auc"] is None
    delta = by[("equalise", "without-east", "east")]["delta_auc"]
    expected = (
        by[("equalise", "without-east", "east")]["auc"]["value"]
        - by[("baseline", "without-east", "east")]["auc"]["value"]
    )
    assert delta["value"] == pytest.approx(expected)
    assert delta["frames"] == len(lesions["east"])
    assert delta["ci95"][0] <= delta["value"] <= delta["ci95"][1]
    assert (
        "| equalise | north+west | east (every shared patient) |"
        in (out / "remedies.md").read_text()
    )


def test_sites_can_be_scanners_for_leave_one_scanner_out(tmp_path):
    pytest.importorskip("torch", reason="torch (the [train] extra) is not installed")
    from edgebc.train.config import load_train_config
    from edgebc.train.crosssite import CrossSiteConfig, arms_of
    from edgebc.train.loop import select_samples

    sites = {
        name: read_manifest(_site(tmp_path, name, seed, n_per_class=4))
        for name, seed in (("a", 1), ("b", 2))
    }
    merged = merge_sites(sites.items())
    merged = [s.with_(extra=()) if s.source == "b" else s for s in merged]  # b names no scanner
    manifest = write_manifest(merged, tmp_path / "sites.csv")
    assert {s.site("device") for s in merged} == {"a-scanner-0", "a-scanner-1", "b"}
    config = load_train_config(None, [f"data.manifest={manifest}", "data.site_column=device",
                                      "data.sources=[a-scanner-1, b]", "data.task=benign_vs_malignant"])  # fmt: skip
    chosen = select_samples(config, "train")
    assert chosen and {s.site("device") for s in chosen} == {"a-scanner-1", "b"}
    cross = CrossSiteConfig(
        train_config="x.yaml",
        manifest=str(manifest),
        leave_one_out=True,
        site_column="device",
        pooled=False,
    )
    arms = arms_of(cross, ["GE Logiq 5 @10-12MHz", "b", "c"])
    assert [a.name for a in arms] == ["without-GE-Logiq-5-10-12MHz", "without-b", "without-c"]
    assert arms[0].sites == ("b", "c")
    named = CrossSiteConfig(
        train_config="x.yaml", manifest=str(manifest), pooled_name="recommended"
    )
    assert [a.name for a in arms_of(named, ["a", "b"])] == ["a-only", "b-only", "recommended"]


def _run_folder(tmp_path, name, overrides=(), drop=()):
    """A run folder whose config.yaml is the recipe with `overrides`, without the dotted keys in
    `drop` (fields a run made before they existed does not record)."""
    import yaml

    from edgebc.train.config import load_train_config

    recorded = load_train_config(_recipe(tmp_path, epochs=2), list(overrides)).to_dict()
    for key in drop:
        section, field = key.split(".")
        del recorded[section][field]
    run_dir = tmp_path / name
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(yaml.safe_dump(recorded))
    return run_dir


def test_a_run_is_the_recipes_unless_something_it_records_differs(tmp_path, monkeypatch):
    from edgebc.train.config import load_train_config
    from edgebc.train.reuse import recipe_differences

    monkeypatch.chdir(tmp_path)
    recipe = load_train_config(_recipe(tmp_path, epochs=2), ["data.manifest=sites.csv"])
    sites = ["north", "south"]
    # where it ran is not the recipe; a field the run did not record is not held against it
    same = _run_folder(tmp_path, "same", ["threads=1", "device=cpu", "loader_workers=2"],
                       drop=["optim.early_stop_min_epochs"])  # fmt: skip
    assert recipe_differences(same, recipe, sites) == []
    # the same task, file and sites, spelled otherwise
    spelled = _run_folder(tmp_path, "spelled", ["data.task=null", "data.classes=[benign, malignant]",
                          "data.positive_class=malignant", f"data.sources={sites}"])  # fmt: skip
    assert recipe_differences(spelled, recipe, sites) == []
    weights = tmp_path / "w.pt"
    local = load_train_config(_recipe(tmp_path, epochs=2), ["model.pretrained=w.pt"])
    absolute = _run_folder(tmp_path, "absolute", [f"model.pretrained={weights}"])
    assert recipe_differences(absolute, local, sites) == []
    # what the model is, how it learns, which sites and task: each named
    other = _run_folder(tmp_path, "other", ["optim.epochs=3", "seed=1", "data.sources=[north]",
                        "data.task=malignant_vs_rest", "preprocess.input_height=48"])  # fmt: skip
    found = recipe_differences(other, recipe, sites)
    assert found == [
        "preprocess.input_height: 48 in the run, 32 in the recipe",
        "optim.epochs: 3 in the run, 2 in the recipe",
        "seed: 1 in the run, 0 in the recipe",
        "data.task: malignant_vs_rest in the run, benign_vs_malignant in the recipe",
        "data.sources: ['north'] in the run, ['north', 'south'] in the recipe",
    ]
    unreadable = tmp_path / "unreadable"
    unreadable.mkdir()
    (unreadable / "config.yaml").write_text("model: {arch: simple_cnn, no_such_field: 1}\n")
    assert (
        "config.yaml cannot be read, so what it trained is unknown"
        in recipe_differences(unreadable, recipe, sites)[0]
    )


def test_nested_fields_a_run_did_not_record_are_noted_and_count_only_when_resuming(tmp_path):
    import yaml

    from edgebc.train.config import load_train_config
    from edgebc.train.reuse import recipe_differences, refuse_other_recipe

    recipe_file = "configs/fusion_phantoms.yaml"
    recorded = load_train_config(recipe_file).to_dict()
    del recorded["model"]["fusion"]["arcface_weight"]  # a field added after the run
    run_dir = tmp_path / "fusion-run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(yaml.safe_dump(recorded))
    same = load_train_config(recipe_file)
    noted: list[str] = []
    assert recipe_differences(run_dir, same, unrecorded=noted) == [] and noted == []
    other = load_train_config(recipe_file, ["model.fusion.arcface_weight=0.5"])
    assert recipe_differences(run_dir, other, unrecorded=noted) == []
    assert noted == ["model.fusion.arcface_weight: not recorded by the run (the code's default "
                     "now: 0.0), 0.5 in the recipe"]  # fmt: skip
    # an interrupted run resumes with its own config.yaml, so the recipe's 0.5 would not be used
    with pytest.raises(
        EdgebcError, match=r"another recipe \(model\.fusion\.arcface_weight: not recorded"
    ):
        refuse_other_recipe(run_dir, other, [], resuming=True)
    # a recorded nested field is compared field by field and named
    changed = load_train_config(recipe_file, ["model.fusion.mg_preprocess.input_height=96"])
    assert recipe_differences(run_dir, changed) == [
        f"model.fusion.mg_preprocess.input_height: {same.model.fusion.mg_preprocess.input_height} "
        "in the run, 96 in the recipe"
    ]
