"""The ``quipu-log`` command line (also ``python -m quipu_logging``).

Read commands (``verify``, ``query``, ``tail``, ``export``, ``prove``, ``stats``)
take no lock and work on a live store. ``checkpoint`` and ``retention`` need the
writer lock and refuse a live store.

Every command also takes the root of a store set (``AuditHandler(shards=...)``):
reads merge the shards (JSON records then carry ``"$shard"``), ``verify`` checks
every shard and the set checkpoints, ``prove`` needs ``--shard``, ``checkpoint``
writes a set checkpoint under the set's own lock (the shard writers go on), and
``retention`` needs every shard offline.

Exit codes: 0 intact / ok; 1 a content problem (tampering, corruption, a bad
header, a failed proof); 2 a usage error, an unreadable path, a directory that
is not a store, an unsupported format version, or a command that needs the
writer lock while the store is live.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import json
import logging
import os
import re
import sys
import textwrap
import time
import traceback
from collections.abc import Iterator, Sequence
from datetime import datetime, timezone
from typing import Any, TextIO

from ._types import ConsistencyProof, InclusionProof, Problem, StoredRecord
from .errors import (
    ConfigError,
    CorruptionError,
    FormatVersionError,
    NotAStoreError,
    QueryError,
    QuipuError,
    StoreLockedError,
)
from .store import AuditStore, RetentionPolicy, StoreConfig, StoreSet, merkle
from .store._checkpoint import Checkpoint
from .store._config import parse_duration_us
from .store._lock import is_locked, read_holder_pid
from .store._set import SetCheckpoint, is_set_root, not_a_shard, shard_index, shard_name

__all__ = ["main"]

EXIT_OK = 0
EXIT_PROBLEM = 1
EXIT_USAGE = 2


class UsageError(Exception):
    """A problem with how the command was called (exit 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # One line, like every other error (DESIGN §3); the usage is one --help away.
        print(f"{self.prog}: error: {message} (see '{self.prog} --help')", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def _sub(
    sub: Any, name: str, help_text: str, example: str, description: str | None = None
) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = sub.add_parser(
        name,
        help=help_text,
        description=textwrap.fill(description or help_text, 88),
        epilog=f"example:\n  {example}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    # SUPPRESS: not giving it here must not reset a `quipu-log --verbose CMD` given before the command.
    parser.add_argument(
        "--verbose", action="store_true", default=argparse.SUPPRESS, help="show a traceback on errors"
    )
    return parser


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="quipu-log",
        description="Verify, read, prove and maintain quipu_logging audit stores.",
        epilog="examples:\n"
        "  quipu-log verify /var/lib/app/audit\n"
        "  quipu-log query /var/lib/app/audit --since 2h --where actor=alice\n"
        "  quipu-log tail -f /var/lib/app/audit\n\n"
        "exit codes: 0 ok, 1 content problem (tampering, corruption, failed proof), "
        "2 usage error / not a store / store is live",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--verbose", action="store_true", help="show a traceback on errors")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = _sub(
        sub,
        "verify",
        "check a store's integrity",
        "quipu-log verify /var/lib/app/audit --public-key audit.pub --anchor anchor.json",
        "Re-hash every record against the Merkle tree, check seq continuity, the spine, the "
        "checkpoint chain and signatures, and that the tree extends an anchor. Given a store "
        "set's root, verify every shard and every set checkpoint, and (with --anchor holding a "
        "set checkpoint) that every shard extends its anchored size.",
    )
    p.add_argument("root", help="the store directory, or a store set's root")
    p.add_argument("--public-key", action="append", default=[], metavar="PEM", help="Ed25519 public key")
    p.add_argument("--anchor", metavar="FILE", help="a checkpoint line saved elsewhere earlier")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = _sub(
        sub,
        "query",
        "find records",
        "quipu-log query /var/lib/app/audit --since 2h --where actor=alice --level WARNING",
    )
    p.add_argument("root")
    p.add_argument("--since", help="ISO time (2026-01-02T03:04:05Z) or an age (15m, 2h, 7d)")
    p.add_argument("--until", help="ISO time or an age; exclusive")
    p.add_argument("--level", help="minimum level name (INFO, WARNING, ...) or number")
    p.add_argument("--logger", help="logger name; its children match too")
    p.add_argument(
        "--where",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="top-level field equality; VALUE is JSON when it parses (20, true, null), else text",
    )
    p.add_argument("--contains", help="substring of the message")
    p.add_argument("--oldest", action="store_true", help="oldest first (default: newest first)")
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--cursor", help="the cursor printed after the previous page")
    p.add_argument("--json", action="store_true", help="JSON lines (the default when piped)")

    p = _sub(sub, "tail", "show the newest records", "quipu-log tail /var/lib/app/audit -n 20 -f")
    p.add_argument("root")
    p.add_argument("-n", type=int, default=10, help="how many records (default 10)")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new records")
    p.add_argument("--interval", type=float, default=0.5, help="seconds between polls with -f")
    p.add_argument("--json", action="store_true", help="JSON lines (the default when piped)")

    p = _sub(
        sub,
        "export",
        "export records as NDJSON with their exact bytes",
        "quipu-log export /var/lib/app/audit --since 7d --out audit.ndjson",
        'One line per record: {"seq", "leaf_hash", "raw" (base64 of the stored bytes), "record"}, '
        "so a third party can re-hash raw and check it against proofs.",
    )
    p.add_argument("root")
    p.add_argument("--since")
    p.add_argument("--until")
    p.add_argument("--out", metavar="FILE", help="write here instead of stdout")

    p = _sub(
        sub,
        "prove",
        "print or check an inclusion or consistency proof",
        "quipu-log prove /var/lib/app/audit 42 > proof.json && quipu-log prove --check proof.json",
    )
    p.add_argument("root", nargs="?", help="the store (not needed with --check)")
    p.add_argument("seq", nargs="?", type=int, help="the record to prove")
    p.add_argument("--size", type=int, help="tree size to prove against (default: now)")
    p.add_argument("--consistency", nargs="+", type=int, metavar=("OLD", "NEW"), help="OLD [NEW]")
    p.add_argument("--shard", metavar="NAME", help="with a store set: the shard (shard-001 or 1)")
    p.add_argument("--check", metavar="FILE", help="check a proof file offline")
    p.add_argument("--root", dest="trusted_root", metavar="HEX", help="with --check: the root you trust")

    p = _sub(
        sub,
        "checkpoint",
        "write a checkpoint now (a store: needs the writer lock; a set: never waits for writers)",
        "quipu-log checkpoint /var/lib/app/audit --key audit.pem --export anchor.json",
        "Write a signed (with --key) or digested checkpoint of the tree as it is now and print it. "
        "A single store must not be open for writing (the command recovers it and takes its lock). "
        "Given a store set's root, write a set checkpoint instead, under the set's own lock while "
        "the shard writers go on: every shard's size and root, after reading back each shard's "
        "records since its own last checkpoint (a damaged shard is refused, exit 1).",
    )
    p.add_argument("root", help="the store directory, or a store set's root")
    p.add_argument("--key", metavar="PEM", help="Ed25519 private key to sign with")
    p.add_argument("--export", metavar="FILE", help="also write the checkpoint line here (an anchor)")

    p = _sub(
        sub,
        "retention",
        "delete old sealed segments (needs the writer lock)",
        "quipu-log retention /var/lib/app/audit --max-age 90d --max-bytes 10GiB",
    )
    p.add_argument("root")
    p.add_argument("--max-age", help="e.g. 90d")
    p.add_argument("--max-bytes", help="e.g. 10GiB")

    p = _sub(sub, "stats", "summarise a store", "quipu-log stats /var/lib/app/audit --json")
    p.add_argument("root")
    p.add_argument("--json", action="store_true")
    return parser


# ----------------------------------------------------------------------------- helpers


def _parse_time(text: str | None, name: str) -> int | None:
    """ISO 8601 time, or an age such as ``15m`` meaning "that long ago"; returns µs."""
    if text is None:
        return None
    if re.fullmatch(r"\s*\d+(\.\d+)?\s*[A-Za-z]+\s*", text):
        try:
            return time.time_ns() // 1000 - parse_duration_us(text, name)
        except ConfigError:
            pass
    try:
        value = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(f"--{name}: expected an ISO time or an age like 15m, 2h, 7d; got {text!r}") from None
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return int(value.timestamp() * 1_000_000)


def _parse_level(text: str | None) -> int | None:
    if text is None:
        return None
    if text.isdigit():
        return int(text)
    level = logging.getLevelName(text.upper())
    if not isinstance(level, int):
        raise UsageError(
            f"--level: unknown level {text!r}; use DEBUG, INFO, WARNING, ERROR, CRITICAL or a number"
        )
    return level


def _parse_where(items: Sequence[str]) -> dict[str, Any]:
    where: dict[str, Any] = {}
    for item in items:
        field, sep, raw = item.partition("=")
        if not sep or not field:
            raise UsageError(f"--where: expected FIELD=VALUE, got {item!r}")
        try:
            value = json.loads(raw)
        except ValueError:
            value = raw
        if isinstance(value, (list, dict)):
            value = raw
        where[field] = value
    return where


def _open_reader(root: str) -> AuditStore:
    return AuditStore.open_reader(root)


def _json_line(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def _record_json(rec: StoredRecord) -> str:
    if rec.shard is not None:
        # "$" keys are the library's own: a user field can never be called "$shard".
        return _json_line({**rec.payload, "$shard": rec.shard})
    return _json_line(rec.payload)


def _when(ts: int) -> str:
    try:
        return datetime.fromtimestamp(ts / 1e6, timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + "Z"
    except (OverflowError, OSError, ValueError):
        return str(ts)


_UNPRINTABLE = re.compile(
    # C0 and C1 controls, DEL, and the invisible format characters that reorder or hide text
    # (bidi overrides and isolates, zero-width characters, the BOM, line/paragraph separators).
    "[\x00-\x1f\x7f-\x9f\u00ad\u061c\u180e\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff]"
)
_TABLE_MESSAGE_WIDTH = 100  # longer messages are cut in the table (--json prints them whole)


def _printable(text: str) -> str:
    """``text`` safe to show on a terminal: logged text must not be able to move the cursor,
    erase or recolour rows, set the window title or fake a line break (it is escaped instead)."""
    if not _UNPRINTABLE.search(text):
        return text
    return _UNPRINTABLE.sub(lambda m: json.dumps(m.group())[1:-1], text)


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _print_table(records: Sequence[StoredRecord], out: TextIO) -> None:
    rows = []
    for rec in records:
        p = rec.payload
        extras = {
            k: v
            for k, v in p.items()
            if k not in ("seq", "ts", "level", "levelno", "logger", "message", "process", "thread", "source")
        }
        rows.append(
            [
                f"{rec.shard}:{rec.seq}" if rec.shard is not None else str(rec.seq),
                _when(rec.ts),
                _printable(str(p.get("level", ""))),
                _printable(str(p.get("logger", ""))),
                _cut(_printable(str(p.get("message", ""))), _TABLE_MESSAGE_WIDTH),
                _printable(
                    " ".join(f"{k}={json.dumps(v, ensure_ascii=False)}" for k, v in sorted(extras.items()))
                ),
            ]
        )
    headers = ["SEQ", "TIME (UTC)", "LEVEL", "LOGGER", "MESSAGE", "FIELDS"]
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers[:-1])]
    print(
        "  ".join(h.ljust(w) for h, w in zip(headers[:-1], widths, strict=True)) + "  " + headers[-1],
        file=out,
    )
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row[:-1], widths, strict=True)) + "  " + row[-1], file=out)


