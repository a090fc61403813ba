"""Recovery of a writer's store on open (DESIGN §4 "Recovery on open", "Rollover"; §5 durability).

A crash is simulated without a clean close: the store is synced (or not) and then
abandoned through ``_release_all()``, which closes its descriptors and drops the
lock without writing a checkpoint, as a killed process would. Power loss uses
``PowerLossFileLayer``. Segment files are parsed here with ``struct`` on purpose,
independently of ``_format``.

Decisions these tests pin down (the design leaves them to the implementation):

* Truncation below the last checkpoint's tree size is refused with a
  ``CorruptionError`` naming the segment, the offset where its data now ends (0
  for a segment cut inside its header) and the reason. ``open(repair=True)``
  then opens with the surviving records and moves what it cuts to
  ``ROOT/quarantine/``: the torn bytes of the segment, if any, and always the
  Merkle spine hashes of the lost records (so even a plain truncation leaves the
  evidence of what was there). The checkpoints are left as they are, so
  ``verify()`` keeps reporting the loss.
* A bad frame followed by a valid one is refused with the bad frame's offset;
  ``repair=True`` moves every byte from that frame on to ``quarantine/``. The
  records so lost are reported by ``verify()`` only when a checkpoint covered
  them; records after the last checkpoint are named by a ``$sys`` gap record
  (``reason: "recovery"``) and their bytes and hashes are in the quarantine files.
* The spine may be completed, trimmed or have torn leaves rewritten after the last
  checkpoint, but a whole leaf is never rewritten to fit a changed record
  (``CorruptionError``; ``repair=True`` quarantines from that record on), and no
  leaf of a sealed segment is ever rewritten. Whenever the spine had hashed records
  the segments no longer hold, their hashes go to ``quarantine/`` and a gap record
  names their seqs: nothing recovery drops is silent.
"""

from __future__ import annotations

import hashlib
import os
import struct
import tempfile
import zlib
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import event as hypothesis_event
from hypothesis import strategies as st

from quipu_logging.errors import CorruptionError, FormatVersionError, NotAStoreError
from quipu_logging.store import AuditStore, FileLayer, PowerLossFileLayer, StoreConfig
from quipu_logging.store._format import Sidecar
from quipu_logging.store._spine import HEADER_SIZE as SPINE_HEADER
from quipu_logging.store._spine import stored_hash_count

SEG_HEADER = struct.Struct("<4sB3sQ")
FRAME = struct.Struct("<II")
HASH = 32

# Hypothesis examples build stores in fresh directories under tmp_path themselves.
EXAMPLES_IN_TMP_PATH = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]


# ---------------------------------------------------------------------------- helpers


class NoSyncLayer(FileLayer):
    """A real file layer without fsyncs: process crashes keep page-cache data, so only speed changes."""

    def fsync(self, fd: int) -> None:
        """Skips the fsync (nothing under test depends on power-loss durability)."""

    def fsync_dir(self, path: str) -> None:
        """Skips the directory fsync."""


def crash(store: AuditStore, *, sync: bool = True) -> None:
    """Abandons ``store`` like a killed process: optional sync, no checkpoint, no close."""
    if sync:
        store.sync()
    store._release_all()


def event(i: int, size: int) -> dict[str, Any]:
    """A record with a recognisable index and ``size`` bytes of padding."""
    return {"i": i, "actor": f"user-{i % 7}", "pad": "x" * size}


def segments(root: Path) -> list[Path]:
    """The segment files of a store, oldest first."""
    return sorted((root / "log").glob("seg-*.log"))


def parse_segment(data: bytes) -> tuple[int, list[tuple[int, int]]]:
    """Returns ``(base_index, [(offset, payload length)])`` of the whole, CRC-clean frames of a segment."""
    magic, version, pad, base = SEG_HEADER.unpack_from(data, 0)
    assert (magic, version, pad) == (b"QLOG", 1, b"\0\0\0")
    frames = []
    pos = SEG_HEADER.size
    while pos + FRAME.size <= len(data):
        length, crc = FRAME.unpack_from(data, pos)
        body = pos + FRAME.size
        if body + length > len(data) or zlib.crc32(data[body : body + length]) != crc:
            break
        frames.append((pos, length))
        pos = body + length
    return base, frames


