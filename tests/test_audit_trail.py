"""The audit trail: append-only, private by default, whole after a kill, and patient through a full disk."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import numpy as np
import pytest

from edgebc.audit_trail import AuditRecord, AuditTrail, read_trail


def record(k, **extra):
    return AuditRecord(
        model_sha256="ab" * 32, quality="ok", decision="benign", smoothed_decision="benign",
        probabilities={"normal": 0.1, "benign": 0.7, "malignant": 0.2}, threshold=0.3, captured_at=time.time(),
        source="phantom:benign", frame_index=k, frame_sha256=f"{k:064x}", latencies_ms={"inference": 1.5}, **extra,
    )  # fmt: skip


def test_rows_are_whole_and_the_log_is_append_only(tmp_path):
    trail = AuditTrail(tmp_path / "audit.db")
    for k in range(20):
        trail.record(record(k))
    assert trail.flush(5.0)
    trail.close()
    rows = read_trail(tmp_path / "audit.db")
    assert [r["frame_index"] for r in rows] == list(range(20))
    assert json.loads(rows[0]["probabilities"])["benign"] == 0.7 and rows[0][
        "captured_at"
    ].endswith("+00:00")
    connection = sqlite3.connect(tmp_path / "audit.db")
    for statement in ("UPDATE decisions SET decision = 'normal'", "DELETE FROM decisions"):
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            connection.execute(statement)
    assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_no_pixels_or_patient_ids_unless_the_site_opts_in(tmp_path):
    frame = np.full((8, 8), 100, np.uint8)
    private = AuditTrail(tmp_path / "private.db")
    private.record(record(0, pixels=frame, patient_id="MRN-12345"))
    private.close()
    row = read_trail(tmp_path / "private.db")[0]
    assert row["pixels"] is None and row["patient_id"] is None
    opted = AuditTrail(tmp_path / "opted.db", store_pixels=True, store_patient_ids=True)
    opted.record(record(0, pixels=frame, patient_id="MRN-12345"))
    opted.close()
    row = read_trail(tmp_path / "opted.db")[0]
    assert row["pixels"].startswith(b"\x89PNG") and row["patient_id"] == "MRN-12345"


WRITER = r"""
import sys, time
sys.path.insert(0, {tests!r})
from test_audit_trail import record
from edgebc.audit_trail import AuditTrail
trail = AuditTrail({db!r}, flush_interval=0.02)
k = 0
while True:
    trail.record(record(k)); k += 1
    if k % 25 == 0:
        trail.flush(5.0)
        print("committed", trail.status().written, flush=True)
    time.sleep(0.001)
"""


def test_every_committed_record_survives_a_kill_mid_stream(tmp_path):
    db = tmp_path / "audit.db"
    script = WRITER.format(tests=os.path.dirname(__file__), db=str(db))
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    committed = 0
    try:
        while committed < 300:
            line = child.stdout.readline()
            assert line, "writer died early"
            committed = int(line.split()[1])
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    rows = read_trail(db)  # integrity_check passes
    assert len(rows) >= committed
    assert [r["id"] for r in rows] == list(range(1, len(rows) + 1))
    assert [r["frame_index"] for r in rows] == list(range(len(rows)))
    assert all(json.loads(r["probabilities"])["benign"] == 0.7 for r in rows)


def test_a_full_disk_turns_unhealthy_keeps_records_and_recovers(tmp_path):
    db = tmp_path / "audit.db"
    trail = AuditTrail(db, flush_interval=0.02, max_bytes=48 * 1024)
    for k in range(600):
        trail.record(record(k))
    deadline = time.monotonic() + 5
    while trail.status().healthy and time.monotonic() < deadline:
        time.sleep(0.02)
    status = trail.status()
    assert not status.healthy and "cannot be written" in status.problem and status.pending > 0
    assert len(read_trail(db)) < 600  # what is there is whole (integrity check passed)
    trail.set_max_bytes(None)  # space is back
    assert trail.flush(15.0)
    status = trail.status()
    assert status.healthy and status.written == 600 and status.lost == 0
    trail.close()
    assert [r["frame_index"] for r in read_trail(db)] == list(range(600))
