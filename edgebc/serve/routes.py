"""The HTTP routes of `edgebc serve` and the schemas that document them, as module-level routers.

`create_app` (edgebc/serve/app.py) puts the `ServeRuntime` on `app.state.runtime` and includes
`pages` (the cart's page and the probes: open), `api` (behind the bearer token when one is set)
and `live` (the WebSocket, which checks the token in its first message).
"""

import asyncio
import base64
import binascii
import contextlib
import hmac
import json
import time
from importlib import resources
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request, WebSocket
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.websockets import WebSocketDisconnect

from edgebc.decode import DecodeBusyError, sniff_format
from edgebc.errors import ImageDecodeError
from edgebc.serve.case_context import CASE_PATTERN, LiveFusion
from edgebc.serve.prometheus import metrics_text
from edgebc.serve.runtime import ServeRuntime, UploadsBusy

DECLARED_FORMAT = {"image/png": "png", "image/jpeg": "jpeg", "image/x-portable-graymap": "pgm",
                   "application/dicom": "dicom"}  # fmt: skip
UPLOAD_TYPES = (*DECLARED_FORMAT, "application/octet-stream")  # octet-stream: the bytes tell


class Problem(BaseModel):
    detail: str


class ClassifyResult(BaseModel):
    """POST /v1/classify's answer: `Decision.to_json()` and the upload's own facts (a test holds
    these fields to the keys `ServeRuntime.classify_upload` returns)."""

    label: str | None
    probabilities: dict[str, float] | None
    positive_probability: float | None
    threshold: float | None
    quality: str
    reason: str | None
    model_sha256: str
    timings_ms: dict[str, float]
    shift: dict[str, Any] | None
    demo: bool  # the demo model (synthetic phantoms only) answered
    box: dict[str, float] | None  # the lesion localiser's box (x, y, w, h, score), when one runs
    localiser_sha256: str | None  # the lesion localiser's model, when one runs
    runtime: str | None = None  # the runtime and precision that ran the model
    input_sha256: str
    width: int
    height: int
    region: dict[str, int] | None


class Check(BaseModel):
    ok: bool
    detail: str | None = None  # behind the token when one is configured


class Readiness(BaseModel):
    ready: bool
    checks: dict[str, Check]
    out_of_distribution: bool  # the newest frame or stream; the details are behind the token


def runtime_of(request: Request) -> ServeRuntime:
    runtime: ServeRuntime = request.app.state.runtime
    return runtime


Runtime = Annotated[ServeRuntime, Depends(runtime_of)]


TOKEN_REQUIRED = "a bearer token is required: Authorization: Bearer <token>"


def token_given(request: Request, token: str | None) -> bool:
    """Whether the request may see what is behind the token (always, when none is configured)."""
    if token is None:
        return True
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(value.strip(), token)


def authorised(runtime: Runtime, request: Request) -> None:
    if not token_given(request, runtime.token):
        raise HTTPException(401, TOKEN_REQUIRED, headers={"WWW-Authenticate": "Bearer"})


# -- the page and the probes: open, so that a kiosk browser and systemd/Kubernetes reach them ----
pages = APIRouter()


@pages.get("/", response_class=HTMLResponse, include_in_schema=False)
def page() -> str:
    return resources.files("edgebc.serve").joinpath("page.html").read_text(encoding="utf-8")


@pages.get("/healthz", summary="liveness: the process and its live loop run")
def healthz(runtime: Runtime) -> JSONResponse:
    alive = runtime.pipeline.alive
    return JSONResponse({"alive": alive}, status_code=200 if alive else 503)


@pages.get(
    "/readyz",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "not ready"}},
    summary="readiness: model verified, source delivering, audit log writable; whether the "
    "newest frame is out of the training distribution (a boolean: not a readiness check); "
    "each check's detail only with the bearer token when one is configured",
)
def readyz(runtime: Runtime, request: Request) -> JSONResponse:
    checks = runtime.readiness()
    ready = all(c["ok"] for c in checks.values())
    if not token_given(request, runtime.token):  # a probe learns which check failed, not why:
        checks = {
            name: {"ok": c["ok"]} for name, c in checks.items()
        }  # details name the model and paths
    body = {"ready": ready, "checks": checks, "out_of_distribution": runtime.out_of_distribution()}
    return JSONResponse(body, status_code=200 if ready else 503)


