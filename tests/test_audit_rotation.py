"""The audit trail rotates, is archived and retired without a gap in its chain, records changes
when asked to, and has one writer (issue 19: 1.8 GB a day at 30 fps, nothing rotated or retired)."""

import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time

import numpy as np
import pytest

from edgebc.audit_archive import ArchiveError, archive_segments, read_record, retire_segments
from edgebc.audit_chain import read_key, verify_trail
from edgebc.audit_segments import AuditLockedError, next_live_path, sealed_segments
from edgebc.audit_trail import AuditTrail, _prepare_segment, read_trail
from tests.test_audit_full_disk import FULL, journal_lines, wait_for
from tests.test_audit_trail import record, tamper


def paths(tmp_path):
    return tmp_path / "trail" / "audit.db", tmp_path / "state" / "audit.key", tmp_path / "state" / "audit.anchors"  # fmt: skip


def open_trail(tmp_path, **options):
    db, key, anchors = paths(tmp_path)
    return AuditTrail(db, flush_interval=0.02, key_path=key, anchor_path=anchors, **options)


def segmented(tmp_path, segments=3, per=10, **options):
    """A closed trail of `segments` sealed segments of `per` records each, and a live one of `per`."""
    trail = open_trail(tmp_path, **options)
    k = 0
    for _ in range(segments + 1):
        for _ in range(per):
            trail.record(record(k))
            k += 1
        assert trail.flush(5.0)
        if len(sealed_segments(trail.path)) < segments:
            assert trail.rotate_now()
    trail.close()
    return paths(tmp_path)


def ids_of(segment):
    connection = sqlite3.connect(f"file:{segment}?mode=ro", uri=True)
    try:
        return [row[0] for row in connection.execute("SELECT id FROM decisions ORDER BY id")]
    finally:
        connection.close()


def test_size_rotation_continues_the_ids_and_the_chain_across_segments(tmp_path, capsys):
    from edgebc.cli import main

    trail = open_trail(tmp_path, rotate_bytes=1)  # every batch with records seals the live file
    for k in range(60):
        trail.record(record(k))
        if k % 15 == 14:
            assert trail.flush(5.0)
            wait_for(lambda: trail._live_since is None, what="the rotation after the batch")
    trail.close()
    db, key, anchors = paths(tmp_path)
    sealed = [segment for _, segment in sealed_segments(db)]
    assert len(sealed) >= 4 and sealed[0].name == "audit.db.000001"
    ids = [i for segment in [*sealed, db] for i in ids_of(segment)]
    assert ids == list(range(1, 61))  # ids continue; nothing lost or written twice
    assert all(ids_of(segment) for segment in sealed)  # no empty sealed segment
    assert not (os.stat(sealed[0]).st_mode & 0o222)  # sealed read-only
    assert not db.with_name("audit.db.000001-wal").exists()  # one self-contained file
    verdict = verify_trail(db, read_key(key), anchors)
    assert verdict.ok and verdict.records == 60 and verdict.head_id == 60, verdict
    assert f"{len(sealed) + 1} segments (audit.db.000001 .. audit.db) in order" in verdict.notes
    assert verify_trail(db.parent, read_key(key), anchors).ok  # the folder, too
    assert (
        main(["audit", "verify", str(db.parent), "--key", str(key), "--anchor", str(anchors)]) == 0
    )
    assert "OK: 60 records" in capsys.readouterr().out


def test_a_changed_record_in_a_sealed_segment_is_named_with_its_segment(tmp_path):
    db, key, _ = segmented(tmp_path)
    second = db.with_name("audit.db.000002")
    victim = ids_of(second)[3]
    tamper(second, f"UPDATE decisions SET decision = 'malignant' WHERE id = {victim}")
    verdict = verify_trail(db, read_key(key))
    assert not verdict.ok
    assert f"record {victim} in audit.db.000002 was changed" in verdict.problem, verdict


