"""Sync policies under simulated power loss, group-commit deadlines, and failing writes/fsyncs."""

from __future__ import annotations

import errno
import os
import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from quipu_logging import AuditStore, StoreBrokenError, StoreConfig
from quipu_logging.store import FileLayer, PowerLossFileLayer


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _open(root: Path, sync: str, layer: FileLayer, **kw: object) -> AuditStore:
    return AuditStore.open(StoreConfig(root=root, sync=sync, file_layer=layer, **kw))  # type: ignore[arg-type]


def _crash(store: AuditStore, layer: PowerLossFileLayer) -> None:
    """Abandon the store without a clean close, then cut the power."""
    store._release_all()
    layer.power_loss()


def _survivors(root: Path) -> list[int]:
    with AuditStore.open(root) as store:
        report = store.verify()
        assert report.ok, report.problems
        return [r.payload["i"] for r in store.scan()]  # type: ignore[misc]


class TestPowerLoss:
    def test_always_loses_nothing(self, tmp_path: Path) -> None:
        """Under 'always', every record whose append returned survives a power cut."""
        rng = random.Random(7)
        for trial in range(6):
            root = tmp_path / f"s{trial}"
            layer = PowerLossFileLayer()
            store = _open(root, "always", layer, max_segment_bytes=600)
            n = rng.randrange(1, 40)
            for i in range(n):
                store.append({"i": i, "pad": "x" * rng.randrange(0, 80)})
            _crash(store, layer)
            assert _survivors(root) == list(range(n))

    @given(n=st.integers(1, 12), appended=st.integers(0, 60), batch=st.integers(1, 5))
    @settings(max_examples=25)
    def test_every_n_loses_at_most_n_minus_1(
        self, tmp_path_factory: pytest.TempPathFactory, n: int, appended: int, batch: int
    ) -> None:
        """Under 'every:N', a power cut loses fewer than N single appends, and never a synced one."""
        root = tmp_path_factory.mktemp("every")
        layer = PowerLossFileLayer()
        store = _open(root, f"every:{n}", layer, max_segment_bytes=700)
        for i in range(appended):
            store.append({"i": i})
        _crash(store, layer)
        survivors = _survivors(root)
        assert survivors == list(range(len(survivors)))
        assert appended - len(survivors) <= n - 1

    def test_group_loses_only_young_or_few(self, tmp_path: Path) -> None:
        """Under 'group:N:MS', records older than MS (by the store's clock) or in a full group survive."""
        root = tmp_path / "s"
        layer = PowerLossFileLayer()
        clock = FakeClock()
        store = _open(root, "group:5:20", layer)
        store._clock = clock
        for i in range(3):
            store.append({"i": i})
        assert store.sync_due() == pytest.approx(0.020)
        clock.now += 0.019
        assert not store.maybe_sync()
        clock.now += 0.002  # the oldest pending record is now 21 ms old
        assert store.sync_due() == 0.0
        assert store.maybe_sync()  # what an idle owner does at the deadline
        assert store.sync_due() is None
        store.append({"i": 3})  # young and alone: may be lost
        _crash(store, layer)
        assert _survivors(root) == [0, 1, 2]

    def test_group_syncs_when_n_are_pending(self, tmp_path: Path) -> None:
        """Under 'group:N:MS', the N-th pending record triggers the fsync without any wait."""
        root = tmp_path / "s"
        layer = PowerLossFileLayer()
        store = _open(root, "group:4:1000", layer)
        store._clock = FakeClock()
        store.append_batch([{"i": i} for i in range(3)])
        store.append({"i": 3})
        store.append({"i": 4})
        _crash(store, layer)
        assert _survivors(root) == [0, 1, 2, 3]

    def test_group_deadline_honoured_when_the_next_append_is_late(self, tmp_path: Path) -> None:
        """An append that finds the oldest pending record overdue syncs everything pending."""
        root = tmp_path / "s"
        layer = PowerLossFileLayer()
        clock = FakeClock()
        store = _open(root, "group:1000:20", layer)
        store._clock = clock
        store.append({"i": 0})
        clock.now += 0.050
        store.append({"i": 1})
        _crash(store, layer)
        assert _survivors(root) == [0, 1]

    @pytest.mark.parametrize("policy", ["os", "every:50", "group:1000:20"])
    def test_sync_and_close_always_make_durable(self, tmp_path: Path, policy: str) -> None:
        """Whatever the policy, records before sync() survive a power cut, and close() makes all durable."""
        root = tmp_path / "s"
        layer = PowerLossFileLayer()
        store = _open(root, policy, layer)
        store._clock = FakeClock()
        store.append_batch([{"i": i} for i in range(10)])
        store.sync()
        store.append_batch([{"i": i} for i in range(10, 15)])
        _crash(store, layer)
        survivors = _survivors(root)
        assert survivors[:10] == list(range(10)) and survivors == list(range(len(survivors)))
        layer2 = PowerLossFileLayer()
        with _open(root, policy, layer2) as store:
            store.append({"i": len(survivors)})
        layer2.power_loss()
        assert _survivors(root) == list(range(len(survivors) + 1))

    def test_os_policy_never_fsyncs_in_the_background(self, tmp_path: Path) -> None:
        """'os' makes no fsync on append; a power cut then may lose all, and the store still reopens."""
        root = tmp_path / "s"
        layer = PowerLossFileLayer()
        store = _open(root, "os", layer)
        before = store.fsyncs
        store.append_batch([{"i": i} for i in range(100)])
        assert store.fsyncs == before
        assert store.sync_due() is None
        _crash(store, layer)
        assert _survivors(root) == []

    def test_fsyncs_are_counted_per_policy(self, tmp_path: Path) -> None:
        """'every:10' fsyncs once per ten records; 'always' once per append call."""
        counts = {}
        for policy in ("always", "every:10"):
            with AuditStore.open(StoreConfig(root=tmp_path / policy, sync=policy)) as store:
                start = store.fsyncs
                for i in range(20):
                    store.append({"i": i})
                counts[policy] = store.fsyncs - start
        # a policy sync fsyncs the segment only: recovery re-derives spine leaves after the
        # last checkpoint from the segments, and the spine is fsynced before each checkpoint
        assert counts["always"] == 20
        assert counts["every:10"] == 2


