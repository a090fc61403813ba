"""Plain data shapes shared by every layer: receipts, records, pages, reports, proofs.

These are frozen dataclasses (``Page`` and ``VerifyReport`` hold lists, so treat
them as read-only). Proofs convert to and from JSON with hex strings for bytes,
so a third party holding only a proof file and a trusted root can check it with
:mod:`quipu_logging.store.merkle`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import MalformedError

__all__ = [
    "ConsistencyProof",
    "InclusionProof",
    "Page",
    "Problem",
    "Receipt",
    "StoredRecord",
    "VerifyReport",
]


@dataclass(frozen=True, slots=True)
class Receipt:
    """What ``AuditStore.append`` returns for one stored record.

    Attributes:
        seq: the record's global index (its Merkle leaf index), from 0.
        leaf_hash: ``SHA-256(0x00 || payload)``, 32 bytes.
        ts: the record's time, UTC integer microseconds.
    """

    seq: int
    leaf_hash: bytes
    ts: int


@dataclass(frozen=True, slots=True)
class StoredRecord:
    """One record read back from a store.

    Attributes:
        seq: the record's global index.
        ts: its time, UTC integer microseconds.
        leaf_hash: ``SHA-256(0x00 || raw)``.
        raw: the exact stored payload bytes (what the Merkle leaf covers).
        payload: ``raw`` decoded as JSON.
        shard: read from a store set: the shard it came from (``"shard-001"``; ``seq`` is
            its index in that shard's tree); ``None`` for a single store.
    """

    seq: int
    ts: int
    leaf_hash: bytes
    raw: bytes
    payload: dict[str, Any]
    shard: str | None = None


@dataclass(frozen=True, slots=True)
class Page:
    """One page of query results.

    Attributes:
        records: the matching records of this page, in the query's order.
        next_cursor: an opaque URL-safe string for the next page, or ``None`` at the end.
        resumed: ``True`` when retention removed the cursor's position meanwhile.
    """

    records: list[StoredRecord]
    next_cursor: str | None
    resumed: bool = False


@dataclass(frozen=True, slots=True)
class Problem:
    """One integrity problem found by ``verify``.

    Attributes:
        file: the file concerned (a path).
        offset: a byte offset in ``file``, when known.
        seq: the record concerned, when known.
        reason: what is wrong, in words.
    """

    file: str
    offset: int | None
    seq: int | None
    reason: str

    def __str__(self) -> str:
        where = f" at offset {self.offset}" if self.offset is not None else ""
        which = f" (seq {self.seq})" if self.seq is not None else ""
        return f"{self.file}{where}{which}: {self.reason}"


@dataclass(frozen=True, slots=True)
class VerifyReport:
    """The result of ``AuditStore.verify``; truthy when the store is intact.

    Attributes:
        ok: no problem was found.
        tree_size: the number of leaves of the verified tree.
        root: the Merkle root of that tree (32 bytes).
        problems: every problem found, the first one first.
        pending: records beyond the spine that are not problems: a live writer's
            in-flight window (not published yet), or a crashed writer's unhashed tail
            (the next writer open hashes it in; ``warnings`` says so).
        records_checked: stored records re-hashed against the spine.
        warnings: what verify could not check or found odd without it being damage
            (signed checkpoints checked without a public key; an unsigned checkpoint
            after signed ones). They do not make the report fail.
    """

    ok: bool
    tree_size: int
    root: bytes
    problems: list[Problem] = field(default_factory=list)
    pending: int = 0
    records_checked: int = 0
    warnings: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return self.ok


def _hex_list(items: list[bytes]) -> list[str]:
    return [item.hex() for item in items]


def _load(data: str | bytes | Mapping[str, Any]) -> Mapping[str, Any]:
    if isinstance(data, (str, bytes)):
        try:
            data = json.loads(data)
        except (ValueError, RecursionError):  # RecursionError: absurdly deep nesting
            raise MalformedError("a proof must be valid JSON") from None
    if not isinstance(data, Mapping):
        raise MalformedError("a proof must be a JSON object")
    return data


def _unhex(value: Any, name: str) -> bytes:
    if not isinstance(value, str):
        raise MalformedError(f"proof field {name!r} must be a hex string")
    try:
        return bytes.fromhex(value)
    except ValueError:
        raise MalformedError(f"proof field {name!r} is not valid hex") from None


def _checkpoint(value: Any) -> Mapping[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise MalformedError("proof field 'checkpoint' must be a JSON object or null")
    return value


def _int(value: Any, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise MalformedError(f"proof field {name!r} must be a non-negative integer")
    return value


@dataclass(frozen=True, slots=True)
class InclusionProof:
    """Everything a third party needs to check that one record is in a tree.

    Check it with ``merkle.verify_inclusion(leaf_hash, seq, tree_size, path, root)``
    and compare ``root`` with a root you trust (a signed checkpoint).

    Attributes:
        seq: the leaf index of the record.
        tree_size: the size of the tree the proof is for.
        leaf_hash: ``SHA-256(0x00 || raw payload)`` of the record.
        path: the audit path, RFC 9162 §2.1.3.
        root: the root of the tree of ``tree_size`` leaves.
        checkpoint: the checkpoint line (as a dict) that states this root, when the
            store wrote one at ``tree_size``: with a signature, it proves who vouched
            for the root.
    """

    seq: int
    tree_size: int
    leaf_hash: bytes
    path: tuple[bytes, ...]
    root: bytes
    checkpoint: Mapping[str, Any] | None = None

    def to_json(self) -> str:
        """Returns the proof as a JSON object, bytes as lowercase hex."""
        return json.dumps(
            {
                "type": "inclusion",
                "hash": "rfc6962-sha256",
                "seq": self.seq,
                "tree_size": self.tree_size,
                "leaf_hash": self.leaf_hash.hex(),
                "path": _hex_list(list(self.path)),
                "root": self.root.hex(),
                "checkpoint": dict(self.checkpoint) if self.checkpoint is not None else None,
            },
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, data: str | bytes | Mapping[str, Any]) -> InclusionProof:
        """Parses what :meth:`to_json` wrote (a string, bytes or an already parsed dict).

        Raises:
            MalformedError: the text is not an inclusion proof (a ``ValueError`` too).
        """
        obj = _load(data)
        if obj.get("type", "inclusion") != "inclusion":
            raise MalformedError("not an inclusion proof")
        path = obj.get("path")
        if not isinstance(path, list):
            raise MalformedError("proof field 'path' must be a list of hex strings")
        return cls(
            seq=_int(obj.get("seq"), "seq"),
            tree_size=_int(obj.get("tree_size"), "tree_size"),
            leaf_hash=_unhex(obj.get("leaf_hash"), "leaf_hash"),
            path=tuple(_unhex(p, "path") for p in path),
            root=_unhex(obj.get("root"), "root"),
            checkpoint=_checkpoint(obj.get("checkpoint")),
        )


@dataclass(frozen=True, slots=True)
class ConsistencyProof:
    """Everything a third party needs to check that a tree extends an older one.

    Check it with ``merkle.verify_consistency(old_size, new_size, old_root, new_root, path)``.

    Attributes:
        old_size: the size of the older tree.
        new_size: the size of the newer tree.
        old_root: the root of the older tree.
        new_root: the root of the newer tree.
        path: the consistency proof, RFC 9162 §2.1.4.
        checkpoint: the checkpoint line (as a dict) stating ``new_root``, when there is one.
    """

    old_size: int
    new_size: int
    old_root: bytes
    new_root: bytes
    path: tuple[bytes, ...]
    checkpoint: Mapping[str, Any] | None = None

    def to_json(self) -> str:
        """Returns the proof as a JSON object, bytes as lowercase hex."""
        return json.dumps(
            {
                "type": "consistency",
                "hash": "rfc6962-sha256",
                "old_size": self.old_size,
                "new_size": self.new_size,
                "old_root": self.old_root.hex(),
                "new_root": self.new_root.hex(),
                "path": _hex_list(list(self.path)),
                "checkpoint": dict(self.checkpoint) if self.checkpoint is not None else None,
            },
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, data: str | bytes | Mapping[str, Any]) -> ConsistencyProof:
        """Parses what :meth:`to_json` wrote (a string, bytes or an already parsed dict).

        Raises:
            MalformedError: the text is not a consistency proof (a ``ValueError`` too).
        """
        obj = _load(data)
        if obj.get("type", "consistency") != "consistency":
            raise MalformedError("not a consistency proof")
        path = obj.get("path")
        if not isinstance(path, list):
            raise MalformedError("proof field 'path' must be a list of hex strings")
        return cls(
            old_size=_int(obj.get("old_size"), "old_size"),
            new_size=_int(obj.get("new_size"), "new_size"),
            old_root=_unhex(obj.get("old_root"), "old_root"),
            new_root=_unhex(obj.get("new_root"), "new_root"),
            path=tuple(_unhex(p, "path") for p in path),
            checkpoint=_checkpoint(obj.get("checkpoint")),
        )
