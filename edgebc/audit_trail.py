"""The audit trail: every decision the device showed, in an append-only SQLite log that survives crashes.

SQLite in WAL mode with synchronous=FULL; rows are written by one background thread in
transactions, so a crash or a kill leaves every committed row whole and nothing half-written.
Triggers refuse UPDATE and DELETE: the log is append-only, and tamper-evident beyond that: every
record carries a hash chained to the one before, MACed with a key kept outside the trail's
directory, and the chain head is anchored at intervals in a file and the log
(edgebc/audit_chain.py; `edgebc audit verify` checks it). No pixels and no patient identifiers are
stored unless the site opts in.

When the disk is full (or the optional `max_bytes` cap is reached) the failed transaction rolls
back, the records stay queued in memory (bounded), `status()` turns unhealthy with a plain
message so readiness can report it, and writing resumes on its own once space returns. Only
when the queue itself overflows are records lost, and then they are counted, never silently.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import queue
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from edgebc.audit_chain import (
    CHAINED_COLUMNS,
    GENESIS,
    append_anchor,
    load_or_create_key,
    record_hash,
    record_mac,
)

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
    chain_mac TEXT
);
CREATE TABLE IF NOT EXISTS chain_events (
    at TEXT NOT NULL,
    first_id INTEGER NOT NULL,
    last_id INTEGER NOT NULL
);
CREATE TRIGGER IF NOT EXISTS decisions_no_update BEFORE UPDATE ON decisions
    BEGIN SELECT RAISE(ABORT, 'the audit trail is append-only'); END;
CREATE TRIGGER IF NOT EXISTS decisions_no_delete BEFORE DELETE ON decisions
    BEGIN SELECT RAISE(ABORT, 'the audit trail is append-only'); END;
CREATE TRIGGER IF NOT EXISTS chain_events_no_update BEFORE UPDATE ON chain_events
    BEGIN SELECT RAISE(ABORT, 'the audit trail is append-only'); END;
CREATE TRIGGER IF NOT EXISTS chain_events_no_delete BEFORE DELETE ON chain_events
    BEGIN SELECT RAISE(ABORT, 'the audit trail is append-only'); END;
"""
_NO_UPDATE = """CREATE TRIGGER decisions_no_update BEFORE UPDATE ON decisions
    BEGIN SELECT RAISE(ABORT, 'the audit trail is append-only'); END"""
_COLUMNS = ("id", *CHAINED_COLUMNS, "chain", "chain_mac")


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
    `QualityResult`'s own); `context` adds where and when the frame came from."""
    return AuditRecord(
        model_sha256=decision.model_sha256,
        quality=str(decision.quality),
        decision=decision.label,
        probabilities=decision.probabilities,
        threshold=decision.threshold,
        shift=decision.to_json()["shift"],
        **context,
    )


@dataclass(frozen=True)
class TrailStatus:
    healthy: bool
    problem: str | None
    written: int
    pending: int
    lost: int
    head_id: int | None  # the newest committed record, and its chain hash: compare with verify
    head: str | None


