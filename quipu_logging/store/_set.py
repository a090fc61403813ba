r"""Store sets: one audit trail from several writer processes, one single-writer shard each.

A store set is a directory of complete stores (DESIGN §4), one per concurrently writing
process, plus a ``SET`` file and the set's own checkpoints. The single-writer rule
holds shard by shard; the set is read and verified as one.

Set root
========

::

    SETROOT/
      SET                   JSON, written once (temp file, link, fsync of SETROOT)
      SET.lock              the set-checkpoint lock (flock LOCK_EX); shard writers never take it
      set-checkpoints.jsonl one set checkpoint per line
      shard-000/            a complete store (FORMAT, LOCK, log/, merkle.spine, ...)
      shard-001/ ...        up to shard-(limit-1); more digits past 999

``SET`` is ``{"format": "quipu-log-set", "version": 1, "shards": <limit>,
"created_at": <µs>, "set_id": <hex>}`` (orjson, sorted keys, one line). Only its
``version`` decides whether this release can read the set. It is never rewritten:
every set checkpoint carries the SHA-256 of its exact bytes, so an edited ``SET``
file is found by ``verify``. The process that creates the set writes the first set
checkpoint (no shards) right after it, so the binding holds from the start.

Shard acquisition: a process takes the *first free* shard, trying ``shard-000``,
``shard-001``, ... in order, each with the shard's own writer lock (``LOCK_EX |
LOCK_NB``, never waiting), up to the limit. Shards are therefore created in order:
the shard directories of a set are always ``shard-000`` .. ``shard-(k-1)``. A
restarted process takes a free shard again and continues that shard's tree after
the usual recovery, so the number of shards tracks peak concurrency, not restarts.

Set checkpoint
==============

One JSON line of ``set-checkpoints.jsonl``::

    {"created_at": µs, "key_id": "...", "prev": hex, "set": hex,
     "shards": [{"index": i, "root": hex, "tree_size": n}, ...], "sig": hex}

The signed message is, byte by byte (integers big-endian)::

    b"quipu-set-checkpoint-v1\n"
    created_at   u64   (UTC µs)
    set          32 bytes: SHA-256 of the SET file's exact bytes
    count        u32   number of shards listed
    count times, in ascending index:
      index      u32   the shard number (shard-007 -> 7)
      tree_size  u64   that shard's tree size
      root       32 bytes: that shard's Merkle root at tree_size
    prev         32 bytes: SHA-256 of the previous set checkpoint's message (zeros for the first)

``sig`` and ``key_id`` work as for store checkpoints (``_checkpoint.py``): Ed25519
with ``key_id`` = hex of the first 8 bytes of SHA-256 of the raw public key, or the
hex SHA-256 of the message with ``key_id = "sha256"`` when unsigned. The shard list
is the set of shards the statement covers: every shard that existed when it was
written. Before a shard's state is read into a checkpoint its files are fsynced, so
a checkpoint never states a size a power loss could take back.

``verify`` of a set reports as tampering: a shard listed by a set checkpoint that is
missing (deleted), smaller than stated (rolled back), or whose root at the stated size
differs (rewritten); a ``shard-*`` entry outside ``shard-000`` .. ``shard-(limit-1)``
or not a canonical name (added outside the set's list); a missing shard below an
existing one (shards are taken in order); a ``SET`` file whose digest differs from the
one the set checkpoints carry (edited); a broken ``prev`` chain or a bad signature.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import secrets
import struct
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any

import orjson

from ..errors import (
    ConfigError,
    CorruptionError,
    FormatVersionError,
    NotAStoreError,
    ShardsBusyError,
    StoreLockedError,
)
from . import merkle
from ._checkpoint import ZERO_DIGEST, Signer
from ._config import StoreConfig
from ._lock import check_platform, is_locked, read_holder_pid
from ._store import AuditStore

__all__ = [
    "SET_FILE",
    "SET_FORMAT_NAME",
    "SET_FORMAT_VERSION",
    "SetCheckpoint",
    "ShardState",
    "StoreSet",
    "default_shard_limit",
    "is_set_root",
    "shard_name",
]

SET_FILE = "SET"
SET_LOCK = "SET.lock"
SET_CHECKPOINTS = "set-checkpoints.jsonl"
SET_FORMAT_NAME = "quipu-log-set"
SET_FORMAT_VERSION = 1
SET_DOMAIN = b"quipu-set-checkpoint-v1\n"
UNSIGNED_KEY_ID = "sha256"
_SHARD_RE = re.compile(r"shard-([0-9]{3,9})")  # ASCII digits only; fullmatch (no trailing newline)
_U64 = struct.Struct(">Q")
_U32 = struct.Struct(">I")
_SHARD_ENTRY = struct.Struct(">IQ")
# What a crash while creating a shard store can leave behind (see AuditStore.open).
_SHARD_LEFTOVERS = frozenset({"LOCK", "FORMAT.tmp", "log"})


def shard_name(index: int) -> str:
    """The directory name of shard ``index``: ``shard-000``, ``shard-001``, ..."""
    return f"shard-{index:03d}"


def shard_index(name: str) -> int | None:
    """The index of a canonical shard name, or ``None`` (``shard-7`` is not canonical)."""
    m = _SHARD_RE.fullmatch(name)
    if m is None:
        return None
    index = int(m.group(1))
    return index if shard_name(index) == name else None


def default_shard_limit() -> int:
    """The default shard limit: the larger of 8 and twice the CPU count."""
    return max(8, 2 * (os.cpu_count() or 1))


def is_set_root(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` is the root of a store set.

    That is: it holds a ``SET`` file, or (a damaged set) no ``SET`` file and no ``FORMAT``
    file but set checkpoints or shard directories.
    """
    root = os.fspath(path)
    if os.path.isfile(os.path.join(root, SET_FILE)):
        return True
    return not os.path.exists(os.path.join(root, "FORMAT")) and bool(set_markers(root))


