"""The audit trail's hash chain: what makes a changed, deleted, reordered or cut-off record show.

Each record's `chain` is sha256 over the previous record's chain and a canonical form of the
record's own fields (the first record follows `GENESIS`), so changing, removing or moving one
record breaks every hash after it. Whoever can drop the append-only triggers can recompute those
hashes, so the chain is anchored outside the database: each record also carries `chain_mac`,
an HMAC of its chain under a key kept in a file outside the trail's directory, and the chain head
is appended at intervals (and at shutdown) to an anchor file and the log, which is how a cut-off
tail shows. `verify_trail` checks all of it and names the first broken record.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import os
import secrets
import sqlite3
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

GENESIS = "0" * 64
KEY_BYTES = 32
# The columns every chained record hashes, by position, in this order: every column the trail had
# when the chain began but the id (moving a record is caught by the chain itself) and the chain's
# own two columns. Never add to it: a new column goes into LATER_COLUMNS.
CHAINED_COLUMNS = ("logged_at", "captured_at", "source", "frame_index", "frame_sha256", "model_sha256", "probabilities",
                   "decision", "smoothed_decision", "threshold", "quality", "latencies_ms", "pixels", "patient_id", "shift")  # fmt: skip


# Columns added after the chain began, in the order hashed. Each enters a record's hash only when
# it is set, after the columns above and tagged with its name (`{"localiser": value}`): a record
# written before it existed (the column absent, or NULL) hashes exactly as it did then, and a value
# set in one of them cannot pass for another's or for a chained column's.
LATER_COLUMNS = ("localiser", "runtime")
# What a record's row carries, in order: the chained columns, then the later ones (a row read from
# an older trail or journal may stop after CHAINED_COLUMNS).
RECORD_COLUMNS = (*CHAINED_COLUMNS, *LATER_COLUMNS)


def canonical(row: Sequence[Any]) -> bytes:
    """One byte form per record: JSON of the values in column order, a BLOB as its sha256; then
    each later column that is set, as {name: value}."""
    if not len(CHAINED_COLUMNS) <= len(row) <= len(RECORD_COLUMNS):
        raise ValueError(f"an audit record has {len(CHAINED_COLUMNS)} to {len(RECORD_COLUMNS)} "
                         f"fields, not {len(row)}")  # fmt: skip
    chained, later = row[: len(CHAINED_COLUMNS)], row[len(CHAINED_COLUMNS) :]
    values = [
        {"sha256": hashlib.sha256(v).hexdigest()} if isinstance(v, bytes) else v for v in chained
    ]
    values += [{name: v} for name, v in zip(LATER_COLUMNS, later, strict=False) if v is not None]
    return json.dumps(values, separators=(",", ":"), ensure_ascii=True).encode()


def record_columns(present: Collection[str]) -> str:
    """The SELECT list of a record's fields in a trail whose table has the columns `present`: a
    later column an older trail lacks reads as NULL (it hashes as it did without it)."""
    later = (c if c in present else f"NULL AS {c}" for c in LATER_COLUMNS)
    return ", ".join((*CHAINED_COLUMNS, *later))


def record_hash(previous: str, row: Sequence[Any]) -> str:
    return hashlib.sha256(previous.encode() + b"\n" + canonical(row)).hexdigest()


def record_mac(key: bytes, chain: str) -> str:
    return hmac.new(key, chain.encode(), hashlib.sha256).hexdigest()


def retirement_mac(key: bytes, name: str, entry: dict[str, Any]) -> str:
    """The MAC of a segment's retirement in the archive record (`<trail>.archive.json`): without
    it, whoever can write beside the trail could delete its oldest segments and call them
    retired; with the key, `verify` accepts only retirements the service or its operator made."""
    fields = json.dumps([name, entry.get("sha256"), entry.get("records")], sort_keys=True)
    return record_mac(key, "retired\n" + fields)


def default_key_path() -> Path:
    """Where the service keeps its audit key unless told otherwise: systemd's StateDirectory when
    it sets one, else the user's state folder (never beside the trail)."""
    state = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
    if state:
        return Path(state) / "audit.key"
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "edgebc" / "audit.key"


