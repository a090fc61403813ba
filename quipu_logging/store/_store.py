"""The single-writer, append-only audit store.

One store root is one directory, one Merkle tree and one writer (see
``_format.py`` for the bytes). :class:`AuditStore` has two faces:

* ``AuditStore.open(config)``: the writer. It takes the lock, recovers a torn
  tail left by a crash, and appends. One owner thread; not thread-safe.
* ``AuditStore.open_reader(root)``: a reader. No lock, never modifies a byte,
  sees whole frames only, and never fails on content (``verify`` reports).

Durability order on every sync: the active segment, then the spine, then the
checkpoints file; the parent directory after every create, rename and unlink.
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from itertools import pairwise
from typing import Any

import orjson

from .._types import ConsistencyProof, InclusionProof, Page, Problem, Receipt, StoredRecord, VerifyReport
from ..errors import (
    CorruptionError,
    FormatVersionError,
    NotAStoreError,
    PayloadTooLargeError,
    QueryError,
    StoreBrokenError,
    StoreClosedError,
)
from . import _format as fmt
from . import merkle
from ._checkpoint import (
    ZERO_DIGEST,
    Checkpoint,
    Signer,
    check_signature,
    load_public_keys,
    parse_checkpoint_lines,
    signing_warnings,
)
from ._config import RetentionPolicy, StoreConfig, SyncPolicy
from ._encode import encode_event, encode_system
from ._fileio import FileLayer
from ._lock import WriterLock, check_platform, is_locked, register_fork_callback
from ._query import Cursor, QueryFilter
from ._spine import HEADER_SIZE as SPINE_HEADER_SIZE
from ._spine import Spine, stored_hash_count

__all__ = ["AuditStore"]

_SEQ_VALUE = re.compile(rb"-?\d+(?=[,}])")
_SEG_RE = re.compile(r"^seg-(\d{10})\.log$")
_HOLE_PROBE = 1024  # the largest gap in a segment listing that is re-checked by name
_LEAF = merkle.LEAF_PREFIX
_sha256 = hashlib.sha256
_loads = orjson.loads


def _now_us() -> int:
    return time.time_ns() // 1000


@dataclass
class _Segment:
    """What the store knows of one segment file."""

    number: int
    path: str
    base_index: int
    count: int = 0
    length: int = fmt.SEGMENT_HEADER
    min_ts: int | None = None
    max_ts: int | None = None
    sealed: bool = False
    index: list[tuple[int, int]] = field(default_factory=list)
    sidecar_used: bool = False

    @property
    def end(self) -> int:
        return self.base_index + self.count

    def note(self, seq: int, offset: int, ts: int) -> None:
        if self.min_ts is None or ts < self.min_ts:
            self.min_ts = ts
        if self.max_ts is None or ts > self.max_ts:
            self.max_ts = ts
        if (seq - self.base_index) % fmt.INDEX_STRIDE == 0:
            self.index.append((seq, offset))

    def note_batch(self, start: int, stamps: list[int], sizes: list[int]) -> None:
        """Accounts for frames of ``sizes`` bytes written from ``start``, with times ``stamps``."""
        lo, hi = min(stamps), max(stamps)
        if self.min_ts is None or lo < self.min_ts:
            self.min_ts = lo
        if self.max_ts is None or hi > self.max_ts:
            self.max_ts = hi
        stride = fmt.INDEX_STRIDE
        seq = self.base_index + self.count
        # Index entries fall on seqs base + k*stride: only those offsets need computing.
        k = -(seq - self.base_index) % stride
        if k < len(sizes):
            pos = start + sum(sizes[:k])
            while k < len(sizes):
                self.index.append((seq + k, pos))
                pos += sum(sizes[k : k + stride])
                k += stride
        self.length = start + sum(sizes)
        self.count += len(sizes)

    def sidecar(self) -> fmt.Sidecar:
        return fmt.Sidecar(
            base_index=self.base_index,
            count=self.count,
            min_ts=self.min_ts,
            max_ts=self.max_ts,
            length=self.length,
            index=tuple(self.index),
        )


class AuditStore:
    """An append-only, tamper-evident store of audit records.

    Open it with :meth:`open` (the one writer) or :meth:`open_reader` (any number
    of readers, no lock). Use it as a context manager; :meth:`close` is idempotent.
    """

    def __init__(self, config: StoreConfig, io: FileLayer, *, writable: bool) -> None:
        # Use AuditStore.open() / AuditStore.open_reader().
        self.config = config
        self.root: str = os.fspath(config.root)
        self._io = io
        self._writable = writable
        self._closed = False
        self._foreign = False
        self._broken: BaseException | None = None
        self._lock: WriterLock | None = None
        self._log_dir = os.path.join(self.root, "log")
        self._segments: list[_Segment] = []
        self._active_fd: int | None = None
        self._spine: Spine | None = None
        self._next_seq = 0
        self._policy: SyncPolicy = config.sync_policy
        self._unsynced = 0
        self._oldest_unsynced: float | None = None
        self._clock: Callable[[], float] = time.monotonic
        self._checkpoints_fd: int | None = None
        self._checkpoints_len = 0
        self._last_checkpoint: Checkpoint | None = None
        self._signer: Signer | None = None
        self.fsyncs = 0
        """How many ``fsync`` calls the store has made (files and directories)."""
        self.repairs: list[str] = []
        """What ``open(repair=True)`` or crash recovery did, one sentence each."""
        self.segments_opened = 0
        """How many segment files queries have read (a time filter skips the others)."""
        self.sidecars_rebuilt = 0
        """How many sidecars were missing or disagreed with their segment and were rebuilt."""
        self._views_cache: dict[int, _Segment] = {}
        self._store_id_cache: str | None = None
        self._spine_damage: CorruptionError | None = None  # a reader's unreadable spine header

    # ------------------------------------------------------------------ opening

    @classmethod
    def open(
        cls, config_or_root: StoreConfig | str | os.PathLike[str], *, repair: bool = False
    ) -> AuditStore:
        """Opens (or creates) a store for writing and takes its writer lock.

        A missing directory is created with its parents; an empty one becomes a new
        store; a non-empty directory that is not a store is refused. A torn tail
        left by a crash is cut back to the last whole record (never below the last
        checkpoint), and the Merkle spine is made to match.

        Args:
            config_or_root: a :class:`StoreConfig`, or the root path (default settings).
            repair: move damaged bytes of the active segment to ``ROOT/quarantine/``
                instead of refusing to open; :attr:`repairs` says what was moved.

        Returns:
            The open store.

        Raises:
            StoreLockedError: another writer holds the store.
            NotAStoreError: the directory holds something else.
            FormatVersionError: the store was written by an incompatible release.
            CorruptionError: damage recovery may not repair (see ``repair``).
            UnsupportedFilesystemError: Windows or a network file system.
        """
        config = StoreConfig.coerce(config_or_root)
        io = config.file_layer or FileLayer()
        root = os.fspath(config.root)
        if os.path.exists(root) and not os.path.isdir(root):
            raise NotAStoreError(f"{root!r} is a file, not a store directory")
        os.makedirs(root, exist_ok=True)
        check_platform(root)
        store = cls(config, io, writable=True)
        store._refuse_foreign_directory()  # before LOCK is created: never touch a stranger's directory
        store._lock = WriterLock.acquire(root)
        try:
            store._signer = Signer(os.fspath(config.signing_key) if config.signing_key else None)
            store._open_writer(repair)
        except BaseException:
            store._release_all()
            raise
        register_fork_callback(store)
        return store

    @classmethod
    def open_reader(cls, root: str | os.PathLike[str], *, file_layer: FileLayer | None = None) -> AuditStore:
        """Opens a store for reading, without any lock, safe while a writer appends.

        The reader sees whole frames only, and :meth:`refresh` makes newer records
        visible. It never fails on content: damage is :meth:`verify`'s to report.
        Given the root of a store set, it returns a reader over every shard (a
        ``StoreSetReader``: merged queries, one cursor, one ``verify``).

        Args:
            root: the store directory.
            file_layer: the layer segment and spine reads go through (tests count reads
                with it); default a plain :class:`FileLayer`.

        Raises:
            NotAStoreError: ``root`` is not a store.
            FormatVersionError: the store was written by an incompatible release.
        """
        from ._set import is_set_root

        if is_set_root(root):
            # A store set (its SET file may be missing: verify reports that): one reader over
            # every shard (see _setread.py).
            from ._setread import open_set_reader

            return open_set_reader(root, file_layer=file_layer)
        config = StoreConfig(root=root)
        store = cls(config, file_layer or FileLayer(), writable=False)
        store._check_format(create=False)
        store.refresh()
        return store

    def _refuse_foreign_directory(self) -> None:
        if os.path.exists(os.path.join(self.root, "FORMAT")):
            return
        # A crash while creating a store can leave LOCK, FORMAT.tmp and an empty log/.
        leftovers = [n for n in os.listdir(self.root) if n not in ("LOCK", "FORMAT.tmp", "log")]
        log_entries = os.listdir(self._log_dir) if os.path.isdir(self._log_dir) else []
        if os.path.isfile(os.path.join(self.root, "SET")):
            raise NotAStoreError(
                f"{self.root!r} is a store set (it has a SET file), not a single store: write it with "
                'AuditHandler(root=..., shards="auto") (in dictConfig: "shards": "auto"), one '
                "shard per process"
            )
        if leftovers or log_entries:
            raise NotAStoreError(
                f"{self.root!r} is not an audit store (no FORMAT file) and is not empty; "
                "choose an empty or new directory for a new store"
            )

    def _check_format(self, *, create: bool) -> None:
        path = os.path.join(self.root, "FORMAT")
        if not os.path.isdir(self.root):
            what = "a file" if os.path.exists(self.root) else "no such directory"
            raise NotAStoreError(f"{self.root!r} is not a store: {what}")
        if not os.path.exists(path):
            if not create:
                raise NotAStoreError(f"{self.root!r} is not an audit store (no FORMAT file)")
            self._refuse_foreign_directory()
            tmp = path + ".tmp"
            fd = self._io.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            try:
                self._io.pwrite(fd, fmt.format_file_bytes(_now_us()), 0)
                self._fsync(fd)
            finally:
                self._io.close(fd)
            self._io.rename(tmp, path)
            self._fsync_dir(self.root)
            return
        try:
            with open(path, "rb") as f:
                info = _loads(f.read())
        except (OSError, orjson.JSONDecodeError) as e:
            raise CorruptionError(path, 0, f"unreadable FORMAT file: {e}") from e
        if not isinstance(info, dict) or info.get("format") != fmt.FORMAT_NAME:
            raise NotAStoreError(f"{path}: not a quipu-log FORMAT file")
        if info.get("version") != fmt.FORMAT_VERSION:
            raise FormatVersionError(path, info.get("version"))

    def _open_writer(self, repair: bool) -> None:
        self._check_format(create=True)
        os.makedirs(self._log_dir, exist_ok=True)
        self._load_checkpoints(writable=True)
        self._segments = self._list_segments()
        self._spine = Spine.open(os.path.join(self.root, "merkle.spine"), self._io, writable=True)
        floor = self._last_checkpoint.tree_size if self._last_checkpoint else 0
        if not self._segments:
            if self._spine.size or floor:
                raise CorruptionError(
                    self._log_dir,
                    None,
                    f"no segment files, but the Merkle spine holds {self._spine.size} records "
                    f"(last checkpoint: {floor}); segments were deleted",
                )
            self._create_segment(0, 0)
        else:
            self._recover_active(repair, floor)
        self._reconcile_spine(floor, repair)
        self._next_seq = self._segments[-1].end

    def _list_segments(self) -> list[_Segment]:
        found: list[tuple[int, str]] = []
        try:
            names = os.listdir(self._log_dir)
        except FileNotFoundError:
            names = []  # log/ itself deleted: no segments (verify reports the spine's records missing)
        for name in names:
            m = _SEG_RE.match(name)
            if m:
                found.append((int(m.group(1)), os.path.join(self._log_dir, name)))
        found.sort()
        # readdir need not return entries created while it runs (ext4 returns them in hash
        # order), so a listing taken while the writer rolls over can hold seg N+1 but miss
        # seg N. Segment numbers are consecutive: probe small holes by name (a segment
        # really deleted stays missing, and verify reports it).
        holes: list[tuple[int, str]] = []
        for (a, _), (b, _) in pairwise(found):
            if b - a <= _HOLE_PROBE:
                for n in range(a + 1, b):
                    path = os.path.join(self._log_dir, fmt.segment_name(n))
                    if os.path.exists(path):
                        holes.append((n, path))
        if holes:
            found = sorted(found + holes)
        return [_Segment(number=n, path=p, base_index=-1) for n, p in found]

    def _read_file(self, path: str, limit: int | None = None) -> bytes:
        fd = self._io.open(path, os.O_RDONLY)
        try:
            size = self._io.size(fd) if limit is None else limit
            return self._io.pread(fd, size, 0)
        finally:
            self._io.close(fd)

    def _sidecar_for(self, seg: _Segment, length: int) -> fmt.Sidecar | None:
        path = os.path.join(self._log_dir, fmt.sidecar_name(seg.number))
        try:
            with open(path, "rb") as f:
                side = fmt.Sidecar.from_bytes(f.read())
        except OSError:
            return None
        if side is None or side.length != length:
            return None
        return side

    def _describe_sealed(self, seg: _Segment) -> None:
        """Fills in a sealed segment's count and times from its sidecar, or by a scan."""
        length = os.path.getsize(seg.path)
        side = self._sidecar_for(seg, length)
        if side is not None:
            seg.base_index, seg.count, seg.length = side.base_index, side.count, side.length
            seg.min_ts, seg.max_ts, seg.index = side.min_ts, side.max_ts, list(side.index)
            seg.sealed = True
            return
        data = self._read_file(seg.path)
        seg.base_index = fmt.parse_segment_header(data, seg.path)
        scan = fmt.scan_frames(data, find_resync=False)
        self._fill_from_scan(seg, data, scan)
        seg.sealed = True

    def _fill_from_scan(self, seg: _Segment, data: bytes, scan: fmt.FrameScan) -> None:
        seg.count = len(scan.frames)
        seg.length = scan.end
        seg.min_ts = seg.max_ts = None
        seg.index = []
        seq = seg.base_index
        for pos, length in scan.frames:
            ts = _ts_of(data[pos + fmt.FRAME_HEADER : pos + fmt.FRAME_HEADER + length])
            seg.note(seq, pos, ts)
            seq += 1

    def _recover_active(self, repair: bool, floor: int) -> None:
        active = self._segments[-1]
        data = self._read_file(active.path)
        prev_end = 0
        if len(self._segments) > 1:
            prev = self._segments[-2]
            self._describe_sealed(prev)
            prev_end = prev.end
        if len(data) < fmt.SEGMENT_HEADER:
            # A crash right after rollover: the header never fully reached the disk. The
            # segment restarts where its predecessor ends (segment 0 at seq 0); the spine
            # may be ahead of the segments, so it only decides when nothing else can.
            if len(self._segments) > 1:
                base = prev_end
            elif active.number == 0:
                base = 0
            else:
                base = self._spine_size()
            if base < floor:
                reason = (
                    f"the active segment is {len(data)} bytes, shorter than its header, so it would "
                    f"restart at seq {base}, below the last checkpoint's tree size {floor}: "
                    "records that were checkpointed are missing"
                )
                if not repair:
                    raise CorruptionError(active.path, 0, reason, seq=base)
                if data:
                    self._quarantine(active, data, 0, reason)
            self.repairs.append(f"recreated torn segment header of {active.path}")
            self._segments.pop()
            self._io.unlink(active.path)
            self._create_segment(active.number, base)
            return
        active.base_index = fmt.parse_segment_header(data, active.path)
        side = self._sidecar_for(active, len(data))
        scan = fmt.scan_frames(data)
        self._fill_from_scan(active, data, scan)
        if scan.stop_reason is not None:
            cut_to = scan.end
            if scan.resync_offset is not None:
                reason = (
                    f"{scan.stop_reason}, followed by a valid frame at offset {scan.resync_offset}: "
                    "damage in the middle of the segment, not a torn tail"
                )
                if not repair:
                    raise CorruptionError(
                        active.path,
                        scan.end,
                        reason + "; open with repair=True to move the damaged bytes to quarantine/",
                        seq=active.end,
                    )
                self._quarantine(active, data, cut_to, reason)
            elif active.end < floor:
                reason = (
                    f"{scan.stop_reason}: the segment ends at seq {active.end}, below the last "
                    f"checkpoint's tree size {floor}; records that were checkpointed are missing"
                )
                if not repair:
                    raise CorruptionError(active.path, scan.end, reason, seq=active.end)
                self._quarantine(active, data, cut_to, reason)
            elif self._spine_size() > active.end:
                # The spine hashed a record here, so its frame was once whole: a power failure
                # tore it, or a hand changed it. Keep the bytes (the spine's trim records the gap).
                self._quarantine(
                    active,
                    data,
                    cut_to,
                    f"{scan.stop_reason}, in a record the Merkle spine had already hashed",
                )
            else:
                self.repairs.append(
                    f"cut torn tail of {active.path} at offset {cut_to} ({scan.stop_reason}); "
                    f"{len(data) - cut_to} bytes of an unfinished write dropped"
                )
                fd = self._io.open(active.path, os.O_RDWR)
                try:
                    self._io.truncate(fd, cut_to)
                    self._fsync(fd)
                finally:
                    self._io.close(fd)
            side = None
        if side is not None and side.count == active.count:
            # The last segment was sealed, and the crash came before the next one was created.
            active.sealed = True
            self._create_segment(active.number + 1, active.end)
            return
        self._active_fd = self._io.open(active.path, os.O_RDWR)

    def _quarantine(self, seg: _Segment, data: bytes, cut_to: int, reason: str) -> None:
        target = self._save_to_quarantine(seg.path, data, cut_to)
        fd = self._io.open(seg.path, os.O_RDWR)
        try:
            self._io.truncate(fd, cut_to)
            self._fsync(fd)
        finally:
            self._io.close(fd)
        self.repairs.append(
            f"moved {len(data) - cut_to} bytes of {seg.path} from offset {cut_to} to {target} ({reason})"
        )

    def _save_to_quarantine(self, path: str, data: bytes, cut_to: int) -> str:
        """Durably writes ``data[cut_to:]`` (bytes of ``path`` about to be cut) under ``ROOT/quarantine/``."""
        qdir = os.path.join(self.root, "quarantine")
        os.makedirs(qdir, exist_ok=True)
        name = f"{os.path.basename(path)}.{cut_to}.{_now_us()}.bin"
        target = os.path.join(qdir, name)
        fd = self._io.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        try:
            self._io.pwrite(fd, data[cut_to:], 0)
            self._fsync(fd)
        finally:
            self._io.close(fd)
        self._fsync_dir(qdir)
        return target

    def _spine_size(self) -> int:
        assert self._spine is not None
        return self._spine.size

    def _reconcile_spine(self, floor: int, repair: bool = False) -> None:
        """Makes the spine match the segments in the crash window after the last checkpoint.

        Below the last checkpoint (``floor``) a short spine or missing records are
        refused; with ``repair`` the spine is rebuilt from the segments instead (a short
        spine), or cut to the surviving records with its cut hashes moved to
        ``quarantine/`` (records lost below the checkpoint). Either way the checkpoints
        still say what was there, so :meth:`verify` keeps reporting any loss.
        """
        spine = self._spine
        assert spine is not None
        last = self._segments[-1]
        end = last.end
        spine_path = os.path.join(self.root, "merkle.spine")
        lo = floor  # leaves from here on are checked against (and rebuilt from) the segments
        if spine.size < floor:
            reason = (
                f"the Merkle spine holds {spine.size} records, fewer than the last checkpoint's "
                f"{floor}: the spine was truncated"
            )
            if not repair:
                raise CorruptionError(spine_path, _spine_bytes(spine.size), reason, seq=spine.size)
            self.repairs.append(
                f"{reason}; rebuilding its leaves from seq {spine.size} on from the segments "
                "(verify() checks them against the checkpoints)"
            )
            lo = spine.size
        if end < floor:
            reason = (
                f"the segments end at seq {end}, below the last checkpoint's tree size {floor}: "
                "checkpointed records are missing"
            )
            if not repair:
                raise CorruptionError(last.path, last.length, reason, seq=end)
            lo = min(lo, end)
        # Leaves from the floor on may be rewritten from the segments: the crash window.
        if spine.size > end:
            if end < floor:
                cut = _spine_bytes(end)
                target = self._save_to_quarantine(spine_path, self._read_file(spine_path), cut)
                self.repairs.append(
                    f"moved the Merkle spine hashes of seq {end}..{spine.size - 1} (from offset {cut}) "
                    f"to {target}: those records are missing below the last checkpoint ({floor})"
                )
            else:
                # A process crash never leaves the spine ahead of the segments (frames are written
                # before their hashes); a power failure or a hand can. Keep the evidence, say so.
                cut = _spine_bytes(end)
                target = self._save_to_quarantine(spine_path, self._read_file(spine_path), cut)
                self.repairs.append(
                    f"trimmed the Merkle spine from {spine.size} to {end} records (torn tail): the "
                    f"segments lack records the spine had hashed; their hashes were moved to {target}"
                )
            spine.truncate(end)
        recomputed = self._leaves_between(lo, end)
        stored = spine.leaves(lo, spine.size)
        mismatch = next((i for i, (a, b) in enumerate(zip(stored, recomputed, strict=False)) if a != b), None)
        if mismatch is not None:
            at = lo + mismatch
            if at < last.base_index or self._leaf_looks_whole(at):
                # The spine's hash of this record is intact, so the record changed after it was
                # hashed: that is tampering (or damage), never a torn write. Sealed segments are
                # never rewritten either.
                self._refuse_changed_record(at, repair)
            else:
                self.repairs.append(f"rewrote torn Merkle spine leaves from seq {at} (crash window)")
            spine.truncate(at)
            end = last.end  # a repair may have moved the changed records to quarantine/
            recomputed = recomputed[: end - lo]
        if spine.size < end:
            added = end - spine.size
            spine.append_many(recomputed[spine.size - lo :])
            self.repairs.append(f"added {added} missing Merkle spine leaves from the segments")
        self._sync_spine()

    def _leaf_looks_whole(self, i: int) -> bool:
        """Whether spine leaf ``i`` is the hash the writer stored, not a torn write.

        A torn spine write leaves zeros where the file was extended: a leaf whose
        sibling is stored is whole when its parent's stored hash agrees with both
        children; a leaf without one (the last of an odd tree) is whole unless it
        ends in a zero byte (a torn write always does).
        """
        spine = self._spine
        assert spine is not None
        leaf = spine.leaf(i)
        sibling = i ^ 1
        if sibling < spine.size:
            left, right = (leaf, spine.leaf(sibling)) if i < sibling else (spine.leaf(sibling), leaf)
            return merkle.node_hash(left, right) == spine._stored(1, i >> 1)
        return leaf[-1] != 0

    def _refuse_changed_record(self, seq: int, repair: bool) -> None:
        """Handles a record in the crash window whose bytes no longer match an intact spine leaf."""
        where = next((r for r in self._iter_records(seq, seq + 1)), None)
        seg = where[3] if where is not None else self._segments[-1]
        offset = where[4] if where is not None else None
        reason = (
            f"record seq {seq} does not match its Merkle leaf, and the spine around that leaf is "
            "intact: the record was changed after it was written (a torn write cannot do this)"
        )
        if not repair or seg is not self._segments[-1] or offset is None:
            if repair:
                reason += "; it lies in a sealed segment, which is never rewritten"
            raise CorruptionError(seg.path, offset, reason, seq=seq)
        data = self._read_file(seg.path)
        self._quarantine(seg, data, offset, reason)
        self._fill_from_scan(seg, data[:offset], fmt.scan_frames(data[:offset], find_resync=False))
        spine_path = os.path.join(self.root, "merkle.spine")
        target = self._save_to_quarantine(spine_path, self._read_file(spine_path), _spine_bytes(seq))
        self.repairs.append(
            f"moved the Merkle spine hashes of seq {seq} on (the original records) to {target}"
        )

    def _leaves_between(self, start: int, end: int) -> list[bytes]:
        """Leaf hashes of records [start, end), read from the segments."""
        out: list[bytes] = []
        if start >= end:
            return out
        for rec in self._iter_records(start, end):
            out.append(rec[1])
        if len(out) != end - start:
            raise CorruptionError(
                self._log_dir,
                None,
                f"records {start}..{end - 1} are needed to repair the spine "
                f"but only {len(out)} could be read",
            )
        return out

    def _check_complete(self, size: int) -> None:
        """Raises unless the segments hold records up to ``size`` without a gap.

        From the first surviving segment on (one retention removed is ``verify``'s to judge):
        each segment starts where the one before ends, and the last reaches ``size``.

        Raises:
            CorruptionError: a segment is missing or unreadable, or the log ends below ``size``.
        """
        views = [v for v in self._segment_views() if v.base_index >= 0]
        if not views:
            if size:
                raise CorruptionError(
                    self._log_dir,
                    None,
                    f"no readable segment, but the Merkle tree holds {size} records: the segments were "
                    "deleted or damaged",
                    seq=0,
                )
            return
        for here, after in pairwise(views):
            if here.end != after.base_index:
                raise CorruptionError(
                    after.path,
                    None,
                    f"the log skips seq {here.end}..{after.base_index - 1}: a segment was deleted or damaged",
                    seq=here.end,
                )
        if views[-1].end < size:
            raise CorruptionError(
                views[-1].path,
                None,
                f"the Merkle tree holds {size} records but the log ends at seq {views[-1].end}: "
                "records were lost (a power loss) or removed after they were hashed",
                seq=views[-1].end,
            )

    def _check_tail(self, start: int) -> None:
        """Read-verifies records ``[start, tree_size)``: each is in the segments and hashes to its leaf.

        What the writer's recovery checks after the last checkpoint, for a reader about to
        vouch for this tree without opening the store for writing (a set checkpoint): the
        spine must not state a record the segments no longer hold, or one that changed.

        Raises:
            CorruptionError: the first record missing, or changed after it was hashed.
        """
        spine = self._require_spine()
        end = spine.size
        if start >= end:
            return
        stored = spine.leaves(start, end)
        seq = start
        for found, leaf, _payload, seg, pos in self._iter_records(start, end):
            if found != seq:
                break  # a gap: seq is missing
            if leaf != stored[seq - start]:
                raise CorruptionError(
                    seg.path,
                    pos,
                    "the record does not match its Merkle leaf: it was changed after it was hashed",
                    seq=seq,
                )
            seq += 1
        if seq < end:
            raise CorruptionError(
                self._log_dir,
                None,
                f"the Merkle tree holds {end} records but the segments lack seq {seq}..{end - 1}: "
                "records were lost (a power loss) or removed after they were hashed",
                seq=seq,
            )

    def _create_segment(self, number: int, base_index: int) -> None:
        path = os.path.join(self._log_dir, fmt.segment_name(number))
        fd = self._io.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL)
        try:
            self._io.pwrite(fd, fmt.encode_segment_header(base_index), 0)
            self._fsync(fd)
            self._fsync_dir(self._log_dir)
        except BaseException:
            self._io.close(fd)
            raise
        self._segments.append(_Segment(number=number, path=path, base_index=base_index))
        self._active_fd = fd

    # --------------------------------------------------------------- checkpoints

    def _load_checkpoints(self, *, writable: bool) -> list[tuple[int, Checkpoint | None, str]]:
        path = os.path.join(self.root, "checkpoints.jsonl")
        try:
            data = self._read_file(path)
        except FileNotFoundError:
            data = b""
        lines, torn_at = parse_checkpoint_lines(data)
        valid = [cp for _, cp, _ in lines if cp is not None]
        self._last_checkpoint = valid[-1] if valid else None
        self._checkpoints_len = torn_at
        if writable:
            fd = self._io.open(path, os.O_RDWR | os.O_CREAT)
            self._checkpoints_fd = fd
            if torn_at < len(data):
                # An append torn by a crash: it never became a checkpoint.
                self.repairs.append(f"dropped a torn last line of {path}")
                self._io.truncate(fd, torn_at)
                self._fsync(fd)
            if not data:
                self._fsync_dir(self.root)
        return lines

    def checkpoint(self) -> Checkpoint:
        """Makes everything durable and appends a checkpoint of the current tree.

        Returns:
            The new checkpoint.

        Raises:
            StoreClosedError: the store is closed or is a reader.
        """
        self._check_writable()
        return self._write_checkpoint()

    def _write_checkpoint(self) -> Checkpoint:
        assert self._spine is not None and self._signer is not None and self._checkpoints_fd is not None
        self._sync_data()
        prev = self._last_checkpoint.digest() if self._last_checkpoint else ZERO_DIGEST
        size = self._spine.size
        unsigned = Checkpoint(
            tree_size=size,
            root=self._spine.root(size),
            created_at=_now_us(),
            segment_seq=self._segments[-1].number,
            prev=prev,
            key_id=self._signer.key_id,
            sig="",
        )
        cp = dataclasses.replace(unsigned, sig=self._signer.sign(unsigned.message()))
        line = (cp.to_json() + "\n").encode()
        try:
            self._io.pwrite(self._checkpoints_fd, line, self._checkpoints_len)
        except OSError:
            try:
                self._io.truncate(self._checkpoints_fd, self._checkpoints_len)
            except OSError:
                pass
            raise
        self._fsync(self._checkpoints_fd)
        self._checkpoints_len += len(line)
        self._last_checkpoint = cp
        return cp

    @property
    def last_checkpoint(self) -> Checkpoint | None:
        """The newest valid checkpoint, or ``None``."""
        return self._last_checkpoint

    # ------------------------------------------------------------------ appends

    def _check_writable(self) -> None:
        if self._foreign:
            raise StoreClosedError(
                f"store {self.root!r} belongs to the parent process; a forked child never writes it"
            )
        if self._closed:
            raise StoreClosedError(f"store {self.root!r} is closed")
        if not self._writable:
            raise StoreClosedError(f"store {self.root!r} was opened with open_reader(); it cannot write")
        if self._broken is not None:
            raise StoreBrokenError(
                f"store {self.root!r} is broken after a failed fsync ({self._broken}); "
                "close it and open it again to recover"
            ) from self._broken

    def append(self, event: Mapping[str, Any]) -> Receipt:
        """Appends one record.

        The mapping is normalised (see ``_encode.py``: never fails on content) and
        stored with ``seq`` and ``ts`` (the mapping's integer ``ts`` in µs if it has
        one, else now).

        Args:
            event: the record.

        Returns:
            Its :class:`Receipt`.

        Raises:
            TypeError: ``event`` is not a mapping.
            PayloadTooLargeError: the encoded record is over 16 MiB (nothing is written).
            OSError: the write failed; the segment is cut back, the store stays usable.
            StoreBrokenError: an fsync failed; reopen the store.
        """
        return self.append_batch((event,))[0]

    def append_batch(self, events: Iterable[Mapping[str, Any]]) -> list[Receipt]:
        """Appends several records with one write per segment touched.

        Every event is validated and encoded before anything is written, so a
        non-mapping or an oversized record refuses the whole batch. If a write fails
        after a rollover, the exception carries ``quipu_written``: how many of the
        batch's events (a prefix) were stored before the failure.

        Args:
            events: the records.

        Returns:
            One :class:`Receipt` per event, in order.

        Raises:
            TypeError: an event is not a mapping.
            PayloadTooLargeError: an encoded record is over 16 MiB.
            OSError: a write failed.
            StoreBrokenError: an fsync failed; reopen the store.
        """
        self._check_writable()
        batch = list(events)
        for event in batch:
            if type(event) is not dict and not isinstance(event, Mapping):
                raise TypeError(
                    f"an audit record must be a mapping (a dict of fields), got {type(event).__name__}"
                )
        now = _now_us()
        seq = self._next_seq
        payloads: list[bytes] = []
        stamps: list[int] = []
        add_payload, add_stamp = payloads.append, stamps.append
        for event in batch:
            payload, ts = encode_event(event, seq=seq, now_us=now)
            if len(payload) > fmt.MAX_PAYLOAD:
                raise PayloadTooLargeError(len(payload), fmt.MAX_PAYLOAD)
            add_payload(payload)
            add_stamp(ts)
            seq += 1
        return self._write(payloads, stamps)

    def record_gap(self, count: int, reason: str, **details: Any) -> Receipt:
        """Appends a ``{"$sys": "gap", ...}`` record: ``count`` events went elsewhere.

        The pipeline calls this when events were diverted to a fallback, so the trail
        itself shows the hole. User events can never produce a ``$sys`` record.

        Args:
            count: how many events were diverted.
            reason: why, in words.
            **details: more JSON-ready fields (``first_seq``, ``last_seq``, counters).

        Returns:
            The gap record's receipt.
        """
        return self._append_system("gap", {**details, "count": count, "reason": reason})

    # -- added for the pipeline's DLQ redrive (issue 4); self-contained, uses only _write --

    def append_normalised(self, records: Iterable[Mapping[str, Any]]) -> list[Receipt]:
        """Re-appends records this library normalised before, such as events parked in a DLQ.

        Each record is a payload that :func:`encode_event` produced earlier, decoded
        from JSON: it keeps every field as it is, its ``ts`` included, and gets a new
        ``seq``. Nothing is normalised again (that would escape its ``$`` markers a
        second time), so values must be plain JSON values.

        Args:
            records: the decoded payloads.

        Returns:
            One :class:`Receipt` per record, in order.

        Raises:
            ValueError: a record is not a JSON object with an integer ``ts``, or is a
                ``$sys`` record (those are written by the store alone); nothing is written.
            PayloadTooLargeError: a record is over 16 MiB; nothing is written.
            OSError: a write failed (``quipu_written`` says how many were stored).
            StoreBrokenError: an fsync failed; reopen the store.
        """
        self._check_writable()
        seq = self._next_seq
        payloads: list[bytes] = []
        stamps: list[int] = []
        for record in records:
            if not isinstance(record, dict):
                raise ValueError(f"a normalised record must be a dict, got {type(record).__name__}")
            ts = record.get("ts")
            if type(ts) is not int or not 0 <= ts < 1 << 63:
                raise ValueError(f"a normalised record needs an integer ts in microseconds, got {ts!r}")
            if "$sys" in record:
                raise ValueError("a $sys record cannot be re-appended: only the store writes those")
            body = dict(record)
            body["seq"] = seq
            try:
                payload = orjson.dumps(body, option=orjson.OPT_SORT_KEYS)
            except TypeError as e:
                raise ValueError(f"a normalised record holds a value JSON cannot carry: {e}") from e
            if len(payload) > fmt.MAX_PAYLOAD:
                raise PayloadTooLargeError(len(payload), fmt.MAX_PAYLOAD)
            payloads.append(payload)
            stamps.append(ts)
            seq += 1
        if not payloads:
            return []
        return self._write(payloads, stamps)

    def _append_system(self, kind: str, fields: Mapping[str, Any]) -> Receipt:
        """Appends a ``$sys`` record (retention, gap); only the store writes those."""
        self._check_writable()
        now = _now_us()
        payload = encode_system(kind, fields, seq=self._next_seq, ts=now)
        receipts = self._write([payload], [now])
        return receipts[0]

    def _write(self, payloads: list[bytes], stamps: list[int]) -> list[Receipt]:
        assert self._spine is not None
        limit = self.config.segment_limit
        receipts: list[Receipt] = []
        frame_header = fmt._FRAME.pack
        crc32 = fmt._crc32
        header_size = fmt.FRAME_HEADER
        n = len(payloads)
        i = 0
        try:
            while i < n:
                active = self._segments[-1]
                room = limit - active.length
                rest = payloads[i:] if i else payloads
                sizes = [header_size + len(p) for p in rest]
                if sum(sizes) <= room or (not active.count and len(rest) == 1):
                    j = n  # the common case: the whole batch fits in the active segment
                else:
                    used = 0
                    j = i
                    for need in sizes:
                        if used + need > room and (active.count or j > i):
                            break
                        used += need
                        j += 1
                if j == i:
                    self._roll()
                    continue
                part = rest[: j - i]
                data = b"".join([b for p in part for b in (frame_header(len(p), crc32(p)), p)])
                leaves = [_sha256(_LEAF + p).digest() for p in part]
                first = active.end
                self._write_chunk(active, data, leaves, stamps[i:j], sizes[: j - i])
                receipts.extend(map(Receipt, range(first, first + (j - i)), leaves, stamps[i:j]))
                i = j
        except OSError as e:
            e.quipu_written = len(receipts)  # type: ignore[attr-defined]
            raise
        self._after_append(n)
        return receipts

    def _write_chunk(
        self, active: _Segment, data: bytes, leaves: list[bytes], stamps: list[int], sizes: list[int]
    ) -> None:
        assert self._spine is not None and self._active_fd is not None
        start = active.length
        spine_size = self._spine.size
        try:
            self._io.pwrite(self._active_fd, data, start)
            self._spine.append_many(leaves)
            self._spine.flush()  # readers see the new leaves (tree_size, proofs) at once
        except OSError:
            # Never leave a half-written frame where later good ones would follow it.
            try:
                self._io.truncate(self._active_fd, start)
                if self._spine.size != spine_size:
                    self._spine.truncate(spine_size)
            except OSError as cleanup:
                self._broken = cleanup
            raise
        active.note_batch(start, stamps, sizes)
        self._next_seq = active.end

    def _after_append(self, n: int) -> None:
        self._unsynced += n
        if self._oldest_unsynced is None:
            self._oldest_unsynced = self._clock()
        policy = self._policy
        if policy.mode == "always":
            self._sync_data(full=False)
        elif policy.mode == "every":
            if self._unsynced >= policy.n:
                self._sync_data(full=False)
        elif policy.mode == "group":
            if self._unsynced >= policy.n or self._clock() - self._oldest_unsynced >= policy.ms / 1000.0:
                self._sync_data(full=False)

    def sync_due(self) -> float | None:
        """Seconds until the sync policy's time bound falls due for pending records.

        The owner of the store (the pipeline's writer thread) waits at most this long
        for new work, then calls :meth:`maybe_sync`, so under ``group:N:MS`` a record
        becomes durable within MS milliseconds even when nothing else arrives.

        Returns:
            ``None`` when nothing is pending or the policy has no time bound (``os``
            never syncs in the background); else the seconds left, 0 when overdue.
        """
        if self._oldest_unsynced is None or self._policy.mode != "group":
            return None
        left = self._policy.ms / 1000.0 - (self._clock() - self._oldest_unsynced)
        return max(0.0, left)

    def maybe_sync(self) -> bool:
        """Syncs if the policy's time bound is due; returns whether it synced."""
        due = self.sync_due()
        if due is not None and due <= 0.0:
            self._check_writable()
            self._sync_data(full=False)
            return True
        return False

    def sync(self) -> None:
        """Makes every appended record durable (segment, then spine), whatever the policy."""
        self._check_writable()
        self._sync_data()

    def _sync_data(self, *, full: bool = True) -> None:
        """Makes the appended records durable: the segment, then (``full``) the spine.

        The sync policy's own syncs are not ``full``: a record is durable once its
        frame is, because recovery re-derives spine leaves after the last checkpoint
        from the segments. The spine is fsynced by ``sync()``, before every
        checkpoint (seal, retention, close), so it is never short below one.
        """
        assert self._spine is not None and self._active_fd is not None
        try:
            self._fsync(self._active_fd)
            if full:
                self._sync_spine()
        except OSError as e:
            # Never retry: after a failed fsync Linux may have dropped the dirty pages.
            self._broken = e
            raise StoreBrokenError(
                f"fsync failed in store {self.root!r} ({e}); the store refuses writes until it is "
                "reopened, which re-reads and re-verifies the tail"
            ) from e
        self._unsynced = 0
        self._oldest_unsynced = None

    def _fsync(self, fd: int) -> None:
        self._io.fsync(fd)
        self.fsyncs += 1

    def _sync_spine(self) -> None:
        assert self._spine is not None
        if self._spine.needs_sync:
            self._spine.sync()
            self.fsyncs += 1
        else:
            self._spine.flush()

    def _fsync_dir(self, path: str) -> None:
        self._io.fsync_dir(path)
        self.fsyncs += 1

    def _roll(self) -> None:
        """Seals the active segment and starts the next one at the next ``seq``."""
        active = self._segments[-1]
        self._sync_data()
        side_path = os.path.join(self._log_dir, fmt.sidecar_name(active.number))
        tmp = side_path + ".tmp"
        fd = self._io.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        try:
            self._io.pwrite(fd, active.sidecar().to_bytes(), 0)
            self._fsync(fd)
        finally:
            self._io.close(fd)
        self._io.rename(tmp, side_path)
        assert self._active_fd is not None
        # close(2) frees the descriptor even when it reports an error, and its number may at
        # once belong to another file: forget it first, so no later pwrite can land there.
        fd, self._active_fd = self._active_fd, None
        try:
            self._io.close(fd)
        except OSError as e:
            # A deferred write error surfaced at close: like a failed fsync, never trust the
            # state; the owner reopens, and recovery re-reads and re-verifies the tail.
            self._broken = e
            raise StoreBrokenError(
                f"closing the sealed segment of store {self.root!r} failed ({e}); the store refuses "
                "writes until it is reopened, which re-reads and re-verifies the tail"
            ) from e
        active.sealed = True
        self._create_segment(active.number + 1, active.end)
        self._write_checkpoint()

    # ------------------------------------------------------------------ closing

    def close(self) -> None:
        """Syncs, writes a checkpoint, and releases the writer lock. Idempotent.

        A checkpoint is written only when the tree changed since the last one. A
        broken store (failed fsync) only releases its files and lock.
        """
        if self._closed:
            return
        try:
            if self._writable and not self._foreign and self._broken is None and self._spine is not None:
                last = self._last_checkpoint
                if last is None or last.tree_size != self._spine.size:
                    self._write_checkpoint()
                else:
                    self._sync_data()
        finally:
            self._closed = True
            self._release_all()

    def _release_all(self) -> None:
        for fd in (self._active_fd, self._checkpoints_fd):
            if fd is not None:
                try:
                    self._io.close(fd)
                except OSError:
                    pass
        self._active_fd = self._checkpoints_fd = None
        if self._spine is not None:
            self._spine.close()
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _after_fork_in_child(self) -> None:
        """In a forked child: drop the inherited descriptors; never unlock, never write."""
        self._foreign = True
        for fd in (self._active_fd, self._checkpoints_fd):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._active_fd = self._checkpoints_fd = None
        if self._spine is not None:
            self._spine._after_fork_in_child()
        if self._lock is not None:
            self._lock._after_fork_in_child()

    def __enter__(self) -> AuditStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        mode = "writer" if self._writable else "reader"
        state = "closed" if self._closed else f"tree_size={self.tree_size}"
        return f"<AuditStore {mode} {self.root!r} {state}>"

    # ------------------------------------------------------------------- reading

    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        return self._closed

    @property
    def tree_size(self) -> int:
        """The number of leaves of the Merkle tree: every record ever appended."""
        return self._spine.size if self._spine is not None else 0

    def merkle_root(self, size: int | None = None) -> bytes:
        """The Merkle root of the first ``size`` records (default: all)."""
        spine = self._require_spine()
        return spine.root(size)

    def _require_spine(self) -> Spine:
        if self._closed:
            raise StoreClosedError(f"store {self.root!r} is closed")
        assert self._spine is not None
        return self._spine

    def refresh(self) -> None:
        """Re-reads the checkpoints, the spine and the directory so a reader sees newer records."""
        self._refresh()

    def _refresh(self) -> list[tuple[int, Checkpoint | None, str]]:
        """:meth:`refresh`, returning the checkpoint lines read (for ``verify``).

        The writer publishes a record to the segment, then the spine, then (at a
        checkpoint) ``checkpoints.jsonl``; reading in the opposite order gives a
        consistent snapshot: no checkpoint read covers more than the spine read, and
        no spine leaf read lacks its frame.

        Returns:
            The checkpoint lines read (for ``verify``).
        """
        if self._writable:
            return self._reload_lines()
        if self._closed:
            raise StoreClosedError(f"store {self.root!r} is closed")
        lines = self._load_checkpoints(writable=False)
        spine_path = os.path.join(self.root, "merkle.spine")
        try:
            if self._spine is None or self._spine_damage is not None:
                spine = Spine.open(spine_path, self._io, writable=False)
                if self._spine is not None:
                    self._spine.close()
                self._spine = spine
            else:
                self._spine.refresh()
            self._spine_damage = None
        except CorruptionError as e:
            # A reader never fails on content: with the spine's header damaged it reads the
            # segments against an empty tree, and verify() reports the damage.
            if self._spine is not None:
                self._spine.close()
            self._spine = Spine(spine_path, self._io, None, writable=False)
            self._spine_damage = e
        self._segments = self._list_segments() if os.path.isdir(self._log_dir) else []
        return lines

    def _iter_records(
        self, start: int = 0, end: int | None = None
    ) -> Iterator[tuple[int, bytes, bytes, _Segment, int]]:
        """Yields ``(seq, leaf, payload, segment, offset)`` for whole frames, ascending, best effort."""
        segments = list(self._segments)
        bases: list[int] = []
        for seg in segments:
            if seg.base_index < 0:
                try:
                    with open(seg.path, "rb") as f:
                        seg.base_index = fmt.parse_segment_header(f.read(fmt.SEGMENT_HEADER), seg.path)
                except (OSError, CorruptionError):
                    seg.base_index = -1
            bases.append(seg.base_index)
        first = max(0, bisect.bisect_right(bases, start) - 1)
        for seg in segments[first:]:
            if seg.base_index < 0:
                continue
            if end is not None and seg.base_index >= end:
                return
            try:
                data = self._read_file(seg.path)
            except OSError:
                continue
            if len(data) < fmt.SEGMENT_HEADER:
                continue
            scan = fmt.scan_frames(data, find_resync=False)
            seq = seg.base_index
            for pos, length in scan.frames:
                if seq >= start and (end is None or seq < end):
                    payload = data[pos + fmt.FRAME_HEADER : pos + fmt.FRAME_HEADER + length]
                    yield seq, _sha256(_LEAF + payload).digest(), payload, seg, pos
                seq += 1

    def scan(self, start: int | None = None, *, reverse: bool = False) -> Iterator[StoredRecord]:
        """Iterates over stored records in ``seq`` order.

        Reads block by block through the segments' sparse indexes, so starting near
        the end (``tail``) does not read whole segments.

        Args:
            start: the first ``seq`` to yield (default: the oldest, or with
                ``reverse`` the newest).
            reverse: descending ``seq`` order.

        Yields:
            :class:`StoredRecord` objects; damaged frames are skipped (see :meth:`verify`).
        """
        if self._closed:
            raise StoreClosedError(f"store {self.root!r} is closed")
        views = [v for v in self._segment_views() if v.base_index >= 0]
        if not reverse:
            lo = start or 0
            for seg in views:
                if seg.end <= lo:
                    continue
                for seq, payload in self._segment_records(seg, lo, seg.end, reverse=False):
                    yield _record(seq, _sha256(_LEAF + payload).digest(), payload)
            return
        hi = (start + 1) if start is not None else None
        for seg in reversed(views):
            if hi is not None and seg.base_index >= hi:
                continue
            top = seg.end if hi is None else min(hi, seg.end)
            for seq, payload in self._segment_records(seg, seg.base_index, top, reverse=True):
                yield _record(seq, _sha256(_LEAF + payload).digest(), payload)

    # ------------------------------------------------------------------ queries

    def _segment_views(self) -> list[_Segment]:
        """Every segment described (base, count, length, time span, sparse index), oldest first.

        Sealed segments come from their sidecars when those agree with the files
        (length, header, the next segment's base), else from a scan held in memory:
        a sidecar is a cache, never trusted. A reader's active segment is scanned
        incrementally, from where the previous call stopped.
        """
        if self._writable:
            listed = self._segments
        else:
            self.refresh()
            listed = self._segments
        views: list[_Segment] = []
        for k, seg in enumerate(listed):
            last = k == len(listed) - 1
            cached = self._views_cache.get(seg.number)
            try:
                size = os.path.getsize(seg.path)
            except OSError:
                continue
            if self._writable and last:
                views.append(seg)
                continue
            if last:
                views.append(self._scan_active_view(seg.number, seg.path, size, cached))
                continue
            if cached is not None and cached.length == size and cached.sealed:
                views.append(cached)
                continue
            view = _Segment(number=seg.number, path=seg.path, base_index=-1)
            try:
                self._describe_view(view, size)
            except (OSError, CorruptionError):
                continue
            self._views_cache[seg.number] = view
            views.append(view)
        # A sidecar whose count disagrees with the next segment's base is rebuilt by a scan.
        for k in range(len(views) - 1):
            here, after = views[k], views[k + 1]
            if here.end != after.base_index and here.sealed and here.sidecar_used:
                rebuilt = _Segment(number=here.number, path=here.path, base_index=-1)
                try:
                    self._describe_view(rebuilt, os.path.getsize(here.path), trust_sidecar=False)
                except (OSError, CorruptionError):
                    continue
                views[k] = self._views_cache[here.number] = rebuilt
        return views

    def _describe_view(self, view: _Segment, size: int, *, trust_sidecar: bool = True) -> None:
        """Describes a sealed segment from its sidecar when that is plausible, else by a scan.

        A sidecar is never trusted: what it says is checked here as far as the segment's
        header and its own shape allow (base, length, index seqs and offsets, count),
        and then at each use: a block read through its index must hold exactly the
        frames it should (:meth:`_segment_records`), its count must meet the next
        segment's base (:meth:`_segment_views`), and its time span, which only a full
        read can confirm, is confirmed before it lets a query skip the segment
        (:meth:`_checked_span`). Views from a sidecar carry ``sidecar_used``.
        """
        fd = self._io.open(view.path, os.O_RDONLY)
        try:
            header = self._io.pread(fd, fmt.SEGMENT_HEADER, 0)
        finally:
            self._io.close(fd)
        base = fmt.parse_segment_header(header, view.path)
        side = self._sidecar_for(view, size) if trust_sidecar else None
        if side is not None and _sidecar_fits(side, base, size):
            view.base_index, view.count, view.length = base, side.count, side.length
            view.min_ts, view.max_ts, view.index = side.min_ts, side.max_ts, list(side.index)
            view.sealed = view.sidecar_used = True
            return
        scanned = self._scanned_view(view.number, view.path)
        for name in ("base_index", "count", "length", "min_ts", "max_ts", "index"):
            setattr(view, name, getattr(scanned, name))
        view.sealed = True
        view.sidecar_used = False
        self.sidecars_rebuilt += 1

    def _scanned_view(self, number: int, path: str) -> _Segment:
        """A sealed segment described by reading all of it (trusted, unlike a sidecar)."""
        data = self._read_file(path)
        view = _Segment(number=number, path=path, base_index=fmt.parse_segment_header(data, path))
        self._fill_from_scan(view, data, fmt.scan_frames(data, find_resync=False))
        view.sealed = True
        return view

    def _checked_span(self, seg: _Segment) -> _Segment | None:
        """``seg`` with a time span that may be trusted to skip it (``None``: it is gone).

        A span from a sidecar is only a claim: before it lets a query (or retention)
        pass over the segment, the segment is read once and the claim replaced by what
        it holds; the result is kept for the life of this store object.
        """
        if not seg.sidecar_used:
            return seg
        try:
            fresh = self._scanned_view(seg.number, seg.path)
        except (OSError, CorruptionError):
            return None
        self.segments_opened += 1
        if (fresh.count, fresh.min_ts, fresh.max_ts, fresh.index, fresh.length) != (
            seg.count,
            seg.min_ts,
            seg.max_ts,
            seg.index,
            seg.length,
        ):
            self.sidecars_rebuilt += 1
        self._views_cache[seg.number] = fresh
        return fresh

    def _scan_active_view(self, number: int, path: str, size: int, cached: _Segment | None) -> _Segment:
        if cached is None or cached.sealed or size < cached.length:
            cached = _Segment(number=number, path=path, base_index=-1)
        if size <= cached.length and cached.base_index >= 0:
            return cached
        start = cached.length if cached.base_index >= 0 else 0
        fd = self._io.open(path, os.O_RDONLY)
        try:
            data = self._io.pread(fd, size - start, start)
        finally:
            self._io.close(fd)
        if cached.base_index < 0:
            if len(data) < fmt.SEGMENT_HEADER:
                return cached
            try:
                cached.base_index = fmt.parse_segment_header(data, path)
            except CorruptionError:
                return cached
            origin, pos0 = 0, fmt.SEGMENT_HEADER
        else:
            origin, pos0 = start, 0
        scan = fmt.scan_frames(data, pos0, find_resync=False)
        seq = cached.end
        for pos, length in scan.frames:
            payload = data[pos + fmt.FRAME_HEADER : pos + fmt.FRAME_HEADER + length]
            cached.note(seq, origin + pos, _ts_of(payload))
            seq += 1
        cached.count = seq - cached.base_index
        cached.length = origin + scan.end
        self._views_cache[number] = cached
        return cached

    def _blocks_of(self, seg: _Segment, lo: int, hi: int) -> list[tuple[int, int, int]]:
        """``(first seq, start offset, end offset)`` of the sparse-index blocks holding seqs [lo, hi)."""
        index = seg.index
        if not index or lo >= hi:
            return []
        seqs = [s for s, _ in index]
        first = max(0, bisect.bisect_right(seqs, lo) - 1)
        last = max(0, bisect.bisect_right(seqs, hi - 1) - 1)
        out = []
        for k in range(first, last + 1):
            end = index[k + 1][1] if k + 1 < len(index) else seg.length
            out.append((index[k][0], index[k][1], end))
        return out

    def _segment_records(
        self, seg: _Segment, lo: int, hi: int, *, reverse: bool
    ) -> Iterator[tuple[int, bytes]]:
        """``(seq, payload)`` of the whole frames of ``seg`` with ``lo <= seq < hi``, block by block.

        A block found through a sidecar's index must be exactly what the index says:
        whole, CRC-clean frames up to the next entry, as many as the seqs it spans, the
        first carrying the entry's ``seq``. Otherwise the sidecar lied (or the segment
        changed): the segment is rescanned, that description replaces the sidecar's,
        and reading goes on from the first record not yet returned.
        """
        lo, hi = max(lo, seg.base_index), min(hi, seg.end)
        blocks = self._blocks_of(seg, lo, hi)
        if not blocks:
            return
        self.segments_opened += 1
        try:
            fd = self._io.open(seg.path, os.O_RDONLY)
        except OSError:
            return  # removed (by retention) since it was listed
        done: int | None = None  # the last seq returned
        mismatch = False
        try:
            for first_seq, start, end in reversed(blocks) if reverse else blocks:
                data = self._io.pread(fd, end - start, start)
                scan = fmt.scan_frames(data, 0, find_resync=False)
                if seg.sidecar_used and not _block_fits(
                    data, scan, first_seq, min(first_seq + fmt.INDEX_STRIDE, seg.end) - first_seq, end - start
                ):
                    mismatch = True
                    break
                rows = []
                seq = first_seq
                for pos, length in scan.frames:
                    if lo <= seq < hi:
                        rows.append((seq, data[pos + fmt.FRAME_HEADER : pos + fmt.FRAME_HEADER + length]))
                    seq += 1
                for row in reversed(rows) if reverse else rows:
                    yield row
                    done = row[0]
        finally:
            self._io.close(fd)
        if not mismatch:
            return
        try:
            fresh = self._scanned_view(seg.number, seg.path)
        except (OSError, CorruptionError):
            return
        self.sidecars_rebuilt += 1
        self._views_cache[seg.number] = fresh
        if done is not None:
            lo, hi = (lo, done) if reverse else (done + 1, hi)
        yield from self._segment_records(fresh, lo, hi, reverse=reverse)

    def _store_id(self) -> str:
        if self._store_id_cache is None:
            with open(os.path.join(self.root, "FORMAT"), "rb") as f:
                self._store_id_cache = hashlib.sha256(f.read()).hexdigest()[:16]
        return self._store_id_cache

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
        """Returns one page of the records matching every filter given.

        Paging with ``cursor=page.next_cursor`` returns every match exactly once.
        Newest-first pages cover the matches that existed when the first page was
        read; oldest-first pages also reach records appended meanwhile. When
        retention removed the cursor's position, oldest-first resumes at the oldest
        surviving record and newest-first ends, both with ``resumed=True``.
        Segments whose time span misses ``since``/``until`` are not opened.

        Args:
            where: top-level field -> value, type-exact equality (``1`` does not match ``1.0``
                or ``True``); values are str, int, float, bool or None.
            since: inclusive lower bound on ``ts`` (aware ``datetime`` or int µs).
            until: exclusive upper bound on ``ts``.
            min_levelno: ``levelno >= min_levelno``.
            logger_prefix: the ``logger`` field is this name or below it (``"app"`` matches
                ``"app"`` and ``"app.db"``, not ``"apple"``).
            contains: a substring of ``message``.
            newest_first: descending ``seq`` order (default) or ascending.
            limit: the page size, at least 1.
            cursor: ``next_cursor`` of the previous page of the same query.

        Returns:
            A :class:`Page`. ``next_cursor`` is ``None`` when the page ended because the
            matches ran out; a full page always carries one (finding out whether another
            match exists could mean reading the rest of the store), so the page after it
            may be empty.

        Raises:
            QueryError: a bad argument, or a cursor that is garbled, from another store,
                or made for another query.
        """
        if self._closed:
            raise StoreClosedError(f"store {self.root!r} is closed")
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            raise QueryError(f"limit: expected an int >= 1, got {limit!r}")
        flt = QueryFilter.build(
            where=where,
            since=since,
            until=until,
            min_levelno=min_levelno,
            logger_prefix=logger_prefix,
            contains=contains,
        )
        fingerprint = flt.fingerprint()
        store_id = self._store_id()
        views = [v for v in self._segment_views() if v.base_index >= 0]
        previous = (
            Cursor.decode(cursor, store_id=store_id, newest_first=newest_first, fingerprint=fingerprint)
            if cursor is not None
            else None
        )
        if not views:
            return Page([], None, resumed=previous is not None)
        oldest, end = views[0].base_index, views[-1].end
        resumed = False
        out: list[StoredRecord] = []
        if newest_first:
            high = previous.high if previous else end
            upper = previous.last_seq if previous else end
            if previous is not None and previous.last_seq < oldest:
                return Page([], None, resumed=True)
            for view in reversed(views):
                if view.base_index >= upper or view.count == 0:
                    continue
                seg = self._span_overlaps(view, flt)
                if seg is None:
                    continue
                for seq, payload in self._segment_records(seg, seg.base_index, upper, reverse=True):
                    rec = self._match(seq, payload, flt)
                    if rec is not None:
                        out.append(rec)
                        if len(out) == limit:
                            return Page(out, Cursor(store_id, True, seq, high, fingerprint).encode(), resumed)
            return Page(out, None, resumed)
        lower = previous.last_seq + 1 if previous else oldest
        if previous is not None and previous.last_seq < oldest:
            # The cursor's own record is gone: retention removed it (and maybe more).
            lower, resumed = oldest, True
        for view in views:
            if view.end <= lower or view.count == 0:
                continue
            seg = self._span_overlaps(view, flt)
            if seg is None:
                continue
            for seq, payload in self._segment_records(seg, lower, seg.end, reverse=False):
                rec = self._match(seq, payload, flt)
                if rec is not None:
                    out.append(rec)
                    if len(out) == limit:
                        return Page(out, Cursor(store_id, False, seq, 0, fingerprint).encode(), resumed)
        return Page(out, None, resumed)

    def _span_overlaps(self, view: _Segment, flt: QueryFilter) -> _Segment | None:
        """``view`` if its time span may hold a match of ``flt``, else ``None`` (skip it).

        Only a checked span can skip a segment (see :meth:`_checked_span`).
        """
        if not flt.misses_time_span(view.min_ts, view.max_ts):
            return view
        seg = self._checked_span(view)
        if seg is None or flt.misses_time_span(seg.min_ts, seg.max_ts):
            return None
        return seg

    @staticmethod
    def _match(seq: int, payload: bytes, flt: QueryFilter) -> StoredRecord | None:
        try:
            obj = _loads(payload)
        except orjson.JSONDecodeError:
            return None
        if not isinstance(obj, dict) or not flt.matches(obj):
            return None
        ts = obj.get("ts")
        return StoredRecord(
            seq=seq,
            ts=ts if isinstance(ts, int) and not isinstance(ts, bool) else 0,
            leaf_hash=_sha256(_LEAF + payload).digest(),
            raw=payload,
            payload=obj,
        )

    def stats(self) -> dict[str, Any]:
        """A summary: stored records, segments, bytes, time span, tree size, root, last checkpoint.

        Returns:
            A JSON-ready dict (``root`` in hex, ``last_checkpoint`` as its dict or ``None``).
        """
        if self._closed:
            raise StoreClosedError(f"store {self.root!r} is closed")
        views = [v for v in self._segment_views() if v.base_index >= 0]
        firsts = [v.min_ts for v in views if v.min_ts is not None]
        lasts = [v.max_ts for v in views if v.max_ts is not None]
        spine = self._require_spine()
        records = sum(v.count for v in views)
        first_seq = views[0].base_index if views else 0
        return {
            "root_dir": self.root,
            "records": records,
            "first_seq": first_seq,
            # Records the tree holds that no segment gave back whole (damage, or deleted files);
            # beside a live writer a snapshot can see the spine ahead of the segments too.
            "unreadable": max(0, spine.size - (first_seq + records)) if records or spine.size else 0,
            "segments": len(views),
            "bytes": sum(_file_size(v.path, v.length) for v in views),
            "first_ts": min(firsts) if firsts else None,
            "last_ts": max(lasts) if lasts else None,
            "tree_size": spine.size,
            "root": spine.root().hex(),
            "last_checkpoint": self._last_checkpoint.to_dict() if self._last_checkpoint else None,
        }

    # ---------------------------------------------------------------- retention

    def apply_retention(self, policy: RetentionPolicy | None = None) -> int:
        """Deletes whole sealed segments, oldest first, that the policy no longer keeps.

        A segment goes when its largest ``ts`` is older than ``max_age``, OR while the
        segments' total size is over ``max_bytes``; deletion is always a prefix and
        never touches the active segment or the Merkle spine. Before unlinking, the
        store appends ``{"$sys": "retention", "removed_below": k}`` and writes a
        checkpoint, so ``verify`` accepts exactly the missing records ``seq < k``.

        Args:
            policy: the policy to apply (default: ``StoreConfig.retention``; none keeps all).

        Returns:
            How many segments were deleted.

        Raises:
            StoreClosedError: the store is closed or a reader.
        """
        self._check_writable()
        policy = policy if policy is not None else self.config.retention
        if policy is None or policy.keeps_everything:
            return 0
        sealed = self._segments[:-1]
        for seg in sealed:
            if seg.base_index < 0 or not seg.sealed:
                self._describe_sealed(seg)
        now = _now_us()
        by_age = 0
        if policy.max_age_us is not None:
            cutoff = now - policy.max_age_us
            while by_age < len(sealed):
                newest = sealed[by_age].max_ts  # None: a sealed segment without records
                if newest is not None and newest >= cutoff:
                    break
                by_age += 1
        by_size = 0
        if policy.max_bytes_int is not None:
            total = sum(seg.length for seg in self._segments)
            while by_size < len(sealed) and total > policy.max_bytes_int:
                total -= sealed[by_size].length
                by_size += 1
        k = max(by_age, by_size)
        if k == 0:
            return 0
        # Sidecars are hints, never evidence: before deleting anything, re-read each doomed
        # segment itself (header, frames, ts) and stop at the first one that is damaged, does
        # not follow its predecessor, or is not really old enough.
        confirmed = 0
        expected = None
        for seg in sealed[:k]:
            truth = _Segment(number=seg.number, path=seg.path, base_index=-1)
            try:
                self._describe_view(truth, os.path.getsize(seg.path), trust_sidecar=False)
            except (OSError, CorruptionError):
                break
            if expected is not None and truth.base_index != expected:
                break
            if confirmed >= by_size and policy.max_age_us is not None:
                newest = truth.max_ts
                if newest is not None and newest >= now - policy.max_age_us:
                    break
            sealed[confirmed] = truth
            expected = truth.end
            confirmed += 1
        if confirmed == 0:
            return 0
        k = confirmed
        nxt = self._segments[k]
        try:
            with open(nxt.path, "rb") as f:
                next_base = fmt.parse_segment_header(f.read(fmt.SEGMENT_HEADER), nxt.path)
        except (OSError, CorruptionError):
            return 0
        if next_base != sealed[k - 1].end:
            return 0  # a gap after the doomed prefix: tampering for verify to report, not to bury
        doomed = sealed[:k]
        removed_below = doomed[-1].end
        self._append_system(
            "retention",
            {
                "removed_below": removed_below,
                "segments": [seg.number for seg in doomed],
                "max_age_us": policy.max_age_us,
                "max_bytes": policy.max_bytes_int,
            },
        )
        self._write_checkpoint()
        for seg in doomed:
            self._io.unlink(seg.path)
            side = os.path.join(self._log_dir, fmt.sidecar_name(seg.number))
            if os.path.exists(side):
                self._io.unlink(side)
            self._views_cache.pop(seg.number, None)
        self._fsync_dir(self._log_dir)
        self._segments = self._segments[k:]
        return k

    # ------------------------------------------------------------------- proofs

    def prove_inclusion(self, seq: int, size: int | None = None) -> InclusionProof:
        """Proves that record ``seq`` is in the tree of ``size`` leaves (default: now).

        Raises:
            ValueError: ``seq`` or ``size`` is out of range.
        """
        spine = self._require_spine()
        n = spine.size if size is None else size
        if not 0 <= n <= spine.size:
            raise ValueError(f"tree size {n} is out of range (the tree has {spine.size} leaves)")
        if not 0 <= seq < n:
            raise ValueError(f"seq {seq} is not in a tree of {n} leaves")
        return InclusionProof(
            seq=seq,
            tree_size=n,
            leaf_hash=spine.leaf(seq),
            path=tuple(spine.inclusion_proof(seq, n)),
            root=spine.root(n),
            checkpoint=self._checkpoint_at(n),
        )

    def _checkpoint_at(self, size: int) -> dict[str, Any] | None:
        """The newest checkpoint stating the root of ``size`` leaves, as a dict, if any."""
        assert self._spine is not None
        lines = self._reload_lines()
        root = self._spine.root(size)
        for _, cp, _ in reversed(lines):
            if cp is not None and cp.tree_size == size and cp.root == root:
                return cp.to_dict()
        return None

    def prove_consistency(self, old_size: int, new_size: int | None = None) -> ConsistencyProof:
        """Proves that the tree of ``new_size`` leaves (default: now) extends the one of ``old_size``.

        Raises:
            ValueError: a size is out of range.
        """
        spine = self._require_spine()
        n = spine.size if new_size is None else new_size
        if not 0 <= n <= spine.size:
            raise ValueError(f"tree size {n} is out of range (the tree has {spine.size} leaves)")
        if not 0 <= old_size <= n:
            raise ValueError(f"old size {old_size} is not between 0 and {n}")
        return ConsistencyProof(
            old_size=old_size,
            new_size=n,
            old_root=spine.root(old_size),
            new_root=spine.root(n),
            path=tuple(spine.consistency_proof(old_size, n)),
            checkpoint=self._checkpoint_at(n),
        )

    # ------------------------------------------------------------------- verify

    def verify(
        self,
        *,
        public_keys: Iterable[Any] = (),
        anchor: Any = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> VerifyReport:
        """Checks the whole store and reports every problem found; never raises on content.

        It re-hashes every stored record against the Merkle spine, checks ``seq``
        continuity and each record's own ``seq``, the spine's internal hashes, the
        checkpoint chain (signatures with ``public_keys``), that each checkpoint's
        root is the spine's root at its size, and, given an ``anchor`` (a checkpoint
        saved elsewhere), that the current tree extends it.

        Whole frames beyond the spine are not problems in two cases, both counted in
        ``pending``: a live writer's in-flight records after the last checkpoint, and,
        when no writer holds the store, a crash tail: frames that follow the spine
        without a gap at the end of the active segment, after the last checkpoint, which
        the next writer open hashes in (a warning says so). Anything else beyond the
        spine is reported.

        Args:
            public_keys: Ed25519 public keys (PEM bytes/str, paths, key objects); with
                keys given, every checkpoint must be signed by one of them.
            anchor: a :class:`Checkpoint`, its dict or JSON line, or a path to a file
                holding one.
            progress: called as ``progress(records_checked, tree_size)`` after each segment
                (the CLI draws its progress bar with it).

        Returns:
            A :class:`VerifyReport` (truthy when intact).
        """
        if self._closed:
            raise StoreClosedError(f"store {self.root!r} is closed")
        keys = load_public_keys(public_keys)
        problems: list[Problem] = []
        if self._writable:
            assert self._spine is not None
            self._spine.flush()
            live = True
        else:
            live = is_locked(self.root)
            lines = self._refresh()
        spine = self._spine
        assert spine is not None
        spine_path = os.path.join(self.root, "merkle.spine")
        tree = spine.size
        bad = spine.check(tree)
        if bad is not None:
            problems.append(Problem(spine_path, bad[0], None, bad[1]))
        if self._spine_damage is not None:
            problems.append(Problem(spine_path, self._spine_damage.offset, None, self._spine_damage.reason))
        if self._writable:
            lines = self._reload_lines()
        last_cp_size = self._last_checkpoint.tree_size if self._last_checkpoint else 0
        expected: int | None = None
        checked = 0
        pending = 0
        segments = self._list_segments()
        orphans = 0  # records beyond the spine that are not a live writer's pending ones
        unpublished: list[tuple[str, int, int]] = []  # (file, offset, seq) of frames beyond the spine
        first_base, first_path = 0, self._log_dir
        retention_floor = 0  # removed_below of the newest retention record a checkpoint covers
        retention_seen: list[tuple[int, int]] = []  # (seq, removed_below) of retention records read
        unreadable_from: tuple[str, int] | None = None  # damage that ends the last segment early
        pruned = False  # the segment before was removed by retention while this verify ran
        first_read = True
        last_read: tuple[_Segment, int, bool] | None = None  # the last segment read: (it, base, damaged)
        for number, seg in enumerate(segments):
            is_last = number == len(segments) - 1
            if number and not pruned and seg.number != segments[number - 1].number + 1:
                # Segment numbers are consecutive (retention only removes a prefix): name the hole.
                first, last = segments[number - 1].number + 1, seg.number - 1
                which = fmt.segment_name(first) + ("" if first == last else f"..{fmt.segment_name(last)}")
                problems.append(
                    Problem(
                        os.path.join(self._log_dir, fmt.segment_name(first)),
                        None,
                        expected,
                        f"segment file {which} is missing (deleted)",
                    )
                )
            try:
                data = self._read_file(seg.path)
            except FileNotFoundError as e:
                if not is_last and not any(os.path.exists(s.path) for s in segments[:number]):
                    # Gone since the listing, and so is every segment before it: retention removed
                    # a prefix (after writing its record and checkpoint) while this verify ran.
                    # The retention floor check below still applies to what is left.
                    pruned = True
                    expected = None
                    continue
                problems.append(Problem(seg.path, None, None, f"unreadable segment: {e}"))
                expected = None
                first_read = pruned = False
                continue
            except OSError as e:
                problems.append(Problem(seg.path, None, None, f"unreadable segment: {e}"))
                expected = None
                first_read = pruned = False
                continue
            is_first, first_read, pruned = first_read, False, False
            if is_last and len(data) < fmt.SEGMENT_HEADER and (expected is None or expected >= tree):
                continue  # a torn header right after rollover: nothing was stored in it
            try:
                base = fmt.parse_segment_header(data, seg.path)
            except CorruptionError as e:
                problems.append(Problem(seg.path, e.offset, None, e.reason))
                expected = None
                continue
            if is_first:
                first_base, first_path = base, seg.path
            elif expected is not None and base != expected:
                if base > expected:
                    reason = f"records {expected}..{base - 1} are missing (a segment was deleted or cut)"
                else:
                    reason = f"segment starts at seq {base}, overlapping records up to {expected - 1}"
                problems.append(Problem(seg.path, 0, expected, reason))
            scan = fmt.scan_frames(data)
            frames = scan.frames
            if is_last:
                last_read = (seg, base, scan.resync_offset is not None)
            hdr = fmt.FRAME_HEADER
            view = memoryview(data)
            payloads = [view[pos + hdr : pos + hdr + length] for pos, length in frames]
            published = max(0, min(len(frames), tree - base))
            stored = spine.leaves(min(base, tree), base + published) if published else []
            leaves = [_sha256(_LEAF + p).digest() for p in payloads[:published]]
            if leaves != stored:
                for k in range(published):
                    if leaves[k] != stored[k]:
                        problems.append(
                            Problem(
                                seg.path,
                                frames[k][0],
                                base + k,
                                "record does not match its Merkle leaf: it was modified after being written",
                            )
                        )
            unpublished.extend((seg.path, frames[k][0], base + k) for k in range(published, len(frames)))
            seq = base
            for k, payload in enumerate(payloads):
                start = frames[k][0] + hdr
                end = start + frames[k][1]
                # Fast path: the store always writes one top-level "seq"; when the text '"seq":'
                # occurs exactly once (it cannot occur inside a JSON string, where quotes are
                # escaped) and no '"$sys"' key is present, that occurrence is the record's seq.
                obj = None
                if data.count(b'"seq":', start, end) == 1 and data.find(b'"$sys"', start, end) == -1:
                    m = _SEQ_VALUE.match(data, data.find(b'"seq":', start, end) + 6, end)
                    got: Any = int(m.group()) if m is not None else "unparseable"
                else:
                    try:
                        obj = _loads(payload)
                        got = obj.get("seq") if type(obj) is dict else None
                    except orjson.JSONDecodeError:
                        obj, got = None, "unparseable"
                if type(got) is not int or got != seq:
                    problems.append(
                        Problem(
                            seg.path, frames[k][0], seq, f"record at position seq {seq} carries seq {got!r}"
                        )
                    )
                if type(obj) is dict and "$sys" in obj and obj["$sys"] == "retention":
                    # Only the store writes "$sys" (user keys are escaped to "$$sys").
                    below = obj.get("removed_below")
                    if type(below) is int:
                        retention_seen.append((seq, below))
                seq += 1
            checked += len(frames)
            del payloads, view
            if progress is not None:
                progress(checked, tree)
            if scan.stop_reason is not None:
                # A torn tail of the last segment holding no published record is a crash
                # artefact that the next writer open cuts away; anything else is damage.
                if scan.resync_offset is not None or not is_last or seq < tree:
                    problems.append(Problem(seg.path, scan.end, seq, scan.stop_reason))
                    unreadable_from = (seg.path, scan.end) if is_last else None
            expected = seq
        # A writer that opened after the snapshot may have appended since: its frames are in flight too.
        live = live or is_locked(self.root)
        warnings: list[str] = []
        if not live and unpublished:
            floor = max([last_cp_size] + [cp.tree_size for _, cp, _ in lines if cp is not None])
            if self._is_crash_tail(unpublished, last_read, tree, floor):
                pending = len(unpublished)
                warnings.append(_crash_tail_warning(tree, pending))
                unpublished = []
        for path, offset, seq in unpublished:
            if live and seq >= last_cp_size:
                pending += 1
            else:
                orphans += 1
                problems.append(
                    Problem(path, offset, seq, "record has no leaf in the Merkle spine (spine truncated?)")
                )
        if retention_seen:
            # Retention writes its record, then a checkpoint, then deletes: a retention record no
            # checkpoint covers (say one appended by hand) excuses nothing. The checkpoints are
            # read again here, after the segments: a live writer's retention that deleted a
            # segment this verify missed has written its checkpoint by then.
            covered = max(
                [cp.tree_size for _, cp, _ in lines if cp is not None] + [self._newest_checkpoint_size()]
            )
            for at, below in retention_seen:
                if at < covered:
                    retention_floor = below
        if first_base > retention_floor:
            allowed = f"; retention removed only seq < {retention_floor}" if retention_floor else ""
            problems.append(
                Problem(
                    first_path,
                    0,
                    retention_floor,
                    f"records {retention_floor}..{first_base - 1} are missing: the log starts at seq "
                    f"{first_base}{allowed} (segments deleted by hand)",
                )
            )
        if expected is not None and expected < tree and unreadable_from is not None:
            problems.append(
                Problem(
                    unreadable_from[0],
                    unreadable_from[1],
                    expected,
                    f"records {expected}..{tree - 1} of the Merkle spine cannot be read: the segment is "
                    f"damaged at offset {unreadable_from[1]} (see the problem above)",
                )
            )
        elif expected is not None and expected < tree:
            problems.append(
                Problem(
                    spine_path,
                    None,
                    expected,
                    f"the Merkle spine has {tree} records but the log ends at seq {expected}: "
                    "records were removed from the end",
                )
            )
        if not segments and tree:
            problems.append(
                Problem(
                    self._log_dir,
                    None,
                    0,
                    f"no segment files, but the Merkle spine holds {tree} records: segments were deleted",
                )
            )
        if orphans:
            problems.append(
                Problem(
                    spine_path,
                    _spine_bytes(tree),
                    tree,
                    f"the Merkle spine ends at {tree} records but the segments hold {orphans} more: "
                    "the spine was truncated",
                )
            )
        newest = next((cp for _, cp, _ in reversed(lines) if cp is not None), None)
        top = segments[-1].number if segments else -1
        if newest is not None and newest.segment_seq > top:
            # A checkpoint names the segment active when it was written; that one is never removed.
            ends_with = fmt.segment_name(top) if top >= 0 else "no segment"
            problems.append(
                Problem(
                    os.path.join(self._log_dir, fmt.segment_name(top + 1)),
                    None,
                    None,
                    f"the newest checkpoint was written while segment {fmt.segment_name(newest.segment_seq)} "
                    f"was active, but the log ends with {ends_with}: segments were deleted from the end",
                )
            )
        self._verify_checkpoints(lines, keys, tree, problems)
        if anchor is not None:
            self._verify_anchor(anchor, keys, tree, problems)
        problems = _dedupe(problems)
        warnings += signing_warnings(
            ((f"checkpoint at offset {offset}", cp.signed) for offset, cp, _ in lines if cp is not None),
            bool(keys),
        )
        return VerifyReport(
            ok=not problems,
            tree_size=tree,
            root=spine.root(tree),
            problems=problems,
            pending=pending,
            records_checked=checked - pending,  # pending records have no leaf to check against
            warnings=warnings,
        )

    def _is_crash_tail(
        self,
        unpublished: list[tuple[str, int, int]],
        last_read: tuple[_Segment, int, bool] | None,
        tree: int,
        floor: int,
    ) -> bool:
        """Whether the frames beyond the spine of a store no writer holds are a crash's unhashed tail.

        The writer writes a batch's frames, then their spine leaves; killed in between, it
        leaves whole frames that follow the spine in the active segment, after the last
        checkpoint (``floor``), and the next open hashes them in (``_reconcile_spine``).
        Only exactly that shape qualifies: every such frame in the newest segment, the
        first at seq ``tree`` (no gap), the spine not short of any checkpoint, no damage
        in that segment after them, and no sidecar for it (a rollover syncs the spine
        before it seals a segment, so a sealed segment's frames are always hashed).
        """
        if last_read is None or tree < floor:
            return False
        seg, base, damaged = last_read
        if damaged or base > tree or unpublished[0][2] != tree:
            return False
        if any(path != seg.path for path, _, _ in unpublished):
            return False
        return not os.path.exists(os.path.join(self._log_dir, fmt.sidecar_name(seg.number)))

    def _newest_checkpoint_size(self) -> int:
        """The largest tree size ``checkpoints.jsonl`` states now (0 when there is none)."""
        try:
            data = self._read_file(os.path.join(self.root, "checkpoints.jsonl"))
        except OSError:
            return 0
        lines, _ = parse_checkpoint_lines(data)
        return max((cp.tree_size for _, cp, _ in lines if cp is not None), default=0)

    def _reload_lines(self) -> list[tuple[int, Checkpoint | None, str]]:
        path = os.path.join(self.root, "checkpoints.jsonl")
        try:
            data = self._read_file(path)
        except FileNotFoundError:
            return []
        return parse_checkpoint_lines(data)[0]

    def _verify_checkpoints(
        self,
        lines: list[tuple[int, Checkpoint | None, str]],
        keys: Mapping[str, Any],
        tree: int,
        problems: list[Problem],
    ) -> None:
        assert self._spine is not None
        path = os.path.join(self.root, "checkpoints.jsonl")
        prev_digest = ZERO_DIGEST
        prev_size = 0
        for offset, cp, error in lines:
            if cp is None:
                problems.append(Problem(path, offset, None, f"unreadable checkpoint line: {error}"))
                continue
            if cp.prev != prev_digest:
                problems.append(
                    Problem(
                        path,
                        offset,
                        None,
                        "checkpoint chain is broken: its 'prev' is not the digest of the line before "
                        "(a checkpoint was removed, reordered or edited)",
                    )
                )
            why = check_signature(cp, keys)
            if why is not None:
                problems.append(Problem(path, offset, None, why))
            if cp.tree_size < prev_size:
                problems.append(
                    Problem(path, offset, None, f"tree size went back from {prev_size} to {cp.tree_size}")
                )
            if cp.tree_size > tree:
                problems.append(
                    Problem(
                        path,
                        offset,
                        None,
                        f"checkpoint covers {cp.tree_size} records but the tree has only {tree}: "
                        "records were removed",
                    )
                )
            elif self._spine.root(cp.tree_size) != cp.root:
                problems.append(
                    Problem(
                        path,
                        offset,
                        None,
                        f"checkpoint root at tree size {cp.tree_size} does not match the Merkle tree: "
                        "history was rewritten",
                    )
                )
            prev_digest = cp.digest()
            prev_size = cp.tree_size

    def _verify_anchor(
        self, anchor: Any, keys: Mapping[str, Any], tree: int, problems: list[Problem]
    ) -> None:
        assert self._spine is not None
        where = "anchor"
        try:
            cp = Checkpoint.from_json(anchor)
        except (ValueError, OSError) as e:
            problems.append(Problem(where, None, None, f"unreadable anchor: {e}"))
            return
        why = check_signature(cp, keys)
        if why is not None:
            problems.append(Problem(where, None, None, f"anchor: {why}"))
        if cp.tree_size > tree:
            problems.append(
                Problem(
                    where,
                    None,
                    None,
                    f"the anchor covers {cp.tree_size} records but the tree has only {tree}: "
                    "the log was truncated below the anchor",
                )
            )
            return
        proof = self._spine.consistency_proof(cp.tree_size, tree)
        if not merkle.verify_consistency(cp.tree_size, tree, cp.root, self._spine.root(tree), proof):
            problems.append(
                Problem(
                    where,
                    None,
                    None,
                    f"the current tree does not extend the anchor at tree size {cp.tree_size}: "
                    "history was rewritten",
                )
            )


def _crash_tail_warning(tree: int, n: int) -> str:
    """What verify says about ``n`` whole records after the spine's ``tree`` that a crash left unhashed."""
    which = f"1 record (seq {tree}) is" if n == 1 else f"{n} records (seq {tree}..{tree + n - 1}) are"
    them = "it" if n == 1 else "them"
    return (
        f"{which} not in the Merkle tree yet: the writer stopped before hashing {them} (a crash; "
        f"no writer holds the store now); the next open of the store for writing hashes {them} in"
    )


def _sidecar_fits(side: fmt.Sidecar, base: int, size: int) -> bool:
    """Whether a sidecar is self-consistent and fits its segment's header and size (no reads)."""
    stride = fmt.INDEX_STRIDE
    smallest = fmt.FRAME_HEADER + fmt.MIN_PAYLOAD
    count, index = side.count, side.index
    if side.base_index != base or side.length != size or count < 0:
        return False
    if len(index) != (count + stride - 1) // stride:
        return False
    if count == 0:
        return size == fmt.SEGMENT_HEADER
    if side.min_ts is None or side.max_ts is None or side.min_ts > side.max_ts:
        return False
    previous = None
    for k, (seq, offset) in enumerate(index):
        if seq != base + k * stride:
            return False
        if previous is None:
            if offset != fmt.SEGMENT_HEADER:
                return False
        elif offset - previous < stride * smallest:
            return False
        previous = offset
    assert previous is not None
    return size - previous >= (count - (len(index) - 1) * stride) * smallest


def _block_fits(data: bytes, scan: fmt.FrameScan, first_seq: int, count: int, length: int) -> bool:
    """Whether a block read through a sidecar's index is exactly what the index says."""
    if len(data) != length or scan.stop_reason is not None or scan.end != length or len(scan.frames) != count:
        return False
    pos, size = scan.frames[0]
    try:
        obj = _loads(data[pos + fmt.FRAME_HEADER : pos + fmt.FRAME_HEADER + size])
    except orjson.JSONDecodeError:
        return False
    seq = obj.get("seq") if type(obj) is dict else None
    return type(seq) is int and seq == first_seq


def _file_size(path: str, default: int) -> int:
    """The size of a file on disk (damaged bytes included), or ``default`` if it is gone."""
    try:
        return os.path.getsize(path)
    except OSError:
        return default


def _spine_bytes(leaves: int) -> int:
    """The length of a spine file holding exactly ``leaves`` leaves."""
    return SPINE_HEADER_SIZE + merkle.HASH_SIZE * stored_hash_count(leaves)


def _dedupe(problems: list[Problem]) -> list[Problem]:
    seen: set[tuple[str, int | None, int | None, str]] = set()
    out = []
    for p in problems:
        key = (p.file, p.offset, p.seq, p.reason)
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out


def _ts_of(payload: bytes) -> int:
    try:
        obj = _loads(payload)
        ts = obj.get("ts") if isinstance(obj, dict) else None
    except orjson.JSONDecodeError:
        return 0
    return ts if isinstance(ts, int) and not isinstance(ts, bool) else 0


def _record(seq: int, leaf: bytes, payload: bytes) -> StoredRecord:
    try:
        obj = _loads(payload)
    except orjson.JSONDecodeError:
        obj = {}
    if not isinstance(obj, dict):
        obj = {}
    ts = obj.get("ts")
    return StoredRecord(
        seq=seq,
        ts=ts if isinstance(ts, int) and not isinstance(ts, bool) else 0,
        leaf_hash=leaf,
        raw=payload,
        payload=obj,
    )