def _warn_unreadable(store: AuditStore, root: str, info: dict[str, Any] | None = None) -> None:
    """One stderr line when records the tree holds could not be read (reads skip damage).

    Not for a live store, where the spine may run ahead of a reader's snapshot of the segments.
    """
    if not is_set_root(root) and is_locked(root):
        return
    missing = (info or store.stats()).get("unreadable", 0)
    if missing:
        print(
            f"quipu-log: warning: {missing:,} record(s) of the Merkle tree could not be read and are "
            f"not shown; run 'quipu-log verify {root}'",
            file=sys.stderr,
        )


def _want_json(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "json", False)) or not sys.stdout.isatty()


def _require_offline(root: str) -> None:
    """Commands that take the writer lock refuse a live store with exit 2."""
    if is_set_root(root):
        for index in StoreSet.open(root, create=False).shard_indices():
            shard = os.path.join(root, f"shard-{index:03d}")
            if is_locked(shard):
                raise UsageError(_live_message(shard, read_holder_pid(shard)))
        return
    if os.path.isdir(root) and is_locked(root):
        raise UsageError(_live_message(root, read_holder_pid(root)))
    if not os.path.isfile(os.path.join(root, "FORMAT")):
        raise NotAStoreError(f"{root!r} is not an audit store (no FORMAT file)")


