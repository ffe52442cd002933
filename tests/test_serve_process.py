"""`edgebc serve` as a real process: clean shutdown on signals, a crash mid-stream, a bounded soak."""

import json
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="needs the [serve] extra")
pytest.importorskip("uvicorn", reason="needs the [serve] extra")

import httpx

from edgebc.audit_trail import read_trail
from tests.serve_process import ServerProcess

FIELDS = ("logged_at", "captured_at", "frame_sha256", "model_sha256", "probabilities", "decision",
          "threshold", "quality", "latencies_ms")  # fmt: skip


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_the_server_cleanly_with_the_log_committed(tmp_path, sig):
    with ServerProcess(tmp_path) as server:
        server.wait_ready()
        time.sleep(1.0)
        frames = server.get("/v1/status").json()["counts"]["frames"]
        code = server.stop(sig)
        output = server.output()
    assert code == 0, output
    assert "source released, audit log committed" in output
    rows = read_trail(server.audit)
    assert len(rows) >= frames > 10  # every frame classified up to the signal is in the log
    # the line says exactly what was written, journalled, held, lost and withheld, and where the
    # chain ends
    assert (f"{len(rows)} written, 0 journalled, 0 held, 0 lost, 0 withheld; "
            f"chain head record {len(rows)}") in output  # fmt: skip
    assert (
        not (tmp_path / "audit.sqlite-wal").exists()
        or (tmp_path / "audit.sqlite-wal").stat().st_size == 0
    )


def test_a_killed_server_leaves_every_committed_record_intact(tmp_path):
    with ServerProcess(tmp_path) as server:
        server.wait_ready()
        time.sleep(2.0)
        server.stop(signal.SIGKILL)
    rows = read_trail(server.audit)  # raises if SQLite's integrity check fails
    assert len(rows) > 20
    for row in rows:
        assert all(
            row[name] is not None
            for name in FIELDS
            if not (name == "decision" and row["quality"] != "ok")
        )
        probabilities = json.loads(row["probabilities"])
        assert sum(probabilities.values()) == pytest.approx(1.0, abs=1e-6)
        assert (
            len(row["frame_sha256"]) == 64 and row["pixels"] is None and row["patient_id"] is None
        )
    indices = [row["frame_index"] for row in rows]
    assert indices == sorted(indices) and len(set(indices)) == len(indices)  # no frame twice


