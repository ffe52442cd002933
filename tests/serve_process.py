"""Run `edgebc serve` as a real process for the signal, crash, soak and browser tests (not tests)."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class ServerProcess:
    def __init__(self, tmp_path: Path, *args: str) -> None:
        self.port = free_port()
        self.audit = tmp_path / "audit.sqlite"
        self.log = (tmp_path / "serve.log").open("wb")
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "edgebc", "serve", "--port", str(self.port),
                   "--audit-log", str(self.audit), *args]  # fmt: skip
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT,
                                        env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip
        self.log_path = tmp_path / "serve.log"

    def wait_ready(self, timeout: float = 60.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"edgebc serve exited early:\n{self.output()}")
            try:
                response = httpx.get(self.url + "/readyz", timeout=1.0)
                if response.status_code == 200:
                    return dict(response.json())
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"edgebc serve never became ready:\n{self.output()}")

    def get(self, path: str) -> httpx.Response:
        return httpx.get(self.url + path, timeout=5.0)

    def output(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return self.log_path.read_text(errors="replace")

    def proc_stats(self) -> dict[str, int]:
        """Resident memory (kB), threads and open file descriptors of the server process."""
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        return {
            "rss_kb": int(fields["VmRSS"].split()[0]),
            "threads": int(fields["Threads"]),
            "fds": len(os.listdir(f"/proc/{self.process.pid}/fd")),
        }

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        finally:
            self.log.close()

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc: object) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        if not self.log.closed:
            self.log.close()
