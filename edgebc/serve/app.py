"""The HTTP face of `edgebc serve` (FastAPI): the cart's page, a live WebSocket, and the API.

    GET  /               the cart's screen (static page; data come over /v1/live)
    WS   /v1/live        a JSON state message per result, then the frame as a binary JPEG
    POST /v1/classify    one image in the request body (PNG, JPEG, PGM or DICOM) -> a decision
    GET  /v1/model       the model card, hash and verification
    GET  /v1/status      source state, display, frame rate, latency percentiles, audit state
    GET  /v1/frame.jpg   the newest classified frame
    GET  /healthz        the process and its live loop are alive
    GET  /readyz         model verified, source delivering, audit log writable (503 otherwise)
    GET  /metrics        Prometheus text format
    POST /v1/case        (a fusion model) attach a case's mammograms to the live stream
    GET  /v1/case        (a fusion model) the attached case; DELETE /v1/case detaches it

With a bearer token configured, everything but the page, /healthz and /readyz needs
`Authorization: Bearer <token>` (the API documentation /docs, /redoc and /openapi.json too, and
/readyz then says which check fails but not why) (the WebSocket sends {"token": ...} as its first message, since
browsers cannot set headers on WebSockets). Uploads are refused by their declared length before
the body is read, and counted while streamed for bodies without one; the request head must arrive
within header_timeout_s and the body within body_timeout_s at min_body_rate (408), and an upload
that cannot start within the admission wait gets 503 + Retry-After. The routes live in
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

DOCS_ASSETS = "/docs-assets"  # Swagger UI's and ReDoc's scripts, styles and icon


def create_app(runtime: ServeRuntime, manage_runtime: bool = True) -> Any:
    """The ASGI app. With `manage_runtime`, app startup starts the live loop and shutdown stops it."""
    require("fastapi", "edgebc serve")  # a missing [serve] extra says how to install it
    require("fastapi_offline", "edgebc serve")
    from fastapi_offline import FastAPIOffline
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

    app = FastAPIOffline(  # /docs and /redoc from the package's own assets: carts are offline
        static_url=DOCS_ASSETS,
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
    if runtime.fusion is not None:  # a fusion model's case: its mammograms attached, detached
        app.include_router(routes.cases)
    _answer_invalid_requests_in_one_line(app)
    _allow_every_method_of_a_path(app)
    _declare_the_upload_limit(app, runtime.settings.max_upload_bytes)
    if runtime.fusion is not None:
        limits = runtime.settings.case
        _declare_the_case_limits(app, limits.max_mammograms, limits.max_ultrasound, limits.max_body_bytes)  # fmt: skip
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

    guarded = {"/docs", "/redoc", app.openapi_url, app.swagger_ui_oauth2_redirect_url}

    @app.middleware("http")
    async def schema_needs_the_token(request: Any, call_next: Any) -> Any:
        if request.url.path in guarded and not token_given(request, token):
            return JSONResponse({"detail": TOKEN_REQUIRED}, status_code=401,
                                headers={"WWW-Authenticate": "Bearer"})  # fmt: skip
        return await call_next(request)


def _declare_the_upload_limit(app: Any, limit: int) -> None:
    """The schema's upload body states this server's size limit. As text, not `maxLength`: a JSON
    Schema length counts characters, not the bytes of a binary body (and schema fuzzers then
    "violate" it with bodies they cannot make that long)."""
    generated = app.openapi  # FastAPI's own, which caches its schema in app.openapi_schema

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            body = generated()["paths"]["/v1/classify"]["post"]["requestBody"]
            body["description"] += f": {limit} bytes on this server (413 above)"
        schema: dict[str, Any] = app.openapi_schema
        return schema

    app.openapi = openapi


def _allow_every_method_of_a_path(app: Any) -> None:
    """A 405's Allow header lists every method the path documents (/v1/case: GET, POST, DELETE),
    not only the first matching route's, as Starlette's own would."""
    from fastapi.responses import JSONResponse

    async def not_allowed(request: Any, exc: Any) -> JSONResponse:
        given = (getattr(exc, "headers", None) or {}).get("Allow", "")
        methods = {m.strip() for m in given.split(",") if m.strip()}
        documented = app.openapi()["paths"].get(request.url.path, {})
        methods |= {m.upper() for m in documented}
        headers = {"Allow": ", ".join(sorted(methods))} if methods else None
        return JSONResponse({"detail": getattr(exc, "detail", "Method Not Allowed")},
                            status_code=405, headers=headers)  # fmt: skip

    app.add_exception_handler(405, not_allowed)


def _declare_the_case_limits(app: Any, most: int, frames: int, limit: int) -> None:
    """The attach body's schema states this server's limits: at most `most` mammograms (a
    schema-valid attach is never refused for its count) and `limit` bytes."""
    generated = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            body = generated()["paths"]["/v1/case"]["post"]["requestBody"]
            body["description"] += f": {limit} bytes on this server (413 above)"
            json_body = body["content"]["application/json"]
            schema = dict(json_body["schema"])  # copies: the route's declaration is shared
            schema["properties"] = {**schema["properties"],
                                    "mammograms": {**schema["properties"]["mammograms"], "maxItems": most}}  # fmt: skip
            json_body["schema"] = schema
            case = generated()["paths"]["/v1/cases"]["post"]["requestBody"]
            case["description"] += f": {limit} bytes on this server (413 above)"
            upload = case["content"]["application/json"]
            upload["schema"] = {**upload["schema"], "properties": {
                **upload["schema"]["properties"],
                "mammograms": {**upload["schema"]["properties"]["mammograms"], "maxItems": most},
                "ultrasound": {**upload["schema"]["properties"]["ultrasound"], "maxItems": frames}}}  # fmt: skip
        built: dict[str, Any] = app.openapi_schema
        return built

    app.openapi = openapi


def _answer_invalid_requests_in_one_line(app: Any) -> None:
    """A request FastAPI refuses (a query parameter outside its declared form) gets the same
    `{"detail": "<one line>"}` as every other error, as the schema's 422 declares."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse

    @app.exception_handler(RequestValidationError)
    async def one_line(_: Any, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": invalid_request_detail(exc.errors())}, status_code=422)


def invalid_request_detail(errors: Any) -> str:
    """'query parameter region: String should match pattern ... (got 'x')' for each error."""
    parts = []
    for error in errors:
        where = [str(part) for part in error.get("loc", ())]
        place = f"{where[0]} parameter {'.'.join(where[1:])}" if len(where) > 1 else "request"
        given = f" (got {error['input']!r})" if "input" in error else ""
        parts.append(f"{place}: {error.get('msg', 'invalid')}{given}")
    return "; ".join(parts) or "the request is invalid"


def _version() -> str:
    from edgebc import __version__

    return __version__
