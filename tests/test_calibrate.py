"""`edgebc calibrate`: a site's refit equals the shared functions' on the same logits, the release
verifies, every runtime path decides by its card, and what is wrong is refused, changing nothing."""

import csv
import json
import shutil
import sys
import types
from dataclasses import replace

import numpy as np
import pytest

from edgebc import metrics
from edgebc.backends import open_backend
from edgebc.calibration import bound_statement, fit_calibration, operating_point
from edgebc.cli import main
from edgebc.data import read_manifest, write_manifest
from edgebc.data.fingerprint import data_fingerprint
from edgebc.decode import read_image
from edgebc.demo import DEMO_MODEL
from edgebc.errors import EdgebcError
from edgebc.integrity import read_manifest as read_sha_manifest
from edgebc.integrity import sha256_file
from edgebc.integrity import write_manifest as write_sha_manifest
from edgebc.model_card import ModelCard, machine_paths, read_card
from edgebc.model_store import ModelStore
from edgebc.preprocess import preprocess_chw
from edgebc.release import CARD_FILE, card_for_model, check_site_card, write_release
from edgebc.site_calibration import calibrate_site
from edgebc.synth.dataset import SynthPlan, write_phantom_dataset
from edgebc.task import named_task

MALIGNANT_PATIENTS = 20  # 40 malignant phantoms, two images per patient


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A site's labelled phantoms (40 per class, two images per patient) and its release."""
    root = tmp_path_factory.mktemp("site")
    samples = read_manifest(write_phantom_dataset(root / "ph", SynthPlan(40, 160, seed=7)))
    by_class = {}
    for s in samples:
        by_class.setdefault(s.label, []).append(s)
    ordered = [s.with_(patient_id=f"{s.label}-{k // 2:02d}")
               for group in by_class.values() for k, s in enumerate(group)]  # fmt: skip
    manifest = write_manifest(ordered, root / "site.csv")
    release = root / "release"
    assert main(["calibrate", str(DEMO_MODEL), "--data", str(manifest), "--out", str(release)]) == 0
    return types.SimpleNamespace(root=root, samples=ordered, manifest=manifest, release=release,
                                 card=card_for_model(release / "model.onnx"))  # fmt: skip


def _logits(samples):
    backend = open_backend(DEMO_MODEL, warmup=0)
    images = np.stack(
        [preprocess_chw(read_image(s.path), backend.card.preprocess) for s in samples]
    )
    return np.concatenate([backend.run(images[i : i + 32]) for i in range(0, len(images), 32)])


def test_the_refit_is_the_shared_functions_on_the_same_logits(site):
    demo = read_card(DEMO_MODEL)
    y = named_task("three_class").encode(s.label for s in site.samples)
    units = [s.unit for s in site.samples]
    logits = _logits(site.samples).astype(np.float64)
    temperature = metrics.fit_temperature(logits, y)
    assert site.card.temperature == pytest.approx(temperature, rel=1e-9)
    assert site.card.temperature != pytest.approx(demo.temperature, rel=1e-3)  # it did refit
    expected = operating_point(metrics.softmax(logits, temperature), y, units, 2, 0.95, 0.95)
    point = site.card.operating_point
    assert point.threshold == pytest.approx(expected.threshold, rel=1e-9)
    assert (point.unit, point.positives, point.negatives) == ("patient", MALIGNANT_PATIENTS, 40)
    detected = round(point.sensitivity * MALIGNANT_PATIENTS)
    assert point.sensitivity_bound == pytest.approx(
        metrics.sensitivity_lower_bound(detected, MALIGNANT_PATIENTS, 0.95)
    )
    assert point.sensitivity_bound == pytest.approx(expected.sensitivity_bound)
    ece_before = metrics.expected_calibration_error(metrics.softmax(logits, demo.temperature), y)[0]
    assert site.card.calibration["ece_before"] == pytest.approx(ece_before)
    assert site.card.calibration["ece_after"] == pytest.approx(
        metrics.expected_calibration_error(metrics.softmax(logits, temperature), y)[0]
    )


