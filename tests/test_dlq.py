"""The dead-letter queue: durable parking, exact replay with the original ts, crash-safe redrive."""

from __future__ import annotations

import datetime as dt
import errno
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import orjson
import pytest

import quipu_logging
from quipu_logging import AuditPipeline, AuditStore, PipelineConfig, StoreConfig
from quipu_logging._dlq import DLQ_HEADER, DeadLetterQueue, _decode
from quipu_logging.store import FileLayer, PowerLossFileLayer
from quipu_logging.store._format import FRAME_HEADER, scan_frames

REPO = Path(quipu_logging.__file__).resolve().parent.parent
QUIET = {"low_disk_bytes": 0, "low_disk_ratio": 0.0}


class SegmentFaults(PowerLossFileLayer):
    """Real files that refuse writes to store segments while ``failing`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.failing = False
        self.paths: dict[int, str] = {}
        self.guard = threading.Lock()

    def open(self, path: str, flags: int, mode: int = 0o644) -> int:
        fd = super().open(path, flags, mode)
        with self.guard:
            self.paths[fd] = path
        return fd

    def pwrite(self, fd: int, data: bytes, offset: int) -> None:
        if self.failing and os.sep + "seg-" in self.paths.get(fd, ""):
            raise OSError(errno.EIO, "injected segment write error")
        super().pwrite(fd, data, offset)


def _park_through_a_pipeline(
    root: Path, events: list[dict[str, Any]], layer: SegmentFaults | None = None
) -> None:
    """Runs a pipeline whose store refuses every write, so each event is parked."""
    layer = layer or SegmentFaults()
    p = AuditPipeline.start(
        StoreConfig(root=root, file_layer=layer),
        config=PipelineConfig(retries=0, **QUIET),  # type: ignore[arg-type]
    )
    layer.failing = True
    handle = p.handle()
    for event in events:
        handle.emit("app", event)
    assert p.flush(10)
    assert handle.metrics()["parked"] == len(events)
    layer.failing = False
    assert p.close()


def _dlq_ids(dlq_dir: Path) -> list[Any]:
    ids = []
    for path in sorted(dlq_dir.glob("parked-*")):
        if path.suffix in (".dlq", ".redriving"):
            entries, _bad = _decode(path.read_bytes())
            ids.extend(e.record.get("id") for e, _raw in entries)
    return ids


def _store_ids(root: Path) -> list[Any]:
    with AuditStore.open_reader(root) as store:
        return [r.payload.get("id") for r in store.scan() if "$sys" not in r.payload]


class TestDeadLetterQueue:
    def test_parked_entries_are_framed_like_segments(self, tmp_path: Path) -> None:
        """A DLQ file is a header and CRC frames; an entry holds the normalised record, error, time, run."""
        dlq = DeadLetterQueue(str(tmp_path / "dlq"), FileLayer(), "run-1")
        refused = dlq.park([{"a": 1, "ts": 5}, {"b": b"\x00"}], OSError(errno.EIO, "boom"))
        dlq.close()
        assert refused == []
        (path,) = (tmp_path / "dlq").glob("parked-*.dlq")
        data = path.read_bytes()
        assert data.startswith(DLQ_HEADER)
        scan = scan_frames(data, len(DLQ_HEADER))
        assert scan.stop_reason is None and len(scan.frames) == 2
        pos, length = scan.frames[0]
        entry = orjson.loads(data[pos + FRAME_HEADER : pos + FRAME_HEADER + length])
        assert entry["record"] == {"a": 1, "ts": 5, "seq": 0}
        assert entry["run"] == "run-1" and "boom" in entry["error"] and entry["failed_at"] > 0
        entries, bad = _decode(data)
        assert bad == [] and entries[1][0].record["b"] == {"$bytes": "AA=="}
        assert dlq.count() == 2

    def test_parking_is_durable(self, tmp_path: Path) -> None:
        """park() returns only after fsync: a power cut right after keeps every entry."""
        layer = PowerLossFileLayer()
        dlq = DeadLetterQueue(str(tmp_path / "dlq"), layer, "r")
        dlq.park([{"id": i, "ts": i} for i in range(3)], OSError("x"))
        dlq.park([{"id": 3, "ts": 3}], OSError("x"))
        dlq.close()
        layer.power_loss()
        assert _dlq_ids(tmp_path / "dlq") == [0, 1, 2, 3]

    def test_oversized_entries_are_refused_and_the_rest_parked(self, tmp_path: Path) -> None:
        """An entry over the 16 MiB frame limit is handed back; its batch mates are parked."""
        dlq = DeadLetterQueue(str(tmp_path / "dlq"), FileLayer(), "r")
        big = {"id": 1, "blob": "x" * (17 * 1024 * 1024)}
        refused = dlq.park([{"id": 0}, big, {"id": 2}], OSError("x"))
        dlq.close()
        assert [e for e, _ in refused] == [big]
        assert _dlq_ids(tmp_path / "dlq") == [0, 2]

    def test_failed_park_leaves_no_torn_frame(self, tmp_path: Path) -> None:
        """A write error while parking raises, cuts the file back and makes the next park use a new file."""

        class Flaky(FileLayer):
            fail = False

            def pwrite(self, fd: int, data: bytes, offset: int) -> None:
                if self.fail:
                    os.pwrite(fd, data[: len(data) // 2], offset)
                    raise OSError(errno.EIO, "injected")
                super().pwrite(fd, data, offset)

        layer = Flaky()
        dlq = DeadLetterQueue(str(tmp_path / "dlq"), layer, "r")
        dlq.park([{"id": 0}], OSError("x"))
        layer.fail = True
        with pytest.raises(OSError, match="injected"):
            dlq.park([{"id": 1}], OSError("x"))
        layer.fail = False
        dlq.park([{"id": 2}], OSError("x"))
        dlq.close()
        files = sorted((tmp_path / "dlq").glob("parked-*.dlq"))
        assert len(files) == 2
        for f in files:
            assert _decode(f.read_bytes())[1] == []  # no damaged bytes anywhere
        assert _dlq_ids(tmp_path / "dlq") == [0, 2]

    def test_a_file_where_the_directory_should_be_fails_parking(self, tmp_path: Path) -> None:
        """When the DLQ path is a file, park() raises OSError (the pipeline then calls on_lost)."""
        (tmp_path / "dlq").write_text("x")
        dlq = DeadLetterQueue(str(tmp_path / "dlq"), FileLayer(), "r")
        with pytest.raises(OSError):
            dlq.park([{"id": 0}], OSError("x"))
        assert dlq.count() == 0


class TestAppendNormalised:
    def test_keeps_fields_and_ts_and_assigns_seq(self, tmp_path: Path) -> None:
        """A normalised record is stored as it is, with a new seq and its own ts."""
        with AuditStore.open(tmp_path / "s") as store:
            store.append({"first": True})
            receipts = store.append_normalised([{"$$x": 1, "b": {"$bytes": "AA=="}, "seq": 0, "ts": 77}])
            assert receipts[0].seq == 1 and receipts[0].ts == 77
            rec = next(iter(store.scan(1)))
            assert rec.payload == {"$$x": 1, "b": {"$bytes": "AA=="}, "seq": 1, "ts": 77}
            assert store.verify().ok

    @pytest.mark.parametrize(
        "bad",
        [{"ts": "soon"}, {"no": "ts"}, {"$sys": "retention", "removed_below": 5, "ts": 1}, {"ts": True}],
    )
    def test_refuses_what_is_not_a_user_record(self, tmp_path: Path, bad: dict[str, Any]) -> None:
        """A record without an integer ts, or a $sys record, is refused and nothing is written."""
        with AuditStore.open(tmp_path / "s") as store:
            with pytest.raises(ValueError):
                store.append_normalised([{"ok": 1, "ts": 1}, bad])
            assert store.tree_size == 0


class TestRedrive:
    def test_redrive_stores_exactly_what_a_direct_write_would(self, tmp_path: Path) -> None:
        """A redriven record equals the direct one field for field (markers not re-escaped), ts included."""
        event = {
            "id": 1,
            "ts": 1_700_000_000_000_000,
            "$user": "escaped",
            "raw": b"\x01\x02",
            "tags": {"b", "a"},
            "when": dt.datetime(2026, 1, 2, 3, 4, 5),
            "nested": {"$deep": [1.5, None, {"k": "v\udcff"}]},
        }
        root = tmp_path / "s"
        _park_through_a_pipeline(root, [event])
        with AuditStore.open(tmp_path / "direct") as direct:
            direct.append(event)
            expected = next(iter(direct.scan())).payload
        p = AuditPipeline.start(root, config=PipelineConfig(**QUIET))
        assert p.handle().redrive_dlq("admin") == 1
        assert p.close()
        with AuditStore.open_reader(root) as store:
            (record,) = [r.payload for r in store.scan()]
            assert store.verify().ok
        del record["seq"], expected["seq"]
        assert record == expected
        assert record["ts"] == 1_700_000_000_000_000

    def test_redrive_needs_administer(self, tmp_path: Path) -> None:
        """Only a role with 'administer' may redrive."""
        from quipu_logging import PermissionDeniedError, PermissionPolicy

        p = AuditPipeline.start(
            tmp_path / "s", permissions=PermissionPolicy({"app": {"emit"}}), config=PipelineConfig(**QUIET)
        )
        try:
            with pytest.raises(PermissionDeniedError, match="administer"):
                p.handle().redrive_dlq("app")
            assert p.handle().metrics()["denied"] == 1
        finally:
            assert p.close()

    def test_damaged_bytes_are_kept_and_good_entries_stored(self, tmp_path: Path) -> None:
        """Undecodable frames and a corrupt tail go to a .damaged file; every readable entry is stored."""
        root = tmp_path / "s"
        _park_through_a_pipeline(root, [{"id": i, "ts": i} for i in range(4)])
        (path,) = (root / "dlq").glob("parked-*.dlq")
        data = bytearray(path.read_bytes())
        scan = scan_frames(bytes(data), len(DLQ_HEADER))
        pos, _ = scan.frames[2]
        data[pos + FRAME_HEADER + 3] ^= 0xFF  # break the CRC of entry 2: entries 2 and 3 become unreadable
        path.write_bytes(bytes(data))
        p = AuditPipeline.start(root, config=PipelineConfig(**QUIET))
        assert p.handle().redrive_dlq("admin") == 2
        assert p.close()
        assert _store_ids(root) == [0, 1]
        (damaged,) = (root / "dlq").glob("parked-*.damaged")
        assert damaged.read_bytes() == bytes(data[pos:])
        assert not list((root / "dlq").glob("*.dlq")) and not list((root / "dlq").glob("*.redriving"))

    def test_a_failed_redrive_keeps_what_was_not_stored(self, tmp_path: Path) -> None:
        """If the store fails during a redrive the error is raised and every entry stays parked."""
        root = tmp_path / "s"
        layer = SegmentFaults()
        _park_through_a_pipeline(root, [{"id": i, "ts": i} for i in range(6)], layer)
        p = AuditPipeline.start(StoreConfig(root=root, file_layer=layer), config=PipelineConfig(**QUIET))
        layer.failing = True
        with pytest.raises(OSError, match="injected"):
            p.handle().redrive_dlq("admin")
        assert sorted(_dlq_ids(root / "dlq")) == list(range(6))
        layer.failing = False
        assert p.handle().redrive_dlq("admin") == 6
        assert p.close()
        assert _store_ids(root) == list(range(6)) and _dlq_ids(root / "dlq") == []

    def test_a_leftover_redriving_file_is_redriven_at_start(self, tmp_path: Path) -> None:
        """A .redriving file left by a killed redrive is replayed when the next pipeline starts."""
        root = tmp_path / "s"
        _park_through_a_pipeline(root, [{"id": i, "ts": i} for i in range(3)])
        (path,) = (root / "dlq").glob("parked-*.dlq")
        path.rename(path.with_suffix(".redriving"))
        p = AuditPipeline.start(root, config=PipelineConfig(**QUIET))
        assert p.flush(10)
        assert p.handle().metrics()["redriven_total"] == 3
        assert p.close()
        assert _store_ids(root) == [0, 1, 2] and _dlq_ids(root / "dlq") == []

    def test_redrive_survives_sigkill_at_any_point(self, tmp_path: Path) -> None:
        """A redrive SIGKILLed at seeded points (every kind of file operation) loses no parked event."""
        base = tmp_path / "base"
        ids = list(range(24))
        _park_through_a_pipeline(base, [{"id": i, "ts": 1000 + i} for i in ids[:12]])
        _park_through_a_pipeline(base, [{"id": i, "ts": 1000 + i} for i in ids[12:]])  # a second DLQ file
        assert len(list((base / "dlq").glob("parked-*.dlq"))) == 2
        script = textwrap.dedent(
            """
            import os, signal, sys
            from quipu_logging import AuditPipeline, PipelineConfig, StoreConfig
            from quipu_logging.store import FileLayer

            class KillAt(FileLayer):
                # SIGKILLs this process at its n-th file operation.
                def __init__(self, at):
                    self.at, self.n = at, 0
                def tick(self):
                    self.n += 1
                    if self.n == self.at:
                        os.kill(os.getpid(), signal.SIGKILL)
                def pwrite(self, *a):
                    self.tick(); super().pwrite(*a)
                def fsync(self, *a):
                    self.tick(); super().fsync(*a)
                def fsync_dir(self, *a):
                    self.tick(); super().fsync_dir(*a)
                def rename(self, *a):
                    self.tick(); super().rename(*a)
                def unlink(self, *a):
                    self.tick(); super().unlink(*a)
                def truncate(self, *a):
                    self.tick(); super().truncate(*a)

            layer = KillAt(int(sys.argv[2]))
            config = PipelineConfig(batch_max=5, low_disk_bytes=0, low_disk_ratio=0.0)
            p = AuditPipeline.start(StoreConfig(root=sys.argv[1], file_layer=layer), config=config)
            replayed = p.handle().redrive_dlq("admin")
            assert p.close()
            print(replayed, layer.n)
            """
        )
        env = {**os.environ, "PYTHONPATH": str(REPO)}

        def run(root: Path, at: int) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, "-c", script, str(root), str(at)],
                env=env,
                timeout=60,
                capture_output=True,
                text=True,
            )

        clean = tmp_path / "clean"
        shutil.copytree(base, clean)
        done = run(clean, 0)
        assert done.returncode == 0, done.stderr
        replayed, operations = map(int, done.stdout.split())
        assert replayed == len(ids) and sorted(_store_ids(clean)) == ids
        rng = random.Random(20261203)
        points = sorted(rng.sample(range(1, operations + 1), min(10, operations)))
        for at in points:
            root = tmp_path / f"kill-{at}"
            shutil.copytree(base, root)
            killed = run(root, at)
            assert killed.returncode == -signal.SIGKILL, killed.stderr
            # Right after the kill, every event is stored, still parked, or both.
            assert set(_store_ids(root)) | set(_dlq_ids(root / "dlq")) == set(ids), at
            # A new pipeline finishes the job: each event is stored at least once.
            p = AuditPipeline.start(root, config=PipelineConfig(**QUIET))
            p.handle().redrive_dlq("admin")
            assert p.close()
            assert set(_store_ids(root)) == set(ids), at
            assert _dlq_ids(root / "dlq") == []
            with AuditStore.open_reader(root) as store:
                assert store.verify().ok
