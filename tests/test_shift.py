"""Scanner-shift detection: the card's statistics, the features output, the check on the device."""

import json
import sqlite3
import time

import cv2
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from fastapi.testclient import TestClient

from edgebc.audit_trail import AuditTrail, read_trail
from edgebc.backends import open_backend
from edgebc.classifier import FrameClassifier
from edgebc.cli import main
from edgebc.demo import DEMO_MODEL
from edgebc.model_card import ModelCard, read_card
from edgebc.preprocess import preprocess_batch
from edgebc.serve.app import create_app
from edgebc.serve.runtime import build_runtime
from edgebc.serve.settings import load_serve_settings
from edgebc.shift import PackedArray, fit_training_statistics, shift_check_for
from edgebc.sources import Frame
from edgebc.synth import make_ultrasound_phantom
from edgebc.synth.ultrasound import phantom_rng

LABELS = ("normal", "benign", "malignant")
TOKEN = "s3cret-token-for-tests-0123456789"


def phantoms(seed, n, size=160):
    return [make_ultrasound_phantom(LABELS[k % 3], phantom_rng(seed, k), size, size).image
            for k in range(n)]  # fmt: skip


def brighter(image):
    """Another scanner's gain: every echo 1.8 times as bright (the quality gate still passes it)."""
    return np.clip(image.astype(np.float32) * 1.8, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def shift_model(tmp_path_factory):
    """An exported phantom model whose card has statistics from 60 phantom frames, thresholds from
    30 others; and the same checkpoint."""
    from edgebc.export.onnx_export import export_onnx
    from edgebc.train.checkpoint import load_checkpoint, save_checkpoint, save_untrained_checkpoint
    from edgebc.train.shift_stats import with_training_statistics

    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("shift")
    checkpoint = load_checkpoint(save_untrained_checkpoint(folder / "plain.pt", "simple_cnn", 48))
    prep = checkpoint.card.preprocess
    train = torch.from_numpy(preprocess_batch(phantoms(1, 60), prep))
    held = torch.from_numpy(preprocess_batch(phantoms(2, 30), prep))
    checkpoint = with_training_statistics(checkpoint, train, held, [str(k) for k in range(30)],
                                          "calibration split")  # fmt: skip
    save_checkpoint(folder / "stats.pt", checkpoint)
    export_onnx(folder / "stats.pt", folder / "stats.onnx", exporter="torchscript")
    return folder / "stats.onnx", folder / "stats.pt"


def test_statistics_round_trip_in_the_card_and_stay_absent_on_old_cards(shift_model):
    card = read_card(shift_model[0])
    stats = card.training_statistics
    assert stats is not None and stats.thresholds.fitted_on == "calibration split"
    assert stats.thresholds.false_alarm_rate == 0.01 and stats.thresholds.frames == 30
    assert [o.name for o in card.outputs] == ["logits", "features"]
    assert ModelCard.from_json(card.to_json()) == card
    assert len(card.to_json()) < 20_000  # a 16 x 128 basis, packed
    demo = read_card(DEMO_MODEL).to_dict()  # as a card written before the statistics existed:
    before = {k: v for k, v in demo.items() if k != "training_statistics"}
    old = ModelCard.from_dict(
        {**before, "outputs": [o for o in demo["outputs"] if o["kind"] == "logits"]}
    )
    assert old.training_statistics is None and "training_statistics" not in old.to_dict()
    with pytest.raises(ValueError, match="not among the card's features outputs"):
        ModelCard.from_dict({**old.to_dict(), "training_statistics": card.to_dict()["training_statistics"]})  # fmt: skip
    packed = PackedArray.of(np.array([[0.1, -2.5], [3.0, 0.0]]))
    assert np.allclose(packed.array(), [[0.1, -2.5], [3.0, 0.0]], atol=1e-3)


def test_the_features_output_matches_pytorch_and_keeps_the_state_dict(shift_model):
    from edgebc.train.checkpoint import load_checkpoint, model_from_checkpoint
    from edgebc.train.torch_backend import TorchBackend

    onnx_path, checkpoint_path = shift_model
    feeds = {"input": preprocess_batch(phantoms(5, 6), read_card(onnx_path).preprocess)}
    expected = TorchBackend(checkpoint_path).run_named(feeds)
    got = open_backend(onnx_path).run_named(feeds)
    assert got["features"].shape == (6, 128)
    assert np.abs(got["features"] - expected["features"]).max() < 1e-4
    assert np.abs(got["logits"] - expected["logits"]).max() < 1e-4
    # the penultimate features are the final layer's input: logits = W f + b
    model = model_from_checkpoint(load_checkpoint(checkpoint_path))
    layer = model.classifier[2]
    by_hand = got["features"] @ layer.weight.detach().numpy().T + layer.bias.detach().numpy()
    assert np.abs(by_hand - got["logits"]).max() < 1e-4
    assert set(model.state_dict()) == set(load_checkpoint(checkpoint_path).state_dict)


def test_a_stream_whose_appearance_changes_is_flagged_and_a_matching_one_is_not(shift_model):
    classifier = FrameClassifier(open_backend(shift_model[0]), shift="mark", shift_window=5)
    assert classifier.shift_note == "on (mark; window 5 frames)"
    same = classifier.classify_batch(phantoms(3, 12))
    assert all(d.quality.ok and d.shift is not None for d in same)
    assert sum(d.shift.out for d in same) <= 1 and not any(d.shift.stream_out for d in same)
    classifier.reset_stream()
    changed = classifier.classify_batch([brighter(p) for p in phantoms(3, 12)])
    assert all(d.quality.ok for d in changed)  # the gate passes them: only the shift check sees it
    assert all(d.shift.out for d in changed)
    assert [d.shift.stream_out for d in changed] == [False] * 4 + [
        True
    ] * 8  # once the window is full
    assert "mean" in changed[0].shift.unusual


def test_withdraw_and_mark_in_classify(shift_model, tmp_path):
    frame = brighter(phantoms(3, 1)[0])
    withdrawn = FrameClassifier(open_backend(shift_model[0]), shift="withdraw").classify(frame)
    assert withdrawn.label is None and withdrawn.probabilities is None
    assert withdrawn.quality.check == "shift" and "out of distribution" in withdrawn.quality.reason
    assert withdrawn.to_json()["shift"]["action"] == "withdrawn"
    marked = FrameClassifier(open_backend(shift_model[0]), shift="mark").classify(frame)
    assert marked.label is not None and marked.to_json()["shift"]["action"] == "marked"
    assert "out of distribution" in marked.unreliable
    unchecked = FrameClassifier(open_backend(shift_model[0]), shift="off").classify(frame)
    assert unchecked.shift is None and unchecked.label == marked.label
    folder = tmp_path / "in"
    folder.mkdir()
    cv2.imwrite(str(folder / "a_same.png"), phantoms(3, 1)[0])
    cv2.imwrite(str(folder / "b_bright.png"), frame)
    for mode, expected in (("withdraw", "out (withdrawn)"), ("mark", "out (marked)")):
        out = tmp_path / f"{mode}.jsonl"
        assert main(["classify", str(shift_model[0]), str(folder), "--out", str(out),
                     "--set", f"shift={mode}"]) == 0  # fmt: skip
        rows = {
            r["source"].rsplit("/", 1)[-1]: r for r in map(json.loads, out.read_text().splitlines())
        }
        assert rows["a_same.png"]["shift"] == "in" and rows["a_same.png"]["decision"]
        assert rows["b_bright.png"]["shift"] == expected
        assert bool(rows["b_bright.png"]["decision"]) == (mode == "mark")


class BrightSource:
    """Phantom frames at ~60 fps, brightened: a scanner the phantom model never saw."""

    live = True

    def __init__(self):
        self.name, self.index, self.frames = "bright", 0, [brighter(p) for p in phantoms(7, 6)]

    def open(self):
        pass

    def read(self):
        time.sleep(1 / 60)
        self.index += 1
        image = self.frames[self.index % len(self.frames)]
        return Frame(image, self.index, time.time(), time.monotonic(), self.name)

    def close(self):
        pass


@pytest.mark.parametrize("mode", ["withdraw", "mark"])
def test_serve_flags_the_stream_in_status_audit_and_readiness(
    shift_model, tmp_path, monkeypatch, mode
):
    monkeypatch.setenv("EDGEBC_TOKEN", TOKEN)
    values = {"model": str(shift_model[0]), "shift": mode, "shift_window": 3,
              "audit": {"path": str(tmp_path / "audit.sqlite")}}  # fmt: skip
    settings = load_serve_settings(None, [f"{k}={json.dumps(v)}" for k, v in values.items()])
    runtime = build_runtime(settings, source_factory=BrightSource)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with TestClient(create_app(runtime)) as client:

        def flagged():
            view = client.get("/v1/status", headers=auth).json()
            return (
                view if view["shift"]["latest"] and view["shift"]["latest"]["stream_out"] else None
            )

        deadline = time.monotonic() + 10
        while (view := flagged()) is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert view is not None, "the stream was never flagged"
        assert view["shift"]["check"] == f"on ({mode}; window 3 frames)"
        assert view["shift"]["out_of_distribution"] is True
        if mode == "withdraw":
            assert view["display"]["label"] is None
            assert "out of distribution" in view["display"]["reason"]
        else:
            assert view["display"]["label"] is not None
            assert view["display"]["warning"].startswith("unreliable: out of distribution")
        assert view["counts"]["out_of_distribution"] >= 1
        ready = client.get("/readyz")  # no token: a bare boolean, no scores or reasons
        assert ready.json()["out_of_distribution"] is True
        assert "shift" not in json.dumps(ready.json()["checks"])
        assert client.get("/v1/status").status_code == 401
    rows = read_trail(tmp_path / "audit.sqlite")
    verdicts = [json.loads(r["shift"]) for r in rows if r["shift"]]
    assert (
        verdicts
        and verdicts[-1]["out_of_distribution"]
        and verdicts[-1]["action"] == ("withdrawn" if mode == "withdraw" else "marked")
    )


def test_old_models_run_unchecked_and_say_why(shift_model):
    demo = read_card(DEMO_MODEL).to_dict()  # as a card written before the statistics existed
    old = ModelCard.from_dict({k: v for k, v in demo.items() if k != "training_statistics"})
    check, note = shift_check_for(old, "withdraw", 30, ("logits", "features"))
    assert check is None and "no training-distribution statistics" in note
    card = read_card(shift_model[0])
    check, note = shift_check_for(card, "withdraw", 30, ("logits",))  # a logits-only graph
    assert check is None and "gives no 'features' output" in note
    assert shift_check_for(card, "off", 30, ("logits", "features"))[0] is None


def test_thresholds_hold_their_false_alarm_rate_on_fresh_in_distribution_frames():
    rng = np.random.default_rng(0)

    def draw(n):
        return rng.normal(size=(n, 8)), rng.normal(size=(n, 40)) @ np.diag(np.linspace(3, 0.1, 40))

    stats = fit_training_statistics(*draw(400), *draw(300), [str(k) for k in range(300)],
                                    "calibration split", false_alarm_rate=0.05)  # fmt: skip
    from edgebc.shift import ShiftScorer

    fresh = ShiftScorer(stats).scores(*draw(4000))
    assert 0.02 < (fresh > stats.thresholds.frame).mean() < 0.09
    far = ShiftScorer(stats).scores(*(x + 3 for x in draw(200)))
    assert (far > stats.thresholds.frame).mean() > 0.95


def test_the_audit_trail_adds_the_shift_column_to_an_older_log(tmp_path):
    path = tmp_path / "old.sqlite"
    connection = sqlite3.connect(path)
    connection.execute("CREATE TABLE decisions (id INTEGER PRIMARY KEY AUTOINCREMENT, logged_at TEXT NOT NULL, "
                       "captured_at TEXT, source TEXT, frame_index INTEGER, frame_sha256 TEXT, model_sha256 TEXT NOT NULL, "
                       "probabilities TEXT, decision TEXT, smoothed_decision TEXT, threshold REAL, quality TEXT NOT NULL, "
                       "latencies_ms TEXT, pixels BLOB, patient_id TEXT)")  # fmt: skip
    connection.execute(
        "INSERT INTO decisions (logged_at, model_sha256, quality) VALUES ('t', 'ab', 'ok')"
    )
    connection.commit()
    connection.close()
    AuditTrail(path).close()
    rows = read_trail(path)
    assert len(rows) == 1 and rows[0]["shift"] is None and rows[0]["quality"] == "ok"


def test_the_score_averages_the_parts_the_card_chose_and_older_cards_all_three(shift_model):
    from dataclasses import replace

    from edgebc.shift import PARTS, SCORE_PARTS, ShiftScorer, TrainingStatistics

    stats = ModelCard.from_json(read_card(shift_model[0]).to_json()).training_statistics
    assert stats.parts == SCORE_PARTS == ("image",)  # what training fits now
    parts = np.array([[4.0, 1.0, 7.0], [0.5, 9.0, 2.0]])
    assert ShiftScorer(stats).combine(parts).tolist() == [4.0, 0.5]
    every = replace(stats, parts=PARTS)
    assert ShiftScorer(every).combine(parts).tolist() == pytest.approx([4.0, 3.8333333])
    older = {k: v for k, v in every.__dict__.items()}
    older.pop("parts")
    assert TrainingStatistics(**older).parts == PARTS  # cards written before the choice
    with pytest.raises(ValueError, match="non-empty set of"):
        replace(stats, parts=("image", "colour"))
    with pytest.raises(ValueError, match="non-empty set of"):
        replace(stats, parts=())
