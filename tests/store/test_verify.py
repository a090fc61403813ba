"""``AuditStore.verify`` and the proofs (DESIGN §3 ``verify``/``prove_*``, §4 checkpoints and spine).

Every tampering here is done on the bytes with the store closed, the way an
operator with file access would; the store is then checked through
``AuditStore.open_reader(root).verify()`` (the writer's view is covered where it
matters). Segment frames are parsed and re-framed here with ``struct`` and
``zlib``, independently of ``_format``.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import zlib
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import quipu_logging
from quipu_logging import (
    AuditStore,
    Checkpoint,
    ConsistencyProof,
    CorruptionError,
    InclusionProof,
    Problem,
    StoreConfig,
    VerifyReport,
)
from quipu_logging.store import FileLayer, merkle
from quipu_logging.store._spine import HEADER_SIZE as SPINE_HEADER
from quipu_logging.store._spine import Spine, stored_hash_count, stored_hash_index

SEG_HEADER = struct.Struct("<4sB3sQ")
FRAME = struct.Struct("<II")
HASH = 32
PACKAGE_PARENT = str(Path(quipu_logging.__file__).resolve().parent.parent)
EXAMPLES_IN_TMP_PATH = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]


# ---------------------------------------------------------------------------- helpers


def event(i: int) -> dict[str, Any]:
    """A record of varied size."""
    return {"i": i, "actor": f"user-{i % 5}", "action": "update", "note": "n" * ((i * 29) % 90)}


def build(root: Path, n: int, *, limit: int = 64 * 1024 * 1024, key: Path | None = None) -> list[bytes]:
    """Creates a store of ``n`` records, closes it cleanly, returns the stored payloads."""
    with AuditStore.open(StoreConfig(root=root, max_segment_bytes=limit, signing_key=key)) as store:
        for i in range(n):
            store.append(event(i))
        return [r.raw for r in store.scan()]


def segments(root: Path) -> list[Path]:
    """The segment files, oldest first."""
    return sorted((root / "log").glob("seg-*.log"))


def frames(data: bytes) -> tuple[int, list[tuple[int, int]]]:
    """``(base_index, [(offset, payload length)])`` of a segment's frames (trusting lengths, not CRCs)."""
    base = SEG_HEADER.unpack_from(data, 0)[3]
    out = []
    pos = SEG_HEADER.size
    while pos + FRAME.size <= len(data):
        length = FRAME.unpack_from(data, pos)[0]
        out.append((pos, length))
        pos += FRAME.size + length
    return base, out


def locate(root: Path, seq: int) -> tuple[Path, int, int]:
    """The segment, frame offset and payload length of record ``seq``."""
    for seg in segments(root):
        base, fr = frames(seg.read_bytes())
        if base <= seq < base + len(fr):
            pos, length = fr[seq - base]
            return seg, pos, length
    raise LookupError(seq)


def fix_crc(data: bytearray, pos: int) -> None:
    """Recomputes the CRC of the frame at ``pos`` so only the Merkle check can catch a change."""
    length = FRAME.unpack_from(data, pos)[0]
    body = bytes(data[pos + FRAME.size : pos + FRAME.size + length])
    FRAME.pack_into(data, pos, length, zlib.crc32(body))


def reverify(root: Path, **kwargs: Any) -> VerifyReport:
    """Verifies the (closed) store through a fresh reader."""
    return AuditStore.open_reader(root).verify(**kwargs)


def assert_reported(report: VerifyReport, file: Path | str, **where: Any) -> Problem:
    """The report fails and holds a problem about ``file`` (and the given offset/seq); returns it."""
    assert report.ok is False
    assert bool(report) is False
    assert report.problems
    for p in report.problems:
        if p.file == str(file) and all(getattr(p, k) == v for k, v in where.items()):
            assert p.reason
            return p
    raise AssertionError(f"no problem about {file} {where}: {report.problems}")


def rebuild_spine(root: Path) -> None:
    """Rewrites merkle.spine from the segments' current payloads (a forger's consistent spine)."""
    leaves = []
    for seg in segments(root):
        data = seg.read_bytes()
        for pos, length in frames(data)[1]:
            leaves.append(merkle.leaf_hash(data[pos + FRAME.size : pos + FRAME.size + length]))
    path = str(root / "merkle.spine")
    spine = Spine.open(path, FileLayer(), writable=True)
    spine.truncate(0)
    spine.append_many(leaves)
    spine.sync()
    spine.close()


def checkpoint_lines(root: Path) -> list[bytes]:
    """The lines of checkpoints.jsonl, newline included."""
    return (root / "checkpoints.jsonl").read_bytes().splitlines(keepends=True)


def write_key_pair(directory: Path, name: str) -> tuple[Path, bytes]:
    """Generates an Ed25519 key: returns the private key's PEM path and the public key's PEM bytes."""
    key = ed25519.Ed25519PrivateKey.generate()
    path = directory / f"{name}.pem"
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return path, public


def assert_crash_tail_warning(report: VerifyReport, first: int, count: int) -> str:
    """The report's one warning about a crash tail of ``count`` records from seq ``first``; returns it."""
    which = f"seq {first}" if count == 1 else f"seq {first}..{first + count - 1}"
    found = [w for w in report.warnings if "not in the Merkle tree yet" in w]
    assert len(found) == 1, report.warnings
    assert f"{count} record" in found[0] and which in found[0] and "crash" in found[0], found[0]
    return found[0]


def cut_spine(root: Path, size: int) -> None:
    """Cuts merkle.spine to ``size`` leaves, as if the writer died before hashing the records after."""
    spine = Spine.open(str(root / "merkle.spine"), FileLayer(), writable=True)
    spine.truncate(size)
    spine.sync()
    spine.close()


def abandon(store: AuditStore) -> None:
    """Drops ``store`` like a killed process: synced, no checkpoint, no close, lock released."""
    store.sync()
    store._release_all()


@pytest.fixture(scope="module")
def base_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[bytes]]:
    """A closed store of 30 records over several segments, built once per module (copy before editing)."""
    root = tmp_path_factory.mktemp("verify") / "store"
    raws = build(root, 30, limit=900)
    assert len(segments(root)) >= 3
    return root, raws