def set_markers(root: str) -> list[str]:
    """What shows a store set lived in ``root``: ``set-checkpoints.jsonl`` and shard directories."""
    try:
        names = os.listdir(root)
    except OSError:
        return []
    return sorted(
        n
        for n in names
        if n == SET_CHECKPOINTS or (shard_index(n) is not None and os.path.isdir(os.path.join(root, n)))
    )


def missing_set_file(root: str) -> None:
    """Raises when ``root`` holds a store set whose ``SET`` file is gone.

    A new ``SET`` file would not match the digest the set checkpoints carry, and would
    launder the deletion; so it is never re-created over an existing set.

    Raises:
        CorruptionError: ``root`` has no ``SET`` file but holds set checkpoints or shards.
    """
    markers = set_markers(root)
    if markers and not os.path.exists(os.path.join(root, "FORMAT")):
        shown = ", ".join(markers[:4]) + (", ..." if len(markers) > 4 else "")
        raise CorruptionError(
            os.path.join(root, SET_FILE),
            None,
            f"the SET file is missing from the store set {root!r}, which still holds {shown}: it was "
            "deleted or lost. It is not re-created (a new one would not match the set checkpoints): "
            f"restore it from a backup. 'quipu-log verify {root}' reports the damage; the shards stay "
            "readable",
        )


def parse_shards_option(shards: Any, what: str = "shards") -> int | None:
    """Validates ``shards="auto" | N``: returns ``N``, or ``None`` for ``"auto"``.

    Raises:
        ConfigError: anything else.
    """
    if shards == "auto":
        return None
    if isinstance(shards, str) and shards.isdigit():
        shards = int(shards)
    if isinstance(shards, bool) or not isinstance(shards, int) or shards < 1:
        raise ConfigError(f'{what}: expected "auto" or a positive number of shards, got {shards!r}')
    return shards


def _now_us() -> int:
    return time.time_ns() // 1000


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True, slots=True)
class ShardState:
    """One shard's statement in a set checkpoint.

    Attributes:
        index: the shard number (``shard-007`` is 7).
        tree_size: its tree size.
        root: its Merkle root at ``tree_size`` (32 bytes).
    """

    index: int
    tree_size: int
    root: bytes

    @property
    def name(self) -> str:
        """The shard's directory name."""
        return shard_name(self.index)


