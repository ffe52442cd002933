"""`edgebc serve` through its ASGI interface: every endpoint, every error, withdrawal, auth, OpenAPI."""

import json
import threading
import time
from dataclasses import replace

import cv2
import numpy as np
import pytest

pytest.importorskip("fastapi", reason="needs the [serve] extra")
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from edgebc.audit_trail import read_trail
from edgebc.demo import DEMO_MODEL
from edgebc.errors import ConfigError
from edgebc.integrity import sha256_file
from edgebc.serve.app import create_app
from edgebc.serve.routes import REGION_PATTERN
from edgebc.serve.runtime import build_runtime
from edgebc.serve.settings import ServeSettings, load_serve_settings
from edgebc.sources import Frame, PhantomCineSource
from edgebc.synth import make_ultrasound_phantom
from edgebc.synth.ultrasound import phantom_rng

TOKEN = "s3cret-token-for-tests-0123456789"


class SwitchableSource:
    """Phantom frames at ~60 fps that freeze or stall on cue (mode: live | frozen | stalled)."""

    live = True

    def __init__(self):
        self.name, self.mode, self.index = "switchable", "live", 0
        self._phantom = PhantomCineSource("benign", fps=1000, size=128, frames=8)

    def open(self):
        self._phantom.open()

    def read(self):
        time.sleep(1 / 60)
        while self.mode == "stalled":  # a read that blocks, as a hung capture card's does
            time.sleep(0.01)
        if self.mode == "live":
            self._last = self._phantom.read().image
        return self._stamp(self._last)

    def _stamp(self, image):
        self.index += 1
        return Frame(image, self.index, time.time(), time.monotonic(), self.name)

    def close(self):
        self._phantom.close()


def settings_for(tmp_path, **changes):
    values = {
        "source": "phantom:tour?fps=60&size=128",
        "audit": {"path": str(tmp_path / "audit.sqlite")},
    }
    values.update(changes)
    overrides = [f"{key}={json.dumps(value)}" for key, value in values.items()]
    return load_serve_settings(None, overrides)


