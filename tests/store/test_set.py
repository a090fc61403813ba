"""Store sets (issue 7): the SET file, shard acquisition, merged reads, set checkpoints, tampering.

Everything here runs in one process: a shard "held by another process" is a shard this
test opened for writing itself (the writer lock refuses a second writer either way).
Real processes are in ``tests/test_processes.py``.
"""

from __future__ import annotations

import os
import shutil
import struct
import tempfile
import zlib
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quipu_logging import (
    AuditStore,
    ConfigError,
    CorruptionError,
    FormatVersionError,
    NotAStoreError,
    QueryError,
    SetCheckpoint,
    ShardsBusyError,
    StoreLockedError,
    StoreSet,
    StoreSetReader,
)
from quipu_logging.cli import main as cli
from quipu_logging.store import _format as fmt
from quipu_logging.store._set import default_shard_limit

T0 = 1_700_000_000_000_000


def _fill(store: AuditStore, n: int, *, tag: str, t0: int = T0, step: int = 10) -> None:
    store.append_batch([{"ts": t0 + i * step, "tag": tag, "i": i, "message": f"{tag} {i}"} for i in range(n)])


def _make_set(root: Path, sizes: list[int], *, limit: int = 4, step: int = 10) -> StoreSet:
    """A closed set whose shard k holds sizes[k] records, interleaved in time."""
    s = StoreSet.open(root, shards=limit)
    stores = [s.acquire()[1] for _ in sizes]
    for k, (store, n) in enumerate(zip(stores, sizes, strict=True)):
        _fill(store, n, tag=f"s{k}", t0=T0 + k, step=step)
    for store in stores:
        store.close()
    return s


@pytest.fixture
def set_root(tmp_path: Path) -> Path:
    return tmp_path / "set"


class TestSetFile:
    def test_new_set_writes_set_file_and_first_checkpoint(self, set_root: Path) -> None:
        """A new set has a SET file (format, version, limit) and a first set checkpoint binding it."""
        s = StoreSet.open(set_root, shards=5)
        info = orjson.loads((set_root / "SET").read_bytes())
        assert (info["format"], info["version"], info["shards"]) == ("quipu-log-set", 1, 5)
        assert s.limit == 5
        lines = s.checkpoints()
        assert len(lines) == 1
        cp = lines[0][1]
        assert cp is not None and cp.shards == ()
        assert (
            cp.set_digest.hex() == __import__("hashlib").sha256((set_root / "SET").read_bytes()).hexdigest()
        )

    def test_auto_limit_is_max_of_8_and_twice_the_cpus(self, set_root: Path) -> None:
        """``shards="auto"`` gives the larger of 8 and 2 x CPU count."""
        assert StoreSet.open(set_root).limit == max(8, 2 * (os.cpu_count() or 1)) == default_shard_limit()

    def test_existing_set_keeps_its_limit_and_bytes(self, set_root: Path) -> None:
        """The SET file is written once: reopening with another limit changes nothing."""
        StoreSet.open(set_root, shards=3)
        before = (set_root / "SET").read_bytes()
        assert StoreSet.open(set_root, shards=9).limit == 3
        assert (set_root / "SET").read_bytes() == before

    def test_single_store_is_not_a_set(self, tmp_path: Path) -> None:
        """A directory holding one store is refused as a set root (and vice versa)."""
        AuditStore.open(tmp_path / "one").close()
        with pytest.raises(NotAStoreError, match="single audit store"):
            StoreSet.open(tmp_path / "one", shards=2)
        StoreSet.open(tmp_path / "set", shards=2)
        with pytest.raises(NotAStoreError):
            AuditStore.open(tmp_path / "set")

    def test_foreign_directory_is_refused(self, tmp_path: Path) -> None:
        """A non-empty directory that is not a set is never turned into one."""
        (tmp_path / "x").mkdir()
        (tmp_path / "x" / "notes.txt").write_text("mine")
        with pytest.raises(NotAStoreError, match="not empty"):
            StoreSet.open(tmp_path / "x", shards=2)

    def test_other_version_is_unsupported(self, set_root: Path) -> None:
        """Only the SET file's version decides "unsupported" (CLI exit 2)."""
        StoreSet.open(set_root, shards=2)
        info = orjson.loads((set_root / "SET").read_bytes())
        info["version"] = 2
        (set_root / "SET").write_bytes(orjson.dumps(info))
        with pytest.raises(FormatVersionError):
            StoreSet.open(set_root)
        assert cli(["verify", str(set_root)]) == 2

    @pytest.mark.parametrize("bad", [0, -2, "x", True])
    def test_bad_limit_is_a_config_error(self, set_root: Path, bad: Any) -> None:
        """``shards`` must be "auto" or a positive number."""
        with pytest.raises(ConfigError):
            StoreSet.open(set_root, shards=bad)


def _create_at_once(root: str, limit: int, barrier: Any, out: Any) -> None:
    barrier.wait()
    out.put(StoreSet.open(root, shards=limit).limit)


