"""Reading a store set as one: merged scans and queries, one cursor, one verify.

``AuditStore.open_reader(root)`` returns a :class:`StoreSetReader` when ``root`` is a
set (see ``_set.py``). It reads like a store: ``scan``, ``query``, ``stats`` and
``verify`` cover every shard, and each record says which shard and ``seq`` it came from
(:attr:`StoredRecord.shard`, :attr:`StoredRecord.seq`).

Order: the shards' records are merged by ``(ts, shard, seq)`` (descending for
newest-first). Each shard is read in its own ``seq`` order and never reordered, so the
merge is exactly ``(ts, shard, seq)`` order when each shard's ``ts`` rise with its
``seq`` (one process's clock, the normal case), and otherwise still returns every
record once, each shard in its order.

Cursor: one opaque string holding each shard's position (the last ``seq`` taken from
it), so paging returns every match exactly once across shards. Newest-first pages cover
the matches that existed when the first page was read (a shard born later is not
visited); oldest-first pages also reach later appends and later shards.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import heapq
import os
import struct
from collections.abc import Callable, Iterator, Mapping
from dataclasses import replace
from datetime import datetime
from typing import Any

import orjson

from .._types import ConsistencyProof, InclusionProof, Page, Problem, StoredRecord, VerifyReport
from ..errors import CorruptionError, NotAStoreError, QueryError, StoreClosedError
from ._checkpoint import UNSIGNED_UNDER_KEYS, ZERO_DIGEST, load_public_keys, signing_warnings
from ._config import StoreConfig
from ._fileio import FileLayer
from ._lock import is_locked
from ._query import Cursor, QueryFilter
from ._set import (
    SET_CHECKPOINTS,
    SET_FILE,
    SET_LOCK,
    SetCheckpoint,
    ShardState,
    StoreSet,
    _is_unborn_shard,
    extension_problem,
    is_set_root,
    not_a_shard,
    parse_set_checkpoints,
    read_set_limit,
    set_markers,
    shard_index,
    shard_name,
)
from ._store import AuditStore

__all__ = ["StoreSetReader"]

_U32 = struct.Struct(">I")
_ENTRY = struct.Struct(">IQ")
_DONE = -1


def state_digest(states: list[tuple[int, int, bytes]]) -> bytes:
    """SHA-256 of the shard section of a set checkpoint message for ``(index, size, root)`` states."""
    parts = [_U32.pack(len(states))]
    for index, size, root in states:
        parts.append(_ENTRY.pack(index, size))
        parts.append(root)
    return hashlib.sha256(b"".join(parts)).digest()


class StoreSetReader(AuditStore):
    """A reader over every shard of a store set (no lock; safe beside live writers).

    Get one from ``AuditStore.open_reader(set_root)``. ``tree_size`` is the sum of the
    shards' tree sizes and ``merkle_root()`` the SHA-256 of the shard states (the shard
    section of a set checkpoint); proofs belong to one shard: ``reader.shard(name)``.
    """

    def __init__(self, root: str | os.PathLike[str], *, file_layer: FileLayer | None = None) -> None:
        real = os.path.realpath(os.fspath(root))
        super().__init__(StoreConfig(root=real), file_layer or FileLayer(), writable=False)
        self._set_path = os.path.join(real, SET_FILE)
        self._set_error: str | None = None
        self._set_missing = False
        self.limit: int | None = None
        try:
            with open(self._set_path, "rb") as f:
                self._set_bytes = f.read()
        except OSError:  # gone, or replaced by a directory or something else unreadable
            # A set whose SET file was deleted (open_set_reader checked it is a set): reading
            # goes on, shards being stores of their own; verify reports it.
            self._set_bytes = b""
            self._set_missing = True
            self._set_error = "the SET file is missing (deleted or lost): restore it from a backup"
        else:
            try:
                self.limit = read_set_limit(self._set_bytes, self._set_path)
            except CorruptionError as e:
                self._set_error = f"the SET file is damaged or was edited: {e.reason}"
            except NotAStoreError:
                # open_set_reader let it through: a set's SET file overwritten with something else.
                self._set_error = "the SET file is damaged or was edited: it is not a quipu-log SET file"
        self._set_id = hashlib.sha256(self._set_bytes).hexdigest()[:16]
        self._file_layer = file_layer
        self._readers: dict[str, AuditStore] = {}
        self._unborn: set[str] = set()
        self._unreadable: dict[str, str] = {}
        self.refresh()

    # ------------------------------------------------------------------ shards

    def refresh(self) -> None:
        """Re-reads every shard, and opens shards created since."""
        if self._closed:
            raise StoreClosedError(f"store set {self.root!r} is closed")
        self._unborn.clear()
        self._unreadable.clear()
        for name in self._shard_names():
            reader = self._readers.get(name)
            if reader is not None:
                reader.refresh()
                continue
            path = os.path.join(self.root, name)
            why = not_a_shard(path)
            if why is not None:
                self._unreadable[name] = why  # reads skip it; verify reports it
                continue
            try:
                self._readers[name] = AuditStore.open_reader(path, file_layer=self._file_layer)
            except NotAStoreError as e:
                if _is_unborn_shard(path):
                    self._unborn.add(name)
                else:
                    self._unreadable[name] = str(e)  # reads skip it; verify reports it
            except CorruptionError as e:
                self._unreadable[name] = str(e)

    def _shard_names(self) -> list[str]:
        found = []
        for name in os.listdir(self.root):
            index = shard_index(name)
            if index is not None and os.path.isdir(os.path.join(self.root, name)):
                found.append((index, name))
        return [name for _, name in sorted(found)]

    @property
    def shards(self) -> dict[str, AuditStore]:
        """The shard readers by name (``"shard-000"``, ...), ascending."""
        return dict(sorted(self._readers.items()))

    def shard(self, name: str | int) -> AuditStore:
        """One shard's reader, by name or index (for proofs and per-shard scans).

        Raises:
            KeyError: no such shard.
        """
        key = shard_name(name) if isinstance(name, int) else name
        return self._readers[key]

    def close(self) -> None:
        """Closes every shard reader. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for reader in self._readers.values():
            reader.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self._readers)} shards"
        return f"<StoreSetReader {self.root!r} {state}>"

    @property
    def tree_size(self) -> int:
        """The sum of the shards' tree sizes."""
        return sum(r.tree_size for r in self._readers.values())

    def _states(self) -> list[tuple[int, int, bytes]]:
        out = []
        for name, reader in self.shards.items():
            index = shard_index(name)
            assert index is not None
            size = reader.tree_size
            out.append((index, size, reader.merkle_root(size)))
        return out

    def merkle_root(self, size: int | None = None) -> bytes:
        """SHA-256 of every shard's (index, tree size, root): the set's state in one hash.

        Raises:
            QueryError: ``size`` given (a set has one tree per shard).
        """
        if size is not None:
            raise QueryError(
                "a store set has one Merkle tree per shard: use reader.shard(name).merkle_root(size)"
            )
        self._check_open()
        return state_digest(self._states())

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosedError(f"store set {self.root!r} is closed")

    def prove_inclusion(self, seq: int, size: int | None = None) -> InclusionProof:
        """Refused: a proof belongs to one shard (``reader.shard(name).prove_inclusion``)."""
        raise ValueError(
            "a store set has one Merkle tree per shard: name the shard (quipu-log prove SET --shard "
            "shard-001 SEQ, or reader.shard('shard-001').prove_inclusion(seq))"
        )

    def prove_consistency(self, old_size: int, new_size: int | None = None) -> ConsistencyProof:
        """Refused: a proof belongs to one shard (``reader.shard(name).prove_consistency``)."""
        raise ValueError(
            "a store set has one Merkle tree per shard: name the shard (quipu-log prove SET --shard "
            "shard-001 --consistency OLD, or reader.shard('shard-001').prove_consistency(old))"
        )

    # ------------------------------------------------------------------ reading

    def scan(self, start: int | None = None, *, reverse: bool = False) -> Iterator[StoredRecord]:
        """Every record of every shard, merged by ``(ts, shard, seq)`` (descending with ``reverse``).

        Raises:
            QueryError: ``start`` given (a seq belongs to one shard: scan ``reader.shard(name)``).
        """
        self._check_open()
        if start is not None:
            raise QueryError("a seq belongs to one shard of a set: use reader.shard(name).scan(start)")
        streams = []
        for index, (name, reader) in enumerate(self.shards.items()):
            streams.append(_keyed(reader.scan(reverse=reverse), name, index))
        for _, rec in heapq.merge(*streams, key=lambda item: item[0], reverse=reverse):
            yield rec

    def query(
        self,
        *,
        where: Mapping[str, Any] | None = None,
        since: datetime | int | None = None,
        until: datetime | int | None = None,
        min_levelno: int | None = None,
        logger_prefix: str | None = None,
        contains: str | None = None,
        newest_first: bool = True,
        limit: int = 100,
        cursor: str | None = None,
    ) -> Page:
        """One page of the matches across every shard, merged by ``(ts, shard, seq)``.

        Same arguments and paging rules as :meth:`AuditStore.query`; the cursor holds
        every shard's position (see the module docstring).
        """
        self._check_open()
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            raise QueryError(f"limit: expected an int >= 1, got {limit!r}")
        filters: dict[str, Any] = {
            "where": where,
            "since": since,
            "until": until,
            "min_levelno": min_levelno,
            "logger_prefix": logger_prefix,
            "contains": contains,
        }
        fingerprint = QueryFilter.build(**filters).fingerprint()
        positions: dict[str, int] | None = None
        if cursor is not None:
            positions = self._decode_cursor(cursor, newest_first, fingerprint)
        else:
            positions = {}
            if newest_first:
                # The snapshot: every shard's end when the first page is read.
                positions = {name: r.tree_size if r.tree_size else _DONE for name, r in self.shards.items()}
        first_page = cursor is None
        resumed = False
        streams = []
        for index, (name, reader) in enumerate(self.shards.items()):
            position = positions.get(name)
            if newest_first and (position is None or position == _DONE):
                continue  # born after the first page, or read to its end
            shard_cursor = None
            if position is not None:
                shard_cursor = Cursor(reader._store_id(), newest_first, position, 0, fingerprint).encode()
            page = reader.query(**filters, newest_first=newest_first, limit=limit, cursor=shard_cursor)
            if page.resumed and not (first_page and newest_first):
                resumed = True
            streams.append(_keyed(iter(page.records), name, index))
        out: list[StoredRecord] = []
        for _, rec in heapq.merge(*streams, key=lambda item: item[0], reverse=newest_first):
            out.append(rec)
            assert rec.shard is not None
            positions[rec.shard] = rec.seq
            if len(out) == limit:
                break
        if len(out) < limit:
            return Page(out, None, resumed)
        return Page(out, self._encode_cursor(newest_first, fingerprint, positions), resumed)

    def _encode_cursor(self, newest_first: bool, fingerprint: str, positions: dict[str, int]) -> str:
        body = orjson.dumps(
            {
                "v": 1,
                "t": "set",
                "s": self._set_id,
                "d": "n" if newest_first else "o",
                "f": fingerprint,
                "p": positions,
            },
            option=orjson.OPT_SORT_KEYS,
        )
        return base64.urlsafe_b64encode(body).decode("ascii").rstrip("=")

    def _decode_cursor(self, text: str, newest_first: bool, fingerprint: str) -> dict[str, int]:
        if not isinstance(text, str):
            raise QueryError(f"cursor: expected the string from Page.next_cursor, got {type(text).__name__}")
        try:
            obj = orjson.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
            if not isinstance(obj, dict) or obj.get("v") != 1 or obj["d"] not in ("n", "o"):
                raise ValueError
            positions = obj["p"] if obj.get("t") == "set" else None
            if positions is not None and not (
                isinstance(positions, dict)
                and all(
                    shard_index(k) is not None and type(v) is int and v >= _DONE for k, v in positions.items()
                )
            ):
                raise ValueError
        except (ValueError, KeyError, TypeError, binascii.Error, orjson.JSONDecodeError):
            raise QueryError("cursor: garbled; pass Page.next_cursor exactly as returned") from None
        if positions is None:
            raise QueryError("cursor: it was made by a single store, not by this store set")
        if obj["s"] != self._set_id:
            raise QueryError(
                "cursor: it was made by another store set; cursors work only with the set that made them"
            )
        if (obj["d"] == "n") != newest_first or obj["f"] != fingerprint:
            raise QueryError("cursor: it was made for a different query; repeat the same filters and order")
        return dict(positions)

    def stats(self) -> dict[str, Any]:
        """The shards' summaries added up, plus ``shards`` (each shard's own ``stats()``)."""
        self._check_open()
        per = []
        for name, reader in self.shards.items():
            info = reader.stats()
            info["shard"] = name
            per.append(info)
        firsts = [s["first_ts"] for s in per if s["first_ts"] is not None]
        lasts = [s["last_ts"] for s in per if s["last_ts"] is not None]
        lines = StoreSet(self.root, self.limit or 0, self._set_bytes).checkpoints()
        last = next((cp for _, cp, _ in reversed(lines) if cp is not None), None)
        return {
            "root_dir": self.root,
            "set": True,
            "shard_limit": self.limit,
            "records": sum(s["records"] for s in per),
            # Not for live shards, where the spine may run ahead of a reader's snapshot.
            "unreadable": sum(
                s["unreadable"]
                for s, r in zip(per, self.shards.values(), strict=True)
                if not is_locked(r.root)
            ),
            "segments": sum(s["segments"] for s in per),
            "bytes": sum(s["bytes"] for s in per),
            "first_ts": min(firsts) if firsts else None,
            "last_ts": max(lasts) if lasts else None,
            "tree_size": sum(s["tree_size"] for s in per),
            "root": self.merkle_root().hex(),
            "last_checkpoint": last.to_dict() if last is not None else None,
            "shards": per,
        }

    # ------------------------------------------------------------------ verify

    def verify(
        self,
        *,
        public_keys: Any = (),
        anchor: Any = None,
        progress: Callable[[int, int], object] | None = None,
    ) -> VerifyReport:
        """Verifies every shard, every set checkpoint and, given a set anchor, that every shard extends it.

        Args:
            public_keys: Ed25519 public keys the set checkpoints must be signed with (the
                shards' own checkpoints, written by the handler, are digests and are checked
                without keys).
            anchor: a set checkpoint saved elsewhere earlier (a :class:`SetCheckpoint`, a
                dict, the JSON line, or a path to it).
            progress: called as ``progress(done, total)`` with records checked so far.

        Returns:
            A :class:`VerifyReport`: ``tree_size`` the sum of the shards', ``root`` as
            :meth:`merkle_root`, and every problem found, naming the file concerned.
        """
        self._check_open()
        problems: list[Problem] = []
        set_path = self._set_path
        if public_keys is None:
            public_keys = ()
        keys = load_public_keys([public_keys] if isinstance(public_keys, (str, bytes)) else public_keys)
        set_digest = hashlib.sha256(self._set_bytes).digest()
        if self._set_error is not None:
            problems.append(Problem(set_path, 0 if self._set_bytes else None, None, self._set_error))
        # The shards present, and whether they may be there.
        names = []
        for name in sorted(os.listdir(self.root)):
            if name in (SET_FILE, SET_LOCK, SET_CHECKPOINTS) or name.startswith(SET_FILE + ".tmp."):
                continue
            path = os.path.join(self.root, name)
            index = shard_index(name)
            if index is None:
                if name.startswith("shard"):
                    problems.append(
                        Problem(
                            path, None, None, "not a shard name of this set: added outside the set's list"
                        )
                    )
                continue
            if self.limit is not None and index >= self.limit:
                problems.append(
                    Problem(
                        path,
                        None,
                        None,
                        f"shard {index} is beyond the set's limit of {self.limit} shards: "
                        "added outside the set's list",
                    )
                )
            names.append((index, name))
        present = {index for index, _ in names}
        if present:
            for index in range(max(present)):
                if index not in present:
                    problems.append(
                        Problem(
                            os.path.join(self.root, shard_name(index)),
                            None,
                            None,
                            f"shard {shard_name(index)} is missing while {shard_name(max(present))} exists "
                            "(shards are taken in order): deleted",
                        )
                    )
        # Every shard, as a store.
        self.refresh()
        for name, reason in sorted(self._unreadable.items()):
            problems.append(
                Problem(os.path.join(self.root, name), None, None, f"the shard cannot be read: {reason}")
            )
        total = self.tree_size
        shard_warnings: list[str] = []
        done = 0
        pending = 0
        checked = 0
        for name, reader in self.shards.items():

            def shard_progress(n: int, _t: int, base: int = done) -> None:
                if progress is not None:
                    progress(base + n, total)

            report = reader.verify(
                public_keys=list(keys.values()),
                progress=shard_progress if progress is not None else None,
            )
            # A shard's own checkpoints are signed when its writer had a key; unsigned ones are
            # not a problem here: the (signed) set checkpoints state every shard's root.
            problems.extend(p for p in report.problems if not p.reason.startswith(UNSIGNED_UNDER_KEYS))
            shard_warnings.extend(f"{name}: {w}" for w in report.warnings)
            pending += report.pending
            checked += report.records_checked
            done += reader.tree_size
        # The set checkpoints: chain, signatures, the SET binding, and every shard's extension.
        cp_path = os.path.join(self.root, SET_CHECKPOINTS)
        lines: list[tuple[int, SetCheckpoint | None, str]] = []
        try:
            with open(cp_path, "rb") as f:
                lines = parse_set_checkpoints(f.read())
        except FileNotFoundError:
            pass
        # The creation checkpoint (no shards) is written with the SET file, before any shard
        # can exist (StoreSet.open): without it, the SET file's bytes were never bound.
        first = lines[0][1] if lines else None
        if (not lines and names) or (first is not None and first.shards):
            problems.append(
                Problem(
                    cp_path,
                    None,
                    None,
                    "the set's creation checkpoint (the first line, which binds the SET file before "
                    "any shard exists) is gone: set-checkpoints.jsonl was "
                    + ("deleted or emptied" if not lines else "replaced or its first lines removed"),
                )
            )
        prev = ZERO_DIGEST
        for number, cp, error in lines:
            where = f"line {number}"
            if cp is None:
                problems.append(Problem(cp_path, None, None, f"{where} is not a set checkpoint ({error})"))
                prev = b""
                continue
            if prev and cp.prev != prev:
                problems.append(
                    Problem(
                        cp_path,
                        None,
                        None,
                        f"{where}: the chain is broken (a set checkpoint was removed or edited)",
                    )
                )
            prev = cp.digest()
            why = _check_sig(cp, keys)
            if why is not None:
                problems.append(Problem(cp_path, None, None, f"{where}: {why}"))
            problems.extend(self._check_statement(cp, set_digest, f"set checkpoint {where}", cp_path))
        # What no set checkpoint vouches for yet: like records after a store's last checkpoint,
        # not damage (a shard born since), but nothing signed covers it (it could be planted).
        covered = {state.name for _, cp, _ in lines if cp is not None for state in cp.shards}
        for name, reader in self.shards.items():
            if name not in covered and reader.tree_size:
                shard_warnings.append(
                    f"{name} ({reader.tree_size} records) is covered by no set checkpoint yet: a shard "
                    "born since the last one, or one added by hand; check it, then run "
                    f"'quipu-log checkpoint {self.root}'"
                )
        if keys and self.shards and not any(cp is not None and cp.signed for _, cp, _ in lines):
            shard_warnings.append(
                "no set checkpoint is signed: the SET file and the list of shards are vouched for by "
                f"nothing signed; write one with 'quipu-log checkpoint {self.root} --key PEM'"
            )
        if anchor is not None:
            try:
                anchored = SetCheckpoint.from_json(anchor)
            except (ValueError, OSError, orjson.JSONDecodeError) as e:
                problems.append(
                    Problem(str(anchor)[:200], None, None, f"the anchor is not a set checkpoint: {e}")
                )
            else:
                why = _check_sig(anchored, keys)
                if why is not None:
                    problems.append(Problem(self.root, None, None, f"anchor: {why}"))
                problems.extend(self._check_statement(anchored, set_digest, "the anchor", self.root))
        return VerifyReport(
            ok=not problems,
            tree_size=self.tree_size,
            root=self.merkle_root(),
            problems=problems,
            pending=pending,
            records_checked=checked,
            warnings=shard_warnings
            + signing_warnings(
                ((f"set checkpoint line {n}", cp.signed) for n, cp, _ in lines if cp is not None),
                bool(keys),
            ),
        )

    def _check_statement(self, cp: SetCheckpoint, set_digest: bytes, what: str, file: str) -> list[Problem]:
        """Problems with the current set against one set checkpoint (or anchor)."""
        out = []
        if cp.set_digest != set_digest and not self._set_missing:  # a missing one is reported once
            out.append(
                Problem(
                    self._set_path,
                    0,
                    None,
                    f"the SET file differs from the one {what} states: the SET file was edited",
                )
            )
        for state in cp.shards:
            path = os.path.join(self.root, state.name)
            reader = self._readers.get(state.name)
            if reader is None:
                if (state.tree_size == 0 and state.name in self._unborn) or state.name in self._unreadable:
                    continue  # nothing stated, or already reported as unreadable
                out.append(
                    Problem(
                        path, None, None, f"{what} lists {state.name}, which is gone: the shard was deleted"
                    )
                )
                continue
            try:
                out.extend(self._check_shard(reader, state, what, path))
            except Exception as e:  # verify never raises on content
                out.append(Problem(path, None, None, f"cannot check the shard against {what}: {e}"))
        return out

    @staticmethod
    def _check_shard(reader: AuditStore, state: ShardState, what: str, path: str) -> list[Problem]:
        size = reader.tree_size
        why = extension_problem(reader, state, size, reader.merkle_root(size), what)
        if why is None:
            return []
        return [Problem(path, None, state.tree_size if size < state.tree_size else None, why)]