def raws_of(store: AuditStore) -> list[bytes]:
    """The stored payloads of every record, in ``seq`` order."""
    return [r.raw for r in store.scan()]


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file of a store (but its LOCK) by relative path."""
    out = {}
    for path in root.rglob("*"):
        if path.is_file() and path.name != "LOCK":
            out[str(path.relative_to(root))] = path.read_bytes()
    return out


def restore(root: Path, snap: dict[str, bytes]) -> None:
    """Puts a store back exactly as :func:`snapshot` saw it (removing files created since)."""
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames:
            rel = os.path.relpath(os.path.join(dirpath, name), root)
            if rel not in snap and name != "LOCK":
                os.unlink(os.path.join(dirpath, name))
        for name in dirnames:
            full = os.path.join(dirpath, name)
            if not os.listdir(full):
                os.rmdir(full)
    for rel, data in snap.items():
        path = root / rel
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        elif path.read_bytes() != data:
            # Rewrite in place: truncating to zero first makes ext4 flush on close (slow).
            with open(path, "r+b") as f:
                f.write(data)
                f.truncate(len(data))


def truncate(path: Path, size: int) -> None:
    """Cuts a file to ``size`` bytes."""
    with open(path, "r+b") as f:
        f.truncate(size)


def quarantined(root: Path) -> list[Path]:
    """The files moved aside by ``open(repair=True)``."""
    q = root / "quarantine"
    return sorted(q.iterdir()) if q.is_dir() else []


def build_crashed(
    root: Path,
    sizes: list[int],
    *,
    checkpoint_after: int | None = None,
    max_segment_bytes: int = 64 * 1024 * 1024,
    layer: FileLayer | None = None,
) -> tuple[list[bytes], StoreConfig]:
    """Appends one record per size (a checkpoint after ``checkpoint_after`` of them), then crashes.

    Returns the stored payloads and the config to reopen with.
    """
    config = StoreConfig(root=root, max_segment_bytes=max_segment_bytes, file_layer=layer, sync="os")
    store = AuditStore.open(config)
    for i, size in enumerate(sizes):
        if checkpoint_after is not None and i == checkpoint_after:
            store.checkpoint()
        store.append(event(i, size))
    if checkpoint_after is not None and checkpoint_after >= len(sizes):
        store.checkpoint()
    raws = raws_of(store)
    crash(store)
    return raws, config


def surviving(frames: list[tuple[int, int]], cut: int) -> int:
    """How many frames of a segment are whole when it is cut to ``cut`` bytes."""
    return sum(1 for pos, length in frames if pos + FRAME.size + length <= cut)


def last_checkpoint_size(root: Path) -> int:
    """The tree size of the newest checkpoint line (0 without one)."""
    path = root / "checkpoints.jsonl"
    lines = path.read_bytes().splitlines() if path.exists() else []
    return orjson.loads(lines[-1])["tree_size"] if lines else 0


def check_reopened(
    config: StoreConfig, expected: list[bytes], *, repair: bool = False, lost: int = 0
) -> AuditStore:
    """Opens the store and checks it holds ``expected``, verifies, and numbers a new append after it.

    ``lost``: records the spine had hashed but the segments no longer hold; recovery keeps
    their hashes in ``quarantine/`` and says so in ``repairs``.
    """
    store = AuditStore.open(config, repair=repair)
    assert raws_of(store) == expected
    assert store.tree_size == len(expected)
    report = store.verify()
    assert report.ok, report.problems
    if lost:
        [note] = [r for r in store.repairs if "hashes were moved" in r]
        assert f"from {len(expected) + lost} to {len(expected)} records" in note
        assert any(p.name.startswith("merkle.spine.") for p in quarantined(Path(config.root)))
    assert store.append({"after": "recovery"}).seq == len(expected)
    return store


def check_truncated(
    config: StoreConfig, seg: Path, cut: int, expected: list[bytes], floor: int, base: int, hashed: int
) -> None:
    """The checks of one cut of segment ``seg`` (first seq ``base``): recovery, or refusal and repair.

    ``hashed``: how many records the spine held before the cut (the rest are reported lost).
    """
    root = Path(config.root)
    if len(expected) >= floor:
        store = check_reopened(config, expected, lost=hashed - len(expected))
        if cut < SEG_HEADER.size:
            assert any("recreated torn segment header" in r for r in store.repairs)
        assert parse_segment(seg.read_bytes())[0] == base, "the segment keeps (or is recreated at) its base"
        crash(store, sync=False)
        return
    before = seg.read_bytes()
    with pytest.raises(CorruptionError) as info:
        AuditStore.open(config)
    err = info.value
    assert err.file == str(seg)
    if cut < SEG_HEADER.size:
        assert err.offset == 0
    else:
        assert err.offset == max(
            [SEG_HEADER.size] + [p + FRAME.size + n for p, n in parse_segment(before)[1]]
        )
    assert "checkpoint" in err.reason
    assert seg.read_bytes() == before, "a refused open must not change the segment"
    store = AuditStore.open(config, repair=True)
    assert raws_of(store) == expected
    assert store.repairs and any("quarantine" in r for r in store.repairs)
    moved = quarantined(root)
    assert any(p.name.startswith("merkle.spine.") for p in moved)
    report = store.verify()
    assert not report.ok
    assert any(p.file.endswith("checkpoints.jsonl") for p in report.problems)
    assert store.append({"after": "repair"}).seq == len(expected)
    crash(store, sync=False)


# ------------------------------------------------------------------- exhaustive cuts

SIZES_20 = [(i * 37) % 61 + (90 if i % 6 == 0 else 0) for i in range(20)]


class TestTruncationAtEveryOffset:
    """A one-segment store built by a crash, its segment cut at every offset from 0 to its length."""

    def _run(self, tmp_path: Path, checkpoint_after: int | None) -> int:
        root = tmp_path / "store"
        raws, config = build_crashed(root, SIZES_20, checkpoint_after=checkpoint_after, layer=NoSyncLayer())
        [seg] = segments(root)
        snap = snapshot(root)
        full = seg.read_bytes()
        base, frames = parse_segment(full)
        assert base == 0 and len(frames) == 20 and frames[-1][0] + 8 + frames[-1][1] == len(full)
        floor = last_checkpoint_size(root)
        refused = 0
        for cut in range(len(full) + 1):
            restore(root, snap)
            truncate(seg, cut)
            keep = surviving(frames, cut) if cut >= SEG_HEADER.size else 0
            try:
                check_truncated(config, seg, cut, raws[:keep], floor, 0, len(raws))
            except AssertionError as e:
                raise AssertionError(f"cut at offset {cut} (keeps {keep} records): {e}") from e
            refused += keep < floor
        return refused

    def test_every_offset_without_checkpoint(self, tmp_path: Path) -> None:
        """Without a checkpoint every cut recovers exactly the whole frames, verifies and numbers on."""
        assert self._run(tmp_path, None) == 0

    def test_every_offset_with_checkpoint(self, tmp_path: Path) -> None:
        """With a checkpoint at 8 records, cuts above it recover; below it open refuses and repair opens."""
        refused = self._run(tmp_path, 8)
        assert refused > SEG_HEADER.size  # the header cuts and every cut inside the first 8 frames


# ------------------------------------------------------------------ random stores


class TestTruncationOfRandomStores:
    """Random stores spanning several segments, crashed, their last segment cut at a sampled offset."""

    @settings(max_examples=200, suppress_health_check=EXAMPLES_IN_TMP_PATH)
    @given(
        sizes=st.lists(st.integers(0, 700), min_size=1, max_size=40),
        limit=st.integers(512, 4096),
        checkpoint_after=st.none() | st.integers(0, 40),
        data=st.data(),
    )
    def test_cut_last_segment(
        self, tmp_path: Path, sizes: list[int], limit: int, checkpoint_after: int | None, data: st.DataObject
    ) -> None:
        """Recovery keeps earlier segments and the cut one's whole frames, or refuses below a checkpoint."""
        root = Path(tempfile.mkdtemp(dir=tmp_path)) / "store"
        raws, config = build_crashed(
            root, sizes, checkpoint_after=checkpoint_after, max_segment_bytes=limit, layer=NoSyncLayer()
        )
        segs = segments(root)
        last = segs[-1]
        full = last.read_bytes()
        base, frames = parse_segment(full)
        cut = data.draw(st.integers(0, len(full)), label="cut")
        truncate(last, cut)
        keep = base + (surviving(frames, cut) if cut >= SEG_HEADER.size else 0)
        floor = last_checkpoint_size(root)
        hypothesis_event("below the checkpoint" if keep < floor else "in the crash window")
        check_truncated(config, last, cut, raws[:keep], floor, base, len(raws))


