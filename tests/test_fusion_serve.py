"""A fusion model on the live cart: a case's mammograms attached through the API, fused with every
frame until the case ends (operator, new attach, idle time), every attach, detach and decision
in the audit trail with the mammograms' hashes; a stale attachment never meets the next patient."""

import base64
import hashlib
import itertools
import json
from dataclasses import replace

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="needs the [serve] extra")
pytest.importorskip("torch", reason="the fusion model for the test is built with torch ([train])")
pytest.importorskip("onnx", reason="the fusion model for the test is exported with onnx ([export])")

from fastapi.testclient import TestClient

from edgebc.audit_trail import read_trail
from edgebc.cli import main
from edgebc.decode import ImageView, decode_image, read_image_view, read_study
from edgebc.fusion import FusionClassifier, Mammogram, pixels_sha256
from edgebc.serve.app import create_app
from edgebc.serve.case_context import LiveFusion
from edgebc.serve.live_loop import LivePipeline
from edgebc.serve.runtime import build_runtime
from edgebc.sources import open_source
from tests.test_decode import _dicom_bytes
from tests.test_fusion_runtime import _film, _fusion_checkpoint, _ultrasound
from tests.test_serve import TOKEN, png_bytes, settings_for, wait_until

L_CC = ImageView.from_code("L-CC")


def export_fusion_model(root):
    """The small two-branch model of tests/test_fusion_runtime.py, exported: its head graph."""
    import torch

    torch.set_num_threads(1)
    _fusion_checkpoint(root / "fusion.pt")
    assert main(["export", str(root / "fusion.pt"), "--out", str(root / "export"), "--name", "fusion"]) == 0  # fmt: skip
    return root / "export" / "fusion.onnx"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return export_fusion_model(tmp_path_factory.mktemp("fusion-serve"))


def _attach_body(case, films, view="L-CC"):
    return {"case": case, "mammograms": [
        {"data": base64.b64encode(png_bytes(f)).decode(), "view": view} for f in films]}  # fmt: skip


def _reference(model, film):
    """The same model outside the server, with the film attached the same way."""
    classifier = FusionClassifier.open(model)
    if film is not None:
        classifier.attach("reference", [Mammogram(film, L_CC)])
    return classifier