def load_or_create_key(key_path: str | Path, trail_path: str | Path) -> bytes:
    """The key in `key_path`, created (random, mode 0600) when absent. A key in the trail's own
    directory is refused: whoever may edit the trail could then recompute every MAC."""
    key_file, trail = Path(key_path).expanduser(), Path(trail_path)
    if key_file.parent.resolve() == trail.parent.resolve():
        raise ValueError(
            f"audit key {key_file}: it is in the audit trail's own directory; keep it elsewhere "
            "(readable by the service, not by whoever holds the audit file)"
        )
    try:
        return read_key(key_file)
    except FileNotFoundError:
        pass
    key_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process made it first: use theirs
        return read_key(key_file)
    with os.fdopen(fd, "w") as handle:
        handle.write(secrets.token_hex(KEY_BYTES) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    return read_key(key_file)


def read_key(key_path: str | Path) -> bytes:
    text = Path(key_path).expanduser().read_text().strip()
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) < 16:
        raise ValueError(f"audit key {key_path}: expected at least 32 hex digits")
    return key


def append_anchor(anchor_path: str | Path, trail_path: str | Path, head_id: int, head: str,
                  key: bytes | None) -> dict[str, Any]:  # fmt: skip
    """Append one line saying the trail's chain reached `head` at record `head_id` (fsynced)."""
    anchor: dict[str, Any] = {
        "at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "trail": str(Path(trail_path).resolve()),
        "id": head_id,
        "head": head,
    }
    if key is not None:
        anchor["mac"] = record_mac(key, f"{head_id}:{head}")
    path = Path(anchor_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(anchor) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    return anchor


@dataclass
class Verdict:
    ok: bool
    records: int
    head_id: int | None
    head: str | None
    problem: str | None = None
    notes: list[str] = field(default_factory=list)  # what the anchors cover, migrations

    def line(self) -> str:
        head = "empty" if self.head is None else f"head record {self.head_id} {self.head[:16]}"
        if not self.ok:
            return f"BROKEN: {self.problem}"
        return f"OK: {self.records} records, chain intact ({head}); " + "; ".join(self.notes)


@dataclass
class _Segment:
    rows: list[tuple[Any, ...]]
    events: list[tuple[Any, ...]]
    replays: list[tuple[Any, ...]]
    start: tuple[str, int, str] | None  # the sealed segment it follows: name, last id, last chain


def _read_segment(path: Path) -> _Segment | str:
    """One segment file's rows and bookkeeping, or what is wrong with the file."""
    connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        check = connection.execute("PRAGMA integrity_check").fetchone()[0]
        if check != "ok":
            return f"{path}: SQLite integrity check failed: {check}"
        columns = {row[1] for row in connection.execute("PRAGMA table_info(decisions)")}
        if "chain" not in columns:
            return (f"{path}: no hash chain (written by an older edgebc and not opened since; "
                    "opening it with edgebc adds the chain)")  # fmt: skip
        rows = connection.execute(
            f"SELECT id, {record_columns(columns)}, chain, chain_mac FROM decisions ORDER BY id"
        ).fetchall()
        events = connection.execute(
            "SELECT at, first_id, last_id FROM chain_events ORDER BY first_id"
        ).fetchall()
        tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}  # fmt: skip
        replays = [] if "journal_replays" not in tables else connection.execute(
            "SELECT at, first_id, last_id FROM journal_replays ORDER BY first_id").fetchall()  # fmt: skip
        starts = [] if "segment_start" not in tables else connection.execute(
            "SELECT previous_segment, previous_id, previous_chain FROM segment_start").fetchall()  # fmt: skip
    except sqlite3.DatabaseError as exc:
        return f"{path}: cannot be read as an audit trail ({exc})"
    finally:
        connection.close()
    if len(starts) > 1:
        return f"{path}: {len(starts)} segment_start rows (edited outside edgebc)"
    start = None if not starts else (str(starts[0][0]), int(starts[0][1]), str(starts[0][2]))
    return _Segment(rows, events, replays, start)


def verify_segment(path: str | Path, key: bytes | None = None) -> Verdict:
    """One segment's own chain, from the head it says it follows (an archive copy's check)."""
    segment = _read_segment(Path(path))
    if isinstance(segment, str):
        return Verdict(False, 0, None, None, segment)
    previous_id, previous = (0, GENESIS) if segment.start is None else segment.start[1:]
    return _walk(segment.rows, key, previous, previous_id)


