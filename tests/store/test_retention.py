"""Retention (DESIGN §4 "Retention"; issue 3 requirements 6 and 7).

``apply_retention`` deletes whole sealed segments, oldest first (age OR size),
never the active segment and never the spine, after appending a
``{"$sys": "retention", "removed_below": k}`` record and writing a checkpoint.
``verify`` then accepts exactly the missing records ``seq < k`` and reports any
other missing segment. Ages come from the records' own ``ts`` (set in the past),
never from waiting.
"""

from __future__ import annotations

import json
import shutil
import struct
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from quipu_logging import (
    AuditStore,
    Checkpoint,
    ConfigError,
    ConsistencyProof,
    InclusionProof,
    RetentionPolicy,
    StoreClosedError,
    StoreConfig,
)
from quipu_logging.store import FileLayer, merkle

DAY = 86_400_000_000  # µs
SEGMENT = 1200  # bytes: a handful of records per segment


def now_us() -> int:
    """The current time in µs."""
    return time.time_ns() // 1000


def event(i: int, age_days: float) -> dict[str, Any]:
    """A record whose own ``ts`` is ``age_days`` in the past."""
    return {"i": i, "actor": f"user-{i % 3}", "note": "z" * (i % 40), "ts": now_us() - int(age_days * DAY)}


def segments(root: Path) -> list[Path]:
    """The segment files, oldest first."""
    return sorted((root / "log").glob("seg-*.log"))


def base_of(seg: Path) -> int:
    """A segment's base seq, from its header."""
    return int(struct.unpack_from("<Q", seg.read_bytes(), 8)[0])


def checkpoints(root: Path) -> list[dict[str, Any]]:
    """The checkpoint lines, parsed."""
    return [json.loads(line) for line in (root / "checkpoints.jsonl").read_text().splitlines() if line]


def retention_records(store: AuditStore) -> list[dict[str, Any]]:
    """Payloads of the store's own retention records."""
    return [r.payload for r in store.scan() if r.payload.get("$sys") == "retention"]


def open_store(root: Path, **kw: Any) -> AuditStore:
    """A writer with small segments."""
    return AuditStore.open(StoreConfig(root=root, max_segment_bytes=SEGMENT, sync="os", **kw))


def fill(store: AuditStore, ages: Sequence[float], start: int = 0) -> None:
    """Appends one record per age, in order."""
    store.append_batch([event(start + k, age) for k, age in enumerate(ages)])


def problems_text(report: Any) -> str:
    """All problem reasons and files of a report, as one string."""
    return "\n".join(str(p) for p in report.problems)


class TestPolicy:
    """RetentionPolicy parses "90d"-style ages and "10GiB"-style sizes."""

    def test_parsing(self) -> None:
        """Ages and sizes in their string forms."""
        p = RetentionPolicy(max_age="90d", max_bytes="10GiB")
        assert p.max_age_us == 90 * DAY and p.max_bytes_int == 10 * 1024**3
        assert RetentionPolicy(max_age="12h").max_age_us == DAY // 2
        assert RetentionPolicy(max_bytes="500kB").max_bytes_int == 500_000
        assert RetentionPolicy().keeps_everything

    @pytest.mark.parametrize("kw", [{"max_age": "90 parsecs"}, {"max_bytes": "ten GiB"}, {"max_bytes": -1}])
    def test_bad_values(self, kw: dict[str, Any]) -> None:
        """A typo is a ConfigError naming the setting."""
        with pytest.raises(ConfigError, match="retention"):
            RetentionPolicy(**kw)

    def test_needs_the_writer(self, tmp_path: Path) -> None:
        """A reader cannot apply retention."""
        with open_store(tmp_path / "s") as w:
            fill(w, [100] * 40)
        with AuditStore.open_reader(tmp_path / "s") as r, pytest.raises(StoreClosedError):
            r.apply_retention(RetentionPolicy(max_bytes=0))

    def test_default_policy_from_config(self, tmp_path: Path) -> None:
        """With no argument, StoreConfig.retention applies; with none configured nothing is removed."""
        with open_store(tmp_path / "a") as w:
            fill(w, [100] * 40)
            assert w.apply_retention() == 0
        with open_store(tmp_path / "b", retention=RetentionPolicy(max_age="90d")) as w:
            fill(w, [100] * 40)
            assert w.apply_retention() > 0