# ---------------------------------------------------------------- mid-segment damage


class TestBadFrameFollowedByValid:
    """A damaged frame with a whole frame after it is corruption, not a torn tail."""

    def _damaged(
        self, tmp_path: Path, k: int, *, checkpoint_after: int | None
    ) -> tuple[list[bytes], StoreConfig, Path, int, bytes]:
        root = tmp_path / "store"
        raws, config = build_crashed(root, [40 + i for i in range(10)], checkpoint_after=checkpoint_after)
        [seg] = segments(root)
        original = seg.read_bytes()
        offset, length = parse_segment(original)[1][k]
        damaged = bytearray(original)
        damaged[offset + FRAME.size + length // 2] ^= 0x20
        seg.write_bytes(bytes(damaged))
        return raws, config, seg, offset, original

    @pytest.mark.parametrize("k", [0, 4, 8])
    def test_open_refuses_with_file_offset_reason(self, tmp_path: Path, k: int) -> None:
        """open raises CorruptionError naming the segment, the bad frame's offset and the CRC failure."""
        _raws, config, seg, offset, _ = self._damaged(tmp_path, k, checkpoint_after=None)
        before = seg.read_bytes()
        with pytest.raises(CorruptionError) as info:
            AuditStore.open(config)
        assert info.value.file == str(seg)
        assert info.value.offset == offset
        assert "CRC" in info.value.reason and "valid frame" in info.value.reason
        assert info.value.seq == k
        assert seg.read_bytes() == before

    def test_repair_after_last_checkpoint(self, tmp_path: Path) -> None:
        """repair=True quarantines from the bad frame on, with the spine's hashes of the lost records.

        The records lost after the last checkpoint leave verify ok (no checkpoint covered them).
        """
        raws, config, _seg, offset, original = self._damaged(tmp_path, 4, checkpoint_after=2)
        store = AuditStore.open(config, repair=True)
        hashes, moved = quarantined(Path(config.root))  # sorted by name
        assert moved.name.startswith("seg-") and hashes.name.startswith("merkle.spine.")
        damaged_tail = bytearray(original[offset:])
        damaged_tail[FRAME.size + parse_segment(original)[1][4][1] // 2] ^= 0x20
        assert moved.read_bytes() == bytes(damaged_tail)
        assert len(hashes.read_bytes()) == HASH * (stored_hash_count(10) - stored_hash_count(4))
        assert any(str(moved) in r and f"offset {offset}" in r for r in store.repairs)
        assert raws_of(store) == raws[:4]
        assert any(str(hashes) in r for r in store.repairs)
        assert store.append({"after": "repair"}).seq == 4
        report = store.verify()
        assert report.ok, report.problems  # the checkpoint (2 records) still holds
        store.close()
        assert AuditStore.open_reader(config.root).verify().ok

    def test_repair_below_last_checkpoint(self, tmp_path: Path) -> None:
        """When a checkpoint covered the lost records, the store opens and verify reports the checkpoint."""
        raws, config, _seg, _offset, _ = self._damaged(tmp_path, 4, checkpoint_after=7)
        store = AuditStore.open(config, repair=True)
        names = sorted(p.name.split(".")[0] for p in quarantined(Path(config.root)))
        assert names == ["merkle", "seg-0000000000"]
        assert raws_of(store) == raws[:4]
        assert store.append({"after": "repair"}).seq == 4
        report = store.verify()
        assert not report.ok
        assert {Path(p.file).name for p in report.problems} == {"checkpoints.jsonl"}
        assert any("removed" in p.reason or "rewritten" in p.reason for p in report.problems)
        store.close()


class TestTornTailVersusDamage:
    """What the scan calls a torn tail (cut) and what it calls damage (refused)."""

    def _store(
        self, tmp_path: Path, checkpoint_after: int | None = None
    ) -> tuple[list[bytes], StoreConfig, Path]:
        root = tmp_path / "store"
        raws, config = build_crashed(root, [30 + 3 * i for i in range(8)], checkpoint_after=checkpoint_after)
        [seg] = segments(root)
        return raws, config, seg

    @pytest.mark.parametrize("field", [0, 1, 3, 4, 7])
    def test_damaged_frame_header_mid_segment(self, tmp_path: Path, field: int) -> None:
        """A damaged length or CRC byte of a frame with whole frames after it is refused at that frame."""
        _raws, config, seg = self._store(tmp_path)
        data = bytearray(seg.read_bytes())
        pos = parse_segment(bytes(data))[1][3][0]
        data[pos + field] ^= 0x41
        seg.write_bytes(bytes(data))
        with pytest.raises(CorruptionError) as err:
            AuditStore.open(config)
        assert (err.value.file, err.value.offset) == (str(seg), pos)

    def test_zeroed_block_mid_segment(self, tmp_path: Path) -> None:
        """A run of zero bytes over two frames with a frame after them is damage, not a torn tail."""
        _raws, config, seg = self._store(tmp_path)
        data = bytearray(seg.read_bytes())
        frames = parse_segment(bytes(data))[1]
        start, end = frames[2][0], frames[4][0]
        data[start:end] = bytes(end - start)
        seg.write_bytes(bytes(data))
        with pytest.raises(CorruptionError) as err:
            AuditStore.open(config)
        assert err.value.offset == start
        store = AuditStore.open(config, repair=True)
        assert [r.seq for r in store.scan()] == [0, 1]
        store.close()

    def test_bad_last_frame_is_a_torn_tail(self, tmp_path: Path) -> None:
        """A CRC failure in the last frame with nothing after it is cut as a torn tail.

        The spine had hashed that record, so its frame was once whole (a power failure or
        a hand damaged it): its bytes and its hash are kept in quarantine/.
        """
        raws, config, seg = self._store(tmp_path)
        data = bytearray(seg.read_bytes())
        pos, length = parse_segment(bytes(data))[1][-1]
        data[pos + FRAME.size + length - 2] ^= 0x01
        seg.write_bytes(bytes(data))
        store = check_reopened(config, raws[:-1], lost=1)
        assert [p.name.split(".")[0] for p in quarantined(Path(config.root))] == ["merkle", "seg-0000000000"]
        store.close()

    def test_unhashed_torn_frame_is_dropped(self, tmp_path: Path) -> None:
        """A partial frame the spine never hashed (a write cut short) is dropped: nothing to keep."""
        raws, config, seg = self._store(tmp_path)
        with open(seg, "ab") as f:
            f.write(FRAME.pack(50, 0) + b'{"half":')
        store = check_reopened(config, raws)
        assert any("cut torn tail" in r for r in store.repairs)
        assert quarantined(Path(config.root)) == []
        store.close()

    def test_bad_last_frame_below_checkpoint(self, tmp_path: Path) -> None:
        """The same torn-looking last frame, when a checkpoint covers it, is refused."""
        _raws, config, seg = self._store(tmp_path, checkpoint_after=8)
        data = bytearray(seg.read_bytes())
        pos, length = parse_segment(bytes(data))[1][-1]
        data[pos + FRAME.size + length - 2] ^= 0x01
        seg.write_bytes(bytes(data))
        with pytest.raises(CorruptionError) as err:
            AuditStore.open(config)
        assert (err.value.file, err.value.offset, err.value.seq) == (str(seg), pos, 7)

    def test_zero_filled_tail(self, tmp_path: Path) -> None:
        """Zeros after the last frame (a file extended but never written) are a torn tail and are cut."""
        raws, config, seg = self._store(tmp_path)
        size = seg.stat().st_size
        with open(seg, "ab") as f:
            f.write(bytes(4096))
        check_reopened(config, raws).close()
        assert seg.stat().st_size > size  # the new record followed the cut

    def test_repair_on_healthy_store(self, tmp_path: Path) -> None:
        """repair=True on an intact store repairs and moves nothing."""
        raws, config, _seg = self._store(tmp_path, checkpoint_after=4)
        store = check_reopened(config, raws, repair=True)
        assert store.repairs == []
        assert quarantined(Path(config.root)) == []
        store.close()


# ------------------------------------------------------------------ spine crash window


def spine_leaves(root: Path) -> int:
    """The number of whole leaf sets in a spine file."""
    count = ((root / "merkle.spine").stat().st_size - SPINE_HEADER) // HASH
    n = 0
    while stored_hash_count(n + 1) <= count:
        n += 1
    return n


class TestSpineRecovery:
    """The spine is repaired from the segments in the crash window and refused below a checkpoint."""

    def _store(self, tmp_path: Path) -> tuple[list[bytes], StoreConfig, Path]:
        root = tmp_path / "store"
        raws, config = build_crashed(root, [30] * 13, checkpoint_after=5)
        return raws, config, root / "merkle.spine"

    def test_last_leaf_set_deleted(self, tmp_path: Path) -> None:
        """A spine missing its last leaf's hashes is completed from the segment."""
        raws, config, spine = self._store(tmp_path)
        truncate(spine, SPINE_HEADER + HASH * stored_hash_count(12))
        store = check_reopened(config, raws)
        assert any("added 1 missing" in r for r in store.repairs)
        store.close()

    @pytest.mark.parametrize("keep", [6, 7, 9, 12])
    def test_spine_truncated_above_checkpoint(self, tmp_path: Path, keep: int) -> None:
        """A spine cut anywhere after the checkpoint, even mid-hash, is rebuilt to the 13 records."""
        raws, config, spine = self._store(tmp_path)
        truncate(spine, SPINE_HEADER + HASH * stored_hash_count(keep) + 5)
        check_reopened(config, raws).close()
        assert spine_leaves(spine.parent) == 14

    @pytest.mark.parametrize(
        ("garbage", "extra_leaves"),
        [(b"\xff" * 7, 0), (b"\x17" * 32, 0), (hashlib.sha512(b"g").digest() * 5, 4)],
    )
    def test_garbage_appended(self, tmp_path: Path, garbage: bytes, extra_leaves: int) -> None:
        """Garbage after the last leaf set is cut away; when it parses as whole extra leaves
        (10 more hashes complete 4 more leaf sets), those are kept in quarantine/, as for any
        hashed record the segments lack."""
        raws, config, spine = self._store(tmp_path)
        with open(spine, "ab") as f:
            f.write(garbage)
        check_reopened(config, raws, lost=extra_leaves).close()
        assert spine.stat().st_size == SPINE_HEADER + HASH * stored_hash_count(14)

    def test_garbage_leaf_in_window(self, tmp_path: Path) -> None:
        """A wrong leaf hash after the checkpoint is rewritten from the segment."""
        raws, config, spine = self._store(tmp_path)
        data = bytearray(spine.read_bytes())
        at = SPINE_HEADER + HASH * stored_hash_count(10)
        data[at] ^= 1
        spine.write_bytes(bytes(data))
        store = check_reopened(config, raws)
        assert any("rewrote torn Merkle spine leaves from seq 10" in r for r in store.repairs)
        store.close()

    @pytest.mark.parametrize("keep", [0, 3, 5 - 1])
    def test_truncated_below_checkpoint(self, tmp_path: Path, keep: int) -> None:
        """A spine shorter than the checkpoint is CorruptionError; repair rebuilds it and verify agrees."""
        raws, config, spine = self._store(tmp_path)
        truncate(spine, SPINE_HEADER + HASH * stored_hash_count(keep))
        before = spine.read_bytes()
        with pytest.raises(CorruptionError) as info:
            AuditStore.open(config)
        assert info.value.file == str(spine)
        assert info.value.offset == len(before)
        assert "checkpoint" in info.value.reason
        assert spine.read_bytes() == before
        store = check_reopened(config, raws, repair=True)
        assert any("rebuilding" in r for r in store.repairs)
        store.close()


# --------------------------------------------------------------- other files at open


class TestOpenChecks:
    """FORMAT, checkpoints.jsonl, segment headers and the directory itself, checked at open."""

    def test_torn_checkpoint_line_dropped(self, tmp_path: Path) -> None:
        """A last checkpoint line without its newline is an unfinished append and is dropped."""
        root = tmp_path / "store"
        raws, config = build_crashed(root, [10] * 5, checkpoint_after=3)
        path = root / "checkpoints.jsonl"
        good = path.read_bytes()
        with open(path, "ab") as f:
            f.write(b'{"created_at": 1, "tree_size": 5, "ro')
        store = check_reopened(config, raws)
        assert any("torn last line" in r for r in store.repairs)
        assert path.read_bytes() == good
        assert store.last_checkpoint is not None and store.last_checkpoint.tree_size == 3
        store.close()
        assert AuditStore.open_reader(root).verify().ok

    @pytest.mark.parametrize("reader", [False, True])
    def test_format_version_2(self, tmp_path: Path, reader: bool) -> None:
        """A FORMAT file naming version 2 raises FormatVersionError naming that file."""
        root = tmp_path / "store"
        AuditStore.open(root).close()
        fmt_path = root / "FORMAT"
        info = orjson.loads(fmt_path.read_bytes())
        fmt_path.write_bytes(orjson.dumps({**info, "version": 2}))
        with pytest.raises(FormatVersionError) as err:
            (AuditStore.open_reader if reader else AuditStore.open)(root)
        assert err.value.file == str(fmt_path)
        assert err.value.version == 2

    def test_bad_segment_magic(self, tmp_path: Path) -> None:
        """An active segment whose magic is wrong is content damage (CorruptionError at offset 0)."""
        root = tmp_path / "store"
        build_crashed(root, [10] * 3)
        [seg] = segments(root)
        data = bytearray(seg.read_bytes())
        data[0:4] = b"QLOX"
        seg.write_bytes(bytes(data))
        with pytest.raises(CorruptionError) as err:
            AuditStore.open(root)
        assert err.value.file == str(seg) and err.value.offset == 0 and "magic" in err.value.reason

    def test_bad_segment_version_byte(self, tmp_path: Path) -> None:
        """A segment version byte other than 1 is content damage, not an unsupported format."""
        root = tmp_path / "store"
        build_crashed(root, [10] * 3)
        [seg] = segments(root)
        data = bytearray(seg.read_bytes())
        data[4] = 2
        seg.write_bytes(bytes(data))
        with pytest.raises(CorruptionError) as err:
            AuditStore.open(root)
        assert err.value.file == str(seg) and err.value.offset == 4

    def test_non_store_directory(self, tmp_path: Path) -> None:
        """A non-empty directory without a FORMAT file is refused and left untouched."""
        root = tmp_path / "photos"
        root.mkdir()
        (root / "cat.jpg").write_bytes(b"\xff\xd8")
        with pytest.raises(NotAStoreError):
            AuditStore.open(root)
        assert sorted(p.name for p in root.iterdir() if p.name != "LOCK") == ["cat.jpg"]

    def test_missing_directory_created(self, tmp_path: Path) -> None:
        """A missing root is created with its parents and becomes a new, empty store."""
        root = tmp_path / "a" / "b" / "c"
        with AuditStore.open(root) as store:
            assert store.tree_size == 0
            assert store.append({"x": 1}).seq == 0
        assert (root / "FORMAT").is_file() and (root / "log" / "seg-0000000000.log").is_file()

    def test_empty_directory_becomes_store(self, tmp_path: Path) -> None:
        """An existing empty directory becomes a new store."""
        root = tmp_path / "empty"
        root.mkdir()
        with AuditStore.open(root) as store:
            assert store.append({"x": 1}).seq == 0


# ---------------------------------------------------------------------------- rollover


def frames_of_store(root: Path) -> list[tuple[Path, int, int, int, int]]:
    """Every frame as ``(segment, base, offset, length, segment length)``, checked with struct."""
    out = []
    expected = 0
    for seg in segments(root):
        data = seg.read_bytes()
        base, frames = parse_segment(data)
        assert base == expected, f"{seg.name} starts at {base}, expected {expected}"
        end = frames[-1][0] + FRAME.size + frames[-1][1] if frames else SEG_HEADER.size
        assert end == len(data), f"{seg.name} has {len(data) - end} bytes after its last frame"
        for pos, length in frames:
            out.append((seg, base, pos, length, len(data)))
        expected = base + len(frames)
    return out


class TestRollover:
    """Segments roll over before a record would push them past max_segment_bytes."""

    @settings(max_examples=100, suppress_health_check=EXAMPLES_IN_TMP_PATH)
    @given(sizes=st.lists(st.integers(0, 1500), min_size=1, max_size=40), limit=st.integers(256, 2048))
    def test_records_never_span_segments(self, tmp_path: Path, sizes: list[int], limit: int) -> None:
        """Every frame lies inside one file, bases chain, sealed segments have a true sidecar, sizes hold."""
        root = Path(tempfile.mkdtemp(dir=tmp_path)) / "store"
        config = StoreConfig(root=root, max_segment_bytes=limit, file_layer=NoSyncLayer())
        with AuditStore.open(config) as store:
            for i, size in enumerate(sizes):
                store.append(event(i, size))
            raws = raws_of(store)
        rows = frames_of_store(root)
        assert len(rows) == len(sizes)
        segs = segments(root)
        by_seg = {seg: [r for r in rows if r[0] == seg] for seg in segs}
        for number, seg in enumerate(segs):
            assert seg.name == f"seg-{number:010d}.log"
            mine = by_seg[seg]
            for _seg, _base, pos, length, seg_len in mine:
                assert SEG_HEADER.size <= pos and pos + FRAME.size + length <= seg_len
            if len(mine) > 1:
                assert mine[-1][4] <= limit, f"{seg.name} exceeds the limit with several records"
            sidecar = seg.with_suffix(".idx")
            if number < len(segs) - 1:
                assert mine, "a sealed segment holds at least one record"
                side = Sidecar.from_bytes(sidecar.read_bytes())
                assert side is not None
                assert (side.base_index, side.count, side.length) == (
                    mine[0][1],
                    len(mine),
                    seg.stat().st_size,
                )
                if number + 1 < len(segs):
                    nxt = by_seg[segs[number + 1]]
                    # It rolled because the next record did not fit.
                    assert mine[-1][4] + FRAME.size + nxt[0][3] > limit
            else:
                assert not sidecar.exists()
        # The raw payloads found by struct are the ones the store returns.
        payloads = [seg.read_bytes()[pos + 8 : pos + 8 + n] for seg, _b, pos, n, _l in rows]
        assert payloads == raws

    def test_oversized_record_alone(self, tmp_path: Path) -> None:
        """A record bigger than the limit goes alone into its own segment, and the next one rolls again."""
        root = tmp_path / "store"
        with AuditStore.open(StoreConfig(root=root, max_segment_bytes=300)) as store:
            store.append(event(0, 10))
            store.append(event(1, 2000))
            store.append(event(2, 10))
        rows = frames_of_store(root)
        assert [(seg.name, base) for seg, base, *_ in rows] == [
            ("seg-0000000000.log", 0),
            ("seg-0000000001.log", 1),
            ("seg-0000000002.log", 2),
        ]
        assert rows[1][3] > 2000
        assert AuditStore.open_reader(root).verify().ok

    @pytest.mark.parametrize("cut", range(SEG_HEADER.size))
    def test_crash_right_after_rollover(self, tmp_path: Path, cut: int) -> None:
        """A newest segment torn inside its header after rollover is recreated at the sealed one's end."""
        root = tmp_path / "store"
        raws, config = build_crashed(root, [150] * 6, max_segment_bytes=700, layer=NoSyncLayer())
        segs = segments(root)
        assert len(segs) >= 2
        sealed = sum(len(parse_segment(s.read_bytes())[1]) for s in segs[:-1])
        truncate(segs[-1], cut)
        store = check_reopened(config, raws[:sealed], lost=len(raws) - sealed)
        assert any("recreated torn segment header" in r for r in store.repairs)
        store.close()
        assert [s.name for s in segments(root)] == [s.name for s in segs]
        assert AuditStore.open_reader(root).verify().ok

    def test_crash_before_next_segment_created(self, tmp_path: Path) -> None:
        """A newest segment whose creation never became durable: the sealed one stays, a new one follows."""
        root = tmp_path / "store"
        raws, config = build_crashed(root, [150] * 6, max_segment_bytes=700)
        segs = segments(root)
        sealed = sum(len(parse_segment(s.read_bytes())[1]) for s in segs[:-1])
        segs[-1].unlink()
        store = check_reopened(config, raws[:sealed], lost=len(raws) - sealed)
        store.close()
        assert [s.name for s in segments(root)] == [s.name for s in segs]
        assert parse_segment(segs[-1].read_bytes())[0] == sealed
        assert AuditStore.open_reader(root).verify().ok


# --------------------------------------------------------------------- power loss


class TestPowerLoss:
    """With PowerLossFileLayer, a power cut keeps at least what was synced, and nothing torn."""

    @settings(max_examples=100, suppress_health_check=EXAMPLES_IN_TMP_PATH)
    @given(
        synced=st.lists(st.integers(0, 300), max_size=12),
        unsynced=st.lists(st.integers(0, 300), max_size=12),
        limit=st.sampled_from([512, 1024, 1 << 20]),
        checkpoint=st.booleans(),
    )
    def test_power_cut(
        self, tmp_path: Path, synced: list[int], unsynced: list[int], limit: int, checkpoint: bool
    ) -> None:
        """After a power cut the store is a prefix of the appends, at least the synced part, and verifies."""
        root = Path(tempfile.mkdtemp(dir=tmp_path)) / "store"
        layer = PowerLossFileLayer()
        store = AuditStore.open(StoreConfig(root=root, sync="os", max_segment_bytes=limit, file_layer=layer))
        for i, size in enumerate(synced):
            store.append(event(i, size))
        if checkpoint:
            store.checkpoint()
        else:
            store.sync()
        for i, size in enumerate(unsynced, start=len(synced)):
            store.append(event(i, size))
        raws = raws_of(store)
        crash(store, sync=False)
        layer.forget_descriptors()
        layer.power_loss()
        reopened = AuditStore.open(StoreConfig(root=root, max_segment_bytes=limit))
        got = raws_of(reopened)
        assert len(synced) <= len(got) <= len(raws)
        assert got == raws[: len(got)]
        report = reopened.verify()
        assert report.ok, report.problems
        assert reopened.append({"after": "power"}).seq == len(got)
        reopened.close()

    def test_unsynced_records_are_lost_cleanly(self, tmp_path: Path) -> None:
        """Records appended after the last sync vanish; numbering goes on from the synced ones."""
        root = tmp_path / "store"
        layer = PowerLossFileLayer()
        store = AuditStore.open(StoreConfig(root=root, sync="os", file_layer=layer))
        for i in range(10):
            store.append(event(i, 20))
        store.sync()
        raws = raws_of(store)
        for i in range(10, 15):
            store.append(event(i, 20))
        crash(store, sync=False)
        layer.power_loss()
        store = check_reopened(StoreConfig(root=root), raws)
        store.close()


# ------------------------------------------------------------------ idempotent reopen


class TestRepeatedRecovery:
    """Recovery converges: a second crash-free reopen changes nothing."""

    def test_second_open_repairs_nothing(self, tmp_path: Path) -> None:
        """After one recovering open and a crash, the next open has no repairs to make."""
        root = tmp_path / "store"
        raws, config = build_crashed(root, [25] * 9, checkpoint_after=4)
        [seg] = segments(root)
        truncate(seg, seg.stat().st_size - 3)
        first = check_reopened(config, raws[:8], lost=1)
        assert first.repairs
        crash(first)
        second = AuditStore.open(config)
        assert second.repairs == []
        assert [r.seq for r in second.scan()] == list(range(9))
        second.close()


class TestHelpers:
    """The struct-based segment parser of this module."""

    def test_parser_agrees_with_store(self, tmp_path: Path) -> None:
        """The struct parser used here finds exactly the payloads the store returns (guards the tests)."""
        root = tmp_path / "store"
        raws, _config = build_crashed(root, [5, 50, 500, 0], max_segment_bytes=400)
        payloads = [s.read_bytes()[p + 8 : p + 8 + n] for s, _b, p, n, _l in frames_of_store(root)]
        assert payloads == raws


# --------------------------------------------------- changed records are never laundered


def rewrite_frame(seg: Path, k: int, old: bytes, new: bytes) -> int:
    """Replaces ``old`` by ``new`` in frame ``k`` of ``seg`` and fixes its length and CRC, as a
    forger would; returns the frame's offset."""
    data = seg.read_bytes()
    pos, length = parse_segment(data)[1][k]
    body = data[pos + FRAME.size : pos + FRAME.size + length]
    assert old in body
    body = body.replace(old, new)
    seg.write_bytes(
        data[:pos] + FRAME.pack(len(body), zlib.crc32(body)) + body + data[pos + FRAME.size + length :]
    )
    return pos


class TestChangedRecordInCrashWindow:
    """A whole, CRC-clean record that no longer matches an intact spine leaf was changed by hand.

    Recovery may complete or trim the spine after the last checkpoint (a crash or power
    failure can leave it short or torn), but it must never rewrite an intact leaf to fit a
    changed record: that would make ``verify`` pass on a forgery after a plain restart.
    """

    @pytest.mark.parametrize("k", [6, 7, 9])  # 7 and 9: right children; 9: the last, paired leaf
    def test_open_refuses(self, tmp_path: Path, k: int) -> None:
        """Open raises CorruptionError naming the segment, the frame's offset and the seq."""
        root = tmp_path / "store"
        _raws, config = build_crashed(root, [20] * 10, checkpoint_after=5)
        [seg] = segments(root)
        offset = rewrite_frame(seg, k, f'"i":{k}'.encode(), b'"i":99')
        before = {p.name: p.read_bytes() for p in root.iterdir() if p.is_file() and p.name != "LOCK"}
        report = AuditStore.open_reader(root).verify()
        assert not report.ok and report.problems[0].seq == k
        with pytest.raises(CorruptionError) as info:
            AuditStore.open(config)
        assert (info.value.file, info.value.offset, info.value.seq) == (str(seg), offset, k)
        assert "changed after it was written" in info.value.reason
        after = {p.name: p.read_bytes() for p in root.iterdir() if p.is_file() and p.name != "LOCK"}
        assert after == before, "a refused open changes nothing"
        assert not AuditStore.open_reader(root).verify().ok

    def test_last_unpaired_leaf(self, tmp_path: Path) -> None:
        """The last leaf of an odd tree has no stored parent; its intact hash still refuses."""
        root = tmp_path / "store"
        _raws, config = build_crashed(root, [20] * 11, checkpoint_after=5)
        [seg] = segments(root)
        rewrite_frame(seg, 10, b'"i":10', b'"i":77')
        with pytest.raises(CorruptionError) as info:
            AuditStore.open(config)
        assert info.value.seq == 10

    def test_repair_quarantines(self, tmp_path: Path) -> None:
        """repair=True moves the changed record, those after it and their original hashes aside."""
        root = tmp_path / "store"
        raws, config = build_crashed(root, [20] * 10, checkpoint_after=5)
        [seg] = segments(root)
        rewrite_frame(seg, 7, b'"i":7', b'"i":70')
        store = AuditStore.open(config, repair=True)
        assert raws_of(store) == raws[:7] and store.tree_size == 7
        [hashes, moved] = quarantined(root)
        assert b'"i":70' in moved.read_bytes() and moved.name.startswith("seg-")
        assert len(hashes.read_bytes()) == HASH * (stored_hash_count(10) - stored_hash_count(7))
        assert store.verify().ok
        store.close()

    def test_checkpoints_removed_do_not_widen_the_window(self, tmp_path: Path) -> None:
        """With checkpoints.jsonl deleted, a record changed in a sealed segment is still refused.

        Sealed segments are never rewritten, whatever the checkpoints say, so deleting them
        cannot turn the whole store into a crash window to launder a forgery.
        """
        root = tmp_path / "store"
        config = StoreConfig(root=root, max_segment_bytes=400, sync="os")
        store = AuditStore.open(config)
        for i in range(20):
            store.append(event(i, 20))
        store.close()
        (root / "checkpoints.jsonl").unlink()
        first = segments(root)[0]
        rewrite_frame(first, 1, b'"i":1', b'"i":8')
        for repair in (False, True):
            with pytest.raises(CorruptionError) as info:
                AuditStore.open(config, repair=repair)
            assert info.value.file == str(first) and info.value.seq == 1

    def test_cli_checkpoint_refuses_to_sign_over_a_forgery(self, tmp_path: Path) -> None:
        """The routine `quipu-log checkpoint` opens the writer: it must fail, not sign the forgery."""
        from quipu_logging.cli import main

        root = tmp_path / "store"
        build_crashed(root, [20] * 10, checkpoint_after=5)
        [seg] = segments(root)
        rewrite_frame(seg, 6, b'"i":6', b'"i":60')
        assert main(["checkpoint", str(root)]) == 1
        assert main(["verify", str(root)]) == 1
