"""`edgebc serve`: the cart's live classification service (the [serve] extra: FastAPI + uvicorn)."""

from __future__ import annotations

import argparse
import errno
import logging
import signal
import socket
from pathlib import Path
from typing import TYPE_CHECKING

from edgebc.commands import HelpFormatter

if TYPE_CHECKING:
    from edgebc.serve.settings import ServeSettings

log = logging.getLogger("edgebc.serve")


def register_serve(commands: argparse._SubParsersAction) -> None:
    serve = commands.add_parser(
        "serve",
        help="classify a live source in real time and show it on the cart's screen (web page + API)",
        description="Run the live service: read the newest frame from the source, classify it (region, "
        "quality gate, shared preprocessing, model, smoothing), keep an audit trail, and serve the cart's "
        "page at http://HOST:PORT/ with the API under /v1 (OpenAPI at /docs); with --display, show the "
        "same screen in a local window too.\n\n"
        "With no arguments it runs the embedded DEMO: a small model trained on synthetic phantoms watching "
        "the phantom tour, on 127.0.0.1:8000. Settings come from --config (see deploy/configs/) with the "
        "flags below and --set KEY=VALUE on top. Binding to any other address than loopback needs a bearer "
        "token (token_file, or $EDGEBC_TOKEN). SIGINT/SIGTERM stop it cleanly: the source is released and "
        "every audit record committed (or kept in the fallback journal; the last line gives exact counts).",
        formatter_class=HelpFormatter,
    )
    serve.add_argument(
        "--config", type=Path, default=None, help="YAML settings (deploy/configs/*.yaml)"
    )
    serve.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a setting, e.g. --set smoothing.time_constant=0.3 (repeatable)",
    )
    serve.add_argument(
        "--source",
        default=None,
        help="frame source: /dev/video0, v4l2:N, rtsp://..., gst:PIPELINE, picamera2:N, "
        "a video, a folder of images, a .dcm cine, phantom:tour (default: the demo's phantom tour)",
    )
    serve.add_argument(
        "--model", default=None, help="exported .onnx or .engine (default: the demo model)"
    )
    serve.add_argument(
        "--region", default=None, metavar="X,Y,W,H", help="imaging region to crop from every frame"
    )
    serve.add_argument(
        "--auto-region", action="store_true", help="detect the imaging region on the first frame"
    )
    serve.add_argument(
        "--threshold", type=float, default=None, help="override the card's operating threshold"
    )
    serve.add_argument(
        "--time-constant",
        type=float,
        default=None,
        help="smoothing time constant in seconds (0: no smoothing)",
    )
    serve.add_argument("--host", default=None, help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=None, help="port (default 8000)")
    serve.add_argument(
        "--audit-log", default=None, help="audit trail SQLite file (default edgebc-audit.sqlite)"
    )
    serve.add_argument(
        "--token-file", default=None, help="file holding the bearer token (or set $EDGEBC_TOKEN)"
    )
    serve.add_argument(
        "--display",
        action="store_true",
        help="also show the cart's screen in a full-screen local window, for a cart without a "
        "browser (display.enabled; needs the [display] extra)",
    )
    serve.add_argument(
        "--no-plan",
        action="store_true",
        help="run the model file as given, not the runtime and precision its deployment plan "
        "chose (use_plan: false; edgebc model plan)",
    )
    serve.add_argument(
        "--check",
        action="store_true",
        help="validate the settings (keys, values, token rule) and say what would be served; "
        "start nothing (install scripts run it before switching a config over)",
    )
    serve.set_defaults(handler=run_serve)


def settings_from_args(args: argparse.Namespace) -> ServeSettings:
    from edgebc.serve.settings import load_serve_settings

    shortcuts = {
        "source": args.source,
        "model": args.model,
        "threshold": args.threshold,
        "smoothing.time_constant": args.time_constant,
        "host": args.host,
        "port": args.port,
        "audit.path": args.audit_log,
        "token_file": args.token_file,
        "region": f"[{args.region}]" if args.region else None,
        "auto_region": "true" if args.auto_region else None,
        "display.enabled": "true" if args.display else None,
        "use_plan": "false" if args.no_plan else None,
    }
    overrides = [*args.overrides, *(f"{k}={v}" for k, v in shortcuts.items() if v is not None)]
    return load_serve_settings(args.config, overrides)