def _refuse_inside(path: str, root: str, option: str) -> None:
    """An output file inside the store (or set) could overwrite its own files: a usage error.

    A shard given as the root protects its whole set (the SET file, the set checkpoints and
    the other shards sit beside it).
    """
    store = os.path.realpath(root)
    parent = os.path.dirname(store)
    if shard_index(os.path.basename(store)) is not None and is_set_root(parent):
        store = parent
    if os.path.commonpath([os.path.realpath(path), store]) == store:
        raise UsageError(
            f"{option}: {path!r} is inside the store {root!r}; write it elsewhere (a file there could "
            "overwrite the store's own files, and an anchor belongs away from the store anyway)"
        )


def _live_message(root: str, pid: int | None) -> str:
    holder = f" (pid {pid})" if pid is not None else ""  # never "(pid None)"
    return (
        f"store is live{holder}: {root!r} is open for writing by an application; "
        "stop it first, or let the application write checkpoints and apply retention itself"
    )


# ---------------------------------------------------------------------------- commands


def _verify(args: argparse.Namespace) -> int:
    anchor = None
    if args.anchor is not None:
        # Read it here: the store takes a string that is not a file for a JSON line, so a
        # mistyped path would be reported as tampering (exit 1) instead of a usage error.
        try:
            with open(args.anchor, encoding="utf-8") as f:
                anchor = f.read()
        except OSError as e:
            raise UsageError(f"--anchor: cannot read {args.anchor!r}: {e.strerror}") from None
        except UnicodeDecodeError:
            raise UsageError(
                f"--anchor: {args.anchor!r} is not a text file holding a checkpoint line"
            ) from None
        # A file that holds no checkpoint line at all is a usage error, not tampering.
        lines = [line for line in anchor.splitlines() if line.strip()]
        is_set = is_set_root(args.root)
        parse, other = (
            (SetCheckpoint.from_json, Checkpoint.from_json)
            if is_set
            else (Checkpoint.from_json, SetCheckpoint.from_json)
        )
        if not lines or not lines[-1].lstrip().startswith("{"):
            raise UsageError(f"--anchor: {args.anchor!r} does not hold a checkpoint line: no JSON line in it")
        try:
            parse(lines[-1])
        except (ValueError, TypeError, KeyError) as e:
            try:
                other(lines[-1])
            except (ValueError, TypeError, KeyError):
                raise UsageError(f"--anchor: {args.anchor!r} does not hold a checkpoint line: {e}") from None
            raise UsageError(
                f"--anchor: {args.anchor!r} holds a "
                + (
                    "single store's checkpoint, but the root is a store set: give a set checkpoint "
                    "(from 'quipu-log checkpoint SETROOT')"
                    if is_set
                    else "store set's checkpoint, but the root is a single store: give a checkpoint of "
                    "this store"
                )
            ) from None
    bar = _ProgressBar() if sys.stderr.isatty() and not args.json else None
    with _open_reader(args.root) as store:
        report = store.verify(
            public_keys=args.public_key, anchor=anchor, progress=bar.update if bar else None
        )
    if bar is not None:
        bar.finish()
    args.outcome = EXIT_OK if report.ok else EXIT_PROBLEM  # kept even if stdout goes away while printing
    if args.json:
        print(
            _json_line(
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
                    "warnings": report.warnings,
                }
            )
        )
    elif report.ok:
        pending = f", {report.pending} pending" if report.pending else ""
        print(
            f"ok: {report.records_checked} records verified{pending}; "
            f"tree size {report.tree_size}, root {report.root.hex()}"
        )
    else:
        first = report.problems[0]
        print(
            f"TAMPERED OR DAMAGED: {len(report.problems)} problem(s); first: {_place(first)}: {first.reason}"
        )
        for problem in report.problems[1:20]:
            print(f"  {problem}")
        if len(report.problems) > 20:
            print(f"  ... and {len(report.problems) - 20} more (use --json for all)")
    if not args.json:
        for warning in report.warnings:
            print(f"quipu-log: warning: {warning}", file=sys.stderr)
    return int(args.outcome)


