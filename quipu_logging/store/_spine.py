"""The Merkle spine: ``ROOT/merkle.spine``, the stored hashes of every complete subtree.

Layout (format version 1)::

    offset 0   b"QSPN"              magic
    offset 4   0x01                 version
    offset 5   0x00 0x00 0x00       reserved, zero
    offset 8   32-byte hashes, in the order they become complete

When leaf ``i`` is appended, its leaf hash is written, then the hash of each
perfect subtree that leaf completes, lowest level first (this is the "stored
hash" layout of the Go checksum database and of transparency logs). So after
``n`` leaves the file holds ``2n - popcount(n)`` hashes (:func:`stored_hash_count`),
leaf ``i`` is stored hash number ``2i - popcount(i)``, and the perfect subtree of
level ``L`` covering leaves ``[k * 2**L, (k + 1) * 2**L)`` is stored right after the
hashes its last leaf completes below it (:func:`stored_hash_index`).

Every range of leaves a root, an inclusion proof or a consistency proof needs
splits into at most ``log2(n) + 1`` perfect subtrees, each one stored hash, so
any of them, for any size up to ``n``, reads O(log n) hashes.

The writer keeps the "frontier" in memory (the hashes of the perfect subtrees
that make up the current size, largest first), so appending reads nothing, and
buffers new hashes until :meth:`Spine.flush` writes them with one ``pwrite``.
A :class:`Spine` is not thread-safe: one owner thread, as for the store.
Readers open their own read-only :class:`Spine`.
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Iterable
from types import TracebackType

from quipu_logging.errors import CorruptionError, StoreClosedError
from quipu_logging.store import merkle
from quipu_logging.store._fileio import FileLayer

__all__ = [
    "HEADER",
    "HEADER_SIZE",
    "MAGIC",
    "VERSION",
    "Spine",
    "leaves_for_hash_count",
    "stored_hash_count",
    "stored_hash_index",
]

MAGIC = b"QSPN"
VERSION = 1
HEADER = MAGIC + bytes([VERSION]) + b"\x00\x00\x00"
HEADER_SIZE = len(HEADER)
_H = merkle.HASH_SIZE
# Leaves handled per bulk read in leaves() and check(): 65,536 leaves = ~4 MiB of hashes.
_CHUNK_LEAVES = 1 << 16


def stored_hash_count(n: int) -> int:
    """The number of stored hashes after ``n`` leaves: ``2n - popcount(n)``."""
    return 2 * n - n.bit_count()


def stored_hash_index(level: int, k: int) -> int:
    """The position (from 0) of the stored hash of the ``k``-th perfect subtree of ``level``.

    That subtree covers leaves ``[k * 2**level, (k + 1) * 2**level)``; level 0 is
    the leaves themselves. Its last leaf ``last`` is stored at
    ``stored_hash_count(last)``, followed by the ``level`` subtrees it completes.
    """
    last = ((k + 1) << level) - 1
    return stored_hash_count(last) + level


def leaves_for_hash_count(count: int) -> int:
    """The largest leaf count ``n`` whose ``stored_hash_count(n)`` is at most ``count``."""
    if count <= 0:
        return 0
    # stored_hash_count(n) >= 2n - bit_length(n), so n <= (count + 64) / 2 for any sane count;
    # binary search keeps this exact for any size.
    lo, hi = 0, count // 2 + count.bit_length() + 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if stored_hash_count(mid) <= count:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _blocks(start: int, end: int) -> list[tuple[int, int]]:
    """Split leaves ``[start, end)`` into aligned perfect subtrees, left to right, as (level, k).

    For the ranges RFC 6962 proofs use (``start`` a multiple of a power of two at
    least ``end - start``) these are the subtrees of the range's binary
    decomposition, largest first, and the range's MTH is their right fold.
    """
    blocks: list[tuple[int, int]] = []
    s = start
    while s < end:
        size = (s & -s) if s else 1 << end.bit_length()
        while s + size > end:
            size >>= 1
        level = size.bit_length() - 1
        blocks.append((level, s >> level))
        s += size
    return blocks


@functools.lru_cache(maxsize=4)
def _chunk_pattern(chunk: int) -> tuple[tuple[int, int], ...]:
    """For an aligned chunk of ``chunk`` leaves (a power of two): (node, left child) byte offsets.

    Offsets are relative to the chunk's first stored hash, in stored order, for
    every node of the chunk's own subtree (levels 1 to log2(chunk)).
    """
    out: list[tuple[int, int]] = []
    for x in range(chunk):
        pos = stored_hash_count(x)
        level, m = 0, x
        while m & 1:
            level += 1
            node = pos + level
            out.append((node * _H, (node - (1 << level)) * _H))
            m >>= 1
    return tuple(out)


class Spine:
    """The on-disk spine of one store (see the module docstring for the layout).

    Open it with :meth:`Spine.open`. Attributes:

    * ``path``: the spine file;
    * ``writable``: whether this instance is the writer;
    * ``reads``: the number of 32-byte hashes read from disk so far (a counter for
      tests and metrics; the in-memory frontier and unflushed hashes are not reads).
    """

    def __init__(self, path: str, io: FileLayer, fd: int | None, *, writable: bool) -> None:
        self.path = path
        self.writable = writable
        self.reads = 0
        self._io = io
        self._fd = fd
        self._closed = False
        self._header_ok = False
        self._n = 0  # leaves, flushed or not
        self._disk_n = 0  # leaves whose hashes are all in the file
        self._disk_hashes = 0  # == stored_hash_count(self._disk_n)
        self._pending = bytearray()  # hashes of leaves [_disk_n, _n), not yet written
        # Writer only: the perfect subtrees making up _n leaves, largest first. A reader
        # reads them from the file each time, so a file rewritten by a recovering
        # writer never leaves it with stale hashes.
        self._frontier: list[bytes] = []
        self._dirty = False  # written since the last fsync

    # ------------------------------------------------------------------ opening

    @classmethod
    def open(cls, path: str, io: FileLayer, *, writable: bool, mode: int = 0o644) -> Spine:
        """Open the spine at ``path``.

        Writable: creates the file with its header when it is missing or shorter
        than the header (then fsyncs it and its directory); cuts away a torn tail
        (a partial hash, or hashes past the last leaf whose set is whole) and
        fsyncs. Read-only: never modifies anything; a missing or header-less file
        is size 0 and a torn tail is ignored.

        Args:
            path: the spine file (``ROOT/merkle.spine``).
            io: the file layer every operation goes through.
            writable: open as the single writer.
            mode: permission bits for a newly created file.

        Returns:
            The open spine.

        Raises:
            CorruptionError: the header's magic, version or reserved bytes are wrong.
            OSError: the file cannot be opened, read or repaired.
        """
        if not writable:
            try:
                fd: int | None = io.open(path, os.O_RDONLY, 0)
            except FileNotFoundError:
                fd = None
            spine = cls(path, io, fd, writable=False)
            try:
                spine._reload()
            except BaseException:
                spine.close()
                raise
            return spine

        fd = io.open(path, os.O_RDWR | os.O_CREAT, mode)
        spine = cls(path, io, fd, writable=True)
        try:
            length = io.size(fd)
            if length < HEADER_SIZE:
                # Missing, or a creation torn before its header was whole: no hashes can be lost.
                io.pwrite(fd, HEADER, 0)
                io.truncate(fd, HEADER_SIZE)
                io.fsync(fd)
                io.fsync_dir(os.path.dirname(os.path.abspath(path)) or ".")
                length = HEADER_SIZE
            else:
                spine._check_header(io.pread(fd, HEADER_SIZE, 0))
            spine._header_ok = True
            n = leaves_for_hash_count((length - HEADER_SIZE) // _H)
            good = HEADER_SIZE + _H * stored_hash_count(n)
            if length != good:
                io.truncate(fd, good)  # a torn write: part of the last leaf's set
                io.fsync(fd)
            spine._set_disk_size(n)
        except BaseException:
            spine.close()
            raise
        return spine

    def _check_header(self, header: bytes) -> None:
        if header[:4] != MAGIC:
            raise CorruptionError(
                self.path, 0, f"not a Merkle spine: bad magic {header[:4]!r} (want {MAGIC!r})"
            )
        if header[4] != VERSION:
            raise CorruptionError(
                self.path, 0, f"unsupported Merkle spine version {header[4]} (this release reads {VERSION})"
            )
        if header[5:8] != b"\x00\x00\x00":
            raise CorruptionError(self.path, 0, "Merkle spine header: reserved bytes are not zero")

    def _set_disk_size(self, n: int) -> None:
        self._n = self._disk_n = n
        self._disk_hashes = stored_hash_count(n)
        self._pending = bytearray()
        self._frontier = self._load_frontier(n) if self.writable else []

    def _reload(self) -> None:
        """Reader: pick up the file's current length (whole leaf sets only)."""
        io = self._io
        if self._fd is None:
            try:
                self._fd = io.open(self.path, os.O_RDONLY, 0)
            except FileNotFoundError:
                self._set_disk_size(0)
                return
        length = io.size(self._fd)
        if length < HEADER_SIZE:
            n = 0  # a creation still in progress (or torn): nothing stored yet
        else:
            if not self._header_ok:
                self._check_header(io.pread(self._fd, HEADER_SIZE, 0))
                self._header_ok = True
            n = leaves_for_hash_count((length - HEADER_SIZE) // _H)
        self._set_disk_size(n)

    def refresh(self) -> int:
        """Re-read the file's length so a reader sees leaves appended since; returns :attr:`size`.

        A writer already knows its size; for it this only returns it. A torn tail
        (a write in progress) is ignored.

        Raises:
            CorruptionError: a header that appeared since opening is bad.
            StoreClosedError: the spine is closed.
        """
        self._check_open()
        if not self.writable:
            self._reload()
        return self._n

    # ------------------------------------------------------------------ state

    @property
    def size(self) -> int:
        """The number of leaves (including appended ones not yet flushed)."""
        return self._n

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def close(self) -> None:
        """Close the file. Idempotent.

        Hashes appended but not flushed are discarded (as a crash would): call
        :meth:`sync` first to keep them.
        """
        if self._closed:
            return
        self._closed = True
        self._pending = bytearray()
        fd, self._fd = self._fd, None
        if fd is not None:
            self._io.close(fd)

    def _after_fork_in_child(self) -> None:
        """In a forked child: drop the inherited descriptor and pending hashes; never write.

        Closes the descriptor with ``os.close`` directly (a file layer's own lock may
        have been held by another parent thread at fork time). The spine is then closed.
        """
        self._closed = True
        self._pending = bytearray()
        fd, self._fd = self._fd, None
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass

    def __enter__(self) -> Spine:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("writable" if self.writable else "read-only")
        return f"<Spine {self.path!r} size={self._n} {state}>"

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosedError(f"Merkle spine {self.path!r} is closed")

    def _check_writable(self) -> None:
        self._check_open()
        if not self.writable:
            raise RuntimeError(f"Merkle spine {self.path!r} was opened read-only")

    # ------------------------------------------------------------------ writing

    def append(self, leaf_hash: merkle.HashLike) -> None:
        """Append one leaf hash (buffered until :meth:`flush`).

        Args:
            leaf_hash: the 32-byte leaf hash (``merkle.leaf_hash(payload)``).

        Raises:
            ValueError: the hash is not 32 bytes.
        """
        self.append_many((leaf_hash,))

    def append_many(self, leaf_hashes: Iterable[merkle.HashLike]) -> None:
        """Append leaf hashes in order (buffered until :meth:`flush`); all or none.

        Args:
            leaf_hashes: 32-byte leaf hashes.

        Raises:
            ValueError: a hash is not 32 bytes (nothing is appended).
        """
        self._check_writable()
        hashes = [bytes(h) for h in leaf_hashes]
        for i, h in enumerate(hashes):
            if len(h) != _H:
                raise ValueError(f"leaf hash #{i} is {len(h)} bytes, not {_H}")
        sha = hashlib.sha256
        prefix = merkle.NODE_PREFIX
        out = self._pending
        frontier = self._frontier
        pop = frontier.pop
        push = frontier.append
        n = self._n
        for h in hashes:
            out += h
            m = n
            while m & 1:
                h = sha(prefix + pop() + h).digest()
                out += h
                m >>= 1
            push(h)
            n += 1
        self._n = n

    def flush(self) -> None:
        """Write the pending hashes with one ``pwrite`` at the end of the file.

        Raises:
            OSError: the write failed; the file is cut back to its last good length
                and the hashes stay pending.
        """
        self._check_writable()
        if not self._pending:
            return
        assert self._fd is not None
        offset = HEADER_SIZE + _H * self._disk_hashes
        data = bytes(self._pending)
        try:
            self._io.pwrite(self._fd, data, offset)
        except OSError:
            try:
                self._io.truncate(self._fd, offset)
            except OSError:
                pass
            raise
        self._dirty = True
        self._disk_hashes += len(data) // _H
        self._disk_n = self._n
        self._pending = bytearray()

    @property
    def needs_sync(self) -> bool:
        """True when hashes were appended or written since the last fsync."""
        return self._dirty or bool(self._pending)

    def sync(self) -> None:
        """:meth:`flush`, then ``fsync`` the file if anything was written since the last one.

        Raises:
            OSError: the write or the fsync failed (never retry a failed fsync: reopen).
        """
        self.flush()
        if self._dirty:
            assert self._fd is not None
            self._io.fsync(self._fd)
            self._dirty = False

    def truncate(self, size: int) -> None:
        """Cut the spine to its first ``size`` leaves (file and memory); used by crash recovery.

        When hashes must be removed from the file, the file is cut and fsynced.

        Args:
            size: the number of leaves to keep, ``0 <= size <= self.size``.

        Raises:
            ValueError: ``size`` is out of range.
            OSError: the file could not be cut.
        """
        self._check_writable()
        if not isinstance(size, int) or size < 0 or size > self._n:
            raise ValueError(f"cannot truncate a spine of {self._n} leaves to {size!r}")
        if size >= self._disk_n:
            keep = stored_hash_count(size) - self._disk_hashes
            del self._pending[keep * _H :]
            self._n = size
            self._frontier = self._load_frontier(size)
            return
        assert self._fd is not None
        self._pending = bytearray()
        self._io.truncate(self._fd, HEADER_SIZE + _H * stored_hash_count(size))
        self._io.fsync(self._fd)
        self._dirty = False
        self._set_disk_size(size)

    # ------------------------------------------------------------------ reading

    def _read_hashes(self, first: int, count: int) -> bytes:
        """Stored hashes ``[first, first + count)``, from the file and/or the pending buffer."""
        end = first + count
        disk = self._disk_hashes
        parts: list[bytes] = []
        if first < disk:
            want = (min(end, disk) - first) * _H
            offset = HEADER_SIZE + first * _H
            if self._fd is None:  # pragma: no cover - a disk size > 0 implies an open file
                raise CorruptionError(self.path, offset, "Merkle spine file is gone")
            data = self._io.pread(self._fd, want, offset)
            self.reads += len(data) // _H
            if len(data) != want:
                raise CorruptionError(
                    self.path,
                    offset + len(data),
                    f"Merkle spine is shorter than its {self._disk_n} leaves need (was it cut while open?)",
                )
            parts.append(data)
        if end > disk:
            lo = max(first, disk) - disk
            parts.append(bytes(self._pending[lo * _H : (end - disk) * _H]))
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _stored(self, level: int, k: int) -> bytes:
        return self._read_hashes(stored_hash_index(level, k), 1)

    def _load_frontier(self, n: int) -> list[bytes]:
        return [self._stored(level, k) for level, k in _blocks(0, n)]

    def _subtree_hash(self, start: int, end: int) -> bytes:
        """MTH of leaves ``[start, end)`` for an RFC-aligned range: popcount(end - start) reads."""
        if start >= end:
            return merkle.EMPTY_ROOT
        hashes = [self._stored(level, k) for level, k in _blocks(start, end)]
        acc = hashes[-1]
        for h in reversed(hashes[:-1]):
            acc = merkle.node_hash(h, acc)
        return acc

    def _check_size(self, size: int | None) -> int:
        self._check_open()
        if size is None:
            return self._n
        if not isinstance(size, int) or isinstance(size, bool) or size < 0 or size > self._n:
            raise ValueError(f"tree size {size!r} is not between 0 and {self._n}")
        return size

    def leaf(self, i: int) -> bytes:
        """The leaf hash of leaf ``i`` (from 0).

        Raises:
            IndexError: ``i`` is not in ``[0, size)``.
        """
        self._check_open()
        if not isinstance(i, int) or i < 0 or i >= self._n:
            raise IndexError(f"leaf {i!r} is not in a spine of {self._n} leaves")
        return self._stored(0, i)

    def leaves(self, start: int = 0, end: int | None = None) -> list[bytes]:
        """The leaf hashes of leaves ``[start, end)``, read in bulk (one read per 65,536 leaves).

        Args:
            start: the first leaf, from 0.
            end: one past the last leaf (default: :attr:`size`).

        Raises:
            ValueError: the range is not within ``[0, size]``.
        """
        self._check_open()
        if end is None:
            end = self._n
        if not (0 <= start <= end <= self._n):
            raise ValueError(f"leaf range [{start}, {end}) is not within a spine of {self._n} leaves")
        out: list[bytes] = []
        for a in range(start, end, _CHUNK_LEAVES):
            b = min(a + _CHUNK_LEAVES, end)
            base = stored_hash_count(a)
            buf = self._read_hashes(base, stored_hash_count(b - 1) + 1 - base)
            out.extend([buf[o : o + _H] for o in [(2 * j - j.bit_count() - base) * _H for j in range(a, b)]])
        return out

    def root(self, size: int | None = None) -> bytes:
        """The Merkle root of the first ``size`` leaves (default: all).

        Raises:
            ValueError: ``size`` is not in ``[0, self.size]``.
        """
        size = self._check_size(size)
        if size == 0:
            return merkle.EMPTY_ROOT
        if size == self._n and self.writable:
            hashes = self._frontier
            acc = hashes[-1]
            for h in reversed(hashes[:-1]):
                acc = merkle.node_hash(h, acc)
            return acc
        return self._subtree_hash(0, size)

    def inclusion_proof(self, index: int, size: int | None = None) -> list[bytes]:
        """The inclusion proof of leaf ``index`` in the tree of the first ``size`` leaves.

        Equal to ``merkle.inclusion_proof(leaves[:size], index)``; reads O(log n) hashes.

        Raises:
            ValueError: ``size`` is out of range, or ``index`` is not below it.
        """
        size = self._check_size(size)
        return merkle._inclusion_path(index, size, self._subtree_hash)

    def consistency_proof(self, old_size: int, new_size: int | None = None) -> list[bytes]:
        """The consistency proof from ``old_size`` leaves to ``new_size`` leaves (default: all).

        Equal to ``merkle.consistency_proof(leaves[:new_size], old_size)``; reads O(log n) hashes.

        Raises:
            ValueError: ``new_size`` is out of range, or ``old_size`` is negative or above it.
        """
        new_size = self._check_size(new_size)
        return merkle._consistency_path(old_size, new_size, self._subtree_hash)

    def check(self, size: int | None = None) -> tuple[int, str] | None:
        """Check that every stored node hash of the first ``size`` leaves equals the hash of its children.

        Leaf hashes cannot be checked here (the segments hold their data); a
        damaged leaf hash shows as a mismatch in its parent.

        Args:
            size: the number of leaves to check (default: all).

        Returns:
            None when consistent, else ``(byte offset of the first bad stored hash, reason)``.
        """
        size = self._check_size(size)
        sha = hashlib.sha256
        prefix = merkle.NODE_PREFIX
        chunk = _CHUNK_LEAVES
        chunk_level = chunk.bit_length() - 1
        # The frontier of the leaves checked so far: stored hashes of perfect subtrees, largest first.
        stack: list[bytes] = []
        pop = stack.pop
        push = stack.append

        def bad(base: int, p: int, level: int, last: int) -> tuple[int, str]:
            first = last + 1 - (1 << level)
            return (
                HEADER_SIZE + base * _H + p,
                f"stored hash of leaves [{first}, {last + 1}) (level {level}) "
                "does not match the hash of its two children",
            )

        for a in range(0, size, chunk):
            b = min(a + chunk, size)
            base = stored_hash_count(a)
            buf = self._read_hashes(base, stored_hash_count(b) - base)
            if b - a == chunk:
                # A whole aligned chunk: its nodes up to the chunk's own root sit at the same
                # relative places in every chunk; a node's right child is the hash just
                # before it and its left child 2**level hashes before it.
                found = next(
                    (
                        (p, left)
                        for p, left in _chunk_pattern(chunk)
                        if sha(prefix + buf[left : left + _H] + buf[p - _H : p]).digest() != buf[p : p + _H]
                    ),
                    None,
                )
                if found is not None:
                    p, left = found
                    level = ((p - left) // _H).bit_length() - 1
                    last = a + leaves_for_hash_count(p // _H - level)
                    return bad(base, p, level, last)
                p = (2 * chunk - 2) * _H  # the chunk's root
                cur = buf[p : p + _H]
                p += _H
                j = b - 1
                m = j >> chunk_level
                while m & 1:  # subtrees above the chunk completed by its last leaf
                    parent = buf[p : p + _H]
                    if sha(prefix + pop() + cur).digest() != parent:
                        return bad(base, p, j.bit_length() - m.bit_length() + 1, j)
                    cur = parent
                    p += _H
                    m >>= 1
                push(cur)
                continue
            p = 0
            for j in range(a, b):
                cur = buf[p : p + _H]
                p += _H
                m = j
                while m & 1:
                    parent = buf[p : p + _H]
                    if sha(prefix + pop() + cur).digest() != parent:
                        return bad(base, p, j.bit_length() - m.bit_length() + 1, j)
                    cur = parent
                    p += _H
                    m >>= 1
                push(cur)
        return None
