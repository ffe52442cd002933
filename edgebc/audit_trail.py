"""The audit trail: every decision the device showed, in an append-only SQLite log that survives crashes.

SQLite in WAL mode with synchronous=FULL; rows are written by one background thread in
transactions, so a crash or a kill leaves every committed row whole and nothing half-written.
Triggers refuse UPDATE and DELETE: the log is append-only. No pixels and no patient
identifiers are stored unless the site opts in.

When the disk is full (or the optional `max_bytes` cap is reached) the failed transaction rolls
back, the records stay queued in memory (bounded), `status()` turns unhealthy with a plain
message so readiness can report it, and writing resumes on its own once space returns. Only
when the queue itself overflows are records lost, and then they are counted, never silently.
"""

from __future__ import annotations

import datetime as dt
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
    shift TEXT
);
CREATE TRIGGER IF NOT EXISTS decisions_no_update BEFORE UPDATE ON decisions
    BEGIN SELECT RAISE(ABORT, 'the audit trail is append-only'); END;
CREATE TRIGGER IF NOT EXISTS decisions_no_delete BEFORE DELETE ON decisions
    BEGIN SELECT RAISE(ABORT, 'the audit trail is append-only'); END;
"""
_COLUMNS = ("logged_at", "captured_at", "source", "frame_index", "frame_sha256", "model_sha256", "probabilities",
            "decision", "smoothed_decision", "threshold", "quality", "latencies_ms", "pixels", "patient_id", "shift")  # fmt: skip


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


class AuditTrail:
    def __init__(self, path: str | Path, store_pixels: bool = False, store_patient_ids: bool = False,
                 flush_interval: float = 0.2, max_backlog: int = 20000, max_bytes: int | None = None) -> None:  # fmt: skip
        self.path = Path(path)
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
        for column in ("shift",):
            if column not in present:
                self._connection.execute(f"ALTER TABLE decisions ADD COLUMN {column} TEXT")

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

    def _row(self, entry: AuditRecord) -> tuple[Any, ...]:
        pixels = None
        if self.store_pixels and entry.pixels is not None:
            ok, encoded = cv2.imencode(".png", entry.pixels)
            pixels = encoded.tobytes() if ok else None
        return (
            dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds"), _iso(entry.captured_at), entry.source,
            entry.frame_index, entry.frame_sha256, entry.model_sha256,
            None if entry.probabilities is None else json.dumps(entry.probabilities), entry.decision, entry.smoothed_decision,
            entry.threshold, entry.quality, json.dumps(entry.latencies_ms), pixels,
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
                with self._lock:
                    self._problem = f"audit trail cannot be written ({exc}); {len(batch)} records held in memory"
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

    def _write(self, batch: list[tuple[Any, ...]]) -> None:
        """One transaction: every row of the batch is committed, or none is."""
        with self._db_lock:
            try:
                self._connection.execute("BEGIN IMMEDIATE")
                self._connection.executemany(self._insert, batch)
                self._connection.execute("COMMIT")
            except sqlite3.Error:
                if self._connection.in_transaction:
                    self._connection.execute("ROLLBACK")
                raise

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