def test_a_missing_reordered_or_replaced_segment_is_named(tmp_path):
    db, key, anchors = segmented(tmp_path)
    one, two, three = (db.with_name(f"audit.db.00000{n}") for n in (1, 2, 3))
    saved = tmp_path / "saved"
    saved.mkdir()
    shutil.move(two, saved / two.name)
    verdict = verify_trail(db, read_key(key))
    assert not verdict.ok and "audit.db.000002 (records up to 20), which audit.db.000003 follows, is missing" in verdict.problem, verdict  # fmt: skip
    shutil.move(saved / two.name, two)
    # the oldest segment gone, with no archive record saying it was retired
    shutil.move(one, saved / one.name)
    verdict = verify_trail(db, read_key(key))
    assert not verdict.ok and "audit.db.000001 (records up to 10), which audit.db.000002 follows, is missing" in verdict.problem, verdict  # fmt: skip
    shutil.move(saved / one.name, one)
    # two segments swapped by name
    os.rename(two, saved / "x")
    os.rename(three, two)
    os.rename(saved / "x", three)
    verdict = verify_trail(db, read_key(key))
    assert not verdict.ok and "out of order" in verdict.problem, verdict
    os.rename(two, saved / "x")
    os.rename(three, two)
    os.rename(saved / "x", three)
    assert verify_trail(db, read_key(key), anchors).ok
    # a segment whose tail was cut off: the next one follows a record it no longer has
    tamper(two, "DELETE FROM decisions WHERE id > 17")
    verdict = verify_trail(db, read_key(key))
    assert not verdict.ok and "audit.db.000002 was changed or replaced" in verdict.problem, verdict


def test_a_rotation_cut_off_by_a_kill_loses_nothing_and_keeps_one_chain(tmp_path):
    db, key, anchors = paths(tmp_path)
    trail = open_trail(tmp_path)
    for k in range(10):
        trail.record(record(k))
    trail.close()
    head = (10, read_trail(db)[-1]["chain"])
    # killed after preparing the next file, before sealing: the live file goes on
    _prepare_segment(next_live_path(db), "audit.db.000001", head)
    trail = open_trail(tmp_path)
    assert not next_live_path(db).exists() and not sealed_segments(db)
    for k in range(10, 15):
        trail.record(record(k))
    trail.close()
    head = (15, read_trail(db)[-1]["chain"])
    # killed after sealing, before the prepared file was renamed into place
    _prepare_segment(next_live_path(db), "audit.db.000001", head)
    os.rename(db, db.with_name("audit.db.000001"))
    trail = open_trail(tmp_path)
    assert not next_live_path(db).exists() and len(sealed_segments(db)) == 1
    for k in range(15, 20):
        trail.record(record(k))
    trail.close()
    # killed after sealing and before even preparing (or the live file lost): chained on anyway
    os.rename(db, db.with_name("audit.db.000002"))
    trail = open_trail(tmp_path)
    for k in range(20, 25):
        trail.record(record(k))
    trail.close()
    verdict = verify_trail(db, read_key(key), anchors)
    assert verdict.ok and verdict.records == 25 and verdict.head_id == 25, verdict
    assert [r["frame_index"] for r in read_trail(db)] == list(range(20, 25))