class TestAcquire:
    @pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
    def test_processes_creating_a_set_at_once_agree(self, set_root: Path) -> None:
        """Four processes creating one set at once: one SET file, one limit, one first checkpoint."""
        import multiprocessing

        ctx = multiprocessing.get_context("fork")
        barrier, out = ctx.Barrier(4), ctx.Queue()
        procs = [
            ctx.Process(target=_create_at_once, args=(str(set_root), 2 + k, barrier, out)) for k in range(4)
        ]
        for p in procs:
            p.start()
        limits = [out.get(timeout=60) for _ in procs]
        for p in procs:
            p.join(60)
            assert p.exitcode == 0
        info = orjson.loads((set_root / "SET").read_bytes())
        assert limits == [info["shards"]] * 4 and info["shards"] in (2, 3, 4, 5)
        assert len(StoreSet.open(set_root).checkpoints()) == 1
        assert sorted(os.listdir(set_root)) == ["SET", "SET.lock", "set-checkpoints.jsonl"]

    def test_takes_the_first_free_shard_in_order(self, set_root: Path) -> None:
        """Each acquire takes the lowest shard whose lock is free."""
        s = StoreSet.open(set_root, shards=3)
        a, sa = s.acquire()
        b, sb = s.acquire()
        assert (a, b) == (0, 1)
        sa.close()
        c, sc = s.acquire()
        assert c == 0  # freed: reused, not a new shard
        for st_ in (sb, sc):
            st_.close()
        assert sorted(os.listdir(set_root)) == [
            "SET",
            "SET.lock",
            "set-checkpoints.jsonl",
            "shard-000",
            "shard-001",
        ]

    def test_all_busy_names_root_limit_and_holders(self, set_root: Path) -> None:
        """With every shard held, the error names the root, the limit and the holders' pids."""
        s = StoreSet.open(set_root, shards=2)
        held = [s.acquire()[1] for _ in range(2)]
        with pytest.raises(ShardsBusyError) as info:
            s.acquire()
        err = info.value
        assert isinstance(err, StoreLockedError)
        assert err.limit == 2 and err.root == str(set_root.resolve())
        assert err.pids == [os.getpid(), os.getpid()]
        assert f"all 2 shards of store set {str(set_root.resolve())!r}" in str(err) and str(
            os.getpid()
        ) in str(err)
        for store in held:
            store.close()

    def test_reused_shard_continues_its_tree(self, set_root: Path) -> None:
        """A restarted writer takes a free shard and appends after its records: seqs go on."""
        s = StoreSet.open(set_root, shards=2)
        _, store = s.acquire()
        _fill(store, 5, tag="first")
        root_before = store.merkle_root()
        store.close()
        index, again = s.acquire()
        assert index == 0 and again.tree_size == 5 and again.merkle_root(5) == root_before
        assert again.append({"tag": "second"}).seq == 5
        again.close()

    def test_damaged_shard_is_skipped(self, set_root: Path) -> None:
        """A shard that cannot be opened does not stop a process from logging: the next one serves."""
        s = StoreSet.open(set_root, shards=3)
        _, store = s.acquire()
        store.close()
        (set_root / "shard-000" / "FORMAT").write_text("not json")
        index, other = s.acquire()
        assert index == 1
        other.close()