def test_serve_fuses_the_live_stream_with_an_attached_case_and_audits_it(model, tmp_path):
    runtime = build_runtime(settings_for(tmp_path, model=str(model)))
    shown = []  # every result the screens were handed

    class Recorder:
        name = "recorder"
        handle, close = shown.append, lambda: None

    runtime.pipeline.screens.append(Recorder())
    film = _film()
    with TestClient(create_app(runtime)) as client:
        status = wait_until(lambda: (v := client.get("/v1/status").json())["per_frame"] and v,
                            what="a frame")  # fmt: skip
        assert status["fusion"] is True and status["case"] is None
        assert status["per_frame"]["fusion"]["modalities"] == ["us"]  # no mammogram: US alone
        assert client.get("/v1/case").json() is None
        attached = client.post("/v1/case", json=_attach_body("case-A", [film]))
        assert attached.status_code == 200, attached.text
        answer = attached.json()
        assert answer["case"] == "case-A" and answer["inputs"] == ["mg_cc"]
        assert answer["views"] == ["L-CC"]
        digest = pixels_sha256(film)
        assert answer["mammograms"][0]["pixels_sha256"] == digest
        fused = wait_until(lambda: (r := runtime.pipeline.latest()) and r.context["case"] == "case-A" and r,
                           what="a fused frame")  # fmt: skip
        assert fused.context["modalities"] == ["us", "mg"]
        assert fused.context["mammograms"] == [{"input": "mg_cc", "view": "L-CC", "pixels_sha256": digest}]  # fmt: skip
        # the served decision is the model's on that frame with that film, not an approximation
        expected = _reference(model, film).classify(fused.frame.image).decision.probabilities
        assert fused.decision.probabilities == pytest.approx(expected, abs=1e-5)
        alone = _reference(model, None).classify(fused.frame.image).decision.probabilities
        assert max(abs(expected[k] - alone[k]) for k in expected) > 1e-4  # the film mattered
        # an upload is not the live patient: ultrasound alone, whatever is attached
        scan = _ultrasound(1)
        upload = client.post(
            "/v1/classify", content=png_bytes(scan), headers={"Content-Type": "image/png"}
        )
        assert upload.status_code == 200, upload.text
        solo = _reference(model, None).classify(scan).decision.probabilities
        assert upload.json()["probabilities"] == pytest.approx(solo, abs=1e-5)
        view = client.get("/v1/status").json()
        assert view["case"]["case"] == "case-A" and view["case"]["views"] == ["L-CC"]
        assert client.delete("/v1/case").json() == {"detached": "case-A"}
        after = runtime.pipeline.latest().sequence
        later = wait_until(lambda: (r := runtime.pipeline.latest()).sequence > after + 1 and r,
                           what="a frame after the detach")  # fmt: skip
        assert later.context == {"case": None, "inputs_used": ["us"], "modalities": ["us"], "mammograms": []}  # fmt: skip
        assert client.get("/v1/case").json() is None
    # the displayed (smoothed) decision starts afresh with each case: a fused frame is never
    # averaged with frames fused with another case, or with none
    changes = [b for a, b in itertools.pairwise(shown) if a.context["case"] != b.context["case"]]
    assert len(changes) == 2  # attach, detach
    for result in changes:
        assert result.smoothed.probabilities == pytest.approx(result.decision.probabilities)
    rows = read_trail(tmp_path / "audit.sqlite")
    events = [json.loads(r["source"]) for r in rows if r["quality"].startswith("no decision: case")]
    assert [(e["event"], e["case"], e["reason"]) for e in events] == [
        ("attach", "case-A", None), ("detach", "case-A", "operator")]  # fmt: skip
    assert events[0]["mammograms"][0]["pixels_sha256"] == digest and "data" not in events[0]
    uploads = [json.loads(r["source"]) for r in rows if r["source"].startswith('{"frame":"upload"')]
    assert [(u["case"], u["modalities"]) for u in uploads] == [(None, ["us"])]
    frames = [json.loads(r["source"]) for r in rows if r["frame_sha256"]]
    with_mg = [f for f in frames if f["modalities"] == ["us", "mg"]]
    assert with_mg and all(f["case"] == "case-A" and f["mammograms"][0]["pixels_sha256"] == digest
                           for f in with_mg)  # fmt: skip
    # every fused row comes after the attach record, and every fused frame was captured before
    # the detach: a frame fused just before a detach may be queued after its record (the trail's
    # order is the order records were queued); captured_at and case say which case a row is of
    fused = [r for r in rows if r["frame_sha256"] and "mg" in json.loads(r["source"])["modalities"]]
    marks = [r for r in rows if r["quality"].startswith("no decision: case")]
    assert marks[0]["id"] < min(r["id"] for r in fused)
    assert max(r["captured_at"] for r in fused) <= marks[1]["captured_at"]


