"""Getting sealed audit segments off the cart: copy and verify them, and retire only what is safe.

`archive_segments` copies each sealed segment to a folder (a mounted USB stick, a network share),
checks the copy's sha256 against the original's and the hash chain inside it, and only then notes
it in the archive record beside the trail (`<trail>.archive.json`, replaced atomically).
`retire_segments` deletes a sealed segment only when that record says a verified copy exists and,
with the copy's folder reachable, the copy is still there with the same sha256 (and the original
still has it too); anything else is kept and said. The live segment is never touched.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgebc.atomic import atomic_write_text, fsync_directory
from edgebc.audit_chain import retirement_mac, verify_segment
from edgebc.audit_segments import sealed_segments
from edgebc.errors import EdgebcError
from edgebc.integrity import sha256_file

log = logging.getLogger(__name__)

FORMAT = "edgebc-audit-archive-record"
_CHUNK = 1 << 20


class ArchiveError(EdgebcError):
    """A copy that does not match its original, or whose chain is broken: not counted as archived."""


def record_path(live: Path) -> Path:
    return live.with_name(live.name + ".archive.json")


@contextlib.contextmanager
def _record_lock(live: Path) -> Iterator[None]:
    """The server's retention thread and `edgebc audit archive` may both update the record."""
    import fcntl  # POSIX only, as the service is

    lock = live.with_name(live.name + ".archive.lock")
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def read_record(live: Path) -> dict[str, Any]:
    path = record_path(live)
    if not path.exists():
        return {"format": FORMAT, "trail": str(live.resolve()), "segments": {}, "retired": {}}
    record = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise ValueError(f"{path}: not an edgebc audit archive record")
    return record


def _write_record(live: Path, record: dict[str, Any]) -> None:
    atomic_write_text(record_path(live), json.dumps(record, indent=1) + "\n")


def _verified_copies(entry: dict[str, Any] | None) -> list[dict[str, Any]]:
    return [] if entry is None else [a for a in entry.get("archives", []) if a.get("verified")]


@dataclass(frozen=True)
class Archived:
    name: str
    copy: Path
    sha256: str
    size: int
    records: str  # "first..last"
    already: bool  # a verified copy was there from an earlier run


def archive_segments(live: Path, dest: Path, key: bytes | None = None) -> list[Archived]:
    """Copy every sealed segment of the trail `live` not yet archived in `dest` there, verify
    each copy, and record it. Raises ArchiveError at the first copy that does not verify."""
    if not dest.is_dir():
        raise FileNotFoundError(f"{dest}: no such folder (mount the stick or the share first)")
    dest = dest.resolve()
    done = []
    for _, segment in sealed_segments(live):
        target = dest / segment.name
        with _record_lock(live):
            entry = read_record(live)["segments"].get(segment.name)
        if (
            entry is not None
            and target.is_file()
            and any(a["path"] == str(target) for a in _verified_copies(entry))
        ):
            done.append(Archived(segment.name, target, entry["sha256"], entry["bytes"],
                                 entry["records"], True))  # fmt: skip
            continue
        done.append(_archive_one(live, segment, target, key))
    return done


def _archive_one(live: Path, segment: Path, target: Path, key: bytes | None) -> Archived:
    partial = target.with_name(target.name + ".partial")
    digest = hashlib.sha256()
    with open(segment, "rb") as source, open(partial, "wb") as copy:
        while chunk := source.read(_CHUNK):
            digest.update(chunk)
            copy.write(chunk)
        copy.flush()
        os.fsync(copy.fileno())
    original = digest.hexdigest()
    copied = sha256_file(partial)  # read back from the destination, not from our buffer
    if copied != original:
        partial.unlink()
        raise ArchiveError(f"{target}: the copy's sha256 {copied[:16]} differs from the original's "
                           f"{original[:16]} (a failing stick?); nothing recorded")  # fmt: skip
    if target.exists() and sha256_file(target) != original:
        partial.unlink()
        raise ArchiveError(f"{target} exists with other content; not overwritten (another trail's "
                           "segment? archive each trail to its own folder)")  # fmt: skip
    os.replace(partial, target)
    fsync_directory(target.parent)
    verdict = verify_segment(target, key)
    if not verdict.ok:
        raise ArchiveError(f"{target}: copied, but its chain does not verify ({verdict.problem}); "
                           "not recorded as archived, the segment stays on the cart")  # fmt: skip
    size = segment.stat().st_size
    first = (verdict.head_id or 0) - verdict.records + 1
    records = f"{first}..{verdict.head_id}" if verdict.records else "none"
    with _record_lock(live):
        record = read_record(live)
        entry = record["segments"].setdefault(
            segment.name, {"sha256": original, "bytes": size, "records": records, "archives": []}
        )
        if entry["sha256"] != original:  # archived before with other content: the original changed
            raise ArchiveError(f"{segment}: its sha256 is not the one recorded when it was archived "
                               "before: the sealed segment was changed")  # fmt: skip
        entry["archives"].append({"path": str(target), "at": _now(), "verified": True})
        _write_record(live, record)
    log.info("audit segment %s archived to %s (sha256 %s, records %s)", segment.name, target,
             original[:16], records)  # fmt: skip
    return Archived(segment.name, target, original, size, records, False)