class TestReading:
    def test_open_reader_on_a_set_reads_every_shard(self, set_root: Path) -> None:
        """``AuditStore.open_reader(set)`` is a set reader; records say their shard and seq."""
        _make_set(set_root, [3, 4, 0])
        with AuditStore.open_reader(set_root) as reader:
            assert isinstance(reader, StoreSetReader)
            assert reader.tree_size == 7
            recs = list(reader.scan())
        assert [(r.shard, r.seq) for r in recs] == [
            ("shard-000", 0),
            ("shard-001", 0),
            ("shard-000", 1),
            ("shard-001", 1),
            ("shard-000", 2),
            ("shard-001", 2),
            ("shard-001", 3),
        ]
        assert all(r.payload["seq"] == r.seq for r in recs)

    def test_scan_reverse_and_start(self, set_root: Path) -> None:
        """Reverse scans merge newest first; a seq start is refused (it names no shard)."""
        _make_set(set_root, [2, 2])
        with AuditStore.open_reader(set_root) as reader:
            forward = [(r.ts, r.shard, r.seq) for r in reader.scan()]
            backward = [(r.ts, r.shard, r.seq) for r in reader.scan(reverse=True)]
            assert backward == forward[::-1] == sorted(forward, reverse=True)
            with pytest.raises(QueryError, match="one shard"):
                next(reader.scan(1))

    @settings(
        max_examples=25, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
    )
    @given(
        sizes=st.lists(st.integers(0, 12), min_size=1, max_size=4),
        limit=st.integers(1, 7),
        newest_first=st.booleans(),
        steps=st.lists(st.integers(1, 5), min_size=4, max_size=4),
        only_even=st.booleans(),
    )
    def test_paging_returns_every_match_once_in_merged_order(
        self, sizes: list[int], limit: int, newest_first: bool, steps: list[int], only_even: bool
    ) -> None:
        """Paging a set with one cursor returns each match exactly once, ordered by (ts, shard, seq)."""
        with tempfile.TemporaryDirectory() as tmp:
            s = StoreSet.open(Path(tmp) / "set", shards=4)
            stores = [s.acquire()[1] for _ in sizes]
            for k, (store, n) in enumerate(zip(stores, sizes, strict=True)):
                store.append_batch([{"ts": T0 + i * steps[k] + k, "even": i % 2 == 0} for i in range(n)])
                store.close()
            expected = [
                (T0 + i * steps[k] + k, k, i)
                for k, n in enumerate(sizes)
                for i in range(n)
                if not only_even or i % 2 == 0
            ]
            expected.sort(reverse=newest_first)
            where = {"even": True} if only_even else None
            got = []
            with AuditStore.open_reader(s.root) as reader:
                cursor = None
                for _ in range(200):
                    page = reader.query(where=where, newest_first=newest_first, limit=limit, cursor=cursor)
                    assert len(page.records) <= limit
                    got.extend((r.ts, int(r.shard[-3:]), r.seq) for r in page.records if r.shard)
                    cursor = page.next_cursor
                    if cursor is None:
                        break
            assert got == expected

    def test_newest_first_covers_the_first_pages_snapshot(self, set_root: Path) -> None:
        """Records (and shards) born after the first newest-first page are not returned by later pages."""
        s = _make_set(set_root, [3, 3])
        with AuditStore.open_reader(set_root) as reader:
            page = reader.query(limit=2)
            _, late = s.acquire()  # shard-000 is free again: records appended after the snapshot
            _fill(late, 3, tag="late", t0=T0 + 1_000_000)
            late.close()
            reader.refresh()
            seen = [(r.shard, r.seq) for r in page.records]
            while page.next_cursor:
                page = reader.query(limit=2, cursor=page.next_cursor)
                seen += [(r.shard, r.seq) for r in page.records]
        assert len(seen) == len(set(seen)) == 6

    def test_oldest_first_reaches_later_appends_and_shards(self, set_root: Path) -> None:
        """Oldest-first paging continues into records and shards added after the cursor was made."""
        s = _make_set(set_root, [2])
        with AuditStore.open_reader(set_root) as reader:
            page = reader.query(newest_first=False, limit=2)
            assert page.next_cursor is not None
            a, b = s.acquire()[1], s.acquire()[1]
            _fill(a, 1, tag="later", t0=T0 + 10_000)
            _fill(b, 1, tag="new-shard", t0=T0 + 20_000)
            a.close()
            b.close()
            reader.refresh()
            page = reader.query(newest_first=False, limit=5, cursor=page.next_cursor)
        assert [r.payload["tag"] for r in page.records] == ["later", "new-shard"]

    def test_cursor_errors(self, tmp_path: Path) -> None:
        """A garbled cursor, one from another set, another query or a single store is a QueryError."""
        _make_set(tmp_path / "a", [3])
        _make_set(tmp_path / "b", [3])
        with AuditStore.open(tmp_path / "one") as one:
            _fill(one, 3, tag="one")
            single = one.query(limit=1).next_cursor
        with AuditStore.open_reader(tmp_path / "a") as a, AuditStore.open_reader(tmp_path / "b") as b:
            cursor = a.query(limit=1).next_cursor
            assert cursor is not None and single is not None
            with pytest.raises(QueryError, match="garbled"):
                a.query(limit=1, cursor="!!")
            with pytest.raises(QueryError, match="another store set"):
                b.query(limit=1, cursor=cursor)
            with pytest.raises(QueryError, match="different query"):
                a.query(limit=1, cursor=cursor, newest_first=False)
            with pytest.raises(QueryError, match="single store"):
                a.query(limit=1, cursor=single)

    def test_stats_add_up_the_shards(self, set_root: Path) -> None:
        """``stats()`` of a set sums its shards and lists each."""
        _make_set(set_root, [2, 5])
        with AuditStore.open_reader(set_root) as reader:
            info = reader.stats()
        assert info["set"] is True and info["records"] == 7 and info["tree_size"] == 7
        assert [s["shard"] for s in info["shards"]] == ["shard-000", "shard-001"]


# ------------------------------------------------------------------------------ integrity


def _problems(root: Path, **kwargs: Any) -> list[str]:
    with AuditStore.open_reader(root) as reader:
        report = reader.verify(**kwargs)
    assert report.ok == (not report.problems)
    return [p.reason for p in report.problems]


@pytest.fixture
def checkpointed(set_root: Path) -> Path:
    """A set of three shards with a set checkpoint over them."""
    s = _make_set(set_root, [4, 6, 3])
    s.checkpoint()
    assert _problems(set_root) == []
    return set_root


def _rolled_back_set(set_root: Path, tmp_path: Path) -> StoreSet:
    """A set checkpointed with shard-001 at 7 records, then shard-001 restored from a 3-record copy."""
    s = _make_set(set_root, [3, 3])
    shutil.copytree(set_root / "shard-001", tmp_path / "old")
    _, store = s.acquire()
    _, store1 = s.acquire()
    _fill(store1, 4, tag="more")
    store.close()
    store1.close()
    s.checkpoint()
    shutil.rmtree(set_root / "shard-001")
    shutil.copytree(tmp_path / "old", set_root / "shard-001")
    return s


