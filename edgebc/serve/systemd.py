"""systemd's notify protocol, without a dependency: READY=1, STATUS=, WATCHDOG=1 and STOPPING=1.

Under `Type=notify` with `WatchdogSec=` (deploy/systemd/edgebc.service) systemd kills and restarts
a service whose pings stop. The pings come from a task on the server's event loop, and only while
the live pipeline's loop has gone round recently: a frozen event loop or a pipeline stuck in
inference both stop them, and systemd restarts edgebc. A missing or stalled *feed* does not stop
them: the loop keeps turning and reopening the source, the page says why nothing is shown, and a
restart would not bring a capture card back. Outside systemd ($NOTIFY_SOCKET unset) nothing is sent.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


class SystemdNotifier:
    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        # an address starting with "@" is in the abstract namespace (a leading NUL byte)
        self.address = "\0" + address[1:] if address.startswith("@") else address
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        self.watchdog = (
            int(usec) / 1e6 if usec.isdigit() and (not pid or pid == str(os.getpid())) else None
        )

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def send(self, *fields: str) -> bool:
        if not self.address:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.sendto("\n".join(fields).encode(), self.address)
            return True
        except OSError as exc:  # systemd gone or socket unreadable: serving goes on regardless
            log.warning("could not notify systemd at %s: %s", self.address, exc)
            return False

    async def keep_alive(self, last_beat: Callable[[], float], status: Callable[[], str]) -> None:
        """Ping at a third of the watchdog period while the pipeline's loop has turned within
        half of it; otherwise stay silent (and say why once) so systemd restarts the service."""
        if self.watchdog is None:
            return
        period, limit, silent = self.watchdog / 3, self.watchdog / 2, False
        while True:
            age = time.monotonic() - last_beat()
            if age <= limit:
                self.send("WATCHDOG=1", f"STATUS={status()}")
                silent = False
            elif not silent:
                log.error("live pipeline has not turned for %.1f s: withholding the systemd "
                          "watchdog ping so the service is restarted", age)  # fmt: skip
                silent = True
            await asyncio.sleep(period)
