"""The audit trail: every decision the device showed, in an append-only SQLite log that survives crashes.

SQLite in WAL mode with synchronous=FULL; rows are written by one background thread in
transactions, so a crash or a kill leaves every committed row whole and nothing half-written.
Triggers refuse UPDATE and DELETE: the log is append-only, and tamper-evident beyond that: every
record carries a hash chained to the one before, MACed with a key kept outside the trail's
directory, and the chain head is anchored at intervals in a file and the log
(edgebc/audit_chain.py; `edgebc audit verify` checks it). No pixels and no patient identifiers are
stored unless the site opts in.

When the trail cannot be written (a full disk, the optional `max_bytes` cap, any write error) the
failed transaction rolls back and its records go, fsynced, to the fallback journal on another
path (edgebc/audit_journal.py), as does every later record until the journal has been replayed
into the trail, in order and exactly once: when the trail can be written again, or at the next
start. `status()` is unhealthy meanwhile, with a plain message. When the journal cannot be written
either, records are held in memory, at most `max_held` of them; beyond that `record()` raises
`AuditUnavailableError`, so the decision is withheld (never shown, an upload gets 503), and a kill
loses at most `max_held` records. Written, journalled, held, lost (at a stop with nowhere to write
them) and withheld are counted exactly (`status()`, `summary()`).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import logging
import os
import queue
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from edgebc.atomic import fsync_directory
from edgebc.audit_archive import retire_segments, unarchived
from edgebc.audit_chain import (
    GENESIS,
    LATER_COLUMNS,
    RECORD_COLUMNS,
    append_anchor,
    load_or_create_key,
    record_hash,
    record_mac,
)
from edgebc.audit_journal import FallbackJournal, JournalDamagedError
from edgebc.audit_segments import TrailLock, next_live_path, sealed_segments, segment_path
from edgebc.errors import EdgebcError

if TYPE_CHECKING:
    from edgebc.classifier import Decision

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS decisions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    logged_at TEXT NOT NULL,
    captured_at TEXT,
    source TEXT,
    frame_index INTEGER,
    frame_sha256 TEXT,
    model_sha256 TEXT NOT NULL,
    probabilities TEXT,
    decision TEXT,
    smoothed_decision TEXT,
    threshold REAL,
    quality TEXT NOT NULL,
    latencies_ms TEXT,
    pixels BLOB,
    patient_id TEXT,
    shift TEXT,
    chain TEXT,
    chain_mac TEXT,
    localiser TEXT,
    runtime TEXT
);
CREATE TABLE IF NOT EXISTS chain_events (
    at TEXT NOT NULL,
    first_id INTEGER NOT NULL,
    last_id INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS journal_replays (
    journal_id TEXT PRIMARY KEY,
    at TEXT NOT NULL,
    first_id INTEGER NOT NULL,
    last_id INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS segment_start (
    previous_segment TEXT NOT NULL,
    previous_id INTEGER NOT NULL,
    previous_chain TEXT NOT NULL,
    at TEXT NOT NULL
);
"""
# Every table of the trail refuses UPDATE and DELETE; whoever can drop the triggers is caught by
# the hash chain and its MACs instead (edgebc.audit_chain).
APPEND_ONLY_TABLES = ("segment_start", "journal_replays", "decisions", "chain_events")


def _append_only(table: str, event: str, if_not_exists: bool = True) -> str:
    return (f"CREATE TRIGGER {'IF NOT EXISTS ' if if_not_exists else ''}{table}_no_{event.lower()} "
            f"BEFORE {event} ON {table}\n    BEGIN SELECT RAISE(ABORT, 'the audit trail is append-only'); END")  # fmt: skip


SCHEMA += "".join(
    f"{_append_only(t, e)};\n" for t in APPEND_ONLY_TABLES for e in ("UPDATE", "DELETE")
)
_NO_UPDATE = _append_only("decisions", "UPDATE", if_not_exists=False)
_COLUMNS = ("id", *RECORD_COLUMNS, "chain", "chain_mac")


@dataclass(frozen=True)
class AuditRecord:
    model_sha256: str
    quality: str
    decision: str | None = None
    smoothed_decision: str | None = None
    probabilities: dict[str, float] | None = None
    threshold: float | None = None
    captured_at: float | None = None  # wall-clock capture time of the frame
    source: str | None = None
    frame_index: int | None = None
    frame_sha256: str | None = None
    latencies_ms: dict[str, float] = field(default_factory=dict)
    pixels: np.ndarray | None = None  # stored only with store_pixels=True
    patient_id: str | None = None  # stored only with store_patient_ids=True
    shift: dict[str, Any] | None = None  # the shift check's verdict (None: not checked)
    # the lesion localiser the frame went through: {"sha256": its model's, "box": {x, y, w, h,
    # score} in frame pixels, or None where it did not run (the frame failed the gate)}; None:
    # the classifier had no localiser
    localiser: dict[str, Any] | None = None
    # the runtime and precision that ran the model (Decision.runtime): the file's sha256 alone does
    # not tell ONNX Runtime FP32 from OpenVINO BF16
    runtime: str | None = None


