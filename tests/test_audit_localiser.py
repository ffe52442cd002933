"""The lesion localiser in the audit trail and in `edgebc classify`'s rows: the record names the
localiser's model and its box, and every trail and journal written before that column verifies,
replays and hashes exactly as it did."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from edgebc.audit_chain import CHAINED_COLUMNS, RECORD_COLUMNS, canonical, read_key, verify_trail
from edgebc.audit_journal import FallbackJournal
from edgebc.audit_trail import AuditRecord, AuditTrail, read_trail, record_of
from edgebc.integrity import sha256_file
from tests.test_audit_trail import record, tamper
from tests.test_localiser import (
    classifier_card,
    lesion_frame,
    localiser_card,
    write_graph,
)

FIXTURE = Path(__file__).parent / "data" / "audit-before-localiser"
BOX = {"x": 150.0, "y": 60.0, "w": 60.0, "h": 60.0, "score": 0.8123}
LOCALISER = {"sha256": "5e" * 32, "box": BOX}


def canonical_before(row):
    """audit_chain.canonical as it was before the later columns (commit f4b9f39), verbatim."""
    values = [{"sha256": hashlib.sha256(v).hexdigest()} if isinstance(v, bytes) else v for v in row]
    return json.dumps(values, separators=(",", ":"), ensure_ascii=True).encode()


def old_trail(tmp_path):
    """The fixture (written by the edgebc before the localiser column) where a site keeps it: the
    trail in its folder, the key, anchors and journal elsewhere; the journal names its trail by
    absolute path, so its header follows the copy (the header is not MACed; the rows are)."""
    shutil.copytree(FIXTURE / "trail", tmp_path / "trail")
    shutil.copytree(FIXTURE / "keys", tmp_path / "keys")
    db, keys = tmp_path / "trail" / "audit.sqlite", tmp_path / "keys"
    journal = keys / "audit.journal"
    header, *rows = journal.read_text().splitlines(keepends=True)
    moved = {**json.loads(header), "trail": str(db.resolve())}
    journal.write_text(json.dumps(moved) + "\n" + "".join(rows))
    return db, keys / "audit.key", keys / "anchors", journal


def chains(db):
    return {row["id"]: row["chain"] for row in read_trail(db)}


def test_the_hash_of_a_record_without_a_localiser_is_the_hash_from_before():
    pixels = b"\x89PNG\r\n\x1a\n"
    rows = [
        ("2026-01-01T00:00:00.000+00:00", None, "upload", 3, "0" * 64, "ab" * 32, '{"benign": 0.7}',
         "benign", None, 0.3, "ok", '{"inference": 1.5}', pixels, None, '{"score": 0.2}'),
        ("t", "c", None, None, None, "cd" * 32, None, None, None, None, "no decision: x", "{}", None,
         "MRN-1", None),
    ]  # fmt: skip
    for row in rows:
        assert len(row) == len(CHAINED_COLUMNS)
        assert canonical(row) == canonical_before(row)  # an old row, read from an old trail
        assert canonical((*row, None)) == canonical_before(row)  # the column there, NULL
        with_box = canonical((*row, json.dumps(LOCALISER)))
        assert with_box != canonical_before(row)
        # the localiser enters tagged with its name, after every chained column
        assert json.loads(with_box)[-1] == {"localiser": json.dumps(LOCALISER)}
        assert json.loads(with_box)[:-1] == json.loads(canonical_before(row))
    with pytest.raises(ValueError, match="not 14"):
        canonical(rows[0][:-1])
    with pytest.raises(ValueError, match="not 18"):
        canonical((*rows[0], None, None, None))
    # the runtime, the next later column, enters tagged after the localiser, and only when set
    both = json.loads(canonical((*rows[0], json.dumps(LOCALISER), "openvino:CPU:bf16")))
    assert both[-2:] == [{"localiser": json.dumps(LOCALISER)}, {"runtime": "openvino:CPU:bf16"}]
    assert canonical((*rows[0], None, None)) == canonical_before(rows[0])


def test_a_trail_and_journal_written_before_the_localiser_column_verify_and_replay_unchanged(
    tmp_path,
):
    db, key_path, anchors, journal = old_trail(tmp_path)
    key = read_key(key_path)
    before = verify_trail(db, key=key, anchor_path=anchors)
    assert before.ok and before.records == 5, before
    old = chains(db) | chains(db.with_name("audit.sqlite.000001"))
    assert "localiser" not in read_trail(db)[0]  # the old table has no such column
    # the edgebc of today opens it: the column is added, the old journal (rows of the old
    # length) is replayed, and a record behind a localiser follows
    trail = AuditTrail(db, store_pixels=True, key_path=key_path, anchor_path=anchors,
                       journal_path=journal)  # fmt: skip
    assert trail.status().written == 2 and not journal.exists()
    trail.record(record(7, localiser=LOCALISER))
    trail.record(record(8))
    trail.record(record(9, runtime="openvino:CPU:bf16"))
    assert trail.flush(5.0)
    trail.close()
    after = verify_trail(db, key=key, anchor_path=anchors)
    assert after.ok and after.records == 10, after
    assert any("records 6..7 were replayed from the fallback journal" in n for n in after.notes)
    rows = read_trail(db)
    assert {r["id"]: r["chain"] for r in rows if r["id"] <= 5} == {k: v for k, v in old.items() if k > 3}  # fmt: skip
    assert [r["frame_index"] for r in rows] == [3, 4, 5, 6, 7, 8, 9]
    assert [r["localiser"] for r in rows if r["id"] != 8] == [None] * 6
    assert [r["runtime"] for r in rows] == [None] * 6 + ["openvino:CPU:bf16"]
    stored = json.loads(rows[4]["localiser"])
    assert stored == LOCALISER and rows[4]["frame_index"] == 7
    # the box cannot be changed, nor a localiser given to an old record, unseen
    tamper(db, "UPDATE decisions SET localiser = replace(localiser, '150.0', '15.0') WHERE id = 8")
    changed = verify_trail(db, key=key)
    assert not changed.ok and "record 8 in audit.sqlite was changed" in changed.problem, changed
    tamper(db, "UPDATE decisions SET localiser = replace(localiser, '15.0', '150.0') WHERE id = 8")
    assert verify_trail(db, key=key, anchor_path=anchors).ok  # put back: intact again
    tamper(db, f"UPDATE decisions SET localiser = '{json.dumps(LOCALISER)}' WHERE id = 4")
    given = verify_trail(db, key=key)
    assert not given.ok and "record 4 in audit.sqlite was changed" in given.problem, given
    tamper(db, "UPDATE decisions SET localiser = NULL WHERE id = 4")
    # which runtime and precision answered cannot be changed unseen either
    tamper(db, "UPDATE decisions SET runtime = 'onnxruntime:CPUExecutionProvider' WHERE id = 9")
    swapped = verify_trail(db, key=key)
    assert not swapped.ok and "record 9 in audit.sqlite was changed" in swapped.problem, swapped
    tamper(db, "ALTER TABLE decisions DROP COLUMN localiser")  # the record's box, dropped
    dropped = verify_trail(db, key=key)
    assert not dropped.ok and "record 8 in audit.sqlite was changed" in dropped.problem, dropped


def test_a_sealed_segment_without_the_column_verifies_beside_a_live_one_with_it(tmp_path):
    db, key_path, anchors, journal = old_trail(tmp_path)
    journal.unlink()
    trail = AuditTrail(db, key_path=key_path, anchor_path=anchors, anchor_interval=0.0)
    trail.record(record(5, localiser=LOCALISER))
    assert trail.flush(5.0) and trail.rotate_now()  # sealed with the column; the oldest without
    trail.record(record(6, localiser={"sha256": "5e" * 32, "box": None}))
    trail.close()
    sealed = sorted(db.parent.glob("audit.sqlite.0*"))
    assert [p.name for p in sealed] == ["audit.sqlite.000001", "audit.sqlite.000002"]
    first = {r[1] for r in sqlite3.connect(sealed[0]).execute("PRAGMA table_info(decisions)")}
    assert "localiser" not in first  # sealed read-only before the column existed
    verdict = verify_trail(db, key=read_key(key_path), anchor_path=anchors)
    assert verdict.ok and verdict.records == 7, verdict


def test_a_journal_line_leaves_an_unset_localiser_off_and_reads_both_lengths(tmp_path):
    db, key = tmp_path / "trail" / "audit.db", tmp_path / "keys" / "audit.key"
    AuditTrail(db, key_path=key).close()
    journal = FallbackJournal(tmp_path / "keys" / "audit.journal", read_key(key), db)
    writer = AuditTrail.__new__(AuditTrail)
    writer.store_pixels = writer.store_patient_ids = False
    rows = [writer._row(record(0)), writer._row(record(1, localiser=LOCALISER))]
    assert [len(r) for r in rows] == [len(RECORD_COLUMNS)] * 2
    journal.append(rows)
    lines = [json.loads(line) for line in journal.path.read_text().splitlines()[1:]]
    # a line without a localiser is the line the edgebc before wrote (and reads); later columns
    # left unset at the end (the runtime here) are left off too
    assert [len(line["row"]) for line in lines] == [len(CHAINED_COLUMNS), len(CHAINED_COLUMNS) + 1]
    assert lines[1]["row"][-1] == json.dumps(LOCALISER)
    _, read = journal.read()  # MACs checked: the same record either length
    assert read == [tuple(r) for r in rows]


def test_the_record_of_a_decision_behind_a_localiser_names_it_and_its_box(tmp_path):
    from edgebc.backends import open_backend
    from edgebc.classifier import FrameClassifier
    from edgebc.localiser import box_to_input, open_localiser
    from edgebc.quality import QualityGate

    box = box_to_input((150, 60, 60, 60), (200, 300), localiser_card().preprocess).tolist()
    loc = write_graph(tmp_path / "loc.onnx", localiser_card(0.5), box, gain=50.0, bias=66.4)
    cls = write_graph(tmp_path / "cls.onnx", classifier_card(), None, gain=4.0, bias=0.0)
    classifier = FrameClassifier(open_backend(cls, threads=1), gate=QualityGate(),
                                 localiser=open_localiser(loc), margin=0.0)  # fmt: skip
    found, missed, blank = classifier.classify_batch(
        [lesion_frame(), lesion_frame(bright=False), np.zeros((200, 300), np.uint8)]
    )
    sha = sha256_file(loc)
    entry = record_of(found)
    assert entry.localiser is not None and entry.localiser["sha256"] == sha
    assert entry.localiser["box"]["x"] == pytest.approx(150, abs=1.0)
    assert entry.model_sha256 == sha256_file(cls) and found.to_json()["localiser_sha256"] == sha
    assert entry.runtime == "onnxruntime:CPUExecutionProvider"  # which runtime and precision ran it
    # no lesion found: the box where it looked best, with the reason in the quality
    nothing = record_of(missed)
    assert nothing.quality.startswith("no decision: no lesion found")
    assert nothing.localiser["sha256"] == sha and nothing.localiser["box"]["score"] < 0.5
    # a frame the gate refused never reached the localiser: named, without a box
    assert record_of(blank).localiser == {"sha256": sha, "box": None}
    plain = write_graph(tmp_path / "whole.onnx", classifier_card(crops=False), None, 4.0, 0.0)
    whole = FrameClassifier(open_backend(plain, threads=1), gate=QualityGate())
    assert record_of(whole.classify(lesion_frame())).localiser is None


@pytest.fixture
def graphs(tmp_path):
    from edgebc.localiser import box_to_input

    box = box_to_input((150, 60, 60, 60), (200, 300), localiser_card().preprocess).tolist()
    loc = write_graph(tmp_path / "loc.onnx", localiser_card(0.5), box, gain=50.0, bias=66.4)
    cls = write_graph(tmp_path / "cls.onnx", classifier_card(), None, gain=4.0, bias=0.0)
    scans = tmp_path / "scans"
    scans.mkdir()
    import cv2

    cv2.imwrite(str(scans / "a-lesion.png"), lesion_frame())
    cv2.imwrite(str(scans / "b-plain.png"), lesion_frame(bright=False))
    return cls, loc, scans


def test_classify_rows_carry_the_box_and_the_localiser_and_are_blank_without(graphs, tmp_path):
    from edgebc.cli import main

    cls, loc, scans = graphs
    behind = ["--set", f"localiser={loc}", "--set", "localiser_margin=0.0"]
    assert main(["classify", str(cls), str(scans), *behind, "--out", str(tmp_path / "r.csv")]) == 0
    with open(tmp_path / "r.csv", newline="") as handle:
        lesion, plain = csv.DictReader(handle)
    sha = sha256_file(loc)
    assert lesion["decision"] == "malignant" and lesion["localiser_sha256"] == sha
    assert [float(lesion[f"box_{k}"]) for k in "xywh"] == pytest.approx([150, 60, 60, 60], abs=1.0)
    assert 0.5 <= float(lesion["box_score"]) <= 1.0
    # no lesion found: no class, the reason, and the box where it looked best
    assert plain["decision"] == "" and plain["quality"].startswith("no decision: no lesion found")
    assert float(plain["box_x"]) == pytest.approx(150, abs=1.0) and float(plain["box_score"]) < 0.5
    assert plain["localiser_sha256"] == sha and plain["model_sha256"] == sha256_file(cls)
    assert lesion["demo"] == plain["demo"] == "no"
    assert (
        main(["classify", str(cls), str(scans), *behind, "--out", str(tmp_path / "r.jsonl")]) == 0
    )
    jsonl = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert jsonl[0]["box_w"] == pytest.approx(60, abs=1.0) and jsonl[1]["localiser_sha256"] == sha
    # without a localiser (a whole-frame model): the same columns, blank
    plain = write_graph(tmp_path / "whole.onnx", classifier_card(crops=False), None, 4.0, 0.0)
    assert main(["classify", str(plain), str(scans), "--out", str(tmp_path / "w.csv")]) == 0
    with open(tmp_path / "w.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["decision"] for r in rows] == ["benign", "benign"]
    assert {r[c] for r in rows for c in ("box_x", "box_score", "localiser_sha256")} == {""}


def test_serves_records_of_uploads_and_live_frames_name_the_localiser(graphs, tmp_path):
    from edgebc.serve.runtime import build_runtime
    from tests.test_serve import png_bytes, settings_for, wait_until

    cls, loc, scans = graphs
    runtime = build_runtime(settings_for(tmp_path, source=str(scans), model=str(cls),
                                         localiser=str(loc), localiser_margin=0.0))  # fmt: skip
    answer = runtime.classify_upload(png_bytes(lesion_frame()), None)
    assert answer["localiser_sha256"] == sha256_file(loc) and answer["box"] is not None
    runtime.start()
    try:
        # the live reader keeps the newest frame: of a folder read at once, one or both
        wait_until(lambda: runtime.pipeline.feed().status == "ended"
                   and runtime.audit.flush(0.1) and runtime.audit.status().written >= 2,
                   what="the folder played and recorded")  # fmt: skip
    finally:
        runtime.stop()
    rows = read_trail(tmp_path / "audit.sqlite")
    upload = next(r for r in rows if r["source"] == "upload")
    live = [r for r in rows if r["source"] != "upload"]
    assert json.loads(upload["localiser"]) == {"sha256": sha256_file(loc), "box": answer["box"]}
    assert live and all(json.loads(r["localiser"])["sha256"] == sha256_file(loc) for r in live)
    assert all(json.loads(r["localiser"])["box"]["x"] == pytest.approx(150, abs=1.0) for r in live)
    verdict = verify_trail(tmp_path / "audit.sqlite")
    assert verdict.ok and verdict.records == len(rows), verdict


def test_an_audit_record_without_a_localiser_is_stored_as_before(tmp_path):
    trail = AuditTrail(tmp_path / "a.db")
    trail.record(AuditRecord(model_sha256="ab" * 32, quality="ok"))
    trail.close()
    assert read_trail(tmp_path / "a.db")[0]["localiser"] is None
