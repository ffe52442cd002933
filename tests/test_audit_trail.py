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
    trail = AuditTrail(db, flush_interval=0.02, max_bytes=48 * 1024, max_held=1000)
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


def test_the_held_count_is_every_record_waiting_not_one_batch(tmp_path):
    """Issue 18: readiness said "1 records held in memory" while 1,862 were held."""
    trail = AuditTrail(
        tmp_path / "audit.db", flush_interval=0.02, max_bytes=48 * 1024, max_held=1000
    )
    for k in range(600):
        trail.record(record(k))
    deadline, problem, pending = time.monotonic() + 5, "", -1
    while time.monotonic() < deadline:  # the message is rewritten at every failed retry
        status = trail.status()
        problem, pending = status.problem or "", status.pending
        if f"; {pending} records held in memory" in problem:
            break
        time.sleep(0.05)
    assert pending > 256 and f"; {pending} records held in memory" in problem, (pending, problem)
    trail.set_max_bytes(None)
    trail.close()


# -- the hash chain (issue 18: append-only was only a trigger) ---------------------------------


def chained(tmp_path, n=30):
    """A closed trail of `n` records with its key and anchor file outside the trail's directory."""
    db, key, anchors = tmp_path / "trail" / "audit.db", tmp_path / "keys" / "audit.key", tmp_path / "keys" / "anchors"  # fmt: skip
    trail = AuditTrail(db, key_path=key, anchor_path=anchors)
    for k in range(n):
        trail.record(record(k))
    assert trail.flush(5.0)
    head = trail.status()
    trail.close()
    return db, key, anchors, head


def tamper(db, *statements):
    """What someone holding the audit file can do: make it writable (a sealed segment is
    read-only), drop the triggers and edit rows."""
    os.chmod(db, 0o644)
    connection = sqlite3.connect(db, isolation_level=None)
    connection.execute("DROP TRIGGER IF EXISTS decisions_no_update")
    connection.execute("DROP TRIGGER IF EXISTS decisions_no_delete")
    for statement in statements:
        connection.execute(statement)
    connection.close()


def verify(db, key=None, anchors=None):
    from edgebc.audit_chain import read_key, verify_trail

    return verify_trail(db, key=None if key is None else read_key(key), anchor_path=anchors)


def test_a_clean_trail_verifies_and_the_head_is_reported(tmp_path, capsys):
    from edgebc.cli import main

    db, key, anchors, status = chained(tmp_path)
    verdict = verify(db, key, anchors)
    assert verdict.ok and verdict.records == 30 and verdict.head_id == 30, verdict
    assert (status.head_id, status.head) == (30, verdict.head)  # what /v1/status shows
    assert any("covers records 1..30" in note for note in verdict.notes)
    assert main(["audit", "verify", str(db), "--key", str(key), "--anchor", str(anchors)]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"{db}: OK: 30 records") and "\n" not in line


def test_an_update_after_drop_trigger_is_named(tmp_path, capsys):
    from edgebc.cli import main

    db, key, _, _ = chained(tmp_path)
    tamper(db, "UPDATE decisions SET decision = 'malignant' WHERE id = 7")
    verdict = verify(db)
    assert not verdict.ok and "record 7 was changed" in verdict.problem, verdict
    assert main(["audit", "verify", str(db), "--key", str(key)]) == 1
    assert "BROKEN: first broken record: record 7 was changed" in capsys.readouterr().out


def test_a_recomputed_chain_fails_on_the_key_and_the_anchor(tmp_path):
    from edgebc.audit_chain import CHAINED_COLUMNS, GENESIS, record_hash

    db, key, anchors, _ = chained(tmp_path)
    connection = sqlite3.connect(db, isolation_level=None)
    connection.execute("DROP TRIGGER decisions_no_update")
    connection.execute("UPDATE decisions SET decision = 'malignant' WHERE id = 7")
    previous = GENESIS
    rows = connection.execute(f"SELECT id, {', '.join(CHAINED_COLUMNS)} FROM decisions ORDER BY id")
    for record_id, *fields in rows.fetchall():  # the attacker rewrites every hash after the change
        previous = record_hash(previous, fields)
        connection.execute("UPDATE decisions SET chain = ? WHERE id = ?", (previous, record_id))
    connection.close()
    assert verify(db).ok  # the chain alone cannot tell ...
    by_key = verify(db, key=key)  # ... the MAC under a key the attacker lacks can
    assert not by_key.ok and "record 7: its MAC does not match" in by_key.problem, by_key
    by_anchor = verify(db, anchors=anchors)  # and so can the exported head
    assert not by_anchor.ok and "differs from the anchor" in by_anchor.problem, by_anchor


