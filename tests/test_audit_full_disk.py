"""A full disk loses no audit record silently: the fallback journal, its replay, failing closed
(issue 18: a clean stop on a full disk dropped 239 records while the log said "committed")."""

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from edgebc.audit_chain import read_key, verify_trail
from edgebc.audit_journal import JournalDamagedError
from edgebc.audit_trail import AuditTrail, AuditUnavailableError, read_trail
from tests.test_audit_trail import record

FULL = 48 * 1024  # max_bytes: the trail fills after a few dozen records, like a full disk


def paths(tmp_path):
    """The trail in its folder; the key and the journal elsewhere (as the service keeps them)."""
    return tmp_path / "trail" / "audit.db", tmp_path / "state" / "audit.key", tmp_path / "state" / "audit.journal"  # fmt: skip


def journal_lines(journal):
    """Records in the journal file (its first line is the header)."""
    return len(journal.read_text().splitlines()) - 1 if journal.exists() else 0


def wait_for(predicate, timeout=10.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def fill(trail, n, pause=0.0):
    for k in range(n):
        trail.record(record(k))
        if pause:
            time.sleep(pause)


def test_a_full_trail_journals_records_and_replays_them_once_in_order(tmp_path):
    db, key, journal = paths(tmp_path)
    trail = AuditTrail(db, flush_interval=0.02, max_bytes=FULL, max_held=1000, key_path=key,
                       journal_path=journal)  # fmt: skip
    fill(trail, 600)
    status = wait_for(lambda: (s := trail.status()).pending == 0 and s, what="every record durable")
    # exact: each record is in the trail or in the journal, none held, none lost
    assert (
        not status.healthy
        and "cannot be written" in status.problem
        and str(journal) in status.problem
    )
    assert status.journalled > 0 and status.lost == 0 and status.withheld == 0
    assert status.written == len(read_trail(db)) and status.journalled == journal_lines(journal)
    assert status.written + status.journalled == 600
    assert f"{status.journalled} records in the fallback journal" in status.problem
    trail.set_max_bytes(None)  # space is back: the journal is replayed, then writing goes on
    trail.record(record(600))
    assert trail.flush(15.0)
    status = trail.status()
    assert (
        status.healthy and status.written == 601 and status.journalled == 0 and not journal.exists()
    )
    assert trail.summary().startswith("audit log committed")
    trail.close()
    assert [r["frame_index"] for r in read_trail(db)] == list(range(601))
    verdict = verify_trail(db, key=read_key(key))
    assert verdict.ok and verdict.records == 601, verdict.line()
    assert any("replayed from the fallback journal" in note for note in verdict.notes), (
        verdict.notes
    )


def test_a_stop_on_a_full_disk_says_what_is_journalled_and_the_next_start_replays_it(
    tmp_path, caplog
):
    db, key, journal = paths(tmp_path)
    trail = AuditTrail(db, flush_interval=0.02, max_bytes=FULL, max_held=1000, key_path=key,
                       journal_path=journal)  # fmt: skip
    fill(trail, 400)
    with caplog.at_level(logging.INFO, logger="edgebc.audit_trail"):
        trail.close()
    status = trail.status()
    written, journalled = status.written, status.journalled
    assert written + journalled == 400 and journalled > 0 and status.pending == status.lost == 0
    line = trail.summary()
    assert line.startswith("audit log NOT fully committed")
    assert (
        f"{written} written, {journalled} journalled in {journal}" in line
        and "0 held, 0 lost" in line
    )
    assert any(line in message for message in caplog.messages)  # the closing line says it too
    assert len(read_trail(db)) == written and journal_lines(journal) == journalled

    with caplog.at_level(logging.WARNING, logger="edgebc.audit_trail"):
        again = AuditTrail(db, key_path=key, journal_path=journal)  # no cap: the disk has room
    assert f"{journalled} records replayed from the fallback journal" in caplog.text
    assert again.status().healthy and again.status().written == journalled and not journal.exists()
    again.close()
    assert [r["frame_index"] for r in read_trail(db)] == list(range(400))
    assert verify_trail(db, key=read_key(key)).ok


def test_a_replay_cut_off_before_the_journal_is_removed_writes_nothing_twice(tmp_path):
    db, key, journal = paths(tmp_path)
    trail = AuditTrail(db, flush_interval=0.02, max_bytes=FULL, max_held=1000, key_path=key,
                       journal_path=journal)  # fmt: skip
    fill(trail, 300)
    trail.close()
    kept = tmp_path / "journal-copy"
    shutil.copy(journal, kept)
    AuditTrail(db, key_path=key, journal_path=journal).close()  # replays, removes the journal
    shutil.copy(kept, journal)  # as if a crash came between the commit and the removal
    third = AuditTrail(db, key_path=key, journal_path=journal)
    assert third.status().written == 0 and not journal.exists()
    third.close()
    assert [r["frame_index"] for r in read_trail(db)] == list(range(300))  # exactly once


def test_a_torn_journal_line_is_counted_lost_and_an_edited_one_refused(tmp_path):
    db, key, journal = paths(tmp_path)
    trail = AuditTrail(db, flush_interval=0.02, max_bytes=FULL, max_held=1000, key_path=key,
                       journal_path=journal)  # fmt: skip
    fill(trail, 300)
    trail.close()
    journalled = trail.status().journalled
    good = journal.read_bytes()
    edited = good.replace(b'"benign"', b'"normal"', 1)
    journal.write_bytes(edited)
    with pytest.raises(JournalDamagedError, match="MAC does not match"):
        AuditTrail(db, key_path=key, journal_path=journal)
    journal.write_bytes(good + b'{"row":["2026-')  # a kill in the middle of a write
    again = AuditTrail(db, key_path=key, journal_path=journal)
    status = again.status()
    assert status.lost == 1 and status.written == journalled and "1 lost" in again.summary()
    again.close()
    assert [r["frame_index"] for r in read_trail(db)] == list(range(300))


def test_neither_trail_nor_journal_writable_withholds_decisions_beyond_max_held(tmp_path):
    db, key, _ = paths(tmp_path)
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the journal's folder should be")  # every write to it fails
    trail = AuditTrail(db, flush_interval=0.02, max_bytes=FULL, max_held=20, key_path=key,
                       journal_path=blocked / "audit.journal")  # fmt: skip
    accepted = withheld = 0
    refusals: list[str] = []
    for k in range(400):
        try:
            trail.record(record(k))
            accepted += 1
        except AuditUnavailableError as exc:
            withheld += 1
            refusals.append(str(exc))
        time.sleep(0.001)
    assert all("20 records already held in memory (audit.max_held)" in text for text in refusals)
    status = trail.status()
    assert withheld > 0 and status.withheld == withheld and status.pending == 20
    assert not status.healthy
    assert "the fallback journal cannot be written either" in status.problem
    assert (
        "20 records held in memory" in status.problem and "new decisions withheld" in status.problem
    )
    assert status.written + status.pending == accepted  # nothing accepted is unaccounted for
    trail.close(timeout=0.5)
    status = trail.status()
    assert status.lost == 20 and status.pending == 0 and status.written + status.lost == accepted
    assert "20 lost" in trail.summary() and trail.summary().startswith(
        "audit log NOT fully committed"
    )
    assert len(read_trail(db)) == status.written


def test_a_journal_that_becomes_writable_takes_the_held_records(tmp_path):
    db, key, _ = paths(tmp_path)
    blocked = tmp_path / "later"
    blocked.write_text("")
    journal = blocked / "audit.journal"
    trail = AuditTrail(db, flush_interval=0.02, max_bytes=FULL, max_held=1000, key_path=key,
                       journal_path=journal)  # fmt: skip
    fill(trail, 300)
    wait_for(lambda: "held in memory" in (trail.status().problem or ""), what="records held")
    blocked.unlink()
    blocked.mkdir()
    status = wait_for(
        lambda: (s := trail.status()).pending == 0 and s, what="the journal to take them"
    )
    assert status.written + status.journalled == 300 and status.journalled == journal_lines(journal)
    trail.close()
    AuditTrail(db, key_path=key, journal_path=journal).close()
    assert [r["frame_index"] for r in read_trail(db)] == list(range(300))


def test_the_journal_is_never_in_the_trails_own_folder(tmp_path):
    db, _, _ = paths(tmp_path)
    with pytest.raises(ValueError, match="own directory"):
        AuditTrail(db, journal_path=db.parent / "audit.journal")


# -- a real full disk: a 1 MiB tmpfs under the trail --------------------------------------------


@pytest.fixture
def tiny_disk(tmp_path):
    """A 1 MiB tmpfs mounted for the trail (needs root, or CAP_SYS_ADMIN)."""
    folder = tmp_path / "tiny"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)],
                             capture_output=True, text=True)  # fmt: skip
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def test_a_clean_stop_of_the_server_on_a_really_full_disk_loses_nothing(tmp_path, tiny_disk):
    pytest.importorskip("uvicorn", reason="needs the [serve] extra")
    from tests.serve_process import ServerProcess

    audit = tiny_disk / "audit.sqlite"
    journal = tmp_path / "state" / "audit.journal"
    key = tmp_path / "state" / "audit.key"
    # stored pixels fill the 1 MiB within seconds
    with ServerProcess(tmp_path, "--audit-log", str(audit), "--set", "audit.store_pixels=true",
                       "--set", f"audit.fallback_path={json.dumps(str(journal))}",
                       "--set", f"audit.key_path={json.dumps(str(key))}") as server:  # fmt: skip
        wait_for(lambda: server.process.poll() is None and journal.exists(), timeout=60.0,
                 what="the trail to fill and records to reach the journal")  # fmt: skip
        time.sleep(0.5)
        frames = server.get("/v1/status").json()["counts"]["frames"]
        assert server.stop(signal.SIGTERM) == 0, server.output()
        output = server.output()
    line = next(text for text in output.splitlines() if "stopped on SIGTERM" in text)
    assert "audit log NOT fully committed" in line and "0 held, 0 lost" in line, line
    written = int(line.split(" written, ")[0].rsplit(" ", 1)[1])
    journalled = int(line.split(" journalled")[0].rsplit(" ", 1)[1])
    assert len(read_trail(audit)) == written and journal_lines(journal) == journalled > 0
    assert written + journalled >= frames > 0  # every frame classified up to the stop: 0 lost
    # Space back (a bigger tmpfs): the next start replays the journal, chained, in order.
    subprocess.run(["mount", "-o", "remount,size=64m", str(tiny_disk)], check=True)
    trail = AuditTrail(audit, key_path=key, journal_path=journal)
    trail.close()
    rows = read_trail(audit)
    assert len(rows) == written + journalled and not journal.exists()
    indices = [r["frame_index"] for r in rows]
    assert indices == sorted(indices) and len(set(indices)) == len(indices)
    assert verify_trail(audit, key=read_key(key)).ok


