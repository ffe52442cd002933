"""The deployment plan: chosen by measurement within the accuracy budget, written into the
manifest, followed by serve/classify, refused (and reported) when altered or another machine's.
Timings are injected: speed is measured in benchmarks/, never in a unit test."""

import inspect
import itertools
import json
import shutil

import numpy as np
import pytest

from edgebc.backends import open_backend
from edgebc.classifier_settings import ClassifierSettings, build_classifier
from edgebc.demo import DEMO_MODEL
from edgebc.deployment_plan import (
    PLAN_FILE,
    Candidate,
    available_candidates,
    make_plan,
    planned_candidate,
    render_table,
    write_plan,
)
from edgebc.errors import EdgebcError
from edgebc.integrity import read_manifest, write_manifest
from edgebc.optional import is_installed
from edgebc.preprocess import preprocess
from edgebc.serve.runtime import check_model_manifest
from edgebc.synth import make_ultrasound_phantom
from edgebc.synth.ultrasound import phantom_rng

CLASSES = ("normal", "benign", "malignant")


def phantom_set(n_per_class=80, seed=3):
    """Labelled phantoms through the demo model's preprocessing (the demo model knows them)."""
    card = open_backend(DEMO_MODEL, threads=1, warmup=0).card
    frames, labels = [], []
    for k, name in enumerate(CLASSES):
        for i in range(n_per_class):
            image = make_ultrasound_phantom(name, phantom_rng(seed, 100 * k + i), 160, 160).image
            frames.append(preprocess(image, card.preprocess))
            labels.append(k)
    return np.concatenate(frames), np.array(labels)


class Shifted:
    """The real demo backend with its logits changed by `change`: a reduced precision that is
    close (small noise) or systematically worse (malignant pushed down)."""

    def __init__(self, change):
        self.inner = open_backend(DEMO_MODEL, threads=1, warmup=0)
        self.card, self.change, self.closed = self.inner.card, change, False

    def run(self, batch):
        return self.change(self.inner.run(batch))

    def close(self):
        self.closed = True
        self.inner.close()


def close_enough(logits):
    return logits + np.random.default_rng(0).normal(0, 1e-3, logits.shape)


def malignant_down(logits):
    out = logits.copy()
    out[:, 2] -= 3.0
    return out


CHANGES = {"model.onnx": None, "close.onnx": close_enough, "worse.onnx": malignant_down}
CANDIDATES = [Candidate("onnxruntime", "fp32", "model.onnx"),
              Candidate("onnxruntime", "int8", "close.onnx"),
              Candidate("onnxruntime", "int8", "worse.onnx")]  # fmt: skip


def opener(path, candidate):
    change = CHANGES[candidate.model]
    return Shifted(change) if change else open_backend(DEMO_MODEL, threads=1, warmup=0)


@pytest.fixture(scope="module")
def labelled():
    return phantom_set()


@pytest.fixture
def release(tmp_path):
    shutil.copy(DEMO_MODEL, tmp_path / "model.onnx")
    write_manifest(tmp_path, ["model.onnx"])
    return tmp_path / "model.onnx"


def plan_with(release, labelled, ms_by_count):
    seen = []

    def timer(backends, frame):
        seen.append(len(backends))
        assert frame.shape == (1, *labelled[0].shape[1:])
        return ms_by_count[len(backends)]

    plan = make_plan(release, labelled[0], labelled[1], candidates=CANDIDATES, timer=timer,
                     open_candidate=opener)  # fmt: skip
    return plan, seen


def test_the_fastest_candidate_within_the_budget_is_chosen(release, labelled):
    plan, seen = plan_with(release, labelled, {2: [2.0, 1.25]})
    assert seen == [2]  # only the reference and the close candidate were timed
    rows = {row["model"]: row for row in plan.table}
    assert rows["close.onnx"]["allowed"] and rows["close.onnx"]["agreement"] == 1.0
    assert not rows["worse.onnx"]["allowed"] and "p50_ms" not in rows["worse.onnx"]
    assert rows["worse.onnx"]["binding"]  # the verdict names what failed it
    assert plan.chosen == CANDIDATES[1]
    assert rows["close.onnx"]["speedup_vs_fp32"] == pytest.approx(1.6)
    assert rows["close.onnx"]["chosen"] and not rows["model.onnx"]["chosen"]
    assert plan.frames == 240 and "* chosen: onnxruntime int8 (close.onnx)" in render_table(plan)


def test_fp32_stays_when_the_reduced_precision_is_not_faster(release, labelled):
    plan, _ = plan_with(release, labelled, {2: [1.0, 1.1]})
    assert plan.chosen == CANDIDATES[0]


