"""How this fixture was made: an audit trail (a sealed segment and the live one), its key, its
anchors and a fallback journal, written by edgebc before the trail had a `localiser` column
(commit f4b9f39). Run from the repository root with THAT edgebc to make it again:
`python tests/data/audit-before-localiser/make.py OUT`. tests/test_audit_localiser.py checks
that today's edgebc verifies, replays and extends it without changing one hash."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from edgebc.audit_journal import FallbackJournal
from edgebc.audit_trail import AuditRecord, AuditTrail


def record(k: int) -> AuditRecord:
    return AuditRecord(
        model_sha256="ab" * 32, quality="ok" if k % 3 else "no decision: frame too dark (mean grey level 3)",
        decision=None if k % 3 == 0 else "benign", smoothed_decision="benign",
        probabilities=None if k % 3 == 0 else {"benign": 0.7, "malignant": 0.3}, threshold=0.3,
        captured_at=1_780_000_000.0 + k, source="phantom:benign", frame_index=k, frame_sha256=f"{k:064x}",
        latencies_ms={"inference": 1.5 + k}, pixels=np.full((4, 4), 10 * k, np.uint8),
        shift=None if k % 2 else {"score": 0.25, "flagged": False, "action": None},
    )  # fmt: skip


def main(out: Path) -> None:
    trail_path, keys = out / "trail" / "audit.sqlite", out / "keys"
    trail = AuditTrail(trail_path, store_pixels=True, key_path=keys / "audit.key",
                       anchor_path=keys / "anchors", anchor_interval=0.0)  # fmt: skip
    for k in range(3):
        trail.record(record(k))
    if not trail.flush(5.0) or not trail.rotate_now():
        raise SystemExit("could not write or seal the first segment")
    for k in range(3, 5):
        trail.record(record(k))
    trail.flush(5.0)
    trail.close()
    # records the trail could not take, as its writer journals them (rows of the old length)
    journal = FallbackJournal(keys / "audit.journal", trail._key, trail_path)
    writer = SimpleNamespace(store_pixels=False, store_patient_ids=False)
    journal.append([AuditTrail._row(writer, record(k)) for k in range(5, 7)])  # type: ignore[arg-type]
    time.sleep(0.01)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