def copy_store(src: Path, parent: Path) -> Path:
    """A private copy of a store under ``parent`` (without its LOCK file)."""
    dst = Path(tempfile.mkdtemp(dir=parent)) / "store"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("LOCK"))
    return dst


# ------------------------------------------------------------------------ honest store


class TestHonestStore:
    """An untouched store verifies."""

    def test_reader_and_writer_agree(self, tmp_path: Path) -> None:
        """An honest store is ok for the writer and for a reader, with the right size and root."""
        root = tmp_path / "store"
        with AuditStore.open(StoreConfig(root=root, max_segment_bytes=700)) as store:
            for i in range(25):
                store.append(event(i))
            store.checkpoint()
            store.append(event(25))
            report = store.verify()
            assert report.ok is True and bool(report) is True and report.problems == []
            assert report.tree_size == store.tree_size == 26
            assert report.root == store.merkle_root()
            assert report.records_checked == 26
            root_now = store.merkle_root()
        report = reverify(root)
        assert report.ok and report.tree_size == 26 and report.root == root_now

    def test_empty_store(self, tmp_path: Path) -> None:
        """A new, empty store verifies with the empty-tree root."""
        AuditStore.open(tmp_path / "store").close()
        report = reverify(tmp_path / "store")
        assert report.ok and report.tree_size == 0 and report.root == hashlib.sha256(b"").digest()


# ----------------------------------------------------------------------- record damage


class TestRecordTampering:
    """Any change to a stored payload byte is reported with its file, offset and seq."""

    @settings(max_examples=60, suppress_health_check=EXAMPLES_IN_TMP_PATH)
    @given(
        seq=st.integers(0, 29),
        bit=st.integers(0, 7),
        where=st.floats(0, 1, exclude_max=True),
        crc=st.booleans(),
    )
    def test_flipped_payload_bit(
        self,
        tmp_path: Path,
        base_store: tuple[Path, list[bytes]],
        seq: int,
        bit: int,
        where: float,
        crc: bool,
    ) -> None:
        """A flipped payload bit: a Merkle mismatch with the CRC fixed up, else a CRC mismatch."""
        root = copy_store(base_store[0], tmp_path)
        seg, pos, length = locate(root, seq)
        data = bytearray(seg.read_bytes())
        data[pos + FRAME.size + int(where * length)] ^= 1 << bit
        if crc:
            fix_crc(data, pos)
        seg.write_bytes(bytes(data))
        problem = assert_reported(reverify(root), seg, offset=pos, seq=seq)
        if crc:
            assert any(
                "Merkle leaf" in p.reason for p in reverify(root).problems if (p.offset, p.seq) == (pos, seq)
            )
        else:
            assert "CRC" in problem.reason

    def test_every_byte_of_one_record(self, tmp_path: Path, base_store: tuple[Path, list[bytes]]) -> None:
        """Exhaustively over one record: each payload byte changed (CRC fixed) is caught at that record."""
        root = copy_store(base_store[0], tmp_path)
        seg, pos, length = locate(root, 7)
        original = seg.read_bytes()
        for i in range(length):
            data = bytearray(original)
            data[pos + FRAME.size + i] ^= 0x01
            fix_crc(data, pos)
            seg.write_bytes(bytes(data))
            assert_reported(reverify(root), seg, offset=pos, seq=7)
        seg.write_bytes(original)
        assert reverify(root).ok

    def test_wrong_seq_with_consistent_spine(
        self, tmp_path: Path, base_store: tuple[Path, list[bytes]]
    ) -> None:
        """A record re-framed with another seq and a spine rebuilt to match still fails the seq check."""
        root = copy_store(base_store[0], tmp_path)
        seg, pos, length = locate(root, 12)
        data = bytearray(seg.read_bytes())
        payload = bytes(data[pos + FRAME.size : pos + FRAME.size + length])
        forged = payload.replace(b'"seq":12', b'"seq":13')
        assert forged != payload and len(forged) == length
        data[pos + FRAME.size : pos + FRAME.size + length] = forged
        fix_crc(data, pos)
        seg.write_bytes(bytes(data))
        rebuild_spine(root)
        report = reverify(root)
        problem = assert_reported(report, seg, offset=pos, seq=12)
        assert "carries seq 13" in problem.reason
        assert not any("Merkle leaf" in p.reason for p in report.problems), "the leaf was patched to match"
        assert not any(p.file.endswith("merkle.spine") for p in report.problems), (
            "the spine is self-consistent"
        )

    def test_swapped_records_with_consistent_spine(self, tmp_path: Path) -> None:
        """Two records swapped in place (spine rebuilt to match) are both reported by the seq check."""
        root = tmp_path / "store"
        build(root, 10)
        [seg] = segments(root)
        data = seg.read_bytes()
        fr = frames(data)[1]
        a, b = fr[3], fr[4]
        chunk_a = data[a[0] : a[0] + FRAME.size + a[1]]
        chunk_b = data[b[0] : b[0] + FRAME.size + b[1]]
        seg.write_bytes(data[: a[0]] + chunk_b + chunk_a + data[b[0] + FRAME.size + b[1] :])
        rebuild_spine(root)
        report = reverify(root)
        assert_reported(report, seg, seq=3)
        assert_reported(report, seg, seq=4)

    def test_seq_of_another_type(self, tmp_path: Path) -> None:
        """A record whose seq is ``true`` at position 1 (equal to 1 in Python) is still reported."""
        root = tmp_path / "store"
        build(root, 3)
        [seg] = segments(root)
        data = seg.read_bytes()
        _, (p1, n1), (p2, _) = frames(data)[1]
        payload = orjson.loads(data[p1 + FRAME.size : p1 + FRAME.size + n1])
        payload["seq"] = True
        body = orjson.dumps(payload, option=orjson.OPT_SORT_KEYS)
        seg.write_bytes(data[:p1] + FRAME.pack(len(body), zlib.crc32(body)) + body + data[p2:])
        rebuild_spine(root)
        assert_reported(reverify(root), seg, offset=p1, seq=1)

    @pytest.mark.parametrize(
        "forge",
        [
            pytest.param(lambda p: {**p, "seq": 2, "ctx": {"seq": 1}}, id="nested-seq-holds-the-right-value"),
            pytest.param(lambda p: {**p, "seq": 1.0}, id="float-seq"),
            pytest.param(lambda p: {**p, "seq": "1"}, id="string-seq"),
            pytest.param(lambda p: {**p, "seq": -1}, id="negative-seq"),
        ],
    )
    def test_seq_fast_path_cannot_be_fooled(self, tmp_path: Path, forge: Any) -> None:
        """The textual seq check falls back to parsing whenever it could be misled."""
        root = tmp_path / "store"
        build(root, 3)
        [seg] = segments(root)
        data = seg.read_bytes()
        _, (p1, n1), (p2, _) = frames(data)[1]
        body = orjson.dumps(
            forge(orjson.loads(data[p1 + FRAME.size : p1 + FRAME.size + n1])), option=orjson.OPT_SORT_KEYS
        )
        seg.write_bytes(data[:p1] + FRAME.pack(len(body), zlib.crc32(body)) + body + data[p2:])
        rebuild_spine(root)
        assert_reported(reverify(root), seg, offset=p1, seq=1)


