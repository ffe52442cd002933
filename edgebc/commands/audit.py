"""`edgebc audit`: verify a trail's chain across its segments; archive sealed segments; retire them."""

from __future__ import annotations

import argparse
from pathlib import Path

from edgebc.commands import HelpFormatter

DEFAULT_TRAIL = Path("edgebc-audit.sqlite")  # AuditSettings.path


def register_audit(commands: argparse._SubParsersAction) -> None:
    audit = commands.add_parser(
        "audit",
        help="verify, archive and retire the audit trail of `edgebc serve`",
        description="Every record of the audit trail carries a hash chained to the record before it "
        "and an HMAC of that hash under the service's key (kept outside the trail's directory); the "
        "chain head is appended at intervals to an anchor file. The trail rotates: the live file is "
        "sealed as <trail>.000001, .000002, ... and the chain runs on in the next. `verify` walks the "
        "whole chain across every segment and names the first record (and segment) that was changed, "
        "deleted or reordered, and any segment missing or out of order; with --key it also checks "
        "every MAC (a chain recomputed after a DROP TRIGGER fails here); with --anchor it checks each "
        "anchor, which is what shows a truncated tail. `archive` copies sealed segments off the cart "
        "and verifies each copy; `retire` deletes only sealed segments with a verified copy. "
        "Exit status 0: done, intact; 1: broken, not verified, or the file cannot be read.",
        formatter_class=HelpFormatter,
    )
    actions = audit.add_subparsers(dest="action", required=True, metavar="ACTION")
    verify = actions.add_parser(
        "verify", help="check the whole chain; one line: OK or BROKEN and the first broken record",
        formatter_class=HelpFormatter,
    )  # fmt: skip
    verify.add_argument("trail", type=Path,
                        help="the live audit file (its sealed segments beside it are included), or a folder of segments such as an archive")  # fmt: skip
    verify.add_argument("--key", type=Path, default=None,
                        help="the service's audit key file (audit.key_path): checks every MAC")  # fmt: skip
    verify.add_argument("--anchor", type=Path, default=None,
                        help="the anchor file (audit.anchor_path): checks the head and the tail")  # fmt: skip
    archive = actions.add_parser(
        "archive", formatter_class=HelpFormatter,
        help="copy the sealed segments to DEST (a mounted stick or share), verify each copy, record it",
    )  # fmt: skip
    archive.add_argument("dest", type=Path, help="the folder to copy into (it must exist)")
    archive.add_argument("--trail", type=Path, default=DEFAULT_TRAIL,
                         help="the live audit file (audit.path)")  # fmt: skip
    archive.add_argument("--key", type=Path, default=None,
                         help="the audit key file: each copy's MACs are checked too")  # fmt: skip
    retire = actions.add_parser(
        "retire", formatter_class=HelpFormatter,
        help="delete sealed segments past --keep-days/--keep-bytes, only those with a verified copy",
    )  # fmt: skip
    retire.add_argument("--trail", type=Path, default=DEFAULT_TRAIL,
                        help="the live audit file (audit.path)")  # fmt: skip
    retire.add_argument("--keep-days", type=float, default=None,
                        help="delete archived segments older than this many days")  # fmt: skip
    retire.add_argument("--keep-bytes", type=int, default=None,
                        help="delete the oldest archived segments while the trail's files exceed this")  # fmt: skip
    retire.add_argument("--key", type=Path, required=True,
                        help="the service's audit key file (audit.key_path): each retirement is "
                        "signed with it, so `verify --key` can tell it from a deletion")  # fmt: skip
    audit.set_defaults(handler=run_audit)


def run_audit(args: argparse.Namespace) -> int:
    if args.action == "archive":
        return _archive(args)
    if args.action == "retire":
        return _retire(args)
    from edgebc.audit_chain import read_key, verify_trail

    if not args.trail.exists():
        raise FileNotFoundError(f"{args.trail}: no such audit trail")
    key = None if args.key is None else read_key(args.key)
    verdict = verify_trail(args.trail, key=key, anchor_path=args.anchor)
    print(f"{args.trail}: {verdict.line()}")
    return 0 if verdict.ok else 1


def _archive(args: argparse.Namespace) -> int:
    from edgebc.audit_archive import ArchiveError, archive_segments, record_path
    from edgebc.audit_chain import read_key

    key = None if args.key is None else read_key(args.key)
    try:
        done = archive_segments(args.trail, args.dest, key)
    except ArchiveError as exc:
        print(f"NOT ARCHIVED: {exc}")
        return 1
    for segment in done:
        how = "already there, verified before" if segment.already else "copied, sha256 and chain verified"  # fmt: skip
        print(f"{segment.name}: records {segment.records}, {segment.size} bytes, sha256 "
              f"{segment.sha256[:16]} -> {segment.copy} ({how})")  # fmt: skip
    print(f"{len(done)} sealed segments archived in {args.dest}; recorded in {record_path(args.trail)}"
          if done else f"no sealed segments beside {args.trail} (the live one is archived once sealed)")  # fmt: skip
    return 0


def _retire(args: argparse.Namespace) -> int:
    from edgebc.audit_archive import retire_segments
    from edgebc.audit_chain import read_key

    if args.keep_days is None and args.keep_bytes is None:
        raise ValueError("say what to keep: --keep-days and/or --keep-bytes")
    lines = retire_segments(args.trail, args.keep_days, args.keep_bytes, key=read_key(args.key))
    for line in lines:
        print(line)
    if not lines:
        print("nothing due for retirement")
    return 0 if all(line.startswith("deleted") for line in lines) else 1