class TestByAge:
    """A sealed segment goes when its largest ts is older than max_age; oldest first, a prefix only."""

    def test_removes_old_prefix(self, tmp_path: Path) -> None:
        """Old segments go, the first segment holding a recent record stops the deletion."""
        root = tmp_path / "s"
        with open_store(root) as w:
            fill(w, [120] * 60)
            old_segments = len(segments(root))
            fill(w, [1] * 30, start=60)
            before = {p.name for p in segments(root)}
            removed = w.apply_retention(RetentionPolicy(max_age="90d"))
            after = {p.name for p in segments(root)}
            first = segments(root)[0]
            assert removed == len(before - after) >= old_segments - 1
            assert removed > 0
            # everything left starts no later than the first recent record
            survivors = list(w.scan())
            assert all(r.payload.get("i", 10**9) >= 0 for r in survivors)
            assert any(r.payload.get("i") == 60 for r in survivors)
            assert survivors[0].seq == base_of(first)
            # every removed record was old
            assert all(p.startswith("seg-") for p in before - after)
            assert w.verify().ok

    def test_largest_ts_decides(self, tmp_path: Path) -> None:
        """A segment whose records are old but one is recent is kept, and so is everything after it."""
        root = tmp_path / "s"
        with open_store(root) as w:
            fill(w, [200] * 6 + [0.5] + [200] * 60)  # the first segment holds one recent record
            assert len(segments(root)) > 3
            assert w.apply_retention(RetentionPolicy(max_age="90d")) == 0
            assert base_of(segments(root)[0]) == 0

    def test_never_the_active_segment(self, tmp_path: Path) -> None:
        """Even when every record is ancient, the active segment and the spine stay."""
        root = tmp_path / "s"
        with open_store(root) as w:
            fill(w, [1000] * 50)
            spine = (root / "merkle.spine").read_bytes()
            *sealed, active = segments(root)
            assert w.apply_retention(RetentionPolicy(max_age="1d")) == len(sealed)
            # the active segment stays (the retention record may have filled it and started another)
            assert segments(root)[0] == active and len(segments(root)) <= 2
            assert (root / "merkle.spine").read_bytes()[: len(spine)] == spine  # only grown (the $sys record)
            assert w.tree_size == 51
            assert w.verify().ok
            # that old active segment, if the retention record sealed it, goes next time; then nothing
            n_sealed = len(segments(root)) - 1
            assert w.apply_retention(RetentionPolicy(max_age="1d")) == n_sealed
            assert w.apply_retention(RetentionPolicy(max_age="1d")) == 0
            assert w.verify().ok

    def test_young_store_untouched(self, tmp_path: Path) -> None:
        """Nothing older than max_age: nothing removed, no retention record, no checkpoint."""
        root = tmp_path / "s"
        with open_store(root) as w:
            fill(w, [3] * 50)
            n_cp = len(checkpoints(root))
            assert w.apply_retention(RetentionPolicy(max_age="90d", max_bytes="10GiB")) == 0
            assert retention_records(w) == [] and len(checkpoints(root)) == n_cp


