r"""The dead-letter queue (DLQ): events the store would not take, parked durably for a redrive.

Only the pipeline's writer thread uses a :class:`DeadLetterQueue`; it is not
thread-safe. Every file operation goes through the store's file layer, so tests
can inject failures or a power cut into the DLQ as into the store.

Layout
======

::

    DLQ_DIR/                      ROOT/dlq unless PipelineConfig(dlq_dir=...)
      parked-0000000007.dlq       parked events, appended by one pipeline run
      parked-0000000005.redriving a file a redrive has claimed and not yet finished
      parked-0000000004.damaged   bytes a redrive could not decode, kept for a human

A file starts with the 8-byte header ``b"QDLQ"``, version ``1`` (u8), three zero
bytes; then frames exactly as in a store segment (``_format.encode_frame``:
u32 LE length, u32 LE CRC-32, payload). Each payload is one JSON object::

    {"error": "<why the store refused it>", "failed_at": <µs>,
     "record": <the event normalised exactly as the store would have stored it>,
     "run": "<id of the pipeline run that parked it>"}

``record`` carries the event's original ``ts``, so a redrive stores it with the
time of the logging call, not of the redrive. A run never appends to another
run's file (a crash may have left a torn last frame there), and after a failed
write a run starts a new file rather than append behind a possibly torn frame.

Parking writes all frames of a batch with one ``pwrite`` and ``fsync`` s the file
(and the directory when the file is new) before it returns: a parked event is
durable.

Redrive (at-least-once, crash-safe)
===================================

For each file, oldest first: rename ``.dlq`` to ``.redriving`` (fsync the
directory), append its records to the store, ``sync`` the store, then unlink the
``.redriving`` file (fsync the directory). A crash at any point leaves every
parked event either in a ``.dlq`` / ``.redriving`` file or durably in the store
(or both: then the next redrive stores it again, which is what at-least-once
allows). Leftover ``.redriving`` files are redriven first, by every redrive and
when a pipeline starts. Undecodable bytes are copied to a ``.damaged`` file
(written to a temporary name, fsynced, renamed) before their file is unlinked.
"""

from __future__ import annotations

import errno
import json
import os
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import PayloadTooLargeError
from .store import AuditStore
from .store._encode import encode_event
from .store._fileio import FileLayer
from .store._format import FRAME_HEADER, MAX_PAYLOAD, encode_frame, scan_frames

__all__ = ["DLQ_HEADER", "DeadLetterQueue", "ParkedEntry", "RedriveResult"]

DLQ_HEADER = b"QDLQ\x01\x00\x00\x00"
_NAME = re.compile(r"^parked-(\d{10})\.(dlq|redriving|damaged)$")


def _now_us() -> int:
    return time.time_ns() // 1000


@dataclass(frozen=True, slots=True)
class ParkedEntry:
    """One decoded DLQ entry.

    Attributes:
        record: the normalised record (``ts`` included) to re-append.
        error: why the store refused it.
        failed_at: when it was parked, UTC µs.
        run: the id of the pipeline run that parked it.
    """

    record: dict[str, Any]
    error: str
    failed_at: int
    run: str


@dataclass(slots=True)
class RedriveResult:
    """What a redrive did (filled in as it goes, so a failed redrive still reports its progress).

    Attributes:
        replayed: entries appended to the store (and synced).
        mine: how many of those this pipeline run had parked.
        damaged: undecodable entries or byte ranges moved to ``.damaged`` files.
    """

    replayed: int = 0
    mine: int = 0
    damaged: int = 0


