"""The audit trail's fallback journal: where records go, fsynced, while the trail cannot be written.

A JSON-lines file on another path (ideally another filesystem): a header line naming the journal
(a random id), then one line per record carrying every field the trail's row would carry, in the
trail's column order (pixels as base64), MACed with the trail's key when it has one. A later column
(edgebc.audit_chain.LATER_COLUMNS) that is not set is left off the line's end, so a line written
before it existed reads as the same record, and one without it can be read by the edgebc before. The trail
replays it, in order, in one transaction that also records the journal's id in `journal_replays`,
and removes the file only after that commit: a crash between the two finds the id already there
at the next replay and removes the file without writing anything twice.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edgebc.atomic import fsync_directory
from edgebc.audit_chain import CHAINED_COLUMNS, RECORD_COLUMNS, canonical, record_mac

log = logging.getLogger(__name__)

MAGIC = "edgebc-audit-fallback-journal"
_PIXELS = CHAINED_COLUMNS.index("pixels")


class JournalDamagedError(ValueError):
    """A journal line that is not what edgebc wrote: replaying it would put a wrong record in the trail."""


def default_journal_path(key_path: str | Path, trail_path: str | Path) -> Path:
    """Beside the key (outside the trail's folder), one per trail: named after its path's hash."""
    digest = hashlib.sha256(str(Path(trail_path).resolve()).encode()).hexdigest()[:12]
    return Path(key_path).expanduser().with_name(f"audit-{digest}.journal")


class FallbackJournal:
    """Append batches of trail rows durably; read them back for the replay; remove once replayed."""

    def __init__(self, path: str | Path, key: bytes | None, trail_path: str | Path) -> None:
        self.path = Path(path).expanduser()
        self._key = key
        self.trail = str(Path(trail_path).resolve())
        self.count = 0  # records in the file now (a torn last line is not one)
        self.torn = 0  # torn last lines dropped (a write cut off by a kill or a full disk)
        if self.path.exists():
            self._cut_torn_tail()
            self.count = len(self.read()[1])

    def _cut_torn_tail(self) -> None:
        """A last line without its newline was cut off mid-write (a kill, a full disk): that record
        was never durable, and a line appended after it would merge with it, so it goes."""
        raw = self.path.read_bytes()
        if raw and not raw.endswith(b"\n"):
            self.torn = 1
            log.error("audit journal %s: its last line was cut off mid-write; that record is lost", self.path)  # fmt: skip
            with open(self.path, "r+b") as handle:
                handle.truncate(raw.rfind(b"\n") + 1)
                handle.flush()
                os.fsync(handle.fileno())

    def append(self, rows: Sequence[Sequence[Any]]) -> None:
        """Write every row and fsync, or (OSError) leave the file as it was: never half a batch,
        which would be replayed twice once the batch is written again."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        text = "".join(self._line(row) for row in rows)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            size = os.fstat(fd).st_size
            if size == 0:
                header = {"journal": MAGIC, "id": secrets.token_hex(16), "trail": self.trail}
                text = json.dumps(header) + "\n" + text
            try:
                data = text.encode("utf-8")
                written = 0
                while written < len(data):
                    written += os.write(fd, data[written:])
                os.fsync(fd)
            except OSError:
                os.ftruncate(fd, size)  # shrinking needs no space
                raise
        finally:
            os.close(fd)
        if size == 0:
            fsync_directory(self.path.parent)
        self.count += len(rows)

    def read(self) -> tuple[str, list[tuple[Any, ...]]]:
        """The journal's id and its rows, in order; a line that is not edgebc's raises
        JournalDamagedError naming the line."""
        lines = self.path.read_bytes().split(b"\n")  # a torn last line has no newline: not read
        complete = [line for line in lines[:-1] if line.strip()]
        if not complete:
            return "", []
        try:
            header = json.loads(complete[0])
        except ValueError:
            header = None
        if not isinstance(header, dict) or header.get("journal") != MAGIC:
            raise JournalDamagedError(f"audit journal {self.path}: line 1 is not an edgebc journal header")  # fmt: skip
        if header.get("trail") != self.trail:
            raise JournalDamagedError(f"audit journal {self.path} holds records of the trail {header.get('trail')}, "
                                      f"not of {self.trail}: give each trail its own audit.fallback_path")  # fmt: skip
        rows = []
        for number, line in enumerate(complete[1:], start=2):
            try:
                entry = json.loads(line)
                row = list(entry["row"])
                if not len(CHAINED_COLUMNS) <= len(row) <= len(RECORD_COLUMNS):
                    raise ValueError(f"{len(row)} fields")
                row += [None] * (len(RECORD_COLUMNS) - len(row))  # unset later columns
                if row[_PIXELS] is not None:
                    row[_PIXELS] = base64.b64decode(row[_PIXELS], validate=True)
            except (ValueError, KeyError, TypeError) as exc:
                raise JournalDamagedError(f"audit journal {self.path}: line {number} is damaged ({exc})") from exc  # fmt: skip
            if self._key is not None and not hmac.compare_digest(str(entry.get("mac")), _mac(self._key, row)):  # fmt: skip
                raise JournalDamagedError(f"audit journal {self.path}: line {number}: its MAC does not match the "
                                          "key (the journal was edited, or this is not the trail's key)")  # fmt: skip
            rows.append(tuple(row))
        return str(header["id"]), rows

    def remove(self) -> None:
        """Once its records are committed to the trail."""
        self.path.unlink(missing_ok=True)
        fsync_directory(self.path.parent)
        self.count = 0

    def _line(self, row: Sequence[Any]) -> str:
        values = list(row)
        while len(values) > len(CHAINED_COLUMNS) and values[-1] is None:
            values.pop()  # an unset later column: the line an older edgebc wrote, and reads
        if values[_PIXELS] is not None:
            values[_PIXELS] = base64.b64encode(values[_PIXELS]).decode("ascii")
        entry: dict[str, Any] = {"row": values}
        if self._key is not None:
            entry["mac"] = _mac(self._key, row)
        return json.dumps(entry, separators=(",", ":")) + "\n"


def _mac(key: bytes, row: Sequence[Any]) -> str:
    return record_mac(key, hashlib.sha256(canonical(row)).hexdigest())