# -- the API: behind the bearer token when one is configured ------------------------------------
api = APIRouter(
    dependencies=[Depends(authorised)],
    responses={401: {"model": Problem, "description": "missing or wrong bearer token"}},
)


@api.get("/v1/model", summary="the model card, its sha256 and whether a manifest verified it")
def model(runtime: Runtime) -> dict[str, Any]:
    return {**runtime.model_info(), "card": json.loads(runtime.backend.card.to_json())}


@api.get(
    "/v1/status",
    summary="source state, displayed decision, frame rate, latency percentiles, audit state",
)
def status(runtime: Runtime) -> dict[str, Any]:
    return runtime.view()


@api.get(
    "/v1/frame.jpg",
    summary="the newest classified frame (JPEG)",
    responses={200: {"content": {"image/jpeg": {}}}, 404: {"model": Problem}},
)
def frame(runtime: Runtime) -> Response:
    result = runtime.pipeline.latest()
    if result is None:
        raise HTTPException(404, "no frame has been classified yet")
    return Response(
        runtime.frame_jpeg(result),
        media_type="image/jpeg",
        headers={"Cache-Control": "no-store", "X-Frame-Sequence": str(result.sequence)},
    )


@api.get("/metrics", summary="Prometheus metrics", response_class=Response)
def metrics(runtime: Runtime) -> Response:
    body, content_type = metrics_text(runtime)
    return Response(body, media_type=content_type)


# The forms `_upload_region` (edgebc/serve/runtime.py) accepts, so the schema says what the code
# does: whole pixel numbers of at most six digits (no frame is a million pixels wide).
REGION_PATTERN = r"^(none|auto|[0-9]{1,6},[0-9]{1,6},[1-9][0-9]{0,5},[1-9][0-9]{0,5})$"

UPLOAD_BODY = {
    "required": True,
    "description": "the image file's bytes as the request body (not a form); at most the "
    "server's max_upload_bytes",
    "content": {
        kind: {"schema": {"type": "string", "format": "binary", "minLength": 1}}
        for kind in UPLOAD_TYPES
    },  # create_app adds the server's max_upload_bytes to the description
}