# ------------------------------------------------------------------- missing files


class TestMissingData:
    """Removed segments and a cut spine are reported, naming the file."""

    def test_middle_segment_deleted(self, tmp_path: Path, base_store: tuple[Path, list[bytes]]) -> None:
        """A deleted middle segment is named, and the records it held are reported missing."""
        root = copy_store(base_store[0], tmp_path)
        segs = segments(root)
        victim = segs[1]
        first = frames(victim.read_bytes())[0]
        victim.unlink()
        report = reverify(root)
        assert_reported(report, victim)
        problem = assert_reported(report, segs[2], seq=first)
        assert "missing" in problem.reason

    def test_last_segment_deleted(self, tmp_path: Path, base_store: tuple[Path, list[bytes]]) -> None:
        """A deleted last segment is named and the spine reports records removed from the end."""
        root = copy_store(base_store[0], tmp_path)
        victim = segments(root)[-1]
        start = frames(victim.read_bytes())[0]
        victim.unlink()
        report = reverify(root)
        assert_reported(report, victim)
        assert_reported(report, root / "merkle.spine", seq=start)

    def test_first_segment_deleted(self, tmp_path: Path, base_store: tuple[Path, list[bytes]]) -> None:
        """Without a retention record, a log that no longer starts at seq 0 is reported."""
        root = copy_store(base_store[0], tmp_path)
        segs = segments(root)
        segs[0].unlink()
        assert_reported(reverify(root), segs[1], seq=0)

    @pytest.mark.parametrize("launder", [False, True])
    def test_forged_retention_record_excuses_nothing(
        self, tmp_path: Path, base_store: tuple[Path, list[bytes]], launder: bool
    ) -> None:
        """Segments deleted by hand plus a forged retention record appended (unhashed, or hashed in by a
        writer open that never checkpoints): no checkpoint covers the record, so the gap is reported."""
        from quipu_logging.store import _format as fmt

        root = copy_store(base_store[0], tmp_path)
        segs = segments(root)
        tree = AuditStore.open_reader(root).tree_size
        below = frames(segs[2].read_bytes())[0]
        for seg in segs[:2]:
            seg.unlink()
            seg.with_suffix(".idx").unlink(missing_ok=True)
        forged = {"$sys": "retention", "removed_below": below, "seq": tree, "ts": 1_800_000_000_000_000}
        with open(segs[-1], "ab") as f:
            f.write(fmt.encode_frame(orjson.dumps(forged)))
        if launder:
            abandon(AuditStore.open(root))  # recovery hashes the frame in; no checkpoint follows
        report = reverify(root)
        assert not report.ok
        assert any(f"records 0..{below - 1} are missing" in p.reason for p in report.problems), (
            report.problems
        )

    def test_all_segments_deleted(self, tmp_path: Path, base_store: tuple[Path, list[bytes]]) -> None:
        """A log directory emptied of segments is reported even though the spine is intact."""
        root = copy_store(base_store[0], tmp_path)
        for seg in segments(root):
            seg.unlink()
        report = reverify(root)
        assert_reported(report, root / "log")

    def test_log_directory_deleted(self, tmp_path: Path, base_store: tuple[Path, list[bytes]]) -> None:
        """The whole log/ directory removed is tampering (exit 1 in the CLI), not an unreadable path."""
        import shutil

        from quipu_logging.cli import main

        root = copy_store(base_store[0], tmp_path)
        shutil.rmtree(root / "log")
        report = reverify(root)
        assert "deleted" in assert_reported(report, root / "log").reason
        assert main(["verify", str(root)]) == 1

    def test_segment_cut_short(self, tmp_path: Path, base_store: tuple[Path, list[bytes]]) -> None:
        """A sealed segment cut at a frame boundary is reported at the next segment."""
        root = copy_store(base_store[0], tmp_path)
        segs = segments(root)
        base, fr = frames(segs[0].read_bytes())
        with open(segs[0], "r+b") as f:
            f.truncate(fr[-1][0])
        assert_reported(reverify(root), segs[1], seq=base + len(fr) - 1)

    @pytest.mark.parametrize("keep", [0, 1, 17, 29])
    def test_spine_truncated(self, tmp_path: Path, base_store: tuple[Path, list[bytes]], keep: int) -> None:
        """A spine cut to fewer leaves is reported on the spine, the orphaned records and the checkpoint."""
        root = copy_store(base_store[0], tmp_path)
        spine = root / "merkle.spine"
        with open(spine, "r+b") as f:
            f.truncate(SPINE_HEADER + HASH * stored_hash_count(keep))
        report = reverify(root)
        assert report.tree_size == keep
        assert_reported(report, spine)
        assert_reported(report, locate(root, keep)[0], seq=keep)
        assert_reported(report, root / "checkpoints.jsonl")


