"""A load generator for `edgebc serve`: closed-loop clients posting images, every answer timed.

Plain asyncio sockets speaking HTTP/1.1 (one connection per request, as a scanner workstation
or a script with curl would), so that the generator costs little CPU beside the server it loads on
the same machine. Also starts and stops a real `edgebc serve` process for the benchmarks.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Answer:
    status: int
    seconds: float  # from connecting to the last byte of the answer
    retry_after: str | None


async def post(host: str, port: int, path: str, body: bytes, content_type: str,
               timeout: float = 30.0) -> Answer:  # fmt: skip
    """POST `body` on a fresh connection and read the whole answer."""
    started = time.perf_counter()
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    try:
        head = (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")  # fmt: skip
        writer.write(head.encode("ascii") + body)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), timeout)  # Connection: close: to the end
    finally:
        writer.close()
    seconds = time.perf_counter() - started
    status_line, _, rest = answer.partition(b"\r\n")
    headers = rest.partition(b"\r\n\r\n")[0].decode("latin-1").lower().splitlines()
    retry = [line.split(":", 1)[1].strip() for line in headers if line.startswith("retry-after:")]
    return Answer(int(status_line.split()[1]), seconds, retry[0] if retry else None)


@dataclass
class Load:
    """What `clients` closed-loop clients got in one run."""

    clients: int
    seconds: float = 0.0
    answers: list[Answer] = field(default_factory=list)
    errors: int = 0  # connections refused, reset or timed out


async def closed_loop(host: str, port: int, body: bytes, clients: int, seconds: float,
                      refusal_pause_s: float) -> Load:  # fmt: skip
    """`clients` clients each posting `body` again as soon as answered, for `seconds`; a refused
    one (503) tries again after `refusal_pause_s` (honouring Retry-After would hide the overload)."""
    load = Load(clients)
    stop = time.perf_counter() + seconds

    async def client() -> None:
        while time.perf_counter() < stop:
            try:
                answer = await post(host, port, "/v1/classify", body, "image/png")
            except (OSError, asyncio.TimeoutError, IndexError, ValueError):
                load.errors += 1
                await asyncio.sleep(refusal_pause_s)
                continue
            load.answers.append(answer)
            if answer.status == 503:
                await asyncio.sleep(refusal_pause_s)

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    load.seconds = time.perf_counter() - started
    return load


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Server:
    """A real `edgebc serve` (the embedded demo unless other arguments say otherwise)."""

    def __init__(self, folder: Path, *args: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = folder / "serve.log"
        self._log = self.log_path.open("wb")
        command = [sys.executable, "-m", "edgebc", "serve", "--port", str(self.port),
                   "--audit-log", str(folder / "audit.sqlite"), *args]  # fmt: skip
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT,
                                        env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip

    def wait_ready(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"edgebc serve exited:\n{self.log_path.read_text()}")
            try:
                with urllib.request.urlopen(self.url + "/readyz", timeout=1.0) as answer:
                    if answer.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"edgebc serve never became ready:\n{self.log_path.read_text()}")

    def status(self) -> dict:
        with urllib.request.urlopen(self.url + "/v1/status", timeout=5.0) as answer:
            return dict(json.loads(answer.read()))

    def rss_kb(self) -> int:
        """Resident memory of the server process (VmRSS in /proc/PID/status)."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS in /proc: resident memory needs Linux")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.terminate()
        try:
            return self.process.wait(30)
        finally:
            self._log.close()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self._log.close()
