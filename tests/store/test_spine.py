"""Tests of quipu_logging.store._spine: the on-disk stored hashes of every complete subtree."""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from quipu_logging.errors import CorruptionError, StoreClosedError
from quipu_logging.store import _spine, merkle
from quipu_logging.store._fileio import FileLayer, PowerLossFileLayer
from quipu_logging.store._spine import (
    HEADER,
    HEADER_SIZE,
    Spine,
    leaves_for_hash_count,
    stored_hash_count,
    stored_hash_index,
)

IO = FileLayer()
LEAVES = [merkle.leaf_hash(b"leaf %d" % i) for i in range(1 << 12)]


def make_leaves(n: int) -> list[bytes]:
    """n distinct leaf hashes."""
    if n <= len(LEAVES):
        return LEAVES[:n]
    return [merkle.leaf_hash(b"leaf %d" % i) for i in range(n)]


def spine_with(path: Path, n: int, *, sync: bool = True) -> Spine:
    """A writable spine at ``path`` holding the first n leaves."""
    sp = Spine.open(str(path), IO, writable=True)
    sp.append_many(make_leaves(n))
    if sync:
        sp.sync()
    return sp


def expected_length(n: int) -> int:
    """The file length of a spine of n leaves."""
    return HEADER_SIZE + 32 * stored_hash_count(n)


def flip_bit(path: Path, offset: int, bit: int = 0) -> None:
    """Flip one bit of the file at ``offset``."""
    data = bytearray(path.read_bytes())
    data[offset] ^= 1 << bit
    path.write_bytes(bytes(data))