# -- SIGKILL while neither the trail nor the journal can be written -----------------------------

KILLED = r"""
import sys, time
sys.path.insert(0, {root!r})
from tests.test_audit_trail import record
from edgebc.audit_trail import AuditTrail, AuditUnavailableError
trail = AuditTrail({db!r}, flush_interval=0.02, max_bytes={full}, max_held={held},
                   key_path={key!r}, journal_path={journal!r})
k = 0
while True:
    try:
        trail.record(record(k))
        print("accepted", k, flush=True)
    except AuditUnavailableError:
        print("withheld", k, flush=True)
    k += 1
    time.sleep(0.002)
"""


def test_a_kill_while_nothing_can_be_written_loses_at_most_max_held(tmp_path, caplog):
    db, key, _ = paths(tmp_path)
    blocked = tmp_path / "blocked"
    blocked.write_text("")
    journal = blocked / "audit.journal"
    held = 25
    script = KILLED.format(root=os.path.dirname(os.path.dirname(__file__)), db=str(db), full=FULL,
                           held=held, key=str(key), journal=str(journal))  # fmt: skip
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    accepted = withheld = 0
    try:
        while withheld < 50:
            line = child.stdout.readline()
            assert line, "the writer died early"
            accepted += line.startswith("accepted")
            withheld += line.startswith("withheld")
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    blocked.unlink()  # the operator frees the journal's disk; the trail is restarted
    with caplog.at_level(logging.WARNING, logger="edgebc.audit_trail"):
        again = AuditTrail(db, key_path=key, journal_path=journal)
    again.close()
    rows = len(read_trail(db))
    assert 0 < accepted - rows <= held, (accepted, rows)  # the bound, and exactly what it cost
    assert "was not closed by the process that last wrote it" in caplog.text
    assert "at most audit.max_held" in caplog.text
    assert verify_trail(db, key=read_key(key)).ok