def test_journalled_records_replay_once_into_the_live_segment_before_a_rotation(tmp_path):
    db, key, anchors = paths(tmp_path)
    journal = tmp_path / "state" / "audit.journal"
    trail = open_trail(tmp_path, max_bytes=FULL, journal_path=journal, max_held=1000)
    for k in range(400):  # fills the capped live file: the rest goes to the journal
        trail.record(record(k))
    wait_for(lambda: trail.status().pending == 0, what="every record durable")
    assert trail.status().journalled > 0
    trail.rotate_bytes = 1  # due, but not while records wait in the journal
    time.sleep(0.3)
    assert not sealed_segments(db) and not trail.rotate_now()
    trail.close()
    journalled = journal_lines(journal)
    assert journalled > 0
    trail = open_trail(tmp_path, journal_path=journal, rotate_bytes=1)  # cap lifted: replayed
    assert trail.status().journalled == 0 and not journal.exists()
    wait_for(lambda: sealed_segments(db), what="the rotation after the replay")
    trail.close()
    verdict = verify_trail(db, read_key(key), anchors)
    assert verdict.ok and verdict.records == 400, verdict
    frames = [json.loads(row["probabilities"]) and row["frame_index"]
              for segment in [s for _, s in sealed_segments(db)] + [db] for row in read_trail(segment)]  # fmt: skip
    assert frames == list(range(400))
    assert any("replayed from the fallback journal" in note for note in verdict.notes)


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_archive_verifies_each_copy_and_retire_deletes_only_verified_segments(tmp_path, capsys):
    from edgebc.cli import main

    db, key, anchors = segmented(tmp_path, segments=2)
    stick = tmp_path / "stick"
    stick.mkdir()
    assert main(["audit", "archive", str(stick), "--trail", str(db), "--key", str(key)]) == 0
    out = capsys.readouterr().out
    assert "audit.db.000001: records 1..10" in out and "sha256 and chain verified" in out
    for name in ("audit.db.000001", "audit.db.000002"):
        assert sha256(stick / name) == sha256(db.with_name(name))
        entry = read_record(db)["segments"][name]
        assert entry["sha256"] == sha256(stick / name) and entry["archives"][0]["verified"]
    assert not (stick / "audit.db").exists()  # never the live segment
    assert verify_trail(stick, read_key(key)).ok  # the archive verifies on its own
    # one more sealed segment, not archived
    trail = open_trail(tmp_path)
    trail.record(record(99))
    assert trail.flush(5.0) and trail.rotate_now()
    trail.close()
    retire = ["audit", "retire", "--trail", str(db), "--keep-bytes", "1", "--key", str(key)]
    assert main(retire) == 1  # one kept
    out = capsys.readouterr().out
    assert "deleted audit.db.000001" in out and "deleted audit.db.000002" in out
    assert "kept audit.db.000003: no verified archive copy" in out
    assert [s.name for _, s in sealed_segments(db)] == ["audit.db.000003"] and db.exists()
    verdict = verify_trail(db, read_key(key), anchors)  # what is left still verifies, and says why
    assert verdict.ok and verdict.records == 11 and verdict.head_id == 31, verdict  # 21..31
    assert any("records 1..20 (up to audit.db.000002) were archived and retired" in n for n in verdict.notes)  # fmt: skip
    # Deleting the oldest segments and calling them retired in the archive record, without the
    # key, is a deletion to `verify --key`: each retirement carries the key's MAC.
    record_path = db.with_name(db.name + ".archive.json")
    forged = json.loads(record_path.read_text())
    for entry in forged["retired"].values():
        entry["mac"] = "0" * 64
    record_path.write_text(json.dumps(forged))
    verdict = verify_trail(db, read_key(key), anchors)
    assert not verdict.ok and "audit.db.000002 (records up to 20), which audit.db.000003 follows, is missing" in verdict.problem  # fmt: skip
    assert verify_trail(db, None).ok  # without the key nothing can be told apart: said in a note
    # archiving again copies only what is new, and a second run finds it all there
    assert [a.already for a in archive_segments(db, stick)] == [False]
    assert [a.already for a in archive_segments(db, stick)] == [True]