def described_source(source: str | None, how: str) -> str | None:
    """What is kept of a frame's source: the name ("name"), a short sha256 of it ("hash": the
    same file gives the same value, so records still group by file, but a name such as
    'MRN-12345 Doe.png' is not stored), or nothing ("none")."""
    if source is None or how == "none":
        return None
    if how == "hash":
        return "sha256:" + hashlib.sha256(source.encode("utf-8")).hexdigest()[:16]
    if how == "name":
        return source
    raise ValueError(f"source names are kept as 'name', 'hash' or 'none', not {how!r}")


def record_of(decision: Decision, **context: Any) -> AuditRecord:
    """The audit record of one decision, its quality as one text ("ok" or "no decision: <reason>",
    `QualityResult`'s own); `context` adds where and when the frame came from. Behind a lesion
    localiser it names the localiser's model and the box it found (on "no lesion found" too: where
    it looked best, beside the no-decision reason in `quality`)."""
    fields = decision.to_json()
    localiser = (None if decision.localiser_sha256 is None
                 else {"sha256": decision.localiser_sha256, "box": fields["box"]})  # fmt: skip
    return AuditRecord(
        model_sha256=decision.model_sha256,
        quality=str(decision.quality),
        decision=decision.label,
        probabilities=decision.probabilities,
        threshold=decision.threshold,
        shift=fields["shift"],
        localiser=localiser,
        runtime=decision.runtime,
        **context,
    )


class AuditUnavailableError(EdgebcError):
    """Neither the trail nor its fallback journal can take the record, and `max_held` are already
    held in memory: the decision must not be shown (an upload gets 503)."""


@dataclass(frozen=True)
class TrailStatus:
    healthy: bool
    problem: str | None
    written: int  # committed to the trail by this process (journal replays included)
    pending: int  # held in memory: queued, being written, or waiting for the trail or the journal
    lost: int  # could be written nowhere by the time the trail closed
    head_id: int | None  # the newest committed record, and its chain hash: compare with verify
    head: str | None
    journalled: int = 0  # in the fallback journal now, waiting to be replayed into the trail
    withheld: int = 0  # decisions refused (never shown) because they could not be recorded
    unarchived_bytes: int = 0  # in sealed segments with no verified archive copy

    @property
    def all_committed(self) -> bool:
        """Every record this process accepted is in the trail: none journalled, held or lost."""
        return self.pending == 0 and self.journalled == 0 and self.lost == 0


