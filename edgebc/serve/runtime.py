"""Everything one `edgebc serve` process holds: model, live pipeline and its sinks, upload queue.

Kept apart from the HTTP layer so that readiness, the status view and upload classification are
plain functions the tests can call, and so the web framework stays a thin shell. Built by
`build_runtime(settings)`, which also opens the local display's window when there is one (before
the server starts, so that a cart without a screen fails with one line); the HTTP app starts the
live loop on startup and stops it on shutdown (which releases the source, commits the audit trail
and closes the window).
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from edgebc.audit_chain import default_key_path
from edgebc.audit_journal import default_journal_path
from edgebc.audit_trail import AuditTrail, described_source, record_of
from edgebc.backends import Backend
from edgebc.calibration import bound_statement
from edgebc.classifier import Decision, FrameClassifier, rounded_ms
from edgebc.classifier_settings import build_classifier
from edgebc.config import to_mapping
from edgebc.decode import (
    SHARED_DECODE_BUDGET,
    ImageView,
    decode_image,
    read_image_view,
    read_study,
)
from edgebc.demo import DEMO_BANNER
from edgebc.errors import EdgebcError
from edgebc.fusion import (
    FusionClassifier,
    FusionDecision,
    Mammogram,
    another_patient,
    one_ultrasound_study,
    stated_view,
)
from edgebc.fusion_graphs import HEAD, read_layout
from edgebc.integrity import read_manifest
from edgebc.live import LiveReader
from edgebc.region import Region, detect_imaging_region
from edgebc.serve.case_context import Attachment, LiveFusion, used_context
from edgebc.serve.display import LocalDisplay
from edgebc.serve.live_loop import Display, LivePipeline, LiveResult
from edgebc.serve.settings import ServeSettings
from edgebc.serve.sinks import AuditSink, PageBroadcast
from edgebc.sources import FrameSource, open_source

log = logging.getLogger(__name__)

RESEARCH_BANNER = "Research use only — not a medical device. Not for diagnosis."


@dataclass(frozen=True)
class ModelCheck:
    verified: bool
    detail: str


def check_model_manifest(path: Path, sha256: str) -> ModelCheck:
    """Whether a MANIFEST.sha256 beside the model lists it, or the file the deployment plan ran in
    its place (the backend already refused a mismatch)."""
    manifest = path.parent / "MANIFEST.sha256"
    if not manifest.exists():
        return ModelCheck(False, f"no MANIFEST.sha256 beside {path.name}")
    entries = read_manifest(path.parent)
    expected = entries.get(path.name)
    if expected is None:
        return ModelCheck(False, f"{manifest} does not list {path.name}")
    planned = next((name for name, digest in entries.items() if digest == sha256), None)
    if expected != sha256 and planned is not None:
        return ModelCheck(
            True, f"sha256 matches {manifest.name} ({planned}, the deployment plan's)"
        )
    return ModelCheck(expected == sha256, f"sha256 matches {manifest.name}")


WORKER_QUEUE = 2  # the running upload and one waiting for it: a third would wait two uploads' time


class UploadsBusy(EdgebcError):
    """An upload that could not start within its wait bound: 503 with Retry-After, not a backlog."""


class UploadQueue:
    """Admission for POST /v1/classify: a slot or an immediate refusal, and a bounded wait.

    At most `capacity` uploads are in the server at once (their bodies are what it bounds). The
    work (decode, classify) runs one upload at a time beside the live loop; one more may wait for
    it, for at most half the measured time an upload takes (never longer than `max_wait_s`), so an
    accepted upload takes at most about 1.5 times one upload's time (its wait, then its own work)
    and the rest are refused at once: the accepted p99 stays within 2x the unloaded one."""

    def __init__(self, capacity: int, max_wait_s: float) -> None:
        self.capacity = capacity
        self.max_wait_s = max_wait_s
        self._pending = 0
        self._admitted = 0  # running or waiting for the worker
        self._service_s: float | None = None  # smoothed duration of one upload's work
        self._lock = threading.Lock()
        self.worker = threading.Lock()  # one upload's work at a time beside the live loop
        self.outcomes: dict[str, int] = {}

    def try_enter(self) -> bool:
        with self._lock:
            if self._pending >= self.capacity:
                return False
            self._pending += 1
            return True

    def leave(self) -> None:
        with self._lock:
            self._pending -= 1

    @property
    def pending(self) -> int:
        with self._lock:
            return self._pending

    @property
    def admitted(self) -> int:
        """Uploads running on the worker or waiting for it."""
        with self._lock:
            return self._admitted

    @property
    def saturated(self) -> bool:
        """Whether an upload arriving now would be refused by `run` (checked before its body is
        read, so that under overload a refusal costs the cart almost nothing)."""
        with self._lock:
            return self._admitted >= WORKER_QUEUE

    def count(self, outcome: str) -> None:
        with self._lock:
            self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1

    def wait_bound(self) -> float:
        """How long an upload may wait for the worker: half the typical upload's work (until one
        is measured, max_wait_s), at most max_wait_s."""
        with self._lock:
            typical = self.max_wait_s if self._service_s is None else 0.5 * self._service_s
        return min(self.max_wait_s, typical)

    def run(self, work: Callable[[], Any]) -> Any:
        """`work()` on the worker, or UploadsBusy when another upload already waits for it or the
        worker does not come free within the wait bound."""
        with self._lock:
            if self._admitted >= WORKER_QUEUE:
                raise UploadsBusy("an upload is already waiting for the classifier; retry shortly")
            self._admitted += 1
        try:
            if not self.worker.acquire(timeout=self.wait_bound()):
                raise UploadsBusy("the classifier stayed busy with other uploads; retry shortly")
            started = time.monotonic()
            try:
                return work()
            finally:
                self._measured(time.monotonic() - started)
                self.worker.release()
        finally:
            with self._lock:
                self._admitted -= 1

    def _measured(self, seconds: float) -> None:
        with self._lock:  # an exponential average: follows the model and the load, forgets spikes
            previous = self._service_s
            self._service_s = seconds if previous is None else 0.8 * previous + 0.2 * seconds


@dataclass
class ServeRuntime:
    settings: ServeSettings
    backend: Backend
    model_path: Path
    model_check: ModelCheck
    pipeline: LivePipeline
    audit: AuditTrail
    broadcast: PageBroadcast
    token: str | None
    uploads: UploadQueue
    display: LocalDisplay | None = None  # the cart's own screen, when display.enabled
    fusion: LiveFusion | None = None  # a fusion model's live classifier, holding the case
    started: float = field(default_factory=time.time)
    _jpeg: tuple[int, bytes] | None = None
    _jpeg_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def demo(self) -> bool:
        """The embedded demo model, or a copy of it: its card says so."""
        return self.settings.demo or self.pipeline.classifier.demo

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        """Run the live loop (the local display, if any, is already open: build_runtime)."""
        self.pipeline.start()

    def stop(self) -> None:
        """Release the source, commit the audit trail, close the display (the pipeline does all)."""
        self.pipeline.stop()
        if self.fusion is not None:
            self.fusion.close()  # every graph, the head (`backend`) among them
        else:
            self.backend.close()

    def status_line(self) -> str:
        """One line for `systemctl status edgebc`: feed, rate and counts, and what is not ready."""
        summary = self.pipeline.summary()
        failing = [name for name, check in self.readiness().items() if not check["ok"]]
        return (f"{self.pipeline.feed().status} feed, {summary['fps']:.1f} fps, "
                f"{summary['counts']['frames']} frames, {summary['counts']['no_decision']} no decision"
                + (f"; not ready: {', '.join(failing)}" if failing else ""))  # fmt: skip

    # -- readiness -------------------------------------------------------------------------------
    def out_of_distribution(self) -> bool:
        """Whether the newest result's frame or stream is out of the training distribution (the
        one fact /readyz gives about it, without details)."""
        result = self.pipeline.latest()
        return bool(result is not None and result.decision.shift and result.decision.shift.flagged)

    def shift_view(self) -> dict[str, Any]:
        """The shift check's state for /v1/status and the page: on or off (and why), and the
        newest frame's verdict."""
        classifier = self.pipeline.classifier
        result = self.pipeline.latest()
        shift = None if result is None else result.decision.shift
        return {"check": classifier.shift_note, "mode": classifier.shift_mode,
                "out_of_distribution": self.out_of_distribution(),
                "latest": None if shift is None else shift.to_json()}  # fmt: skip

    def readiness(self) -> dict[str, dict[str, Any]]:
        feed = self.pipeline.feed()
        trail = self.audit.status()
        model_ok = self.model_check.verified or not self.settings.require_verified_model
        checks = {
            "model": {"ok": model_ok, "detail": self.model_check.detail},
            "source": {
                "ok": feed.ok and self.pipeline.alive,
                "detail": feed.status + (f": {feed.detail}" if feed.detail else ""),
            },
            "audit_log": {
                "ok": trail.healthy,
                "detail": trail.problem or f"writable ({self.audit.path})",
            },
        }
        if self.display is not None:  # a cart that relies on its own screen is not ready without it
            showing, detail = self.display.health()
            checks["display"] = {"ok": showing, "detail": detail}
        return checks

    # -- the screen's view -----------------------------------------------------------------------
    def model_info(self) -> dict[str, Any]:
        card = self.backend.card
        threshold = self.pipeline.classifier.threshold
        point = card.operating_point
        return {
            "name": card.name,
            "arch": card.arch,
            "sha256": self.backend.model_sha256,
            "path": str(self.model_path),
            "backend": self.backend.name,
            # what runs, which may be below the file's (OpenVINO BF16 of an FP32 file, by the plan)
            "precision": getattr(self.backend, "precision", None) or card.precision,
            "class_names": list(card.class_names),
            "positive_class": card.positive_class,
            "threshold": threshold,
            "card_threshold": card.threshold,
            "temperature": card.temperature,
            # the bound beside the decision: only while the cart decides at the card's threshold
            "sensitivity_bound": bound_statement(card, threshold),
            "rule": self.pipeline.classifier.rule.describe(
                point.target_sensitivity
                if point is not None and threshold == point.threshold
                else None
            ),
            "operating_point": None if point is None else to_mapping(point),
            "site_calibration": card.lineage.get("site_calibration"),
            "verified": self.model_check.verified,
            "verification": self.model_check.detail,
            "demo": self.demo,
        }

    def view(self) -> dict[str, Any]:
        """The state the cart's page and GET /v1/status show."""
        return self._view(self.pipeline.display())

    def screen(self) -> tuple[dict[str, Any], np.ndarray | None]:
        """The view and the frame it describes, both from one result: what the local display
        draws (frame, region outline and decision can never come from two different frames)."""
        display = self.pipeline.display()
        return self._view(display), None if display.result is None else display.result.frame.image

    def _view(self, display: Display) -> dict[str, Any]:
        feed = self.pipeline.feed()
        result = display.result
        trail = self.audit.status()
        region = self.pipeline.classifier.region if result is None else result.region
        frame: dict[str, Any] | None = None
        per_frame: dict[str, Any] | None = None
        if result is not None:
            per_frame = result.to_json()
            handoff = rounded_ms(self.pipeline.handoff_ms(result.sequence))
            per_frame["timings_ms"] = {**per_frame["timings_ms"], **handoff}
            age = (time.monotonic() - result.frame.captured_monotonic) * 1000.0
            frame = {**per_frame.pop("frame"), "age_ms": round(age, 1)}
            frame["source"] = described_source(frame["source"], self.settings.audit.source_names)
        banners = [RESEARCH_BANNER] + ([DEMO_BANNER] if self.demo else [])
        info = self.model_info()  # once per view: the page asks for a view with every frame
        model = {k: info[k] for k in ("name", "sha256", "precision", "threshold", "positive_class",
                                      "sensitivity_bound", "rule")}  # fmt: skip
        return {
            "banners": banners,
            "demo": self.demo,
            "display": {
                "label": display.label,
                "probabilities": display.probabilities,
                "reason": None if display.reason is None else f"no decision: {display.reason}",
                "warning": None if display.warning is None else f"unreliable: {display.warning}",
            },
            "shift": self.shift_view(),
            "per_frame": per_frame,
            "frame": frame,
            "region": None if region is None else asdict(region),
            "region_note": self.pipeline.region_note,
            "feed": {
                "source": described_source(self.settings.source, self.settings.audit.source_names),
                **asdict(feed),
                "ok": feed.ok,
            },
            "audit": asdict(trail),
            **self.pipeline.summary(),
            "model": model,
            "case": None if self.fusion is None else self.fusion.view(),
            "fusion": self.fusion is not None,
        }

    def frame_jpeg(self, result: LiveResult) -> bytes:
        """The result's frame as JPEG, scaled to the stream width; encoded once however many watch."""
        with self._jpeg_lock:
            if self._jpeg is not None and self._jpeg[0] == result.sequence:
                return self._jpeg[1]
            image = result.frame.image
            if image.dtype != np.uint8:
                image = (image >> 8).astype(np.uint8)
            h, w = image.shape[:2]
            if w > self.settings.stream_width:
                scale = self.settings.stream_width / w
                image = cv2.resize(
                    image,
                    (self.settings.stream_width, max(1, round(h * scale))),
                    interpolation=cv2.INTER_AREA,
                )
            ok, encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 80])
            if not ok:
                raise EdgebcError("could not encode the frame as JPEG")
            self._jpeg = (result.sequence, encoded.tobytes())
            return self._jpeg[1]

    # -- uploads ---------------------------------------------------------------------------------
    def classify_upload(self, data: bytes, region: str | None) -> dict[str, Any]:
        """Decode, crop (none, `auto`, or X,Y,W,H), classify and audit one uploaded image.

        Raises ImageDecodeError / ValueError with a message for the client (422), DecodeBusyError
        when the process's shared decode budget stays full and UploadsBusy when the upload cannot
        start within its wait bound (503). Decoding runs on the upload worker too: one upload's
        CPU work at a time, beside the live loop."""

        def work() -> tuple[np.ndarray, Region | None, Decision, dict[str, Any] | None]:
            if self.fusion is not None:  # an upload is not the live patient: ultrasound alone
                image = decode_image(data, "upload", max_pixels=40_000_000,
                                     max_decoded_bytes=self.settings.max_decoded_bytes,
                                     wait_s=self.settings.decode_wait_s)  # fmt: skip
                if region not in (None, "", "none"):
                    raise ValueError("region is not done for fusion models yet; give none")
                decided = self.fusion.fusion.fresh().classify(image)
                return image, None, decided.decision, used_context(decided, None)
            # a mammography model gets a grey DICOM at its full depth, and the header's view
            mammogram = self.backend.card.inputs[0].modality == "mg"
            image = decode_image(data, "upload", max_pixels=40_000_000,
                                 max_decoded_bytes=self.settings.max_decoded_bytes,
                                 wait_s=self.settings.decode_wait_s, full_depth=mammogram)  # fmt: skip
            view = read_image_view(data, "upload") if mammogram else None
            crop = _upload_region(image, region)
            live = self.pipeline.classifier
            if not isinstance(live, FrameClassifier):
                raise EdgebcError("a fusion model's uploads are classified above")
            # one upload is one frame: its own verdict, a window of one the live stream never sees
            classifier = FrameClassifier(self.backend, crop, live.gate, live.threshold, live.shift_mode, 1,
                                         localiser=live.localiser, margin=live.margin)  # fmt: skip
            return image, crop, classifier.classify(image, view), None

        image, crop, decision, context = self.uploads.run(work)
        fields = decision.to_json()
        digest = hashlib.sha256(data).hexdigest()
        source = "upload"
        if context is not None:  # a fusion model's: what it used (ultrasound alone), as live
            source = json.dumps({"frame": source, **context}, separators=(",", ":"))
        self.audit.record(
            record_of(
                decision,
                captured_at=time.time(),
                source=source,
                frame_sha256=digest,
                latencies_ms=decision.timings_ms,
                pixels=image if self.audit.store_pixels else None,
            )
        )
        height, width = image.shape[:2]
        cropped = None if crop is None else asdict(crop)
        return {**fields, "input_sha256": digest, "width": width, "height": height,
                "region": cropped}  # fmt: skip

    def attach_case(self, case: str, uploads: Sequence[tuple[bytes, str | None]]) -> dict[str, Any]:
        """Decode a case's uploaded mammograms (DICOM at full depth with its header's view, or
        PNG/JPEG with a stated view) and attach them to the live stream, on the upload worker.
        Raises ImageDecodeError / ValueError (422), busy errors (503)."""
        fusion = self.fusion
        if fusion is None:
            raise EdgebcError(
                f"model {self.backend.card.name} is not a mammogram + ultrasound fusion model: "
                "it takes no mammograms"
            )

        def work() -> dict[str, Any]:
            mammograms = [
                self._mammogram(k, data, stated) for k, (data, stated) in enumerate(uploads)
            ]
            return fusion.attach(case, mammograms).to_json()

        answer: dict[str, Any] = self.uploads.run(work)
        return answer

    def classify_case(self, case: str, ultrasound: Sequence[bytes],
                      mammograms: Sequence[tuple[bytes, str | None]]) -> dict[str, Any]:  # fmt: skip
        """One uploaded case of a fusion model, on the upload worker: its mammograms embedded
        (apart from the live stream's attachment, which it never touches), each ultrasound image
        fused with them, and the case decided from its images; a record per image and one for
        the case, each with the mammograms' hashes. Errors as `attach_case`'s; mammograms of
        several studies or patients, DICOM ultrasound of another patient than theirs, or of
        several ultrasound studies, are 422 naming the files (the patient's hash is compared,
        never answered or recorded). The ultrasound's study is the case's, not the films'."""
        fusion = self.fusion
        if fusion is None:
            raise EdgebcError(f"model {self.backend.card.name} is not a fusion model")

        def work() -> tuple[list[FusionDecision], FusionDecision, Attachment]:
            images = [decode_image(data, f"ultrasound {k + 1}", max_pixels=40_000_000,
                                   max_decoded_bytes=self.settings.max_decoded_bytes,
                                   wait_s=self.settings.decode_wait_s)
                      for k, data in enumerate(ultrasound)]  # fmt: skip
            given = [
                self._mammogram(k, data, stated) for k, (data, stated) in enumerate(mammograms)
            ]
            scratch = fusion.fusion.fresh()
            context = scratch.attach(case, given)
            named = [(f"ultrasound {k + 1}", read_study(data, f"ultrasound {k + 1}"))
                     for k, data in enumerate(ultrasound)]  # fmt: skip
            others = [name for name, study in named
                      if another_patient(context.patient_sha256, study)]  # fmt: skip
            if others:
                raise ValueError(
                    f"{', '.join(others)}: DICOM of another patient (PatientID) than the case's "
                    "mammograms; never fused"
                )
            study = one_ultrasound_study(named)
            decisions = scratch.classify_batch(images)
            attachment = Attachment(case, context, time.time(), time.monotonic(), study)
            return decisions, scratch.case_decision(decisions), attachment

        decisions, decided, attachment = self.uploads.run(work)
        digests = [hashlib.sha256(data).hexdigest() for data in ultrasound]
        rows = [(d, {"frame": "case upload", "input_sha256": h, **used_context(d, attachment)})
                for d, h in zip(decisions, digests, strict=True)]  # fmt: skip
        rows.append((decided, {"frame": None, "case decision": True, **used_context(decided, attachment)}))  # fmt: skip
        for fused_decision, facts in rows:
            self.audit.record(record_of(fused_decision.decision, captured_at=time.time(),
                                        source=json.dumps(facts, separators=(",", ":")),
                                        frame_sha256=facts.get("input_sha256"),
                                        latencies_ms=fused_decision.decision.timings_ms))  # fmt: skip

        def answer(d: FusionDecision) -> dict[str, Any]:
            return {**d.decision.to_json(), "inputs_used": list(d.inputs), "modalities": list(d.modalities)}  # fmt: skip

        return {"case": case, "decision": answer(decided),
                "images": [{**answer(d), "input_sha256": h} for d, h in zip(decisions, digests, strict=True)],
                "mammograms": attachment.mammograms()}  # fmt: skip

    def _mammogram(self, k: int, data: bytes, stated: str | None) -> Mammogram:
        """One uploaded mammogram: its pixels at full depth, its view from its DICOM header, or
        the stated one where the header says none (a stated view the header contradicts: 422),
        and its DICOM study and patient, hashed."""
        name = f"mammogram {k + 1}"
        image = decode_image(data, name, max_pixels=40_000_000,
                             max_decoded_bytes=self.settings.max_decoded_bytes,
                             wait_s=self.settings.decode_wait_s, full_depth=True)  # fmt: skip
        header = read_image_view(data, name)
        view = stated_view(ImageView.from_code(stated), header, name) if stated else header
        return Mammogram(image, view, name, header, read_study(data, name))