def _place(problem: Problem) -> str:
    """Where a problem is, in words: the file, and the offset and seq when they are known."""
    where = f"file {problem.file}"
    if problem.offset is not None:
        where += f", offset {problem.offset}"
    if problem.seq is not None:
        where += f", seq {problem.seq}"
    return where


class _ProgressBar:
    def __init__(self) -> None:
        self._last = 0.0
        self._shown = False

    def update(self, done: int, total: int) -> None:
        now = time.monotonic()
        if total < 200_000 or now - self._last < 0.2:
            return
        self._last = now
        width = 30
        filled = min(width, int(width * done / max(total, 1)))
        sys.stderr.write(f"\rverifying [{'#' * filled}{'.' * (width - filled)}] {done:,}/{total:,}")
        sys.stderr.flush()
        self._shown = True

    def finish(self) -> None:
        if self._shown:
            sys.stderr.write("\r" + " " * 70 + "\r")
            sys.stderr.flush()


def _query(args: argparse.Namespace) -> int:
    if args.limit < 1:
        raise UsageError("--limit: must be at least 1")
    with _open_reader(args.root) as store:
        page = store.query(
            where=_parse_where(args.where) or None,
            since=_parse_time(args.since, "since"),
            until=_parse_time(args.until, "until"),
            min_levelno=_parse_level(args.level),
            logger_prefix=args.logger,
            contains=args.contains,
            newest_first=not args.oldest,
            limit=args.limit,
            cursor=args.cursor,
        )
        _warn_unreadable(store, args.root)
    if _want_json(args):
        for rec in page.records:
            print(_record_json(rec))
    else:
        _print_table(page.records, sys.stdout)
    if page.resumed:
        print("note: retention removed the cursor's position; resumed at the oldest record", file=sys.stderr)
    if page.next_cursor:
        print(f"next page: --cursor {page.next_cursor}", file=sys.stderr)
    return EXIT_OK


