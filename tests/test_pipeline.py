"""The audit pipeline: bounded emit, one writer, failures, accounting, flush/close, stall, fork."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

import quipu_logging
from quipu_logging import (
    AuditHandle,
    AuditPipeline,
    AuditStore,
    ConfigError,
    PermissionDeniedError,
    PermissionPolicy,
    PipelineClosedError,
    PipelineConfig,
    QueueFullError,
    StoreConfig,
    StoreLockedError,
)
from quipu_logging.store import FileLayer, PowerLossFileLayer
from quipu_logging.testing import paused, wait_synced

REPO = Path(quipu_logging.__file__).resolve().parent.parent
QUIET = {"low_disk_bytes": 0, "low_disk_ratio": 0.0}  # health must not depend on the test machine's disk
Pipes = list[AuditPipeline]


class FaultLayer(PowerLossFileLayer):
    """Real files (and a power switch) that fail on demand, per kind of file.

    ``fail(kind, *errnos)`` makes the next writes to that kind of file raise those
    errnos, one each; ``stick(kind, e)`` makes every write raise ``e`` until
    ``stick(kind, None)``. Kinds: ``segment`` (``log/seg-*.log``) and ``dlq``.
    ``fail_fsyncs = n`` fails the next ``n`` fsyncs of segments; ``fail_open`` fails
    every open of a segment.
    """

    def __init__(self) -> None:
        super().__init__()
        self.guard = threading.Lock()
        self.paths: dict[int, str] = {}
        self.queued: dict[str, list[int]] = {"segment": [], "dlq": []}
        self.sticky: dict[str, int | None] = {"segment": None, "dlq": None}
        self.fail_fsyncs = 0
        self.fail_open = False

    @staticmethod
    def kind(path: str) -> str:
        if os.sep + "log" + os.sep + "seg-" in path:
            return "segment"
        if "dlq" in os.path.basename(os.path.dirname(path)) or path.endswith(".dlq"):
            return "dlq"
        return "other"

    def fail(self, kind: str, *codes: int) -> None:
        with self.guard:
            self.queued[kind].extend(codes)

    def stick(self, kind: str, code: int | None) -> None:
        with self.guard:
            self.sticky[kind] = code

    def _maybe_raise(self, path: str) -> None:
        kind = self.kind(path)
        with self.guard:
            if kind not in self.queued:
                return
            code = self.queued[kind].pop(0) if self.queued[kind] else self.sticky[kind]
        if code is not None:
            raise OSError(code, f"injected {errno.errorcode[code]} on {os.path.basename(path)}")

    def open(self, path: str, flags: int, mode: int = 0o644) -> int:
        if self.fail_open and self.kind(path) == "segment":
            raise OSError(errno.EIO, "injected open error")
        fd = super().open(path, flags, mode)
        with self.guard:
            self.paths[fd] = path
        return fd

    def pwrite(self, fd: int, data: bytes, offset: int) -> None:
        self._maybe_raise(self.paths.get(fd, ""))
        super().pwrite(fd, data, offset)

    def fsync(self, fd: int) -> None:
        if self.kind(self.paths.get(fd, "")) == "segment":
            with self.guard:
                fail = self.fail_fsyncs > 0
                self.fail_fsyncs -= fail
            if fail:
                raise OSError(errno.EIO, "injected fsync error")
        super().fsync(fd)


@pytest.fixture
def started() -> Iterator[Pipes]:
    """Collects pipelines and closes any the test left open (so no thread outlives it)."""
    pipelines: Pipes = []
    yield pipelines
    for p in pipelines:
        p.close(timeout=10)


def _start(
    started: Pipes,
    root: Path,
    *,
    layer: FileLayer | None = None,
    sync: str = "group",
    permissions: PermissionPolicy | None = None,
    on_lost: Any = None,
    **config: Any,
) -> tuple[AuditPipeline, AuditHandle]:
    settings = {**QUIET, **config}
    p = AuditPipeline.start(
        StoreConfig(root=root, sync=sync, file_layer=layer),
        permissions=permissions,
        config=PipelineConfig(**settings),
        on_lost=on_lost,
    )
    started.append(p)
    return p, p.handle()


def _records(root: Path) -> list[dict[str, Any]]:
    with AuditStore.open_reader(root) as store:
        assert store.verify().ok
        return [r.payload for r in store.scan()]


def _user(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if "$sys" not in r]


def _gaps(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if r.get("$sys") == "gap"]


def _check_identities(m: Mapping[str, Any]) -> None:
    assert m["offered"] == m["accepted"] + m["rejected_full"] + m["rejected_closed"] + m["rejected_disk_full"]
    assert m["accepted"] == m["written"] + m["parked"] + m["handed_off"] + m["lost"]
    assert m["parked"] == m["redriven"] + m["parked_now"]


class TestPipelineConfig:
    def test_defaults(self) -> None:
        """The defaults are the documented ones."""
        c = PipelineConfig()
        assert (c.queue_size, c.batch_max, c.retries, c.retry_backoff) == (4096, 256, 3, 0.02)
        assert (c.dlq_dir, c.stall_timeout, c.housekeeping_interval) == (None, 30.0, 30.0)
        assert (c.reject_emit_when_disk_full, c.low_disk_bytes, c.low_disk_ratio) == (False, 1024**3, 0.10)
        assert c.close_timeout == 10.0 and c.slice_time == 0.00025

    @pytest.mark.parametrize(
        "bad",
        [
            {"queue_size": 0},
            {"queue_size": True},
            {"batch_max": 0},
            {"retries": -1},
            {"retry_backoff": -0.1},
            {"stall_timeout": 0},
            {"housekeeping_interval": float("nan")},
            {"low_disk_bytes": "lots"},
            {"low_disk_ratio": 1.0},
            {"reject_emit_when_disk_full": "yes"},
            {"dlq_dir": 3},
            {"close_timeout": float("inf")},
            {"slice_time": 0},
            {"slice_time": float("nan")},
        ],
    )
    def test_invalid_values_raise_config_error(self, bad: dict[str, Any]) -> None:
        """Every field is validated when the config is built."""
        with pytest.raises(ConfigError, match=next(iter(bad))):
            PipelineConfig(**bad)

    def test_string_forms_are_parsed(self, tmp_path: Path) -> None:
        """Sizes may be strings and paths may be PathLike; both are normalised once."""
        c = PipelineConfig(low_disk_bytes="2GiB", dlq_dir=tmp_path / "d")
        assert c.low_disk_bytes == 2 * 1024**3 and c.dlq_dir == str(tmp_path / "d")


class TestStart:
    def test_writer_is_one_named_daemon_thread(self, tmp_path: Path, started: Pipes) -> None:
        """start() runs exactly one daemon thread named quipu-writer and exposes root and config."""
        before = {t.name for t in threading.enumerate()}
        p, handle = _start(started, tmp_path / "s")
        writers = [t for t in threading.enumerate() if t.name == "quipu-writer"]
        assert "quipu-writer" not in before and len(writers) == 1 and writers[0].daemon
        assert p.store_root == os.path.realpath(tmp_path / "s")
        assert p.config.queue_size == 4096 and not p.closed
        assert p.handle() is handle and handle.pipeline is p

    def test_accepts_a_store_a_config_or_a_path(self, tmp_path: Path) -> None:
        """An open store is taken over (and closed by close()); a path works like a config."""
        store = AuditStore.open(tmp_path / "a")
        p = AuditPipeline.start(store, config=PipelineConfig(**QUIET))
        p.handle().emit("app", {"k": 1})
        assert p.close()
        assert store.closed
        p = AuditPipeline.start(str(tmp_path / "b"), config=PipelineConfig(**QUIET))
        p.handle().emit("app", {"k": 2})
        assert p.close()
        assert [r["k"] for r in _records(tmp_path / "a")] == [1]
        assert [r["k"] for r in _records(tmp_path / "b")] == [2]

    def test_one_pipeline_per_root(self, tmp_path: Path, started: Pipes) -> None:
        """A second start on a live root (even through another path) fails; after close it works."""
        p, _ = _start(started, tmp_path / "s")
        os.symlink(tmp_path / "s", tmp_path / "link")
        with pytest.raises(StoreLockedError, match="already open"):
            AuditPipeline.start(tmp_path / "link")
        assert p.close()
        p2, _ = _start(started, tmp_path / "link")
        assert p2.store_root == p.store_root

    def test_refuses_readers_and_closed_stores(self, tmp_path: Path) -> None:
        """A reader or a closed store cannot feed a pipeline."""
        AuditStore.open(tmp_path / "s").close()
        reader = AuditStore.open_reader(tmp_path / "s")
        with reader, pytest.raises(ConfigError, match="open for writing"):
            AuditPipeline.start(reader)
        store = AuditStore.open(tmp_path / "s")
        store.close()
        with pytest.raises(ConfigError):
            AuditPipeline.start(store)

    def test_bad_arguments(self, tmp_path: Path) -> None:
        """Wrong types for permissions, config or on_lost are ConfigErrors, and no store is left open."""
        with pytest.raises(ConfigError):
            AuditPipeline.start(tmp_path / "s", permissions="all")  # type: ignore[arg-type]
        with pytest.raises(ConfigError):
            AuditPipeline.start(tmp_path / "s", config={"queue_size": 1})  # type: ignore[arg-type]
        with pytest.raises(ConfigError):
            AuditPipeline.start(tmp_path / "s", on_lost="stderr")  # type: ignore[arg-type]


class TestEmit:
    def test_events_are_stored_in_order_with_their_ts(self, tmp_path: Path, started: Pipes) -> None:
        """Emitted events are stored in emit order; a given ts is kept, a missing one is the emit time."""
        p, handle = _start(started, tmp_path / "s")
        before = time.time_ns() // 1000
        event = {"i": 0}
        handle.emit("app", event)
        after = time.time_ns() // 1000
        for i in range(1, 600):
            handle.emit("app", {"i": i, "ts": 1_000_000 + i})
        assert event == {"i": 0}  # the caller's mapping is never changed
        assert p.close()
        records = _records(tmp_path / "s")
        assert [r["i"] for r in records] == list(range(600))
        assert before <= records[0]["ts"] <= after
        assert [r["ts"] for r in records[1:]] == [1_000_000 + i for i in range(1, 600)]

    def test_non_mapping_is_a_type_error(self, tmp_path: Path, started: Pipes) -> None:
        """Only mappings are events; anything else raises TypeError and is not counted."""
        _p, handle = _start(started, tmp_path / "s")
        with pytest.raises(TypeError, match="mapping"):
            handle.emit("app", ["not", "a", "mapping"])  # type: ignore[arg-type]
        assert handle.metrics()["offered"] == 0

    def test_full_queue_rejects_with_the_event(self, tmp_path: Path, started: Pipes) -> None:
        """Capacity 1, writer held: 1 of 100 emits is accepted, 99 raise QueueFullError with their event."""
        p, handle = _start(started, tmp_path / "s", queue_size=1)
        rejected = []
        with paused(p):
            for i in range(100):
                try:
                    handle.emit("app", {"i": i})
                except QueueFullError as e:
                    rejected.append(e.event["i"])
            m = handle.metrics()
            assert m["queue_depth"] == 1 and m["queue_capacity"] == 1
        assert rejected == list(range(1, 100))
        assert p.flush(10)
        m = handle.metrics()
        assert (m["offered"], m["accepted"], m["rejected_full"], m["written"]) == (100, 1, 99, 1)
        _check_identities(m)
        assert p.close()
        gaps = _gaps(_records(tmp_path / "s"))
        assert len(gaps) == 1 and gaps[0]["count"] == 99 and gaps[0]["queue_full"] == 99
        assert gaps[0]["first_seq"] == 0 and gaps[0]["last_seq"] == gaps[0]["seq"] == 1
        assert "99 records went to the fallback" in gaps[0]["reason"]

    @pytest.mark.parametrize(
        ("slice_time", "producing", "sizes"),
        [
            # Nobody logs while the first slice is written: the backlog goes in one slice
            # of batch_max (256), whatever slice_time says.
            (1e-9, False, [64, 36]),
            (1e3, False, [64, 36]),
            # Someone logs meanwhile: the next slice is sized by time (1 event for a
            # slice_time no event fits in; batch_max for a huge one), and once the queue
            # stops growing the rest goes at once.
            (1e-9, True, [64, 1, 45]),
            (1e3, True, [64, 46]),
        ],
    )
    def test_slices_are_sized_by_time_while_producers_log(
        self,
        tmp_path: Path,
        started: Pipes,
        hang: Any,
        slice_time: float,
        producing: bool,
        sizes: list[int],
    ) -> None:
        """The first slice takes 64 events; while the queue grows during a slice (producers
        are logging and waiting for the GIL) the next takes as many as fit in slice_time of
        the writer's CPU, otherwise up to batch_max."""
        p, handle = _start(started, tmp_path / "s", slice_time=slice_time)
        with paused(p):
            handle.emit("app", {"i": 0, "hang": hang})  # the writer waits inside slice 1
            for i in range(1, 100):
                handle.emit("app", {"i": i})
        assert hang.entered.wait(10)
        if producing:
            for i in range(100, 110):
                handle.emit("app", {"i": i})
        hang.release.set()
        assert p.flush(10)
        m = handle.metrics()
        total = 110 if producing else 100
        assert (m["written"], m["batches"]) == (total, len(sizes))
        assert [r["i"] for r in _user(_records(tmp_path / "s"))] == list(range(total))

    def test_several_producers_overshoot_by_at_most_one_each(self, tmp_path: Path, started: Pipes) -> None:
        """With T producer threads the queue holds at most capacity + T, and every emit is counted once."""
        p, handle = _start(started, tmp_path / "s", queue_size=10)
        threads_n, per_thread = 8, 200
        go = threading.Barrier(threads_n)

        def produce(t: int) -> None:
            go.wait()
            for i in range(per_thread):
                try:
                    handle.emit("app", {"t": t, "i": i})
                except QueueFullError:
                    pass

        with paused(p):
            threads = [threading.Thread(target=produce, args=(t,)) for t in range(threads_n)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            m = handle.metrics()
        assert m["offered"] == threads_n * per_thread
        assert 10 <= m["accepted"] <= 10 + threads_n
        assert m["queue_depth"] == m["accepted"]
        assert p.flush(10)
        _check_identities(handle.metrics())

    def test_denied_emits_are_counted_but_not_offered(self, tmp_path: Path, started: Pipes) -> None:
        """A role without 'emit' gets PermissionDeniedError, counted as denied and not offered."""
        policy = PermissionPolicy({"app": {"emit"}})
        _p, handle = _start(started, tmp_path / "s", permissions=policy)
        handle.emit("app", {"ok": 1})
        with pytest.raises(PermissionDeniedError, match="'guest' is not allowed to emit"):
            handle.emit("guest", {"ok": 0})
        m = handle.metrics()
        assert (m["denied"], m["offered"], m["accepted"]) == (1, 1, 1)

    def test_emit_after_close_raises_closed(self, tmp_path: Path, started: Pipes) -> None:
        """After close, emit raises PipelineClosedError carrying the event, counted rejected_closed."""
        p, handle = _start(started, tmp_path / "s")
        assert p.close()
        event = {"late": True}
        with pytest.raises(PipelineClosedError, match="closed") as info:
            handle.emit("app", event)
        assert info.value.event is event
        m = handle.metrics()
        assert (m["offered"], m["rejected_closed"]) == (1, 1)
        _check_identities(m)

    def test_metrics_and_health_answer_while_the_writer_is_held(self, tmp_path: Path, started: Pipes) -> None:
        """metrics() and health() need neither the writer nor a role."""
        p, handle = _start(started, tmp_path / "s")
        with paused(p):
            handle.emit("app", {"i": 1})
            assert handle.metrics()["queue_depth"] == 1
            assert handle.health() == {
                "writer_alive": True,
                "disk_full": False,
                "low_disk": False,
                "stalled": False,
                "closed": False,
                "status": "ok",
            }


class TestFlushAndClose:
    def test_flush_is_a_durability_barrier(self, tmp_path: Path, started: Pipes) -> None:
        """Everything accepted before flush() survives a power cut right after it, under the 'os' policy."""
        layer = FaultLayer()
        root = tmp_path / "s"
        p, handle = _start(started, root, layer=layer, sync="os")
        for i in range(300):
            handle.emit("app", {"i": i})
        assert p.flush(10)
        with paused(p):
            layer.power_loss()
            assert [r["i"] for r in _records(root)] == list(range(300))

    def test_close_is_idempotent_and_releases_the_store(self, tmp_path: Path, started: Pipes) -> None:
        """close() stores everything, writes one checkpoint, frees the lock; later calls return True."""
        p, handle = _start(started, tmp_path / "s")
        for i in range(10):
            handle.emit("app", {"i": i})
        assert p.close() and p.closed
        assert p.close() and p.flush() and handle.flush()
        assert not handle.health()["writer_alive"]
        with AuditStore.open(tmp_path / "s") as store:
            assert store.tree_size == 10
            assert store.last_checkpoint is not None and store.last_checkpoint.tree_size == 10
            assert store.verify().ok

    def test_close_drains_a_full_queue_without_a_free_slot(self, tmp_path: Path, started: Pipes) -> None:
        """Capacity 8, writer held, queue full: close() needs no slot, ends the hold and stores all 8."""
        p, handle = _start(started, tmp_path / "s", queue_size=8)
        with paused(p):
            for i in range(8):
                handle.emit("app", {"i": i})
            with pytest.raises(QueueFullError):
                handle.emit("app", {"i": 8})
            assert not p.flush(timeout=0.05)  # the writer is held: the barrier cannot be reached
            assert p.close()
        assert [r["i"] for r in _user(_records(tmp_path / "s"))] == list(range(8))

    def test_close_returns_when_the_writer_hangs(self, tmp_path: Path, started: Pipes, hang: Any) -> None:
        """close(timeout) returns False while the writer hangs in a repr, and finishes once it recovers."""
        p, handle = _start(started, tmp_path / "s")
        handle.emit("app", {"bad": hang})
        assert hang.entered.wait(10)
        assert p.close(timeout=0.05) is False
        assert p.flush(timeout=0.01) is False
        hang.release.set()
        assert p.close(timeout=10) is True
        assert [r["bad"] for r in _records(tmp_path / "s")] == [{"$repr": "Hang()"}]

    def test_records_left_at_exit_are_stored(self, tmp_path: Path) -> None:
        """A script that emits and returns without closing leaves every record stored (atexit close)."""
        root = tmp_path / "s"
        script = f"""
            from quipu_logging import AuditPipeline, PipelineConfig
            handle = AuditPipeline.start({str(root)!r}, config=PipelineConfig(queue_size=20000)).handle()
            for i in range(5000):
                handle.emit("app", {{"i": i}})
        """
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        done = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env=env, timeout=60)
        assert done.returncode == 0
        assert [r["i"] for r in _records(root)] == list(range(5000))