class AuditTrail:
    """The append-only, hash-chained log. `key_path`: the HMAC key file (created 0600 if absent;
    None: records are chained but not MACed); `anchor_path`: the file the chain head is appended
    to every `anchor_interval` seconds while records arrive, and at close (None: the log only);
    `journal_path`: the fallback journal (None: none, records wait in memory); `max_held`: the
    most records held in memory, not yet in the trail or the journal (what a kill can lose)."""

    def __init__(self, path: str | Path, store_pixels: bool = False, store_patient_ids: bool = False,
                 flush_interval: float = 0.2, max_held: int = 256, max_bytes: int | None = None,
                 key_path: str | Path | None = None, anchor_path: str | Path | None = None,
                 anchor_interval: float = 60.0, journal_path: str | Path | None = None,
                 rotate_bytes: int | None = None, rotate_interval_s: float | None = None,
                 keep_days: float | None = None, keep_bytes: int | None = None,
                 max_unarchived_bytes: int | None = None) -> None:  # fmt: skip
        if max_held < 1:
            raise ValueError(f"max_held must be at least 1, got {max_held}")
        self.path = Path(path)
        if (
            journal_path is not None
            and Path(journal_path).expanduser().resolve().parent == self.path.resolve().parent
        ):
            raise ValueError(f"audit fallback journal {journal_path}: it is in the audit trail's own directory; "
                             "keep it on another path, best another filesystem, so a full disk does not fill both")  # fmt: skip
        self._key = None if key_path is None else load_or_create_key(key_path, self.path)
        self.anchor_path = None if anchor_path is None else Path(anchor_path)
        self.anchor_interval = anchor_interval
        self.store_pixels, self.store_patient_ids = store_pixels, store_patient_ids
        self.flush_interval = flush_interval
        self.rotate_bytes, self.rotate_interval_s = rotate_bytes, rotate_interval_s
        self.keep_days, self.keep_bytes = keep_days, keep_bytes
        self.max_unarchived_bytes = max_unarchived_bytes
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # One writer: a second process would fork the chain (raises AuditLockedError, naming it).
        self._trail_lock = TrailLock(self.path)
        try:
            self._open(max_bytes, max_held, journal_path)
        except BaseException:
            self._trail_lock.release()
            raise
        self._thread = threading.Thread(target=self._run, name="edgebc-audit-writer", daemon=True)
        self._thread.start()

    def _open(self, max_bytes: int | None, max_held: int, journal_path: str | Path | None) -> None:
        self._finish_rotation()
        # A clean close checkpoints and removes the write-ahead log: one left with frames in it
        # means the last process to write the trail was killed or crashed.
        wal = self.path.with_name(self.path.name + "-wal")
        self.unclean_start = wal.exists() and wal.stat().st_size > 0
        self._connection = self._connect()
        self._add_missing_columns()
        self._continue_sealed_chain()
        self._chain_unchained_rows()
        self._head = self._read_head()
        self._live_since = self._first_logged()
        self._anchored = self._head  # what the newest anchor says; None: nothing anchored yet
        self._anchored_at = time.monotonic()
        self._db_lock = (
            threading.Lock()
        )  # one connection, two threads (writer, and set_max_bytes callers)
        self.set_max_bytes(max_bytes)
        self.max_held = max_held
        self._queue: queue.Queue[tuple[Any, ...]] = queue.Queue()  # bounded by record()
        self._held: list[tuple[Any, ...]] = []  # the batch neither the trail nor the journal took
        self._lock = threading.Lock()
        self._trail_error: str | None = None  # why the trail cannot be written now
        self._journal_error: str | None = None  # why the journal cannot be written now
        self._written = self._lost = self._withheld = 0
        self._backoff, self._next_try = self.flush_interval, 0.0  # retrying a failed trail
        self._next_rotation_try = 0.0  # after a failed rotation, when to try again
        self._rotation_lock = threading.Lock()  # the writer's own rotations and rotate_now()
        self.archive_check_interval = 30.0  # seconds between counts of what waits to be archived
        self.retire_interval = 3600.0  # and between retention runs (also at start, after rotations)
        self._retired_at = -1e9
        self._unarchived = 0
        self._archive_checked = -1e9
        self._retiring: threading.Thread | None = None
        self._stop = threading.Event()
        self.journal = (
            None if journal_path is None else FallbackJournal(journal_path, self._key, self.path)
        )
        if self.journal is not None:
            self._open_journal()
        if self.unclean_start:
            log.warning("audit trail %s was not closed by the process that last wrote it (killed or "
                        "crashed): what it committed is in the trail, what it journalled was replayed or waits "
                        "in the journal, and what it held in memory (at most audit.max_held) was lost", self.path)  # fmt: skip
        self._housekeeping()

    def _connect(self) -> sqlite3.Connection:
        connection = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=FULL")
        connection.executescript(SCHEMA)
        return connection

    def _finish_rotation(self, cut_off: bool = True) -> None:
        """A rotation cut off by a kill: after the live file was sealed, the prepared next one
        becomes live; before that, the prepared one is dropped (the live file never stopped).
        `cut_off` False: the rotation's own last step, which is not worth a warning."""
        prepared = next_live_path(self.path)
        if not prepared.exists():
            return
        if self.path.exists():
            prepared.unlink()
            if cut_off:
                log.warning("audit trail %s: a rotation was cut off before sealing; the live segment goes on", self.path)  # fmt: skip
        else:
            os.rename(prepared, self.path)
            if cut_off:
                log.warning("audit trail %s: a rotation was cut off after sealing; it is finished now", self.path)  # fmt: skip
        fsync_directory(self.path.parent)

    def _continue_sealed_chain(self) -> None:
        """A live file with no records and no start, beside sealed segments (a rotation's next
        file was lost, or the live file was removed): its chain continues from the newest sealed
        segment's head, so verify sees one chain (anchors show any records lost with the file)."""
        sealed = sealed_segments(self.path)
        if not sealed or self._segment_start() is not None:
            return
        if self._connection.execute("SELECT 1 FROM decisions LIMIT 1").fetchone():
            return
        last = sealed[-1][1]
        head = _head_of(last)
        if head is None:
            return
        self._connection.execute("INSERT INTO segment_start VALUES (?, ?, ?, ?)", (last.name, *head, _now()))  # fmt: skip
        log.warning("audit trail %s: a new live segment continues the chain of %s from record %d",
                    self.path, last.name, head[0])  # fmt: skip

    def _segment_start(self) -> tuple[int, str] | None:
        row = self._connection.execute("SELECT previous_id, previous_chain FROM segment_start").fetchone()  # fmt: skip
        return None if row is None else (int(row[0]), str(row[1]))

    def _first_logged(self) -> float | None:
        row = self._connection.execute("SELECT logged_at FROM decisions ORDER BY id LIMIT 1").fetchone()  # fmt: skip
        if row is None:
            return None
        try:
            return dt.datetime.fromisoformat(row[0]).timestamp()
        except (TypeError, ValueError):  # a log not written by edgebc's clock: its age starts now
            return time.time()

    def _add_missing_columns(self) -> None:
        """A log written by an older edgebc lacks the newer columns (shift, localiser): added, the
        rows kept (ALTER TABLE ADD COLUMN changes no row, so the append-only triggers allow it; a
        later column is NULL in the old rows, which hash as they did: edgebc.audit_chain)."""
        present = {row[1] for row in self._connection.execute("PRAGMA table_info(decisions)")}
        for column in ("shift", "chain", "chain_mac", *LATER_COLUMNS):
            if column not in present:
                self._connection.execute(f"ALTER TABLE decisions ADD COLUMN {column} TEXT")

    def _chain_unchained_rows(self) -> None:
        """Rows written by an edgebc without the chain get theirs now, following the last chained
        row, in one transaction that lifts the no-update trigger for just these rows and puts it
        back; `chain_events` records which rows were chained when (they were unprotected before)."""
        connection = self._connection
        last = connection.execute("SELECT max(id) FROM decisions WHERE chain IS NOT NULL").fetchone()[0]  # fmt: skip
        rows = connection.execute(
            f"SELECT id, {', '.join(RECORD_COLUMNS)} FROM decisions WHERE id > ? ORDER BY id",
            (last or 0,),
        ).fetchall()
        if not rows:
            return
        start = self._segment_start() or (0, GENESIS)
        previous = start[1] if last is None else self._chain_of(last)
        connection.execute("BEGIN IMMEDIATE")
        try:
            connection.execute("DROP TRIGGER decisions_no_update")
            for record_id, *fields in rows:
                previous = record_hash(previous, fields)
                mac = None if self._key is None else record_mac(self._key, previous)
                connection.execute("UPDATE decisions SET chain = ?, chain_mac = ? WHERE id = ?",
                                   (previous, mac, record_id))  # fmt: skip
            connection.execute(_NO_UPDATE)
            connection.execute("INSERT INTO chain_events VALUES (?, ?, ?)",
                               (_now(), rows[0][0], rows[-1][0]))  # fmt: skip
            connection.execute("COMMIT")
        except BaseException:
            connection.execute("ROLLBACK")
            raise
        log.warning("audit trail %s: records %d..%d were written without the hash chain; chained now",
                    self.path, rows[0][0], rows[-1][0])  # fmt: skip

    def _chain_of(self, record_id: int) -> str:
        return str(self._connection.execute("SELECT chain FROM decisions WHERE id = ?", (record_id,)).fetchone()[0])  # fmt: skip

    def _read_head(self) -> tuple[int, str] | None:
        """The newest record of the live segment, else the sealed head it continues from."""
        row = self._connection.execute("SELECT id, chain FROM decisions ORDER BY id DESC LIMIT 1").fetchone()  # fmt: skip
        return self._segment_start() if row is None else (int(row[0]), str(row[1]))

    def set_max_bytes(self, max_bytes: int | None) -> None:
        """Cap the log's size (small SD cards); None removes the cap. Reaching it acts like a full disk."""
        self._max_bytes = max_bytes
        with self._db_lock:
            page_size = int(self._connection.execute("PRAGMA page_size").fetchone()[0])
            pages = (max_bytes // page_size) if max_bytes else 1073741823
            self._connection.execute(f"PRAGMA max_page_count = {int(pages)}")

    def _open_journal(self) -> None:
        """Replay what a previous run left in the journal (the trail is single-writer: nothing is
        queued yet); if the trail cannot take it now, it stays there and the writer retries."""
        journal = self.journal
        if journal is None:
            return
        if _same_filesystem(journal.path, self.path):
            log.warning("audit journal %s is on the same filesystem as the trail %s: a full disk "
                        "fills both (set audit.fallback_path to another filesystem)", journal.path, self.path)  # fmt: skip
        if journal.torn:
            with self._lock:
                self._lost += journal.torn
        if journal.count or journal.path.exists():
            left = journal.count
            try:
                replayed = self._replay()
            except (sqlite3.Error, OSError) as exc:
                self._trail_failed(exc)
                log.error("audit trail %s: %d records from the fallback journal %s wait for it: %s",
                          self.path, left, journal.path, exc)  # fmt: skip
                return
            log.warning("audit trail %s: %d records replayed from the fallback journal %s "
                        "(a previous run could not write them to the trail)", self.path, replayed, journal.path)  # fmt: skip

    def record(self, entry: AuditRecord) -> None:
        """Queue one decision for writing; never blocks the caller (the live loop). Raises
        AuditUnavailableError when `max_held` records already wait in memory with nowhere to go:
        the caller must not show the decision."""
        row = self._row(entry)
        with self._lock:
            held = self._queue.unfinished_tasks
            if held >= self.max_held:
                self._withheld += 1
                raise AuditUnavailableError(
                    f"the audit trail cannot record this decision ({self._problem_text(held)}); "
                    f"{held} records already held in memory (audit.max_held)"
                )
            self._queue.put_nowait(row)

    def status(self) -> TrailStatus:
        with self._lock:
            held = self._queue.unfinished_tasks  # queued, being written, or held for a retry
            problem = self._problem_text(held)
            return TrailStatus(
                problem is None,
                problem,
                self._written,
                held,
                self._lost,
                None if self._head is None else self._head[0],
                None if self._head is None else self._head[1],
                0 if self.journal is None else self.journal.count,
                self._withheld,
                self._unarchived,
            )

    def _problem_text(self, held: int) -> str | None:
        """What is wrong, with the counts of this moment (called under `_lock`)."""
        journalled = 0 if self.journal is None else self.journal.count
        overdue = (
            self.max_unarchived_bytes is not None and self._unarchived > self.max_unarchived_bytes
        )
        if self._trail_error is None and not journalled and not overdue:
            return None
        parts = []
        if overdue:
            parts.append(f"{self._unarchived / 1e9:.2f} GB of sealed audit segments not archived "
                         f"(more than audit.max_unarchived_bytes, {self.max_unarchived_bytes / 1e9:.2f} GB): "  # type: ignore[operator]
                         f"archive them now (edgebc audit archive DEST --trail {self.path}) before the disk fills")  # fmt: skip
        if self._trail_error is not None:
            parts.append(f"audit trail cannot be written ({self._trail_error})")
        if journalled:
            parts.append(f"{journalled} records in the fallback journal {self.journal.path} "  # type: ignore[union-attr]
                         "until the trail can be written")  # fmt: skip
        if self._journal_error is not None:
            parts.append(f"the fallback journal cannot be written either ({self._journal_error})")
        if held and (self._trail_error is not None or self._journal_error is not None):
            parts.append(f"{held} records held in memory")
            if held >= self.max_held:
                parts.append(f"new decisions withheld beyond {self.max_held} held ({self._withheld} so far)")  # fmt: skip
        return "; ".join(parts)

    def summary(self) -> str:
        """One line of exact counts (the shutdown line): written, journalled, held, lost, withheld."""
        status = self.status()
        committed = status.all_committed
        where = ("" if not status.journalled or self.journal is None
                 else f" in {self.journal.path}, replayed into the trail when it can be written (at the next start at the latest)")  # fmt: skip
        return (f"audit log {'committed' if committed else 'NOT fully committed'} ({self.path}): "
                f"{status.written} written, {status.journalled} journalled{where}, {status.pending} held, "
                f"{status.lost} lost, {status.withheld} withheld; chain head record {status.head_id}")  # fmt: skip

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until everything recorded is committed to the trail (True; the journal replayed
        too) or `timeout` passes (False)."""
        return self._wait(
            lambda status: (
                status.pending == 0 and not status.journalled and self._trail_error is None
            ),
            timeout,
        )

    def _wait(self, done: Any, timeout: float) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if done(self.status()):
                return True
            time.sleep(0.02)
        return False

    def close(self, timeout: float = 5.0) -> None:
        """Make every record durable, in the trail or else the journal (up to `timeout`), stop the
        writer, close the database. What could be written nowhere is counted as lost, and said."""
        self._wait(lambda status: status.pending == 0, timeout)
        self._stop.set()
        self._thread.join(timeout)
        self._connection.close()
        self._anchor(force=True)
        if self._retiring is not None:
            self._retiring.join(timeout)
        self._trail_lock.release()
        line = self.summary() + f" ({_describe(self._head)})"
        if self.status().healthy:
            log.info("closed: %s", line)
        else:
            log.error("closed: %s", line)

    def _anchor(self, force: bool = False) -> None:
        """Export the chain head (anchor file and log) when it moved and the interval has passed."""
        head = self._head
        if head is None or head == self._anchored:
            return
        if not force and time.monotonic() - self._anchored_at < self.anchor_interval:
            return
        self._anchored, self._anchored_at = head, time.monotonic()
        log.info("audit chain head: %s", _describe(head))
        if self.anchor_path is not None:
            try:
                append_anchor(self.anchor_path, self.path, head[0], head[1], self._key)
            except OSError as exc:  # the log line above still anchors it
                log.error("audit anchor %s could not be written: %s", self.anchor_path, exc)

    def _housekeeping(self) -> None:
        """Seal the live segment when it is due; every 30 s (and after a rotation) count what
        waits to be archived; at start, after a rotation and hourly retire what may go."""
        rotated = self._rotation_due() and self._rotate()
        if not rotated and time.monotonic() - self._archive_checked < self.archive_check_interval:
            return
        self._archive_checked = time.monotonic()
        _, size = unarchived(self.path)
        with self._lock:
            self._unarchived = size
        retire_due = rotated or time.monotonic() - self._retired_at >= self.retire_interval
        if (
            retire_due
            and (self.keep_days is not None or self.keep_bytes is not None)
            and (self._retiring is None or not self._retiring.is_alive())
        ):
            self._retired_at = time.monotonic()
            self._retiring = threading.Thread(target=self._retire, name="edgebc-audit-retire", daemon=True)  # fmt: skip
            self._retiring.start()

    def _retire(self) -> None:
        """Off the writer's thread: retiring hashes whole segments and their copies."""
        try:
            retire_segments(self.path, self.keep_days, self.keep_bytes, key=self._key)
        except (OSError, ValueError) as exc:
            log.error("audit trail %s: retiring archived segments failed: %s", self.path, exc)

    def _rotation_due(self) -> bool:
        journal = self.journal
        if journal is not None and (journal.count or journal.path.exists()):
            return False  # its replay must land in the segment that records its id
        if self._trail_error is not None or self._held or self._live_since is None:
            return False
        if time.monotonic() < self._next_rotation_try:
            return False
        if (
            self.rotate_interval_s is not None
            and time.time() - self._live_since >= self.rotate_interval_s
        ):
            return True
        if self.rotate_bytes is None:
            return False
        wal = self.path.with_name(self.path.name + "-wal")
        size = self.path.stat().st_size + (wal.stat().st_size if wal.exists() else 0)
        return size >= self.rotate_bytes

    def _rotate(self) -> bool:
        """Seal the live segment as `<name>.NNNNNN` and start the next, chained to its head. The
        next file is made first (a full disk leaves the live one as it is); then the live file is
        made one self-contained file (no WAL), renamed, and the prepared file renamed into its
        place. A kill at any point leaves what `_finish_rotation` completes at the next start."""
        with self._rotation_lock:
            return self._rotate_locked()

    def _rotate_locked(self) -> bool:
        # under the database lock throughout: the head the next segment follows cannot move
        with self._db_lock:
            head = self._head
            if head is None or self._live_since is None:
                return False
            sealed = sealed_segments(self.path)
            target = segment_path(self.path, (sealed[-1][0] if sealed else 0) + 1)
            prepared = next_live_path(self.path)
            try:
                _prepare_segment(prepared, target.name, head)
                self._connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                mode = self._connection.execute("PRAGMA journal_mode=DELETE").fetchone()[0]
                if str(mode).lower() != "delete":
                    raise sqlite3.OperationalError(f"it stays in {mode} mode (another reader has it open)")  # fmt: skip
            except (sqlite3.Error, OSError) as exc:
                with contextlib.suppress(sqlite3.Error):
                    self._connection.execute("PRAGMA journal_mode=WAL")
                with contextlib.suppress(OSError):
                    prepared.unlink(missing_ok=True)
                return self._rotation_failed(exc)
            self._connection.close()
            try:
                os.rename(self.path, target)
                fsync_directory(self.path.parent)
                with contextlib.suppress(OSError):
                    os.chmod(target, 0o444)  # sealed: nothing writes it again
            finally:
                self._finish_rotation(
                    cut_off=False
                )  # the prepared file goes live, or (not sealed) goes
                self._connection = self._connect()
            self._live_since = None
        self.set_max_bytes(self._max_bytes)
        log.info("audit trail %s: sealed as %s at record %d; the new live segment continues the chain",
                 self.path, target.name, head[0])  # fmt: skip
        return True

    def rotate_now(self) -> bool:
        """Seal the live segment now (before an archive run, say): False when it holds no
        records yet, or records wait in the journal or in memory, or sealing failed (logged)."""
        journal = self.journal
        if journal is not None and (journal.count or journal.path.exists()):
            return False
        if self._live_since is None or self._trail_error is not None:
            return False
        return self._rotate()

    def _rotation_failed(self, exc: BaseException) -> bool:
        log.error("audit trail %s: could not seal the live segment (%s); it goes on, retried in a minute",
                  self.path, exc)  # fmt: skip
        self._next_rotation_try = time.monotonic() + 60.0
        return False

    def _row(self, entry: AuditRecord) -> tuple[Any, ...]:
        pixels = None
        if self.store_pixels and entry.pixels is not None:
            ok, encoded = cv2.imencode(".png", entry.pixels)
            pixels = encoded.tobytes() if ok else None
        # numbers as SQLite stores them, so the hash of the row written is the hash of the row read
        return (
            _now(), _iso(entry.captured_at), entry.source,
            None if entry.frame_index is None else int(entry.frame_index), entry.frame_sha256, entry.model_sha256,
            None if entry.probabilities is None else json.dumps(entry.probabilities), entry.decision, entry.smoothed_decision,
            None if entry.threshold is None else float(entry.threshold), entry.quality, json.dumps(entry.latencies_ms), pixels,
            entry.patient_id if self.store_patient_ids else None,
            None if entry.shift is None else json.dumps(entry.shift),
            None if entry.localiser is None else json.dumps(entry.localiser),
            entry.runtime,
        )  # fmt: skip

    def _run(self) -> None:
        while not self._stop.is_set():
            batch = self._held or self._drain()
            try:
                stored = self._step(batch)
            except Exception as exc:  # the writer must never die: said, held, tried again
                log.exception("audit trail %s: unexpected error while writing", self.path)
                self._trail_failed(exc)
                stored = False
            if stored:
                self._done(batch)
            else:  # nowhere to put it: wait for the next try at the trail (or a stop)
                self._held = batch
                self._stop.wait(max(0.02, self._next_try - time.monotonic()))
            try:
                self._anchor()
                self._housekeeping()
            except Exception as exc:  # a failed rotation or count: unhealthy until a write works
                log.exception("audit trail %s: rotation or archive bookkeeping failed", self.path)
                self._trail_failed(exc)
        # Stopping: one last try for everything held and queued, at the trail, else the journal.
        self._next_try = 0.0
        while batch := self._held or self._drain(wait=False):
            if not self._step(batch):
                break
            self._done(batch)
        left = self._held + self._drain(wait=False, limit=None)
        if left:
            with self._lock:
                self._lost += len(left)
            log.error("audit trail %s: %d records could be written neither to the trail nor to "
                      "the fallback journal before the stop; they are lost", self.path, len(left))  # fmt: skip
            self._done(left)
            self._held = []

    def _done(self, batch: list[tuple[Any, ...]]) -> None:
        """Only now are they done: flush() and close() must not return while a batch is in flight."""
        self._held = []
        for _ in batch:
            self._queue.task_done()

    def _step(self, batch: list[tuple[Any, ...]]) -> bool:
        """Make `batch` durable: into the trail when it can be written and the journal is empty
        (replayed first, so that order holds), else into the journal. False: neither took it."""
        journal = self.journal
        trail_due = time.monotonic() >= self._next_try
        if trail_due and (journal is None or not journal.count or self._try_replay()):
            if not batch:
                return True
            try:
                self._write(batch)
            except (sqlite3.Error, OSError) as exc:
                self._trail_failed(exc)
            else:
                self._trail_recovered(len(batch))
                return True
        if not batch:
            return True
        if journal is None:
            return False
        try:
            journal.append(batch)
        except OSError as exc:
            with self._lock:
                if self._journal_error is None:
                    log.error("audit journal %s cannot be written: %s", journal.path, exc)
                self._journal_error = str(exc)
            return False
        with self._lock:
            self._journal_error = None
        return True

    def _try_replay(self) -> bool:
        try:
            replayed = self._replay()
        except (sqlite3.Error, OSError, JournalDamagedError) as exc:  # the journal waits; said
            self._trail_failed(exc)
            return False
        log.warning("audit trail %s writable again: %d records replayed from the fallback journal",
                    self.path, replayed)  # fmt: skip
        self._trail_recovered(0)
        return True

    def _trail_failed(self, exc: BaseException) -> None:
        with self._lock:
            if self._trail_error is None:
                log.error("audit trail %s cannot be written: %s", self.path, exc)
            self._trail_error = str(exc)
        self._next_try = time.monotonic() + self._backoff
        self._backoff = min(self._backoff * 2, 5.0)

    def _trail_recovered(self, written: int) -> None:
        with self._lock:
            self._written += written
            self._trail_error = None
        self._backoff, self._next_try = self.flush_interval, 0.0

    def _replay(self) -> int:
        """The journal into the trail, chained in order, with its id in `journal_replays`, in one
        transaction; the file is removed only after the commit. A journal whose id is already
        there was committed before a crash kept it from being removed: removed, nothing written."""
        journal = self.journal
        if journal is None:
            return 0
        if not journal.path.exists():
            journal.count = 0
            return 0
        journal_id, rows = journal.read()
        replayed = 0
        with self._db_lock:
            done = (
                journal_id
                and self._connection.execute(
                    "SELECT 1 FROM journal_replays WHERE journal_id = ?", (journal_id,)
                ).fetchone()
            )
            if rows and not done:
                first = self._insert_chained(
                    rows, lambda first, last: self._connection.execute(
                        "INSERT INTO journal_replays VALUES (?, ?, ?, ?)", (journal_id, _now(), first, last)))  # fmt: skip
                replayed = len(rows)
                log.info("audit trail %s: journal %s replayed as records %d..%d",
                         self.path, journal_id, first, first + replayed - 1)  # fmt: skip
        journal.remove()
        with self._lock:
            self._written += replayed
        return replayed

    def _write(self, batch: list[tuple[Any, ...]]) -> None:
        """One transaction: every row of the batch is committed, or none is."""
        with self._db_lock:
            self._insert_chained(batch)

    def _insert_chained(self, batch: list[tuple[Any, ...]], also: Any = None) -> int:
        """Chain and insert `batch` (and run `also(first_id, last_id)`) in one transaction; the
        first id. Called under `_db_lock`."""
        try:
            self._connection.execute("BEGIN IMMEDIATE")
            # the head read inside the write transaction: the chain follows what is committed
            head = self._read_head()
            record_id, previous = head or (0, GENESIS)
            first = record_id + 1
            rows = []
            for fields in batch:
                record_id, previous = record_id + 1, record_hash(previous, fields)
                mac = None if self._key is None else record_mac(self._key, previous)
                rows.append((record_id, *fields, previous, mac))
            self._connection.executemany(self._insert, rows)
            if also is not None:
                also(first, record_id)
            self._connection.execute("COMMIT")
        except sqlite3.Error:
            if self._connection.in_transaction:
                self._connection.execute("ROLLBACK")
            raise
        with self._lock:
            self._head = (record_id, previous)
        if self._live_since is None:
            self._live_since = time.time()
        return first

    _insert = (
        f"INSERT INTO decisions ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})"
    )

    def _drain(self, wait: bool = True, limit: int | None = 256) -> list[tuple[Any, ...]]:
        try:
            batch = [self._queue.get(timeout=self.flush_interval if wait else None, block=wait)]
        except queue.Empty:
            return []
        while limit is None or len(batch) < limit:
            try:
                batch.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return batch


def _prepare_segment(path: Path, follows: str, head: tuple[int, str]) -> None:
    """The next live segment, empty but for the head of the segment it continues."""
    path.unlink(missing_ok=True)
    connection = sqlite3.connect(str(path), isolation_level=None)
    try:
        connection.execute("PRAGMA synchronous=FULL")
        connection.executescript(SCHEMA)
        connection.execute(
            "INSERT INTO segment_start VALUES (?, ?, ?, ?)", (follows, *head, _now())
        )
    finally:
        connection.close()
    fsync_directory(path.parent)


def _head_of(segment: Path) -> tuple[int, str] | None:
    """A sealed segment's last record (or, when it has none, the head it continued from)."""
    connection = sqlite3.connect(f"file:{segment}?mode=ro", uri=True)
    try:
        row = connection.execute("SELECT id, chain FROM decisions ORDER BY id DESC LIMIT 1").fetchone()  # fmt: skip
        if row is None:
            row = connection.execute("SELECT previous_id, previous_chain FROM segment_start").fetchone()  # fmt: skip
    finally:
        connection.close()
    return None if row is None else (int(row[0]), str(row[1]))


def _same_filesystem(a: Path, b: Path) -> bool:
    """Whether two paths (or their nearest existing folders) are on one filesystem."""

    def device(path: Path) -> int:
        path = path.resolve()
        while not path.exists():
            path = path.parent
        return os.stat(path).st_dev

    return device(a) == device(b)


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")


def _describe(head: tuple[int, str] | None) -> str:
    return "none (no records)" if head is None else f"record {head[0]} {head[1][:16]}"


def _iso(timestamp: float | None) -> str | None:
    return (
        None
        if timestamp is None
        else dt.datetime.fromtimestamp(timestamp, dt.timezone.utc).isoformat(
            timespec="milliseconds"
        )
    )


def read_trail(path: str | Path) -> list[dict[str, Any]]:
    """All rows, after SQLite's integrity check (raises if the file is damaged)."""
    connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        check = connection.execute("PRAGMA integrity_check").fetchone()[0]
        if check != "ok":
            raise sqlite3.DatabaseError(f"{path}: integrity check failed: {check}")
        connection.row_factory = sqlite3.Row
        return [dict(row) for row in connection.execute("SELECT * FROM decisions ORDER BY id")]
    finally:
        connection.close()