def test_port_in_use_is_one_clear_line(tmp_path):
    with ServerProcess(tmp_path) as first:
        first.wait_ready()
        second_dir = tmp_path / "second"
        second_dir.mkdir()
        result = subprocess.run([sys.executable, "-m", "edgebc", "serve", "--port", str(first.port),
                                 "--audit-log", str(second_dir / "a.sqlite")],
                                capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 1
    assert f"port {first.port} on 127.0.0.1 is already in use" in result.stderr


@pytest.mark.slow
def test_soak_60_seconds_at_30_fps_without_growth(tmp_path):
    """A page watching, the status polled and images uploaded for 60 s: memory, threads and file
    descriptors must not grow, and the loop must keep the source's 30 fps."""
    from websockets.sync.client import connect

    from tests.test_serve import phantom_png

    with ServerProcess(tmp_path, "--source", "phantom:tour?fps=30") as server:
        server.wait_ready()
        stop = threading.Event()
        received = {"frames": 0}

        def watch() -> None:
            with connect(f"ws://127.0.0.1:{server.port}/v1/live") as socket:
                socket.send(json.dumps({"token": ""}))
                while not stop.is_set():
                    if isinstance(socket.recv(timeout=2), bytes):
                        received["frames"] += 1

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        upload = phantom_png()
        samples = []
        started = time.monotonic()
        while time.monotonic() - started < 60:
            server.get("/v1/status")
            httpx.post(
                server.url + "/v1/classify",
                content=upload,
                headers={"Content-Type": "image/png"},
                timeout=5,
            )
            elapsed = time.monotonic() - started
            if elapsed > 10 and (not samples or elapsed - samples[-1][0] >= 5):
                samples.append((elapsed, server.proc_stats()))
            time.sleep(0.5)
        status = server.get("/v1/status").json()
        stop.set()
        watcher.join(5)
        assert server.stop() == 0
    first, last = samples[0][1], samples[-1][1]
    print("soak samples:", samples, "status fps", status["fps"], "received", received)
    assert last["rss_kb"] - first["rss_kb"] < 10_000, samples
    assert last["threads"] <= max(s["threads"] for _, s in samples[:2]) + 1, samples
    assert last["fds"] <= max(s["fds"] for _, s in samples[:2]) + 1, samples
    assert status["counts"]["frames"] >= 0.9 * 30 * 60
    assert received["frames"] >= 0.8 * 30 * 60  # the page kept up
    assert status["counts"]["errors"] == 0


def _closed_within(connection: socket.socket, seconds: float, trickle: bytes) -> float | None:
    """Seconds until the server closed `connection` while `trickle` was sent every 0.25 s (None:
    still open after `seconds`); anything the server answered is read and dropped."""
    started = time.monotonic()
    connection.settimeout(0.25)
    while time.monotonic() - started < seconds:
        try:
            connection.sendall(trickle)
            if connection.recv(4096) == b"":
                return time.monotonic() - started
        except TimeoutError:
            continue
        except OSError:  # reset: closed too
            return time.monotonic() - started
    return None


def test_a_slowloris_connection_is_closed_at_the_header_deadline(tmp_path):
    """One header line every 0.25 s never completes the head: cut off after header_timeout_s,
    while a normal request on another connection is answered."""
    with ServerProcess(tmp_path, "--set", "header_timeout_s=1") as server:
        server.wait_ready()
        with socket.create_connection(("127.0.0.1", server.port)) as slow:
            slow.sendall(b"GET /healthz HTTP/1.1\r\nHost: cart\r\n")
            assert server.get("/healthz").status_code == 200
            closed = _closed_within(slow, 6.0, b"X-Slow: 1\r\n")
        assert (
            closed is not None
        )  # cut off within the 6 s looked at (before: open for as long as it liked)


def test_a_slow_body_gets_408_and_frees_its_upload_slot(tmp_path):
    """A body sent at ~40 bytes/s holds the only upload slot for about body_grace_s, then gets
    408 and the connection is closed; the next upload is classified."""
    from tests.test_serve import phantom_png

    with ServerProcess(tmp_path, "--set", "max_pending_uploads=1",
                       "--set", "body_grace_s=1") as server:  # fmt: skip
        server.wait_ready()
        with socket.create_connection(("127.0.0.1", server.port)) as slow:
            slow.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: cart\r\nContent-Type: image/png\r\n"
                         b"Content-Length: 100000\r\n\r\n")  # fmt: skip
            time.sleep(0.3)
            busy = httpx.post(server.url + "/v1/classify", content=phantom_png(),
                              headers={"Content-Type": "image/png"}, timeout=5)  # fmt: skip
            assert busy.status_code == 503  # the slot is the slow client's for now
            answer = b""
            started = time.monotonic()
            slow.settimeout(0.25)
            while time.monotonic() - started < 6 and b"\r\n\r\n" not in answer:
                try:
                    slow.sendall(b"0123456789")
                    answer += slow.recv(4096)
                except TimeoutError:
                    continue
                except OSError:  # closed after the answer
                    break
            assert answer.startswith(b"HTTP/1.1 408 "), answer
            assert b"connection: close" in answer.lower()  # within the 6 s looked at, not at 60 s
        ok = httpx.post(server.url + "/v1/classify", content=phantom_png(),
                        headers={"Content-Type": "image/png"}, timeout=5)  # fmt: skip
        assert ok.status_code == 200, ok.text
        assert 'edgebc_uploads_total{outcome="too_slow"} 1.0' in server.get("/metrics").text


@pytest.mark.slow
def test_the_overload_benchmark_runs_as_a_smoke_test(tmp_path):
    """benchmarks/overload.py --quick against a real server: every answer a decision or a 503
    with Retry-After, no connection errors (its numbers are the benchmark's, not asserted here)."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "overload.py"
    result = subprocess.run([sys.executable, str(script), "--quick", "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=240)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    rows = json.loads((tmp_path / "overload.json").read_text())["rows"]
    assert [row["clients"] for row in rows] == [1, 4, 16]
    assert rows[0]["refused_share"] == 0 and rows[0]["p99_ratio"] == 1.0
    for row in rows:
        assert row["accepted"] > 0 and row["other_statuses"] == 0 and row["errors"] == 0, row
        assert set(row["retry_after"]) <= {"1"}
