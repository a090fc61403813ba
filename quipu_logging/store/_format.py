r"""The on-disk format of an audit store, version 1, byte by byte.

This module is the one place that reads and writes the store's framing; every
other module goes through it. All integers are unsigned; ``LE`` is little-endian.

Store root
==========

::

    ROOT/
      FORMAT              JSON, written once (temp file, rename, fsync of ROOT)
      LOCK                the writer lock (flock LOCK_EX|LOCK_NB); holds the writer's pid
      log/seg-0000000000.log, seg-0000000001.log, ...   segments, 10-digit sequence number
      log/seg-NNNNNNNNNN.idx                            sidecar of a sealed segment
      merkle.spine        the Merkle tree's stored hashes (see ``_spine.py``)
      checkpoints.jsonl   one checkpoint per line (see ``_checkpoint.py``)
      dlq/                events parked by the pipeline, same framing
      quarantine/         damaged bytes moved aside by ``AuditStore.open(repair=True)``

Several stores make a *store set* (one per writer process: ``SET``, ``shard-000/``, ...,
``set-checkpoints.jsonl``); its files and the set checkpoint's signed bytes are
documented byte by byte in ``_set.py``.

``FORMAT`` is ``{"format": "quipu-log", "version": 1, "created_at": <µs>,
"hash": "rfc6962-sha256"}``. Only its ``version`` decides whether this release
can read the store (:class:`~quipu_logging.errors.FormatVersionError` otherwise).

Segment
=======

=======  =====  ==========================================================
offset   size   field
=======  =====  ==========================================================
0        4      magic ``b"QLOG"``
4        1      format version, ``1``
5        3      zero
8        8      ``base_index``: u64 LE, the ``seq`` of the segment's first record
16       ...    frames, back to back
=======  =====  ==========================================================

A damaged segment header (magic, version byte, padding) is content damage
(:class:`~quipu_logging.errors.CorruptionError`). The one exception: the last
(active) segment shorter than 16 bytes is a torn tail of a crash right after
rollover and is recreated.

Frame
=====

=======  =====  ==========================================================
offset   size   field
=======  =====  ==========================================================
0        4      payload length ``L``: u32 LE, ``2 <= L <= 16 MiB``
4        4      CRC-32 (``zlib.crc32``) of the payload: u32 LE
8        L      payload
=======  =====  ==========================================================

A record never spans segments. The segment's ``k``-th frame (from 0) holds the
record ``seq = base_index + k``.

Payload
=======

One JSON object encoded by ``orjson`` with ``OPT_SORT_KEYS`` after the
normalisation described in ``_encode.py`` (strings for odd keys, ``$``-escaping
of user keys, markers such as ``$bytes``, ``$lossy``, ``$depth``, ``$cycle``,
``$repr``), so one event always gives the same bytes. It always carries
``"ts"`` (UTC integer microseconds) and ``"seq"`` (its global index). System
records written by the store itself carry ``"$sys"`` (``"retention"``,
``"gap"``); user events cannot produce that key.

The record's Merkle leaf is ``SHA-256(0x00 || payload)``: it covers every stored
byte of meaning, ``ts`` and ``seq`` included.

Sidecar (``.idx``)
==================

A JSON object describing one sealed segment: ``count``, ``base_index``,
``min_ts``, ``max_ts``, ``length`` (the segment length it describes), ``index``
(a sparse list of ``[seq, offset]`` pairs, one every ``INDEX_STRIDE`` records),
and ``crc``: the CRC-32 of the same object's canonical bytes without ``crc``.
A sidecar is a cache, never trusted: a missing, unreadable or mismatching one
is rebuilt from its segment.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from typing import Any

import orjson

from ..errors import CorruptionError

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "FRAME_HEADER",
    "INDEX_STRIDE",
    "MAX_PAYLOAD",
    "MIN_PAYLOAD",
    "SEGMENT_HEADER",
    "SEGMENT_MAGIC",
    "Sidecar",
    "encode_frame",
    "encode_segment_header",
    "format_file_bytes",
    "parse_segment_header",
    "scan_frames",
    "segment_name",
]

FORMAT_NAME = "quipu-log"
FORMAT_VERSION = 1
SEGMENT_MAGIC = b"QLOG"
SEGMENT_HEADER = 16
FRAME_HEADER = 8
MAX_PAYLOAD = 16 * 1024 * 1024
# The shortest possible payload is "{}"; a zero-length frame (eight zero bytes) is never valid.
MIN_PAYLOAD = 2
INDEX_STRIDE = 256

_HEADER = struct.Struct("<4sB3sQ")
_FRAME = struct.Struct("<II")
_crc32 = zlib.crc32


def segment_name(number: int) -> str:
    """The file name of segment ``number``: ``seg-0000000042.log``."""
    return f"seg-{number:010d}.log"


def sidecar_name(number: int) -> str:
    """The file name of segment ``number``'s sidecar: ``seg-0000000042.idx``."""
    return f"seg-{number:010d}.idx"


def format_file_bytes(created_at_us: int) -> bytes:
    """The content of a new store's ``FORMAT`` file."""
    return (
        orjson.dumps(
            {
                "format": FORMAT_NAME,
                "version": FORMAT_VERSION,
                "created_at": created_at_us,
                "hash": "rfc6962-sha256",
            },
            option=orjson.OPT_SORT_KEYS,
        )
        + b"\n"
    )


def encode_segment_header(base_index: int) -> bytes:
    """The 16-byte header of a segment whose first record has ``seq == base_index``."""
    return _HEADER.pack(SEGMENT_MAGIC, FORMAT_VERSION, b"\0\0\0", base_index)