class DeadLetterQueue:
    """A directory of parked events (see the module docstring for the format).

    Args:
        directory: the DLQ directory; created (with its parents) on the first park.
        io: the file layer (the store's).
        run: this pipeline run's id, recorded in every entry it parks.
    """

    def __init__(self, directory: str, io: FileLayer, run: str) -> None:
        self.directory = os.path.abspath(directory)
        self._io = io
        self._run = run
        self._fd: int | None = None
        self._path: str | None = None
        self._length = 0

    # ------------------------------------------------------------------ files

    def _files(self) -> list[tuple[int, str, str]]:
        """``(number, kind, path)`` of every DLQ file, by number."""
        try:
            names = os.listdir(self.directory)
        except (FileNotFoundError, NotADirectoryError):
            return []
        out = []
        for name in names:
            m = _NAME.match(name)
            if m:
                out.append((int(m.group(1)), m.group(2), os.path.join(self.directory, name)))
        out.sort()
        return out

    def _name(self, number: int, kind: str) -> str:
        return os.path.join(self.directory, f"parked-{number:010d}.{kind}")

    def _next_number(self) -> int:
        files = self._files()
        return files[-1][0] + 1 if files else 0

    def count(self) -> int:
        """How many decodable entries wait in ``.dlq`` and ``.redriving`` files (reads them all)."""
        total = 0
        for _n, kind, path in self._files():
            if kind == "damaged":
                continue
            try:
                data = self._read(path)
            except OSError:
                continue
            entries, _bad = _decode(data)
            total += len(entries)
        return total

    def has_leftovers(self) -> bool:
        """True when an interrupted redrive left a ``.redriving`` file behind."""
        return any(kind == "redriving" for _n, kind, _p in self._files())

    def _read(self, path: str) -> bytes:
        fd = self._io.open(path, os.O_RDONLY)
        try:
            return self._io.pread(fd, self._io.size(fd), 0)
        finally:
            self._io.close(fd)

    def _write_new(self, path: str, data: bytes) -> None:
        """Creates ``path`` holding ``data`` durably: temp file, fsync, rename, fsync of the directory."""
        tmp = path + ".tmp"
        fd = self._io.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        try:
            self._io.pwrite(fd, data, 0)
            self._io.fsync(fd)
        finally:
            self._io.close(fd)
        self._io.rename(tmp, path)
        self._io.fsync_dir(self.directory)

    # ---------------------------------------------------------------- parking

    def _open_active(self) -> int:
        if self._fd is not None:
            return self._fd
        parent = os.path.dirname(os.path.abspath(self.directory))
        if not os.path.isdir(self.directory):
            os.makedirs(self.directory, exist_ok=True)
            self._io.fsync_dir(parent)
        path = self._name(self._next_number(), "dlq")
        fd = self._io.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL)
        try:
            self._io.pwrite(fd, DLQ_HEADER, 0)
            self._io.fsync(fd)
            self._io.fsync_dir(self.directory)
        except BaseException:
            self._io.close(fd)
            raise
        self._fd, self._path, self._length = fd, path, len(DLQ_HEADER)
        return fd

    def entry_bytes(self, event: Mapping[str, Any], error: str) -> bytes:
        """The payload parking ``event`` would write (the record normalised like the store does)."""
        record, _ts = encode_event(event, seq=0, now_us=_now_us())
        return (
            b'{"error":'
            + json.dumps(error).encode("ascii")
            + b',"failed_at":'
            + str(_now_us()).encode("ascii")
            + b',"record":'
            + record
            + b',"run":'
            + json.dumps(self._run).encode("ascii")
            + b"}"
        )

    def park(
        self, events: Sequence[Mapping[str, Any]], error: BaseException
    ) -> list[tuple[Mapping[str, Any], BaseException]]:
        """Parks ``events`` durably (one write, one fsync).

        Args:
            events: the events the store refused.
            error: why it refused them (recorded as text).

        Returns:
            The events that cannot be parked at all (their entry is over the 16 MiB
            frame limit), each with the reason; every other event is parked.

        Raises:
            OSError: the DLQ could not be written; none of ``events`` is parked.
        """
        text = f"{type(error).__name__}: {error}"
        frames: list[bytes] = []
        refused: list[tuple[Mapping[str, Any], BaseException]] = []
        for event in events:
            payload = self.entry_bytes(event, text)
            if len(payload) > MAX_PAYLOAD:
                refused.append((event, PayloadTooLargeError(len(payload), MAX_PAYLOAD)))
            else:
                frames.append(encode_frame(payload))
        if frames:
            self._append(b"".join(frames))
        return refused

    def _append(self, data: bytes) -> None:
        fd = self._open_active()
        start = self._length
        try:
            self._io.pwrite(fd, data, start)
            self._io.fsync(fd)
        except OSError:
            # Never append behind a frame that may be torn: the next park starts a new file.
            try:
                self._io.truncate(fd, start)
            except OSError:
                pass
            self._close_active()
            raise
        self._length = start + len(data)

    def _close_active(self) -> None:
        fd, self._fd, self._path = self._fd, None, None
        if fd is not None:
            try:
                self._io.close(fd)
            except OSError:
                pass

    def close(self) -> None:
        """Closes the active file (parking later opens a new one)."""
        self._close_active()

    def after_fork_in_child(self) -> None:
        """In a forked child: drop the inherited descriptor without touching the file."""
        fd, self._fd, self._path = self._fd, None, None
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass

    # ---------------------------------------------------------------- redrive

    def redrive(
        self,
        store: AuditStore,
        batch_max: int,
        *,
        leftovers_only: bool = False,
        result: RedriveResult | None = None,
    ) -> RedriveResult:
        """Appends every parked entry to ``store``, at least once, and removes it from the DLQ.

        Args:
            store: the open, writable store.
            batch_max: how many records to append at once.
            leftovers_only: redrive only ``.redriving`` files an interrupted redrive left.
            result: where to count progress (a new one by default); it is up to date
                even when the redrive raises.

        Returns:
            ``result``.

        Raises:
            OSError, StoreBrokenError, ...: the store or the DLQ failed. Entries not
            durably stored stay parked (in a new ``.dlq`` file, or in the
            ``.redriving`` file when even that could not be written).
        """
        self._close_active()
        res = RedriveResult() if result is None else result
        for number, kind, path in self._files():
            if kind == "damaged" or (leftovers_only and kind != "redriving"):
                continue
            if kind == "dlq":
                claimed = self._name(number, "redriving")
                self._io.rename(path, claimed)
                self._io.fsync_dir(self.directory)
                path = claimed
            data = self._read(path)
            entries, bad = _decode(data)
            if bad:
                self._write_new(self._name(number, "damaged"), b"".join(bad))
                res.damaged += len(bad)
            done = 0
            try:
                while done < len(entries):
                    chunk = entries[done : done + batch_max]
                    try:
                        store.append_normalised([e.record for e, _raw in chunk])
                    except OSError as e:
                        done += int(getattr(e, "quipu_written", 0) or 0)
                        raise
                    done += len(chunk)
                store.sync()
            except BaseException:
                stored = self._keep_unstored(path, entries, done, store)
                self._count(res, entries[:stored])
                raise
            self._io.unlink(path)
            self._io.fsync_dir(self.directory)
            self._count(res, entries)
        return res

    def _count(self, res: RedriveResult, entries: list[tuple[ParkedEntry, bytes]]) -> None:
        res.replayed += len(entries)
        res.mine += sum(1 for e, _raw in entries if e.run == self._run)

    def _keep_unstored(
        self, path: str, entries: list[tuple[ParkedEntry, bytes]], done: int, store: AuditStore
    ) -> int:
        """After a failed redrive of ``path``: park again what is not durably stored, drop ``path``.

        Returns:
            How many of ``entries`` (a prefix) are durably stored and no longer parked.
        """
        try:
            store.sync()
        except Exception:
            done = 0  # nothing of this file is known to be durable: keep all of it
        rest = entries[done:]
        try:
            if rest:
                number = self._next_number()
                data = DLQ_HEADER + b"".join(encode_frame(raw) for _e, raw in rest)
                self._write_new(self._name(number, "dlq"), data)
            self._io.unlink(path)
            self._io.fsync_dir(self.directory)
        except OSError:
            return 0  # the .redriving file stays: the next redrive (or start) takes it all again
        return done