class TestBySize:
    """While the segments' total size is over max_bytes, the oldest sealed one goes."""

    def test_max_bytes(self, tmp_path: Path) -> None:
        """After retention the segments fit max_bytes, or only the active one is left."""
        root = tmp_path / "s"
        with open_store(root) as w:
            fill(w, [0] * 120)
            sizes = [p.stat().st_size for p in segments(root)]
            limit = sum(sizes[-3:])  # room for the last three segments
            removed = w.apply_retention(RetentionPolicy(max_bytes=limit))
            assert removed == len(sizes) - 3
            total = sum(p.stat().st_size for p in segments(root))
            # the retention record went into the active segment (or sealed it), so allow its own bytes
            assert total <= limit + SEGMENT
            assert w.verify().ok

    def test_zero_keeps_active(self, tmp_path: Path) -> None:
        """max_bytes=0 removes every sealed segment but never the active one."""
        root = tmp_path / "s"
        with open_store(root) as w:
            fill(w, [0] * 80)
            n = len(segments(root))
            assert w.apply_retention(RetentionPolicy(max_bytes=0)) == n - 1
            assert len(segments(root)) == 1 and w.verify().ok

    def test_age_or_size(self, tmp_path: Path) -> None:
        """With both limits, a segment goes when either says so."""
        root = tmp_path / "s"
        with open_store(root) as w:
            fill(w, [200] * 20 + [1] * 100)
            sizes = [p.stat().st_size for p in segments(root)]
            by_age_only = RetentionPolicy(max_age="90d")
            by_both = RetentionPolicy(max_age="90d", max_bytes=sum(sizes[-2:]))
            copy = tmp_path / "copy"
            w.sync()
            shutil.copytree(root, copy, ignore=shutil.ignore_patterns("LOCK"))
            age_removed = w.apply_retention(by_age_only)
        with open_store(copy) as w2:
            both_removed = w2.apply_retention(by_both)
        assert 0 < age_removed < both_removed == len(sizes) - 2


class TestOrderOfOperations:
    """The $sys retention record and a checkpoint are written before anything is unlinked."""

    def test_record_and_checkpoint_before_unlink(self, tmp_path: Path) -> None:
        """Write the record, then the checkpoint covering it, then unlink, in that order."""

        class Recording(FileLayer):
            def __init__(self) -> None:
                self.ops: list[tuple[str, str, bytes]] = []
                self.paths: dict[int, str] = {}

            def open(self, path: str, flags: int, mode: int = 0o644) -> int:
                fd = super().open(path, flags, mode)
                self.paths[fd] = path
                return fd

            def pwrite(self, fd: int, data: bytes, offset: int) -> None:
                self.ops.append(("pwrite", self.paths[fd], bytes(data)))
                super().pwrite(fd, data, offset)

            def unlink(self, path: str) -> None:
                self.ops.append(("unlink", path, b""))
                super().unlink(path)

        layer = Recording()
        root = tmp_path / "s"
        with open_store(root, file_layer=layer) as w:
            fill(w, [100] * 60)
            layer.ops.clear()
            removed = w.apply_retention(RetentionPolicy(max_age="30d"))
            assert removed > 0
            (record,) = retention_records(w)
        ops = layer.ops
        first_unlink = next(k for k, op in enumerate(ops) if op[0] == "unlink")
        wrote_record = next(
            k for k, op in enumerate(ops) if op[1].endswith(".log") and b'"$sys":"retention"' in op[2]
        )
        wrote_cp = [
            k
            for k, op in enumerate(ops)
            if op[1].endswith("checkpoints.jsonl") and wrote_record < k < first_unlink
        ]
        assert wrote_record < first_unlink and wrote_cp
        cp = json.loads(ops[wrote_cp[-1]][2])
        assert cp["tree_size"] == record["seq"] + 1  # the checkpoint covers the retention record
        unlinked = [op[1] for op in ops if op[0] == "unlink" and op[1].endswith(".log")]
        assert len(unlinked) == removed
        assert record["removed_below"] == base_of(segments(root)[0])
        assert record["removed_below"] > 0

    def test_checkpoint_after_retention_verifies(self, tmp_path: Path) -> None:
        """The checkpoint written by retention is in the chain and matches the tree."""
        root = tmp_path / "s"
        with open_store(root) as w:
            fill(w, [100] * 60)
            n_cp = len(checkpoints(root))
            w.apply_retention(RetentionPolicy(max_age="30d"))
            assert len(checkpoints(root)) >= n_cp + 1
            assert checkpoints(root)[-1]["tree_size"] == w.tree_size
        with AuditStore.open_reader(root) as r:
            assert r.verify().ok