@dataclass(frozen=True, slots=True)
class SetCheckpoint:
    """One set checkpoint line (see the module docstring for the signed bytes).

    Attributes:
        created_at: when it was written, UTC µs.
        set_digest: SHA-256 of the ``SET`` file's bytes.
        shards: the shards it covers, ascending index.
        prev: SHA-256 of the previous set checkpoint's message (zeros for the first).
        key_id: the signing key's id, or ``"sha256"`` when unsigned.
        sig: the signature (or digest), hex.
    """

    created_at: int
    set_digest: bytes
    shards: tuple[ShardState, ...]
    prev: bytes
    key_id: str
    sig: str

    def message(self) -> bytes:
        """The exact bytes that are signed."""
        parts = [SET_DOMAIN, _U64.pack(self.created_at), self.set_digest, _U32.pack(len(self.shards))]
        for state in self.shards:
            parts.append(_SHARD_ENTRY.pack(state.index, state.tree_size))
            parts.append(state.root)
        parts.append(self.prev)
        return b"".join(parts)

    def digest(self) -> bytes:
        """SHA-256 of :meth:`message`: what the next set checkpoint's ``prev`` holds."""
        return hashlib.sha256(self.message()).digest()

    @property
    def signed(self) -> bool:
        """True for an Ed25519-signed set checkpoint."""
        return self.key_id != UNSIGNED_KEY_ID

    def to_dict(self) -> dict[str, Any]:
        """The set checkpoint as a JSON-ready dict (hex for bytes)."""
        return {
            "created_at": self.created_at,
            "key_id": self.key_id,
            "prev": self.prev.hex(),
            "set": self.set_digest.hex(),
            "shards": [
                {"index": s.index, "root": s.root.hex(), "tree_size": s.tree_size} for s in self.shards
            ],
            "sig": self.sig,
        }

    def to_json(self) -> str:
        """One JSON line (no newline): the form kept in ``set-checkpoints.jsonl`` and as an anchor."""
        return orjson.dumps(self.to_dict(), option=orjson.OPT_SORT_KEYS).decode("ascii")

    @classmethod
    def from_json(
        cls, data: SetCheckpoint | Mapping[str, Any] | str | bytes | os.PathLike[str]
    ) -> SetCheckpoint:
        """Parses a set checkpoint: the object, a dict, a JSON line, or a path to a file holding one.

        Raises:
            ValueError: not a set checkpoint.
        """
        if isinstance(data, SetCheckpoint):
            return data
        if isinstance(data, os.PathLike) or (isinstance(data, str) and not data.lstrip().startswith("{")):
            with open(os.fspath(data), "rb") as f:
                data = f.read()
        obj = orjson.loads(data) if isinstance(data, (str, bytes)) else data
        if not isinstance(obj, Mapping):
            raise ValueError("a set checkpoint is a JSON object")
        try:
            states = []
            for entry in obj["shards"]:
                states.append(
                    ShardState(_uint(entry["index"]), _uint(entry["tree_size"]), _hash(entry["root"]))
                )
            indices = [s.index for s in states]
            if indices != sorted(set(indices)):
                raise ValueError("shards must be listed once each, in ascending index")
            key_id, sig = obj["key_id"], obj["sig"]
            if not isinstance(key_id, str) or not isinstance(sig, str):
                raise ValueError("key_id and sig must be strings")
            return cls(
                created_at=_uint(obj["created_at"]),
                set_digest=_hash(obj["set"]),
                shards=tuple(states),
                prev=_hash(obj["prev"]),
                key_id=key_id,
                sig=sig,
            )
        except KeyError as e:
            raise ValueError(f"not a set checkpoint: it lacks the field {e.args[0]!r}") from None
        except TypeError:
            raise ValueError(
                "not a set checkpoint: 'shards' must be a list of objects with index, tree_size and root"
            ) from None