def _tail(args: argparse.Namespace) -> int:
    if args.n < 0:
        raise UsageError("-n: must be 0 or more")
    as_json = _want_json(args)
    with _open_reader(args.root) as store:
        last: list[StoredRecord] = []
        if args.n:
            last = store.query(limit=args.n).records[::-1]
        _warn_unreadable(store, args.root)
        _emit(last, as_json)
        if not args.follow:
            return EXIT_OK
        if is_set_root(args.root):
            return _follow_set(store, last, as_json, args.interval)
        position = last[-1].seq if last else store.tree_size - 1
        try:
            while True:
                store.refresh()
                fresh = list(_records_after(store, position))
                if fresh:
                    _emit(fresh, as_json)
                    position = fresh[-1].seq
                time.sleep(args.interval)  # polling: the reader has no way to be woken by the writer
        except KeyboardInterrupt:
            return EXIT_OK


def _follow_set(store: AuditStore, last: list[StoredRecord], as_json: bool, interval: float) -> int:
    """``tail -f`` of a store set: each shard followed from its own position, merged by time."""
    shards: dict[str, AuditStore] = getattr(store, "shards", {})
    positions = {name: shard.tree_size - 1 for name, shard in shards.items()}
    for rec in last:
        if rec.shard is not None:
            positions[rec.shard] = max(positions.get(rec.shard, -1), rec.seq)
    try:
        while True:
            store.refresh()
            fresh = []
            for name, shard in getattr(store, "shards", {}).items():
                got = [
                    dataclasses.replace(r, shard=name) for r in _records_after(shard, positions.get(name, -1))
                ]
                if got:
                    positions[name] = got[-1].seq
                    fresh.extend(got)
            fresh.sort(key=lambda r: (r.ts, r.shard or "", r.seq))
            if fresh:
                _emit(fresh, as_json)
            time.sleep(interval)  # polling: the reader has no way to be woken by the writers
    except KeyboardInterrupt:
        return EXIT_OK