def test_training_finalises_with_the_same_function():
    pytest.importorskip("torch", reason="the training side needs the [train] extra")
    from edgebc.train import finalize

    assert finalize.fit_calibration is fit_calibration
    assert not hasattr(finalize, "operating_point")  # one implementation, not two


def test_the_release_verifies_and_differs_only_in_its_calibration(site):
    release = site.release
    assert sorted(p.name for p in release.iterdir()) == ["MANIFEST.sha256", CARD_FILE, "model.onnx"]
    entries = read_sha_manifest(release)
    assert entries == {
        "model.onnx": sha256_file(DEMO_MODEL),
        CARD_FILE: sha256_file(release / CARD_FILE),
    }
    demo, card = read_card(DEMO_MODEL).to_dict(), json.loads((release / CARD_FILE).read_text())
    differing = {k for k in demo if demo[k] != card[k]}
    assert differing == {"name", "temperature", "operating_point", "calibration", "lineage"}
    assert card["name"] == "demo-phantom-site"
    entry = card["lineage"]["site_calibration"]
    assert entry["data_fingerprint"] == data_fingerprint(site.samples)
    assert entry["source_model_sha256"] == sha256_file(DEMO_MODEL)
    assert (entry["frames"], entry["cases"], entry["positive_cases"]) == (
        120,
        60,
        MALIGNANT_PATIENTS,
    )
    assert entry["date"][:4].isdigit() and entry["split"] == "all"
    assert machine_paths(card) == [] and entry["data"].count("/") <= 1  # the site's folders stay
    assert not list(site.root.glob(".release.*"))  # nothing half-written left beside it


