"""The audit trail's files: the live segment, the sealed ones beside it, and the one-writer lock.

The trail at `audit.path` is the live segment. Rotation seals it by renaming it to
`<name>.000042` (numbers in order, six digits so names sort as numbers do) and starts a new live
file whose `segment_start` row carries the sealed segment's name, last record id and chain hash:
record ids continue across segments and the chain runs on unbroken, so a missing, reordered or
replaced segment shows (edgebc/audit_chain.py). A lock file beside the trail, held with
flock(2) for as long as a process has the trail open, keeps a second writer out.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import sys
from pathlib import Path

from edgebc.errors import EdgebcError

DIGITS = 6


class AuditLockedError(EdgebcError):
    """Another process has this audit trail open: two writers would fork its chain."""


def segment_path(live: Path, number: int) -> Path:
    return live.with_name(f"{live.name}.{number:0{DIGITS}d}")


def next_live_path(live: Path) -> Path:
    """Where rotation prepares the next live segment before the two renames."""
    return live.with_name(live.name + ".next")


def sealed_segments(live: Path) -> list[tuple[int, Path]]:
    """The sealed segments beside `live`, oldest first."""
    pattern = re.compile(re.escape(live.name) + rf"\.(\d{{{DIGITS}}})")
    found = []
    if live.parent.is_dir():
        for entry in live.parent.iterdir():
            match = pattern.fullmatch(entry.name)
            if match and entry.is_file():
                found.append((int(match.group(1)), entry))
    return sorted(found)


def trail_files(path: Path) -> tuple[Path, list[Path]]:
    """The live path and every segment file of the trail at `path` (its live file, or a folder of
    segments such as an archive), oldest first, the live file last when it exists."""
    if path.is_dir():
        bases = {re.sub(rf"\.\d{{{DIGITS}}}$", "", entry.name) for entry in path.iterdir()
                 if re.search(rf"\.\d{{{DIGITS}}}$", entry.name)}  # fmt: skip
        # a live file not yet rotated: known by the lock its writer keeps beside it
        bases |= {entry.name[: -len(".lock")] for entry in path.glob("*.lock")
                  if (path / entry.name[: -len(".lock")]).is_file()}  # fmt: skip
        if len(bases) > 1:
            raise ValueError(f"{path}: segments of {len(bases)} trails ({', '.join(sorted(bases))}); "
                             "give the live file of one of them")  # fmt: skip
        if not bases:
            raise ValueError(
                f"{path}: no audit trail segments (files named <trail>.{'0' * DIGITS}1)"
            )
        path = path / bases.pop()
    files = [segment for _, segment in sealed_segments(path)]
    if path.is_file():
        files.append(path)
    return path, files


class TrailLock:
    """An exclusive flock on `<trail>.lock`, held until `release()` (or the process ends, which
    the kernel sees to: a killed server leaves no stale lock). The file says who holds it."""

    def __init__(self, live: Path) -> None:
        import fcntl  # POSIX only (the service runs on Linux carts); not needed to read a trail

        self.path = live.with_name(live.name + ".lock")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 512, 0).decode("utf-8", "replace").strip() or "unknown process"
            os.close(fd)
            raise AuditLockedError(
                f"audit trail {live} is in use by another process ({holder}; lock {self.path}): "
                "two servers must not write one audit file; stop the other, or give this one its "
                "own audit.path"
            ) from None
        command = " ".join(sys.argv)[:200]
        since = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}: {command} (since {since})\n".encode(), 0)
        self._fd: int | None = fd

    def release(self) -> None:
        import fcntl

        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
