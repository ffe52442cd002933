"""The HTTP face of `edgebc serve` (FastAPI): the cart's page, a live WebSocket, and the API.

    GET  /               the cart's screen (static page; data come over /v1/live)
    WS   /v1/live        a JSON state message per result, then the frame as a binary JPEG
    POST /v1/classify    one image in the request body (PNG, JPEG or DICOM) -> a decision
    GET  /v1/model       the model card, hash and verification
    GET  /v1/status      source state, display, frame rate, latency percentiles, audit state
    GET  /v1/frame.jpg   the newest classified frame
    GET  /healthz        the process and its live loop are alive
    GET  /readyz         model verified, source delivering, audit log writable (503 otherwise)
    GET  /metrics        Prometheus text format

With a bearer token configured, everything but the page, /healthz and /readyz needs
`Authorization: Bearer <token>` (the WebSocket sends {"token": ...} as its first message, since
browsers cannot set headers on WebSockets). Uploads are refused by their declared length before
the body is read, and counted while streamed for bodies without one.
"""

import asyncio
import contextlib
import hmac
from collections.abc import AsyncIterator
from importlib import resources
from typing import Any

from edgebc.decode import sniff_format
from edgebc.errors import ImageDecodeError
from edgebc.optional import require
from edgebc.serve.prometheus import metrics_text
from edgebc.serve.runtime import ServeRuntime
from edgebc.serve.systemd import SystemdNotifier

DECLARED_FORMAT = {"image/png": "png", "image/jpeg": "jpeg", "application/dicom": "dicom"}
UPLOAD_TYPES = (*DECLARED_FORMAT, "application/octet-stream")  # octet-stream: the bytes tell