def test_the_runtime_decides_by_the_site_card(site, tmp_path):
    backend = open_backend(site.release / "model.onnx", warmup=0)
    assert backend.card == site.card and backend.card.threshold != read_card(DEMO_MODEL).threshold
    assert backend.model_sha256 == sha256_file(DEMO_MODEL)
    # edgebc classify: every row carries the site's threshold
    scans = tmp_path / "scans"
    scans.mkdir()
    for s in site.samples[:3]:
        shutil.copy(s.path, scans / s.path.name)
    out = tmp_path / "rows.csv"
    assert main(["classify", str(site.release / "model.onnx"), str(scans), "--out", str(out)]) == 0
    with open(out, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert {float(r["threshold"]) for r in rows} == {site.card.threshold}


def test_eval_reports_against_the_site_operating_point(site, tmp_path):
    pytest.importorskip("matplotlib", reason="eval's figures need the [train] extra")
    from edgebc.train.evaluate import evaluate_checkpoint

    report = evaluate_checkpoint(site.release / "model.onnx", site.manifest, tmp_path / "eval",
                                 split=None, n_boot=20, gradcam_per_kind=0)  # fmt: skip
    point = site.card.operating_point
    assert report["threshold"] == point.threshold
    assert report["temperature"] == site.card.temperature
    op = report["operating_point"]
    assert op["sensitivity_bound"] == point.sensitivity_bound
    assert op["patients_positive"] == MALIGNANT_PATIENTS
    # the same cases it was fitted on: the per-patient sensitivity is the fitted one
    assert op["patient_sensitivity"] == pytest.approx(point.sensitivity)


def test_the_store_installs_the_release_with_its_card(site, tmp_path):
    store = ModelStore(tmp_path / "store")
    plain_folder = tmp_path / "plain"
    plain_folder.mkdir()
    shutil.copy(DEMO_MODEL, plain_folder / "model.onnx")
    write_sha_manifest(plain_folder, ["model.onnx"])
    plain = store.install(plain_folder / "model.onnx")
    calibrated = store.install(site.release / "model.onnx")
    assert calibrated.id != plain.id  # the same model file, another card: another release
    assert calibrated.id.endswith(sha256_file(site.release / CARD_FILE)[:8])
    assert read_sha_manifest(calibrated.path) == read_sha_manifest(site.release)
    assert calibrated.info["threshold"] == site.card.threshold
    assert calibrated.info["sensitivity_bound"] == bound_statement(site.card)
    assert open_backend(store.root / "current" / "model.onnx", warmup=0).card == site.card
    assert [r.problem for r in store.list()] == [None, None]
    store.rollback()
    assert open_backend(store.root / "current" / "model.onnx", warmup=0).card == read_card(
        DEMO_MODEL
    )
    # a card.json altered inside the store makes that release unusable, and says why
    (calibrated.path / CARD_FILE).chmod(0o644)
    (calibrated.path / CARD_FILE).write_text((site.release / CARD_FILE).read_text() + " ")
    problem = next(r.problem for r in store.list() if r.id == calibrated.id)
    assert "card.json" in problem and "does not match MANIFEST.sha256" in problem


def test_serving_shows_the_bound_beside_the_decision(site, tmp_path):
    pytest.importorskip("fastapi", reason="needs the [serve] extra")
    from fastapi.testclient import TestClient

    from edgebc.serve.app import create_app
    from edgebc.serve.runtime import build_runtime
    from tests.test_serve import settings_for

    point = site.card.operating_point
    statement = (f"sensitivity ≥ {point.sensitivity_bound:.2f} at 95 % confidence, "
                 f"{MALIGNANT_PATIENTS} malignant patients")  # fmt: skip
    runtime = build_runtime(settings_for(tmp_path, model=str(site.release / "model.onnx")))
    with TestClient(create_app(runtime)) as client:
        model = client.get("/v1/model").json()
        assert model["sensitivity_bound"] == statement and model["threshold"] == point.threshold
        assert model["card"]["name"] == "demo-phantom-site" and model["verified"]
        assert model["site_calibration"]["positive_cases"] == MALIGNANT_PATIENTS
        assert client.get("/v1/status").json()["model"]["sensitivity_bound"] == statement
        assert 'id="bound"' in client.get("/").text
    # a cart that overrides the card's threshold states no bound: the bound is not about it
    runtime = build_runtime(settings_for(tmp_path / "b", model=str(site.release / "model.onnx"),
                                         threshold=0.5))  # fmt: skip
    with TestClient(create_app(runtime)) as client:
        model = client.get("/v1/model").json()
        assert model["threshold"] == 0.5 and model["sensitivity_bound"] is None


def test_bound_statement_names_the_unit():
    card = read_card(DEMO_MODEL)
    bare = replace(card, operating_point=replace(card.operating_point, sensitivity_bound=None))
    assert bound_statement(bare) is None  # a card that states no bound
    point = replace(card.operating_point, sensitivity_bound=0.8712, confidence=0.9, positives=12,
                    unit="frame")  # fmt: skip
    framed = replace(card, operating_point=point)
    assert bound_statement(framed) == "sensitivity ≥ 0.87 at 90 % confidence, 12 malignant images"
    assert bound_statement(framed, threshold=point.threshold) is not None
    assert bound_statement(framed, threshold=0.5) is None


# -- a tampered release is refused ------------------------------------------------------------------


def _copy_release(site, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(site.release, folder)
    return folder


def test_a_tampered_card_is_refused(site, tmp_path):
    folder = _copy_release(site, tmp_path)
    card = json.loads((folder / CARD_FILE).read_text())
    card["operating_point"]["threshold"] = 0.01
    (folder / CARD_FILE).write_text(json.dumps(card))
    with pytest.raises(EdgebcError, match=r"card.json: sha256 .* does not match MANIFEST.sha256"):
        open_backend(folder / "model.onnx", warmup=0)
    # re-listed in the manifest, a card that changes more than calibration is still refused
    card["operating_point"]["threshold"] = site.card.threshold
    card["task"]["positive_class"] = "benign"
    (folder / CARD_FILE).write_text(json.dumps(card))
    write_sha_manifest(folder, [CARD_FILE])
    with pytest.raises(EdgebcError, match=r"field 'task' differs from the card embedded"):
        open_backend(folder / "model.onnx", warmup=0)
    # a card the manifest does not list is not used silently
    (folder / "MANIFEST.sha256").write_text(f"{sha256_file(folder / 'model.onnx')}  model.onnx\n")
    with pytest.raises(EdgebcError, match=r"does not list card.json"):
        open_backend(folder / "model.onnx", warmup=0)


def test_check_site_card_names_the_field_and_ignores_calibration():
    demo = read_card(DEMO_MODEL)
    calibrated = replace(demo, name="x", temperature=2.0, calibration={"a": 1},
                         lineage={**demo.lineage, "site_calibration": {"cases": 3}})  # fmt: skip
    check_site_card(calibrated, demo)  # only calibration differs: accepted
    with_nan = replace(demo, metrics={**demo.metrics, "val_auc_positive": float("nan")})
    check_site_card(ModelCard.from_json(with_nan.to_json()), with_nan)  # NaN read back is NaN
    with pytest.raises(EdgebcError, match=r"field 'precision' differs"):
        check_site_card(replace(demo, precision="fp16"), demo)
    with pytest.raises(EdgebcError, match=r"field 'lineage' differs"):
        check_site_card(replace(demo, lineage={"teachers": ["t.pt"]}), demo)


# -- refusals, and what they leave --------------------------------------------------------------------


def test_too_few_malignant_patients_are_refused_saying_how_many(site, tmp_path):
    none = write_manifest(
        [s for s in site.samples if s.label != "malignant"], tmp_path / "none.csv"
    )
    with pytest.raises(EdgebcError, match=r"no malignant patients among 40: a sensitivity bound "
                                          r"would rest on none and be 0"):  # fmt: skip
        calibrate_site(DEMO_MODEL, none, tmp_path / "r0")
    three = [s for s in site.samples
             if s.label != "malignant" or s.patient_id in ("malignant-00", "malignant-01", "malignant-02")]  # fmt: skip
    few = write_manifest(three, tmp_path / "three.csv")
    with pytest.raises(EdgebcError, match=r"only 3 malignant patients; even if the model found "
                                          r"every one the sensitivity bound at 95 % confidence "
                                          r"would be 0\.37 \(and 0 with none found\); a site "
                                          r"calibration needs at least 10"):  # fmt: skip
        calibrate_site(DEMO_MODEL, few, tmp_path / "r3")
    assert not (tmp_path / "r0").exists() and not (tmp_path / "r3").exists()
    # asked for, three patients give the bound three detections of three support
    result = calibrate_site(DEMO_MODEL, few, tmp_path / "r3", min_positives=3)
    point = result.card.operating_point
    assert (point.positives, point.sensitivity) == (3, 1.0)
    assert point.sensitivity_bound == pytest.approx(0.05 ** (1 / 3))
    only_malignant = write_manifest(
        [s for s in site.samples if s.label == "malignant"], tmp_path / "m.csv"
    )
    with pytest.raises(EdgebcError, match=r"every one of the 20 patients is malignant"):
        calibrate_site(DEMO_MODEL, only_malignant, tmp_path / "rm")


def test_labels_not_of_the_task_and_bad_models_are_refused(site, tmp_path):
    stray = write_manifest(
        [site.samples[0].with_(label="cyst"), *site.samples[1:]], tmp_path / "s.csv"
    )
    with pytest.raises(EdgebcError, match=r"labels \['cyst'\] are not classes of this model"):
        calibrate_site(DEMO_MODEL, stray, tmp_path / "r")
    with pytest.raises(EdgebcError, match=r"has no split column"):
        calibrate_site(DEMO_MODEL, site.manifest, tmp_path / "r", split="val")
    folder = tmp_path / "model"
    folder.mkdir()
    shutil.copy(DEMO_MODEL, folder / "model.onnx")
    with pytest.raises(EdgebcError, match=r"no MANIFEST.sha256 beside it lists this file"):
        calibrate_site(folder / "model.onnx", site.manifest, tmp_path / "r")
    write_sha_manifest(folder, ["model.onnx"])
    data = bytearray((folder / "model.onnx").read_bytes())
    data[-1] ^= 0xFF
    (folder / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(EdgebcError, match=r"does not match MANIFEST.sha256"):
        calibrate_site(folder / "model.onnx", site.manifest, tmp_path / "r")
    with pytest.raises(EdgebcError, match=r"already exists"):
        calibrate_site(DEMO_MODEL, site.manifest, site.release)
    assert not (tmp_path / "r").exists()


def test_the_command_line_prints_the_refusal_in_one_line(site, tmp_path, capsys):
    none = write_manifest(
        [s for s in site.samples if s.label != "malignant"], tmp_path / "none.csv"
    )
    code = main(["calibrate", str(DEMO_MODEL), "--data", str(none), "--out", str(tmp_path / "r")])
    assert code == 1 and "bound would rest on none and be 0" in capsys.readouterr().err


def test_a_crash_while_writing_leaves_no_release(site, tmp_path, monkeypatch):
    import edgebc.release

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(edgebc.release, "write_manifest", fail)
    with pytest.raises(OSError, match="disk full"):
        write_release(tmp_path / "r", DEMO_MODEL, site.card)
    assert list(tmp_path.iterdir()) == []


def test_recalibrating_a_release_keeps_the_lineage_it_replaces(site, tmp_path):
    result = calibrate_site(site.release / "model.onnx", site.manifest, tmp_path / "again")
    entry = result.card.lineage["site_calibration"]
    assert entry["previous"] == site.card.lineage["site_calibration"]
    assert result.card.name == "demo-phantom-site"  # named after the model, not the release
    assert result.card.temperature == pytest.approx(site.card.temperature, rel=1e-9)


def test_the_tensorrt_cache_gives_a_reused_engine_the_release_card(site, tmp_path, monkeypatch):
    """An engine built from the same model file before calibration is reused (same network),
    but its sidecar, which the TensorRT backend reads its card from, gets the site's card."""
    from edgebc.backends.tensorrt import cache
    from edgebc.backends.tensorrt.sidecar import read_sidecar, write_sidecar

    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="10.0-test"))
    gpu = {"name": "Test GPU", "compute_capability": "8.7"}
    monkeypatch.setattr(cache, "gpu_identity", lambda: gpu)
    model = site.release / "model.onnx"
    sha = sha256_file(model)
    engine = tmp_path / f"{sha[:16]}-fp16.engine"
    engine.write_bytes(b"serialized engine")
    write_sidecar(engine, {"tensorrt": "10.0-test", "gpu": gpu, "onnx_sha256": sha,
                           "engine_sha256": sha256_file(engine), "card": read_card(DEMO_MODEL).to_json()})  # fmt: skip
    path, built = cache.cached_engine(model, tmp_path)
    assert (path, built) == (engine, False)
    assert ModelCard.from_json(read_sidecar(engine)["card"]) == site.card


@pytest.mark.browser
def test_edgebc_serve_runs_the_release_and_its_page_shows_the_bound(site, tmp_path):
    """`edgebc serve --model RELEASE/model.onnx` as a real process, the page in Chromium."""
    if not shutil.which("chromium"):
        pytest.skip("needs Debian's chromium (apt install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs playwright")
    from tests.serve_process import ServerProcess
    from tests.test_serve_browser import FLAGS

    statement = bound_statement(site.card)
    with ServerProcess(tmp_path, "--model", str(site.release / "model.onnx")) as server:
        server.wait_ready()
        assert server.get("/v1/model").json()["sensitivity_bound"] == statement
        with sync_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path=shutil.which("chromium"), args=FLAGS
            )
            try:
                page = browser.new_page()
                page.goto(server.url + "/")
                page.wait_for_function("document.querySelector('#bound').textContent.length > 0",
                                       timeout=15000)  # fmt: skip
                assert page.inner_text("#bound") == statement
                assert "demo-phantom-site" in page.inner_text("#model")
            finally:
                browser.close()