def verify_trail(path: str | Path, key: bytes | None = None,
                 anchor_path: str | Path | None = None,
                 retired: Collection[str] | None = None) -> Verdict:  # fmt: skip
    """Walk the whole chain across the trail's segments (`path`: its live file or a folder of its
    segments), oldest first; the first record that breaks it, and its segment, is named in
    `problem`, as is a missing or reordered segment. `retired`: names of segments deleted after
    a verified archive, which the oldest segment here may follow (None: those the archive record
    beside the trail names)."""
    from edgebc.audit_archive import read_record
    from edgebc.audit_segments import trail_files

    try:
        live, files = trail_files(Path(path))
        if retired is None:
            entries = read_record(live)["retired"]
            retired = [name for name, entry in entries.items()  # under a key: authenticated only
                       if key is None or hmac.compare_digest(str(entry.get("mac", "")), retirement_mac(key, name, entry))]  # fmt: skip
    except ValueError as exc:
        return Verdict(False, 0, None, None, str(exc))
    if not files:
        return Verdict(False, 0, None, None, f"{path}: no audit trail there")
    several = len(files) > 1
    previous_id, previous = 0, GENESIS
    chains: dict[int, str] = {}
    notes: list[str] = []
    records = 0
    for index, file in enumerate(files):
        segment = _read_segment(file)
        if isinstance(segment, str):
            return Verdict(False, records, None, None, segment)
        where = f" in {file.name}" if several else ""
        if segment.start is not None or index > 0:
            broken = _follows(files, index, segment.start, (previous_id, previous), set(retired))
            if broken is not None:
                return Verdict(False, records, previous_id or None, previous, f"first broken segment: {broken}")  # fmt: skip
            if segment.start is not None and index == 0:
                notes.append(f"records 1..{segment.start[1]} (up to {segment.start[0]}) were archived "
                             "and retired from here (verify the archive)")  # fmt: skip
                previous_id, previous = segment.start[1], segment.start[2]
        verdict = _walk(segment.rows, key, previous, previous_id, where)
        records += verdict.records
        if not verdict.ok:
            verdict.records = records
            return verdict
        for row in segment.rows:
            chains[row[0]] = row[-2]
        if segment.rows:
            previous_id, previous = segment.rows[-1][0], segment.rows[-1][-2]
        for at, first, last in segment.events:
            notes.append(f"records {first}..{last} were written before the chain and chained on {at}")  # fmt: skip
        for at, first, last in segment.replays:
            notes.append(f"records {first}..{last} were replayed from the fallback journal on {at} "
                         "(the trail could not be written when they were made)")  # fmt: skip
    verdict = Verdict(True, records, previous_id if records or previous_id else None,
                      previous if records or previous_id else None, notes=notes)  # fmt: skip
    if several:
        verdict.notes.insert(0, f"{len(files)} segments ({files[0].name} .. {files[-1].name}) in order")  # fmt: skip
    if key is None:
        verdict.notes.append("MACs not checked (no --key): a rewritten chain would pass")
    else:
        verdict.notes.append("every MAC matches the key")
    if anchor_path is not None:
        _check_anchors(verdict, chains, Path(anchor_path), key)
    return verdict


def _follows(files: list[Path], index: int, start: tuple[str, int, str] | None,
             previous: tuple[int, str], retired: set[str]) -> str | None:  # fmt: skip
    """Why the segment `files[index]` does not continue the one before it here (None: it does)."""
    name = files[index].name
    names = [file.name for file in files]
    if start is None:
        return f"{name} starts a new chain but comes after {names[index - 1]} (out of order, or not a segment of this trail)"  # fmt: skip
    follows, last_id, last_chain = start
    if index == 0:
        if follows in retired:
            return None
        return (f"{follows} (records up to {last_id}), which {name} follows, is missing "
                "(deleted, or archived elsewhere: verify that archive with this one)")  # fmt: skip
    if follows != names[index - 1]:
        if follows in names:
            return f"{name} follows {follows}, not {names[index - 1]}: segments out of order"
        return f"{follows} (records up to {last_id}), which {name} follows, is missing"
    if (last_id, last_chain) != previous:
        return (f"{name} follows record {last_id} ({last_chain[:16]}) of {follows}, but {follows} "
                f"ends at record {previous[0]} ({previous[1][:16]}): {follows} was changed or replaced")  # fmt: skip
    return None