def test_retire_keeps_segments_whose_copy_is_gone_changed_or_unreachable(tmp_path):
    db, _, _ = segmented(tmp_path, segments=3)
    stick = tmp_path / "stick"
    stick.mkdir()
    archive_segments(db, stick)
    (stick / "audit.db.000001").unlink()
    os.chmod(stick / "audit.db.000002", 0o644)
    with open(stick / "audit.db.000002", "r+b") as handle:
        handle.seek(200)
        handle.write(b"\x00\x01")
    lines = retire_segments(db, keep_days=None, keep_bytes=1)
    assert lines[0].startswith("kept audit.db.000001") and "is gone" in lines[0]
    assert lines[1].startswith("kept audit.db.000002") and "no longer has the archived sha256" in lines[1]  # fmt: skip
    assert lines[2].startswith("deleted audit.db.000003")
    shutil.move(stick, tmp_path / "unplugged")
    assert retire_segments(db, keep_days=0.0, keep_bytes=None, now=time.time() + 10) == [
        "kept audit.db.000001: " + f"{stick} not reachable now",
        "kept audit.db.000002: " + f"{stick} not reachable now",
    ]
    assert [s.name for _, s in sealed_segments(db)] == ["audit.db.000001", "audit.db.000002"]
    assert retire_segments(db, keep_days=30, keep_bytes=None) == []  # nothing that old


def test_a_copy_that_differs_is_not_archived(tmp_path):
    db, _, _ = segmented(tmp_path, segments=1)
    stick = tmp_path / "stick"
    stick.mkdir()
    (stick / "audit.db.000001").write_bytes(b"someone else's file")
    with pytest.raises(ArchiveError, match="exists with other content"):
        archive_segments(db, stick)
    assert read_record(db)["segments"] == {}
    assert retire_segments(db, keep_days=None, keep_bytes=1)[0].startswith("kept audit.db.000001")


def test_unarchived_segments_beyond_the_limit_make_the_trail_not_ready(tmp_path):
    segmented(tmp_path, segments=2)
    db, _, _ = paths(tmp_path)
    trail = open_trail(tmp_path, max_unarchived_bytes=1)
    status = trail.status()
    assert not status.healthy and status.unarchived_bytes > 1
    assert "not archived" in status.problem and "edgebc audit archive DEST" in status.problem
    trail.record(record(0))
    assert trail.flush(2.0)  # recording goes on meanwhile
    trail.archive_check_interval = 0.05
    stick = tmp_path / "stick"
    stick.mkdir()
    archive_segments(db, stick)
    wait_for(lambda: trail.status().healthy, what="ready again once archived")
    trail.close()


def live_result(smoothed, quality_ok=True, index=0):
    from edgebc.classifier import Decision
    from edgebc.quality import QualityResult
    from edgebc.serve.live_loop import LiveResult
    from edgebc.smoothing import Smoothed
    from edgebc.sources import Frame

    quality = QualityResult(True) if quality_ok else QualityResult(False, "too dark", "dark")
    probabilities = {"normal": 0.1, "benign": 0.7, "malignant": 0.2}
    decision = Decision(
        smoothed if quality_ok else None, probabilities, 0.2, 0.3, quality, "ab" * 32
    )
    frame = Frame(np.zeros((4, 4), np.uint8), index, time.time(), time.monotonic(), "phantom:tour")
    return LiveResult(index, frame, decision, Smoothed(smoothed, probabilities), f"{index:064x}", {}, 0.0)  # fmt: skip


def test_changes_mode_records_each_change_and_a_sample_per_interval(tmp_path):
    from edgebc.serve.sinks import AuditSink

    now = [0.0]
    trail = open_trail(tmp_path)
    # the clock counts frames (exact arithmetic): 300 frames are 10 s at 30 fps
    sink = AuditSink(trail, record="changes", sample_interval_s=300, clock=lambda: now[0])
    # 30 fps for 60 s: benign for 20 s, malignant 10 s, a dark frame, benign again
    labels = ["benign"] * 600 + ["malignant"] * 300 + [None] + ["benign"] * 899
    for index, label in enumerate(labels):
        now[0] = index
        sink.handle(live_result(label or "benign", quality_ok=label is not None, index=index))
    assert trail.flush(5.0)
    trail.close()
    recorded = [
        (row["frame_index"], row["smoothed_decision"], row["quality"])
        for row in read_trail(trail.path)
    ]
    # changes at frames 0, 600, 900 (dark), 901 (ok again); samples every 10 s in between
    assert [r[0] for r in recorded] == [0, 300, 600, 900, 901, 1201, 1501]
    assert recorded[3][2] == "no decision: too dark"
    assert sink.skipped == 1800 - 7
    every = AuditSink(open_trail(tmp_path / "b"), record="every_frame")
    for index in range(50):
        every.handle(live_result("benign", index=index))
    every.close()
    assert len(read_trail(every.trail.path)) == 50