def test_a_stale_attachment_never_fuses_with_the_next_patients_frames(model):
    """Idle time: once it passes, the next frame is ultrasound-only and the detach is recorded;
    attach A then B: no frame after B's attach is fused with A's embedding."""
    now = [0.0]
    records = []
    live = LiveFusion(FusionClassifier.open(model), 30.0, records.append, clock=lambda: now[0])
    film_a, film_b = _film(seed=3), _film(seed=11)
    frames = [_ultrasound(k) for k in range(4)]
    live.attach("A", [Mammogram(film_a, L_CC)])
    # a frame captured before the attach may be the previous patient's: ultrasound alone
    decided, used = live.classify(frames[0], captured_monotonic=now[0] - 0.01)
    assert decided.case is None and used["modalities"] == ["us"] and used["mammograms"] == []
    decided, used = live.classify(frames[0], captured_monotonic=now[0])
    assert decided.case == "A" and used["modalities"] == ["us", "mg"]
    now[0] += 29.0  # within the idle time (from the last frame that passed the gate): attached
    assert live.classify(frames[1])[0].case == "A"
    now[0] += 20.0  # frames that fail the gate (the probe in the air) are not scanning
    assert live.classify(np.full((96, 128), 128, np.uint8))[0].decision.label is None
    now[0] += 10.5  # the probe lay idle: the case ended, even with no tick in between
    decided, used = live.classify(frames[2])
    assert decided.case is None and decided.inputs == ("us",) and used["mammograms"] == []
    alone = _reference(model, None).classify(frames[2]).decision.probabilities
    assert decided.decision.probabilities == pytest.approx(alone, abs=1e-6)
    detach = json.loads(records[-1].source)
    assert (detach["event"], detach["case"]) == ("detach", "A") and detach["reason"].startswith(
        "idle"
    )
    # the loop's tick ends an idle case too, with no frame at all
    live.attach("A", [Mammogram(film_a, L_CC)])
    now[0] += 31.0
    live.expire_if_idle()
    assert live.attachment() is None and json.loads(records[-1].source)["reason"].startswith("idle")
    # A then B: B replaces A in one step, and every frame after is fused with B's film only
    live.attach("A", [Mammogram(film_a, L_CC)])
    live.attach("B", [Mammogram(film_b, L_CC)])
    assert [json.loads(r.source)["event"] for r in records[-3:]] == ["attach", "detach", "attach"]
    assert json.loads(records[-2].source)["reason"] == "new attach (case B)"
    with_b = _reference(model, film_b)
    with_a = _reference(model, film_a)
    for frame in frames:
        decided, used = live.classify(frame)
        assert decided.case == "B"
        assert used["mammograms"][0]["pixels_sha256"] == pixels_sha256(film_b)
        expected = with_b.classify(frame).decision.probabilities
        assert decided.decision.probabilities == pytest.approx(expected, abs=1e-6)
        other = with_a.classify(frame).decision.probabilities
        assert max(abs(other[k] - expected[k]) for k in expected) > 1e-5  # A's would differ


