"""The exception tree of quipu_logging.

Every error the library raises derives from :class:`QuipuError` and from the
built-in exception a caller would naturally catch (``ValueError`` for bad input,
``OSError``-like conditions for the file system, ``RuntimeError`` for state), so
``except ValueError`` keeps working for code that does not know this library.
Errors carry structured attributes; their messages say what happened and what
to do about it.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "ConfigError",
    "CorruptionError",
    "FormatVersionError",
    "MalformedError",
    "NotAStoreError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "PipelineClosedError",
    "QueryError",
    "QueueFullError",
    "QuipuError",
    "ShardsBusyError",
    "StoreBrokenError",
    "StoreClosedError",
    "StoreLockedError",
    "UnsupportedFilesystemError",
]


class QuipuError(Exception):
    """Base class of every error raised by quipu_logging."""


class ConfigError(QuipuError, ValueError):
    """A configuration value is invalid (a typo, an impossible size, a bad policy string)."""


class StoreLockedError(QuipuError, RuntimeError):
    """Another writer (this process or another one) holds the store's writer lock.

    Attributes:
        root: the store root that is locked.
        pid: the process id recorded by the current holder, when it could be read.
    """

    def __init__(self, root: str, pid: int | None = None) -> None:
        self.root = root
        self.pid = pid
        holder = f" (pid {pid})" if pid is not None else ""
        super().__init__(
            f"store {root!r} is already open for writing{holder}; an AuditStore has exactly one "
            "writer: close the other one, or open this one with AuditStore.open_reader()"
        )


class ShardsBusyError(StoreLockedError):
    """Every shard of a store set is held by another writer: this process gets none.

    Attributes:
        root: the set's root directory.
        limit: the set's shard limit (from its ``SET`` file).
        pids: the pids recorded by the shards' holders, in shard order (``None`` when unreadable).
        skipped: shards that could not be opened for another reason, one sentence each.
    """

    def __init__(
        self, root: str, limit: int, pids: list[int | None], skipped: list[str] | None = None
    ) -> None:
        self.limit = limit
        self.pids = pids
        self.skipped = list(skipped or ())
        QuipuError.__init__(self)
        self.root = root
        self.pid = None
        known = sorted({p for p in pids if p is not None})
        holders = ", ".join(str(p) for p in known) if known else "unknown"
        extra = f"; also skipped: {'; '.join(self.skipped)}" if self.skipped else ""
        self.args = (
            f"all {limit} shards of store set {root!r} are busy (held by pids {holders}){extra}: "
            "every process writing a set needs a shard of its own. Run fewer worker processes, or "
            "start a new set root with a larger shards= limit",
        )


class CorruptionError(QuipuError, ValueError):
    """Stored bytes are damaged or were tampered with.

    Attributes:
        file: the damaged file.
        offset: the byte offset of the damage in ``file`` (``None`` when unknown).
        reason: what is wrong, in words.
        seq: the record's sequence number, when one is concerned.
    """

    def __init__(self, file: str, offset: int | None, reason: str, *, seq: int | None = None) -> None:
        self.file = file
        self.offset = offset
        self.reason = reason
        self.seq = seq
        where = f" at offset {offset}" if offset is not None else ""
        which = f" (seq {seq})" if seq is not None else ""
        super().__init__(f"{file}{where}{which}: {reason}")

    @property
    def segment(self) -> str:
        """The damaged file (an alias of :attr:`file`, named for segment damage)."""
        return self.file


class FormatVersionError(QuipuError, ValueError):
    """The store was written in an on-disk format version this release cannot read.

    Attributes:
        file: the ``FORMAT`` file that names the version.
        version: the version found there.
    """

    def __init__(self, file: str, version: object) -> None:
        self.file = file
        self.version = version
        super().__init__(
            f"{file}: unsupported store format version {version!r}; this release of quipu_logging "
            "reads version 1 only: upgrade quipu_logging to read this store"
        )


class MalformedError(QuipuError, ValueError):
    """Serialized input handed to a parser is not what it claims to be.

    Raised for a checkpoint line or anchor, an inclusion or consistency proof
    that is not valid JSON, lacks a field, or holds a value of the wrong type
    or size. It derives from ``ValueError``, which those parsers raised before.
    """


class NotAStoreError(QuipuError, ValueError):
    """A path is not an audit store (a non-empty directory without a ``FORMAT`` file, a file)."""


class UnsupportedFilesystemError(QuipuError, OSError):
    """The store root lives where a single-writer lock cannot be trusted (Windows, NFS, CIFS)."""


class PayloadTooLargeError(QuipuError, ValueError):
    """An encoded record is larger than the format allows (16 MiB).

    Attributes:
        size: the encoded size in bytes.
        limit: the largest size allowed.
    """

    def __init__(self, size: int, limit: int) -> None:
        self.size = size
        self.limit = limit
        super().__init__(
            f"encoded record is {size} bytes, over the {limit}-byte limit of a frame; "
            "the record was not stored: shorten its fields (AuditHandler(max_field_chars=...) cuts them)"
        )


class QueryError(QuipuError, ValueError):
    """A query's arguments are invalid: a bad cursor, an empty time range, an unmatchable value."""


class StoreClosedError(QuipuError, ValueError):
    """An operation was attempted on a closed store."""


class StoreBrokenError(QuipuError, RuntimeError):
    """A failed ``fsync`` left the store in an unknown state; it refuses writes until reopened.

    Linux may drop dirty pages after a failed ``fsync``, so retrying it could report
    success for data that never reached the disk. Close the store and open it again:
    recovery re-reads and re-verifies the tail.
    """


class QueueFullError(QuipuError, RuntimeError):
    """The pipeline's bounded queue is full; the event was not accepted.

    Attributes:
        event: the rejected event, so the caller can hand it elsewhere.
    """

    def __init__(self, event: Any, message: str = "audit queue is full") -> None:
        self.event = event
        super().__init__(message)


class PipelineClosedError(QuipuError, RuntimeError):
    """The pipeline is closed, its writer is dead or stalled, or the disk is full.

    Attributes:
        event: the rejected event, so the caller can hand it elsewhere.
    """

    def __init__(self, event: Any, message: str = "audit pipeline is closed") -> None:
        self.event = event
        super().__init__(message)


class PermissionDeniedError(QuipuError, PermissionError):
    """A role attempted an action its :class:`PermissionPolicy` does not allow."""