class TestAfterRetention:
    """After retention: verify passes, proofs keep verifying (the spine is never purged)."""

    @pytest.fixture
    def store(self, tmp_path: Path) -> Any:
        """A writer that had several old segments removed; also yields checkpoints from before."""
        root = tmp_path / "s"
        w = open_store(root)
        fill(w, [100] * 40)
        early = w.checkpoint()
        fill(w, [100] * 40, start=40)
        middle = w.checkpoint()
        fill(w, [1] * 40, start=80)
        removed = w.apply_retention(RetentionPolicy(max_age="30d"))
        assert removed >= 5
        yield w, [early, middle]
        w.close()

    def test_verify_passes(self, store: Any) -> None:
        """The writer's and a fresh reader's verify both pass."""
        w, _ = store
        assert w.verify().ok
        with AuditStore.open_reader(w.root) as r:
            report = r.verify()
            assert report.ok, report.problems
            assert report.tree_size == w.tree_size

    def test_inclusion_proofs_of_survivors(self, store: Any) -> None:
        """Every surviving record's inclusion proof verifies against the current root with merkle alone."""
        w, _ = store
        root = w.merkle_root()
        survivors = list(w.scan())
        assert survivors[0].seq > 0
        for rec in survivors:
            proof = w.prove_inclusion(rec.seq)
            assert proof.leaf_hash == rec.leaf_hash and proof.root == root
            assert merkle.verify_inclusion(rec.leaf_hash, rec.seq, proof.tree_size, list(proof.path), root)

    def test_removed_records_still_provable(self, store: Any) -> None:
        """The spine keeps removed records' leaves (it is never purged): their proofs verify too."""
        w, _ = store
        first = next(w.scan()).seq
        for seq in range(first):
            proof = w.prove_inclusion(seq)
            assert merkle.verify_inclusion(
                proof.leaf_hash, seq, proof.tree_size, list(proof.path), w.merkle_root()
            )

    def test_consistency_from_old_checkpoints(self, store: Any) -> None:
        """Checkpoints written before retention are consistent with the current tree."""
        w, old = store
        for cp in old:
            proof = w.prove_consistency(cp.tree_size)
            assert proof.old_root == cp.root
            assert merkle.verify_consistency(
                cp.tree_size, w.tree_size, cp.root, w.merkle_root(), list(proof.path)
            )
            assert w.verify(anchor=cp).ok

    def test_queries_see_survivors_only(self, store: Any) -> None:
        """scan and query return exactly the surviving records, in both orders."""
        w, _ = store
        survivors = [r.seq for r in w.scan()]
        assert [r.seq for r in w.query(newest_first=False, limit=10_000).records] == survivors
        assert [r.seq for r in w.query(limit=10_000).records] == survivors[::-1]
        assert [r.seq for r in w.scan(reverse=True)] == survivors[::-1]