class TestGroupCommit:
    def test_a_lone_record_becomes_durable_by_the_deadline(self, tmp_path: Path, started: Pipes) -> None:
        """Under group:1000:20, one record with no later traffic is fsynced by the writer alone."""
        layer = FaultLayer()
        root = tmp_path / "s"
        p, handle = _start(started, root, layer=layer, sync="group:1000:20")
        fsyncs = handle.metrics()["fsyncs"]
        handle.emit("app", {"lonely": True})
        assert wait_synced(p, 1, timeout=5)  # no flush(): flush would sync by itself
        assert handle.metrics()["fsyncs"] > fsyncs
        with paused(p):
            layer.power_loss()
            assert [r["lonely"] for r in _records(root)] == [True]


class TestFailures:
    def test_write_error_is_retried_without_duplicates(self, tmp_path: Path, started: Pipes) -> None:
        """Two EIO write failures, then success: every event stored once, two retries counted."""
        layer = FaultLayer()
        p, handle = _start(started, tmp_path / "s", layer=layer, retry_backoff=0.0)
        layer.fail("segment", errno.EIO, errno.EIO)
        for i in range(50):
            handle.emit("app", {"i": i})
        assert p.flush(10)
        m = handle.metrics()
        assert (m["written"], m["retries"], m["parked"]) == (50, 2, 0)
        assert p.close()
        assert [r["i"] for r in _records(tmp_path / "s")] == list(range(50))

    def test_persistent_error_parks_then_redrive_restores(self, tmp_path: Path, started: Pipes) -> None:
        """Retries exhausted: events go to the fsynced DLQ; a redrive stores them with their ts."""
        layer = FaultLayer()
        p, handle = _start(started, tmp_path / "s", layer=layer, retries=1, retry_backoff=0.0)
        layer.stick("segment", errno.EIO)
        for i in range(5):
            handle.emit("app", {"i": i, "ts": 10 + i})
        assert p.flush(10)
        m = handle.metrics()
        assert (m["parked"], m["parked_now"], m["dlq_entries"], m["retries"]) == (5, 5, 5, 1)
        assert handle.health()["status"] == "degraded"
        assert list((tmp_path / "s" / "dlq").glob("parked-*.dlq"))
        layer.stick("segment", None)
        assert handle.redrive_dlq("admin") == 5
        m = handle.metrics()
        assert (m["redriven"], m["parked_now"], m["dlq_entries"]) == (5, 0, 0)
        _check_identities(m)
        assert handle.health()["status"] == "ok"
        assert p.close()
        records = _records(tmp_path / "s")
        assert [(r["i"], r["ts"]) for r in records] == [(i, 10 + i) for i in range(5)]
        assert not list((tmp_path / "s" / "dlq").glob("parked-*"))

    def test_enospc_is_not_retried_and_latches_disk_full(self, tmp_path: Path, started: Pipes) -> None:
        """ENOSPC parks at once and sets the latch, which rejects emits (when asked) until a write works."""
        layer = FaultLayer()
        p, handle = _start(started, tmp_path / "s", layer=layer, reject_emit_when_disk_full=True)
        layer.fail("segment", errno.ENOSPC)
        handle.emit("app", {"i": 0})
        assert p.flush(10)
        m = handle.metrics()
        assert (m["retries"], m["parked"]) == (0, 1)
        assert handle.health()["disk_full"] and handle.health()["status"] == "unhealthy"
        with pytest.raises(PipelineClosedError, match="disk space"):
            handle.emit("app", {"i": 1})
        assert handle.metrics()["rejected_disk_full"] == 1
        assert p.flush(10)  # the gap record is the next write; it succeeds and clears the latch
        assert not handle.health()["disk_full"]
        handle.emit("app", {"i": 2})
        assert p.close()
        records = _records(tmp_path / "s")
        assert [r["i"] for r in _user(records)] == [2]
        assert _gaps(records)[0]["disk_full"] == 1

    def test_unparkable_events_go_to_on_lost(self, tmp_path: Path, started: Pipes) -> None:
        """When the DLQ directory is a file, a refused event is handed to on_lost with the error."""
        (tmp_path / "notadir").write_text("x")
        layer = FaultLayer()
        lost: list[tuple[Mapping[str, Any], BaseException]] = []
        p, handle = _start(
            started,
            tmp_path / "s",
            layer=layer,
            retries=0,
            dlq_dir=tmp_path / "notadir",
            on_lost=lambda e, err: lost.append((e, err)),
        )
        layer.stick("segment", errno.EIO)
        event = {"i": 1}
        handle.emit("app", event)
        assert p.flush(10)
        assert [e["i"] for e, _ in lost] == [1] and isinstance(lost[0][1], OSError)
        assert "ts" not in event  # on_lost got the queued copy that carries the emit time
        m = handle.metrics()
        assert (m["handed_off"], m["parked"], m["lost"]) == (1, 0, 0)
        layer.stick("segment", None)
        assert p.close()
        gaps = _gaps(_records(tmp_path / "s"))
        assert [g["handed_off"] for g in gaps] == [1]

    def test_failing_on_lost_counts_lost(self, tmp_path: Path, started: Pipes) -> None:
        """An on_lost that raises (or none at all) leaves the event counted as lost."""
        layer = FaultLayer()

        def explode(event: Mapping[str, Any], error: BaseException) -> None:
            raise RuntimeError("fallback is down too")

        p, handle = _start(started, tmp_path / "s", layer=layer, retries=0, on_lost=explode)
        layer.stick("segment", errno.EIO)
        layer.stick("dlq", errno.EIO)
        handle.emit("app", {"i": 1})
        assert p.flush(10)
        p.set_on_lost(None)
        handle.emit("app", {"i": 2})
        assert p.flush(10)
        m = handle.metrics()
        assert (m["lost"], m["handed_off"], m["parked"]) == (2, 0, 0)
        _check_identities(m)
        assert handle.health()["writer_alive"]

    def test_failed_fsync_reopens_the_store(self, tmp_path: Path, started: Pipes) -> None:
        """A failed fsync is not retried: the store is reopened and nothing is stored twice or lost."""
        layer = FaultLayer()
        p, handle = _start(started, tmp_path / "s", layer=layer, sync="always")
        handle.emit("app", {"i": 0})
        assert p.flush(10)
        layer.fail_fsyncs = 1
        handle.emit("app", {"i": 1})
        assert p.flush(10)
        handle.emit("app", {"i": 2})
        assert p.flush(10)
        m = handle.metrics()
        assert m["store_reopens"] == 1 and m["written"] == 3 and m["parked"] == 0
        assert p.close()
        assert [r["i"] for r in _records(tmp_path / "s")] == [0, 1, 2]

    def test_writer_death_is_visible_and_settles_its_events(self, tmp_path: Path, started: Pipes) -> None:
        """An unreopenable store kills the writer: health says so, emits are refused, all is accounted."""
        layer = FaultLayer()
        p, handle = _start(started, tmp_path / "s", layer=layer, sync="always")
        layer.fail_fsyncs = 1000
        layer.fail_open = True
        handle.emit("app", {"i": 0})
        assert not p.flush(10)
        health = handle.health()
        assert not health["writer_alive"] and health["status"] == "unhealthy"
        with pytest.raises(PipelineClosedError, match="died"):
            handle.emit("app", {"i": 1})
        m = handle.metrics()
        assert m["accepted"] == m["written"] + m["parked"] + m["handed_off"] + m["lost"] == 1
        assert p.close() is False

    def test_an_oversized_event_does_not_sink_its_batch(self, tmp_path: Path, started: Pipes) -> None:
        """An event over 16 MiB is set apart: its batch mates are stored, it goes to on_lost."""
        lost: list[Mapping[str, Any]] = []
        p, handle = _start(started, tmp_path / "s", on_lost=lambda e, err: lost.append(e))
        with paused(p):
            handle.emit("app", {"i": 0})
            handle.emit("app", {"i": 1, "blob": "x" * (17 * 1024 * 1024)})
            handle.emit("app", {"i": 2})
        assert p.flush(10)
        assert [e["i"] for e in lost] == [1]
        assert p.close()
        assert [r["i"] for r in _user(_records(tmp_path / "s"))] == [0, 2]