def test_a_candidate_outside_the_budget_is_never_chosen_however_fast(release, labelled):
    def worse_is_fastest(backends, frame):
        assert not any(getattr(b, "change", None) is malignant_down for b in backends)
        return [5.0] * len(backends)

    plan = make_plan(release, labelled[0], labelled[1], candidates=[CANDIDATES[0], CANDIDATES[2]],
                     timer=worse_is_fastest, open_candidate=opener)  # fmt: skip
    assert plan.chosen == CANDIDATES[0]
    worse = plan.table[1]
    assert not worse["allowed"] and "OUTSIDE the budget" in worse["status"]


def test_an_unavailable_runtime_is_listed_not_fatal(release, labelled):
    def refusing(path, candidate):
        if candidate.runtime == "openvino":
            raise ImportError("OpenVINO is needed: pip install 'edgebc[openvino]'")
        return opener(path, candidate)

    plan = make_plan(release, labelled[0], labelled[1],
                     candidates=[CANDIDATES[0], Candidate("openvino", "bf16", "model.onnx")],
                     timer=lambda b, f: [1.0] * len(b), open_candidate=refusing)  # fmt: skip
    assert plan.table[1]["status"].startswith("unavailable: OpenVINO is needed")


def test_candidates_are_the_model_and_its_int8_sibling(release):
    # OpenVINO's FP32, BF16 (and INT8) where it is installed, after ONNX Runtime's
    openvino = is_installed("openvino")
    found = [(c.runtime, c.precision) for c in available_candidates(release)]
    assert found == [("onnxruntime", "fp32")] + openvino * [
        ("openvino", "fp32"),
        ("openvino", "bf16"),
    ]
    shutil.copy(release, release.with_name("model.int8.onnx"))
    found = [(c.runtime, c.precision) for c in available_candidates(release)]
    assert found == [("onnxruntime", "fp32"), ("onnxruntime", "int8")] + openvino * [
        ("openvino", "fp32"),
        ("openvino", "bf16"),
        ("openvino", "int8"),
    ]


@pytest.fixture(scope="module")
def int8_release(tmp_path_factory, labelled):
    """The demo model with a real INT8 sibling (ONNX Runtime static QDQ), both in the manifest."""
    pytest.importorskip("onnx", reason="onnx (the [export] extra) quantizes the demo model")
    from edgebc.export.quantize import QuantPlan, quantize_int8

    folder = tmp_path_factory.mktemp("release")
    shutil.copy(DEMO_MODEL, folder / "model.onnx")
    images = [make_ultrasound_phantom(c, phantom_rng(9, i), 160, 160).image
              for i in range(8) for c in CLASSES]  # fmt: skip
    quantize_int8(folder / "model.onnx", folder / "model.int8.onnx", images, images,
                  [c for _ in range(8) for c in CLASSES], QuantPlan(max_excluded_nodes=0))  # fmt: skip
    write_manifest(folder, ["model.onnx", "model.int8.onnx"])
    # ONNX Runtime INT8 the fastest; any OpenVINO candidate slower than FP32
    plan = make_plan(folder / "model.onnx", labelled[0], labelled[1],
                     timer=lambda backends, frame: [2.0, 1.0, *[3.0] * len(backends)][: len(backends)],
                     pace=30.0)  # fmt: skip
    assert plan.table[1]["allowed"], plan.table[1]["status"]  # the demo model's INT8 keeps it
    write_plan(folder / "model.onnx", plan)
    return folder


def test_the_plan_is_in_the_manifest_and_serve_and_classify_run_it(int8_release):
    model = int8_release / "model.onnx"
    assert PLAN_FILE in read_manifest(int8_release)
    chosen, note = planned_candidate(model)
    assert chosen == Candidate("onnxruntime", "int8", "model.int8.onnx")
    assert note == "deployment plan: onnxruntime int8 (model.int8.onnx)"
    planned = build_classifier(ClassifierSettings(model=str(model), threads=1))
    assert planned.backend.card.precision == "int8"
    check = check_model_manifest(model, planned.backend.model_sha256)  # what serve reports
    assert check.verified and "model.int8.onnx" in check.detail
    told = build_classifier(ClassifierSettings(model=str(model), threads=1, use_plan=False))
    assert told.backend.card.precision == "fp32"


def test_classify_and_serve_take_no_plan_from_the_command_line():
    from edgebc.cli import build_parser
    from edgebc.commands.classify import classify_settings
    from edgebc.commands.serve import settings_from_args

    parser = build_parser()
    args = parser.parse_args(["classify", "m.onnx", "x.png", "--no-plan"])
    assert classify_settings(args).use_plan is False
    assert classify_settings(parser.parse_args(["classify", "m.onnx", "x.png"])).use_plan is True
    assert settings_from_args(parser.parse_args(["serve", "--no-plan"])).use_plan is False
    assert settings_from_args(parser.parse_args(["serve"])).use_plan is True