# -- the service fails closed --------------------------------------------------------------------


def test_the_service_withholds_decisions_and_refuses_uploads_it_cannot_record(tmp_path):
    pytest.importorskip("fastapi", reason="needs the [serve] extra")
    from fastapi.testclient import TestClient

    from edgebc.serve.app import create_app
    from edgebc.serve.runtime import build_runtime
    from tests.test_serve import phantom_png, settings_for

    blocked = tmp_path / "blocked"
    blocked.write_text("")
    audit = {"path": str(tmp_path / "trail" / "a.sqlite"), "max_bytes": FULL, "max_held": 8,
             "fallback_path": str(blocked / "audit.journal")}  # fmt: skip
    runtime = build_runtime(settings_for(tmp_path, audit=audit))
    with TestClient(create_app(runtime)) as client:
        ready = wait_for(lambda: "withheld" in ((r := client.get("/readyz")).json()["checks"]["audit_log"]["detail"]) and r,
                         timeout=30.0, what="the trail and journal to fail and decisions withheld")  # fmt: skip
        assert ready.status_code == 503
        detail = ready.json()["checks"]["audit_log"]["detail"]
        assert "cannot be written" in detail and "8 records held in memory" in detail, detail
        view = wait_for(lambda: (v := client.get("/v1/status").json())["display"]["label"] is None and v,
                        what="the live decision withdrawn")  # fmt: skip
        assert "audit trail" in view["display"]["reason"]
        upload = client.post(
            "/v1/classify", content=phantom_png(), headers={"Content-Type": "image/png"}
        )
        assert upload.status_code == 503 and "audit.max_held" in upload.json()["detail"]
        assert upload.headers["Retry-After"]
        metrics = client.get("/metrics").text
        assert "edgebc_audit_decisions_withheld_total" in metrics
        assert "edgebc_audit_records_journalled 0.0" in metrics
    status = runtime.audit.status()
    # after the stop: every accepted record is written or counted lost, each withheld one counted
    assert status.pending == 0 and status.lost == 8 and status.withheld > 0
    assert status.written == len(read_trail(tmp_path / "trail" / "a.sqlite"))
