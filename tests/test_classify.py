"""`edgebc classify` with the classifier settings `edgebc serve` uses (threshold, quality gate,
auto region per input), and one conversion of a decision into rows, records and answers."""

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from edgebc.archive import ClassifySettings, FrameItem, _row
from edgebc.audit_trail import record_of
from edgebc.classifier import Decision
from edgebc.classifier_settings import ClassifierSettings, build_classifier
from edgebc.cli import main
from edgebc.config import load_config
from edgebc.demo import DEMO_MODEL
from edgebc.quality import QualityResult
from edgebc.region import detect_imaging_region
from edgebc.serve.settings import ServeSettings
from edgebc.synth import make_ultrasound_phantom, render_scanner_screen
from edgebc.synth.ultrasound import phantom_rng

CLASSES = ["normal", "benign", "malignant"]


def phantoms(folder, n=3, size=128):
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(n):
        image = make_ultrasound_phantom(CLASSES[k % 3], phantom_rng(40, k), size, size).image
        cv2.imwrite(str(folder / f"{k}.png"), image)
    return folder


def rows_of(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_classify_and_serve_read_the_same_classifier_keys(tmp_path):
    config = tmp_path / "site.yaml"
    config.write_text("model: m.onnx\nthreshold: 0.2\nquality: {min_std: 9.5, max_flat_fraction: 0.2}\n"
                      "providers: [CPUExecutionProvider]\nthreads: 2\n")  # fmt: skip
    archive = load_config(ClassifySettings, config, ["inputs=[scans]"])
    cart = load_config(ServeSettings, config, ["source=/dev/video0"])
    shared = [f.name for f in ClassifierSettings.__dataclass_fields__.values()]
    assert {k: getattr(archive, k) for k in shared if k != "spin_wait"} == {
        k: getattr(cart, k) for k in shared if k != "spin_wait"
    }
    assert archive.quality.min_std == 9.5 and archive.threshold == 0.2
    # a batch job spins its threads (ONNX Runtime's default); the live loop does not
    assert archive.spin_wait and not cart.spin_wait


def test_the_threshold_and_the_quality_gate_apply_to_archive_runs(tmp_path, capsys):
    scans = phantoms(tmp_path / "scans")
    base = ["classify", str(DEMO_MODEL), str(scans)]
    assert main([*base, "--out", str(tmp_path / "card.csv")]) == 0
    card = rows_of(tmp_path / "card.csv")
    assert {r["demo"] for r in card} == {"yes"}  # the demo model said so in every row
    assert {r["threshold"] for r in card} == {str(build_classifier(ClassifierSettings()).threshold)}
    # threshold 0: every decided frame is the positive class, whatever its probability
    assert main([*base, "--threshold", "0", "--out", str(tmp_path / "zero.csv")]) == 0
    zero = rows_of(tmp_path / "zero.csv")
    assert [r["decision"] for r in zero] == ["malignant"] * 3 and zero[0]["threshold"] == "0.0"
    assert [r["p_malignant"] for r in zero] == [r["p_malignant"] for r in card]
    # a stricter gate than the default refuses them all, with the gate's reason
    assert main([*base, "--set", "quality.min_std=250", "--out", str(tmp_path / "gate.csv")]) == 0
    gated = rows_of(tmp_path / "gate.csv")
    assert all(r["decision"] == "" and r["quality"].startswith("no decision: blank or uniform")
               for r in gated)  # fmt: skip
    assert main([*base, "--threshold", "1.5"]) != 0
    assert "threshold is a probability in [0, 1]" in capsys.readouterr().err


def test_auto_region_is_detected_on_each_inputs_first_frame(tmp_path, capsys):
    screens = tmp_path / "screens"
    screens.mkdir()
    truths = []
    for k, (height, width) in enumerate(((480, 640), (600, 800))):  # two scanners' screens
        phantom = make_ultrasound_phantom("malignant", phantom_rng(50, k), 240, 260).image
        screen, truth = render_scanner_screen(phantom, phantom_rng(51, k), height, width)
        cv2.imwrite(str(screens / f"{k}.png"), screen)
        truths.append(truth)
    cv2.imwrite(str(screens / "2.png"), np.zeros((480, 640), np.uint8))  # a blank screen
    out = tmp_path / "r.jsonl"
    assert (
        main(["classify", str(DEMO_MODEL), str(screens), "--auto-region", "--out", str(out)]) == 1
    )
    rows = {Path(r["source"]).name: r for r in map(json.loads, out.read_text().splitlines())}
    assert "2.png: no imaging region found on its first frame" in rows["2.png"]["error"]
    assert "no imaging region found" in capsys.readouterr().err
    for k in range(2):
        screen = cv2.imread(str(screens / f"{k}.png"), cv2.IMREAD_UNCHANGED)
        region = detect_imaging_region(screen)
        assert region.iou(truths[k]) > 0.9  # each screen its own region
        expected = build_classifier(ClassifierSettings(region=tuple(vars(region).values())))
        decision = expected.classify(screen)  # what the screen's own region gives, decided or not
        row = rows[f"{k}.png"]
        assert (row["decision"], row["shift_score"]) == (
            decision.label or "",
            round(decision.shift.score, 3),
        )
        p = (decision.probabilities or {}).get("malignant")
        assert row["p_malignant"] == ("" if p is None else pytest.approx(p, abs=1e-6))


DECIDED = Decision("benign", {"normal": 0.1234567, "benign": 0.6543219, "malignant": 0.2222214},
                   0.2222214, 0.3, QualityResult(True), "ab" * 32, {"crop": 0.12345, "inference": 4.56789})  # fmt: skip
REFUSED = Decision(None, None, None, 0.3, QualityResult(False, "frame too dark (mean grey level 3)"), "cd" * 32)  # fmt: skip


# What edgebc wrote for these two decisions before the one conversion (commit 141b6e5), by hand,
# plus whether the demo model made them (every answer says so since issue 19) and the lesion
# localiser's box and its model's sha256 (issue 22; None without a localiser).
ROWS = {
    "decided": {"source": "scan.png", "frame": 3, "decision": "benign", "quality": "ok",
                "positive_probability": 0.222221, "threshold": 0.3, "p_normal": 0.123457,
                "p_benign": 0.654322, "p_malignant": 0.222221, "model_sha256": "ab" * 32, "runtime": "",
                "demo": "no", "error": ""},
    "refused": {"source": "scan.png", "frame": 3, "decision": "",
                "quality": "no decision: frame too dark (mean grey level 3)",
                "positive_probability": "", "threshold": 0.3, "p_normal": "", "p_benign": "",
                "p_malignant": "", "model_sha256": "cd" * 32, "runtime": "", "demo": "no", "error": ""},
}  # fmt: skip
ANSWERS = {
    "decided": {"label": "benign", "probabilities": DECIDED.probabilities,
                "positive_probability": 0.2222214, "threshold": 0.3, "quality": "ok", "reason": None,
                "model_sha256": "ab" * 32, "timings_ms": {"crop": 0.123, "inference": 4.568},
                "shift": None, "demo": False, "box": None, "localiser_sha256": None, "runtime": None},
    "refused": {"label": None, "probabilities": None, "positive_probability": None, "threshold": 0.3,
                "quality": "no decision", "reason": "frame too dark (mean grey level 3)",
                "model_sha256": "cd" * 32, "timings_ms": {}, "shift": None, "demo": False,
                "box": None, "localiser_sha256": None, "runtime": None},
}  # fmt: skip
RECORDS = {  # model_sha256, quality, decision, probabilities, threshold, localiser of the record
    "decided": ("ab" * 32, "ok", "benign", DECIDED.probabilities, 0.3, None),
    "refused": (
        "cd" * 32,
        "no decision: frame too dark (mean grey level 3)",
        None,
        None,
        0.3,
        None,
    ),
}


@pytest.mark.parametrize(("case", "decision"), [("decided", DECIDED), ("refused", REFUSED)])
def test_rows_records_and_answers_keep_their_fields(case, decision):
    fields = decision.to_json()
    assert _row(FrameItem("scan.png", 3, None), decision, CLASSES) == ROWS[case]
    assert fields == ANSWERS[case]
    record = record_of(decision, source="upload")
    assert (record.model_sha256, record.quality, record.decision, record.probabilities,
            record.threshold, record.localiser) == RECORDS[case]  # fmt: skip


def test_the_classifier_builds_its_decision_rule_once(monkeypatch):
    from edgebc import classifier as classifier_module

    built = []
    of = classifier_module.DecisionRule.of
    monkeypatch.setattr(classifier_module.DecisionRule, "of",
                        lambda card, threshold=None: built.append(threshold) or of(card, threshold))  # fmt: skip
    classifier = build_classifier(ClassifierSettings(threshold=0.25))
    frames = [make_ultrasound_phantom(c, phantom_rng(60, k), 96, 96).image
              for k, c in enumerate(CLASSES * 2)]  # fmt: skip
    decisions = classifier.classify_batch(frames)
    assert built == [0.25]  # in __init__, with the site's threshold; not once per frame
    assert classifier.rule.threshold == classifier.threshold == 0.25
    for decision in decisions:
        p = np.array([decision.probabilities[c] for c in CLASSES])
        assert decision.label == classifier.rule.decide(p)
        assert (decision.label == "malignant") == (decision.positive_probability >= 0.25)


def test_a_model_with_several_inputs_is_refused_naming_them():
    from dataclasses import replace
    from types import SimpleNamespace

    from edgebc.classifier import FrameClassifier
    from edgebc.errors import EdgebcError

    card = build_classifier(ClassifierSettings()).card
    us = card.inputs[0]
    two = replace(card, inputs=(replace(us, name="us"), replace(us, name="mg_cc", optional=True)))
    with pytest.raises(
        EdgebcError, match=r"has 2 inputs \(us, mg_cc\); a frame classifier feeds one image"
    ):
        FrameClassifier(SimpleNamespace(card=two, model_sha256="ab" * 32))


def archive_of(folder):
    """A PNG, a one-frame DICOM, a three-frame DICOM cine with and without its .dcm suffix, a
    four-frame video, a broken PNG and a missing file."""
    from edgebc.synth.cine import write_video
    from tests.test_decode import _dicom_bytes

    folder.mkdir()
    frames = [make_ultrasound_phantom(c, phantom_rng(70, k), 64, 80).image
              for k, c in enumerate(CLASSES * 2)]  # fmt: skip
    cv2.imwrite(str(folder / "still.png"), frames[0])
    (folder / "one.dcm").write_bytes(_dicom_bytes(frames[1]))
    cine = _dicom_bytes(np.stack(frames[2:5]), frames=3)
    (folder / "cine.dcm").write_bytes(cine)
    (folder / "IM0001").write_bytes(cine)  # DICOM as archives keep it: no suffix
    write_video(frames[:4], folder / "clip.avi")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    names = ["still.png", "one.dcm", "cine.dcm", "IM0001", "clip.avi", "broken.png", "gone.png"]
    return [folder / name for name in names]


def test_classify_and_serve_read_each_files_frames_the_same_way(tmp_path, capsys):
    """One reader of a file's frames: what `edgebc classify` classifies of a file is what
    `edgebc serve --source FILE` plays; single pictures have no frame number, cines and videos
    are numbered (every Nth with a stride), and an unreadable file is an error row."""
    from edgebc.archive import iter_frames
    from edgebc.sources import open_source

    paths = archive_of(tmp_path / "archive")
    items = list(iter_frames(paths))
    for path in paths[:5]:
        source = open_source(str(path))
        source.open()
        played = list(iter(source.read, None))
        source.close()
        read = [item for item in items if item.source == str(path)]
        assert len(read) == len(played) and all(
            np.array_equal(item.image, frame.image)
            for item, frame in zip(read, played, strict=True)
        ), path.name
    numbered = [(Path(i.source).name, i.frame) for i in items if i.error is None]
    assert numbered == [("still.png", None), ("one.dcm", None), *(("cine.dcm", k) for k in range(3)),
                        *(("IM0001", k) for k in range(3)), *(("clip.avi", k) for k in range(4))]  # fmt: skip
    errors = {Path(i.source).name: i.error for i in items if i.error is not None}
    assert set(errors) == {"broken.png", "gone.png"} and "truncated" in errors["broken.png"]
    strided = [(Path(i.source).name, i.frame) for i in iter_frames(paths[2:5], stride=2)]
    assert strided == [("cine.dcm", 0), ("cine.dcm", 2), ("IM0001", 0), ("IM0001", 2),
                       ("clip.avi", 0), ("clip.avi", 2)]  # fmt: skip
    out = tmp_path / "rows.csv"  # a named file that does not exist is a typo: nothing is written
    assert main(["classify", str(DEMO_MODEL), *map(str, paths), "--out", str(out)]) == 1
    assert not out.exists()
    assert "no such file or folder: " + str(paths[-1]) in capsys.readouterr().err
    assert main(["classify", str(DEMO_MODEL), *map(str, paths[:-1]), "--out", str(out)]) == 1
    rows = rows_of(out)  # the batch went on past the unreadable input
    assert [r["frame"] for r in rows if not r["error"]] == ["", "", "0", "1", "2", "0", "1", "2",
                                                            "0", "1", "2", "3"]  # fmt: skip
    assert [Path(r["source"]).name for r in rows if r["error"]] == ["broken.png"]


def test_the_quality_text_of_rows_and_records_is_the_quality_results_own():
    import edgebc.classifier

    assert not hasattr(edgebc.classifier, "quality_text")  # one text: QualityResult.__str__
    for decision in (DECIDED, REFUSED):
        assert record_of(decision).quality == str(decision.quality)
        assert _row(FrameItem("x.png", None, None), decision, CLASSES)["quality"] == str(
            decision.quality
        )


def test_region_and_auto_region_are_refused_once_in_the_same_words():
    both = {"region": (0, 0, 10, 10), "auto_region": True}
    words = "^give either a region or auto_region, not both$"
    for settings in (ClassifierSettings, ServeSettings):
        with pytest.raises(ValueError, match=words):
            settings(**both)
    with pytest.raises(ValueError, match=words):
        ClassifySettings(model="m.onnx", inputs=("scans",), **both)


def test_image_suffixes_mean_one_set():
    from edgebc import sources
    from edgebc.data import readers

    meanings = {m.IMAGE_SUFFIXES for m in (sources, readers) if hasattr(m, "IMAGE_SUFFIXES")}
    assert meanings == {(".png", ".jpg", ".jpeg", ".pgm")}  # picture files; DICOM is named apart
    assert set(readers.SAMPLE_SUFFIXES) == {*sources.IMAGE_SUFFIXES, *sources.DICOM_SUFFIXES}


def test_a_mammography_model_classifies_films_at_full_depth_and_refuses_ultrasound(tmp_path):
    """`edgebc classify` with an MG card: a 12-bit DICOM read at its full depth with its header's
    view, a 16-bit PNG, both through the mammography gate; a B-mode frame refused as ultrasound."""
    pytest.importorskip("pydicom")
    from edgebc.backends import open_backend
    from edgebc.classifier import FrameClassifier
    from edgebc.decode import decode_image, read_image_view
    from edgebc.synth.mammogram import draw_breast, make_mammogram
    from tests.helpers import demo_model_as
    from tests.test_dicom_full_depth import _mammo_dicom

    model = demo_model_as(tmp_path, "mg", "mg", breast_crop=True, laterality="left")
    rng = phantom_rng(7, 0)
    film = make_mammogram(draw_breast("malignant", rng), rng, "R", "MLO", 640, 512, 12).image
    # a film using 256 of its 4096 levels: its 8-bit display keeps 16 of them, full depth all
    faint = (film // 16 + 1000).astype(np.uint16)
    data = _mammo_dicom(faint, ImageLaterality="R", ViewPosition="MLO")
    (tmp_path / "film.dcm").write_bytes(data)
    # the same right breast labelled left: refused for itself, the batch goes on
    mislabelled = _mammo_dicom(faint, ImageLaterality="L", ViewPosition="MLO")
    (tmp_path / "mislabelled.dcm").write_bytes(mislabelled)
    cv2.imwrite(str(tmp_path / "film.png"), film)
    cv2.imwrite(str(tmp_path / "bmode.png"), make_ultrasound_phantom("benign", rng, 256).image)
    out = tmp_path / "rows.csv"
    code = main(
        [
            "classify",
            str(model),
            *(str(tmp_path / n) for n in ("film.dcm", "mislabelled.dcm", "film.png", "bmode.png")),
            "--out",
            str(out),
            "--set",
            "shift=off",
        ]
    )  # fmt: skip (the demo saw no films)
    rows = {Path(r["source"]).name: r for r in rows_of(out)}
    assert code == 0 and rows["film.dcm"]["quality"] == "ok" and rows["film.png"]["quality"] == "ok"
    assert "ultrasound" in rows["bmode.png"]["quality"]
    assert rows["bmode.png"]["decision"] == ""
    assert (
        rows["mislabelled.dcm"]["decision"] == ""
        and "stated view" in rows["mislabelled.dcm"]["quality"]
    )
    classifier = FrameClassifier(open_backend(model), shift="off")
    full = decode_image(data, full_depth=True)
    assert full.dtype == np.uint16
    view = read_image_view(data)
    expected = classifier.classify(full, view).to_json()["positive_probability"]
    display = classifier.classify(decode_image(data), view).to_json()["positive_probability"]
    assert float(rows["film.dcm"]["positive_probability"]) == pytest.approx(expected, abs=1e-4)
    assert abs(expected - display) > 1e-3  # so the row above could only come from full depth
