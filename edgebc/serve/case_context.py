"""The live cart's case context: a patient's mammograms attached to the ultrasound stream of a
fusion model, and detached when her case ends, every change an audit record.

Attaching a mammogram to a live scan binds it to a patient, so an attachment names its case (an
operator-entered case id) and ends with it: the operator detaches, another case is attached, or
no ultrasound frame passes the quality gate for `idle_detach_s` (the probe is down or in the
air, the next patient is being prepared). Where the live frames are DICOM (a DICOM file or
folder source), each carries its study and patient, hashed. In an archive a woman's mammograms
and her ultrasound are separate studies, so the woman is her PatientID: a frame of another
patient than the films' ends the case (an "another patient" detach), and the case is bound to
the ultrasound study of the first frame fused with it (never the films' study): the first frame
of another ultrasound study ends it too (a "new study" detach). Either frame is answered from
ultrasound alone. The patient's hash is compared here and never recorded. Frames that are not
DICOM keep to the rules above.
The idle check runs before each frame is fused, so a frame after a gap is never fused with the
previous case's mammograms even when no tick has expired it yet. Frames and attach/detach are
serialised by one lock: a frame is fused with one context and recorded with that same context.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from edgebc.audit_trail import AuditRecord
from edgebc.decode import DicomStudy, ImageView
from edgebc.fusion import (
    FusionClassifier,
    FusionDecision,
    Mammogram,
    MammogramContext,
    another_patient,
)
from edgebc.fusion_graphs import HEAD

log = logging.getLogger(__name__)

CASE_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"  # an id, not a name: no spaces, no commas


@dataclass(frozen=True)
class Attachment:
    """What is attached now: the case, its mammograms' facts (never pixels), when, and the
    ultrasound DICOM study it is bound to (hashed; its first fused frame's; None: none yet)."""

    case: str
    context: MammogramContext
    attached_at: float  # wall clock
    attached_monotonic: float
    study_sha256: str | None = None  # the ultrasound study: a mammography study is another one
    # the woman: the films' PatientID hash, else the first fused DICOM frame's; compared in
    # memory, never recorded or shown (a short id's hash is easily reversed)
    patient_sha256: str | None = field(default=None, repr=False)

    @property
    def views(self) -> tuple[str | None, ...]:
        """The views the model read the films it used as."""
        return self.context.views

    def mammograms(self) -> list[dict[str, Any]]:
        return [use.to_json() for use in self.context.mammograms]

    def to_json(self) -> dict[str, Any]:
        return {"case": self.case, "inputs": list(self.context.inputs),
                "views": list(self.views), "mammograms": self.mammograms(),
                "study_sha256": self.study_sha256, "study": self.study_note(),
                "attached_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.attached_at))}  # fmt: skip

    def study_note(self) -> str:
        """The films' study and patient check as known (MammogramContext.study_note), and the
        ultrasound study the attachment is bound to."""
        note = self.context.study_note()
        if self.study_sha256 is None:
            return f"{note}; bound to the first ultrasound frame's DICOM study, where frames carry one"  # fmt: skip
        return f"{note}; bound to the ultrasound DICOM study {self.study_sha256}"


def used_context(decided: FusionDecision, attachment: Attachment | None) -> dict[str, Any]:
    """What one fused frame rested on, for its audit record and the page: the case, the inputs and
    modalities used, and the hashes and views of the mammograms it used (none when US-only)."""
    used = set(decided.inputs)
    mammograms = [] if attachment is None else [
        {"input": m["input"], "view": m["view"], "pixels_sha256": m["pixels_sha256"]}
        for m in attachment.mammograms() if m["input"] in used
    ]  # fmt: skip
    return {"case": decided.case, "inputs_used": list(decided.inputs),
            "modalities": list(decided.modalities), "mammograms": mammograms}  # fmt: skip


class LiveFusion:
    """A fusion model as the live loop's classifier: each frame fused with the attached case's
    mammograms (ultrasound alone when none is attached); `attach`, `detach` and the idle check
    change the case, each recorded through `record` (the audit trail's)."""

    region = None  # the imaging region is not done for fusion models yet: the whole frame
    shift_mode = "off"
    shift_note = "off (it covers one-input models; a fused decision is not checked)"

    def __init__(
        self,
        fusion: FusionClassifier,
        idle_detach_s: float,
        record: Callable[[AuditRecord], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.fusion = fusion
        self.idle_detach_s = idle_detach_s
        self.record = record
        self.clock = clock
        self.backend = fusion.graphs[HEAD]
        self.card, self.rule, self.threshold = fusion.card, fusion.rule, fusion.threshold
        self.gate, self.demo = fusion.gate, fusion.demo
        self._attachment: Attachment | None = None
        self._last_frame = 0.0
        self._lock = threading.Lock()
        fusion.detach()

    # -- frames ----------------------------------------------------------------------------------
    def classify(
        self,
        image: np.ndarray,
        view: ImageView | None = None,
        captured_monotonic: float | None = None,
        study: DicomStudy | None = None,
    ) -> tuple[FusionDecision, dict[str, Any]]:
        """One frame fused with the attachment in force (after the idle, patient and study
        checks), and what it used. A frame captured (`captured_monotonic`, on this object's clock)
        before that attachment was made is answered from ultrasound alone: it may be the previous
        patient's. A DICOM frame (`study`: its study and patient, hashed) of another patient than
        the films', or of another ultrasound study than the attachment's, ends the case and is
        answered from ultrasound alone; an attachment with no study yet is bound to the frame's."""
        with self._lock:
            now = self.clock()
            self._expire(now)
            attachment = self._attachment
            before = (attachment is not None and captured_monotonic is not None
                      and captured_monotonic < attachment.attached_monotonic)  # fmt: skip
            if attachment is not None and study is not None and not before:
                attachment = self._check_frame(attachment, study)
            if before:
                kept, self.fusion.context = self.fusion.context, None
                try:
                    decided = self.fusion.classify(image)
                finally:
                    self.fusion.context = kept
                attachment = None
            else:
                decided = self.fusion.classify(image)
            if decided.decision.quality.ok:  # scanning: a probe in the air between patients is not
                self._last_frame = now
            return decided, used_context(decided, attachment)

    def _check_frame(self, attachment: Attachment, study: DicomStudy) -> Attachment | None:
        """The attachment a DICOM frame of `study` may be fused with: None (detached, recorded)
        when the frame is of another patient than the films' ("another patient"; the hashes are
        compared, never written) or of another ultrasound study than the one the attachment is
        bound to ("new study"); else the attachment, bound to the frame's study if it had none."""
        patient = attachment.patient_sha256 or attachment.context.patient_sha256
        if another_patient(patient, study):
            self._detach("another patient: a DICOM ultrasound frame whose PatientID is not the "
                         "case's; never fused", strict=False)  # fmt: skip
            return None
        frame = study.study_sha256
        binds_study = frame is not None and attachment.study_sha256 is None
        binds_patient = patient is None and study.patient_sha256 is not None
        if binds_study or binds_patient:
            # films that name no patient (a PNG) take the woman from the first fused DICOM
            # frame: a later frame of another PatientID, with or without a study, is not hers
            bound = replace(attachment, study_sha256=frame if binds_study else attachment.study_sha256,
                            patient_sha256=study.patient_sha256 if binds_patient else attachment.patient_sha256)  # fmt: skip
            self._attachment = bound
            log.info("case %s bound to the live ultrasound's DICOM study/patient", attachment.case)
            self._write("bind", bound, "the first DICOM ultrasound frame fused with the case",
                        strict=False)  # fmt: skip
            return bound
        if frame is None or attachment.study_sha256 == frame:
            return attachment
        self._detach(f"new study: an ultrasound frame of DICOM study {frame}, the case's is "
                     f"{attachment.study_sha256}", strict=False)  # fmt: skip
        return None

    def reset_stream(self) -> None:
        """A gap in the feed: the idle time, not the gap, ends the case."""

    def expire_if_idle(self) -> None:
        """Called by the live loop while no frame arrives."""
        with self._lock:
            self._expire(self.clock())

    def _expire(self, now: float) -> None:
        attachment = self._attachment
        if attachment is None:
            return
        since = max(self._last_frame, attachment.attached_monotonic)
        if now - since >= self.idle_detach_s:
            self._detach(f"idle: no ultrasound frame for {self.idle_detach_s:g} s", strict=False)

    # -- the case --------------------------------------------------------------------------------
    def attach(self, case: str, mammograms: Sequence[Mammogram]) -> Attachment:
        """Embed the case's mammograms (beside the live loop, which keeps running), then, in one
        step, end the attached case (a detach record) and attach this one (an attach record).
        When the trail cannot take a record the error propagates: a new attach leaves no case
        attached, so no frame is fused without its record."""
        context = self.fusion.fresh().attach(case, mammograms)
        with self._lock:
            if self._attachment is not None:
                self._detach(f"new attach (case {case})", strict=True)
            now = self.clock()
            attachment = Attachment(case, context, time.time(), now)
            self._write("attach", attachment, None, strict=True)
            self.fusion.context = context
            self._attachment = attachment
        log.info("case %s attached: inputs %s", case, ", ".join(context.inputs) or "none")
        return attachment

    def detach(self, reason: str = "operator") -> str | None:
        """End the attached case (the operator's action); the case detached, or None."""
        with self._lock:
            return self._detach(reason, strict=True)

    def attachment(self) -> Attachment | None:
        with self._lock:
            self._expire(self.clock())
            return self._attachment

    def view(self) -> dict[str, Any] | None:
        """The attachment for the page and /v1/status, with the idle time left."""
        with self._lock:
            self._expire(self.clock())
            attachment = self._attachment
            if attachment is None:
                return None
            since = max(self._last_frame, attachment.attached_monotonic)
            left = max(0.0, self.idle_detach_s - (self.clock() - since))
        return {**attachment.to_json(), "idle_detach_in_s": round(left, 1)}

    def _detach(self, reason: str, strict: bool) -> str | None:
        """Detach first, then record (a failed record never keeps a case attached); `strict`
        raises the record's failure, else it is logged (the loop's idle detach)."""
        attachment = self._attachment
        if attachment is None:
            return None
        self.fusion.detach()
        self._attachment = None
        log.info("case %s detached: %s", attachment.case, reason)
        self._write("detach", attachment, reason, strict)
        return attachment.case

    def _write(self, event: str, attachment: Attachment, reason: str | None, strict: bool) -> None:
        """An attach, bind or detach record; with `strict` a failure raises, else it is logged
        (a bind or an idle detach happen inside the loop's frame, which must go on)."""
        if self.record is None:
            return
        if not strict:
            try:
                self._write(event, attachment, reason, strict=True)
            except Exception:
                log.exception("case %s: the %s could not be recorded", attachment.case, event)
            return
        details = {"event": event, "case": attachment.case, "reason": reason,
                   "study_sha256": attachment.study_sha256, "study": attachment.study_note(),
                   "mammograms": [{k: m[k] for k in ("input", "view", "header_view", "pixels_sha256",
                                                     "study_sha256", "quality", "reason")}
                                  for m in attachment.mammograms()]}  # fmt: skip
        self.record(case_event_record(self.backend.model_sha256, details))

    def close(self) -> None:
        self.fusion.close()


def case_event_record(model_sha256: str, details: dict[str, Any]) -> AuditRecord:
    """An attach or detach as an audit record: no frame and no decision; the event's facts (case,
    the mammograms' views and pixel hashes, why) in the source column, as JSON."""
    import json

    return AuditRecord(
        model_sha256=model_sha256,
        quality=f"no decision: case {details['event']} (not a frame)",
        captured_at=time.time(),
        source=json.dumps(details, separators=(",", ":")),
    )