class TestProofCheckpoint:
    """``prove_inclusion(...).checkpoint`` is the checkpoint dict when one exists at that size."""

    def test_checkpoint_attached_and_round_trips(self, tmp_path: Path) -> None:
        """At a checkpointed size the proof carries that checkpoint; JSON round-trips it exactly."""
        root = tmp_path / "s"
        with open_store(root) as w:
            fill(w, [1] * 30)
            cp = w.checkpoint()
            proof = w.prove_inclusion(7)
            assert proof.tree_size == cp.tree_size
            assert proof.checkpoint == cp.to_dict() == checkpoints(root)[-1]
            assert Checkpoint.from_json(dict(proof.checkpoint)).root == proof.root
            again = InclusionProof.from_json(proof.to_json())
            assert again == proof and again.checkpoint == cp.to_dict()
            assert InclusionProof.from_json(json.loads(proof.to_json())) == proof
            fill(w, [1], start=30)
            bare = w.prove_inclusion(7)  # no checkpoint at the new size
            assert bare.checkpoint is None and InclusionProof.from_json(bare.to_json()) == bare
            older = w.prove_inclusion(7, cp.tree_size)  # an older size that has one
            assert older.checkpoint == cp.to_dict()

    def test_consistency_proof_checkpoint(self, tmp_path: Path) -> None:
        """A consistency proof to a checkpointed size carries that checkpoint and round-trips."""
        root = tmp_path / "s"
        with open_store(root) as w:
            fill(w, [1] * 30)
            cp = w.checkpoint()
            proof = w.prove_consistency(10)
            assert proof.checkpoint == cp.to_dict()
            assert ConsistencyProof.from_json(proof.to_json()) == proof

    def test_after_retention(self, tmp_path: Path) -> None:
        """The retention checkpoint is attached to proofs at its size, for surviving records."""
        root = tmp_path / "s"
        with open_store(root) as w:
            fill(w, [100] * 60)
            w.apply_retention(RetentionPolicy(max_age="30d"))
            size = w.tree_size
            proof = w.prove_inclusion(size - 1)
            assert proof.checkpoint is not None and proof.checkpoint["tree_size"] == size
            assert InclusionProof.from_json(proof.to_json()) == proof