class AuditTrail:
    """The append-only, hash-chained log. `key_path`: the HMAC key file (created 0600 if absent;
    None: records are chained but not MACed); `anchor_path`: the file the chain head is appended
    to every `anchor_interval` seconds while records arrive, and at close (None: the log only)."""

    def __init__(self, path: str | Path, store_pixels: bool = False, store_patient_ids: bool = False,
                 flush_interval: float = 0.2, max_backlog: int = 20000, max_bytes: int | None = None,
                 key_path: str | Path | None = None, anchor_path: str | Path | None = None,
                 anchor_interval: float = 60.0) -> None:  # fmt: skip
        self.path = Path(path)
        self._key = None if key_path is None else load_or_create_key(key_path, self.path)
        self.anchor_path = None if anchor_path is None else Path(anchor_path)
        self.anchor_interval = anchor_interval
        self.store_pixels, self.store_patient_ids = store_pixels, store_patient_ids
        self.flush_interval = flush_interval
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._connection = sqlite3.connect(
            str(self.path), check_same_thread=False, isolation_level=None
        )
        self._connection.execute("PRAGMA journal_mode=WAL")
        self._connection.execute("PRAGMA synchronous=FULL")
        self._connection.executescript(SCHEMA)
        self._add_missing_columns()
        self._chain_unchained_rows()
        self._head = self._read_head()
        self._anchored = self._head  # what the newest anchor says; None: nothing anchored yet
        self._anchored_at = time.monotonic()
        self._db_lock = (
            threading.Lock()
        )  # one connection, two threads (writer, and set_max_bytes callers)
        self.set_max_bytes(max_bytes)
        self._queue: queue.Queue[tuple[Any, ...]] = queue.Queue(maxsize=max_backlog)
        self._retry: list[tuple[Any, ...]] = []
        self._lock = threading.Lock()
        self._problem: str | None = None
        self._written = self._lost = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="edgebc-audit-writer", daemon=True)
        self._thread.start()

    def _add_missing_columns(self) -> None:
        """A log written by an older edgebc lacks the newer columns (shift): added, the rows kept
        (ALTER TABLE ADD COLUMN changes no row, so the append-only triggers allow it)."""
        present = {row[1] for row in self._connection.execute("PRAGMA table_info(decisions)")}
        for column in ("shift", "chain", "chain_mac"):
            if column not in present:
                self._connection.execute(f"ALTER TABLE decisions ADD COLUMN {column} TEXT")

    def _chain_unchained_rows(self) -> None:
        """Rows written by an edgebc without the chain get theirs now, following the last chained
        row, in one transaction that lifts the no-update trigger for just these rows and puts it
        back; `chain_events` records which rows were chained when (they were unprotected before)."""
        connection = self._connection
        last = connection.execute("SELECT max(id) FROM decisions WHERE chain IS NOT NULL").fetchone()[0]  # fmt: skip
        rows = connection.execute(
            f"SELECT id, {', '.join(CHAINED_COLUMNS)} FROM decisions WHERE id > ? ORDER BY id",
            (last or 0,),
        ).fetchall()
        if not rows:
            return
        previous = GENESIS if last is None else self._chain_of(last)
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
        row = self._connection.execute("SELECT id, chain FROM decisions ORDER BY id DESC LIMIT 1").fetchone()  # fmt: skip
        return None if row is None else (int(row[0]), str(row[1]))

    def set_max_bytes(self, max_bytes: int | None) -> None:
        """Cap the log's size (small SD cards); None removes the cap. Reaching it acts like a full disk."""
        with self._db_lock:
            page_size = int(self._connection.execute("PRAGMA page_size").fetchone()[0])
            pages = (max_bytes // page_size) if max_bytes else 1073741823
            self._connection.execute(f"PRAGMA max_page_count = {int(pages)}")

    def record(self, entry: AuditRecord) -> None:
        """Queue one decision for writing; never blocks the caller (the live loop)."""
        row = self._row(entry)
        try:
            self._queue.put_nowait(row)
        except queue.Full:
            with self._lock:
                self._lost += 1
                self._problem = f"audit backlog full: {self._lost} records could not be kept"
            log.error("audit trail backlog full; a record was lost")

    def status(self) -> TrailStatus:
        with self._lock:
            return TrailStatus(
                self._problem is None,
                self._problem,
                self._written,
                self._queue.unfinished_tasks,  # queued, being written, or held for a retry
                self._lost,
                None if self._head is None else self._head[0],
                None if self._head is None else self._head[1],
            )

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until everything queued is committed (True) or `timeout` passes (False)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            status = self.status()
            if status.pending == 0 and status.healthy:
                return True
            time.sleep(0.02)
        return False

    def close(self, timeout: float = 5.0) -> None:
        """Commit what is queued (up to `timeout`), stop the writer, close the database."""
        self.flush(timeout)
        self._stop.set()
        self._thread.join(timeout)
        self._connection.close()
        self._anchor(force=True)
        status = self.status()
        log.info("audit trail %s closed: %d records written, %d held, %d lost; chain head %s",
                 self.path, status.written, status.pending, status.lost, _describe(self._head))  # fmt: skip

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
        )  # fmt: skip

    def _run(self) -> None:
        backoff = self.flush_interval
        while not (self._stop.is_set() and self._queue.empty() and not self._retry):
            batch = self._retry or self._drain()
            if not batch:
                continue
            try:
                self._write(batch)
            except sqlite3.Error as exc:
                with self._lock:  # held: this batch, and everything queued behind it
                    held = self._queue.unfinished_tasks
                    self._problem = (
                        f"audit trail cannot be written ({exc}); {held} records held in memory"
                    )
                log.error("audit trail write failed: %s", exc)
                self._retry = batch
                if self._stop.wait(backoff):
                    break
                backoff = min(backoff * 2, 5.0)
                continue
            backoff = self.flush_interval
            self._retry = []
            for _ in (
                batch
            ):  # only now are they done: flush() must not return while a batch is in flight
                self._queue.task_done()
            with self._lock:
                self._written += len(batch)
                if self._problem and not self._problem.startswith("audit backlog full"):
                    self._problem = None
            self._anchor()

    def _write(self, batch: list[tuple[Any, ...]]) -> None:
        """One transaction: every row of the batch is committed, or none is."""
        with self._db_lock:
            try:
                self._connection.execute("BEGIN IMMEDIATE")
                # the head read inside the write transaction: the chain follows what is committed
                head = self._read_head()
                record_id, previous = head or (0, GENESIS)
                rows = []
                for fields in batch:
                    record_id, previous = record_id + 1, record_hash(previous, fields)
                    mac = None if self._key is None else record_mac(self._key, previous)
                    rows.append((record_id, *fields, previous, mac))
                self._connection.executemany(self._insert, rows)
                self._connection.execute("COMMIT")
            except sqlite3.Error:
                if self._connection.in_transaction:
                    self._connection.execute("ROLLBACK")
                raise
        with self._lock:
            self._head = (record_id, previous)

    _insert = (
        f"INSERT INTO decisions ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})"
    )

    def _drain(self) -> list[tuple[Any, ...]]:
        try:
            batch = [self._queue.get(timeout=self.flush_interval)]
        except queue.Empty:
            return []
        while len(batch) < 256:
            try:
                batch.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return batch


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