def copy_of(folder, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(folder, target)
    return target / "model.onnx"


def test_an_altered_plan_is_not_followed_and_says_why(int8_release, tmp_path):
    model = copy_of(int8_release, tmp_path)
    plan = json.loads((model.parent / PLAN_FILE).read_text())
    plan["chosen"]["model"] = "model.onnx"  # an edit the manifest does not cover
    (model.parent / PLAN_FILE).write_text(json.dumps(plan))
    chosen, note = planned_candidate(model)
    assert chosen is None and "does not match MANIFEST.sha256" in note
    assert "running model.onnx as given" in note
    classifier = build_classifier(ClassifierSettings(model=str(model), threads=1))
    assert classifier.backend.card.precision == "fp32"


def test_a_missing_plan_runs_the_model_as_given(int8_release, tmp_path):
    model = copy_of(int8_release, tmp_path)
    (model.parent / PLAN_FILE).unlink()
    chosen, note = planned_candidate(model)
    assert chosen is None and note.startswith("no deployment plan beside model.onnx")


def test_another_machines_plan_is_reported_not_trusted(int8_release, tmp_path, monkeypatch):
    import edgebc.deployment_plan as deployment

    model = copy_of(int8_release, tmp_path)
    monkeypatch.setattr(deployment, "machine_identity",
                        lambda: {"cpu": "Intel(R) Core(TM) i5-8365U", "features": ["avx2"]})  # fmt: skip
    chosen, note = planned_candidate(model)
    assert chosen is None and "made on another machine" in note
    assert "Intel(R) Core(TM) i5-8365U (avx2): not trusted" in note


def test_a_plan_for_another_model_file_is_not_followed(int8_release, tmp_path):
    model = copy_of(int8_release, tmp_path)
    assert planned_candidate(model)[0] is not None
    shutil.copy(model.with_name("model.int8.onnx"), model)  # another model installed in its place
    write_manifest(model.parent, ["model.onnx"])  # and listed: only the plan is stale
    chosen, note = planned_candidate(model)
    assert chosen is None and "made for another model.onnx" in note


def test_a_planned_file_of_another_precision_is_refused(int8_release):
    with pytest.raises(EdgebcError, match="runs this model as int8"):
        open_backend(int8_release / "model.int8.onnx", threads=1, precision="fp32")


def test_an_install_carries_the_int8_variant_for_the_device_to_plan(int8_release, tmp_path):
    from edgebc.model_store import ModelStore

    release = ModelStore(tmp_path / "store").install(int8_release / "model.onnx")
    assert (release.path / "model.int8.onnx").read_bytes() == (
        int8_release / "model.int8.onnx"
    ).read_bytes()
    assert set(read_manifest(release.path)) == {"model.onnx", "model.int8.onnx"}
    assert release.problem is None and not (release.path / PLAN_FILE).exists()  # planned here
    found = [(c.runtime, c.precision) for c in available_candidates(release.model)]
    assert found[:2] == [("onnxruntime", "fp32"), ("onnxruntime", "int8")]


def test_a_reduced_precision_within_noise_of_fp32_does_not_replace_it(release, labelled):
    plan, _ = plan_with(release, labelled, {2: [2.0, 1.95]})  # 1.03x: noise on a shared machine
    assert plan.chosen == CANDIDATES[0]
    assert not plan.table[1]["chosen"] and plan.table[1]["allowed"]


def test_a_candidate_that_fails_to_run_is_a_row_not_the_end_of_the_plan(release, labelled):
    class Broken(Shifted):
        def run(self, batch):
            raise RuntimeError("answered 0 rows for a batch of 1")

    def opening(path, candidate):
        return Broken(None) if candidate.model == "worse.onnx" else opener(path, candidate)

    plan = make_plan(release, labelled[0], labelled[1], candidates=CANDIDATES,
                     timer=lambda b, f: [2.0, 1.0][: len(b)], open_candidate=opening)  # fmt: skip
    assert plan.chosen == CANDIDATES[1]
    assert plan.table[2]["status"] == "failed: answered 0 rows for a batch of 1"
    assert not plan.table[2]["allowed"]


def test_a_planned_file_replaced_after_planning_is_not_run(int8_release, tmp_path):
    """The plan pins the file it judged: a re-quantized INT8 listed in the manifest later was
    never judged, and is not run on the plan's word."""
    model = copy_of(int8_release, tmp_path)
    int8 = model.with_name("model.int8.onnx")
    int8.write_bytes(int8.read_bytes() + b"\0")  # another file under the planned name
    write_manifest(model.parent, ["model.int8.onnx"])
    chosen, note = planned_candidate(model)
    assert chosen is None and "not the file the plan judged" in note


def test_a_plan_written_by_another_edgebc_is_not_followed(int8_release, tmp_path):
    """A plan of another version (the first had no pins) is re-planned, not trusted."""
    model = copy_of(int8_release, tmp_path)
    plan = json.loads((model.parent / PLAN_FILE).read_text())
    plan["version"] = 1
    (model.parent / PLAN_FILE).write_text(json.dumps(plan))
    write_manifest(model.parent, [PLAN_FILE])
    chosen, note = planned_candidate(model)
    assert chosen is None and "plan version 1" in note and "plan again" in note


def test_candidates_are_timed_in_blocks_as_the_cart_runs_one_model():
    """Alternating single calls would time every model with a cold cache; blocks of consecutive
    calls, rotating the order each round, time them warm as the cart runs them."""
    from edgebc.deployment_plan import interleaved_ms

    calls = []

    class Named:
        def __init__(self, name):
            self.name = name

        def run(self, frame):
            calls.append(self.name)

    backends = [Named("a"), Named("b"), Named("c")]
    ms = interleaved_ms(backends, np.zeros((1, 1, 4, 4), np.float32), runs=20, block=5, pace=0)
    assert len(ms) == 3 and all(m >= 0 for m in ms)
    timed = calls[30:]  # after ten warm-up calls each
    assert timed[:15] == ["a"] * 5 + ["b"] * 5 + ["c"] * 5
    assert timed[15:30] == ["b"] * 5 + ["c"] * 5 + ["a"] * 5  # the next round starts elsewhere
    assert len(timed) == 4 * 15


class FakeClock:
    """time for edgebc.bench.timing: sleeping moves it on, a call takes `call_s` (or more)."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        return self.now

    def process_time(self):
        return self.now

    def sleep(self, seconds):
        self.now += max(0.0, seconds)


def test_candidates_are_timed_at_a_live_sources_pace_by_default(monkeypatch):
    """A cart classifies frames as a 30 fps source delivers them, each call after an idle gap;
    back to back (pace 0) is asked for, not the default. A call that overruns its period is
    followed at once by the next (the newest frame), then the source's pace again."""
    from edgebc.bench import timing
    from edgebc.bench.timing import Variant, time_interleaved
    from edgebc.deployment_plan import LIVE_PACE, interleaved_ms

    assert inspect.signature(interleaved_ms).parameters["pace"].default == LIVE_PACE == 30.0
    clock = FakeClock()
    monkeypatch.setattr(timing, "time", clock)
    starts = {"a": [], "b": []}
    slow = {"a": [], "b": [4]}  # b's fifth call takes 35 ms, three and a half periods

    def call(name):
        starts[name].append(clock.now)
        clock.now += 0.035 if len(starts[name]) - 1 in slow[name] else 0.001

    variants = {n: Variant(lambda n=n: call(n)) for n in starts}
    timed = time_interleaved(variants, warmup=0, iterations=6, block=4, pace=100.0)
    gaps = {n: [round(b - a, 6) for a, b in itertools.pairwise(t)] for n, t in starts.items()}
    assert gaps["a"][:3] == [0.01, 0.01, 0.01]  # a block: one frame every 10 ms
    assert gaps["b"][4] == 0.035 and gaps["b"][5] == 0.01  # late: next at once, then the pace
    assert timed["a"]["p50_ms"] == pytest.approx(1.0)
    starts = {"a": [], "b": []}
    time_interleaved(variants, warmup=0, iterations=6, block=4, pace=0.0)
    assert all(g == pytest.approx(0.001) for g in np.diff(starts["a"][:4]))  # back to back
    for pace in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="pace"):
            time_interleaved(variants, warmup=0, iterations=2, pace=pace)


@pytest.mark.parametrize("pace", [-1.0, float("nan"), float("inf"), 0.5, 1e-6, 2000.0])
def test_a_plan_pace_that_is_no_sources_rate_is_refused(pace):
    from edgebc.deployment_plan import checked_pace

    with pytest.raises(EdgebcError, match="plan-pace"):
        checked_pace(pace)
    assert checked_pace(0) == 0.0 and checked_pace(30) == 30.0


def test_a_plan_timed_back_to_back_by_an_older_edgebc_is_followed_and_said_so(
    int8_release, tmp_path
):
    folder = tmp_path / "release"
    shutil.copytree(int8_release, folder)
    plan = json.loads((folder / PLAN_FILE).read_text())
    assert plan["pace_fps"] == 30.0
    del plan["pace_fps"]  # as written before plans were paced
    (folder / PLAN_FILE).write_text(json.dumps(plan))
    write_manifest(folder, [PLAN_FILE])
    chosen, note = planned_candidate(folder / "model.onnx")
    assert chosen == Candidate("onnxruntime", "int8", "model.int8.onnx")
    assert "timed back to back by an older edgebc" in note and "edgebc model plan" in note