def unarchived(live: Path) -> tuple[int, int]:
    """How many sealed segments have no verified archive copy, and their bytes."""
    try:
        segments = read_record(live)["segments"]
    except (OSError, ValueError):
        segments = {}
    count = size = 0
    for _, segment in sealed_segments(live):
        if not _verified_copies(segments.get(segment.name)):
            count += 1
            with contextlib.suppress(FileNotFoundError):
                size += segment.stat().st_size
    return count, size


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def retire_segments(live: Path, keep_days: float | None, keep_bytes: int | None,
                    now: float | None = None, key: bytes | None = None) -> list[str]:  # fmt: skip
    """Delete sealed segments older than `keep_days`, or the oldest while the trail's files exceed
    `keep_bytes`, but only those with a confirmed archive copy. One line per segment acted on."""
    now = time.time() if now is None else now
    lines = []
    with _record_lock(live):  # listed under the lock: another retirer may have just deleted some
        sizes = {segment: _size(segment) for _, segment in sealed_segments(live)}
        total = sum(sizes.values()) + _size(live)
        record = read_record(live)
        for segment, size in sizes.items():
            try:
                modified = segment.stat().st_mtime
            except FileNotFoundError:
                continue  # retired by another process meanwhile
            old = keep_days is not None and now - modified > keep_days * 86400
            over = keep_bytes is not None and total > keep_bytes
            if not (old or over):
                continue
            entry = record["segments"].get(segment.name)
            confirmed, why = _confirm(segment, entry)
            if confirmed is None or entry is None:
                lines.append(f"kept {segment.name}: {why}")
                log.warning("audit segment %s kept although due for retirement: %s", segment.name, why)  # fmt: skip
                continue
            # The record first: a kill between the two leaves a retired segment still present
            # (deleted next time), never a missing one that nothing explains.
            retirement = {"at": _now(), "archive": confirmed, "sha256": entry["sha256"],
                          "records": entry["records"]}  # fmt: skip
            if key is not None:  # what lets `verify --key` tell a retirement from a deletion
                retirement["mac"] = retirement_mac(key, segment.name, retirement)
            record["retired"][segment.name] = retirement
            _write_record(live, record)
            segment.unlink()
            fsync_directory(segment.parent)
            total -= size
            lines.append(f"deleted {segment.name} (records {entry['records']}, {size} bytes); "
                         f"its verified copy: {confirmed}")  # fmt: skip
            log.warning("audit segment %s deleted from the cart (records %s, %d bytes); its verified "
                        "copy: %s", segment.name, entry["records"], size, confirmed)  # fmt: skip
    return lines


def _confirm(segment: Path, entry: dict[str, Any] | None) -> tuple[str | None, str]:
    """The path of a copy seen now with the recorded sha256, or None and why not."""
    copies = _verified_copies(entry)
    if entry is None or not copies:
        return None, "no verified archive copy (run edgebc audit archive DEST)"
    if sha256_file(segment) != entry["sha256"]:
        return None, "its sha256 is not the one archived: the sealed segment was changed since"
    reasons = []
    for copy in copies:
        path = Path(copy["path"])
        if not path.parent.is_dir():
            reasons.append(f"{path.parent} not reachable now")
        elif not path.is_file():
            reasons.append(f"{path} is gone")
        elif sha256_file(path) != entry["sha256"]:
            reasons.append(f"{path} no longer has the archived sha256")
        else:
            return str(path), ""
    return None, "; ".join(reasons)


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