def _records_after(store: AuditStore, position: int) -> Iterator[StoredRecord]:
    for rec in store.scan(position + 1):
        if rec.seq > position:
            yield rec


def _emit(records: Sequence[StoredRecord], as_json: bool) -> None:
    if as_json:
        for rec in records:
            print(_record_json(rec))
    elif records:
        _print_table(records, sys.stdout)
    sys.stdout.flush()


def _export(args: argparse.Namespace) -> int:
    since = _parse_time(args.since, "since")
    until = _parse_time(args.until, "until")
    out: TextIO = sys.stdout
    if args.out:
        _refuse_inside(args.out, args.root, "--out")
        try:
            out = open(args.out, "w", encoding="utf-8")  # noqa: SIM115
        except OSError as e:
            raise UsageError(f"--out: cannot write {args.out!r}: {e.strerror}") from None
    count = 0
    try:
        with _open_reader(args.root) as store:
            cursor = None
            while True:
                page = store.query(since=since, until=until, newest_first=False, limit=1000, cursor=cursor)
                for rec in page.records:
                    line = {
                        "seq": rec.seq,
                        "leaf_hash": rec.leaf_hash.hex(),
                        "raw": base64.b64encode(rec.raw).decode("ascii"),
                        "record": rec.payload,
                    }
                    if rec.shard is not None:
                        line["shard"] = rec.shard
                    out.write(_json_line(line) + "\n")
                    count += 1
                if page.next_cursor is None:
                    break
                cursor = page.next_cursor
    finally:
        if args.out:
            out.close()
    if args.out:
        print(f"exported {count} records to {args.out}", file=sys.stderr)
    return EXIT_OK


def _prove(args: argparse.Namespace) -> int:
    if args.check:
        return _check_proof(args, args.check, args.trusted_root)
    if not args.root:
        raise UsageError("prove: give ROOT and SEQ, ROOT --consistency OLD [NEW], or --check FILE")
    root = args.root
    if args.shard is not None:
        if not is_set_root(root):
            raise UsageError(f"--shard: {root!r} is not a store set")
        text = args.shard
        digits = text.isascii() and text.isdigit() and len(text) <= 9
        index = int(text) if digits else shard_index(text)
        if index is None:
            raise UsageError(f"--shard: expected a shard name (shard-001) or number (1), got {text!r}")
        name = shard_name(index)
        root = os.path.join(root, name)
        if not os.path.isdir(root) or not_a_shard(root) is not None:
            raise UsageError(f"--shard: the set has no shard {name!r}")
    with _open_reader(root) as store:
        if args.consistency:
            if len(args.consistency) > 2:
                raise UsageError("--consistency takes OLD and optionally NEW")
            new = args.consistency[1] if len(args.consistency) == 2 else None
            try:
                cproof = store.prove_consistency(args.consistency[0], new)
            except ValueError as e:
                raise UsageError(str(e)) from None
            print(cproof.to_json())
            return EXIT_OK
        if args.seq is None:
            raise UsageError("prove: give the SEQ of the record to prove")
        try:
            proof = store.prove_inclusion(args.seq, args.size)
        except ValueError as e:
            raise UsageError(str(e)) from None
        print(proof.to_json())
    return EXIT_OK