@api.post(
    "/v1/classify",
    response_model=ClassifyResult,
    summary="classify one uploaded image (PNG, JPEG, PGM or single-frame DICOM)",
    openapi_extra={"requestBody": UPLOAD_BODY},
    responses={
        400: {"model": Problem, "description": "Content-Length is not a number"},
        408: {
            "model": Problem,
            "description": "the body arrived too slowly (body_timeout_s, min_body_rate)",
        },
        411: {"model": Problem, "description": "no body"},
        413: {"model": Problem, "description": "body larger than max_upload_bytes"},
        415: {"model": Problem, "description": "Content-Type is not an accepted image type"},
        422: {
            "model": Problem,
            "description": "the body is not a readable image, or the region is malformed or "
            "does not fit in the image",
        },
        503: {
            "model": Problem,
            "description": "the cart is busy with other uploads (max_pending_uploads in "
            "progress, or this one could not start within the admission wait), or the audit "
            "trail cannot record a decision now; retry after the Retry-After seconds",
        },
    },
)
async def classify(
    runtime: Runtime,
    request: Request,
    region: str | None = Query(
        None, pattern=REGION_PATTERN, description="none (default), auto, or X,Y,W,H in pixels"
    ),
) -> Any:
    declared = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if declared not in UPLOAD_TYPES:
        runtime.uploads.count("unsupported_type")
        raise HTTPException(
            415,
            f"Content-Type {declared or '(none)'} is not accepted; send the image "
            f"bytes as the body with one of {', '.join(UPLOAD_TYPES)} "
            "(e.g. curl --data-binary @scan.png -H 'Content-Type: image/png')",
        )
    limit = runtime.settings.max_upload_bytes
    length = request.headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise HTTPException(400, f"Content-Length {length!r} is not a number")
        if int(length) > limit:
            runtime.uploads.count("too_large")
            raise HTTPException(
                413, f"the upload is {int(length)} bytes; the limit is {limit} bytes"
            )
    busy = None
    if runtime.uploads.saturated:  # refused before its body is read: overload costs little
        busy = "an upload is already waiting for the classifier; retry shortly"
    elif not runtime.uploads.try_enter():
        busy = f"{runtime.uploads.capacity} uploads are already in progress; retry shortly"
    if busy is not None:
        runtime.uploads.count("overloaded")
        raise HTTPException(503, busy, headers={"Retry-After": "1"})
    try:
        body = await _read_body(request, limit, runtime)
        found = sniff_format(bytes(body[:132]))
        expected = DECLARED_FORMAT.get(declared)
        if expected and found and found != expected:
            runtime.uploads.count("unreadable")
            raise HTTPException(
                422, f"Content-Type says {declared} but the body is {found.upper()} data"
            )
        try:
            result = await run_in_threadpool(runtime.classify_upload, bytes(body), region)
        except (DecodeBusyError, UploadsBusy) as exc:  # not the file's fault: the cart is busy
            runtime.uploads.count("overloaded")
            raise HTTPException(503, str(exc), headers={"Retry-After": "1"}) from exc
        except (ImageDecodeError, ValueError) as exc:
            runtime.uploads.count("unreadable")
            raise HTTPException(422, str(exc)) from exc
        runtime.uploads.count("classified")
        return result
    finally:
        runtime.uploads.leave()


# -- a fusion model's case context: the patient's mammograms attached to the live stream ---------
VIEW_PATTERN = r"^[LR]-[A-Z]{2,8}$"
MAMMOGRAMS_SCHEMA: dict[str, Any] = {"type": "array", "minItems": 1, "items": {
    "type": "object", "required": ["data"], "additionalProperties": False,
    "properties": {
        "data": {"type": "string", "format": "byte", "minLength": 4,
                 "description": "the image file (DICOM, PNG, PGM or JPEG), base64"},
        "view": {"anyOf": [{"type": "string", "pattern": VIEW_PATTERN}, {"type": "null"}],
                 "description": "L-CC, R-MLO, ...: the view of a file whose header says none"},
    }}}  # fmt: skip
ATTACH_BODY = {
    "required": True,
    "description": "the case id the operator entered (an id, never a name: no patient field is "
    "read or kept) and the case's stored mammogram views, each file's bytes in base64 (DICOM: "
    "the view from its header; PNG or JPEG: state the view); at most case.max_body_bytes",
    "content": {"application/json": {"schema": {
        "type": "object", "required": ["case", "mammograms"], "additionalProperties": False,
        "properties": {
            "case": {"type": "string", "pattern": CASE_PATTERN},
            "mammograms": MAMMOGRAMS_SCHEMA,
        }}}},
}  # fmt: skip


CASE_BODY = {
    "required": True,
    "description": "one case: the case id (an id, never a name), its ultrasound images and its "
    "mammogram views (none: ultrasound alone), each file's bytes in base64; at most "
    "case.max_body_bytes",
    "content": {"application/json": {"schema": {
        "type": "object", "required": ["case", "ultrasound"], "additionalProperties": False,
        "properties": {
            "case": {"type": "string", "pattern": CASE_PATTERN},
            "ultrasound": {"type": "array", "minItems": 1, "items": {
                "type": "object", "required": ["data"], "additionalProperties": False,
                "properties": {"data": {"type": "string", "format": "byte", "minLength": 4,
                                        "description": "an ultrasound image (PNG, JPEG, DICOM), base64"}}}},
            "mammograms": {**MAMMOGRAMS_SCHEMA, "minItems": 0},
        }}}},
}  # fmt: skip


class UltrasoundUpload(BaseModel):
    model_config = ConfigDict(extra="forbid")
    data: str = Field(min_length=4)