def test_a_deleted_row_is_named(tmp_path):
    db, key, anchors, _ = chained(tmp_path)
    tamper(db, "DELETE FROM decisions WHERE id = 12")
    verdict = verify(db, key, anchors)
    assert not verdict.ok and "record 12 deleted" in verdict.problem, verdict


def test_swapped_rows_are_named(tmp_path):
    db, key, anchors, _ = chained(tmp_path)
    tamper(db, "UPDATE decisions SET id = -5 WHERE id = 5", "UPDATE decisions SET id = 5 WHERE id = 6",
           "UPDATE decisions SET id = 6 WHERE id = -5")  # fmt: skip
    verdict = verify(db, key, anchors)
    assert not verdict.ok and "record 5 is out of order" in verdict.problem, verdict


def test_a_truncated_tail_shows_against_the_anchor(tmp_path):
    db, key, anchors, _ = chained(tmp_path)
    tamper(db, "DELETE FROM decisions WHERE id > 25")
    assert verify(db, key).ok  # what is left is a whole chain: only an anchor can tell
    verdict = verify(db, key, anchors)
    assert not verdict.ok and "records 26..30 are missing (truncated tail" in verdict.problem, (
        verdict
    )


OLD_SCHEMA = """
CREATE TABLE decisions (id INTEGER PRIMARY KEY AUTOINCREMENT, logged_at TEXT NOT NULL, captured_at TEXT,
    source TEXT, frame_index INTEGER, frame_sha256 TEXT, model_sha256 TEXT NOT NULL, probabilities TEXT,
    decision TEXT, smoothed_decision TEXT, threshold REAL, quality TEXT NOT NULL, latencies_ms TEXT,
    pixels BLOB, patient_id TEXT);
CREATE TRIGGER decisions_no_update BEFORE UPDATE ON decisions
    BEGIN SELECT RAISE(ABORT, 'the audit trail is append-only'); END;
CREATE TRIGGER decisions_no_delete BEFORE DELETE ON decisions
    BEGIN SELECT RAISE(ABORT, 'the audit trail is append-only'); END;
"""


def test_an_older_log_gets_its_chain_and_verifies(tmp_path):
    db, key = tmp_path / "trail" / "old.db", tmp_path / "keys" / "audit.key"
    db.parent.mkdir()
    connection = sqlite3.connect(db)
    connection.executescript(OLD_SCHEMA)
    for k in range(3):
        connection.execute("INSERT INTO decisions (logged_at, model_sha256, quality, frame_index, threshold, "
                           "pixels) VALUES ('2024-01-01T00:00:00.000+00:00', 'ab', 'ok', ?, 0.3, ?)", (k, b"\x89PNG"))  # fmt: skip
    connection.commit()
    connection.close()
    trail = AuditTrail(db, key_path=key)
    trail.record(record(3))
    trail.close()
    verdict = verify(db, key)
    assert verdict.ok and verdict.records == 4, verdict
    assert any(
        "records 1..3 were written before the chain and chained on" in n for n in verdict.notes
    )
    assert [r["frame_index"] for r in read_trail(db)] == [0, 1, 2, 3]
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):  # the trigger is back
        sqlite3.connect(db).execute("UPDATE decisions SET decision = 'normal'")


def test_the_key_file_is_created_private_and_never_beside_the_trail(tmp_path):
    key = tmp_path / "keys" / "audit.key"
    AuditTrail(tmp_path / "trail" / "audit.db", key_path=key).close()
    assert key.stat().st_mode & 0o777 == 0o600
    first = key.read_text()
    AuditTrail(tmp_path / "trail" / "audit.db", key_path=key).close()
    assert key.read_text() == first  # kept, not replaced
    with pytest.raises(ValueError, match="own directory"):
        AuditTrail(tmp_path / "trail" / "audit.db", key_path=tmp_path / "trail" / "audit.key")