def create_app(runtime: ServeRuntime, manage_runtime: bool = True) -> Any:
    """The ASGI app. With `manage_runtime`, app startup starts the live loop and shutdown stops it."""
    require("fastapi", "edgebc serve")  # a missing [serve] extra says how to install it
    from fastapi import Depends, FastAPI, HTTPException, Query, Request, WebSocket
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from pydantic import BaseModel
    from starlette.concurrency import run_in_threadpool
    from starlette.websockets import WebSocketDisconnect

    class Problem(BaseModel):
        detail: str

    class ClassifyResult(BaseModel):
        label: str | None
        probabilities: dict[str, float] | None
        positive_probability: float | None
        threshold: float | None
        quality: str
        reason: str | None
        input_sha256: str
        width: int
        height: int
        region: dict[str, int] | None
        model_sha256: str
        timings_ms: dict[str, float]

    class Check(BaseModel):
        ok: bool
        detail: str

    class Readiness(BaseModel):
        ready: bool
        checks: dict[str, Check]

    @contextlib.asynccontextmanager
    async def lifespan(_: Any) -> AsyncIterator[None]:
        if manage_runtime:
            runtime.start()
        systemd = SystemdNotifier()
        systemd.send("READY=1", f"STATUS=serving {runtime.backend.card.name}")
        watchdog = asyncio.create_task(
            systemd.keep_alive(lambda: runtime.pipeline.last_beat, runtime.status_line)
        )
        try:
            yield
        finally:
            watchdog.cancel()
            systemd.send("STOPPING=1")
            if manage_runtime:
                await run_in_threadpool(runtime.stop)

    model_name = runtime.backend.card.name
    app = FastAPI(
        title="edgebc serve",
        version=_version(),
        summary="Breast-lesion classification on the ultrasound cart (research use only, not a medical device).",
        description=f"Model {model_name} ({runtime.backend.model_sha256[:12]}…). "
        + ("DEMO — synthetic phantom model. " if runtime.demo else ""),
        lifespan=lifespan,
    )

    def authorised(request: Request) -> None:
        if runtime.token is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, value = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip(), runtime.token):
            raise HTTPException(
                401,
                "a bearer token is required: Authorization: Bearer <token>",
                headers={"WWW-Authenticate": "Bearer"},
            )

    protected = [Depends(authorised)]
    auth_responses: dict[int | str, dict[str, Any]] = {
        401: {"model": Problem, "description": "missing or wrong bearer token"}
    }

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> str:
        return resources.files("edgebc.serve").joinpath("page.html").read_text(encoding="utf-8")

    @app.get("/healthz", summary="liveness: the process and its live loop run")
    def healthz() -> JSONResponse:
        alive = runtime.pipeline.alive
        return JSONResponse({"alive": alive}, status_code=200 if alive else 503)

    @app.get(
        "/readyz",
        response_model=Readiness,
        responses={503: {"model": Readiness, "description": "not ready"}},
        summary="readiness: model verified, source delivering, audit log writable",
    )
    def readyz() -> JSONResponse:
        checks = runtime.readiness()
        ready = all(c["ok"] for c in checks.values())
        return JSONResponse({"ready": ready, "checks": checks}, status_code=200 if ready else 503)

    @app.get(
        "/v1/model",
        dependencies=protected,
        responses=auth_responses,
        summary="the model card, its sha256 and whether a manifest verified it",
    )
    def model() -> dict[str, Any]:
        return {**runtime.model_info(), "card": _card_json(runtime)}

    @app.get(
        "/v1/status",
        dependencies=protected,
        responses=auth_responses,
        summary="source state, displayed decision, frame rate, latency percentiles, audit state",
    )
    def status() -> dict[str, Any]:
        return runtime.view()

    @app.get(
        "/v1/frame.jpg",
        dependencies=protected,
        summary="the newest classified frame (JPEG)",
        responses={**auth_responses, 200: {"content": {"image/jpeg": {}}}, 404: {"model": Problem}},
    )
    def frame() -> Response:
        result = runtime.pipeline.latest()
        if result is None:
            raise HTTPException(404, "no frame has been classified yet")
        return Response(
            runtime.frame_jpeg(result),
            media_type="image/jpeg",
            headers={"Cache-Control": "no-store", "X-Frame-Sequence": str(result.sequence)},
        )

    @app.get(
        "/metrics",
        dependencies=protected,
        responses=auth_responses,
        summary="Prometheus metrics",
        response_class=Response,
    )
    def metrics() -> Response:
        body, content_type = metrics_text(runtime)
        return Response(body, media_type=content_type)

    upload_body = {
        "required": True,
        "description": "the image file's bytes as the request body (not a form); "
        f"at most {runtime.settings.max_upload_bytes} bytes",
        "content": {
            kind: {"schema": {"type": "string", "format": "binary"}} for kind in UPLOAD_TYPES
        },
    }

    @app.post(
        "/v1/classify",
        dependencies=protected,
        response_model=ClassifyResult,
        summary="classify one uploaded image (PNG, JPEG or single-frame DICOM)",
        openapi_extra={"requestBody": upload_body},
        responses={
            **auth_responses,
            411: {"model": Problem, "description": "no body"},
            413: {"model": Problem, "description": "body larger than max_upload_bytes"},
            415: {"model": Problem, "description": "Content-Type is not an accepted image type"},
            422: {
                "model": Problem,
                "description": "the body is not a readable image, or the region is invalid",
            },
            503: {
                "model": Problem,
                "description": "upload queue full; retry after the Retry-After seconds",
            },
        },
    )
    async def classify(
        request: Request,
        region: str | None = Query(None, description="none (default), auto, or X,Y,W,H in pixels"),
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
        if not runtime.uploads.try_enter():
            runtime.uploads.count("overloaded")
            raise HTTPException(
                503,
                f"{runtime.uploads.capacity} uploads are already waiting; retry shortly",
                headers={"Retry-After": "1"},
            )
        try:
            body = bytearray()
            async for chunk in request.stream():
                body += chunk
                if len(body) > limit:
                    runtime.uploads.count("too_large")
                    raise HTTPException(413, f"the upload exceeds the limit of {limit} bytes")
            if not body:
                raise HTTPException(411, "the request has no body: send the image bytes")
            found = sniff_format(bytes(body[:132]))
            expected = DECLARED_FORMAT.get(declared)
            if expected and found and found != expected:
                runtime.uploads.count("unreadable")
                raise HTTPException(
                    422, f"Content-Type says {declared} but the body is {found.upper()} data"
                )
            try:
                result = await run_in_threadpool(runtime.classify_upload, bytes(body), region)
            except (ImageDecodeError, ValueError) as exc:
                runtime.uploads.count("unreadable")
                raise HTTPException(422, str(exc)) from exc
            runtime.uploads.count("classified")
            return result
        finally:
            runtime.uploads.leave()

    @app.websocket("/v1/live")
    async def live(socket: WebSocket) -> None:
        await socket.accept()
        if runtime.token is not None:
            try:
                hello = await asyncio.wait_for(socket.receive_json(), 5.0)
            except (TimeoutError, ValueError, WebSocketDisconnect):
                hello = {}
            token = hello.get("token", "") if isinstance(hello, dict) else ""
            if not isinstance(token, str) or not hmac.compare_digest(token, runtime.token):
                await socket.close(code=1008, reason="bearer token required")
                return
        loop = asyncio.get_running_loop()
        wake = asyncio.Event()
        notify = lambda: loop.call_soon_threadsafe(wake.set)  # noqa: E731 - called from the pipeline thread
        runtime.pipeline.add_listener(notify)
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
            runtime.pipeline.remove_listener(notify)
            listener.cancel()

    return app


def _card_json(runtime: ServeRuntime) -> dict[str, Any]:
    import json

    return dict(json.loads(runtime.backend.card.to_json()))


def _version() -> str:
    from edgebc import __version__

    return __version__