def _walk(rows: list[tuple[Any, ...]], key: bytes | None, previous: str = GENESIS,
          previous_id: int = 0, where: str = "") -> Verdict:  # fmt: skip
    chains = [row[-2] for row in rows]
    for position, row in enumerate(rows):
        record_id, fields, chain, mac = row[0], row[1:-2], row[-2], row[-1]
        if record_id != previous_id + 1:
            missing = (f"record {previous_id + 1}" if record_id == previous_id + 2
                       else f"records {previous_id + 1}..{record_id - 1}")  # fmt: skip
            return _broken(rows, position, f"{missing} deleted (ids jump from {previous_id} to {record_id}){where}")  # fmt: skip
        if chain is None:
            return _broken(
                rows, position, f"record {record_id}{where} has no hash (added outside edgebc)"
            )
        if record_hash(previous, fields) != chain:
            # A record intact but in another place verifies after some other record's chain.
            nearby = chains[max(0, position - 64) : position + 64]
            if any(record_hash(other, fields) == chain for other in [GENESIS, *nearby]):
                why = f"record {record_id}{where} is out of order (reordered)"
            else:
                why = f"record {record_id}{where} was changed (its hash does not match its fields and the record before it)"  # fmt: skip
            return _broken(rows, position, why)
        if key is not None and (
            mac is None or not hmac.compare_digest(record_mac(key, chain), mac)
        ):
            why = (f"record {record_id}{where}: its MAC does not match the key (the chain was rewritten "
                   "from here on, or this is not the trail's key)")  # fmt: skip
            return _broken(rows, position, why)
        previous, previous_id = chain, record_id
    head_id = rows[-1][0] if rows else None
    return Verdict(True, len(rows), head_id, previous if rows else None)


def _broken(rows: list[tuple[Any, ...]], position: int, why: str) -> Verdict:
    return Verdict(False, len(rows), rows[-1][0], rows[-1][-2], f"first broken record: {why}")


def _check_anchors(verdict: Verdict, chains: dict[int, str], anchor_path: Path,
                   key: bytes | None) -> None:  # fmt: skip
    """Every anchor must match the chain at its record; the newest says how far the trail reached.
    Anchors of records in retired segments (below the oldest record here) are not checked."""
    anchors = [json.loads(line) for line in anchor_path.read_text().splitlines() if line.strip()]
    if not anchors:
        verdict.notes.append(f"{anchor_path}: no anchors")
        return
    oldest = min(chains, default=None)
    last = max(chains, default=0)
    skipped = 0
    for anchor in anchors:
        head_id, head = int(anchor["id"]), str(anchor["head"])
        if key is not None and not hmac.compare_digest(str(anchor.get("mac", "")),
                                                       record_mac(key, f"{head_id}:{head}")):  # fmt: skip
            verdict.ok, verdict.problem = False, f"anchor of {anchor['at']} (record {head_id}) has a wrong MAC: the anchor file was edited"  # fmt: skip
            return
        if oldest is not None and head_id < oldest:
            skipped += 1
            continue
        if head_id not in chains:
            verdict.ok = False
            verdict.problem = (f"first broken record: records {last + 1}..{head_id} are missing "
                               f"(truncated tail: the anchor of {anchor['at']} covered records 1..{head_id})")  # fmt: skip
            return
        if chains[head_id] != head:
            verdict.ok = False
            verdict.problem = (f"the chain up to record {head_id} differs from the anchor of "
                               f"{anchor['at']}: records 1..{head_id} were rewritten")  # fmt: skip
            return
    newest = max(anchors, key=lambda a: int(a["id"]))
    covered, total = int(newest["id"]), verdict.head_id or 0
    tail = f"; records {covered + 1}..{total} not yet anchored" if total > covered else ""
    verdict.notes.append(f"the anchor of {newest['at']} covers records 1..{covered}{tail}")
    if skipped:
        verdict.notes.append(f"{skipped} anchors fall in retired segments (not checked here)")