class TestLiveWindow:
    """Frames beyond the spine are a live writer's in-flight window, and a problem otherwise."""

    def test_pending_while_live_and_after_a_crash(self, tmp_path: Path) -> None:
        """A whole frame past the spine is pending while the writer holds the lock, and after it dies.

        Dead, it is a crash tail (see :class:`TestCrashTail`): still pending, now with a
        warning, until the next writer open hashes it in.
        """
        root = tmp_path / "s"
        writer = AuditStore.open(root)
        for i in range(5):
            writer.append(event(i))
        writer.sync()
        [seg] = segments(root)
        body = orjson.dumps({"i": 5, "seq": 5, "ts": 1}, option=orjson.OPT_SORT_KEYS)
        with open(seg, "ab") as f:  # what a reader sees between the writer's segment and spine writes
            f.write(FRAME.pack(len(body), zlib.crc32(body)) + body)
        report = reverify(root)
        assert report.ok, report.problems
        assert report.pending == 1 and report.tree_size == 5
        assert report.warnings == []  # a live writer's in-flight window is no news
        writer._release_all()  # the writer dies without publishing the record
        report = reverify(root)
        assert report.ok, report.problems
        assert report.pending == 1 and report.tree_size == 5
        assert_crash_tail_warning(report, 5, 1)
        AuditStore.open(root).close()
        report = reverify(root)
        assert report.ok and report.pending == 0 and report.tree_size == 6 and report.warnings == []

    def test_torn_frame_while_live(self, tmp_path: Path) -> None:
        """Half a frame ending the active segment of a live store is an unfinished write, not a problem."""
        root = tmp_path / "s"
        with AuditStore.open(root) as writer:
            writer.append(event(0))
            writer.sync()
            [seg] = segments(root)
            with open(seg, "ab") as f:
                f.write(FRAME.pack(50, 0) + b'{"i":1')
            assert reverify(root).ok
            with open(seg, "r+b") as f:
                f.truncate(f.seek(0, 2) - 14)

    def test_garbage_after_sealed_segment(self, tmp_path: Path, base_store: tuple[Path, list[bytes]]) -> None:
        """Bytes after the last frame of a sealed segment are reported at their offset."""
        root = copy_store(base_store[0], tmp_path)
        seg = segments(root)[0]
        size = seg.stat().st_size
        with open(seg, "ab") as f:
            f.write(b"\x01\x00\x00")
        assert_reported(reverify(root), seg, offset=size)


# A child that writes a store and is SIGKILLed by its own file layer right after a segment write
# returns: its frames are on disk (in the page cache, which a process kill keeps), their spine
# leaves are not. argv: ROOT, "store" (AuditStore directly) or "handler" (AuditHandler).
CRASH_CHILD = r"""
import logging, os, signal, sys, threading
from quipu_logging import AuditHandler, AuditPipeline
from quipu_logging.store import AuditStore, FileLayer, StoreConfig

root, how = sys.argv[1], sys.argv[2]


class KillAfterSegmentWrite(FileLayer):
    def __init__(self):
        self.armed = False
        self.names = {}

    def open(self, path, flags, mode=0o644):
        fd = super().open(path, flags, mode)
        self.names[fd] = os.path.basename(path)
        return fd

    def pwrite(self, fd, data, offset):
        super().pwrite(fd, data, offset)
        if self.armed and self.names.get(fd, "").startswith("seg-"):
            os.kill(os.getpid(), signal.SIGKILL)


layer = KillAfterSegmentWrite()
config = StoreConfig(root=root, file_layer=layer)
if how == "store":
    store = AuditStore.open(config)
    store.append_batch([{"i": i} for i in range(12)])
    store.checkpoint()
    store.append_batch([{"i": i} for i in range(12, 20)])
    layer.armed = True
    store.append_batch([{"i": i} for i in range(20, 25)])
else:
    handler = AuditHandler(pipeline=AuditPipeline.start(config))
    logger = logging.getLogger("crash-tail")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    for i in range(12):
        logger.info("rec %d", i, extra={"i": i})
    assert handler.flush(timeout=60)
    layer.armed = True
    for i in range(12, 17):
        logger.info("rec %d", i, extra={"i": i})
    threading.Event().wait(120)  # the writer thread's next segment write kills the process
sys.exit("not killed")
"""