class MammogramUpload(BaseModel):
    model_config = ConfigDict(extra="forbid")
    data: str = Field(min_length=4)
    view: str | None = Field(None, pattern=VIEW_PATTERN)


class CaseAttach(BaseModel):
    model_config = ConfigDict(extra="forbid")
    case: str = Field(pattern=CASE_PATTERN)
    mammograms: list[MammogramUpload] = Field(min_length=1)


class CaseUpload(BaseModel):
    model_config = ConfigDict(extra="forbid")
    case: str = Field(pattern=CASE_PATTERN)
    ultrasound: list[UltrasoundUpload] = Field(min_length=1)
    mammograms: list[MammogramUpload] = Field(default_factory=list)


class MammogramFacts(BaseModel):
    source: str
    input: str | None  # the model input it feeds; None: left out (reason)
    view: str | None  # the view the model read it as (L-CC; L or MLO where only that is known)
    header_view: str | None  # what its own DICOM header says of its view (None: nothing)
    pixels_sha256: str
    study_sha256: str | None  # its DICOM study (StudyInstanceUID), hashed; None: unknown
    quality: str
    reason: str | None


class CaseView(BaseModel):
    """The case attached to the live stream: what each frame is fused with."""

    case: str
    inputs: list[str]  # the mammography inputs fed; empty: none passed, frames are US-only
    views: list[str | None]
    mammograms: list[MammogramFacts]
    study_sha256: (
        str | None
    )  # the ultrasound DICOM study the case is bound to, hashed; None: none yet
    study: str  # what is known of the films' study, the patient check, the ultrasound study bound
    attached_at: str
    idle_detach_in_s: float | None = None


class CaseResult(BaseModel):
    """POST /v1/cases' answer: the case's decision (the mean of its decided images'
    probabilities, by the one decision rule), each image's, and what became of each mammogram."""

    case: str
    decision: dict[str, Any]  # Decision.to_json() with inputs_used and modalities
    images: list[dict[str, Any]]  # each ultrasound image's, with its input_sha256
    mammograms: list[MammogramFacts]


class Detached(BaseModel):
    detached: str | None  # the case detached; None: none was attached


# Included only when the model is a mammogram + ultrasound fusion model (create_app): the schema
# of a single-model cart has no case endpoints, and /v1/case there is 404.
cases = APIRouter(
    dependencies=[Depends(authorised)],
    responses={401: {"model": Problem, "description": "missing or wrong bearer token"}},
)


@cases.get("/v1/case", response_model=CaseView | None,
         summary="the case whose mammograms are attached to the live stream (null: none)")  # fmt: skip
def case(runtime: Runtime) -> Any:
    return _fusion_model(runtime).view()


@cases.delete("/v1/case", response_model=Detached,
            summary="detach the case's mammograms (the operator ends the case): frames are "
            "ultrasound-only again; an audit record")  # fmt: skip
def detach_case(runtime: Runtime) -> Any:
    return {"detached": _fusion_model(runtime).detach("operator")}


def _case_responses(too_many: str, recorded: str) -> dict[int | str, dict[str, Any]]:
    """The refusals /v1/case and /v1/cases share (one JSON body of base64 files), worded for
    what each counts (`too_many`) and records (`recorded`)."""
    return {
        400: {"model": Problem, "description": "Content-Length is not a number"},
        408: {"model": Problem, "description": "the body arrived too slowly"},
        411: {"model": Problem, "description": "no body"},
        413: {"model": Problem, "description": f"body larger than case.max_body_bytes, or more {too_many}"},
        415: {"model": Problem, "description": "Content-Type is not application/json"},
        422: {"model": Problem, "description": "the body is not the documented JSON, a file is "
              "not readable base64 or a readable image, or a stated view contradicts its header"},
        503: {"model": Problem, "description": "the cart is busy with uploads, or the audit "
              f"trail cannot record {recorded} now; retry after the Retry-After seconds"},
    }  # fmt: skip