class TestStall:
    def test_a_hung_batch_turns_health_unhealthy_until_it_completes(
        self, tmp_path: Path, started: Pipes, hang: Any, fake_clock: Any
    ) -> None:
        """A batch longer than stall_timeout: unhealthy, emits rejected as closed; then back to ok."""
        p, handle = _start(started, tmp_path / "s", stall_timeout=5.0)
        clock = fake_clock
        p._clock = clock
        handle.emit("app", {"bad": hang})
        assert hang.entered.wait(10)
        handle.emit("app", {"i": 1})  # not stalled yet: accepted
        clock.now += 6.0
        assert handle.health()["stalled"] and handle.health()["status"] == "unhealthy"
        with pytest.raises(PipelineClosedError, match="stalled"):
            handle.emit("app", {"i": 2})
        hang.release.set()
        assert p.flush(10)
        assert handle.health()["status"] == "ok"
        handle.emit("app", {"i": 3})
        m = handle.metrics()
        assert m["rejected_closed"] == 1
        assert p.close()
        _check_identities(handle.metrics())
        records = _records(tmp_path / "s")
        assert [r.get("i") for r in _user(records)] == [None, 1, 3]
        assert _gaps(records)[0]["closed"] == 1


class TestAccounting:
    def test_every_path_keeps_both_identities(
        self, tmp_path: Path, started: Pipes, hang: Any, fake_clock: Any
    ) -> None:
        """Full, closed, disk full, retry, DLQ, on_lost, lost, denied, stall: all add up; gaps recorded."""
        layer = FaultLayer()
        dlq = tmp_path / "dlq"
        dlq.write_text("a file where the DLQ directory should be")
        mode = {"on_lost_fails": False}

        def on_lost(event: Mapping[str, Any], error: BaseException) -> None:
            if mode["on_lost_fails"]:
                raise RuntimeError("fallback failed")

        policy = PermissionPolicy({"app": {"emit"}, "ops": {"emit", "administer"}})
        p, handle = _start(
            started,
            tmp_path / "s",
            layer=layer,
            permissions=policy,
            on_lost=on_lost,
            queue_size=2,
            retries=1,
            retry_backoff=0.0,
            dlq_dir=dlq,
            stall_timeout=5.0,
            reject_emit_when_disk_full=True,
        )
        clock = fake_clock
        p._clock = clock
        emit = handle.emit

        emit("app", {"path": "ok"})
        with pytest.raises(PermissionDeniedError):  # denied
            emit("guest", {"path": "denied"})
        assert p.flush(10)
        with paused(p):  # full
            emit("app", {"path": "queued-1"})
            emit("app", {"path": "queued-2"})
            with pytest.raises(QueueFullError):
                emit("app", {"path": "full"})
        assert p.flush(10)
        layer.fail("segment", errno.EIO)  # write error, retry, success
        emit("app", {"path": "retried"})
        assert p.flush(10)
        layer.stick("segment", errno.EIO)  # write error, DLQ error, on_lost takes it
        emit("app", {"path": "handed-off"})
        assert p.flush(10)
        mode["on_lost_fails"] = True  # ... and on_lost fails too
        emit("app", {"path": "lost"})
        assert p.flush(10)
        dlq.unlink()  # write error, parked
        emit("app", {"path": "parked"})
        assert p.flush(10)
        layer.stick("segment", errno.ENOSPC)  # disk full: parked, latch set, next emit rejected
        emit("app", {"path": "enospc"})
        assert p.flush(10)
        with pytest.raises(PipelineClosedError):
            emit("app", {"path": "disk-full"})
        layer.stick("segment", None)
        assert p.flush(10)
        assert not handle.health()["disk_full"]  # the gap record was a successful write
        # stall
        emit("app", {"path": "hang", "v": hang})
        assert hang.entered.wait(10)
        clock.now += 10
        with pytest.raises(PipelineClosedError):
            emit("app", {"path": "stalled"})
        hang.release.set()
        assert p.flush(10)
        assert handle.redrive_dlq("ops") == 2
        with pytest.raises(PermissionDeniedError):
            handle.redrive_dlq("app")

        m = handle.metrics()
        _check_identities(m)
        expected = {
            "offered": 12,
            "accepted": 9,
            "rejected_full": 1,
            "rejected_disk_full": 1,
            "rejected_closed": 1,
            "denied": 2,
            "written": 5,
            "parked": 2,
            "redriven": 2,
            "parked_now": 0,
            "handed_off": 1,
            "lost": 1,
        }
        assert {k: m[k] for k in expected} == expected
        assert p.close()
        with pytest.raises(PipelineClosedError):  # closed
            emit("app", {"path": "closed"})
        final = handle.metrics()
        _check_identities(final)
        assert final["rejected_closed"] == 2

        records = _records(tmp_path / "s")
        stored = [r["path"] for r in _user(records)]
        assert sorted(stored) == sorted(["ok", "queued-1", "queued-2", "retried", "hang", "parked", "enospc"])
        gaps = _gaps(records)
        # full, disk full, stalled, handed off, lost
        assert sum(g["count"] for g in gaps) == 1 + 1 + 1 + 1 + 1
        assert m["gap_records"] == len(gaps) and m["system_records"] >= len(gaps)
        for g in gaps:
            assert g["first_seq"] <= g["last_seq"] == g["seq"]