class TestSetIntegrity:
    def test_checkpoint_never_waits_for_live_shard_writers(self, set_root: Path) -> None:
        """A set checkpoint is written while every shard's writer holds its lock."""
        s = StoreSet.open(set_root, shards=2)
        live = [s.acquire()[1] for _ in range(2)]
        _fill(live[0], 3, tag="a")
        cp = s.checkpoint()
        assert [(x.name, x.tree_size) for x in cp.shards] == [("shard-000", 3), ("shard-001", 0)]
        _fill(live[1], 2, tag="b")
        assert _problems(set_root) == []
        for store in live:
            store.close()

    def test_layout_is_the_documented_bytes(self, checkpointed: Path) -> None:
        """The signed message is domain, created_at, SET digest, count, (index, size, root)..., prev."""
        import hashlib
        import struct

        lines = StoreSet.open(checkpointed).checkpoints()
        cp = lines[-1][1]
        assert cp is not None
        expected = b"quipu-set-checkpoint-v1\n" + struct.pack(">Q", cp.created_at)
        expected += hashlib.sha256((checkpointed / "SET").read_bytes()).digest() + struct.pack(">I", 3)
        for state in cp.shards:
            expected += struct.pack(">IQ", state.index, state.tree_size) + state.root
        expected += lines[-2][1].digest() if lines[-2][1] else b""
        assert cp.message() == expected
        assert cp.sig == hashlib.sha256(expected).hexdigest()

    def test_deleted_shard_is_tampering(self, checkpointed: Path) -> None:
        """Removing a shard the set checkpoint lists is reported."""
        shutil.rmtree(checkpointed / "shard-002")
        assert any("deleted" in r for r in _problems(checkpointed))
        assert cli(["verify", str(checkpointed)]) == 1

    def test_deleted_middle_shard_without_checkpoint(self, set_root: Path) -> None:
        """Shards are taken in order: a missing shard below an existing one is a deletion."""
        _make_set(set_root, [2, 2, 2])
        shutil.rmtree(set_root / "shard-001")
        assert any("deleted" in r for r in _problems(set_root))

    def test_rolled_back_shard_is_tampering(self, set_root: Path, tmp_path: Path) -> None:
        """A shard restored from an older copy (a smaller tree) is reported."""
        _rolled_back_set(set_root, tmp_path)
        assert any("rolled back" in r for r in _problems(set_root))

    def test_rewritten_shard_at_same_size_is_tampering(self, checkpointed: Path, tmp_path: Path) -> None:
        """A shard replaced by another consistent store of the same size is reported."""
        with AuditStore.open(tmp_path / "forged") as forged:
            _fill(forged, 6, tag="forged")
        shutil.rmtree(checkpointed / "shard-001")
        shutil.copytree(tmp_path / "forged", checkpointed / "shard-001")
        reasons = _problems(checkpointed)
        assert any("rewritten" in r for r in reasons), reasons

    @pytest.mark.parametrize("name", ["shard-009", "shard-7", "shard-0001"])
    def test_shard_added_outside_the_list_is_tampering(
        self, checkpointed: Path, name: str, tmp_path: Path
    ) -> None:
        """A shard beyond the limit, or not a canonical shard name, is reported."""
        with AuditStore.open(tmp_path / "extra") as extra:
            _fill(extra, 2, tag="extra")
        shutil.copytree(tmp_path / "extra", checkpointed / name)
        assert any("outside the set's list" in r for r in _problems(checkpointed))

    def test_unreadable_shard_is_reported_not_raised(self, checkpointed: Path) -> None:
        """A shard that is not a store any more is a problem of verify; the other shards still read."""
        (checkpointed / "shard-001" / "FORMAT").write_text("not json")
        with AuditStore.open_reader(checkpointed) as reader:
            assert sorted(reader.shards) == ["shard-000", "shard-002"]
            assert len(list(reader.scan())) == 7
        assert any("cannot be read" in r for r in _problems(checkpointed))
        assert cli(["verify", str(checkpointed)]) == 1

    def test_edited_set_file_is_tampering(self, checkpointed: Path) -> None:
        """Any edit of the SET file (here: a larger limit) is reported."""
        info = orjson.loads((checkpointed / "SET").read_bytes())
        info["shards"] = 64
        (checkpointed / "SET").write_bytes(orjson.dumps(info, option=orjson.OPT_SORT_KEYS) + b"\n")
        assert any("SET file was edited" in r for r in _problems(checkpointed))
        assert cli(["verify", str(checkpointed)]) == 1

    def test_removed_set_checkpoint_line_breaks_the_chain(self, checkpointed: Path) -> None:
        """Dropping a set checkpoint line is reported by the prev chain."""
        StoreSet.open(checkpointed).checkpoint()
        path = checkpointed / "set-checkpoints.jsonl"
        lines = path.read_bytes().splitlines(keepends=True)
        path.write_bytes(lines[0] + b"".join(lines[2:]))
        assert any("chain is broken" in r for r in _problems(checkpointed))

    def test_anchor_proves_every_shard_extends(self, checkpointed: Path, tmp_path: Path) -> None:
        """Given a set anchor, a rebuilt set (checkpoints and all) is caught; an honest one passes."""
        anchor = StoreSet.open(checkpointed).checkpoint().to_json()
        s = StoreSet.open(checkpointed)
        stores = [s.acquire()[1] for _ in range(3)]
        for store in stores:
            _fill(store, 2, tag="after", t0=T0 + 10**9)
            store.close()
        assert _problems(checkpointed, anchor=anchor) == []
        # Rebuild shard-000 from scratch, with a consistent history of its own.
        shutil.rmtree(checkpointed / "shard-000")
        with AuditStore.open(checkpointed / "shard-000") as forged:
            _fill(forged, 6, tag="forged")
        (checkpointed / "set-checkpoints.jsonl").unlink()
        StoreSet.open(checkpointed).checkpoint()
        reasons = _problems(checkpointed, anchor=anchor)
        assert any("the anchor" in r and "rewritten" in r for r in reasons), reasons
        (tmp_path / "anchor.json").write_text(anchor + "\n")
        assert cli(["verify", str(checkpointed), "--anchor", str(tmp_path / "anchor.json")]) == 1

    def test_signed_set_checkpoints(
        self, checkpointed: Path, tmp_path: Path, ed25519_pem: tuple[Path, bytes]
    ) -> None:
        """With --key the set checkpoint is Ed25519-signed; verify with the public key accepts it."""
        from cryptography.hazmat.primitives.asymmetric import ed25519

        pem, pub = ed25519_pem
        # The fixture's unsigned checkpoint over the shards is a problem under keys; the set's
        # first one (no shards, written at creation by a process without a key) is not.
        assert any("unsigned" in r for r in _problems(checkpointed, public_keys=[pub]))
        path = checkpointed / "set-checkpoints.jsonl"
        path.write_bytes(path.read_bytes().splitlines(keepends=True)[0])
        assert cli(["checkpoint", str(checkpointed), "--key", str(pem)]) == 0
        cp = StoreSet.open(checkpointed).checkpoints()[-1][1]
        assert isinstance(cp, SetCheckpoint) and cp.signed
        assert _problems(checkpointed, public_keys=[pub]) == []
        other = ed25519.Ed25519PrivateKey.generate().public_key()
        assert any("not among the public keys" in r for r in _problems(checkpointed, public_keys=[other]))


