"""systemd integration: the notify protocol, the watchdog withheld when the pipeline stops turning,
and a real `edgebc serve` telling systemd it is ready, alive and stopping."""

import asyncio
import contextlib
import signal
import socket
import time

import pytest

from edgebc.serve.systemd import SystemdNotifier


@pytest.fixture
def notify_socket(tmp_path):
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(0.05)
    yield path, sock
    sock.close()


def _received(sock, seconds):
    messages, deadline = [], time.monotonic() + seconds
    while time.monotonic() < deadline:
        with contextlib.suppress(TimeoutError):
            messages.append(sock.recv(4096).decode())
    return messages


def test_notifier_reads_systemds_environment():
    assert not SystemdNotifier({}).enabled and not SystemdNotifier({}).send("READY=1")
    abstract = SystemdNotifier({"NOTIFY_SOCKET": "@/org/x", "WATCHDOG_USEC": "3000000"})
    assert abstract.address == "\0/org/x" and abstract.watchdog == 3.0
    other_pid = SystemdNotifier({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "1", "WATCHDOG_PID": "1"})
    assert other_pid.watchdog is None  # the watchdog is meant for another process


def test_watchdog_pings_only_while_the_pipeline_turns(notify_socket):
    path, sock = notify_socket
    notifier = SystemdNotifier({"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "300000"})
    beat = {"at": time.monotonic()}

    async def scenario():
        task = asyncio.create_task(notifier.keep_alive(lambda: beat["at"], lambda: "ok feed"))
        for _ in range(5):  # a turning loop: fresh beats
            beat["at"] = time.monotonic()
            await asyncio.sleep(0.1)
        alive = _received(sock, 0.01)
        await asyncio.sleep(0.5)  # the loop stopped turning 0.5 s ago (limit 0.15 s)
        _received(sock, 0.01)
        await asyncio.sleep(0.5)
        hung = _received(sock, 0.01)
        task.cancel()
        return alive, hung

    alive, hung = asyncio.run(scenario())
    assert len(alive) >= 3 and all(m.startswith("WATCHDOG=1\nSTATUS=ok feed") for m in alive)
    assert hung == []


def test_serve_tells_systemd_ready_alive_and_stopping(tmp_path, notify_socket, monkeypatch):
    pytest.importorskip("uvicorn", reason="edgebc serve needs the [serve] extra")
    from tests.serve_process import ServerProcess

    path, sock = notify_socket
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    monkeypatch.setenv("WATCHDOG_USEC", "600000")
    with ServerProcess(tmp_path) as server:
        server.wait_ready()
        messages = _received(sock, 1.5)
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=20) == 0
        messages += _received(sock, 0.5)
    assert messages[0].startswith("READY=1\nSTATUS=serving demo-phantom"), messages
    pings = [m for m in messages if m.startswith("WATCHDOG=1")]
    assert len(pings) >= 3 and "frames" in pings[-1], messages  # one every 0.2 s
    assert messages[-1] == "STOPPING=1"
