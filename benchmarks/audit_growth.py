"""How fast the audit trail grows on the demo: bytes per record, records and MB per day, per mode.

    python benchmarks/audit_growth.py [--seconds 60] [--modes every_frame changes] [--port 8766]

Runs a real `edgebc serve` on the embedded demo (phantom model, phantom tour at 30 fps) for
--seconds per `audit.record` mode, each with its own trail and key in a temporary folder, stops it
with SIGTERM (every record committed), then counts the records and the bytes of every segment of
the trail. Per day = the measured bytes per second of stream, scaled to 86,400 s; the frame rate
the loop really reached is printed beside it (on a loaded machine it is below 30 fps, and
every_frame's figure is then scaled by 30 / fps to say what a 30 fps cart writes).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

DAY = 86400.0


def measure(mode: str, seconds: float, port: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as folder:
        trail = Path(folder) / "trail" / "audit.sqlite"
        env = {**os.environ, "XDG_STATE_HOME": str(Path(folder) / "state")}
        command = [sys.executable, "-m", "edgebc", "serve", "--port", str(port), "--audit-log", str(trail),
                   "--set", f"audit.record={mode}", "--set", "threads=1"]  # fmt: skip
        server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        try:
            _wait_frames(port, 0, 120.0)
            time.sleep(seconds)
            status = _status(port)
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(60)
        files = [
            f
            for f in trail.parent.glob(trail.name + "*")
            if not f.name.endswith((".lock", ".json"))
        ]
        size = sum(f.stat().st_size for f in files)
        records = 0
        for f in files:
            connection = sqlite3.connect(f"file:{f}?mode=ro", uri=True)
            records += connection.execute("SELECT count(*) FROM decisions").fetchone()[0]
            connection.close()
    frames, fps = int(status["counts"]["frames"]), float(status["fps"])
    # a record's own bytes: the files less what an empty trail file takes (schema pages), which
    # would otherwise swamp the few records of a short changes run
    per_record = (size - len(files) * _empty_trail_bytes()) / records
    # every_frame: one record per frame, 30 a second on a cart; changes: what the stream's own
    # seconds produced (its samples and the tour's changes are per second, not per frame)
    per_second = 30.0 if mode == "every_frame" else records / (frames / fps)
    return {"fps": round(fps, 1), "frames": frames, "records": records, "files_bytes": size,
            "bytes_per_record": round(per_record), "records_per_day": round(per_second * DAY),
            "mb_per_day": round(per_record * per_second * DAY / 1e6, 1)}  # fmt: skip


def _empty_trail_bytes() -> int:
    from edgebc.audit_trail import AuditTrail

    with tempfile.TemporaryDirectory() as folder:
        trail = AuditTrail(Path(folder) / "empty.sqlite")
        trail.close()
        return (Path(folder) / "empty.sqlite").stat().st_size


def _status(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/status", timeout=5) as answer:
        return json.load(answer)  # type: ignore[no-any-return]


def _wait_frames(port: int, least: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            frames = int(_status(port)["counts"]["frames"])
            if frames > least:
                return frames
        except (OSError, KeyError, ValueError):
            pass
        time.sleep(0.5)
    raise TimeoutError(f"the demo server on port {port} did not classify frames within {timeout} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--modes", nargs="+", default=["every_frame", "changes"])
    parser.add_argument("--port", type=int, default=8766)
    args = parser.parse_args()
    for mode in args.modes:
        print(mode, json.dumps(measure(mode, args.seconds, args.port)), flush=True)


if __name__ == "__main__":
    main()