def wait_until(predicate, timeout=5.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def png_bytes(image):
    ok, encoded = cv2.imencode(".png", image)
    assert ok
    return encoded.tobytes()


def phantom_png(label="malignant", size=128, seed=3):
    return png_bytes(make_ultrasound_phantom(label, phantom_rng(seed, 0), size, size).image)


@pytest.fixture
def served(tmp_path):
    runtime = build_runtime(settings_for(tmp_path))
    with TestClient(create_app(runtime)) as client:
        wait_until(lambda: client.get("/v1/status").json()["display"]["label"], what="a decision")
        yield client, runtime


def test_status_shows_a_smoothed_decision_with_timings_and_the_demo_banner(served):
    client, _ = served
    view = client.get("/v1/status").json()
    assert view["display"]["label"] in ("normal", "benign", "malignant")
    assert sum(view["display"]["probabilities"].values()) == pytest.approx(1.0, abs=1e-6)
    assert view["display"]["reason"] is None
    assert view["feed"]["status"] == "ok" and view["frame"]["age_ms"] < 1000
    assert set(view["per_frame"]["timings_ms"]) >= {"capture_wait", "read", "crop", "quality", "preprocess",
                                                    "inference", "postprocess", "end_to_end"}  # fmt: skip
    assert view["banners"] == [
        "Research use only — not a medical device. Not for diagnosis.",
        "DEMO — synthetic phantom model",
    ]
    assert view["model"]["sha256"] == sha256_file(DEMO_MODEL)
    point = client.get("/v1/model").json()["card"]["operating_point"]
    assert view["model"]["rule"] == (  # the rule the page shows beside the bars
        f"malignant when p(malignant) ≥ {point['threshold']:.2f}, the operating point for "
        f"{100 * point['target_sensitivity']:.0f} % sensitivity; otherwise the most probable other class"
    )
    wait_until(lambda: client.get("/v1/status").json()["fps"] > 20, what="the frame rate")


def test_model_health_and_readiness(served):
    client, _ = served
    model = client.get("/v1/model").json()
    assert model["sha256"] == sha256_file(DEMO_MODEL) and model["verified"] and model["demo"]
    assert model["card"]["task"]["classes"] == ["normal", "benign", "malignant"]
    assert model["threshold"] == pytest.approx(model["card"]["operating_point"]["threshold"])
    assert client.get("/healthz").json() == {"alive": True}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["ready"] is True
    assert set(ready.json()["checks"]) == {"model", "source", "audit_log"}


def test_metrics_are_prometheus_text_from_the_pipeline(served):
    client, runtime = served
    wait_until(lambda: runtime.pipeline.counts["frames"] >= 10, what="ten frames")
    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    families = {family.name: family for family in text_string_to_metric_families(response.text)}
    frames = families["edgebc_frames"].samples[0].value
    assert frames >= 10
    decisions = sum(s.value for s in families["edgebc_decisions"].samples)
    assert decisions + families["edgebc_no_decisions"].samples[0].value <= frames + 5
    assert families["edgebc_feed_ok"].samples[0].value == 1
    assert families["edgebc_ready"].samples[0].value == 1
    assert families["edgebc_audit_unarchived_bytes"].samples[0].value == 0  # nothing sealed yet
    stages = {s.labels["stage"] for s in families["edgebc_latency_milliseconds"].samples}
    assert {"inference", "end_to_end"} <= stages


def test_frame_jpeg_and_websocket_updates(served):
    client, _ = served
    jpeg = client.get("/v1/frame.jpg")
    assert jpeg.status_code == 200 and jpeg.content[:3] == b"\xff\xd8\xff"
    image = cv2.imdecode(np.frombuffer(jpeg.content, np.uint8), cv2.IMREAD_UNCHANGED)
    assert image.shape[:2] == (128, 128)
    with client.websocket_connect("/v1/live") as socket:
        socket.send_json({"token": ""})
        sequences, frames = [], 0
        while frames < 5:
            message = socket.receive()
            if message.get("text"):
                sequences.append(json.loads(message["text"])["frame"]["sequence"])
            elif message.get("bytes"):
                assert message["bytes"][:3] == b"\xff\xd8\xff"
                frames += 1
        assert sequences[-1] > sequences[0]  # the page sees new frames, not one frame again


def test_classify_an_uploaded_png_and_audit_it(served, tmp_path):
    client, runtime = served
    data = phantom_png()
    response = client.post("/v1/classify", content=data, headers={"Content-Type": "image/png"})
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["label"] in ("normal", "benign", "malignant")
    assert sum(result["probabilities"].values()) == pytest.approx(1.0, abs=1e-6)
    assert (result["width"], result["height"]) == (128, 128) and result["region"] is None
    assert result["model_sha256"] == sha256_file(DEMO_MODEL)
    region = client.post(
        "/v1/classify?region=8,8,100,100", content=data, headers={"Content-Type": "image/png"}
    )
    assert region.json()["region"] == {"x": 8, "y": 8, "w": 100, "h": 100}
    assert runtime.audit.flush()
    uploads = [row for row in read_trail(tmp_path / "audit.sqlite") if row["source"] == "upload"]
    assert len(uploads) == 2 and uploads[0]["decision"] == result["label"]
    assert json.loads(uploads[0]["probabilities"]) == pytest.approx(result["probabilities"])


def test_a_uniform_upload_gets_no_decision_with_a_reason(served):
    client, _ = served
    response = client.post("/v1/classify", content=png_bytes(np.full((64, 64), 128, np.uint8)),
                           headers={"Content-Type": "image/png"})  # fmt: skip
    assert response.status_code == 200
    assert response.json()["label"] is None and "uniform" in response.json()["reason"]


@pytest.mark.parametrize(
    ("body", "content_type", "status", "words"),
    [
        (b"hello", "text/plain", 415, "not accepted"),
        (b"--x\r\n", "multipart/form-data; boundary=x", 415, "bytes as the body"),
        (b"\x00\x01garbage" * 10, "image/png", 422, "expected a PNG, JPEG, PGM or DICOM"),
        (b"", "image/png", 411, "no body"),
        ("truncated", "image/png", 422, "truncated"),
        ("jpeg-as-png", "image/png", 422, "says image/png but the body is JPEG"),
        ("png", "image/png", 422, "query parameter region: String should match pattern"),
        ("png-region-outside", "image/png", 422, "does not fit in the 128x128 image"),
    ],
)
def test_upload_errors_are_clear(served, body, content_type, status, words):
    client, _ = served
    url = "/v1/classify"
    if body == "truncated":
        body = phantom_png()[:-40]
    elif body == "jpeg-as-png":
        body = cv2.imencode(".jpg", np.full((32, 32), 90, np.uint8))[1].tobytes()
    elif body == "png":
        body, url = phantom_png(), "/v1/classify?region=1,2,three,4"
    elif body == "png-region-outside":
        body, url = phantom_png(), "/v1/classify?region=100,100,64,64"
    response = client.post(url, content=body, headers={"Content-Type": content_type})
    assert response.status_code == status, response.text
    assert words in response.json()["detail"]


def test_oversized_uploads_are_refused_by_length_and_while_streaming(tmp_path):
    runtime = build_runtime(settings_for(tmp_path, max_upload_bytes=4096))
    with TestClient(create_app(runtime)) as client:
        big = phantom_png(size=256)
        assert len(big) > 4096
        declared = client.post("/v1/classify", content=big, headers={"Content-Type": "image/png"})
        assert declared.status_code == 413 and "limit is 4096 bytes" in declared.json()["detail"]

        def chunks():  # no Content-Length: counted while read, refused past the limit
            for start in range(0, len(big), 1000):
                yield big[start : start + 1000]

        streamed = client.post(
            "/v1/classify", content=chunks(), headers={"Content-Type": "image/png"}
        )
        assert streamed.status_code == 413 and "exceeds the limit" in streamed.json()["detail"]
        assert runtime.uploads.outcomes["too_large"] == 2 and runtime.uploads.pending == 0


def test_a_full_upload_queue_answers_503_with_retry_after(tmp_path):
    runtime = build_runtime(settings_for(tmp_path, max_pending_uploads=2))
    with TestClient(create_app(runtime)) as client:
        assert runtime.uploads.try_enter() and runtime.uploads.try_enter()  # two uploads in flight
        response = client.post(
            "/v1/classify", content=phantom_png(), headers={"Content-Type": "image/png"}
        )
        assert response.status_code == 503 and response.headers["Retry-After"] == "1"
        runtime.uploads.leave()
        runtime.uploads.leave()
        ok = client.post(
            "/v1/classify", content=phantom_png(), headers={"Content-Type": "image/png"}
        )
        assert ok.status_code == 200


def test_a_frozen_feed_withdraws_the_decision_and_readiness(tmp_path):
    source = SwitchableSource()
    runtime = build_runtime(settings_for(tmp_path), source_factory=lambda: source)
    with TestClient(create_app(runtime)) as client:
        wait_until(lambda: client.get("/v1/status").json()["display"]["label"], what="a decision")
        source.mode = "frozen"
        started = time.monotonic()
        view = wait_until(lambda: (v := client.get("/v1/status").json())["display"]["label"] is None and v,
                          timeout=3.0, what="withdrawal")  # fmt: skip
        assert time.monotonic() - started < 2.0  # freeze_seconds 0.5 plus polling
        assert "frozen feed" in view["display"]["reason"]
        ready = client.get("/readyz")
        assert ready.status_code == 503 and not ready.json()["checks"]["source"]["ok"]
        source.mode = "live"
        wait_until(
            lambda: client.get("/v1/status").json()["display"]["label"], what="the decision back"
        )
        assert client.get("/readyz").status_code == 200


def test_a_full_audit_disk_turns_readiness_false_but_keeps_serving(tmp_path):
    runtime = build_runtime(
        settings_for(tmp_path, audit={"path": str(tmp_path / "a.sqlite"), "max_bytes": 40960})
    )
    with TestClient(create_app(runtime)) as client:
        ready = wait_until(lambda: not (r := client.get("/readyz")).json()["checks"]["audit_log"]["ok"] and r,
                           timeout=20.0, what="the audit log to fill")  # fmt: skip
        assert ready.status_code == 503
        audit = ready.json()["checks"]["audit_log"]
        assert not audit["ok"] and "cannot be written" in audit["detail"]
        before = runtime.pipeline.counts["frames"]
        wait_until(lambda: runtime.pipeline.counts["frames"] > before + 10, what="serving to go on")
        view = client.get("/v1/status").json()
        assert view["display"]["label"] is not None and not view["audit"]["healthy"]
    assert read_trail(tmp_path / "a.sqlite")  # what was committed is whole


def test_bearer_token_guards_everything_but_the_page_and_probes(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEBC_TOKEN", TOKEN)
    runtime = build_runtime(settings_for(tmp_path, host="0.0.0.0"))
    with TestClient(create_app(runtime)) as client:
        for path in ("/v1/status", "/v1/model", "/metrics", "/v1/frame.jpg"):
            refused = client.get(path)
            assert refused.status_code == 401 and refused.headers["WWW-Authenticate"] == "Bearer"
        assert (
            client.get(
                "/v1/model", headers={"Authorization": "Bearer wrong-token-wrong-token"}
            ).status_code
            == 401
        )
        assert (
            client.get("/v1/model", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
        )
        assert (
            client.post(
                "/v1/classify", content=phantom_png(), headers={"Content-Type": "image/png"}
            ).status_code
            == 401
        )
        assert client.get("/healthz").status_code == 200 and client.get("/").status_code == 200
        # an unauthenticated caller learns liveness and readiness, not the model, hash or paths
        for path in ("/docs", "/redoc", "/openapi.json"):
            assert client.get(path).status_code == 401, path
        assert (
            client.get("/openapi.json", headers={"Authorization": f"Bearer {TOKEN}"}).status_code
            == 200
        )
        ready = client.get("/readyz")
        assert set(ready.json()["checks"]["audit_log"]) == {"ok"}
        assert "demo-phantom" not in ready.text and str(tmp_path) not in ready.text
        detailed = client.get("/readyz", headers={"Authorization": f"Bearer {TOKEN}"}).json()
        assert (
            "detail" in detailed["checks"]["audit_log"]
            and str(tmp_path) in detailed["checks"]["audit_log"]["detail"]
        )
        with client.websocket_connect("/v1/live") as socket:
            socket.send_json({"token": "nope"})
            assert socket.receive()["code"] == 1008
        with client.websocket_connect("/v1/live") as socket:
            socket.send_json({"token": TOKEN})
            assert json.loads(socket.receive_text())["model"]["name"] == "demo-phantom"


def test_an_exposed_server_without_a_token_refuses_to_start(tmp_path, monkeypatch):
    monkeypatch.delenv("EDGEBC_TOKEN", raising=False)
    with pytest.raises(ConfigError, match="bearer token"):
        ServeSettings(host="0.0.0.0").read_token()
    (tmp_path / "token").write_text("short\n")
    with pytest.raises(ConfigError, match="at least 16"):
        ServeSettings(host="0.0.0.0", token_file=str(tmp_path / "token")).read_token()
    (tmp_path / "token").write_text(TOKEN + "\n")
    assert ServeSettings(host="0.0.0.0", token_file=str(tmp_path / "token")).read_token() == TOKEN


def test_settings_refuse_unknown_keys_and_bad_values(tmp_path):
    with pytest.raises(ConfigError, match="Did you mean 'source'"):
        load_serve_settings(None, ["sorce=phantom:tour"])
    with pytest.raises(ConfigError, match="threshold"):
        load_serve_settings(None, ["threshold=1.5"])
    with pytest.raises(ConfigError, match="either a region or auto_region"):
        load_serve_settings(None, ["region=[0,0,10,10]", "auto_region=true"])
    with pytest.raises(Exception, match="no such file, folder or device"):
        build_runtime(settings_for(tmp_path, source=str(tmp_path / "missing.avi")))


def test_openapi_schema_documents_the_upload_and_its_errors(served):
    client, _ = served
    schema = client.get("/openapi.json").json()
    assert {
        "/v1/classify",
        "/v1/model",
        "/v1/status",
        "/healthz",
        "/readyz",
        "/metrics",
        "/v1/frame.jpg",
    } <= set(schema["paths"])
    classify = schema["paths"]["/v1/classify"]["post"]
    assert {"image/png", "image/jpeg", "image/x-portable-graymap", "application/dicom"} <= set(
        classify["requestBody"]["content"]
    )
    assert {"200", "400", "401", "411", "413", "415", "422", "503"} <= set(classify["responses"])
    problem = {"$ref": "#/components/schemas/Problem"}
    assert classify["responses"]["422"]["content"]["application/json"]["schema"] == problem
    region = classify["parameters"][0]
    assert region["name"] == "region" and region["schema"]["anyOf"][0]["pattern"] == REGION_PATTERN
    assert classify["requestBody"]["description"].endswith(
        f": {16 * 1024 * 1024} bytes on this server (413 above)"
    )
    assert all(
        body["schema"]["minLength"] == 1 for body in classify["requestBody"]["content"].values()
    )
    assert "ClassifyResult" in schema["components"]["schemas"]


def test_the_page_carries_the_banner_and_the_live_socket(served):
    client, _ = served
    page = client.get("/")
    assert page.status_code == 200 and "Research use only" in page.text and "/v1/live" in page.text


def test_an_upload_during_live_streaming_does_not_stall_the_loop(served):
    client, runtime = served
    before = runtime.pipeline.counts["frames"]
    threads = [threading.Thread(target=lambda: client.post("/v1/classify", content=phantom_png(),
                                                           headers={"Content-Type": "image/png"})) for _ in range(4)]  # fmt: skip
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    wait_until(
        lambda: runtime.pipeline.counts["frames"] > before + 10, what="the live loop to go on"
    )
    assert runtime.uploads.pending == 0


def test_cli_flags_override_the_config_file(tmp_path):
    from edgebc.cli import build_parser
    from edgebc.commands.serve import settings_from_args

    config = tmp_path / "cart.yaml"
    config.write_text("source: /dev/video0\nport: 9000\nsmoothing: {time_constant: 0.8}\n")
    args = build_parser().parse_args(["serve", "--config", str(config), "--port", "9100", "--region", "1,2,300,400",
                                      "--set", "smoothing.margin=0.2", "--audit-log", str(tmp_path / "x.sqlite")])  # fmt: skip
    settings = settings_from_args(args)
    assert (settings.source, settings.port, settings.region) == (
        "/dev/video0",
        9100,
        (1, 2, 300, 400),
    )
    assert (settings.smoothing.time_constant, settings.smoothing.margin) == (0.8, 0.2)
    assert settings.audit.path == str(tmp_path / "x.sqlite")


def test_the_upload_schema_is_the_decisions_json(served):
    """POST /v1/classify documents ClassifyResult; its fields are exactly the keys the runtime
    answers with (Decision.to_json() and the upload's facts), so neither can drift alone."""
    from edgebc.serve.routes import ClassifyResult

    _, runtime = served
    answer = runtime.classify_upload(phantom_png(), None)
    assert list(ClassifyResult.model_fields) == list(answer)
    decision_keys = set(runtime.pipeline.latest().decision.to_json())
    assert decision_keys <= set(answer)
    assert set(answer) - decision_keys == {"input_sha256", "width", "height", "region"}


def test_latency_percentiles_are_computed_once_per_frame_however_many_pages_watch(
    served, monkeypatch
):
    from edgebc.serve.sinks import STAGES, RollingStats

    client, runtime = served
    computed = []
    original = RollingStats.percentiles
    monkeypatch.setattr(RollingStats, "percentiles",
                        lambda self, stage, *a: computed.append(stage) or original(self, stage, *a))  # fmt: skip
    frames_before = runtime.pipeline.counts["frames"]
    sockets = [client.websocket_connect("/v1/live") for _ in range(3)]
    views = 0
    try:
        for socket in sockets:
            socket.__enter__().send_json({"token": ""})
        while views < 60:
            for socket in sockets:
                message = socket.receive()
                views += bool(message.get("text"))
    finally:
        for socket in sockets:
            socket.__exit__(None, None, None)
    frames = runtime.pipeline.counts["frames"] - frames_before
    assert views >= 60 and len(computed) % len(STAGES) == 0
    # Once per new result at most (plus the one in flight), not once per page and view.
    assert len(computed) // len(STAGES) <= frames + 1 < views, (len(computed), frames, views)


def test_only_a_result_the_audit_trail_accepted_is_ever_shown(tmp_path):
    """The audit trail comes first: a result it refused is withdrawn, never on a screen."""
    runtime = build_runtime(settings_for(tmp_path))
    accepted: set[int] = set()
    refusing = threading.Event()
    record = runtime.audit.record

    def audited(entry):
        if refusing.is_set():
            raise OSError("the audit disk went away")
        record(entry)
        accepted.add(entry.frame_index)

    runtime.audit.record = audited
    shown: list[tuple[int, bool]] = []  # (frame, accepted by the trail) when a page is woken

    def woken():
        latest = runtime.pipeline.latest()
        shown.append((latest.frame.index, latest.frame.index in accepted))

    runtime.broadcast.subscribe(woken)
    runtime.start()
    try:
        wait_until(lambda: len(shown) >= 5, what="results on the pages")
        refusing.set()
        view = wait_until(lambda: (v := runtime.view())["display"]["label"] is None and v,
                          what="the decision withdrawn")  # fmt: skip
        assert "audit trail" in view["display"]["reason"]
        errors = runtime.pipeline.counts["errors"]
        wait_until(lambda: runtime.pipeline.counts["errors"] > errors + 5, what="refusals")
        assert runtime.pipeline.latest().frame.index in accepted
        assert runtime.view()["display"]["label"] is None  # still withdrawn, not the old one
        refusing.clear()
        wait_until(lambda: runtime.view()["display"]["label"], what="the decision back")
    finally:
        runtime.stop()
    assert shown and all(ok for _, ok in shown), [s for s in shown if not s[1]][:3]


def test_the_readmes_layout_names_every_serve_module():
    from pathlib import Path

    import edgebc.serve

    folder = Path(edgebc.serve.__file__).parent
    row = next(line for line in (folder.parents[1] / "README.md").read_text().splitlines()
               if line.startswith("| `edgebc/serve/` |"))  # fmt: skip
    modules = sorted(p.name for p in folder.glob("*.py") if p.name != "__init__.py")
    assert [m for m in modules if f"`{m}`" not in row] == []


def test_an_upload_over_the_decoded_bytes_limit_is_refused_and_a_full_shared_budget_is_a_503(
    served, monkeypatch
):
    from edgebc import decode

    client, runtime = served
    # 3000 x 3000 RGB 8-bit declares 27 MB: over a 16 MiB setting, refused before decoding
    big = png_bytes(np.zeros((3000, 3000, 3), np.uint8))
    monkeypatch.setattr(
        runtime, "settings", replace(runtime.settings, max_decoded_bytes=16 * 1024**2)
    )
    response = client.post("/v1/classify", content=big, headers={"Content-Type": "image/png"})
    assert response.status_code == 422 and "decoded" in response.text, response.text
    # the process's shared budget held by others: not the file's fault, so 503 with Retry-After
    shared = decode.SHARED_DECODE_BUDGET
    monkeypatch.setattr(runtime, "settings", replace(runtime.settings, decode_wait_s=0.2))
    with shared.reserve(shared.capacity - shared.in_flight - 10, "others", 0.0):
        response = client.post(
            "/v1/classify", content=phantom_png(), headers={"Content-Type": "image/png"}
        )
    assert response.status_code == 503 and response.headers["retry-after"] == "1", response.text


@pytest.mark.parametrize("source_names", ["hash", "none", "name"])
def test_a_file_named_after_a_patient_stays_out_of_the_trail_and_the_status(tmp_path, source_names):
    canary = "MRN-48213 Doe Jane"
    folder = tmp_path / "frames"
    folder.mkdir()
    (folder / f"{canary}.png").write_bytes(phantom_png())
    settings = settings_for(tmp_path, source=str(folder / f"{canary}.png"),
                            audit={"path": str(tmp_path / "audit.sqlite"), "source_names": source_names})  # fmt: skip
    if source_names == "hash":
        assert settings.audit.source_names == load_serve_settings(None, []).audit.source_names
    runtime = build_runtime(settings)
    with TestClient(create_app(runtime)) as client:
        wait_until(lambda: client.get("/v1/status").json()["frame"], what="a frame")
        status = client.get("/v1/status").json()
    rows = read_trail(tmp_path / "audit.sqlite")
    assert rows
    stored = {row["source"] for row in rows}
    if source_names == "name":  # a site may opt in to names
        assert any(canary in (s or "") for s in stored) and canary in status["frame"]["source"]
    else:
        assert not any(canary in (s or "") for s in stored)
        assert canary not in json.dumps(status)  # neither the frame's source nor the feed's
        expected = None if source_names == "none" else status["frame"]["source"]
        assert stored == {expected}
        if source_names == "hash":
            assert expected.startswith("sha256:") and len(expected) == 7 + 16


def test_the_shared_decode_budget_is_a_setting(tmp_path):
    from edgebc import decode

    try:
        runtime = build_runtime(settings_for(tmp_path, decode_budget_bytes=128 * 1024**2))
        assert decode.SHARED_DECODE_BUDGET.capacity == 128 * 1024**2
        runtime.audit.close()
        runtime.backend.close()
    finally:
        decode.SHARED_DECODE_BUDGET.set_capacity(decode.DEFAULT_SHARED_DECODE_BYTES)
    with pytest.raises(ConfigError, match="must hold at least one image"):
        settings_for(tmp_path, decode_budget_bytes=1024**2)


def test_the_api_documentation_works_offline(served):
    """Carts in field clinics are offline: /docs and /redoc load Swagger UI and ReDoc from the
    package, not from a CDN, and every asset they name is served."""
    import re

    client, _ = served
    for page in ("/docs", "/redoc"):
        html = client.get(page)
        assert html.status_code == 200
        urls = re.findall(r"""(?:src|href|url)\s*[=:]\s*['"]([^'"]+)['"]""", html.text)
        assets = [u for u in urls if u.endswith((".js", ".css", ".png"))]
        assert assets and not [u for u in urls if "://" in u], (page, urls)
        for asset in assets:
            answer = client.get(asset)
            assert answer.status_code == 200 and len(answer.content) > 100, asset
    assert client.get("/docs").text.count("/docs-assets/swagger-ui-bundle.js") == 1


def test_an_upload_that_cannot_start_within_the_admission_wait_gets_503(tmp_path):
    runtime = build_runtime(settings_for(tmp_path, admission_wait_s=0.3))
    with TestClient(create_app(runtime)) as client:
        with runtime.uploads.worker:  # the classifier busy with another upload for now
            busy = client.post(
                "/v1/classify", content=phantom_png(), headers={"Content-Type": "image/png"}
            )
        assert busy.status_code == 503 and busy.headers["Retry-After"] == "1", busy.text
        assert "stayed busy" in busy.json()["detail"]
        assert runtime.uploads.outcomes["overloaded"] == 1
        assert runtime.uploads.admitted == 0 and runtime.uploads.pending == 0
        ok = client.post(
            "/v1/classify", content=phantom_png(), headers={"Content-Type": "image/png"}
        )
        assert ok.status_code == 200, ok.text


def test_one_upload_waits_for_the_worker_and_a_second_is_refused_at_once():
    from edgebc.serve.runtime import UploadQueue, UploadsBusy

    queue = UploadQueue(capacity=8, max_wait_s=30.0)
    release = threading.Event()
    results = []
    running = threading.Thread(target=lambda: results.append(queue.run(lambda: release.wait(10))))
    waiting = threading.Thread(target=lambda: results.append(queue.run(lambda: "second")))
    running.start()
    wait_until(lambda: queue.worker.locked() and queue.admitted == 1, what="the first to run")
    waiting.start()
    wait_until(lambda: queue.admitted == 2, what="the second to wait")
    with pytest.raises(UploadsBusy, match="already waiting"):
        queue.run(lambda: "third")
    release.set()
    running.join(5)
    waiting.join(5)
    assert results == [True, "second"] and queue.admitted == 0
    # the wait is bounded by twice the measured work, never more than max_wait_s
    assert 0 < queue.wait_bound() < 10.0
    assert UploadQueue(capacity=8, max_wait_s=0.5).wait_bound() == 0.5


def test_read_deadlines_and_the_admission_wait_are_validated(tmp_path):
    for key, value, words in [
        ("header_timeout_s", 0, "must be positive"),
        ("body_grace_s", 90, "at most body_timeout_s"),
        ("min_body_rate", 0, "min_body_rate >= 1"),
        ("admission_wait_s", -1, "admission_wait_s must be positive"),
    ]:
        with pytest.raises(ValueError, match=words):
            settings_for(tmp_path, **{key: value})


def test_a_mammography_model_reads_an_uploaded_dicom_at_full_depth_with_its_view(tmp_path):
    pytest.importorskip("pydicom")
    from edgebc.backends import open_backend
    from edgebc.classifier import FrameClassifier
    from edgebc.decode import decode_image, read_image_view
    from edgebc.synth.mammogram import draw_breast, make_mammogram
    from tests.helpers import demo_model_as
    from tests.test_dicom_full_depth import _mammo_dicom

    model = demo_model_as(tmp_path, "mg", "mg", breast_crop=True, laterality="left")
    rng = phantom_rng(7, 1)
    film = make_mammogram(draw_breast("benign", rng), rng, "R", "CC", 640, 512, 12).image
    data = _mammo_dicom(
        (film // 16 + 1000).astype(np.uint16), ImageLaterality="R", ViewPosition="CC"
    )
    runtime = build_runtime(settings_for(tmp_path, model=str(model), shift="off"))
    with TestClient(create_app(runtime)) as client:
        answer = client.post(
            "/v1/classify", content=data, headers={"Content-Type": "application/dicom"}
        )
        bmode = client.post(
            "/v1/classify", content=phantom_png(), headers={"Content-Type": "image/png"}
        )
    assert answer.status_code == 200, answer.text
    reference = FrameClassifier(open_backend(model)).classify(
        decode_image(data, full_depth=True), read_image_view(data)
    )
    assert reference.quality.ok and answer.json()["label"] == reference.label
    assert answer.json()["probabilities"] == pytest.approx(reference.probabilities, abs=1e-5)
    assert bmode.json()["label"] is None and "mammogram" in bmode.json()["reason"]