def _check_proof(args: argparse.Namespace, path: str, trusted_root: str | None) -> int:
    # A file that is not a proof at all is a usage error (exit 2), like an unreadable one; a
    # proof that parses but does not verify is a failed proof (exit 1).
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except OSError as e:
        raise UsageError(f"--check: cannot read {path!r}: {e.strerror}") from None
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError too
        raise UsageError(f"--check: {path!r} is not a proof file (not JSON)") from None
    if not isinstance(obj, dict) or obj.get("type", "inclusion") not in ("inclusion", "consistency"):
        raise UsageError(f"--check: {path!r} is not a proof file (not a proof object)")
    args.outcome = EXIT_PROBLEM  # until the proof is shown to hold
    trusted = None
    if trusted_root is not None:
        try:
            trusted = bytes.fromhex(trusted_root)
        except ValueError:
            raise UsageError(f"--root: not hex: {trusted_root!r}") from None
    try:
        if obj.get("type") == "consistency":
            cp = ConsistencyProof.from_json(obj)
            ok = merkle.verify_consistency(cp.old_size, cp.new_size, cp.old_root, cp.new_root, list(cp.path))
            root, size, stated = cp.new_root, cp.new_size, cp.checkpoint
            what = f"tree {cp.new_size} extends tree {cp.old_size}"
        else:
            ip = InclusionProof.from_json(obj)
            ok = merkle.verify_inclusion(ip.leaf_hash, ip.seq, ip.tree_size, list(ip.path), ip.root)
            root, size, stated = ip.root, ip.tree_size, ip.checkpoint
            what = f"seq {ip.seq} is in the tree of {ip.tree_size} records"
    except ValueError as e:
        print(f"FAILED: {path}: {e}")
        return EXIT_PROBLEM
    # The same path can verify for several tree sizes (24 and 25 for seq 11): the checkpoint the
    # proof carries pins the size, so a proof that disagrees with its own checkpoint is forged.
    if ok and stated is not None and (stated.get("tree_size"), stated.get("root")) != (size, root.hex()):
        print(
            f"FAILED: the proof claims root {root.hex()} at tree size {size}, but its checkpoint states "
            f"root {stated.get('root')} at tree size {stated.get('tree_size')}"
        )
        return EXIT_PROBLEM
    if ok and trusted is not None and trusted != root:
        print(f"FAILED: the proof is for root {root.hex()}, not the trusted root {trusted.hex()}")
        return EXIT_PROBLEM
    if not ok:
        print(f"FAILED: the proof does not verify ({what} is NOT shown)")
        return EXIT_PROBLEM
    note = "" if trusted is not None else " (compare the root with one you trust, or pass --root)"
    args.outcome = EXIT_OK
    print(f"ok: {what}; root {root.hex()}{note}")
    return EXIT_OK


def _checkpoint(args: argparse.Namespace) -> int:
    export = None
    if args.export:
        _refuse_inside(args.export, args.root, "--export")
        # Opened (not truncated) before the checkpoint is written: an export path that cannot be
        # written is a usage error that leaves no checkpoint behind without its copy.
        created = not os.path.exists(args.export)
        try:
            export = os.fdopen(os.open(args.export, os.O_WRONLY | os.O_CREAT, 0o644), "w", encoding="utf-8")
        except OSError as e:
            raise UsageError(f"--export: cannot write {args.export!r}: {e.strerror}") from None
    try:
        if is_set_root(args.root):
            # The set's own lock, never a shard's: the shard writers go on meanwhile.
            line = StoreSet.open(args.root, create=False).checkpoint(signing_key=args.key).to_json()
        else:
            line = _store_checkpoint(args)
    except BaseException:
        if export is not None:
            export.close()
            if created:
                os.unlink(args.export)
        raise
    print(line)
    if export is not None:
        with export:
            export.truncate(0)
            export.write(line + "\n")
        print(f"anchor written to {args.export}; keep a copy away from this host", file=sys.stderr)
    return EXIT_OK


def _store_checkpoint(args: argparse.Namespace) -> str:
    _require_offline(args.root)
    try:
        store = AuditStore.open(StoreConfig(root=args.root, signing_key=args.key))
    except StoreLockedError as e:
        raise UsageError(_live_message(args.root, e.pid)) from None
    with store:
        cp = store.checkpoint()
    return cp.to_json()


def _retention(args: argparse.Namespace) -> int:
    if args.max_age is None and args.max_bytes is None:
        raise UsageError("retention: give --max-age and/or --max-bytes")
    policy = RetentionPolicy(max_age=args.max_age, max_bytes=args.max_bytes)
    _require_offline(args.root)
    removed = 0
    for root in _store_roots(args.root):
        try:
            store = AuditStore.open(root)
        except StoreLockedError as e:
            raise UsageError(_live_message(root, e.pid)) from None
        with store:
            removed += store.apply_retention(policy)
    print(f"removed {removed} sealed segment(s)")
    return EXIT_OK


