"""``AuditStore.open_reader`` (DESIGN §3, issue 3 requirement 1 and 8).

A reader takes no lock, sees whole frames only, sees newer records after
``refresh()``, never fails on content (``verify`` reports), and refuses a
directory that is not a store. The concurrency tests run the writer in a
subprocess that appends in a loop, reports progress over its stdout pipe, and
stops when its stdin is closed: synchronisation is by pipe, never by sleeping.
"""

from __future__ import annotations

import hashlib
import os
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path
from typing import Any

import orjson
import pytest

import quipu_logging
from quipu_logging import AuditStore, NotAStoreError, StoreConfig, StoredRecord
from quipu_logging.store import FileLayer

FRAME = struct.Struct("<II")
PACKAGE_PARENT = str(Path(quipu_logging.__file__).resolve().parent.parent)


def event(i: int) -> dict[str, Any]:
    """A record of varied size that names its own index."""
    return {"i": i, "actor": f"user-{i % 7}", "action": "update", "note": "x" * ((i * 37) % 120)}


def build(root: Path, n: int, *, limit: int = 4096) -> None:
    """A closed store of ``n`` records with small segments."""
    with AuditStore.open(StoreConfig(root=root, max_segment_bytes=limit, sync="os")) as store:
        store.append_batch([event(i) for i in range(n)])


def segments(root: Path) -> list[Path]:
    """The segment files, oldest first."""
    return sorted((root / "log").glob("seg-*.log"))


def check_whole(records: list[StoredRecord], *, start: int = 0) -> None:
    """Every record is whole and self-consistent, and the seqs are contiguous from ``start``."""
    assert [r.seq for r in records] == list(range(start, start + len(records)))
    for r in records:
        assert hashlib.sha256(b"\0" + r.raw).digest() == r.leaf_hash
        assert orjson.loads(r.raw) == r.payload
        assert r.payload["seq"] == r.seq
        assert r.payload["i"] == r.seq
        assert r.ts == r.payload["ts"]


# A writer in another process: appends batches until its stdin is closed, printing the
# number of records stored after every batch (so the parent knows what must be visible).
WRITER = textwrap.dedent(
    """
    import sys, threading
    from quipu_logging import AuditStore, StoreConfig

    root, limit, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    stop = threading.Event()

    def watch_stdin():
        sys.stdin.buffer.read()  # returns at EOF: the parent closed our stdin
        stop.set()

    threading.Thread(target=watch_stdin, daemon=True).start()
    store = AuditStore.open(StoreConfig(root=root, max_segment_bytes=limit, sync="os"))
    n = 0
    print("open", flush=True)
    while not stop.is_set():
        events = []
        for i in range(n, n + batch):
            events.append({"i": i, "actor": "user-%d" % (i % 7), "note": "y" * (i * 37 % 120)})
        store.append_batch(events)
        n += batch
        print(n, flush=True)
    store.close()
    print("closed", n, flush=True)
    """
)