class TestLayout:
    def test_stored_hash_count(self) -> None:
        """2n - popcount(n) hashes after n leaves."""
        assert [stored_hash_count(n) for n in range(9)] == [0, 1, 3, 4, 7, 8, 10, 11, 15]

    def test_stored_hash_index_matches_append_order(self) -> None:
        """stored_hash_index gives each subtree's position in append order."""
        order: list[tuple[int, int]] = []
        for i in range(300):
            order.append((0, i))
            level, m = 0, i
            while m & 1:
                level += 1
                m >>= 1
                order.append((level, (i + 1) // (1 << level) - 1))
        assert [stored_hash_index(level, k) for level, k in order] == list(range(len(order)))

    def test_leaves_for_hash_count(self) -> None:
        """leaves_for_hash_count inverts stored_hash_count, rounding down."""
        for n in range(2000):
            c = stored_hash_count(n)
            assert leaves_for_hash_count(c) == n
            assert leaves_for_hash_count(c + 1) == (n + 1 if stored_hash_count(n + 1) == c + 1 else n)
        assert leaves_for_hash_count(-5) == 0
        big = 10**15 + 12345
        assert leaves_for_hash_count(stored_hash_count(big)) == big

    def test_header_bytes(self) -> None:
        """The header is QSPN, version 1, three zero bytes."""
        assert HEADER == b"QSPN\x01\x00\x00\x00"


class TestAppend:
    def test_stored_hash_count_on_disk(self, tmp_path: Path) -> None:
        """After n appends the file holds 2n - popcount(n) hashes after the header."""
        path = tmp_path / "merkle.spine"
        sp = Spine.open(str(path), IO, writable=True)
        assert path.read_bytes() == HEADER
        for n in range(1, 100):
            sp.append(LEAVES[n - 1])
            if n % 7 == 0 or n < 20:
                sp.flush()
                assert path.stat().st_size == expected_length(n)
        sp.close()

    def test_file_holds_leaf_then_completed_nodes(self, tmp_path: Path) -> None:
        """The stored hashes are each leaf followed by the subtrees it completes."""
        path = tmp_path / "s"
        spine_with(path, 8).close()
        body = path.read_bytes()[HEADER_SIZE:]
        got = [body[i : i + 32] for i in range(0, len(body), 32)]
        L = LEAVES
        n01, n23, n45, n67 = (merkle.node_hash(L[i], L[i + 1]) for i in (0, 2, 4, 6))
        n03, n47 = merkle.node_hash(n01, n23), merkle.node_hash(n45, n67)
        want = [L[0], L[1], n01, L[2], L[3], n23, n03, L[4], L[5], n45, L[6], L[7], n67, n47]
        want.append(merkle.node_hash(n03, n47))
        assert got == want

    def test_roots_and_proofs_match_merkle(self, tmp_path: Path) -> None:
        """root, inclusion and consistency proofs for every size up to 70 equal the merkle module's."""
        n = 70
        sp = spine_with(tmp_path / "s", n)
        leaves = make_leaves(n)
        for size in range(n + 1):
            assert sp.root(size) == merkle.root(leaves[:size])
            for i in range(size):
                assert sp.inclusion_proof(i, size) == merkle.inclusion_proof(leaves[:size], i), (i, size)
            for old in range(size + 1):
                assert sp.consistency_proof(old, size) == merkle.consistency_proof(leaves[:size], old)
        assert sp.root() == merkle.root(leaves)
        assert sp.inclusion_proof(5) == merkle.inclusion_proof(leaves, 5)
        assert sp.consistency_proof(33) == merkle.consistency_proof(leaves, 33)
        sp.close()

    def test_unflushed_and_partly_flushed(self, tmp_path: Path) -> None:
        """Roots, proofs and leaves read pending hashes before they are flushed."""
        sp = spine_with(tmp_path / "s", 23)
        sp.append_many(LEAVES[23:41])  # pending, not flushed
        leaves = LEAVES[:41]
        assert sp.size == 41
        for size in range(42):
            assert sp.root(size) == merkle.root(leaves[:size])
        for i in range(41):
            assert sp.inclusion_proof(i) == merkle.inclusion_proof(leaves, i)
            assert sp.leaf(i) == leaves[i]
        for old in range(42):
            assert sp.consistency_proof(old) == merkle.consistency_proof(leaves, old)
        assert sp.leaves(10, 35) == leaves[10:35]
        assert sp.check() is None
        sp.close()

    def test_append_validates_all_or_nothing(self, tmp_path: Path) -> None:
        """A wrong-length hash in a batch appends nothing."""
        sp = spine_with(tmp_path / "s", 3)
        with pytest.raises(ValueError):
            sp.append_many([LEAVES[3], b"short"])
        with pytest.raises(ValueError):
            sp.append(b"x" * 33)
        assert sp.size == 3
        sp.append(bytearray(LEAVES[3]))
        assert sp.root() == merkle.root(LEAVES[:4])
        sp.close()

    def test_flush_is_one_pwrite(self, tmp_path: Path) -> None:
        """flush writes all pending hashes with a single pwrite at the known offset."""
        calls: list[tuple[int, int]] = []

        class Counting(FileLayer):
            def pwrite(self, fd: int, data: bytes, offset: int) -> None:
                calls.append((len(data), offset))
                super().pwrite(fd, data, offset)

        sp = Spine.open(str(tmp_path / "s"), Counting(), writable=True)
        calls.clear()
        sp.append_many(LEAVES[:1000])
        sp.flush()
        assert calls == [(32 * stored_hash_count(1000), HEADER_SIZE)]
        sp.flush()  # nothing pending: no write
        assert len(calls) == 1
        sp.close()

    def test_sync_fsyncs_only_when_written(self, tmp_path: Path) -> None:
        """sync fsyncs after a write and skips the fsync when nothing changed."""
        layer = PowerLossFileLayer()
        sp = Spine.open(str(tmp_path / "s"), layer, writable=True)
        before = layer.fsyncs
        sp.append_many(LEAVES[:5])
        sp.sync()
        assert layer.fsyncs == before + 1
        sp.sync()
        assert layer.fsyncs == before + 1
        sp.close()


class TestReopen:
    def test_reopen_same_roots(self, tmp_path: Path) -> None:
        """Reopening (writable or read-only) gives the same size, roots and proofs."""
        path = tmp_path / "s"
        spine_with(path, 77).close()
        for writable in (True, False):
            sp = Spine.open(str(path), IO, writable=writable)
            assert sp.size == 77
            for size in range(78):
                assert sp.root(size) == merkle.root(LEAVES[:size])
            assert sp.inclusion_proof(40, 61) == merkle.inclusion_proof(LEAVES[:61], 40)
            assert sp.consistency_proof(13, 77) == merkle.consistency_proof(LEAVES[:77], 13)
            sp.close()

    def test_reopen_and_continue(self, tmp_path: Path) -> None:
        """A reopened writer rebuilds its frontier and keeps appending correctly."""
        path = tmp_path / "s"
        total = 0
        for batch in (1, 2, 5, 13, 0, 31, 64, 3):
            sp = Spine.open(str(path), IO, writable=True)
            assert sp.size == total
            sp.append_many(LEAVES[total : total + batch])
            total += batch
            sp.sync()
            assert sp.root() == merkle.root(LEAVES[:total])
            sp.close()
        assert path.stat().st_size == expected_length(total)

    def test_unsynced_appends_lost_on_close(self, tmp_path: Path) -> None:
        """close discards hashes that were never flushed."""
        path = tmp_path / "s"
        sp = spine_with(path, 10)
        sp.append_many(LEAVES[10:20])
        sp.close()
        sp.close()  # idempotent
        with Spine.open(str(path), IO, writable=False) as ro:
            assert ro.size == 10

    def test_power_loss_keeps_synced_leaves(self, tmp_path: Path) -> None:
        """After a power cut, a reopened spine has exactly the synced leaves."""
        layer = PowerLossFileLayer()
        path = str(tmp_path / "s")
        sp = Spine.open(path, layer, writable=True)
        sp.append_many(LEAVES[:21])
        sp.sync()
        sp.append_many(LEAVES[21:40])
        sp.flush()  # written, not fsynced
        layer.forget_descriptors()
        layer.power_loss()
        sp2 = Spine.open(path, FileLayer(), writable=True)
        assert sp2.size == 21
        assert sp2.root() == merkle.root(LEAVES[:21])
        sp2.close()

    def test_new_file_is_durable(self, tmp_path: Path) -> None:
        """Creating a spine fsyncs the file and its directory, so it survives a power cut."""
        layer = PowerLossFileLayer()
        path = str(tmp_path / "s")
        Spine.open(path, layer, writable=True).close()
        layer.power_loss()
        assert Path(path).read_bytes() == HEADER


class TestTornTail:
    def test_cut_at_every_offset(self, tmp_path: Path) -> None:
        """Cut anywhere, a writer reopens to the largest whole leaf count and readers never raise."""
        n = 37
        full = tmp_path / "full"
        spine_with(full, n).close()
        data = full.read_bytes()
        path = tmp_path / "s"
        for cut in range(len(data) + 1):
            path.write_bytes(data[:cut])
            want = leaves_for_hash_count(max(0, cut - HEADER_SIZE) // 32)
            with Spine.open(str(path), IO, writable=False) as ro:
                assert ro.size == want, cut
                assert ro.root() == merkle.root(LEAVES[:want])
            assert path.read_bytes() == data[:cut], "a reader modified the file"
            with Spine.open(str(path), IO, writable=True) as rw:
                assert rw.size == want, cut
                assert rw.root() == merkle.root(LEAVES[:want])
                assert rw.check() is None
            assert path.read_bytes() == data[: expected_length(want)]
            assert want == n or cut < expected_length(want + 1)  # only the torn leaf set is lost

    def test_extra_hashes_past_last_leaf_cut(self, tmp_path: Path) -> None:
        """A leaf whose completed-subtree hashes are missing is cut away on writable open."""
        path = tmp_path / "s"
        spine_with(path, 8).close()
        data = path.read_bytes()
        # 8 leaves = 15 hashes; keep leaf 7 and one of its three subtree hashes (13 hashes)
        path.write_bytes(data[: HEADER_SIZE + 13 * 32])
        with Spine.open(str(path), IO, writable=True) as sp:
            assert sp.size == 7
            sp.append(LEAVES[7])
            sp.sync()
            assert sp.root() == merkle.root(LEAVES[:8])
        assert path.read_bytes() == data

    def test_torn_tail_cut_is_fsynced(self, tmp_path: Path) -> None:
        """The cut of a torn tail is made durable."""
        path = tmp_path / "s"
        spine_with(path, 5).close()
        with path.open("ab") as f:
            f.write(b"\x07" * 40)
        layer = PowerLossFileLayer()
        Spine.open(str(path), layer, writable=True).close()
        layer.power_loss()
        assert path.stat().st_size == expected_length(5)

    def test_short_header_recreated(self, tmp_path: Path) -> None:
        """A file shorter than the header is rewritten by a writer and is size 0 for a reader."""
        path = tmp_path / "s"
        for junk in (b"", b"QS", b"\x00\x00\x00", b"QSPN\x01\x00\x00"):
            path.write_bytes(junk)
            with Spine.open(str(path), IO, writable=False) as ro:
                assert ro.size == 0
                assert ro.root() == merkle.EMPTY_ROOT
            assert path.read_bytes() == junk
            Spine.open(str(path), IO, writable=True).close()
            assert path.read_bytes() == HEADER


class TestHeader:
    @pytest.mark.parametrize(
        "header",
        [
            b"XSPN\x01\x00\x00\x00",
            b"qspn\x01\x00\x00\x00",
            b"QSPN\x02\x00\x00\x00",
            b"QSPN\x00\x00\x00\x00",
            b"QSPN\x01\x00\x01\x00",
        ],
    )
    @pytest.mark.parametrize("writable", [True, False])
    def test_bad_header(self, tmp_path: Path, header: bytes, writable: bool) -> None:
        """A bad magic, version or reserved byte is CorruptionError at offset 0, in both modes."""
        path = tmp_path / "s"
        spine_with(path, 4).close()
        data = header + path.read_bytes()[HEADER_SIZE:]
        path.write_bytes(data)
        with pytest.raises(CorruptionError) as err:
            Spine.open(str(path), IO, writable=writable)
        assert err.value.offset == 0
        assert err.value.file == str(path)
        assert path.read_bytes() == data

    def test_header_only_file(self, tmp_path: Path) -> None:
        """A file holding only a bad 8-byte header is refused too."""
        path = tmp_path / "s"
        path.write_bytes(b"QLOG\x01\x00\x00\x00")
        with pytest.raises(CorruptionError):
            Spine.open(str(path), IO, writable=True)


class TestReader:
    def test_missing_file_is_empty(self, tmp_path: Path) -> None:
        """A reader of a missing spine sees size 0 and creates nothing."""
        path = tmp_path / "s"
        with Spine.open(str(path), IO, writable=False) as ro:
            assert ro.size == 0
            assert ro.root() == merkle.EMPTY_ROOT
            assert ro.leaves() == []
            assert ro.check() is None
            assert not path.exists()

    def test_refresh_sees_new_leaves(self, tmp_path: Path) -> None:
        """refresh() lets a reader see leaves the writer flushed since."""
        path = tmp_path / "s"
        ro = Spine.open(str(path), IO, writable=False)
        sp = Spine.open(str(path), IO, writable=True)
        total = 0
        for batch in (3, 0, 9, 1, 40):
            sp.append_many(LEAVES[total : total + batch])
            total += batch
            assert ro.refresh() == total - batch  # not flushed yet
            sp.flush()
            assert ro.refresh() == total
            assert ro.size == total
            assert ro.root() == merkle.root(LEAVES[:total])
            if total:
                assert ro.inclusion_proof(total - 1) == merkle.inclusion_proof(LEAVES[:total], total - 1)
        # a writer's refresh just reports its size
        assert sp.refresh() == total
        ro.close()
        sp.close()

    def test_reader_sees_rewritten_tail(self, tmp_path: Path) -> None:
        """A reader never serves hashes from before a writer's recovery rewrote the tail."""
        path = tmp_path / "s"
        sp = spine_with(path, 12)
        with Spine.open(str(path), IO, writable=False) as ro:
            assert ro.root() == merkle.root(LEAVES[:12])
            other = [merkle.leaf_hash(b"rewritten %d" % i) for i in range(12)]
            sp.truncate(9)
            sp.append_many(other[9:12])
            sp.sync()
            want = LEAVES[:9] + other[9:12]
            assert ro.refresh() == 12
            assert ro.root() == merkle.root(want)
            assert ro.leaves(8, 12) == want[8:12]
        sp.close()

    def test_reader_ignores_torn_write_in_progress(self, tmp_path: Path) -> None:
        """A reader ignores a partly written leaf set at the end of the file."""
        path = tmp_path / "s"
        spine_with(path, 6).close()
        with path.open("ab") as f:
            f.write(LEAVES[6][:20])
        with Spine.open(str(path), IO, writable=False) as ro:
            assert ro.size == 6
            with path.open("ab") as f:
                f.write(LEAVES[6][20:])
            assert ro.refresh() == 7  # leaf 6 completes nothing: its set is one hash
            assert ro.root() == merkle.root(LEAVES[:7])

    def test_reader_cannot_write(self, tmp_path: Path) -> None:
        """Writing through a read-only spine is refused."""
        path = tmp_path / "s"
        spine_with(path, 2).close()
        with Spine.open(str(path), IO, writable=False) as ro:
            with pytest.raises(RuntimeError):
                ro.append(LEAVES[2])
            with pytest.raises(RuntimeError):
                ro.truncate(1)
            with pytest.raises(RuntimeError):
                ro.flush()
        assert path.stat().st_size == expected_length(2)


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[bytes]]:
    """A 100,000-leaf spine on disk."""
    n = 100_000
    path = tmp_path_factory.mktemp("big") / "merkle.spine"
    leaves = make_leaves(n)
    sp = Spine.open(str(path), IO, writable=True)
    sp.append_many(leaves)
    sp.sync()
    sp.close()
    return str(path), leaves


class TestReads:
    def test_proofs_read_log_n_hashes(self, big: tuple[str, list[bytes]]) -> None:
        """Roots and proofs on a 100,000-leaf spine read at most 3*log2(n) hashes each."""
        path, leaves = big
        n = len(leaves)
        bound = 3 * math.ceil(math.log2(n))  # 51
        for writable in (False, True):
            sp = Spine.open(path, IO, writable=writable)
            assert sp.reads == (bin(n).count("1") if writable else 0)  # the writer loads its frontier
            worst = 0
            for size in (n, n - 1, 65_537, 65_536, 99_999, 12_345, 3):
                root = sp.root(size)
                for index in (0, 1, size // 2, size - 1, (size * 7) // 9):
                    before = sp.reads
                    proof = sp.inclusion_proof(index, size)
                    worst = max(worst, sp.reads - before)
                    assert merkle.verify_inclusion(leaves[index], index, size, proof, root)
                for old in (1, 2, size // 3, size - 1, 4096):
                    if old > size:
                        continue
                    before = sp.reads
                    proof = sp.consistency_proof(old, size)
                    worst = max(worst, sp.reads - before)
                    before = sp.reads
                    old_root = sp.root(old)
                    assert sp.reads - before <= math.ceil(math.log2(n)) + 1
                    assert merkle.verify_consistency(old, size, old_root, root, proof)
            assert worst <= bound
            before = sp.reads
            assert sp.root() == merkle.root(leaves)
            if writable:
                assert sp.reads == before  # the writer's current root comes from its in-memory frontier
            else:
                assert sp.reads - before == bin(n).count("1")  # a reader reads the frontier's subtrees
            before = sp.reads
            assert sp.leaf(54_321) == leaves[54_321]
            assert sp.reads - before == 1
            sp.close()

    def test_bulk_leaves_and_check(self, big: tuple[str, list[bytes]]) -> None:
        """leaves() returns every leaf in bulk; check() passes over the whole spine."""
        path, leaves = big
        with Spine.open(path, IO, writable=False) as sp:
            assert sp.leaves() == leaves
            assert sp.leaves(99_990) == leaves[99_990:]
            assert sp.leaves(65_530, 65_540) == leaves[65_530:65_540]
            assert sp.leaves(7, 7) == []
            before = sp.reads
            assert sp.check() is None
            assert sp.reads - before == stored_hash_count(len(leaves))

    def test_chunked_reads(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """leaves() and check() give the same answers when reading in small chunks."""
        monkeypatch.setattr(_spine, "_CHUNK_LEAVES", 4)
        sp = spine_with(tmp_path / "s", 45, sync=False)
        sp.flush()
        sp.append_many(LEAVES[45:50])
        for a in range(0, 51, 3):
            for b in range(a, 51, 5):
                assert sp.leaves(a, b) == LEAVES[a:b]
        assert sp.check() is None
        sp.close()


class TestCheck:
    @pytest.fixture(autouse=True, params=[None, 4, 8])
    def chunk(self, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
        """Run every check test with the default bulk-read size and with tiny chunks."""
        if request.param is not None:
            monkeypatch.setattr(_spine, "_CHUNK_LEAVES", request.param)

    def test_flipped_node_hash_found(self, tmp_path: Path) -> None:
        """check() reports the offset of a node hash with a flipped bit."""
        n = 50
        path = tmp_path / "s"
        spine_with(path, n).close()
        for level, k in [(1, 0), (2, 3), (5, 0), (3, 5), (1, 24), (4, 2), (2, 0), (3, 4), (1, 17)]:
            idx = stored_hash_index(level, k)
            offset = HEADER_SIZE + 32 * idx
            original = path.read_bytes()
            flip_bit(path, offset + 17, bit=3)
            with Spine.open(str(path), IO, writable=False) as sp:
                result = sp.check()
                assert result is not None
                assert result[0] == offset
                assert f"level {level}" in result[1]
                first = k << level
                assert f"[{first}, {first + (1 << level)})" in result[1]
                # a size before that node completed does not cover it
                assert sp.check(first + (1 << level) - 1) is None
            path.write_bytes(original)

    def test_flipped_leaf_found_at_parent(self, tmp_path: Path) -> None:
        """A damaged leaf hash shows as its parent node failing."""
        path = tmp_path / "s"
        spine_with(path, 16).close()
        original = path.read_bytes()
        for leaf in (0, 9, 15):
            flip_bit(path, HEADER_SIZE + 32 * stored_hash_index(0, leaf))
            with Spine.open(str(path), IO, writable=False) as sp:
                result = sp.check()
            assert result is not None
            assert result[0] == HEADER_SIZE + 32 * stored_hash_index(1, leaf // 2)
            path.write_bytes(original)

    def test_every_stored_hash_damage_found(self, tmp_path: Path) -> None:
        """Damage to any node is reported at that node; to a paired leaf, at its parent."""
        n = 45
        path = tmp_path / "s"
        spine_with(path, n).close()
        original = path.read_bytes()
        where: dict[int, tuple[int, int]] = {}
        for level in range(6):
            for k in range(n >> level):
                where[stored_hash_index(level, k)] = (level, k)
        assert sorted(where) == list(range(stored_hash_count(n)))
        for idx, (level, k) in where.items():
            flip_bit(path, HEADER_SIZE + 32 * idx + (idx % 32), bit=idx % 8)
            with Spine.open(str(path), IO, writable=False) as sp:
                result = sp.check()
            if level > 0:
                want: int | None = HEADER_SIZE + 32 * idx
            elif (k | 1) < n:
                want = HEADER_SIZE + 32 * stored_hash_index(1, k // 2)
            else:
                want = None  # the last, unpaired leaf has no stored parent
            assert (result[0] if result else None) == want, (level, k)
            path.write_bytes(original)

    def test_first_bad_hash_reported(self, tmp_path: Path) -> None:
        """With two damaged nodes, the earlier offset is reported."""
        path = tmp_path / "s"
        spine_with(path, 64).close()
        later = HEADER_SIZE + 32 * stored_hash_index(4, 2)
        earlier = HEADER_SIZE + 32 * stored_hash_index(2, 3)
        flip_bit(path, later)
        flip_bit(path, earlier + 31)
        with Spine.open(str(path), IO, writable=False) as sp:
            result = sp.check()
            assert result is not None and result[0] == earlier

    def test_clean_spine(self, tmp_path: Path) -> None:
        """check() returns None on an intact spine, for every size."""
        sp = spine_with(tmp_path / "s", 33)
        for size in range(34):
            assert sp.check(size) is None
        with pytest.raises(ValueError):
            sp.check(34)
        sp.close()


class TestTruncate:
    def test_truncate_then_append(self, tmp_path: Path) -> None:
        """truncate then append again gives the right roots, in memory and on disk."""
        path = tmp_path / "s"
        sp = spine_with(path, 40)
        other = [merkle.leaf_hash(b"other %d" % i) for i in range(40)]
        for keep in (37, 32, 31, 17, 1, 0):
            sp.truncate(keep)
            assert sp.size == keep
            assert path.stat().st_size == expected_length(keep)
            assert sp.root() == merkle.root(LEAVES[:keep])
            sp.append_many(other[keep:40])
            sp.sync()
            want = LEAVES[:keep] + other[keep:40]
            assert sp.root() == merkle.root(want)
            for size in range(0, 41, 3):
                assert sp.root(size) == merkle.root(want[:size])
            assert sp.check() is None
            sp.truncate(40)  # no-op
            sp.truncate(keep)
            sp.append_many(LEAVES[keep:40])
            sp.sync()
        sp.close()
        with Spine.open(str(path), IO, writable=False) as ro:
            assert ro.root() == merkle.root(LEAVES[:40])

    def test_truncate_within_pending(self, tmp_path: Path) -> None:
        """truncate of unflushed leaves drops them from memory only."""
        path = tmp_path / "s"
        sp = spine_with(path, 10)
        sp.append_many(LEAVES[10:30])
        sp.truncate(21)
        assert path.stat().st_size == expected_length(10)
        assert sp.root() == merkle.root(LEAVES[:21])
        sp.append_many(LEAVES[21:25])
        sp.sync()
        assert path.stat().st_size == expected_length(25)
        assert sp.root() == merkle.root(LEAVES[:25])
        sp.truncate(10)
        sp.flush()
        assert path.stat().st_size == expected_length(10)
        sp.close()

    def test_truncate_is_durable(self, tmp_path: Path) -> None:
        """A truncation that cuts the file is fsynced."""
        layer = PowerLossFileLayer()
        path = str(tmp_path / "s")
        sp = Spine.open(path, layer, writable=True)
        sp.append_many(LEAVES[:30])
        sp.sync()
        sp.truncate(12)
        layer.forget_descriptors()
        layer.power_loss()
        with Spine.open(path, IO, writable=False) as ro:
            assert ro.size == 12

    def test_truncate_rejects_bad_size(self, tmp_path: Path) -> None:
        """truncate refuses a negative size or one above the current size."""
        sp = spine_with(tmp_path / "s", 5)
        for bad in (-1, 6):
            with pytest.raises(ValueError):
                sp.truncate(bad)
        assert sp.size == 5
        sp.close()


class TestWriteFailure:
    def test_failed_pwrite_keeps_pending_and_cuts_file(self, tmp_path: Path) -> None:
        """A failed pwrite leaves the batch pending and the file at its last good length."""

        class Flaky(FileLayer):
            fail = False

            def pwrite(self, fd: int, data: bytes, offset: int) -> None:
                if self.fail:
                    super().pwrite(fd, data[: len(data) // 2 + 5], offset)  # half written, then error
                    raise OSError(28, "No space left on device")
                super().pwrite(fd, data, offset)

        layer = Flaky()
        path = tmp_path / "s"
        sp = Spine.open(str(path), layer, writable=True)
        sp.append_many(LEAVES[:9])
        sp.flush()
        sp.append_many(LEAVES[9:20])
        layer.fail = True
        with pytest.raises(OSError):
            sp.flush()
        assert path.stat().st_size == expected_length(9)
        assert sp.size == 20
        assert sp.root() == merkle.root(LEAVES[:20])
        with Spine.open(str(path), IO, writable=False) as ro:
            assert ro.size == 9
        layer.fail = False
        sp.sync()
        assert path.stat().st_size == expected_length(20)
        assert sp.check() is None
        sp.close()
        with Spine.open(str(path), IO, writable=False) as ro:
            assert ro.root() == merkle.root(LEAVES[:20])


class TestLifecycle:
    def test_close_idempotent_and_closed_errors(self, tmp_path: Path) -> None:
        """close() is idempotent and later calls raise StoreClosedError."""
        sp = spine_with(tmp_path / "s", 3)
        sp.close()
        sp.close()
        assert sp.closed
        for call in (
            sp.root,
            sp.refresh,
            sp.sync,
            sp.check,
            lambda: sp.append(LEAVES[0]),
            lambda: sp.leaf(0),
        ):
            with pytest.raises(StoreClosedError):
                call()

    def test_after_fork_in_child(self, tmp_path: Path) -> None:
        """After a fork the child's spine is closed and never writes its pending hashes."""
        path = tmp_path / "s"
        sp = spine_with(path, 4)
        sp.append_many(LEAVES[4:9])
        sp._after_fork_in_child()
        assert sp.closed
        with pytest.raises(StoreClosedError):
            sp.sync()
        sp.close()
        assert path.stat().st_size == expected_length(4)

    def test_argument_errors(self, tmp_path: Path) -> None:
        """Out-of-range sizes and indices raise ValueError / IndexError."""
        with spine_with(tmp_path / "s", 6) as sp:
            with pytest.raises(ValueError):
                sp.root(7)
            with pytest.raises(ValueError):
                sp.root(-1)
            with pytest.raises(ValueError):
                sp.inclusion_proof(6)
            with pytest.raises(ValueError):
                sp.inclusion_proof(2, 2)
            with pytest.raises(ValueError):
                sp.inclusion_proof(0, 7)
            with pytest.raises(ValueError):
                sp.consistency_proof(5, 4)
            with pytest.raises(ValueError):
                sp.consistency_proof(1, 7)
            with pytest.raises(IndexError):
                sp.leaf(6)
            with pytest.raises(ValueError):
                sp.leaves(3, 7)
            with pytest.raises(ValueError):
                sp.leaves(4, 3)
            assert "size=6" in repr(sp)

    def test_file_created_in_cwd_relative_path(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """A relative path works (its directory is fsynced as '.')."""
        monkeypatch.chdir(tmp_path)
        with Spine.open("merkle.spine", IO, writable=True) as sp:
            sp.append(LEAVES[0])
            sp.sync()
        assert os.path.getsize(tmp_path / "merkle.spine") == expected_length(1)


class TestModel:
    @settings(max_examples=60, deadline=None)
    @given(
        st.lists(
            st.one_of(
                st.tuples(st.just("append"), st.integers(min_value=0, max_value=40)),
                st.tuples(st.just("flush"), st.just(0)),
                st.tuples(st.just("sync"), st.just(0)),
                st.tuples(st.just("truncate"), st.integers(min_value=0, max_value=200)),
                st.tuples(st.just("reopen"), st.just(0)),
            ),
            max_size=25,
        )
    )
    def test_random_operations_match_model(self, ops: list[tuple[str, int]]) -> None:
        """Random appends, flushes, truncations and reopens always agree with the merkle module."""
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "merkle.spine")
            sp = Spine.open(path, IO, writable=True)
            model: list[bytes] = []
            durable = 0
            counter = 0
            for op, arg in ops:
                if op == "append":
                    new = [merkle.leaf_hash(b"m%d" % (counter + i)) for i in range(arg)]
                    counter += arg
                    sp.append_many(new)
                    model.extend(new)
                elif op in ("flush", "sync"):
                    getattr(sp, op)()
                    durable = len(model)
                elif op == "truncate":
                    keep = arg % (len(model) + 1)
                    sp.truncate(keep)
                    del model[keep:]
                    durable = min(durable, keep)
                else:
                    sp.close()
                    sp = Spine.open(path, IO, writable=True)
                    del model[durable:]
                assert sp.size == len(model)
                assert sp.root() == merkle.root(model)
                if model:
                    i = (counter * 7) % len(model)
                    assert sp.inclusion_proof(i) == merkle.inclusion_proof(model, i)
                    old = (counter * 3) % (len(model) + 1)
                    assert sp.consistency_proof(old) == merkle.consistency_proof(model, old)
            assert sp.check() is None
            sp.close()
