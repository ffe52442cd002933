"""A deadline for the request head in uvicorn's h11 protocol, so a slowloris client is cut off.

uvicorn's keep-alive timer only watches a connection that sends nothing: one header line every
few seconds keeps a connection open for ever. This protocol gives every request head (request
line and headers) `header_timeout_s` from the moment the connection is ready for it (when it is
made, and after each answer on a kept-alive connection) and closes the connection when the head is
not complete by then. The body's own deadline is the upload route's (edgebc/serve/routes.py).
"""

from __future__ import annotations

import asyncio
import logging

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)


class HeadDeadlineProtocol(H11Protocol):
    """uvicorn's H11Protocol with a deadline for each request head (`header_timeout_s`)."""

    header_timeout_s = 10.0
    _head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_head_deadline()  # the next request on this connection gets its own deadline

    def handle_events(self) -> None:
        super().handle_events()
        if self.conn.their_state is not h11.IDLE:  # the head is in (or the connection is over)
            self._disarm_head_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_deadline()
        super().connection_lost(exc)

    def _arm_head_deadline(self) -> None:
        self._disarm_head_deadline()
        if not self.transport.is_closing():
            self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_overdue)

    def _disarm_head_deadline(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_overdue(self) -> None:
        self._head_timer = None
        # still waiting for a request head: a slow or silent client; close it (nothing is running)
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            log.debug("closing a connection from %s: no complete request head within %g s",
                      self.client, self.header_timeout_s)  # fmt: skip
            self.transport.close()


def head_deadline_protocol(header_timeout_s: float) -> type[HeadDeadlineProtocol]:
    """The protocol class to give uvicorn.Config(http=...), with this deadline."""
    return type("HeadDeadlineProtocol", (HeadDeadlineProtocol,),
                {"header_timeout_s": header_timeout_s})  # fmt: skip