class TestCli:
    def test_commands_accept_a_set(
        self, set_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """query/export/stats/prove/checkpoint/verify/retention work on a set root."""
        _make_set(set_root, [3, 2])
        assert cli(["query", str(set_root), "--json", "--limit", "10"]) == 0
        lines = [orjson.loads(x) for x in capsys.readouterr().out.splitlines()]
        assert sorted((x["$shard"], x["seq"]) for x in lines) == [
            ("shard-000", 0),
            ("shard-000", 1),
            ("shard-000", 2),
            ("shard-001", 0),
            ("shard-001", 1),
        ]
        assert cli(["export", str(set_root)]) == 0
        exported = [orjson.loads(x) for x in capsys.readouterr().out.splitlines()]
        assert len(exported) == 5 and {x["shard"] for x in exported} == {"shard-000", "shard-001"}
        assert cli(["tail", str(set_root), "-n", "2", "--json"]) == 0
        tail = [orjson.loads(x) for x in capsys.readouterr().out.splitlines()]
        assert [(x["$shard"], x["seq"]) for x in tail] == [("shard-001", 1), ("shard-000", 2)]
        assert cli(["stats", str(set_root), "--json"]) == 0
        assert orjson.loads(capsys.readouterr().out)["records"] == 5
        assert cli(["prove", str(set_root), "1"]) == 2
        capsys.readouterr()
        assert cli(["prove", str(set_root), "1", "--shard", "shard-001"]) == 0
        proof = tmp_path / "p.json"
        proof.write_text(capsys.readouterr().out)
        assert cli(["prove", "--check", str(proof)]) == 0
        assert cli(["checkpoint", str(set_root), "--export", str(tmp_path / "a.json")]) == 0
        assert cli(["verify", str(set_root), "--anchor", str(tmp_path / "a.json")]) == 0
        assert cli(["retention", str(set_root), "--max-age", "1d"]) == 0

    def test_retention_refuses_a_live_set(self, set_root: Path) -> None:
        """A set with a live shard writer is refused by retention (exit 2)."""
        s = _make_set(set_root, [1, 1])
        _, live = s.acquire()
        assert cli(["retention", str(set_root), "--max-age", "1d"]) == 2
        assert cli(["checkpoint", str(set_root)]) == 0  # a set checkpoint never needs a writer lock
        live.close()


# ------------------------------------------------------------------------------ damage found late


class TestMissingSetFile:
    """A set whose SET file was deleted is damaged: never silently re-created, and verify says so."""

    @pytest.fixture
    def orphaned(self, checkpointed: Path) -> Path:
        (checkpointed / "SET").unlink()
        return checkpointed

    def test_open_refuses_to_recreate_it(self, orphaned: Path) -> None:
        """StoreSet.open does not write a new SET file into an existing set (it would bind a new one)."""
        with pytest.raises(CorruptionError, match="SET file is missing") as info:
            StoreSet.open(orphaned, shards=4)
        assert str(orphaned) in str(info.value)
        assert not (orphaned / "SET").exists()

    def test_checkpoint_lines_alone_mark_a_set(self, set_root: Path) -> None:
        """Even with no shard yet, set-checkpoints.jsonl without SET is a damaged set, not a new one."""
        StoreSet.open(set_root, shards=2)
        (set_root / "SET").unlink()
        with pytest.raises(CorruptionError, match="SET file is missing"):
            StoreSet.open(set_root, shards=2)

    def test_handler_diverts_with_a_clear_message(
        self, orphaned: Path, capfd: pytest.CaptureFixture[str]
    ) -> None:
        """An app restarted on the damaged set sends its records to the fallback and says why."""
        import logging

        from quipu_logging import AuditHandler

        seen: list[logging.LogRecord] = []

        class Keep(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                seen.append(record)

        handler = AuditHandler(orphaned, shards=4, fallback=Keep())
        log = logging.getLogger(f"test.set.orphaned.{id(handler)}")
        log.propagate = False
        log.addHandler(handler)
        try:
            log.warning("after the SET file went", extra={"actor": "u1"})
            handler.flush(timeout=5)
        finally:
            log.removeHandler(handler)
            handler.close()
        assert [r.getMessage() for r in seen] == ["after the SET file went"]
        assert handler.unavailable is not None and "SET file is missing" in handler.unavailable
        assert "SET file is missing" in capfd.readouterr().err
        assert not (orphaned / "SET").exists()

    def test_still_readable(self, orphaned: Path) -> None:
        """The shards stay readable (a reader over the set), so the records can be recovered."""
        with AuditStore.open_reader(orphaned) as reader:
            assert isinstance(reader, StoreSetReader)
            assert len(list(reader.scan())) == 13

    def test_verify_reports_tampering(self, orphaned: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """verify (API and CLI) reports the missing SET file as a problem: exit 1, not a usage error."""
        assert any("SET file is missing" in r for r in _problems(orphaned))
        assert cli(["verify", str(orphaned)]) == 1
        assert "SET file is missing" in capsys.readouterr().out


class TestCreationCheckpoint:
    def test_replaced_checkpoint_file_is_reported(self, checkpointed: Path) -> None:
        """Edited SET + a fresh set-checkpoints.jsonl: verify reports the lost creation checkpoint."""
        info = orjson.loads((checkpointed / "SET").read_bytes())
        info["shards"] = 64
        (checkpointed / "SET").write_bytes(orjson.dumps(info, option=orjson.OPT_SORT_KEYS) + b"\n")
        (checkpointed / "set-checkpoints.jsonl").unlink()
        assert any("creation checkpoint" in r for r in _problems(checkpointed))
        StoreSet.open(checkpointed).checkpoint()
        assert any("creation checkpoint" in r for r in _problems(checkpointed))

    def test_crash_before_the_creation_checkpoint_heals(self, set_root: Path) -> None:
        """A crash between the SET file and its first checkpoint: the next open writes the creation line."""
        StoreSet.open(set_root, shards=2)
        (set_root / "set-checkpoints.jsonl").unlink()
        s = StoreSet.open(set_root, shards=2)
        lines = s.checkpoints()
        assert len(lines) == 1 and lines[0][1] is not None and lines[0][1].shards == ()
        _make_set(set_root, [2], limit=2)
        assert _problems(set_root) == []


def _frame_offsets(segment: Path) -> list[int]:
    """The offsets of a segment's frames (u32 LE length, u32 LE CRC-32, payload)."""
    data = segment.read_bytes()
    offsets = []
    pos = fmt.SEGMENT_HEADER
    while pos + fmt.FRAME_HEADER <= len(data):
        (length,) = struct.unpack_from("<I", data, pos)
        offsets.append(pos)
        pos += fmt.FRAME_HEADER + length
    return offsets


def _cut_last_records(shard: Path, n: int) -> None:
    """Removes the last n frames of a shard's newest segment (what a power loss or a hand can do)."""
    seg = sorted((shard / "log").glob("*.log"))[-1]
    seg.write_bytes(seg.read_bytes()[: _frame_offsets(seg)[-n]])


class TestCheckpointChecksShards:
    """A set checkpoint never vouches for records a shard no longer holds."""

    def test_refuses_a_shard_shorter_than_its_spine(
        self, set_root: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Records cut from a shard after its last checkpoint: checkpoint refuses (exit 1), states nothing."""
        s = StoreSet.open(set_root, shards=3)
        _, a = s.acquire()
        _, b = s.acquire()
        _fill(a, 5, tag="a")
        b.checkpoint()
        _fill(b, 6, tag="b")
        b._spine.sync()  # type: ignore[union-attr]
        a.close()
        b._release_all()  # the process dies: no close(), no final checkpoint
        _cut_last_records(set_root / "shard-001", 2)
        before = (set_root / "set-checkpoints.jsonl").read_bytes()
        with pytest.raises(CorruptionError, match="shard-001"):
            s.checkpoint()
        assert cli(["checkpoint", str(set_root)]) == 1
        err = capsys.readouterr().err
        assert "shard-001" in err and "seq 4" in err
        assert (set_root / "set-checkpoints.jsonl").read_bytes() == before

    def test_refuses_a_record_changed_after_hashing(self, set_root: Path) -> None:
        """A record edited (CRC fixed) in the crash window: checkpoint refuses rather than vouch for it."""
        s = StoreSet.open(set_root, shards=2)
        _, a = s.acquire()
        _fill(a, 4, tag="a")
        a._spine.sync()  # type: ignore[union-attr]
        a._release_all()
        seg = sorted((set_root / "shard-000" / "log").glob("*.log"))[-1]
        data = bytearray(seg.read_bytes())
        pos = fmt.SEGMENT_HEADER
        (length,) = struct.unpack_from("<I", data, pos)
        payload = bytes(data[pos + 8 : pos + 8 + length]).replace(b'"a 0"', b'"A 0"')
        assert len(payload) == length
        data[pos + 8 : pos + 8 + length] = payload
        struct.pack_into("<I", data, pos + 4, zlib.crc32(payload))
        seg.write_bytes(bytes(data))
        with pytest.raises(CorruptionError, match="seq 0"):
            s.checkpoint()

    def test_live_and_intact_shards_are_stated(self, set_root: Path) -> None:
        """The check passes intact shards, live writers included, and states their full size."""
        s = StoreSet.open(set_root, shards=2)
        _, a = s.acquire()
        _, b = s.acquire()
        _fill(a, 7, tag="a")
        _fill(b, 3, tag="b")
        b.close()
        cp = s.checkpoint()
        assert [(x.name, x.tree_size) for x in cp.shards] == [("shard-000", 7), ("shard-001", 3)]
        a.close()
        assert _problems(set_root) == []


class TestCheckpointRefusesWhatIsGone:
    """Beyond the crash window: a set checkpoint never states records the shard's log lacks."""

    def test_cut_tail_of_a_cleanly_closed_shard(self, set_root: Path) -> None:
        """close() checkpointed everything, then records were cut: still refused (exit 1)."""
        s = _make_set(set_root, [30, 5])
        _cut_last_records(set_root / "shard-000", 10)
        with pytest.raises(CorruptionError, match="ends at seq 20"):
            s.checkpoint()
        assert cli(["checkpoint", str(set_root)]) == 1

    def test_deleted_log_directory(self, set_root: Path) -> None:
        """A shard whose log/ is gone: refused."""
        s = _make_set(set_root, [4])
        shutil.rmtree(set_root / "shard-000" / "log")
        with pytest.raises(CorruptionError, match="no readable segment"):
            s.checkpoint()

    def test_deleted_middle_segment(self, set_root: Path) -> None:
        """A segment missing between two others: refused, naming the gap."""
        s = StoreSet.open(set_root, shards=2)
        from quipu_logging import StoreConfig

        _, store = s.acquire(lambda root: StoreConfig(root=root, max_segment_bytes=400))
        _fill(store, 40, tag="a")
        store.close()
        segments = sorted((set_root / "shard-000" / "log").glob("*.log"))
        assert len(segments) >= 3
        segments[1].unlink()
        with pytest.raises(CorruptionError, match="skips seq"):
            s.checkpoint()

    def test_states_only_what_was_fsynced(self, set_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """Records a live writer appends after the fsync are not stated (read the size, then fsync)."""
        from quipu_logging.store import _set as set_module

        s = StoreSet.open(set_root, shards=1)
        _, live = s.acquire()
        _fill(live, 5, tag="a")
        real = set_module._fsync_shard
        durable: list[int] = []

        def fsync_then_more_arrive(shard_root: str) -> None:
            real(shard_root)
            durable.append(live.tree_size)
            _fill(live, 3, tag="late", t0=T0 + 10**6)  # not fsynced by this checkpoint

        monkeypatch.setattr(set_module, "_fsync_shard", fsync_then_more_arrive)
        cp = s.checkpoint()
        assert durable == [5]
        assert [x.tree_size for x in cp.shards] == [5]
        live.close()


class TestForeignShards:
    def test_symlink_in_a_shard_slot(self, checkpointed: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """A symbolic link named like a shard (here: to the set itself) is reported, never followed."""
        os.symlink(".", checkpointed / "shard-003")
        assert any("symbolic link" in r for r in _problems(checkpointed))
        assert cli(["verify", str(checkpointed)]) == 1
        capsys.readouterr()
        assert cli(["query", str(checkpointed), "--json"]) == 0
        assert len(capsys.readouterr().out.splitlines()) == 13
        with pytest.raises(CorruptionError, match="symbolic link"):
            StoreSet.open(checkpointed).checkpoint()
        index, store = StoreSet.open(checkpointed).acquire()  # passed over, not written through
        assert index == 0
        store.close()

    def test_nested_set_in_a_shard_slot(self, checkpointed: Path, tmp_path: Path) -> None:
        """Another set copied in as a shard is reported as added outside the set's list."""
        _make_set(tmp_path / "other", [2])
        shutil.copytree(tmp_path / "other", checkpointed / "shard-003")
        assert any("holds a store set" in r for r in _problems(checkpointed))
        assert cli(["verify", str(checkpointed)]) == 1
        assert cli(["checkpoint", str(checkpointed)]) == 1

    def test_copied_shard_is_flagged_as_uncovered(self, checkpointed: Path) -> None:
        """A shard no set checkpoint lists verifies (it may be newborn) but is named in a warning."""
        shutil.copytree(checkpointed / "shard-000", checkpointed / "shard-003")
        with AuditStore.open_reader(checkpointed) as reader:
            report = reader.verify()
        assert report.ok
        assert any(
            w.startswith("shard-003 (4 records) is covered by no set checkpoint") for w in report.warnings
        )


def _assert_damaged_but_readable(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """verify reports the SET file (exit 1), the 13 records stay readable, writers refuse the set."""
    assert cli(["verify", str(root)]) == 1
    assert "SET file" in capsys.readouterr().out
    assert cli(["stats", str(root), "--json"]) == 0
    assert orjson.loads(capsys.readouterr().out)["records"] == 13
    with pytest.raises(CorruptionError):
        StoreSet.open(root)


class TestEditedSetFile:
    @pytest.mark.parametrize(
        "content",
        [b"{}\n", b"[]\n", b"null\n", b'{"format": "quipu-log"}\n', b'{"format": "quipu-log-set"}\n'],
    )
    def test_any_edit_is_tampering_and_shards_stay_readable(
        self, checkpointed: Path, content: bytes, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A SET file replaced by other JSON: verify exit 1 (not 2), reads go on, writers refuse."""
        (checkpointed / "SET").write_bytes(content)
        _assert_damaged_but_readable(checkpointed, capsys)

    def test_set_file_replaced_by_a_directory(
        self, checkpointed: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """SET turned into a directory: tampering (exit 1), shards readable, writers refuse."""
        (checkpointed / "SET").unlink()
        (checkpointed / "SET").mkdir()
        _assert_damaged_but_readable(checkpointed, capsys)

    def test_newer_version_still_asks_for_an_upgrade(self, checkpointed: Path) -> None:
        """An integer version other than 1 is a format this release cannot read (exit 2), not damage."""
        info = orjson.loads((checkpointed / "SET").read_bytes())
        info["version"] = 2
        (checkpointed / "SET").write_bytes(orjson.dumps(info))
        with pytest.raises(FormatVersionError):
            StoreSet.open(checkpointed)
        assert cli(["verify", str(checkpointed)]) == 2

    def test_single_store_handler_on_a_set_says_shards(self, checkpointed: Path) -> None:
        """Opening a set root as a single store names the way out: shards=."""
        with pytest.raises(NotAStoreError, match='shards="auto"'):
            AuditStore.open(checkpointed)


class TestCheckpointNeverPapersOver:
    def test_rolled_back_shard_is_refused(self, set_root: Path, tmp_path: Path) -> None:
        """A shard restored from an older copy: the next set checkpoint refuses instead of restating it."""
        s = _rolled_back_set(set_root, tmp_path)
        before = (set_root / "set-checkpoints.jsonl").read_bytes()
        with pytest.raises(CorruptionError, match="rolled back"):
            s.checkpoint()
        assert cli(["checkpoint", str(set_root)]) == 1
        assert (set_root / "set-checkpoints.jsonl").read_bytes() == before

    def test_rewritten_shard_is_refused(self, checkpointed: Path, tmp_path: Path) -> None:
        """A shard replaced by another consistent store of the same size: refused."""
        with AuditStore.open(tmp_path / "forged") as forged:
            _fill(forged, 6, tag="forged")
        shutil.rmtree(checkpointed / "shard-001")
        shutil.copytree(tmp_path / "forged", checkpointed / "shard-001")
        with pytest.raises(CorruptionError, match="rewritten"):
            StoreSet.open(checkpointed).checkpoint()

    def test_deleted_last_shard_is_refused(self, checkpointed: Path) -> None:
        """The highest shard deleted (nothing below it is missing): refused as deleted."""
        shutil.rmtree(checkpointed / "shard-002")
        with pytest.raises(CorruptionError, match="shard-002, which is gone"):
            StoreSet.open(checkpointed).checkpoint()

    def test_honest_growth_is_stated(self, checkpointed: Path) -> None:
        """Shards that grew since the previous set checkpoint extend it: the next one is written."""
        s = StoreSet.open(checkpointed)
        stores = [s.acquire()[1] for _ in range(3)]
        for store in stores:
            _fill(store, 2, tag="later", t0=T0 + 10**9)
            store.close()
        cp = s.checkpoint()
        assert [x.tree_size for x in cp.shards] == [6, 8, 5]


def test_crash_tail_of_a_shard_is_pending_and_named(set_root: Path) -> None:
    """A shard's unhashed tail (a killed worker) is pending, with a warning naming the shard."""
    _make_set(set_root, [5, 2])
    seg = sorted((set_root / "shard-000" / "log").glob("*.log"))[-1]
    with open(seg, "ab") as f:
        f.write(
            fmt.encode_frame(
                orjson.dumps({"seq": 5, "ts": T0 + 99, "tag": "s0", "i": 5}, option=orjson.OPT_SORT_KEYS)
            )
        )
    with AuditStore.open_reader(set_root) as reader:
        report = reader.verify()
    assert report.ok and report.pending == 1 and report.records_checked == 7
    [tail] = [w for w in report.warnings if "Merkle tree yet" in w]
    assert tail.startswith("shard-000: 1 record (seq 5)")