class FailingLayer(FileLayer):
    """A real file layer that fails on demand: a short write then EIO, or an fsync error."""

    def __init__(self) -> None:
        self.fail_write = False
        self.fail_fsync = False
        self.fsync_calls = 0

    def pwrite(self, fd: int, data: bytes, offset: int) -> None:
        if self.fail_write and len(data) > 16:
            os.pwrite(fd, data[: len(data) // 2], offset)  # part of it reaches the file
            raise OSError(errno.EIO, "injected write error")
        super().pwrite(fd, data, offset)

    def fsync(self, fd: int) -> None:
        self.fsync_calls += 1
        if self.fail_fsync:
            raise OSError(errno.EIO, "injected fsync error")
        super().fsync(fd)


class TestWriteFailures:
    def test_failed_write_truncates_back_to_batch_start(self, tmp_path: Path) -> None:
        """A write error leaves no half frame behind; the store stays usable and verifies."""
        layer = FailingLayer()
        root = tmp_path / "s"
        store = _open(root, "os", layer)
        store.append_batch([{"i": i} for i in range(3)])
        seg = root / "log" / "seg-0000000000.log"
        size_before = seg.stat().st_size
        layer.fail_write = True
        with pytest.raises(OSError, match="injected write error") as info:
            store.append_batch([{"i": i} for i in range(3, 6)])
        assert getattr(info.value, "quipu_written", None) == 0
        assert seg.stat().st_size == size_before
        layer.fail_write = False
        assert store.append({"i": 3}).seq == 3
        assert store.verify().ok
        store.close()
        assert _survivors(root) == [0, 1, 2, 3]

    def test_failed_fsync_breaks_the_store_until_reopened(self, tmp_path: Path) -> None:
        """A failed fsync is never retried: the store refuses writes until it is reopened."""
        layer = FailingLayer()
        root = tmp_path / "s"
        store = _open(root, "os", layer)
        store.append({"i": 0})
        layer.fail_fsync = True
        calls = layer.fsync_calls
        with pytest.raises(StoreBrokenError, match="reopen"):
            store.sync()
        assert layer.fsync_calls == calls + 1  # exactly one attempt
        layer.fail_fsync = False
        with pytest.raises(StoreBrokenError):
            store.append({"i": 1})
        with pytest.raises(StoreBrokenError):
            store.sync()
        store.close()  # releases the lock without another fsync attempt
        assert _survivors(root) == [0]
