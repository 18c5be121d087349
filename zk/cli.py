"""``finlora zk audit RUN_DIR`` (and standalone ``python -m finlora.zk.cli audit RUN_DIR``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from finlora.zk.audit import audit_run, format_table
from finlora.zk.ledger import read_ledger
from finlora.zk.signing import load_key_registry


def _add_audit(sub: argparse._SubParsersAction) -> None:
    audit = sub.add_parser("audit", help="re-check a run's ledger, commitments and global adapters")
    audit.add_argument("run_dir", type=Path, help="runs/<run-id>")
    audit.add_argument("--keys", type=Path, required=True, metavar="DIR|JSON",
                       help="the institutions' public signing keys, from outside the ledger: a directory of "
                            "<name>.pub.pem (the operator's --nodes, or what each institution published) or a JSON "
                            "object name -> key file; the ledger's own keys must equal them")
    audit.set_defaults(func=cmd_zk_audit)


def add_zk_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``zk`` with its sub-subcommands on the main CLI's subparsers."""
    zk = subparsers.add_parser("zk", help="commitment layer: audit a run")
    _add_audit(zk.add_subparsers(dest="zk_command", required=True))


def cmd_zk_audit(args: argparse.Namespace) -> int:
    """Print the per-round OK/FAIL table; 0 when every round is OK, else 1."""
    if not args.run_dir.is_dir():
        print(f"finlora zk audit: {args.run_dir}: no such run directory", file=sys.stderr)
        return 2
    if not (args.run_dir / "ledger.jsonl").is_file():
        print(f"finlora zk audit: {args.run_dir} holds no ledger.jsonl (was the run made with zk.enabled = true?)",
              file=sys.stderr)
        return 2
    try:
        keys = load_key_registry(args.keys)
    except (OSError, ValueError) as exc:
        print(f"finlora zk audit: --keys {args.keys}: {exc}", file=sys.stderr)
        return 2
    if not keys:
        print(f"finlora zk audit: --keys {args.keys}: no public keys (<name>.pub.pem) found", file=sys.stderr)
        return 2
    verdicts = audit_run(args.run_dir, keys)
    header = next(iter(read_ledger(args.run_dir)), {})
    print(f"run id {header.get('run_id', '?')!r}; {len(keys)} institution keys from {args.keys}")
    print(format_table(verdicts))
    ok = all(v.ok for v in verdicts)
    print(f"audit {'OK' if ok else 'FAILED'}: {sum(v.ok for v in verdicts)}/{len(verdicts)} rows OK")
    return 0 if ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m finlora.zk.cli", description=__doc__)
    _add_audit(parser.add_subparsers(dest="zk_command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
