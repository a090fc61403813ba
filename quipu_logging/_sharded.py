"""One store set fed by many processes: each process writes a shard of its own, taken lazily.

:class:`ShardedHandle` is what ``AuditHandler(root=..., shards=...)`` emits into. It
behaves like an :class:`~quipu_logging.AuditHandle`, but no shard is taken when it is
built (say by ``dictConfig`` in a parent that will fork workers): each process takes
the first free shard of the set at its **first record**, on a named thread
(``quipu-shard-opener``), so the caller never waits on the disk. Until the shard's
pipeline runs, that process's records wait in its own bounded queue (``queue_size``);
the opener then moves them, in order, into the pipeline.

* **Fork**: in a child every handle forgets its parent's pipeline (which the pipeline
  layer marks foreign) and starts afresh: the child's first record takes a shard of
  its own. The parent keeps the shard it took. Under ``spawn`` each process
  configures itself and does the same.
* **Every shard busy**: one clear line on stderr (root, limit, holders' pids); the
  waiting records go to ``on_lost`` (the handler's fallback) and later ones are
  rejected with :class:`PipelineClosedError` (the handler sends them to its
  fallback and counts them). The process tries again at most every
  :data:`RETRY_INTERVAL` seconds.
* **Accounting**: :meth:`metrics` adds this handle's own counters (records rejected
  before the pipeline ran, or handed off when no shard could be taken) to the
  pipeline's, so the pipeline's identities hold for the sum.
* **Exit**: the set's own ``atexit`` hook waits for a shard being taken, then closes
  this process's shard pipeline (which drains, fsyncs and checkpoints). Shard pipelines
  are kept out of the pipeline layer's exit hook (see :func:`_start_pipeline`).
  ``multiprocessing`` workers leave through ``os._exit`` after running
  ``multiprocessing.util``'s finalisers (and, before Python 3.13, no ``atexit``), so a
  process that has imported ``multiprocessing`` also registers a ``Finalize`` that
  closes its shard.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from typing import Any, Final

from .errors import ConfigError, PipelineClosedError, QueueFullError, ShardsBusyError
from .metrics import Counter
from .permissions import PermissionPolicy, RoleLike
from .pipeline import AuditHandle, AuditPipeline, PipelineConfig
from .pipeline import _every as _all_pipelines
from .store import StoreConfig
from .store._set import StoreSet, parse_shards_option, shard_name

__all__ = ["RETRY_INTERVAL", "ShardedHandle", "attach", "release"]

RETRY_INTERVAL: Final = 5.0
"""Seconds between attempts to take a shard after every shard was found busy."""

_IDLE, _OPENING, _OPEN, _BUSY, _CLOSED = "idle", "opening", "open", "busy", "closed"


def _stderr(text: str) -> None:
    try:
        stream = sys.stderr
        if stream is not None:
            stream.write(text)
            stream.flush()
    except Exception:
        pass


class ShardedHandle(AuditHandle):
    """An :class:`AuditHandle` over a store set; each process takes its own shard lazily.

    Build it with :func:`attach`. Attributes: ``set`` (the :class:`StoreSet`), ``shard``
    (the name of this process's shard, ``None`` until taken), ``unavailable`` (why no
    shard could be taken, else ``None``).
    """

    def __init__(
        self,
        root: str,
        *,
        shards: Any,
        sync: str,
        queue_size: int,
        signing_key: str | None = None,
    ) -> None:
        self.set = StoreSet.open(root, shards=shards)
        self.key: tuple[str, int, str | None] = (sync, queue_size, signing_key)
        self._sync = sync
        self._signing_key = signing_key
        self._capacity = queue_size
        self._sinks: list[weakref.WeakMethod[Callable[[Mapping[str, Any], BaseException], object]]] = []
        self.refs = 0
        self._reset()
        _every.add(self)

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self._state = _IDLE
        self._inner: AuditHandle | None = None
        self._pipeline: AuditPipeline | None = None
        self._pending: list[tuple[RoleLike, Mapping[str, Any]]] = []
        self._opener: threading.Thread | None = None
        self._retry_at = 0.0
        self.shard: str | None = None
        self.unavailable: str | None = None
        self._c = {
            name: Counter()
            for name in ("offered", "accepted", "rejected_full", "rejected_closed", "handed_off", "lost")
        }

    def _after_fork_in_child(self) -> None:
        # The parent's pipeline (marked foreign by the pipeline layer) and its shard are not
        # ours: the child's first record takes a shard of its own.
        self._reset()

    # ------------------------------------------------------------------ AuditHandle

    @property
    def pipeline(self) -> AuditPipeline:
        """This process's shard pipeline.

        Raises:
            PipelineClosedError: no shard taken (yet) in this process.
        """
        p = self._pipeline
        if p is None:
            raise PipelineClosedError(None, f"no shard of {self.set.root!r} taken in this process yet")
        return p

    def emit(self, role: RoleLike, event: Mapping[str, Any]) -> None:
        """Queues ``event`` for this process's shard, taking one first if needed (never waits on disk)."""
        inner = self._inner
        if inner is not None:
            inner.emit(role, event)
            return
        with self._lock:
            inner = self._inner
            if inner is None:
                self._enqueue_pending(role, event)
                return
        inner.emit(role, event)

    def _enqueue_pending(self, role: RoleLike, event: Mapping[str, Any]) -> None:
        # Called with self._lock held; nothing here waits on I/O.
        c = self._c
        state = self._state
        if state == _BUSY and time.monotonic() >= self._retry_at:
            state = _IDLE
        if state in (_CLOSED, _BUSY):
            c["offered"].add()
            c["rejected_closed"].add()
            why = self.unavailable if state == _BUSY else f"audit store set {self.set.root!r} is closed"
            raise PipelineClosedError(event, why or "closed")
        if len(self._pending) >= self._capacity:
            c["offered"].add()
            c["rejected_full"].add()
            raise QueueFullError(
                event,
                f"audit queue of {self.set.root!r} is full ({self._capacity} events) while taking a shard",
            )
        if type(event) is not dict and not isinstance(event, Mapping):
            raise TypeError(f"an audit event must be a mapping, got {type(event).__name__}")
        self._pending.append((role, event if "ts" in event else {**event, "ts": time.time_ns() // 1000}))
        if state == _IDLE:
            self._state = _OPENING
            thread = threading.Thread(target=self._open, name="quipu-shard-opener", daemon=True)
            self._opener = thread
            _close_at_exit(self)
            thread.start()

    def _open(self) -> None:
        sync, key = self._sync, self._signing_key
        try:
            index, store = self.set.acquire(lambda root: StoreConfig(root=root, sync=sync, signing_key=key))
            try:
                pipeline = _start_pipeline(store, PipelineConfig(queue_size=self._capacity), self._on_lost)
            except BaseException:
                store.close()
                raise
        except Exception as e:
            self._fail(e)
            return
        if self.set.skipped:
            _stderr(
                f"quipu_logging: store set {self.set.root!r}: passed over {'; '.join(self.set.skipped)}. "
                f"Process {os.getpid()} writes {shard_name(index)}; 'quipu-log verify {self.set.root}' "
                "reports the damage.\n"
            )
        with self._lock:
            pending, self._pending = self._pending, []
            closing = self._state == _CLOSED
            if not closing:
                self._pipeline = pipeline
                self.shard = shard_name(index)
                self.unavailable = None
        handle = pipeline.handle()
        # Moved under no lock of ours: new emits still queue behind these until _inner is set.
        leftovers: list[tuple[RoleLike, Mapping[str, Any]]] = []
        for role, event in pending:
            if closing:
                leftovers.append((role, event))
                continue
            try:
                handle.emit(role, event)
            except (QueueFullError, PipelineClosedError) as e:
                self._c["offered"].add()
                self._c["accepted"].add()
                self._give_up(event, e)
        with self._lock:
            if not closing:
                # Records that arrived while the first ones moved: still in order behind them.
                late, self._pending = self._pending, []
                for role, event in late:
                    try:
                        handle.emit(role, event)
                    except (QueueFullError, PipelineClosedError) as e:
                        self._c["offered"].add()
                        self._c["accepted"].add()
                        self._give_up(event, e)
                self._inner = handle
                self._state = _OPEN
        if closing:
            pipeline.close()
            for _, event in leftovers:
                self._c["offered"].add()
                self._c["accepted"].add()
                self._give_up(event, PipelineClosedError(event, "closed while taking a shard"))

    def _fail(self, error: Exception) -> None:
        if isinstance(error, ShardsBusyError):
            why = str(error)
        else:
            why = f"cannot open a shard of audit store set {self.set.root!r}: {type(error).__name__}: {error}"
        with self._lock:
            pending, self._pending = self._pending, []
            if self._state != _CLOSED:
                self._state = _BUSY
            self._retry_at = time.monotonic() + RETRY_INTERVAL
            self.unavailable = why
        _stderr(
            f"quipu_logging: {why}. Process {os.getpid()} sends its audit records to the fallback "
            f"(tried again at most every {RETRY_INTERVAL:g}s).\n"
        )
        for _, event in pending:
            self._c["offered"].add()
            self._c["accepted"].add()
            self._give_up(event, error)

    def _give_up(self, event: Mapping[str, Any], error: BaseException) -> None:
        try:
            self._on_lost(event, error)
            self._c["handed_off"].add()
        except Exception:
            self._c["lost"].add()

    def _on_lost(self, event: Mapping[str, Any], error: BaseException) -> None:
        for ref in list(self._sinks):
            sink = ref()
            if sink is not None:
                sink(event, error)
                return
        raise RuntimeError("no live AuditHandler to take the event") from error

    def _wait_open(self, timeout: float | None) -> float | None:
        """Waits for a shard being taken; returns the time left."""
        thread = self._opener
        if thread is None or thread is threading.current_thread():
            return timeout
        start = time.monotonic()
        thread.join(timeout)
        if timeout is None:
            return None
        return max(0.0, timeout - (time.monotonic() - start))

    def flush(self, timeout: float | None = None) -> bool:
        """Waits until every record this process handed over is durable (or handed off)."""
        left = self._wait_open(timeout)
        if self._state == _OPENING:
            return False
        p = self._pipeline
        return True if p is None else p.flush(left)

    def redrive_dlq(self, role: RoleLike, *, timeout: float | None = None) -> int:
        """Redrives this process's shard's DLQ (see :meth:`AuditHandle.redrive_dlq`)."""
        return self.pipeline.handle().redrive_dlq(role, timeout=timeout)

    def close(self, timeout: float | None = None) -> bool:
        """Closes this process's shard pipeline (never a parent's). Idempotent."""
        # Let a shard being taken receive what waits for it first: closing right after the
        # first records (a short script) must store them, not hand them off.
        left = self._wait_open(10.0 if timeout is None else timeout)
        with self._lock:
            self._state = _CLOSED
            self._inner = None
        p = self._pipeline
        return True if p is None else p.close(left)

    def metrics(self) -> dict[str, Any]:
        """The shard pipeline's metrics plus this handle's own counters, ``shard`` and ``set_root``."""
        p = self._pipeline
        out: dict[str, Any]
        if p is not None:
            out = p.handle().metrics()
        else:
            out = {
                name: 0
                for name in (
                    "offered",
                    "accepted",
                    "rejected_full",
                    "rejected_closed",
                    "rejected_disk_full",
                    "denied",
                    "written",
                    "parked",
                    "redriven",
                    "parked_now",
                    "handed_off",
                    "lost",
                )
            }
            out["queue_capacity"] = self._capacity
        for name, counter in self._c.items():
            out[name] = out.get(name, 0) + counter.value
        out["queue_depth"] = out.get("queue_depth", 0) + len(self._pending)
        out["shard"] = self.shard
        out["set_root"] = self.set.root
        return out

    def health(self) -> dict[str, Any]:
        """The shard pipeline's health; before the first record, ``ok`` with no shard yet."""
        p = self._pipeline
        if p is not None:
            out = p.handle().health()
        elif self._state == _BUSY:
            out = {"status": "unhealthy", "writer_alive": False, "error": self.unavailable}
        elif self._state == _CLOSED:
            out = {"status": "unhealthy", "writer_alive": False, "error": "closed", "closed": True}
        else:
            out = {
                "status": "ok",
                "writer_alive": False,
                "closed": False,
                "starting": self._state == _OPENING,
            }
        out["shard"] = self.shard
        return out


def _start_pipeline(store: Any, config: PipelineConfig, on_lost: Any) -> AuditPipeline:
    """Starts a shard's pipeline *outside* the pipeline layer's exit hook.

    ``AuditPipeline.start`` puts a pipeline in the registry its ``atexit`` hook closes.
    A process exiting while its opener still moves the first records into the pipeline
    (a short-lived ``multiprocessing`` worker; Python 3.13 runs ``atexit`` in forked
    children) would have that hook seal the pipeline under the opener, and the records
    would go to the fallback. This set's own hook closes its pipelines instead, after
    waiting for the opener. The store's writer lock still keeps one writer per shard.
    """
    pipeline = AuditPipeline(
        store, PermissionPolicy.allow_all(), config, on_lost, os.path.realpath(store.root)
    )
    _all_pipelines.add(pipeline)  # so a fork marks it foreign in the child
    pipeline._thread.start()
    return pipeline


def _close_at_exit(handle: ShardedHandle) -> None:
    """Makes sure records still waiting for a shard are stored when the process exits.

    ``atexit`` (which closes this set's pipelines: they are not in the pipeline layer's
    registry, see :func:`_start_pipeline`); and, for ``multiprocessing`` workers, which
    leave through ``os._exit`` after running ``multiprocessing.util``'s finalisers (and,
    before 3.13, no ``atexit``), a ``Finalize`` for ``handle``.
    """
    atexit.unregister(_close_all_at_exit)
    atexit.register(_close_all_at_exit)
    util = sys.modules.get("multiprocessing.util")
    if util is None:
        return
    try:
        util.Finalize(None, handle.close, exitpriority=10)
    except Exception:  # pragma: no cover - an unusual multiprocessing
        pass


def _close_all_at_exit() -> None:
    for handle in list(_every):
        if handle._state in (_OPENING, _OPEN):
            try:
                handle.close()
            except Exception:  # pragma: no cover - best effort at interpreter exit
                pass


# ------------------------------------------------------------------ one handle per set root per process

_registry_lock = threading.Lock()
_registry: dict[str, ShardedHandle] = {}
_every: weakref.WeakSet[ShardedHandle] = weakref.WeakSet()


def attach(
    root: str,
    *,
    shards: Any,
    sync: str,
    queue_size: int,
    on_lost: Callable[[Mapping[str, Any], BaseException], object],
    signing_key: str | None = None,
) -> ShardedHandle:
    """The process's :class:`ShardedHandle` for ``root`` (created on first use); counts a user.

    ``on_lost`` must be a bound method (held weakly: the first live one takes handed-off
    events). Release with :func:`release`.

    Raises:
        ConfigError: a bad ``shards``, or options conflicting with a live user of the same root.
        NotAStoreError: ``root`` is a single store or a foreign directory.
    """
    parse_shards_option(shards, "AuditHandler: shards")
    with _registry_lock:
        handle = _registry.get(root)
        if handle is not None and handle.refs and handle.key != (sync, queue_size, signing_key):
            raise ConfigError(
                f"AuditHandler: another live handler writes the store set {root!r} with "
                f"sync={handle.key[0]!r}, queue_size={handle.key[1]}, signing_key={handle.key[2]!r}; "
                "give handlers sharing a set the same options, or close the other handler first"
            )
        if handle is None or handle.refs == 0:
            handle = ShardedHandle(
                root, shards=shards, sync=sync, queue_size=queue_size, signing_key=signing_key
            )
            _registry[root] = handle
        handle.refs += 1
        handle._sinks.append(weakref.WeakMethod(on_lost))
    return handle


def release(handle: ShardedHandle, timeout: float | None) -> None:
    """Drops one user; the last one closes this process's shard pipeline."""
    with _registry_lock:
        handle.refs -= 1
        last = handle.refs <= 0
        if last and _registry.get(handle.set.root) is handle:
            del _registry[handle.set.root]
    if last:
        handle.close(timeout)


def _after_fork_in_child() -> None:
    global _registry_lock
    _registry_lock = threading.Lock()
    for handle in list(_every):
        handle._after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