def _decode(data: bytes) -> tuple[list[tuple[ParkedEntry, bytes]], list[bytes]]:
    """Decodes a DLQ file: good entries with their payload bytes, and undecodable byte runs."""
    if len(data) < len(DLQ_HEADER) or data[: len(DLQ_HEADER)] != DLQ_HEADER:
        return [], [data] if data else []
    scan = scan_frames(data, len(DLQ_HEADER), find_resync=False)
    entries: list[tuple[ParkedEntry, bytes]] = []
    bad: list[bytes] = []
    for pos, length in scan.frames:
        raw = data[pos + FRAME_HEADER : pos + FRAME_HEADER + length]
        entry = _entry(raw)
        if entry is None:
            bad.append(encode_frame(raw))
        else:
            entries.append((entry, raw))
    if scan.end < len(data):
        bad.append(data[scan.end :])
    return entries, bad


def _entry(raw: bytes) -> ParkedEntry | None:
    try:
        obj = json.loads(raw)
    except (ValueError, RecursionError):  # RecursionError: a frame of absurdly deep nesting
        return None
    if not isinstance(obj, dict):
        return None
    record = obj.get("record")
    if not isinstance(record, dict) or "$sys" in record:
        return None
    ts = record.get("ts")
    if type(ts) is not int or not 0 <= ts < 1 << 63:
        return None
    error = obj.get("error")
    failed_at = obj.get("failed_at")
    run = obj.get("run")
    return ParkedEntry(
        record=record,
        error=error if isinstance(error, str) else "",
        failed_at=failed_at if type(failed_at) is int else 0,
        run=run if isinstance(run, str) else "",
    )


def is_disk_full(error: BaseException) -> bool:
    """True for an ``OSError`` that says the disk (or a quota) is full."""
    return isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)