def test_attach_errors_are_clear_and_change_nothing(model, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEBC_TOKEN", TOKEN)
    runtime = build_runtime(settings_for(tmp_path, model=str(model), case={"max_mammograms": 2}))
    auth = {"Authorization": f"Bearer {TOKEN}"}
    good = _attach_body("case-1", [_film()])
    with TestClient(create_app(runtime)) as client:
        assert client.post("/v1/case", json=good).status_code == 401
        assert client.delete("/v1/case").status_code == 401
        cases = [
            (json.dumps(good), "text/plain", 415, "application/json"),
            ("{", "application/json", 422, "body"),
            (json.dumps({**good, "case": "Jane Doe"}), "application/json", 422, "case"),
            (json.dumps({"case": "c"}), "application/json", 422, "mammograms"),
            (json.dumps({"case": "c", "mammograms": [{"data": "!!!!"}]}), "application/json", 422, "base64"),
            (json.dumps({"case": "c", "mammograms": [{"data": base64.b64encode(b"nope").decode()}]}),
             "application/json", 422, "mammogram 1"),
            (json.dumps({"case": "c", "mammograms": [{"data": "AAAA", "view": "left"}]}), "application/json", 422, "view"),
            (json.dumps(_attach_body("c", [_film()] * 3)), "application/json", 413, "at most 2"),
        ]  # fmt: skip
        for body, kind, status, words in cases:
            answer = client.post("/v1/case", content=body, headers={**auth, "Content-Type": kind})
            assert answer.status_code == status, (body[:80], answer.text)
            assert words in answer.json()["detail"], answer.text
        assert client.get("/v1/case", headers=auth).json() is None  # nothing was attached
        schema = client.get("/openapi.json", headers=auth).json()
        post = schema["paths"]["/v1/case"]["post"]
        assert {"413", "415", "422", "503"} <= set(post["responses"])
        assert "application/json" in post["requestBody"]["content"]
        limits = post["requestBody"]["content"]["application/json"]["schema"]["properties"]
        assert limits["mammograms"]["maxItems"] == 2  # this server's case.max_mammograms
        assert {"get", "post", "delete"} <= set(schema["paths"]["/v1/case"])


def test_a_single_model_cart_has_no_case_endpoints(tmp_path):
    runtime = build_runtime(settings_for(tmp_path))
    with TestClient(create_app(runtime)) as client:
        answer = client.post("/v1/case", json=_attach_body("c", [np.zeros((8, 8), np.uint8)]))
        assert answer.status_code == 404 and client.delete("/v1/case").status_code == 404
        assert "/v1/case" not in client.get("/openapi.json").json()["paths"]
        view = client.get("/v1/status").json()
        assert view["case"] is None and view["fusion"] is False


def test_the_case_endpoints_answer_as_their_schema_says_under_all_checks(model, tmp_path):
    """The schemathesis run of tests/test_api_schema.py against a fusion model's cart, whose
    schema has the case endpoints; a schema-valid mammogram is no readable image either (422)."""
    pytest.importorskip("schemathesis", reason="needs the [dev] extra")
    import subprocess

    from tests.serve_process import ServerProcess
    from tests.test_api_schema import CONFIG, ROOT, schemathesis_cli

    (tmp_path / "token").write_text(TOKEN)
    with ServerProcess(tmp_path, "--set", f"token_file={tmp_path / 'token'}", "--set", f"model={model}") as server:  # fmt: skip
        server.wait_ready()
        run = subprocess.run(
            [schemathesis_cli(), "--config-file", str(CONFIG), "run", server.url + "/openapi.json",
             "--checks", "all", "-H", f"Authorization: Bearer {TOKEN}", "--max-examples", "60",
             "--seed", "21", "--suppress-health-check", "all", "--no-color",
             "--include-path-regex", "^/v1/(case|cases|classify)$"],
            capture_output=True, text=True, timeout=300, cwd=ROOT,
        )  # fmt: skip
        server.stop()
    report = run.stdout + run.stderr
    assert run.returncode == 0, report[-4000:]
    assert "Tested: 5" in report, report[-2000:]  # /v1/case's three, POST /v1/cases, /v1/classify


def test_one_uploaded_case_is_classified_with_both_modalities(model, tmp_path):
    runtime = build_runtime(settings_for(tmp_path, model=str(model)))
    film, scans = _film(), [_ultrasound(k) for k in range(2)]
    body = {"case": "upload-9", "ultrasound": [{"data": base64.b64encode(png_bytes(u)).decode()} for u in scans],
            "mammograms": _attach_body("upload-9", [film])["mammograms"]}  # fmt: skip
    with TestClient(create_app(runtime)) as client:
        answer = client.post("/v1/cases", json=body)
        alone = client.post("/v1/cases", json={**body, "mammograms": []})
        too_many = client.post("/v1/cases", json={**body, "ultrasound": body["ultrasound"] * 9})
        assert client.get("/v1/case").json() is None  # the live stream's attachment: untouched
    assert answer.status_code == 200, answer.text
    result = answer.json()
    reference = _reference(model, film)
    frames = reference.classify_batch(scans)
    expected = reference.case_decision(frames)
    assert result["decision"]["probabilities"] == pytest.approx(
        expected.decision.probabilities, abs=1e-5
    )
    assert result["decision"]["modalities"] == ["us", "mg"] and result["case"] == "upload-9"
    for image, frame in zip(result["images"], frames, strict=True):
        assert image["probabilities"] == pytest.approx(frame.decision.probabilities, abs=1e-5)
        assert image["inputs_used"] == ["us", "mg_cc"]
    assert result["mammograms"][0]["pixels_sha256"] == pixels_sha256(film)
    assert alone.json()["decision"]["modalities"] == ["us"]
    only_us = _reference(model, None).case_decision(_reference(model, None).classify_batch(scans))
    assert alone.json()["decision"]["probabilities"] == pytest.approx(
        only_us.decision.probabilities, abs=1e-5
    )
    assert too_many.status_code == 413 and "at most 16" in too_many.json()["detail"]
    assert runtime.audit.flush()
    rows = [json.loads(r["source"]) for r in read_trail(tmp_path / "audit.sqlite")
            if r["source"] and r["source"].startswith('{"frame":') and r["source"].find("upload-9") > 0]  # fmt: skip
    fused = [r for r in rows if r["modalities"] == ["us", "mg"]]
    assert len(fused) == 3 and sum(1 for r in fused if r.get("case decision")) == 1
    assert all(r["mammograms"][0]["pixels_sha256"] == pixels_sha256(film) for r in fused)


def _sha(uid):
    return hashlib.sha256(f"StudyInstanceUID={uid}".encode()).hexdigest()


def _dicom_film(study, patient="p-A", view="CC"):
    """A left mammogram as DICOM bytes, of `study` and `patient`."""
    return _dicom_bytes(_film(view=view), ImageLaterality="L", ViewPosition=view,
                        StudyInstanceUID=study, PatientID=patient)  # fmt: skip


def _mammogram_of(data):
    """A DICOM film as the cart reads an uploaded one: full depth, its header's view and study."""
    return Mammogram(decode_image(data, full_depth=True), read_image_view(data), "mammogram 1",
                     study=read_study(data))  # fmt: skip


def _patient_sha(patient):
    return hashlib.sha256(f"PatientID={patient}".encode()).hexdigest()


def _no_patient(text):
    """Whether `text` holds neither the tests' PatientIDs nor their hashes."""
    return not any(secret in text for p in ("p-A", "p-B") for secret in (p, _patient_sha(p)))


def test_her_ultrasound_study_is_fused_until_another_study_or_patient(model, tmp_path):
    """A woman's mammograms and her ultrasound are separate DICOM studies: live frames of her
    ultrasound study (another study than her films', the same PatientID) are fused; the case is
    bound to that ultrasound study, and the first frame of another one detaches it ("new
    study"); a frame of another patient detaches it ("another patient"), bound or not; either
    is answered from ultrasound alone, and no record holds a PatientID or its hash."""
    records = []
    live = LiveFusion(FusionClassifier.open(model), 30.0, records.append)
    pipeline = LivePipeline(live, reader=None)  # the loop's own classify step, frame by frame
    scans = tmp_path / "scans"
    scans.mkdir()
    for name, study, patient, first in (("1-a.dcm", "1.2.840.1", "p-A", 0),
                                        ("2-b.dcm", "1.2.840.2", "p-A", 2),
                                        ("3-c.dcm", "1.2.840.3", "p-B", 4)):  # fmt: skip
        cine = np.stack([_ultrasound(first), _ultrasound(first + 1)])
        (scans / name).write_bytes(_dicom_bytes(cine, frames=2, StudyInstanceUID=study,
                                                PatientID=patient))  # fmt: skip
    films = [_mammogram_of(_dicom_film("1.2.840.9"))]  # her mammography study
    attachment = live.attach("A", films)
    assert attachment.study_sha256 is None  # bound to her ultrasound study, not her films'
    source = open_source(str(scans))
    source.open()
    frames = list(iter(source.read, None))
    assert [f.study.study_sha256 for f in frames] == [_sha(f"1.2.840.{k}") for k in (1, 1, 2, 2, 3, 3)]  # fmt: skip
    used = [pipeline._classify(frame) for frame in frames[:4]]
    assert [(c["case"], c["modalities"]) for _, c in used] == [
        ("A", ["us", "mg"]), ("A", ["us", "mg"]), (None, ["us"]), (None, ["us"])]  # fmt: skip
    for frame, (decision, _) in zip(frames[2:4], used[2:], strict=True):
        alone = _reference(model, None).classify(frame.image).decision.probabilities
        assert decision.probabilities == pytest.approx(alone, abs=1e-6)
    detach = json.loads(records[-1].source)
    assert (detach["event"], detach["case"]) == ("detach", "A")
    assert detach["reason"] == (f"new study: an ultrasound frame of DICOM study {_sha('1.2.840.2')}, "
                                f"the case's is {_sha('1.2.840.1')}")  # fmt: skip
    assert detach["study_sha256"] == _sha("1.2.840.1")
    assert detach["mammograms"][0]["study_sha256"] == _sha("1.2.840.9")
    assert live.attachment() is None
    # another patient's frame ends a case bound to her study, and one bound to none yet
    for case, before in (("B", frames[:1]), ("B2", [])):
        live.attach(case, films)
        assert [live.classify(f.image, study=f.study)[0].case for f in before] == [case] * len(before)  # fmt: skip
        decided, context = live.classify(frames[4].image, study=frames[4].study)
        assert context["case"] is None and context["modalities"] == ["us"]
        alone = _reference(model, None).classify(frames[4].image).decision.probabilities
        assert decided.decision.probabilities == pytest.approx(alone, abs=1e-6)
        detach = json.loads(records[-1].source)
        assert (detach["event"], detach["case"]) == ("detach", case)
        assert detach["reason"] == ("another patient: a DICOM ultrasound frame whose PatientID is "
                                    "not the case's; never fused")  # fmt: skip
        assert live.attachment() is None
    # films without a patient or study (a PNG): bound to the first frame's ultrasound study;
    # frames without one keep today's rules; the first frame of another study ends it
    live.attach("C", [Mammogram(_film(), L_CC, "mammogram 1")])
    assert live.classify(frames[0].image, study=frames[0].study)[0].case == "C"
    view = live.view()
    assert view["study_sha256"] == _sha("1.2.840.1")
    assert view["study"].endswith(f"bound to the ultrasound DICOM study {_sha('1.2.840.1')}")
    assert live.classify(frames[1].image)[0].case == "C"  # no study said: still the case's
    decided, context = live.classify(frames[2].image, study=frames[2].study)
    assert decided.case is None and context["mammograms"] == []
    assert json.loads(records[-1].source)["reason"].startswith("new study")
    # films that name no patient take hers from the first fused DICOM frame: a later frame of
    # another PatientID that names no study is not fused (the study binding alone missed it)
    live.attach("E", [Mammogram(_film(), L_CC, "mammogram 1")])
    assert live.classify(frames[0].image, study=frames[0].study)[0].case == "E"
    bind = json.loads(records[-1].source)
    assert (bind["event"], bind["case"], bind["study_sha256"]) == ("bind", "E", _sha("1.2.840.1"))
    other = replace(frames[4].study, study_sha256=None)  # patient B, no StudyInstanceUID
    decided, context = live.classify(frames[4].image, study=other)
    assert decided.case is None and context["modalities"] == ["us"]
    assert json.loads(records[-1].source)["reason"].startswith("another patient")
    assert live.attachment() is None
    # a frame captured before the attach (the previous patient's) is not fused and ends nothing
    live.attach("D", films)
    stale = live.classify(frames[4].image, captured_monotonic=0.0, study=frames[4].study)
    assert stale[0].case is None and live.attachment().case == "D"
    assert live.classify(frames[0].image, study=frames[0].study)[0].case == "D"
    assert all(_no_patient(r.source) for r in records) and _no_patient(json.dumps(live.view()))


def test_a_case_is_one_patient_its_films_one_study_its_ultrasound_one_study(model, tmp_path):
    """/v1/case and /v1/cases: films of several studies or patients are 422; an uploaded case's
    DICOM ultrasound of her own ultrasound study is fused with her films of another study; of
    another patient, or of two ultrasound studies, 422 naming the files; no answer and no
    record holds a PatientID or its hash; a film that is not DICOM has its study said unknown."""
    runtime = build_runtime(settings_for(tmp_path, model=str(model)))

    def dicom(data):
        return {"data": base64.b64encode(data).decode()}

    def scan(study, patient, k=0):
        return dicom(_dicom_bytes(_ultrasound(k), StudyInstanceUID=study, PatientID=patient))

    mixed = [dicom(_dicom_film("1.2.840.1")), dicom(_dicom_film("1.2.840.2", view="MLO"))]
    other_patient = [dicom(_dicom_film("1.2.840.1")), dicom(_dicom_film("1.2.840.1", "p-B", "MLO"))]  # fmt: skip
    hers, later = scan("1.2.840.5", "p-A"), scan("1.2.840.6", "p-A", 1)
    answers = []
    with TestClient(create_app(runtime)) as client:
        refused = client.post("/v1/case", json={"case": "c", "mammograms": mixed})
        assert refused.status_code == 422, refused.text
        assert (
            "films of several studies (2 different StudyInstanceUIDs; " in refused.json()["detail"]
        )
        assert "A: mammogram 1; B: mammogram 2" in refused.json()["detail"]
        refused = client.post("/v1/case", json={"case": "c", "mammograms": other_patient})
        assert (
            refused.status_code == 422 and "films of several patients" in refused.json()["detail"]
        )
        answers.append(refused.text)
        assert client.get("/v1/case").json() is None  # nothing attached
        fused = client.post("/v1/cases", json={"case": "u", "ultrasound": [hers], "mammograms": mixed[:1]})  # fmt: skip
        assert fused.status_code == 200, fused.text
        assert fused.json()["decision"]["modalities"] == ["us", "mg"]
        assert fused.json()["images"][0]["inputs_used"] == ["us", "mg_cc"]
        answers.append(fused.text)
        stranger = client.post("/v1/cases", json={"case": "u", "ultrasound": [hers, scan("1.2.840.5", "p-B", 2)],
                                                   "mammograms": mixed[:1]})  # fmt: skip
        assert stranger.status_code == 422, stranger.text
        assert stranger.json()["detail"] == ("ultrasound 2: DICOM of another patient (PatientID) "
                                             "than the case's mammograms; never fused")  # fmt: skip
        answers.append(stranger.text)
        two = client.post("/v1/cases", json={"case": "u", "ultrasound": [hers, later], "mammograms": mixed[:1]})  # fmt: skip
        assert two.status_code == 422, two.text
        assert two.json()["detail"].startswith(
            "the case's ultrasound is of several DICOM studies (2 different StudyInstanceUIDs; "
            "A: ultrasound 1; B: ultrasound 2): a case is one ultrasound study"
        )
        attached = client.post("/v1/case", json=_attach_body("case-P", [_film()])).json()
        assert attached["study_sha256"] is None
        assert attached["mammograms"][0]["study_sha256"] is None
        assert attached["study"].startswith("study unknown for mammogram 1 (not DICOM")
        attached = client.post("/v1/case", json={"case": "case-D", "mammograms": mixed[:1]})
        assert attached.json()["study_sha256"] is None  # the ultrasound's study: none yet
        assert attached.json()["mammograms"][0]["study_sha256"] == _sha("1.2.840.1")
        assert "another patient (PatientID) is never fused" in attached.json()["study"]
        answers += [attached.text, client.get("/v1/case").text, client.get("/v1/status").text]
    assert runtime.audit.flush()
    trail = list(read_trail(tmp_path / "audit.sqlite"))
    events = [
        json.loads(r["source"]) for r in trail if r["quality"].startswith("no decision: case")
    ]
    assert [(e["event"], e["case"]) for e in events] == [
        ("attach", "case-P"), ("detach", "case-P"), ("attach", "case-D")]  # fmt: skip
    assert "study unknown for mammogram 1" in events[0]["study"]
    assert events[0]["mammograms"][0]["view"] == "L-CC"
    assert events[0]["mammograms"][0]["header_view"] is None  # a PNG: its view was stated
    assert events[2]["study_sha256"] is None
    assert events[2]["mammograms"][0]["study_sha256"] == _sha("1.2.840.1")
    fused_rows = [r for r in trail if r["source"] and '"case":"u"' in r["source"]]
    assert len(fused_rows) == 2  # the fused upload's image and case; the refused ones: none
    assert all(_no_patient(r["source"]) and "1.2.840.1" not in r["source"]
               for r in trail if r["source"])  # fmt: skip
    assert all(_no_patient(text) for text in answers)


def test_every_scratch_classifier_is_the_live_ones_fresh_copy(model, tmp_path, monkeypatch):
    """An attach, an upload and an uploaded case each work on a fresh classifier over the live
    one's graphs, gates and threshold, made in one place (FusionClassifier.fresh)."""
    made = []
    fresh = FusionClassifier.fresh

    def counted(self):
        made.append(self)
        copy = fresh(self)
        assert copy.graphs == self.graphs and copy.threshold == self.threshold
        assert copy.gate is self.gate and copy.mammography_gate is self.mammography_gate
        return copy

    built = []
    init = FusionClassifier.__init__
    monkeypatch.setattr(FusionClassifier, "__init__", lambda s, *a, **k: (built.append(s), init(s, *a, **k))[1])  # fmt: skip
    monkeypatch.setattr(FusionClassifier, "fresh", counted)
    runtime = build_runtime(settings_for(tmp_path, model=str(model), threshold=0.3))
    live = runtime.fusion.fusion
    assert built == [live]
    with TestClient(create_app(runtime)):
        runtime.attach_case("c", [(png_bytes(_film()), "L-CC")])
        runtime.classify_upload(png_bytes(_ultrasound(0)), None)
        runtime.classify_case("u", [png_bytes(_ultrasound(1))], [])
    assert made == [live] * 3 and len(built) == 4  # the live one and its three fresh copies
