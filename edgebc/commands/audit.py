"""`edgebc audit verify`: check an audit trail's hash chain, MACs and anchors; name the first break."""

from __future__ import annotations

import argparse
from pathlib import Path

from edgebc.commands import HelpFormatter


def register_audit(commands: argparse._SubParsersAction) -> None:
    audit = commands.add_parser(
        "audit",
        help="verify the audit trail of `edgebc serve` (hash chain, MACs, anchors)",
        description="Every record of the audit trail carries a hash chained to the record before it "
        "and an HMAC of that hash under the service's key (kept outside the trail's directory); the "
        "chain head is appended at intervals to an anchor file. `verify` walks the whole chain and "
        "names the first record that was changed, deleted or reordered; with --key it also checks "
        "every MAC (a chain recomputed after a DROP TRIGGER fails here); with --anchor it checks each "
        "anchor, which is what shows a truncated tail, and says which records the anchors cover. "
        "Exit status 0: intact; 1: broken, or the file cannot be read.",
        formatter_class=HelpFormatter,
    )
    actions = audit.add_subparsers(dest="action", required=True, metavar="ACTION")
    verify = actions.add_parser(
        "verify", help="check the whole chain; one line: OK or BROKEN and the first broken record",
        formatter_class=HelpFormatter,
    )  # fmt: skip
    verify.add_argument("trail", type=Path, help="the audit trail SQLite file")
    verify.add_argument("--key", type=Path, default=None,
                        help="the service's audit key file (audit.key_path): checks every MAC")  # fmt: skip
    verify.add_argument("--anchor", type=Path, default=None,
                        help="the anchor file (audit.anchor_path): checks the head and the tail")  # fmt: skip
    audit.set_defaults(handler=run_audit)


def run_audit(args: argparse.Namespace) -> int:
    from edgebc.audit_chain import read_key, verify_trail

    if not args.trail.is_file():
        raise FileNotFoundError(f"{args.trail}: no such audit trail")
    key = None if args.key is None else read_key(args.key)
    verdict = verify_trail(args.trail, key=key, anchor_path=args.anchor)
    print(f"{args.trail}: {verdict.line()}")
    return 0 if verdict.ok else 1