def run_crash_child(root: Path, how: str) -> None:
    """Runs :data:`CRASH_CHILD` and checks that it died of its SIGKILL."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (PACKAGE_PARENT, env.get("PYTHONPATH")) if p)
    proc = subprocess.run(
        [sys.executable, "-c", CRASH_CHILD, str(root), how],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
        check=False,
    )
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stderr[-3000:])


class RollFailsLayer(FileLayer):
    """Fails creating segment 1: a writer stopped between sealing segment 0 and starting the next."""

    def open(self, path: str, flags: int, mode: int = 0o644) -> int:
        if flags & os.O_CREAT and os.path.basename(path) == "seg-0000000001.log":
            raise OSError(errno.ENOSPC, "injected: no space for the next segment", path)
        return super().open(path, flags, mode)


class TestCrashTail:
    """A writer killed between writing frames and hashing them leaves a crash tail, not tampering.

    With no writer holding the lock, whole frames that follow the spine contiguously in
    the active (newest) segment, after the last checkpoint, are what the next writer open
    hashes in: verify counts them as ``pending`` and says so in ``warnings``. Anything
    else beyond the spine stays a problem.
    """

    @pytest.mark.parametrize("how", ["store", "handler"])
    def test_sigkill_between_frames_and_spine(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str], how: str
    ) -> None:
        """A real SIGKILL after a segment write: ok, pending and a warning; after a reopen ok and whole."""
        from quipu_logging.cli import main

        root = tmp_path / "s"
        run_crash_child(root, how)
        report = reverify(root)
        assert report.ok, report.problems
        hashed, written = (20, 25) if how == "store" else (12, 17)
        assert report.tree_size == hashed
        # The store kill comes with the batch's one write; the handler's writer thread may have
        # taken the five records in more than one batch, and died at the first.
        assert report.pending == 5 if how == "store" else 1 <= report.pending <= 5
        assert report.records_checked == hashed  # the pending ones have no leaf to be checked against
        warning = assert_crash_tail_warning(report, hashed, report.pending)
        pending = report.pending

        assert main(["verify", str(root)]) == 0
        out, err = capsys.readouterr()
        assert out.startswith("ok: ") and f"{pending} pending" in out, out
        assert warning in err
        assert main(["verify", "--json", str(root)]) == 0
        as_json = orjson.loads(capsys.readouterr().out)
        assert as_json["ok"] is True and as_json["pending"] == pending and as_json["problems"] == []
        assert as_json["warnings"] == [warning]

        with AuditStore.open(root) as writer:  # recovery hashes the tail in
            assert writer.tree_size == hashed + pending
            assert any("added" in r and "spine" in r for r in writer.repairs), writer.repairs
        report = reverify(root)
        assert report.ok and report.pending == 0 and report.warnings == []
        assert report.tree_size == hashed + pending
        with AuditStore.open_reader(root) as reader:
            assert [r.payload["i"] for r in reader.scan()] == list(range(hashed + pending))
        assert written >= hashed + pending

    @settings(max_examples=30, deadline=None, suppress_health_check=EXAMPLES_IN_TMP_PATH)
    @given(
        n=st.integers(0, 40),
        at=st.floats(0, 1),
        cut=st.floats(0, 1),
        limit=st.sampled_from([64 * 1024 * 1024, 700]),
    )
    def test_verify_accepts_what_recovery_hashes_in(
        self, tmp_path: Path, n: int, at: float, cut: float, limit: int
    ) -> None:
        """A spine cut after the last checkpoint is ok (pending, warning) and reopens to the same tree;
        cut below it, verify fails and the writer refuses to open."""
        root = Path(tempfile.mkdtemp(dir=tmp_path)) / "s"
        c = int(n * at)
        store = AuditStore.open(StoreConfig(root=root, max_segment_bytes=limit))
        store.append_batch([event(i) for i in range(c)])
        if c:
            store.checkpoint()
        store.append_batch([event(i) for i in range(c, n)])
        floor = store.last_checkpoint.tree_size if store.last_checkpoint else 0
        full_root = store.merkle_root()
        abandon(store)
        t = int(n * cut)
        cut_spine(root, t)
        report = reverify(root)
        if t >= floor:
            assert report.ok, report.problems
            assert (report.tree_size, report.pending, report.records_checked) == (t, n - t, t)
            if n > t:
                assert_crash_tail_warning(report, t, n - t)
            else:
                assert report.warnings == []
            with AuditStore.open(root) as writer:
                assert writer.tree_size == n and writer.merkle_root() == full_root
            report = reverify(root)
            assert report.ok and report.pending == 0 and report.tree_size == n
        else:
            assert report.ok is False and report.pending == 0
            assert_reported(report, root / "checkpoints.jsonl")
            assert_reported(report, locate(root, t)[0], seq=t)
            with pytest.raises(CorruptionError):
                AuditStore.open(root)

    def test_spine_shorter_than_the_last_checkpoint(self, tmp_path: Path) -> None:
        """Records after the checkpoint do not excuse a spine cut below it: every orphan is a problem."""
        root = tmp_path / "s"
        store = AuditStore.open(root)
        store.append_batch([event(i) for i in range(10)])
        store.checkpoint()
        store.append_batch([event(i) for i in range(10, 15)])
        abandon(store)
        cut_spine(root, 8)
        report = reverify(root)
        assert report.pending == 0 and not any("Merkle tree yet" in w for w in report.warnings)
        [seg] = segments(root)
        for seq in range(8, 15):
            assert_reported(report, seg, seq=seq)
        assert_reported(report, root / "checkpoints.jsonl")

    def test_frames_in_a_sealed_segment(self, tmp_path: Path, base_store: tuple[Path, list[bytes]]) -> None:
        """Frames beyond the spine in a sealed segment are a problem, even with the checkpoints after gone.

        Removing the newest checkpoint lines looks like a crash before they were written, so the
        spine cut is the only trace: no crash leaves a sealed segment's records unhashed (a
        rollover syncs the spine before it seals), so it stays a problem, and so do the newest
        segment's records, which no longer follow the spine.
        """
        root = copy_store(base_store[0], tmp_path)
        segs = segments(root)
        base1 = frames(segs[1].read_bytes())[0]
        keep = base1 + 1  # one record into the second segment, which is sealed
        lines = checkpoint_lines(root)
        (root / "checkpoints.jsonl").write_bytes(
            b"".join(line for line in lines if orjson.loads(line)["tree_size"] <= keep)
        )
        assert AuditStore.open_reader(root).last_checkpoint is not None  # one checkpoint is left
        cut_spine(root, keep)
        report = reverify(root)
        assert report.pending == 0 and not any("Merkle tree yet" in w for w in report.warnings)
        assert_reported(report, segs[1], seq=keep)
        newest_base = frames(segs[-1].read_bytes())[0]
        assert_reported(report, segs[-1], seq=newest_base)
        assert_reported(report, root / "merkle.spine")

    def test_newest_segment_already_sealed(self, tmp_path: Path) -> None:
        """A newest segment with a sidecar was sealed (spine synced first): unhashed frames are a problem.

        The writer stops between sealing segment 0 and creating segment 1 (an injected ENOSPC);
        a spine cut after that is no crash. Without the sidecar the same bytes are a crash tail.
        """
        root = tmp_path / "s"
        store = AuditStore.open(StoreConfig(root=root, max_segment_bytes=700, file_layer=RollFailsLayer()))
        with pytest.raises(OSError):
            for i in range(100):
                store.append(event(i))
        store._release_all()
        [seg] = segments(root)
        sidecar = seg.with_suffix(".idx")
        assert sidecar.exists()
        count = len(frames(seg.read_bytes())[1])
        assert reverify(root).ok and AuditStore.open_reader(root).last_checkpoint is None
        cut_spine(root, count - 2)
        report = reverify(root)
        assert report.pending == 0
        assert_reported(report, seg, seq=count - 2)
        assert_reported(report, seg, seq=count - 1)
        sidecar.unlink()
        report = reverify(root)
        assert report.ok and report.pending == 2, report.problems
        assert_crash_tail_warning(report, count - 2, 2)

    def test_damage_after_the_tail(self, tmp_path: Path) -> None:
        """A crash tail followed by a damaged frame and a valid one is damage, not a crash: all problems."""
        root = tmp_path / "s"
        store = AuditStore.open(root)
        store.append_batch([event(i) for i in range(10)])
        abandon(store)
        cut_spine(root, 6)
        assert reverify(root).ok
        seg, pos, _ = locate(root, 8)
        data = bytearray(seg.read_bytes())
        data[pos + FRAME.size + 3] ^= 0x01  # seq 8's CRC no longer matches; seq 9 follows, whole
        seg.write_bytes(bytes(data))
        report = reverify(root)
        assert report.pending == 0 and not any("Merkle tree yet" in w for w in report.warnings)
        assert_reported(report, seg, offset=pos)
        assert_reported(report, seg, seq=6)
        assert_reported(report, seg, seq=7)

    def test_anchor_beyond_the_spine(self, tmp_path: Path) -> None:
        """An anchor covering the tail's records catches a spine cut that removed checkpoints hide."""
        root = tmp_path / "s"
        store = AuditStore.open(root)
        store.append_batch([event(i) for i in range(6)])
        store.checkpoint()
        store.append_batch([event(i) for i in range(6, 12)])
        anchor = store.checkpoint().to_json()
        abandon(store)
        lines = checkpoint_lines(root)
        (root / "checkpoints.jsonl").write_bytes(lines[0])  # the newest line goes, like a crash before it
        cut_spine(root, 8)
        assert reverify(root).ok  # without the anchor, only the warning says anything
        report = reverify(root, anchor=anchor)
        assert_reported(report, "anchor")