HOLDER = r"""
import sys
from edgebc.audit_trail import AuditTrail
trail = AuditTrail({db!r})
print("open", flush=True)
sys.stdin.read()
trail.close()
"""


def test_a_second_process_cannot_open_the_same_trail(tmp_path):
    db = tmp_path / "trail" / "audit.db"
    child = subprocess.Popen([sys.executable, "-c", HOLDER.format(db=str(db))], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert child.stdout.readline().strip() == "open"
        with pytest.raises(
            AuditLockedError, match=rf"in use by another process \(pid {child.pid}: "
        ):
            AuditTrail(db)
    finally:
        child.stdin.close()
        child.wait(10)
    AuditTrail(db).close()  # free again once the other has stopped
    child = subprocess.Popen([sys.executable, "-c", HOLDER.format(db=str(db))], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert child.stdout.readline().strip() == "open"
    child.kill()  # a killed holder leaves no stale lock
    child.wait(10)
    AuditTrail(db).close()


def test_the_service_itself_retires_only_archived_segments(tmp_path):
    db, key, anchors = segmented(tmp_path, segments=3)
    stick = tmp_path / "stick"
    stick.mkdir()
    archive_segments(db, stick)
    (stick / "audit.db.000003").unlink()  # this copy is gone: its segment must stay
    trail = open_trail(tmp_path, keep_bytes=1)  # retention runs at start, off the writer's thread
    wait_for(lambda: len(sealed_segments(db)) == 1, what="the archived segments retired")
    trail.close()
    assert [s.name for _, s in sealed_segments(db)] == ["audit.db.000003"]
    assert set(read_record(db)["retired"]) == {"audit.db.000001", "audit.db.000002"}
    assert verify_trail(db, read_key(key), anchors).ok


def test_verify_takes_the_folder_of_a_trail_not_yet_rotated(tmp_path):
    db, key, anchors = paths(tmp_path)
    trail = open_trail(tmp_path)
    trail.record(record(0))
    trail.close()
    verdict = verify_trail(db.parent, read_key(key), anchors)
    assert verdict.ok and verdict.records == 1, verdict


def test_a_second_server_on_the_same_audit_file_refuses_to_start(tmp_path):
    from edgebc.errors import EdgebcError
    from edgebc.serve.runtime import build_runtime
    from tests.test_serve import settings_for

    first = build_runtime(settings_for(tmp_path))
    try:
        with pytest.raises(EdgebcError, match=rf"cannot open it: audit trail .* is in use by another process \(pid {os.getpid()}: "):  # fmt: skip
            build_runtime(settings_for(tmp_path))
    finally:
        first.audit.close()
        first.backend.close()
    second = build_runtime(settings_for(tmp_path))  # free once the first has closed its trail
    second.audit.close()
    second.backend.close()


def test_a_rotation_that_completes_logs_no_cut_off_warning(tmp_path, caplog):
    trail = AuditTrail(tmp_path / "trail" / "a.db")
    trail.record(record(0))
    assert trail.flush(5.0)
    with caplog.at_level("INFO", logger="edgebc.audit_trail"):
        assert trail.rotate_now()
    trail.close()
    assert "sealed as a.db.000001" in caplog.text
    assert "cut off" not in caplog.text  # it was not: the warning is for a kill mid-rotation