def _upload_region(image: np.ndarray, region: str | None) -> Region | None:
    if region in (None, "", "none"):
        return None
    if region == "auto":
        found = detect_imaging_region(image)
        if found is None:
            raise ValueError("region=auto: no imaging region found in the image; give X,Y,W,H")
        return found
    try:
        crop = Region(*(int(v) for v in str(region).split(",")))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"region must be none, auto or X,Y,W,H in pixels, got {region!r}") from exc
    if not crop.fits(*image.shape[:2]):
        raise ValueError(
            f"region {region} does not fit in the {image.shape[1]}x{image.shape[0]} image"
        )
    return crop


def build_runtime(
    settings: ServeSettings, source_factory: Callable[[], FrameSource] | None = None
) -> ServeRuntime:
    """Load and check everything before the server listens: a bad model, source URI, region, log
    location or local display fails here with one clear line, not on the first request."""
    token = settings.read_token()
    display = LocalDisplay(settings.display) if settings.display.enabled else None
    fused = _open_fusion(settings)
    classifier: FrameClassifier | None = None
    if fused is None:
        classifier = build_classifier(settings)
        backend = classifier.backend
    else:
        backend = _graph_of(fused, settings.model_path)
    check = check_model_manifest(settings.model_path, backend.model_sha256)
    if fused is not None:  # every graph of the export verified, or the model is not
        checks = [check_model_manifest(settings.model_path.parent / f, fused.graphs[g].model_sha256)
                  for g, f in fused.layout.files.items()]  # fmt: skip
        check = ModelCheck(
            all(c.verified for c in checks), "; ".join(dict.fromkeys(c.detail for c in checks))
        )
    if source_factory is None:
        # a mammography model reads DICOM files at the full depth it was trained on
        full_depth = fused is None and backend.card.inputs[0].modality == "mg"
        open_source(settings.source, full_depth)  # validate the URI now (raises with the kinds)
        uri = settings.source
        source_factory = lambda: open_source(uri, full_depth)  # noqa: E731 - fresh per reopening
    reader = LiveReader(
        source_factory,
        stall_seconds=settings.watchdog.stall_seconds,
        freeze_seconds=settings.watchdog.freeze_seconds,
        hang_seconds=settings.watchdog.hang_seconds,
    )
    SHARED_DECODE_BUDGET.set_capacity(settings.decode_budget_bytes)  # uploads, sources, alike
    try:
        key_path = Path(settings.audit.key_path or default_key_path()).expanduser()
        anchor_path = settings.audit.anchor_path or key_path.with_name("audit.anchors")
        audit = AuditTrail(
            settings.audit.path,
            store_pixels=settings.audit.store_pixels,
            store_patient_ids=settings.audit.store_patient_ids,
            max_bytes=settings.audit.max_bytes,
            key_path=key_path,
            anchor_path=anchor_path,
            anchor_interval=settings.audit.anchor_interval,
            journal_path=settings.audit.fallback_path
            or default_journal_path(key_path, settings.audit.path),
            max_held=settings.audit.max_held,
            rotate_bytes=settings.audit.rotate_bytes,
            rotate_interval_s=settings.audit.rotate_interval_s,
            keep_days=settings.audit.keep_days,
            keep_bytes=settings.audit.keep_bytes,
            max_unarchived_bytes=settings.audit.max_unarchived_bytes,
        )
    except Exception as exc:
        (fused or backend).close()
        raise EdgebcError(f"audit log {settings.audit.path}: cannot open it: {exc}") from exc
    live = None if fused is None else LiveFusion(fused, settings.case.idle_detach_s, audit.record)
    looped: FrameClassifier | LiveFusion = live if live is not None else classifier  # type: ignore[assignment]
    # The audit trail first: a decision reaches the screens only once it is logged (queued, or
    # counted as lost by the trail's own rules); the statistics come last, inside the pipeline.
    broadcast = PageBroadcast()
    pipeline = LivePipeline(looped, reader, [broadcast, *([display] if display else [])],
                            settings.smoothing, settings.auto_region, settings.max_result_age,
                            audit=AuditSink(audit, settings.audit.source_names, settings.audit.record,
                                            settings.audit.sample_interval_s))  # fmt: skip
    runtime = ServeRuntime(settings, backend, settings.model_path, check, pipeline, audit,
                           broadcast, token, UploadQueue(settings.max_pending_uploads, settings.admission_wait_s), display, live)  # fmt: skip
    if display is not None:
        try:  # before the server starts: no screen is one clear line, not a failed start-up
            display.start(runtime.screen)
        except BaseException:
            display.close()
            audit.close()
            (fused or backend).close()
            raise
    log.info(
        "model %s (%s, sha256 %s…, %s); source %s; audit log %s",
        backend.card.name,
        backend.name,
        backend.model_sha256[:12],
        check.detail,
        settings.source,
        settings.audit.path,
    )
    return runtime


def _open_fusion(settings: ServeSettings) -> FusionClassifier | None:
    """A fusion model's graphs with the gates and threshold around them; None for other models."""
    try:
        layout = None if settings.demo else read_layout(settings.model_path)
    except Exception:  # not a loadable ONNX file: opening it as a model says what is wrong
        layout = None
    if layout is None:
        return None
    if settings.region is not None or settings.auto_region:
        raise ValueError("region and auto_region are not done for fusion models yet")
    if settings.localiser is not None:
        raise ValueError("a lesion localiser is not done for fusion models yet; give none")
    return FusionClassifier.open(settings.model_path, settings.quality,
                                 settings.mammography_quality, settings.threshold,
                                 settings.providers, settings.threads, settings.spin_wait)  # fmt: skip


def _graph_of(fused: FusionClassifier, path: Path) -> Backend:
    """The graph of the export that `path` names (the one whose manifest line is checked)."""
    for graph, file in fused.layout.files.items():
        if file == path.name:
            return fused.graphs[graph]
    return fused.graphs[HEAD]