# ---------------------------------------------------------------------- spine damage


class TestSpineTampering:
    """The spine's own hashes are checked."""

    def test_node_hash_flipped(self, tmp_path: Path, base_store: tuple[Path, list[bytes]]) -> None:
        """A flipped interior node hash is reported at its byte offset in the spine."""
        root = copy_store(base_store[0], tmp_path)
        spine = root / "merkle.spine"
        offset = SPINE_HEADER + HASH * stored_hash_index(2, 3)  # the node over leaves 12..15
        data = bytearray(spine.read_bytes())
        data[offset + 9] ^= 0x80
        spine.write_bytes(bytes(data))
        assert_reported(reverify(root), spine, offset=offset)

    @pytest.mark.parametrize("level_k", [(0, 0), (1, 0), (0, 29), (4, 0), (3, 2)])
    def test_any_stored_hash_flipped(
        self, tmp_path: Path, base_store: tuple[Path, list[bytes]], level_k: tuple[int, int]
    ) -> None:
        """Leaf, interior and frontier hashes: each flip makes verify fail (a leaf names its record)."""
        root = copy_store(base_store[0], tmp_path)
        spine = root / "merkle.spine"
        offset = SPINE_HEADER + HASH * stored_hash_index(*level_k)
        data = bytearray(spine.read_bytes())
        data[offset] ^= 0x01
        spine.write_bytes(bytes(data))
        report = reverify(root)
        assert report.ok is False
        level, k = level_k
        if level == 0:
            assert_reported(report, locate(root, k)[0], seq=k)  # the record no longer matches its leaf

    def test_spine_bad_magic(self, tmp_path: Path, base_store: tuple[Path, list[bytes]]) -> None:
        """A spine whose header is damaged is refused by the writer and named by the error."""
        root = copy_store(base_store[0], tmp_path)
        spine = root / "merkle.spine"
        data = bytearray(spine.read_bytes())
        data[0:4] = b"XXXX"
        spine.write_bytes(bytes(data))
        with pytest.raises(CorruptionError) as err:
            AuditStore.open(root)
        assert err.value.file == str(spine)


# ---------------------------------------------------------------------- checkpoints


def store_with_checkpoints(root: Path, key: Path | None = None) -> None:
    """A closed store with four checkpoints (three explicit, one on close)."""
    with AuditStore.open(StoreConfig(root=root, signing_key=key)) as store:
        for round_ in range(3):
            for i in range(5):
                store.append(event(round_ * 5 + i))
            store.checkpoint()
        store.append(event(99))
    assert len(checkpoint_lines(root)) == 4