def run_serve(args: argparse.Namespace) -> int:
    from edgebc.optional import require

    settings = settings_from_args(args)
    if args.check:
        return check_settings(settings)
    uvicorn = require("uvicorn", "edgebc serve")
    require("fastapi", "edgebc serve")
    check_port_free(settings.host, settings.port)
    from edgebc.serve.app import create_app
    from edgebc.serve.runtime import build_runtime

    runtime = build_runtime(settings)
    app = create_app(runtime)
    if settings.demo:
        log.warning("DEMO — synthetic phantom model: results mean nothing for real patients")
    log.info("the cart's page: http://%s:%d/  (API docs: /docs)", settings.host, settings.port)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level="info",
        timeout_graceful_shutdown=3,
        access_log=False,
        # h11 with a deadline for each request head: a slowloris client is cut off (the body's
        # deadline is the upload route's)
        http=head_deadline_protocol(settings.header_timeout_s),
    )
    received: list[str] = []
    # uvicorn shuts down gracefully on SIGINT/SIGTERM and then re-raises the signal to the handler
    # that was installed before it; this one records it, so the process ends with status 0 after
    # a requested stop instead of dying by the signal before saying what it did.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda number, _frame: received.append(signal.Signals(number).name))
    uvicorn.Server(config).run()
    how = f" on {received[0]}" if received else ""
    # exact counts: "committed" only when every record is in the trail (edgebc.audit_trail)
    level = logging.INFO if runtime.audit.status().all_committed else logging.ERROR
    log.log(level, "stopped%s: source released, %s", how, runtime.audit.summary())
    return 0


def head_deadline_protocol(header_timeout_s: float) -> type:
    """uvicorn's h11 protocol with a deadline for each request head, so a slowloris client is cut off.

    uvicorn's keep-alive timer only watches a connection that sends nothing: one header line every
    few seconds keeps a connection open for ever. Here every request head (request line and
    headers) gets `header_timeout_s` from the moment the connection is ready for it (when it is
    made, and after each answer on a kept-alive one), and the connection is closed when the head
    is not complete by then. The body's deadline is the upload route's (edgebc/serve/routes.py)."""
    import asyncio

    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeadDeadlineProtocol(H11Protocol):
        _head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm_head_deadline()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm_head_deadline()  # the next request on this connection gets its own

        def handle_events(self) -> None:
            super().handle_events()
            if self.conn.their_state is not h11.IDLE:  # the head is in (or the connection over)
                self._disarm_head_deadline()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm_head_deadline()
            super().connection_lost(exc)

        def _arm_head_deadline(self) -> None:
            self._disarm_head_deadline()
            if not self.transport.is_closing():
                self._head_timer = self.loop.call_later(header_timeout_s, self._head_overdue)

        def _disarm_head_deadline(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_overdue(self) -> None:
            self._head_timer = None
            # still waiting for a request head: a slow or silent client (nothing of it is running)
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                log.debug("closing a connection from %s: no complete request head within %g s",
                          self.client, header_timeout_s)  # fmt: skip
                self.transport.close()

    return HeadDeadlineProtocol


def check_settings(settings: ServeSettings) -> int:
    """Settings that loaded passed the schema; here the token rule and what is not there yet."""
    token = settings.read_token()
    if settings.display.enabled:
        from edgebc.optional import require

        require("pygame", "the local display (display.enabled)")
    from edgebc.sources import probe_source

    found = probe_source(settings.source)  # opened once: a missing device fails here, not later
    print(f"settings ok: source {settings.source} ({found}), model {settings.model or 'the demo model'}, "
          f"http://{settings.host}:{settings.port}, token {'set' if token else 'none (loopback only)'}, "
          f"audit log {settings.audit.path}")  # fmt: skip
    if settings.model and not Path(settings.model).exists():
        print(f"note: {settings.model} does not exist yet: install a model with "
              "`edgebc model install MODEL.onnx` before starting the service")  # fmt: skip
    return 0


def check_port_free(host: str, port: int) -> None:
    """Fail with one clear line when the port is taken, before anything is opened."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise OSError(
                    f"port {port} on {host} is already in use (another edgebc serve?); "
                    "choose another with --port"
                ) from exc
            raise OSError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