def _store_roots(root: str) -> list[str]:
    """The store directories behind ``root``: itself, or a set's shards."""
    if not is_set_root(root):
        return [root]
    # Listed directly, not through StoreSet.open: a damaged set (say its SET file is gone)
    # still has shards to read.
    names = sorted(n for n in os.listdir(root) if shard_index(n) is not None)
    return [
        os.path.join(root, n)
        for n in names
        if not_a_shard(os.path.join(root, n)) is None and os.path.isfile(os.path.join(root, n, "FORMAT"))
    ]


def _stats(args: argparse.Namespace) -> int:
    with _open_reader(args.root) as store:
        info = store.stats()
        _warn_unreadable(store, args.root, info)
    roots = _store_roots(args.root)
    dlq_paths: list[str] = []
    for root in roots:
        dlq_dir = os.path.join(root, "dlq")
        if os.path.isdir(dlq_dir):
            dlq_paths.extend(os.path.join(dlq_dir, n) for n in os.listdir(dlq_dir))
    info["dlq_files"] = len(dlq_paths)
    info["dlq_bytes"] = sum(os.path.getsize(p) for p in dlq_paths)
    info["live"] = any(is_locked(root) for root in roots)
    if args.json:
        print(_json_line(info))
        return EXIT_OK
    span = info["first_ts"], info["last_ts"]
    lines = [
        (
            "records",
            f"{info['records']:,} stored, tree size {info['tree_size']:,}"
            + (f", {info['unreadable']:,} unreadable (run quipu-log verify)" if info["unreadable"] else ""),
        ),
        ("segments", f"{info['segments']} ({info['bytes']:,} bytes)"),
        ("time span", f"{_when(span[0])} .. {_when(span[1])}" if span[0] is not None else "(empty)"),
        ("root", info["root"]),
        ("last checkpoint", json.dumps(info["last_checkpoint"]) if info["last_checkpoint"] else "(none)"),
        ("dead letters", f"{info['dlq_files']} file(s), {info['dlq_bytes']:,} bytes"),
        ("live", "yes (a writer holds the lock)" if info["live"] else "no"),
    ]
    if info.get("set"):
        live = sum(1 for root in roots if is_locked(root))
        limit = info["shard_limit"]
        bound = f"of at most {limit}" if limit is not None else "(limit unknown: the SET file is damaged)"
        lines.insert(0, ("shards", f"{len(info['shards'])} {bound} ({live} live)"))
        lines[-3] = ("last set checkpoint", lines[-3][1])
    width = max(len(k) for k, _ in lines)
    for key, value in lines:
        print(f"{key.ljust(width)}  {value}")
    return EXIT_OK


_COMMANDS = {
    "verify": _verify,
    "query": _query,
    "tail": _tail,
    "export": _export,
    "prove": _prove,
    "checkpoint": _checkpoint,
    "retention": _retention,
    "stats": _stats,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the CLI; returns the exit code."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:  # --help (0) and usage errors (2): return the code, as for every other outcome
        return e.code if isinstance(e.code, int) else EXIT_OK if e.code is None else EXIT_USAGE
    try:
        return _COMMANDS[args.command](args)
    except BrokenPipeError:  # `quipu-log query ... | head`: the reader of stdout has gone
        # Point stdout at /dev/null so the interpreter's last flush does not fail again, and
        # keep the outcome already decided (verify of a damaged store stays 1 under `| head`).
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
        except (OSError, ValueError, AttributeError):
            pass
        return int(getattr(args, "outcome", EXIT_OK))
    except CorruptionError as e:
        return _fail(args, e, EXIT_PROBLEM)
    except (
        UsageError,
        NotAStoreError,
        FormatVersionError,
        QueryError,
        ConfigError,
        QuipuError,
        OSError,
    ) as e:
        return _fail(args, e, EXIT_USAGE)


def _fail(args: argparse.Namespace, error: BaseException, code: int) -> int:
    """Reports ``error`` in one line on stderr (after its traceback with ``--verbose``); returns ``code``."""
    if args.verbose:  # the traceback is extra detail: the exit code stays the documented one
        traceback.print_exception(type(error), error, error.__traceback__, file=sys.stderr)
    print(f"quipu-log: {error}", file=sys.stderr)
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