class TestCheckpointChain:
    """Checkpoint lines form a chain; edits, removals and reordering break it."""

    def test_honest_chain(self, tmp_path: Path) -> None:
        """Four chained checkpoints of a growing tree verify."""
        store_with_checkpoints(tmp_path / "s")
        assert reverify(tmp_path / "s").ok

    @pytest.mark.parametrize("index", [0, 1, 2])
    def test_line_removed(self, tmp_path: Path, index: int) -> None:
        """Removing a checkpoint line (not the newest) breaks the chain at the next line."""
        root = tmp_path / "s"
        store_with_checkpoints(root)
        lines = checkpoint_lines(root)
        offset_next = sum(len(x) for x in lines[:index])  # the next line moves up to this offset
        del lines[index]
        (root / "checkpoints.jsonl").write_bytes(b"".join(lines))
        problem = assert_reported(reverify(root), root / "checkpoints.jsonl", offset=offset_next)
        assert "chain" in problem.reason

    @pytest.mark.parametrize("field", ["created_at", "tree_size", "root", "segment_seq", "sig"])
    def test_line_edited(self, tmp_path: Path, field: str) -> None:
        """Editing any field of a checkpoint line is reported on that line."""
        root = tmp_path / "s"
        store_with_checkpoints(root)
        lines = checkpoint_lines(root)
        cp = orjson.loads(lines[1])
        if field in ("root", "sig"):
            cp[field] = hashlib.sha256(cp[field].encode()).hexdigest()
        else:
            cp[field] = cp[field] - 1
        lines[1] = orjson.dumps(cp) + b"\n"
        (root / "checkpoints.jsonl").write_bytes(b"".join(lines))
        assert_reported(reverify(root), root / "checkpoints.jsonl", offset=len(lines[0]))

    def test_lines_reordered(self, tmp_path: Path) -> None:
        """Swapping two checkpoint lines is reported."""
        root = tmp_path / "s"
        store_with_checkpoints(root)
        lines = checkpoint_lines(root)
        lines[1], lines[2] = lines[2], lines[1]
        (root / "checkpoints.jsonl").write_bytes(b"".join(lines))
        assert_reported(reverify(root), root / "checkpoints.jsonl")

    def test_unreadable_line(self, tmp_path: Path) -> None:
        """A checkpoint line that is not a checkpoint is reported at its offset."""
        root = tmp_path / "s"
        store_with_checkpoints(root)
        size = (root / "checkpoints.jsonl").stat().st_size
        with open(root / "checkpoints.jsonl", "ab") as f:
            f.write(b"not json\n")
        assert_reported(reverify(root), root / "checkpoints.jsonl", offset=size)

    def test_consistent_forgery_caught_by_checkpoint(self, tmp_path: Path) -> None:
        """A record rewritten with a spine rebuilt to match is caught by the checkpoint roots."""
        root = tmp_path / "s"
        store_with_checkpoints(root)
        [seg] = segments(root)
        _, pos, length = locate(root, 2)
        data = bytearray(seg.read_bytes())
        payload = bytes(data[pos + FRAME.size : pos + FRAME.size + length])
        data[pos + FRAME.size : pos + FRAME.size + length] = payload.replace(b'"update"', b'"delete"')
        fix_crc(data, pos)
        seg.write_bytes(bytes(data))
        rebuild_spine(root)
        report = reverify(root)
        assert_reported(report, root / "checkpoints.jsonl")
        assert all(p.file.endswith("checkpoints.jsonl") for p in report.problems)


# ---------------------------------------------------------------------------- keys


class TestSignatures:
    """Ed25519-signed checkpoints verify against the given public keys."""

    def test_signed_store_verifies(self, tmp_path: Path) -> None:
        """A signed store verifies with its public key as PEM bytes, str, path or key object."""
        key_path, public = write_key_pair(tmp_path, "k1")
        root = tmp_path / "s"
        store_with_checkpoints(root, key_path)
        key_obj = serialization.load_pem_public_key(public)
        pub_path = tmp_path / "k1.pub"
        pub_path.write_bytes(public)
        for keys in ([public], [public.decode()], [pub_path], [str(pub_path)], [key_obj]):
            report = reverify(root, public_keys=keys)
            assert report.ok, (keys, report.problems)
        assert reverify(root).ok  # without keys only the chain is checked

    def test_wrong_key(self, tmp_path: Path) -> None:
        """A signed store checked against another key reports every checkpoint."""
        key_path, _public = write_key_pair(tmp_path, "k1")
        _other_path, other = write_key_pair(tmp_path, "k2")
        root = tmp_path / "s"
        store_with_checkpoints(root, key_path)
        report = reverify(root, public_keys=[other])
        assert_reported(report, root / "checkpoints.jsonl")
        assert sum(p.file.endswith("checkpoints.jsonl") for p in report.problems) == 4

    def test_unsigned_store_with_keys(self, tmp_path: Path) -> None:
        """An unsigned store checked with keys is a problem (a signature was expected)."""
        _key_path, public = write_key_pair(tmp_path, "k1")
        root = tmp_path / "s"
        store_with_checkpoints(root)
        problem = assert_reported(reverify(root, public_keys=[public]), root / "checkpoints.jsonl")
        assert "unsigned" in problem.reason

    def test_forged_signature(self, tmp_path: Path) -> None:
        """A signed line whose fields were edited (signature kept) fails with the right key."""
        key_path, public = write_key_pair(tmp_path, "k1")
        root = tmp_path / "s"
        store_with_checkpoints(root, key_path)
        lines = checkpoint_lines(root)
        cp = orjson.loads(lines[-1])
        cp["created_at"] += 1
        lines[-1] = orjson.dumps(cp) + b"\n"
        (root / "checkpoints.jsonl").write_bytes(b"".join(lines))
        offset = sum(len(x) for x in lines[:-1])
        problem = assert_reported(
            reverify(root, public_keys=[public]), root / "checkpoints.jsonl", offset=offset
        )
        assert "signature" in problem.reason

    def test_key_rotation(self, tmp_path: Path) -> None:
        """Checkpoints signed by two keys in turn verify with both keys and fail with only the new one."""
        k1, pub1 = write_key_pair(tmp_path, "k1")
        k2, pub2 = write_key_pair(tmp_path, "k2")
        root = tmp_path / "s"
        store_with_checkpoints(root, k1)
        with AuditStore.open(StoreConfig(root=root, signing_key=k2)) as store:
            store.append(event(100))
        assert reverify(root, public_keys=[pub1, pub2]).ok
        assert not reverify(root, public_keys=[pub2]).ok


# -------------------------------------------------------------------------- anchor