def _keyed(
    records: Iterator[StoredRecord], name: str, index: int
) -> Iterator[tuple[tuple[int, int, int], StoredRecord]]:
    for rec in records:
        yield (rec.ts, index, rec.seq), replace(rec, shard=name)


def _check_sig(cp: SetCheckpoint, keys: Mapping[str, Any]) -> str | None:
    message = cp.message()
    if not cp.signed:
        # The first checkpoint, written by whichever process created the set (it holds no
        # key), states no shard: only the SET file's digest, which every signed one repeats.
        if keys and cp.shards:
            return "set checkpoint is unsigned but public keys were given (expected a signature)"
        if cp.sig != hashlib.sha256(message).hexdigest():
            return "set checkpoint digest does not match its fields (edited)"
        return None
    if not keys:
        return None
    key = keys.get(cp.key_id)
    if key is None:
        return f"set checkpoint is signed by key {cp.key_id}, which is not among the public keys given"
    try:
        key.verify(bytes.fromhex(cp.sig), message)
    except Exception:
        return "set checkpoint signature is invalid (edited, or signed by another key)"
    return None


def open_set_reader(root: str | os.PathLike[str], *, file_layer: FileLayer | None = None) -> StoreSetReader:
    """Opens a reader over a store set (see :class:`StoreSetReader`).

    Raises:
        NotAStoreError: not a set.
        FormatVersionError: an incompatible set version.
    """
    path = os.path.join(os.fspath(root), SET_FILE)
    if not is_set_root(root):
        raise NotAStoreError(f"{os.fspath(root)!r} is not a store set (no SET file)")
    try:
        with open(path, "rb") as f:
            read_set_limit(f.read(), path)
    except (CorruptionError, OSError):
        pass  # readable as shards; verify reports the SET file
    except NotAStoreError:
        if not set_markers(os.fspath(root)):
            raise
        # Shards or set checkpoints beside a SET file that is not one: an edited set, read on.
    return StoreSetReader(root, file_layer=file_layer)
