"""``finlora zk audit RUN_DIR`` (and standalone ``python -m zk.cli audit RUN_DIR``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from zk.audit import audit_run, format_table


def _add_audit(sub: argparse._SubParsersAction) -> None:
    audit = sub.add_parser("audit", help="re-check a run's ledger, commitments and global adapters")
    audit.add_argument("run_dir", type=Path, help="runs/<run-id>")
    audit.set_defaults(func=cmd_zk_audit)


def add_zk_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``zk`` with its sub-subcommands on the main CLI's subparsers."""
    zk = subparsers.add_parser("zk", help="commitment layer: audit a run")
    _add_audit(zk.add_subparsers(dest="zk_command", required=True))


def cmd_zk_audit(args: argparse.Namespace) -> int:
    """Print the per-round OK/FAIL table; 0 when every round is OK, else 1."""
    verdicts = audit_run(args.run_dir)
    print(format_table(verdicts))
    ok = all(v.ok for v in verdicts)
    print(f"audit {'OK' if ok else 'FAILED'}: {sum(v.ok for v in verdicts)}/{len(verdicts)} rows OK")
    return 0 if ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m zk.cli", description=__doc__)
    _add_audit(parser.add_subparsers(dest="zk_command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