class TestAnchor:
    """An anchor (a checkpoint saved elsewhere) proves the current tree extends it."""

    def _anchored(self, tmp_path: Path) -> tuple[Path, Checkpoint, bytes]:
        root = tmp_path / "s"
        with AuditStore.open(StoreConfig(root=root, max_segment_bytes=800)) as store:
            for i in range(20):
                store.append(event(i))
            cp = store.checkpoint()
            line = checkpoint_lines(root)[-1]
            for i in range(20, 45):
                store.append(event(i))
        return root, cp, line

    def test_honest_growth(self, tmp_path: Path) -> None:
        """The grown store extends the anchor in every accepted form (object, dict, line, bytes, path)."""
        root, cp, line = self._anchored(tmp_path)
        saved = tmp_path / "anchor.json"
        saved.write_bytes(line)
        for anchor in (cp, cp.to_dict(), line.decode(), line, saved, str(saved)):
            report = reverify(root, anchor=anchor)
            assert report.ok, (anchor, report.problems)
        assert AuditStore.open(root).verify(anchor=cp).ok

    def test_truncated_below_anchor(self, tmp_path: Path) -> None:
        """A store rebuilt shorter than the anchor verifies alone but fails against the anchor."""
        root, cp, _line = self._anchored(tmp_path)
        shutil.rmtree(root)
        build(root, 10)
        assert reverify(root).ok
        problem = assert_reported(reverify(root, anchor=cp), "anchor")
        assert "truncated" in problem.reason

    def test_rebuilt_with_other_content(self, tmp_path: Path) -> None:
        """A store rebuilt from scratch with other records verifies alone but fails against the anchor."""
        root, cp, _line = self._anchored(tmp_path)
        shutil.rmtree(root)
        with AuditStore.open(root) as store:
            for i in range(60):
                store.append({"i": i, "actor": "mallory"})
        assert reverify(root).ok
        problem = assert_reported(reverify(root, anchor=cp), "anchor")
        assert "does not extend" in problem.reason

    def test_signed_anchor_checked(self, tmp_path: Path) -> None:
        """With keys given, the anchor's own signature is checked too."""
        key_path, public = write_key_pair(tmp_path, "k1")
        _other, other = write_key_pair(tmp_path, "k2")
        root = tmp_path / "s"
        with AuditStore.open(StoreConfig(root=root, signing_key=key_path)) as store:
            store.append(event(0))
            cp = store.checkpoint()
            store.append(event(1))
        assert reverify(root, public_keys=[public], anchor=cp).ok
        forged = {**cp.to_dict(), "sig": "00" * 64}
        assert_reported(reverify(root, public_keys=[public], anchor=forged), "anchor")
        assert not reverify(root, public_keys=[other], anchor=cp).ok

    def test_unreadable_anchor(self, tmp_path: Path) -> None:
        """An anchor that is not a checkpoint is a problem, not an exception."""
        root, _cp, _line = self._anchored(tmp_path)
        assert_reported(reverify(root, anchor='{"tree_size": 3}'), "anchor")


# -------------------------------------------------------------------------- proofs


@pytest.fixture(scope="module")
def store50(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A 50-record store spanning segments, kept open for the module."""
    root = tmp_path_factory.mktemp("proofs") / "s"
    build(root, 50, limit=1500)
    store = AuditStore.open_reader(root)
    yield store
    store.close()


class TestProofs:
    """prove_inclusion / prove_consistency for every seq and size of a 50-record store."""

    def test_every_inclusion_proof(self, store50: AuditStore) -> None:
        """Every (seq, size) inclusion proof verifies, matches the stored leaf, round-trips via JSON."""
        leaves = [r.leaf_hash for r in store50.scan()]
        assert len(leaves) == 50
        for size in range(1, 51):
            root = store50.merkle_root(size)
            assert root == merkle.root(leaves[:size])
            for seq in range(size):
                proof = store50.prove_inclusion(seq, size)
                assert (proof.seq, proof.tree_size, proof.leaf_hash, proof.root) == (
                    seq,
                    size,
                    leaves[seq],
                    root,
                )
                assert merkle.verify_inclusion(proof.leaf_hash, seq, size, list(proof.path), proof.root)
                assert InclusionProof.from_json(proof.to_json()) == proof
                if proof.path:
                    bad = (bytes(32), *proof.path[1:])
                    assert not merkle.verify_inclusion(proof.leaf_hash, seq, size, list(bad), proof.root)
        latest = store50.prove_inclusion(10)
        assert latest.tree_size == 50 and latest.root == store50.merkle_root()

    def test_every_consistency_proof(self, store50: AuditStore) -> None:
        """Every (old, new) consistency proof verifies and round-trips through JSON."""
        for new in range(51):
            for old in range(new + 1):
                proof = store50.prove_consistency(old, new)
                assert (proof.old_root, proof.new_root) == (
                    store50.merkle_root(old),
                    store50.merkle_root(new),
                )
                assert merkle.verify_consistency(old, new, proof.old_root, proof.new_root, list(proof.path))
                again = ConsistencyProof.from_json(proof.to_json())
                assert again == proof
                if 0 < old < new:
                    assert not merkle.verify_consistency(
                        old, new, bytes(32), proof.new_root, list(proof.path)
                    )
        assert store50.prove_consistency(7).new_size == 50

    @pytest.mark.parametrize("args", [(-1, None), (50, None), (0, 0), (0, 51), (5, 5), (3, -1)])
    def test_inclusion_out_of_range(self, store50: AuditStore, args: tuple[int, int | None]) -> None:
        """An impossible seq or size raises ValueError."""
        with pytest.raises(ValueError):
            store50.prove_inclusion(*args)

    @pytest.mark.parametrize("args", [(-1, None), (51, None), (10, 5), (0, 51), (0, -1)])
    def test_consistency_out_of_range(self, store50: AuditStore, args: tuple[int, int | None]) -> None:
        """An impossible old or new size raises ValueError."""
        with pytest.raises(ValueError):
            store50.prove_consistency(*args)

    def test_proofs_from_writer_equal_reader(self, store50: AuditStore, tmp_path: Path) -> None:
        """The writer, with unflushed state in memory, gives the same proofs as a reader of the files."""
        root = tmp_path / "w"
        with AuditStore.open(root) as writer:
            for i in range(13):
                writer.append(event(i))
            proofs = [writer.prove_inclusion(s) for s in range(13)]
            cons = [writer.prove_consistency(o) for o in range(14)]
        reader = AuditStore.open_reader(root)
        # close() wrote a checkpoint at size 13, which the reader's proofs now carry
        closing = reader.last_checkpoint
        assert closing is not None and closing.tree_size == 13
        assert [replace(p, checkpoint=closing.to_dict()) for p in proofs] == [
            reader.prove_inclusion(s) for s in range(13)
        ]
        assert [replace(c, checkpoint=closing.to_dict()) for c in cons] == [
            reader.prove_consistency(o) for o in range(14)
        ]
