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
`Authorization: Bearer <token>` (the API documentation /docs, /redoc and /openapi.json too, and
/readyz then says which check fails but not why) (the WebSocket sends {"token": ...} as its first message, since
browsers cannot set headers on WebSockets). Uploads are refused by their declared length before
the body is read, and counted while streamed for bodies without one. The routes live in
edgebc/serve/routes.py; `create_app` wires them to one runtime.
"""

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from edgebc.audit_trail import AuditUnavailableError
from edgebc.optional import require
from edgebc.serve.runtime import ServeRuntime
from edgebc.serve.systemd import SystemdNotifier


def create_app(runtime: ServeRuntime, manage_runtime: bool = True) -> Any:
    """The ASGI app. With `manage_runtime`, app startup starts the live loop and shutdown stops it."""
    require("fastapi", "edgebc serve")  # a missing [serve] extra says how to install it
    from fastapi import FastAPI
    from starlette.concurrency import run_in_threadpool

    from edgebc.serve import routes

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

    app = FastAPI(
        title="edgebc serve",
        version=_version(),
        summary="Breast-lesion classification on the ultrasound cart (research use only, not a medical device).",
        description=f"Model {runtime.backend.card.name} ({runtime.backend.model_sha256[:12]}…). "
        + ("DEMO — synthetic phantom model. " if runtime.demo else "")
        + f"Uploads to POST /v1/classify: at most {runtime.settings.max_upload_bytes} bytes.",
        lifespan=lifespan,
    )
    app.state.runtime = runtime
    for router in (routes.pages, routes.api, routes.live):
        app.include_router(router)
    app.add_exception_handler(AuditUnavailableError, _audit_unavailable)
    if runtime.token is not None:
        _guard_the_schema(app, runtime.token)
    return app


async def _audit_unavailable(_: Any, exc: Exception) -> Any:
    """A decision the audit trail cannot record is not given (edgebc.audit_trail): 503, and why."""
    from fastapi.responses import JSONResponse

    return JSONResponse({"detail": str(exc)}, status_code=503, headers={"Retry-After": "5"})


def _guard_the_schema(app: Any, token: str) -> None:
    """With a token configured an unauthenticated caller learns liveness and readiness only: the
    API's documentation names the model, its hash and the settings, so it is behind the token."""
    from fastapi.responses import JSONResponse

    from edgebc.serve.routes import TOKEN_REQUIRED, token_given

    guarded = {app.docs_url, app.redoc_url, app.openapi_url, app.swagger_ui_oauth2_redirect_url}

    @app.middleware("http")
    async def schema_needs_the_token(request: Any, call_next: Any) -> Any:
        if request.url.path in guarded and not token_given(request, token):
            return JSONResponse({"detail": TOKEN_REQUIRED}, status_code=401,
                                headers={"WWW-Authenticate": "Bearer"})  # fmt: skip
        return await call_next(request)


def _version() -> str:
    from edgebc import __version__

    return __version__