def parse_segment_header(data: bytes, file: str) -> int:
    """Checks a segment header and returns its ``base_index``.

    Args:
        data: at least the first 16 bytes of the segment.
        file: the segment's path, for errors.

    Returns:
        The ``base_index``.

    Raises:
        CorruptionError: bad magic, version byte, padding, or fewer than 16 bytes.
    """
    if len(data) < SEGMENT_HEADER:
        raise CorruptionError(file, 0, f"segment header is {len(data)} bytes, expected {SEGMENT_HEADER}")
    magic, version, pad, base = _HEADER.unpack_from(data, 0)
    if magic != SEGMENT_MAGIC:
        raise CorruptionError(file, 0, f"bad segment magic {magic!r} (expected {SEGMENT_MAGIC!r})")
    if version != FORMAT_VERSION:
        raise CorruptionError(file, 4, f"bad segment version byte {version} (expected {FORMAT_VERSION})")
    if pad != b"\0\0\0":
        raise CorruptionError(file, 5, "segment header padding is not zero")
    return int(base)


def encode_frame(payload: bytes) -> bytes:
    """Frames one payload: length, CRC-32, payload."""
    return _FRAME.pack(len(payload), _crc32(payload)) + payload


@dataclass(frozen=True, slots=True)
class FrameScan:
    """The result of scanning a segment's frames.

    Attributes:
        frames: ``(offset, length)`` of every whole, CRC-clean frame from the start.
        end: the offset just after the last good frame.
        stop_reason: why the scan stopped before the end of the data (``None`` if it did not).
        resync_offset: the offset of a valid frame found *after* the damage, if any
            (damage followed by a valid frame is corruption, not a torn tail).
    """

    frames: list[tuple[int, int]]
    end: int
    stop_reason: str | None
    resync_offset: int | None


def scan_frames(
    buf: bytes | memoryview, start: int = SEGMENT_HEADER, *, find_resync: bool = True
) -> FrameScan:
    """Walks the frames of ``buf`` from ``start`` and stops at the first bad one.

    A frame is bad when fewer than 8 header bytes remain, its length is out of
    range or runs past the data, or its CRC fails. When the scan stops early and
    ``find_resync`` is set, the rest of the data is searched for any valid frame
    (a plausible length, a JSON object payload and a matching CRC), which tells a
    torn tail from damage in the middle.

    Args:
        buf: the segment bytes (header included).
        start: where the first frame starts.
        find_resync: whether to look for a valid frame after a bad one.

    Returns:
        A :class:`FrameScan`.
    """
    frames: list[tuple[int, int]] = []
    append = frames.append
    unpack = _FRAME.unpack_from
    size = len(buf)
    pos = start
    reason: str | None = None
    while pos < size:
        if size - pos < FRAME_HEADER:
            reason = "incomplete frame header"
            break
        length, crc = unpack(buf, pos)
        body = pos + FRAME_HEADER
        if length < MIN_PAYLOAD or length > MAX_PAYLOAD:
            reason = f"frame length {length} out of range"
            break
        if body + length > size:
            reason = f"frame of {length} bytes runs past the end of the segment"
            break
        if _crc32(buf[body : body + length]) != crc:
            reason = "CRC mismatch"
            break
        append((pos, length))
        pos = body + length
    resync = None
    if reason is not None and find_resync:
        resync = _find_valid_frame(buf, pos + 1)
    return FrameScan(frames, pos, reason, resync)


def _find_valid_frame(buf: bytes | memoryview, start: int) -> int | None:
    # Every payload is a JSON object starting with '{"' (orjson, sorted keys), so only
    # offsets 8 bytes before such a pair can start a frame: cheap to enumerate.
    data = bytes(buf)
    size = len(data)
    q = data.find(b'{"', start + FRAME_HEADER)
    while q != -1:
        p = q - FRAME_HEADER
        length, crc = _FRAME.unpack_from(data, p)
        if (
            MIN_PAYLOAD <= length <= MAX_PAYLOAD
            and q + length <= size
            and _crc32(data[q : q + length]) == crc
        ):
            return p
        q = data.find(b'{"', q + 1)
    return None


@dataclass(frozen=True, slots=True)
class Sidecar:
    """What a sealed segment's ``.idx`` file says about it (see the module docstring)."""

    base_index: int
    count: int
    min_ts: int | None
    max_ts: int | None
    length: int
    index: tuple[tuple[int, int], ...]

    def to_bytes(self) -> bytes:
        """The sidecar file content, CRC included."""
        body: dict[str, Any] = {
            "base_index": self.base_index,
            "count": self.count,
            "index": [list(pair) for pair in self.index],
            "length": self.length,
            "max_ts": self.max_ts,
            "min_ts": self.min_ts,
        }
        body["crc"] = _crc32(orjson.dumps(body, option=orjson.OPT_SORT_KEYS))
        return orjson.dumps(body, option=orjson.OPT_SORT_KEYS)

    @classmethod
    def from_bytes(cls, data: bytes) -> Sidecar | None:
        """Parses a sidecar; ``None`` when it is unreadable or its CRC does not match."""
        try:
            body = orjson.loads(data)
            if not isinstance(body, dict):
                return None
            crc = body.pop("crc")
            if _crc32(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)) != crc:
                return None
            index = tuple((int(s), int(o)) for s, o in body["index"])
            return cls(
                base_index=int(body["base_index"]),
                count=int(body["count"]),
                min_ts=None if body["min_ts"] is None else int(body["min_ts"]),
                max_ts=None if body["max_ts"] is None else int(body["max_ts"]),
                length=int(body["length"]),
                index=index,
            )
        except (ValueError, KeyError, TypeError, orjson.JSONDecodeError):
            return None