class Writer:
    """A writer subprocess; ``stored()`` waits for its next progress line."""

    def __init__(self, root: Path, *, limit: int = 4096, batch: int = 7) -> None:
        env = {**os.environ, "PYTHONPATH": PACKAGE_PARENT}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(root), str(limit), str(batch)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
        )
        assert self.proc.stdout is not None and self.proc.stdin is not None
        self.out = self.proc.stdout
        assert self.out.readline() == b"open\n"  # the writer holds the lock from here on

    def stored(self) -> int:
        """Blocks until the writer reports another batch; returns its stored count."""
        line = self.out.readline()
        assert line, "the writer subprocess died"
        return int(line)

    def stop(self) -> int:
        """Closes the writer's stdin and returns how many records it stored in all."""
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        total = None
        for line in self.out:
            if line.startswith(b"closed "):
                total = int(line.split()[1])
        assert self.proc.wait(timeout=60) == 0
        self.out.close()
        assert total is not None
        return total

    def kill(self) -> None:
        """Tears the subprocess down after a failure."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None and not pipe.closed:
                pipe.close()


@pytest.fixture
def writer_factory():  # type: ignore[no-untyped-def]
    """Starts writer subprocesses and makes sure they are gone afterwards."""
    started: list[Writer] = []

    def start(root: Path, **kw: Any) -> Writer:
        w = Writer(root, **kw)
        started.append(w)
        return w

    yield start
    for w in started:
        w.kill()


class TestNoLock:
    """A reader never takes the writer lock."""

    def test_writer_opens_while_reader_open(self, tmp_path: Path) -> None:
        """A writer can open (and append) while a reader of the same store is open."""
        root = tmp_path / "s"
        build(root, 10)
        with AuditStore.open_reader(root) as reader, AuditStore.open(root) as writer:
            writer.append(event(10))
            writer.sync()
            reader.refresh()
            check_whole(list(reader.scan()))
            assert reader.tree_size == 11

    def test_reader_opens_while_writer_open(self, tmp_path: Path) -> None:
        """A reader opens while a writer holds the lock, and several readers coexist."""
        root = tmp_path / "s"
        with AuditStore.open(StoreConfig(root=root, sync="os")) as writer:
            writer.append_batch([event(i) for i in range(5)])
            with AuditStore.open_reader(root) as r1, AuditStore.open_reader(root) as r2:
                assert [r.seq for r in r1.scan()] == [r.seq for r in r2.scan()] == list(range(5))
                assert r1.verify().ok

    def test_reader_writes_nothing(self, tmp_path: Path) -> None:
        """Opening, scanning, querying and verifying with a reader changes no file."""
        root = tmp_path / "s"
        build(root, 40)
        (root / "log" / "seg-0000000000.idx").unlink()  # a reader must not rebuild it on disk
        before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
        with AuditStore.open_reader(root) as reader:
            list(reader.scan())
            reader.query(limit=5)
            reader.query(newest_first=False, since=0, limit=1000)
            assert reader.verify().ok
        after = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
        assert before == after


class TestConcurrentWriter:
    """A reader works while a writer in another process keeps appending."""

    def test_scan_sees_whole_contiguous_records(self, tmp_path: Path, writer_factory: Any) -> None:
        """Every scanned record is whole and verifies; refresh shows at least what was reported stored."""
        root = tmp_path / "s"
        w = writer_factory(root)
        reader = AuditStore.open_reader(root)
        try:
            seen = 0
            for _ in range(25):
                stored = w.stored()
                reader.refresh()
                records = list(reader.scan())
                check_whole(records)
                assert len(records) >= stored  # refresh makes every record reported stored visible
                assert len(records) >= seen  # and a reader never goes back
                seen = len(records)
                assert reader.tree_size >= stored
                tail = list(reader.scan(max(0, seen - 10)))
                check_whole(tail, start=max(0, seen - 10))
                newest = list(reader.scan(reverse=True))
                check_whole(newest[::-1])
            total = w.stop()
            reader.refresh()
            records = list(reader.scan())
            check_whole(records)
            assert len(records) == total == reader.tree_size
            assert reader.verify().ok
        finally:
            reader.close()

    def test_verify_ok_during_writes(self, tmp_path: Path, writer_factory: Any) -> None:
        """verify() on a reader is ok while the writer appends; unpublished frames are pending."""
        root = tmp_path / "s"
        w = writer_factory(root, limit=2048, batch=3)
        reader = AuditStore.open_reader(root)
        try:
            for _ in range(25):
                stored = w.stored()
                report = reader.verify()
                assert report.ok, report.problems
                assert report.tree_size >= stored
                assert report.records_checked >= report.tree_size
            total = w.stop()
            report = reader.verify()
            assert report.ok, report.problems
            assert (report.tree_size, report.pending) == (total, 0)
        finally:
            reader.close()

    def test_query_during_writes(self, tmp_path: Path, writer_factory: Any) -> None:
        """Newest-first pages and oldest-first paging work while records arrive."""
        root = tmp_path / "s"
        w = writer_factory(root, limit=3000, batch=11)
        reader = AuditStore.open_reader(root)
        try:
            for _ in range(15):
                stored = w.stored()
                page = reader.query(limit=20)
                assert len(page.records) == 20 or page.next_cursor is None
                check_whole(page.records[::-1], start=page.records[-1].seq)
                assert page.records[0].seq >= stored - 1
            got: list[StoredRecord] = []
            cursor = None
            for _ in range(10_000):  # a bound: a broken cursor could loop forever
                page = reader.query(newest_first=False, where={"actor": "user-3"}, limit=17, cursor=cursor)
                got.extend(page.records)
                if page.next_cursor is None:
                    break
                cursor = page.next_cursor
            else:
                raise AssertionError("paging did not end")
            total = w.stop()
            seqs = [r.seq for r in got]
            assert seqs == sorted(set(seqs))
            assert all(r.payload["actor"] == "user-3" for r in got)
            reader.refresh()
            expected = [r.seq for r in reader.scan() if r.payload["actor"] == "user-3"]
            assert seqs == expected[: len(seqs)]
            assert len(expected) == len([i for i in range(total) if i % 7 == 3])
        finally:
            reader.close()


class SpineHook(FileLayer):
    """A reader's file layer that runs ``action`` once, right after the reader measures the spine."""

    def __init__(self) -> None:
        self.paths: dict[int, str] = {}
        self.action: Any = None

    def open(self, path: str, flags: int, mode: int = 0o644) -> int:
        fd = super().open(path, flags, mode)
        self.paths[fd] = path
        return fd

    def close(self, fd: int) -> None:
        self.paths.pop(fd, None)
        super().close(fd)

    def size(self, fd: int) -> int:
        n = super().size(fd)
        if self.paths.get(fd, "").endswith("merkle.spine") and self.action is not None:
            action, self.action = self.action, None
            action()  # the writer moves on between the reader's reads
        return n