def _uint(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**64:
        raise ValueError(f"expected an unsigned 64-bit integer, got {value!r}")
    return value


def _hash(value: Any) -> bytes:
    if not isinstance(value, str):
        raise ValueError(f"expected 64 hex digits, got {value!r}")
    raw = bytes.fromhex(value)
    if len(raw) != 32:
        raise ValueError(f"expected 64 hex digits, got {value!r}")
    return raw


def parse_set_checkpoints(data: bytes) -> list[tuple[int, SetCheckpoint | None, str]]:
    """Splits ``set-checkpoints.jsonl``: ``(line number from 1, checkpoint or None, error)``."""
    out: list[tuple[int, SetCheckpoint | None, str]] = []
    for number, line in enumerate(data.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            out.append((number, SetCheckpoint.from_json(line), ""))
        except (ValueError, orjson.JSONDecodeError) as e:
            out.append((number, None, str(e)))
    return out


def set_file_bytes(limit: int) -> bytes:
    """The bytes of a new ``SET`` file."""
    body = {
        "format": SET_FORMAT_NAME,
        "version": SET_FORMAT_VERSION,
        "shards": limit,
        "created_at": _now_us(),
        "set_id": secrets.token_hex(8),
    }
    return orjson.dumps(body, option=orjson.OPT_SORT_KEYS) + b"\n"


class StoreSet:
    """A store set on disk: its ``SET`` file, its shards and its set checkpoints.

    Open (or create) it with :meth:`open`. It holds no descriptor and no lock; the
    shards it hands out with :meth:`acquire` are ordinary :class:`AuditStore` writers.

    Attributes:
        root: the set's root directory (real path).
        limit: the most shards it may have (fixed when the set was created).
        set_bytes: the exact bytes of its ``SET`` file.
        skipped: the shards the last :meth:`acquire` passed over as damaged or not a
            shard of this set, each as ``"shard-001: why"``.
    """

    def __init__(self, root: str, limit: int, set_bytes: bytes) -> None:
        # Use StoreSet.open().
        self.root = root
        self.limit = limit
        self.set_bytes = set_bytes
        # The shards the last acquire() passed over as damaged or foreign ("shard-001: why").
        self.skipped: list[str] = []

    @classmethod
    def open(cls, root: str | os.PathLike[str], *, shards: Any = "auto", create: bool = True) -> StoreSet:
        """Opens a store set, creating it (and its directory) when missing and ``create`` is true.

        The shard limit is fixed when the set is created (``shards``: ``"auto"`` = the
        larger of 8 and 2 x CPU count, or a number); an existing set keeps its own, whatever
        ``shards`` says, because its ``SET`` file is never rewritten.

        Raises:
            NotAStoreError: ``root`` is a single store, or a non-empty directory that is not a set.
            FormatVersionError: the set was written by an incompatible release.
            CorruptionError: the ``SET`` file is unreadable.
            ConfigError: a bad ``shards`` value.
        """
        wanted = parse_shards_option(shards)
        real = os.path.realpath(os.fspath(root))
        path = os.path.join(real, SET_FILE)
        if not os.path.isfile(path):
            missing_set_file(real)
            if not create:
                raise NotAStoreError(f"{real!r} is not a store set (no SET file)")
            cls._create(real, wanted if wanted is not None else default_shard_limit())
        with open(path, "rb") as f:
            data = f.read()
        try:
            limit = read_set_limit(data, path)
        except NotAStoreError as e:
            if not set_markers(real):
                raise
            # A set's SET file overwritten with something else: damage, not a foreign directory.
            raise CorruptionError(path, 0, f"the SET file of a store set was edited or damaged ({e})") from e
        found = cls(real, limit, data)
        if not os.path.exists(os.path.join(real, SET_CHECKPOINTS)) and not found.shard_indices():
            # A crash between the SET file and its creation checkpoint (see _create): bind the
            # SET file now, before any shard exists, so verify can require the creation line.
            found._bind_set_file()
        return found

    @staticmethod
    def _create(root: str, limit: int) -> None:
        if os.path.exists(root) and not os.path.isdir(root):
            raise NotAStoreError(f"{root!r} is a file, not a store set directory")
        os.makedirs(root, exist_ok=True)
        check_platform(root)
        if os.path.exists(os.path.join(root, "FORMAT")):
            raise NotAStoreError(
                f"{root!r} is a single audit store, not a store set; give a new directory for a set "
                "(shards=...), or drop shards= to write this store from one process"
            )
        strangers = [
            n
            for n in os.listdir(root)
            if not (n.startswith(SET_FILE) or n == SET_CHECKPOINTS or shard_index(n) is not None)
        ]
        if strangers:
            raise NotAStoreError(
                f"{root!r} is not a store set (no SET file) and is not empty ({sorted(strangers)[:3]}); "
                "choose an empty or new directory"
            )
        tmp = os.path.join(root, f"{SET_FILE}.tmp.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, set_file_bytes(limit))
            os.fsync(fd)
        finally:
            os.close(fd)
        won = True
        try:
            # link() never replaces: of processes creating the set at once, exactly one wins
            # and the others read its SET file.
            os.link(tmp, os.path.join(root, SET_FILE))
        except FileExistsError:
            won = False
        finally:
            os.unlink(tmp)
        _fsync_dir(root)
        if won:
            # Bind the SET file's bytes from the start (see the module docstring).
            with open(os.path.join(root, SET_FILE), "rb") as f:
                data = f.read()
            StoreSet(root, limit, data)._bind_set_file()

    def _bind_set_file(self) -> None:
        """Writes the creation checkpoint (no shards) unless a set checkpoint exists already."""
        with self._checkpoint_lock():
            if not self.checkpoints():
                self._write_checkpoint(Signer(None), include_shards=False)

    # ------------------------------------------------------------------ shards

    def shard_root(self, index: int) -> str:
        """The directory of shard ``index``."""
        return os.path.join(self.root, shard_name(index))

    def shard_indices(self) -> list[int]:
        """The indices of the shard directories present (canonical names only), ascending."""
        out = []
        for name in os.listdir(self.root):
            index = shard_index(name)
            if index is not None and os.path.isdir(os.path.join(self.root, name)):
                out.append(index)
        return sorted(out)

    def acquire(self, make_config: Callable[[str], StoreConfig] | None = None) -> tuple[int, AuditStore]:
        """Opens the first free shard for writing (trying each lock without waiting, in order).

        Args:
            make_config: builds the shard's :class:`StoreConfig` from its root (sync policy,
                signing key, ...); default ``StoreConfig(root=shard_root)``.

        Returns:
            ``(index, store)``: the shard taken, open for writing (its lock held).

        Raises:
            ShardsBusyError: every shard up to the limit is held by another writer (or
                could not be opened); the error names the root, the limit and the holders.
        """
        pids: list[int | None] = []
        skipped: list[str] = []
        for index in range(self.limit):
            shard_root = self.shard_root(index)
            why = not_a_shard(shard_root)
            if why is not None:
                skipped.append(f"{shard_name(index)}: {why}")
                continue
            config = make_config(shard_root) if make_config is not None else StoreConfig(root=shard_root)
            try:
                store = AuditStore.open(config)
            except StoreLockedError as e:
                pids.append(e.pid)
            except (CorruptionError, NotAStoreError, FormatVersionError) as e:
                # A damaged shard must not stop this process from logging: the next free one
                # serves, and verify reports the damage.
                skipped.append(f"{shard_name(index)}: {e}")
            else:
                self.skipped = skipped
                return index, store
        self.skipped = skipped
        raise ShardsBusyError(self.root, self.limit, pids, skipped)

    def holders(self) -> dict[str, int | None]:
        """The shards whose writer lock is held right now, with the holder's pid when readable."""
        out: dict[str, int | None] = {}
        for index in self.shard_indices():
            shard_root = self.shard_root(index)
            if is_locked(shard_root):
                out[shard_name(index)] = read_holder_pid(shard_root)
        return out

    # ------------------------------------------------------------------ set checkpoints

    @contextlib.contextmanager
    def _checkpoint_lock(self) -> Iterator[None]:
        fd = os.open(
            os.path.join(self.root, SET_LOCK), os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644
        )
        try:
            # Only set-checkpoint writers take this lock (shard writers never do), so
            # waiting for it never waits for a shard writer.
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def checkpoints(self) -> list[tuple[int, SetCheckpoint | None, str]]:
        """The lines of ``set-checkpoints.jsonl`` (see :func:`parse_set_checkpoints`)."""
        try:
            with open(os.path.join(self.root, SET_CHECKPOINTS), "rb") as f:
                return parse_set_checkpoints(f.read())
        except FileNotFoundError:
            return []

    def shard_states(self, previous: SetCheckpoint | None = None) -> list[ShardState]:
        """Every present shard's tree size and root, read without a lock, after fsyncing its files.

        Each shard is checked first: its segments must hold every record its spine states
        (from the first surviving segment on, without a gap), and its records after its own
        last checkpoint (the writer's crash window, at most one segment: a writer checkpoints
        at every segment roll) are read back and compared with the spine, as the writer's
        recovery would. So a set checkpoint never states a record a shard no longer holds.
        The size and root are read before the fsync, so every record stated is durable.
        Given the ``previous`` set checkpoint, each shard it lists must still extend what
        it stated (a consistency proof), so a new statement never papers over a rollback.

        Raises:
            CorruptionError: a shard lacks records its spine holds, or one changed.
            NotAStoreError: a shard directory is not a store.
        """
        states = []
        for index in self.shard_indices():
            shard_root = self.shard_root(index)
            why = not_a_shard(shard_root)
            if why is not None:
                raise CorruptionError(shard_root, None, why)
            try:
                reader = AuditStore.open_reader(shard_root)
            except NotAStoreError:
                if _is_unborn_shard(shard_root):
                    continue  # a crash while creating it: nothing to state
                raise
            with reader:
                size = reader.tree_size
                root = reader.merkle_root(size)
                own = reader.last_checkpoint
                _fsync_shard(shard_root)  # after the snapshot: everything stated is now durable
                reader._check_complete(size)
                reader._check_tail(own.tree_size if own is not None and own.tree_size <= size else 0)
                stated = {x.index: x for x in previous.shards} if previous is not None else {}
                if index in stated:
                    _check_extends(reader, stated[index], size, root)
            states.append(ShardState(index, size, root))
        if previous is not None:
            gone = sorted({x.index for x in previous.shards} - {x.index for x in states})
            if gone:
                raise CorruptionError(
                    self.shard_root(gone[0]),
                    None,
                    f"the previous set checkpoint lists {shard_name(gone[0])}, which is gone: deleted",
                )
        return states

    def checkpoint(
        self, *, signing_key: str | os.PathLike[str] | None = None, include_shards: bool = True
    ) -> SetCheckpoint:
        """Writes a set checkpoint: every shard's tree size and root, signed, chained.

        Takes the set's own checkpoint lock, never a shard's writer lock: the shard
        writers go on while it runs.

        Args:
            signing_key: path to an Ed25519 PEM private key; ``None`` writes an unsigned
                (digested) checkpoint.
            include_shards: ``False`` states no shard (the first checkpoint of a new set).

        Returns:
            The checkpoint written.

        Raises:
            CorruptionError: the last line of ``set-checkpoints.jsonl`` is damaged (the
                chain cannot be continued; ``verify`` says more).
            ConfigError: the signing key cannot be loaded.
        """
        signer = Signer(os.fspath(signing_key) if signing_key is not None else None)
        with self._checkpoint_lock():
            return self._write_checkpoint(signer, include_shards=include_shards)

    def _write_checkpoint(self, signer: Signer, *, include_shards: bool) -> SetCheckpoint:
        # Called with the checkpoint lock held.
        path = os.path.join(self.root, SET_CHECKPOINTS)
        lines = self.checkpoints()
        prev = ZERO_DIGEST
        if lines:
            number, last, error = lines[-1]
            if last is None:
                raise CorruptionError(path, None, f"line {number} is not a set checkpoint ({error})")
            prev = last.digest()
        states = tuple(self.shard_states(last if lines else None)) if include_shards else ()
        cp = SetCheckpoint(
            created_at=_now_us(),
            set_digest=hashlib.sha256(self.set_bytes).digest(),
            shards=states,
            prev=prev,
            key_id=signer.key_id,
            sig="",
        )
        cp = replace(cp, sig=signer.sign(cp.message()))
        created = not os.path.exists(path)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            data = (cp.to_json() + "\n").encode("ascii")
            while data:
                data = data[os.write(fd, data) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        if created:
            _fsync_dir(self.root)
        return cp


def read_set_limit(data: bytes, path: str) -> int:
    """Validates the bytes of a ``SET`` file; returns the shard limit.

    Raises:
        CorruptionError: not JSON, or a bad shard limit.
        NotAStoreError: not a quipu-log-set file.
        FormatVersionError: another version.
    """
    try:
        info = orjson.loads(data)
    except orjson.JSONDecodeError as e:
        raise CorruptionError(path, 0, f"unreadable SET file: {e}") from e
    if not isinstance(info, dict) or info.get("format") != SET_FORMAT_NAME:
        raise NotAStoreError(f"{path}: not a quipu-log SET file")
    version = info.get("version")
    if isinstance(version, bool) or not isinstance(version, int):
        raise CorruptionError(path, 0, f"SET file: bad version {version!r}")
    if version != SET_FORMAT_VERSION:
        raise FormatVersionError(path, version)
    limit = info.get("shards")
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise CorruptionError(path, 0, f"SET file: bad shard limit {limit!r}")
    return limit


def extension_problem(reader: AuditStore, state: ShardState, size: int, root: bytes, what: str) -> str | None:
    """Why a shard's tree (``size``, ``root``) does not extend what ``what`` stated, or ``None``."""
    if size < state.tree_size:
        return f"{what} states {state.tree_size} records, the shard holds {size}: rolled back"
    try:
        proof = reader.prove_consistency(state.tree_size, size).path if state.tree_size else []
    except (ValueError, CorruptionError) as e:
        return f"cannot prove the shard extends {what}: {e}"
    if merkle.verify_consistency(state.tree_size, size, state.root, root, list(proof)):
        return None
    return f"the shard's tree does not extend the root {what} states at size {state.tree_size}: rewritten"


def _check_extends(reader: AuditStore, state: ShardState, size: int, root: bytes) -> None:
    """Raises unless a shard's tree extends what the previous set checkpoint stated."""
    why = extension_problem(reader, state, size, root, "the previous set checkpoint")
    if why is not None:
        raise CorruptionError(reader.root, None, f"{why}; 'quipu-log verify' reports it, nothing was stated")


def not_a_shard(shard_root: str) -> str | None:
    """Why a ``shard-NNN`` entry cannot be a shard of this set, or ``None``.

    A shard is a plain directory holding one store: not a symbolic link (it could point
    anywhere, the set itself included) and not a store set of its own.
    """
    if os.path.islink(shard_root):
        return "the shard is a symbolic link, not a directory of the set: added outside the set's list"
    if os.path.lexists(os.path.join(shard_root, SET_FILE)):
        return "the shard holds a store set, not a single store: added outside the set's list"
    return None


def _is_unborn_shard(shard_root: str) -> bool:
    """A shard directory a crash left before its FORMAT file: only LOCK, FORMAT.tmp, an empty log/."""
    try:
        names = set(os.listdir(shard_root))
        log = os.path.join(shard_root, "log")
        return names <= _SHARD_LEFTOVERS and (not os.path.isdir(log) or not os.listdir(log))
    except OSError:
        return False


def _fsync_shard(shard_root: str) -> None:
    """Fsyncs a live shard's spine and its newest segments from read-only descriptors.

    A set checkpoint must not state a size a power loss could take back; fsync through
    any descriptor flushes the file's dirty pages, whoever wrote them.
    """
    log = os.path.join(shard_root, "log")
    try:
        segments = sorted(n for n in os.listdir(log) if n.endswith(".log"))
    except OSError:
        segments = []
    for path in [os.path.join(log, n) for n in segments[-2:]] + [os.path.join(shard_root, "merkle.spine")]:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