@cases.post(
    "/v1/case",
    response_model=CaseView,
    summary="attach a case's stored mammogram views to the live ultrasound stream (a fusion "
    "model): embedded once, fused with every frame until the case ends (operator, a new "
    "attach, or case.idle_detach_s without frames); each attach and detach is an audit record",
    openapi_extra={"requestBody": ATTACH_BODY},
    responses=_case_responses(
        "mammograms than case.max_mammograms", "the attach"
    ),
)  # fmt: skip
async def attach_case(runtime: Runtime, request: Request) -> Any:
    def attach(given: Any) -> Any:
        mammograms = _files(given.mammograms, "mammograms", runtime.settings.case.max_mammograms)
        return runtime.attach_case(given.case, mammograms)

    return await _case_request(runtime, request, CaseAttach, attach)


@cases.post(
    "/v1/cases",
    response_model=CaseResult,
    summary="classify one uploaded case of a fusion model: its ultrasound images fused with its "
    "mammogram views (none: ultrasound alone); a decision per image and for the case, each an "
    "audit record with the mammograms' hashes; the live stream's attachment is not touched",
    openapi_extra={"requestBody": CASE_BODY},
    responses=_case_responses(
        "images than case.max_mammograms / case.max_ultrasound", "the decisions"
    ),
)  # fmt: skip
async def classify_case(runtime: Runtime, request: Request) -> Any:
    def classify(given: Any) -> Any:
        limits = runtime.settings.case
        ultrasound = _files(given.ultrasound, "ultrasound", limits.max_ultrasound)
        mammograms = _files(given.mammograms, "mammograms", limits.max_mammograms)
        return runtime.classify_case(given.case, [data for data, _ in ultrasound], mammograms)

    return await _case_request(runtime, request, CaseUpload, classify)


def _files(items: Any, field: str, most: int) -> list[tuple[bytes, str | None]]:
    """The uploaded files' bytes and stated views; 413 beyond `most`, 422 for bad base64."""
    if len(items) > most:
        raise HTTPException(413, f"{len(items)} {field} images; at most {most} per case")
    files = []
    for k, item in enumerate(items):
        try:
            files.append((base64.b64decode(item.data, validate=True), getattr(item, "view", None)))
        except (binascii.Error, ValueError) as exc:
            raise HTTPException(422, f"{field}[{k}].data is not base64: {exc}") from exc
    return files


async def _case_request(
    runtime: ServeRuntime, request: Request, schema: type[BaseModel], work: Any
) -> Any:
    """A case's JSON body within case.max_body_bytes (as an upload's: 415, 400, 413, 408, 411),
    validated against `schema` (422), then `work(body)` on a thread, its errors as answers."""
    declared = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if declared != "application/json":
        raise HTTPException(415, f"Content-Type {declared or '(none)'} is not accepted; send "
                            "application/json (the documented case object)")  # fmt: skip
    limit = runtime.settings.case.max_body_bytes
    length = request.headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise HTTPException(400, f"Content-Length {length!r} is not a number")
        if int(length) > limit:
            raise HTTPException(413, f"the body is {int(length)} bytes; the limit is {limit} bytes")
    if not runtime.uploads.try_enter():
        raise HTTPException(503, "uploads are in progress; retry shortly", headers={"Retry-After": "1"})  # fmt: skip
    try:
        body = await _read_body(request, limit, runtime)
        try:
            given = schema.model_validate_json(bytes(body))
        except ValidationError as exc:
            raise HTTPException(422, invalid_body_detail(exc.errors())) from exc
        try:
            return await run_in_threadpool(work, given)
        except (DecodeBusyError, UploadsBusy) as exc:
            raise HTTPException(503, str(exc), headers={"Retry-After": "1"}) from exc
        except (ImageDecodeError, ValueError) as exc:
            raise HTTPException(422, str(exc)) from exc
    finally:
        runtime.uploads.leave()


def _fusion_model(runtime: ServeRuntime) -> LiveFusion:
    if runtime.fusion is None:  # the routes are only included for one: a runtime swapped under them
        raise HTTPException(404, "this cart's model is not a mammogram + ultrasound fusion model")
    return runtime.fusion