class TestHealth:
    def test_low_disk_degrades(self, tmp_path: Path, started: Pipes) -> None:
        """Less free space than low_disk_bytes makes health low_disk and degraded."""
        p, handle = _start(started, tmp_path / "s", low_disk_bytes="1000TiB")
        assert p.flush(10)  # the writer checked the disk when it started
        health = handle.health()
        assert health["low_disk"] and health["status"] == "degraded"


class TestFork:
    @pytest.mark.filterwarnings("ignore::DeprecationWarning")  # fork() with threads (3.12+)
    def test_child_never_writes_the_parents_store(self, tmp_path: Path, started: Pipes) -> None:
        """In a forked child emits raise PipelineClosedError and close is a no-op; the parent goes on."""
        p, handle = _start(started, tmp_path / "s")
        handle.emit("app", {"who": "parent-1"})
        assert p.flush(10)
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            code = 1
            try:
                try:
                    handle.emit("app", {"who": "child"})
                except PipelineClosedError as e:
                    code = 0 if "parent process" in str(e) else 3
                if handle.health()["writer_alive"] or not p.close() or not p.flush():
                    code = 4
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        handle.emit("app", {"who": "parent-2"})
        assert p.close()
        assert [r["who"] for r in _records(tmp_path / "s")] == ["parent-1", "parent-2"]