class TestConsistentSnapshot:
    """A reader's snapshot is consistent whatever the writer does between the reader's file reads."""

    def test_writer_checkpoints_while_reader_reads_spine(self, tmp_path: Path) -> None:
        """Records and a checkpoint written just after the reader measured the spine are not problems."""
        root = tmp_path / "s"
        hook = SpineHook()
        with AuditStore.open(StoreConfig(root=root, max_segment_bytes=1500, sync="os")) as w:
            w.append_batch([event(i) for i in range(30)])
            w.checkpoint()
            with AuditStore.open_reader(root, file_layer=hook) as r:
                for _ in range(3):
                    n = w.tree_size

                    def advance(n: int = n) -> None:
                        w.append_batch([event(i) for i in range(n, n + 25)])  # rolls over: seal checkpoints
                        w.checkpoint()

                    hook.action = advance
                    report = r.verify()
                    assert report.ok, report.problems
                    assert report.tree_size == n and report.pending == 25
                    assert r.last_checkpoint is not None and r.last_checkpoint.tree_size <= r.tree_size
                    r.refresh()
                    check_whole(list(r.scan()))
                    assert r.tree_size == n + 25

    def test_writer_starts_during_verify(self, tmp_path: Path) -> None:
        """A writer that opens and appends while a reader verifies leaves pending records, not problems."""
        root = tmp_path / "s"
        build(root, 20, limit=1500)
        hook = SpineHook()
        writers: list[AuditStore] = []

        def start_writer() -> None:
            w = AuditStore.open(StoreConfig(root=root, max_segment_bytes=1500, sync="os"))
            writers.append(w)
            w.append_batch([event(i) for i in range(20, 30)])

        try:
            with AuditStore.open_reader(root, file_layer=hook) as r:
                hook.action = start_writer
                report = r.verify()
                assert writers, "the hook did not run"
                assert report.ok, report.problems
                assert (report.tree_size, report.pending) == (20, 10)
        finally:
            for w in writers:
                w.close()
        with AuditStore.open_reader(root) as r:
            assert r.verify().ok and r.tree_size == 30

    def test_retention_during_verify(self, tmp_path: Path) -> None:
        """Retention deleting segments after the reader listed them is not reported as tampering."""
        root = tmp_path / "s"
        ops: list[str] = []

        class Hook(FileLayer):
            action: Any = None

            def open(self, path: str, flags: int, mode: int = 0o644) -> int:
                if path.endswith("seg-0000000000.log") and self.action is not None:
                    action, self.action = self.action, None
                    action()
                    ops.append("retention ran")
                return super().open(path, flags, mode)

        hook = Hook()
        with AuditStore.open(StoreConfig(root=root, max_segment_bytes=1500, sync="os")) as w:
            w.append_batch([{**event(i), "ts": 1_000_000 + i} for i in range(60)])
            w.append_batch([event(i) for i in range(60, 80)])
            with AuditStore.open_reader(root, file_layer=hook) as r:
                hook.action = lambda: w.apply_retention(quipu_logging.RetentionPolicy(max_age="1d"))
                report = r.verify()
                assert ops == ["retention ran"]
                assert report.ok, report.problems
                assert r.verify().ok

    def test_stale_listing_after_retention(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """A listing still naming a segment retention removed (and missing the next) is no tampering."""
        root = tmp_path / "s"
        with AuditStore.open(StoreConfig(root=root, max_segment_bytes=1500, sync="os")) as w:
            w.append_batch([{**event(i), "ts": 1_000_000 + i} for i in range(60)])
            w.append_batch([event(i) for i in range(60, 80)])
            assert w.apply_retention(quipu_logging.RetentionPolicy(max_age="1d")) >= 3
        log = str(root / "log")
        real = os.listdir

        def listdir(path: Any = ".") -> list[str]:
            names = real(path)
            return [*names, "seg-0000000000.log"] if os.fspath(path) == log else names

        monkeypatch.setattr(os, "listdir", listdir)
        with AuditStore.open_reader(root) as r:
            assert r.verify().ok
            assert len(list(r.scan())) == len(r.query(limit=1000).records) > 0

    def test_segment_missing_from_a_listing(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """A directory listing that misses a segment created meanwhile (readdir may) hides nothing."""
        root = tmp_path / "s"
        build(root, 80, limit=1500)
        log = str(root / "log")
        hidden = segments(root)[2].name
        real = os.listdir

        def listdir(path: Any = ".") -> list[str]:
            names = real(path)
            return [n for n in names if n != hidden] if os.fspath(path) == log else names

        monkeypatch.setattr(os, "listdir", listdir)
        with AuditStore.open_reader(root) as r:
            check_whole(list(r.scan()))
            assert len(list(r.scan())) == 80
            assert [x.seq for x in r.query(newest_first=False, limit=1000).records] == list(range(80))
            assert r.verify().ok
        (root / "log" / hidden).unlink()  # really deleted: reported
        with AuditStore.open_reader(root) as r:
            assert not r.verify().ok


class TestRefresh:
    """A reader sees a snapshot until it refreshes (queries and verify refresh by themselves)."""

    def test_refresh_shows_new_records(self, tmp_path: Path) -> None:
        """Records appended after the reader opened appear in scan() after refresh()."""
        root = tmp_path / "s"
        with AuditStore.open(StoreConfig(root=root, max_segment_bytes=2048, sync="os")) as writer:
            writer.append_batch([event(i) for i in range(5)])
            with AuditStore.open_reader(root) as reader:
                assert reader.tree_size == 5
                writer.append_batch([event(i) for i in range(5, 60)])  # rolls over segments too
                reader.refresh()
                assert reader.tree_size == 60
                check_whole(list(reader.scan()))
                assert len(list(reader.scan())) == 60
                assert len(reader.query(limit=100).records) == 60

    def test_closed_reader_refuses(self, tmp_path: Path) -> None:
        """A closed reader raises StoreClosedError instead of reading."""
        root = tmp_path / "s"
        build(root, 3)
        reader = AuditStore.open_reader(root)
        reader.close()
        reader.close()  # idempotent
        with pytest.raises(quipu_logging.StoreClosedError):
            reader.refresh()
        with pytest.raises(quipu_logging.StoreClosedError):
            list(reader.scan())


class TestContentDamage:
    """A reader never fails on content: it returns the good records and verify reports the rest."""

    @pytest.mark.parametrize("then_valid_frame", [False, True])
    def test_garbage_after_active_segment(self, tmp_path: Path, then_valid_frame: bool) -> None:
        """Garbage appended to the active segment is ignored by scan and query; verify reports damage."""
        root = tmp_path / "s"
        build(root, 50)
        active = segments(root)[-1]
        garbage = b"\xff\x00\x13garbage that is not a frame" * 3
        if then_valid_frame:  # damage followed by a valid frame is corruption, not a torn tail
            body = orjson.dumps({"i": 50, "seq": 50, "ts": 1})
            garbage += FRAME.pack(len(body), zlib.crc32(body)) + body
        with open(active, "ab") as f:
            f.write(garbage)
        with AuditStore.open_reader(root) as reader:
            records = list(reader.scan())
            check_whole(records)
            assert len(records) == 50
            assert [r.seq for r in reader.query(limit=100).records] == list(range(49, -1, -1))
            assert [r.seq for r in reader.query(newest_first=False, limit=100).records] == list(range(50))
            assert len(list(reader.scan(reverse=True))) == 50
            report = reader.verify()
        if then_valid_frame:
            assert not report.ok
            assert any(p.file == str(active) for p in report.problems)
        else:
            # An undecodable tail holding no published record is what a crash mid-write leaves:
            # the next writer open cuts it (DESIGN §4 recovery), so verify does not call it tampering.
            assert report.ok and report.tree_size == 50

    def test_frame_looking_garbage_after_active_segment(self, tmp_path: Path) -> None:
        """A whole, CRC-clean frame of non-JSON bytes at the end is skipped by query and flagged by verify."""
        root = tmp_path / "s"
        build(root, 20)
        active = segments(root)[-1]
        body = b"\x00\x01not json at all"
        with open(active, "ab") as f:
            f.write(FRAME.pack(len(body), zlib.crc32(body)) + body)
        with AuditStore.open_reader(root) as reader:
            got = reader.query(newest_first=False, limit=100).records
            check_whole(got)
            assert len(got) == 20
            assert not reader.verify().ok

    def test_flipped_byte_in_sealed_segment(self, tmp_path: Path) -> None:
        """A flipped payload byte in a sealed segment: every other segment's records still come back."""
        root = tmp_path / "s"
        build(root, 120)
        segs = segments(root)
        assert len(segs) >= 4
        victim = segs[1]
        with AuditStore.open_reader(root) as reader:
            before = {r.seq: r for r in reader.scan()}
            in_victim = [s for s, r in before.items() if victim == Path(_segment_of(reader, s))]
        data = bytearray(victim.read_bytes())
        length = FRAME.unpack_from(data, 16)[0]
        first_frame_end = 16 + 8 + length
        second_len = FRAME.unpack_from(data, first_frame_end)[0]
        data[first_frame_end + 8 + second_len // 2] ^= 0x20  # inside the victim's second record
        victim.write_bytes(bytes(data))
        damaged = in_victim[1]
        for sidecar in (True, False):
            if not sidecar:
                victim.with_suffix(".idx").unlink()
            with AuditStore.open_reader(root) as reader:
                scanned = list(reader.scan())
                reverse = list(reader.scan(reverse=True))
                newest = _all_pages(reader, newest_first=True)
                oldest = _all_pages(reader, newest_first=False)
                report = reader.verify()
            for got in (scanned, reverse, newest, oldest):
                seqs = {r.seq for r in got}
                assert damaged not in seqs
                assert seqs >= set(before) - set(in_victim[1:])  # everything outside the damage
                for r in got:
                    assert r.raw == before[r.seq].raw  # whatever comes back is the original record
            assert not report.ok
            assert any(p.file == str(victim) and p.seq == damaged for p in report.problems)

    @pytest.mark.parametrize("damage", ["bad magic", "bad version", "deleted", "torn header"])
    def test_damaged_spine(self, tmp_path: Path, damage: str) -> None:
        """A damaged or missing spine: the reader still opens and reads every record; verify reports."""
        root = tmp_path / "s"
        build(root, 60)
        spine = root / "merkle.spine"
        data = bytearray(spine.read_bytes())
        if damage == "bad magic":
            data[0:4] = b"XXXX"
        elif damage == "bad version":
            data[4] = 9
        elif damage == "torn header":
            data = data[:5]
        spine.write_bytes(bytes(data))
        if damage == "deleted":
            spine.unlink()
        with AuditStore.open_reader(root) as reader:
            check_whole(list(reader.scan()))
            assert len(list(reader.scan())) == 60
            assert len(reader.query(limit=1000).records) == 60
            report = reader.verify()
            reader.refresh()
            assert not reader.verify().ok
        assert not report.ok
        assert any(p.file == str(spine) for p in report.problems), report.problems

    def test_truncated_sealed_segment(self, tmp_path: Path) -> None:
        """A sealed segment cut mid-frame: queries return the rest without raising; verify reports."""
        root = tmp_path / "s"
        build(root, 120)
        victim = segments(root)[2]
        with open(victim, "r+b") as f:
            f.truncate(f.seek(0, 2) - 5)
        with AuditStore.open_reader(root) as reader:
            scanned = list(reader.scan())
            pages = _all_pages(reader, newest_first=True)
            assert {r.seq for r in pages} == {r.seq for r in scanned}
            assert len(scanned) == 119
            assert not reader.verify().ok


class TestNotAStore:
    """A reader pointed at something that is not a store gets a NotAStoreError naming it."""

    def test_foreign_directory(self, tmp_path: Path) -> None:
        """A directory holding other files is refused, and the error names it; nothing is created."""
        root = tmp_path / "photos"
        root.mkdir()
        (root / "cat.jpg").write_bytes(b"\xff\xd8")
        with pytest.raises(NotAStoreError, match="photos"):
            AuditStore.open_reader(root)
        assert sorted(p.name for p in root.iterdir()) == ["cat.jpg"]

    def test_empty_directory(self, tmp_path: Path) -> None:
        """An empty directory is not a store for a reader (only a writer creates one) and stays empty."""
        root = tmp_path / "empty"
        root.mkdir()
        with pytest.raises(NotAStoreError, match="empty"):
            AuditStore.open_reader(root)
        assert list(root.iterdir()) == []

    def test_missing_directory(self, tmp_path: Path) -> None:
        """A path that does not exist is refused and not created."""
        root = tmp_path / "nowhere"
        with pytest.raises(NotAStoreError, match="nowhere"):
            AuditStore.open_reader(root)
        assert not root.exists()

    def test_a_file(self, tmp_path: Path) -> None:
        """A regular file is refused with its name."""
        path = tmp_path / "notes.txt"
        path.write_text("hello")
        with pytest.raises(NotAStoreError, match=r"notes\.txt"):
            AuditStore.open_reader(path)

    def test_other_format_file(self, tmp_path: Path) -> None:
        """A directory whose FORMAT file belongs to something else is refused, naming the file."""
        root = tmp_path / "other"
        root.mkdir()
        (root / "FORMAT").write_text('{"format": "something-else", "version": 1}')
        with pytest.raises(NotAStoreError, match="other"):
            AuditStore.open_reader(root)


# ---------------------------------------------------------------------------- helpers


def _segment_of(store: AuditStore, seq: int) -> str:
    """The path of the segment holding ``seq`` (from the segment headers)."""
    bases = []
    for seg in segments(Path(store.root)):
        with open(seg, "rb") as f:
            bases.append((struct.unpack_from("<Q", f.read(16), 8)[0], str(seg)))
    return [path for base, path in bases if base <= seq][-1]


def _all_pages(
    store: AuditStore, *, newest_first: bool, limit: int = 13, **filters: Any
) -> list[StoredRecord]:
    """Every record of a query, page by page."""
    out: list[StoredRecord] = []
    cursor = None
    for _ in range(10_000):  # a bound: a broken cursor could loop forever
        page = store.query(newest_first=newest_first, limit=limit, cursor=cursor, **filters)
        out.extend(page.records)
        if page.next_cursor is None:
            return out
        cursor = page.next_cursor
    raise AssertionError("paging did not end")