def invalid_body_detail(errors: Any) -> str:
    """'body field mammograms.0.view: String should match pattern ...' for each error."""
    parts = [f"body field {'.'.join(str(p) for p in e.get('loc', ())) or '(whole)'}: "
             f"{e.get('msg', 'invalid')}" for e in errors]  # fmt: skip
    return "; ".join(parts) or "the body is invalid"


async def _read_body(request: Request, limit: int, runtime: ServeRuntime) -> bytearray:
    """The body, counted while streamed (a client may send no Content-Length), within its deadline:
    all of it by body_timeout_s, and after body_grace_s at least min_body_rate bytes/s on average,
    else 408 (and the connection closed), so that a slow sender gives up its slot."""
    settings = runtime.settings
    started = time.monotonic()
    body = bytearray()
    chunks = request.stream().__aiter__()
    while True:
        # the next bytes are due before the body's deadline and before the rate falls behind
        due = min(
            settings.body_timeout_s, settings.body_grace_s + len(body) / settings.min_body_rate
        )
        try:
            chunk = await asyncio.wait_for(chunks.__anext__(), started + due - time.monotonic())
        except StopAsyncIteration:
            break
        except asyncio.TimeoutError:  # TimeoutError only from Python 3.11
            runtime.uploads.count("too_slow")
            raise HTTPException(
                408,
                f"the body arrived too slowly ({len(body)} bytes in "
                f"{time.monotonic() - started:.1f} s): send it within {settings.body_timeout_s:g} s "
                f"at {settings.min_body_rate} bytes/s or more",
                headers={"Connection": "close"},
            ) from None
        body += chunk
        if len(body) > limit:
            runtime.uploads.count("too_large")
            raise HTTPException(413, f"the upload exceeds the limit of {limit} bytes")
    if not body:
        raise HTTPException(411, "the request has no body: send the image bytes")
    return body


# -- the page's live feed: a JSON view per result, then the frame as JPEG bytes -----------------
live = APIRouter()


@live.websocket("/v1/live")
async def live_feed(socket: WebSocket) -> None:
    runtime: ServeRuntime = socket.app.state.runtime
    await socket.accept()
    if runtime.token is not None and not await _token_given(socket, runtime.token):
        await socket.close(code=1008, reason="bearer token required")
        return
    loop = asyncio.get_running_loop()
    wake = asyncio.Event()
    notify = lambda: loop.call_soon_threadsafe(wake.set)  # noqa: E731 - called from the pipeline thread
    runtime.broadcast.subscribe(notify)
    gone = asyncio.Event()

    async def listen() -> None:
        """Keep reading: the protocol answers the page's keep-alive pings only while someone
        receives, and this is how a closed page is noticed."""
        with contextlib.suppress(WebSocketDisconnect, RuntimeError, OSError):
            while (await socket.receive())["type"] != "websocket.disconnect":
                pass
        gone.set()
        wake.set()

    listener = asyncio.create_task(listen())
    sent = -1
    try:
        while not gone.is_set():
            with contextlib.suppress(TimeoutError):  # the state refreshes even when frames stop
                await asyncio.wait_for(wake.wait(), 0.25)
            wake.clear()
            if gone.is_set():
                break
            await socket.send_json(runtime.view())
            result = runtime.pipeline.latest()
            if result is not None and result.sequence != sent:
                jpeg = await run_in_threadpool(runtime.frame_jpeg, result)
                await socket.send_bytes(jpeg)
                sent = result.sequence
    except (WebSocketDisconnect, RuntimeError, OSError):
        pass  # the page went away
    finally:
        runtime.broadcast.unsubscribe(notify)
        listener.cancel()


async def _token_given(socket: WebSocket, token: str) -> bool:
    """Browsers cannot set headers on WebSockets: the token comes as {"token": ...} first."""
    try:
        hello = await asyncio.wait_for(socket.receive_json(), 5.0)
    except (asyncio.TimeoutError, ValueError, WebSocketDisconnect):
        hello = {}
    given = hello.get("token", "") if isinstance(hello, dict) else ""
    return isinstance(given, str) and hmac.compare_digest(given, token)