class TestHandDeletion:
    """A segment deleted by hand after retention is tampering, whichever it is."""

    def make(self, root: Path) -> None:
        """A closed store after one retention, with at least four sealed survivors."""
        with open_store(root) as w:
            fill(w, [100] * 40 + [1] * 80)
            assert w.apply_retention(RetentionPolicy(max_age="30d")) > 0
        assert len(segments(root)) >= 5

    @pytest.mark.parametrize("which", ["first", "middle", "last sealed", "active", "first two"])
    def test_reported(self, tmp_path: Path, which: str) -> None:
        """Deleting the first surviving, a middle, the last sealed or the active segment is reported."""
        root = tmp_path / "s"
        self.make(root)
        segs = segments(root)
        first_base = base_of(segs[0])
        victims = {
            "first": [segs[0]],
            "middle": [segs[len(segs) // 2]],
            "last sealed": [segs[-2]],
            "active": [segs[-1]],
            "first two": segs[:2],
        }[which]
        for v in victims:
            v.unlink()
            v.with_suffix(".idx").unlink(missing_ok=True)
        with AuditStore.open_reader(root) as r:
            report = r.verify()
        assert not report.ok
        text = problems_text(report)
        assert "missing" in text or "deleted" in text, text
        if which in ("first", "first two"):
            assert any(p.seq is not None and p.seq >= first_base for p in report.problems)

    def test_sidecar_deleted_is_not_tampering(self, tmp_path: Path) -> None:
        """Deleting only sidecars is no problem (they are caches)."""
        root = tmp_path / "s"
        self.make(root)
        for side in (root / "log").glob("*.idx"):
            side.unlink()
        with AuditStore.open_reader(root) as r:
            assert r.verify().ok


class TestForgedRetentionRecord:
    """A user event shaped like a retention record cannot make verify accept a gap."""

    @pytest.mark.parametrize("retained", [False, True])
    def test_user_event_does_not_excuse_a_gap(self, tmp_path: Path, retained: bool) -> None:
        """A user {"$sys": "retention", "removed_below": 10**9} is stored escaped and excuses nothing."""
        root = tmp_path / "s"
        with open_store(root) as w:
            fill(w, [100] * 40)
            if retained:
                assert w.apply_retention(RetentionPolicy(max_age="30d")) > 0
            fill(w, [1] * 30, start=40)
            w.append({"$sys": "retention", "removed_below": 10**9})
            w.append({"nested": {"$sys": "retention", "removed_below": 10**9}})
            fill(w, [1] * 30, start=80)
            forged = [r.payload for r in w.scan() if "$$sys" in r.payload]
            assert forged and forged[0]["$$sys"] == "retention" and "$sys" not in forged[0]
        victim = segments(root)[0]
        victim.unlink()
        with AuditStore.open_reader(root) as r:
            report = r.verify()
        assert not report.ok
        assert any(p.seq is not None and p.seq >= base_of(segments(root)[0]) - 100 for p in report.problems)

    def test_redrive_cannot_forge(self, tmp_path: Path) -> None:
        """Re-appending a normalised record that carries $sys is refused."""
        with open_store(tmp_path / "s") as w, pytest.raises(ValueError, match=r"\$sys"):
            w.append_normalised([{"$sys": "retention", "removed_below": 10**9, "ts": 1}])


class TestCrashDuringRetention:
    """A crash between the retention checkpoint and the unlinks leaves a store that verifies."""

    def doomed_run(self, root: Path) -> tuple[list[tuple[Path, bytes]], int]:
        """Applies retention, returning the removed segment files' bytes and how many went."""
        with open_store(root) as w:
            fill(w, [100] * 50 + [1] * 30)
            w.sync()
            saved = [(p, p.read_bytes()) for p in segments(root)]
            removed = w.apply_retention(RetentionPolicy(max_age="30d"))
        assert removed >= 3
        left = {p.name for p in segments(root)}
        return [(p, b) for p, b in saved if p.name not in left], removed

    @pytest.mark.parametrize("restore", ["all", "all but the first", "only the last"])
    def test_unlinks_not_done(self, tmp_path: Path, restore: str) -> None:
        """Doomed segments still present (none or a prefix unlinked): verify passes; retention re-runs."""
        root = tmp_path / "s"
        gone, _ = self.doomed_run(root)
        keep = {"all": gone, "all but the first": gone[1:], "only the last": gone[-1:]}[restore]
        for path, data in keep:
            path.write_bytes(data)
        with AuditStore.open_reader(root) as r:
            report = r.verify()
            assert report.ok, report.problems
        with open_store(root) as w:
            assert w.apply_retention(RetentionPolicy(max_age="30d")) == len(keep)
            assert w.verify().ok
        assert {p.name for p, _ in gone}.isdisjoint(p.name for p in segments(root))

    def test_non_prefix_is_tampering(self, tmp_path: Path) -> None:
        """Retention unlinks oldest first: a doomed segment missing while an older one is back is a hole."""
        root = tmp_path / "s"
        gone, _ = self.doomed_run(root)
        gone[0][0].write_bytes(gone[0][1])  # only the oldest comes back: the others are a hole
        with AuditStore.open_reader(root) as r:
            assert not r.verify().ok

    def test_crash_in_the_middle_of_unlinks(self, tmp_path: Path) -> None:
        """The process dies after some unlinks: reopening verifies, and re-running retention completes."""

        class Crash(Exception):
            pass

        class CrashingLayer(FileLayer):
            def __init__(self) -> None:
                self.unlinks = 0

            def unlink(self, path: str) -> None:
                if path.endswith(".log"):
                    self.unlinks += 1
                    if self.unlinks == 2:
                        raise Crash(path)
                super().unlink(path)

        root = tmp_path / "s"
        w = open_store(root, file_layer=CrashingLayer())
        fill(w, [100] * 50 + [1] * 30)
        with pytest.raises(Crash):
            w.apply_retention(RetentionPolicy(max_age="30d"))
        w._release_all()  # the process dies here: no close, no further checkpoint
        with AuditStore.open_reader(root) as r:
            report = r.verify()
            assert report.ok, report.problems
            (record,) = retention_records(r)
            assert base_of(segments(root)[0]) < record["removed_below"]
        with open_store(root) as w2:
            assert w2.apply_retention(RetentionPolicy(max_age="30d")) >= 1
            assert base_of(segments(root)[0]) >= record["removed_below"]
            assert w2.verify().ok
            assert len(retention_records(w2)) == 2
