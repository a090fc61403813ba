"""The ``quipu-log`` command line (also ``python -m quipu_logging``).

Exit codes: 0 intact / ok; 1 a content problem (tampering, corruption, a bad
header, a failed proof); 2 a usage error, an unreadable path, a directory that
is not a store, or an unsupported format version.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from .errors import CorruptionError, FormatVersionError, NotAStoreError, QuipuError
from .store import AuditStore

__all__ = ["main"]

EXIT_OK = 0
EXIT_PROBLEM = 1
EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="quipu-log", description="Verify and read quipu_logging audit stores.")
    parser.add_argument("--verbose", action="store_true", help="show a traceback on errors")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    verify = sub.add_parser(
        "verify",
        help="check a store's integrity",
        description="Re-hash every record against the Merkle tree and check the checkpoint chain.",
        epilog="example: quipu-log verify /var/lib/app/audit --public-key audit.pub --anchor anchor.json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    verify.add_argument("root", help="the store directory")
    verify.add_argument("--public-key", action="append", default=[], help="Ed25519 public key (PEM file)")
    verify.add_argument("--anchor", help="a checkpoint line saved elsewhere earlier")
    verify.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


def _verify(args: argparse.Namespace) -> int:
    with AuditStore.open_reader(args.root) as store:
        report = store.verify(public_keys=args.public_key, anchor=args.anchor)
    if args.json:
        print(
            json.dumps(
                {
                    "ok": report.ok,
                    "tree_size": report.tree_size,
                    "root": report.root.hex(),
                    "records_checked": report.records_checked,
                    "pending": report.pending,
                    "problems": [
                        {"file": p.file, "offset": p.offset, "seq": p.seq, "reason": p.reason}
                        for p in report.problems
                    ],
                },
                sort_keys=True,
            )
        )
    elif report.ok:
        print(
            f"ok: {report.records_checked} records verified, "
            f"tree size {report.tree_size}, root {report.root.hex()}"
        )
    else:
        print(f"FAILED: {len(report.problems)} problem(s); first: {report.problems[0]}")
        for problem in report.problems[1:20]:
            print(f"  {problem}")
    return EXIT_OK if report.ok else EXIT_PROBLEM


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the CLI; returns the exit code."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "verify":
            return _verify(args)
    except CorruptionError as e:
        if args.verbose:
            raise
        print(f"quipu-log: {e}", file=sys.stderr)
        return EXIT_PROBLEM
    except (NotAStoreError, FormatVersionError, OSError, QuipuError) as e:
        if args.verbose:
            raise
        print(f"quipu-log: {e}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_USAGE  # pragma: no cover - argparse requires a command


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
