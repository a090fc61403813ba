"""The non-blocking audit pipeline: a bounded front end and one writer thread that owns the store.

::

    any thread ── handle.emit(role, event) ──(never waits on the disk)──▶ SimpleQueue ──▶ quipu-writer
                     │ denied / full / closed / stalled / disk full                        │
                     ▼                                                                     ▼
            PermissionDeniedError, QueueFullError,                  AuditStore.append_batch (retries)
            PipelineClosedError (carrying the event)                 └─ failed: DLQ (fsynced)
                                                                        └─ failed: on_lost(event, error)

Design notes (DESIGN §6):

* **Emit** checks the permission, the pipeline's state and the queue depth, then
  ``put`` s the event into a ``queue.SimpleQueue`` (reentrant: safe from signal
  handlers and ``__del__``). The depth is ``SimpleQueue.qsize()``: only events go
  into the queue (control commands use their own channel), and an event the writer
  took off no longer counts. Check-then-put is not atomic, so with several producers
  the bound may be overshot by at most one event per producer thread; with one it is
  exact. Emit takes no lock at all; it wakes the writer (releases a lock the writer
  waits on) only when the writer said it is idle.
* **Deferred events**: :class:`~quipu_logging.AuditHandler`'s fast path makes the same
  checks itself (see :meth:`AuditPipeline._front`) and queues ``(build, data)``; the
  writer calls ``build(data)`` for the event when it takes it (:func:`_resolve`).
* **The writer** (thread ``quipu-writer``) drains at most ``batch_max`` events per
  ``append_batch``, fewer while producers are logging when they would take more than
  ``slice_time`` of its CPU, and yields the GIL between slices. When idle it waits at most
  until the store's group-commit deadline (``AuditStore.sync_due``), so
  ``group:N:MS`` holds with no further traffic, and at most until the next
  housekeeping (sync, retention, a free-space check), which also runs under steady
  traffic.
* **Failures**: a failed append is retried ``retries`` times with exponential
  backoff and jitter, never re-writing what the store already took (the store's
  ``tree_size`` says how much of the batch got in). ENOSPC is not retried (it sets the
  disk-full latch, which the next successful write clears); a failed fsync is never
  retried: the store is closed and reopened (recovery re-reads the tail) and the rest
  of the batch goes to the reopened store. What cannot be stored is parked in the
  fsynced DLQ (``_dlq.py``); what cannot be parked goes to ``on_lost(event, error)``
  on the writer thread.
* **Accounting**: every event offered ends in exactly one counter (see
  :meth:`AuditHandle.metrics`). When events were diverted (rejected at emit, or handed
  to ``on_lost``), the writer appends a ``{"$sys": "gap"}`` record at its next
  opportunity, so the trail itself shows the hole. It carries ``count``, ``reason``,
  the split ``queue_full`` / ``closed`` / ``disk_full`` / ``handed_off`` / ``lost``,
  and ``first_seq`` .. ``last_seq``: the diverted events were offered while the
  records from ``first_seq`` (the first after the previous gap record, or after the
  pipeline started) up to the gap record itself (``last_seq`` is its own ``seq``) were
  being stored. Denied emits are not gaps: they were never offered.
* **Control commands** (flush, close, redrive, the testing hold) travel on their own
  unbounded channel and are handled between batches; a flush first drains what was
  queued before it.
* **Close** never needs a queue slot, drains everything accepted, syncs, writes one
  checkpoint (``AuditStore.close``) and releases the lock. An event whose producer
  passed the state check just before close sealed the queue is either written by the
  final drain or handed back to its producer as rejected: never silently dropped.
* **Fork**: in a child every inherited pipeline is foreign: emits raise
  :class:`PipelineClosedError`, and the child never writes the parent's store.
"""

from __future__ import annotations

import atexit
import collections
import contextvars
import math
import os
import queue
import random
import secrets
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ._dlq import DeadLetterQueue, RedriveResult, is_disk_full
from .errors import (
    ConfigError,
    PermissionDeniedError,
    PipelineClosedError,
    QueueFullError,
    StoreBrokenError,
    StoreClosedError,
    StoreLockedError,
)
from .metrics import Counter, LatencyHistogram
from .permissions import Action, PermissionPolicy, RoleLike
from .store import AuditStore, StoreConfig
from .store._config import parse_size
from .store._fileio import FileLayer

__all__ = ["AuditHandle", "AuditPipeline", "OnLost", "PipelineConfig"]

OnLost = Callable[[Mapping[str, Any], BaseException], object]
"""``on_lost(event, error)``: takes an event the store and the DLQ both refused."""

_GAP_LABELS = (
    "queue full",
    "pipeline closed or stalled",
    "disk full",
    "store and DLQ failed, handed off",
    "store and DLQ failed, lost",
)
_EMIT = Action.EMIT
_CLOSED = -math.inf  # AuditPipeline._gate once the pipeline stops accepting

_in_audit_path: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "quipu_logging.in_audit_path", default=False
)
"""True on a pipeline's writer thread (and, set by AuditHandler, while a thread runs a
handler's complete emit path or its fallback). A logging call made there skips the
handler's fast path: ``ContextVar.get`` is the cheapest per-thread flag there is."""
_ADMINISTER = Action.ADMINISTER
_monotonic = time.monotonic
_time_ns = time.time_ns


def _positive(name: str, value: object, *, zero_ok: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"PipelineConfig.{name}: expected a number of seconds, got {value!r}")
    if not (value >= 0 if zero_ok else value > 0) or value != value or value == float("inf"):
        bound = ">= 0" if zero_ok else "> 0"
        raise ConfigError(f"PipelineConfig.{name}: must be a finite number {bound}, got {value!r}")
    return float(value)


def _count(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"PipelineConfig.{name}: expected an integer >= {minimum}, got {value!r}")
    return value


@dataclass(frozen=True, kw_only=True)
class PipelineConfig:
    """How an :class:`AuditPipeline` runs. Validated when built; a bad value raises ``ConfigError``.

    Attributes:
        queue_size: capacity of the bounded queue between callers and the writer.
        batch_max: most events the writer appends at once (it yields the GIL between slices).
        slice_time: seconds of writer CPU one slice aims at while producers are logging
            (the queue grew during the last slice): the writer then sizes each slice (at
            most ``batch_max`` events) from the CPU time per event of the slices before it,
            so the stretch in which it holds the GIL, which is what a logging thread may
            have to wait, stays near this on a slow machine as on a fast one. With nobody
            logging, the backlog goes in slices of ``batch_max``.
        retries: extra attempts after a failed append (not for ENOSPC or a failed fsync).
        retry_backoff: seconds before the first retry; doubled each time, with +-50% jitter.
        dlq_dir: where parked events go; default ``ROOT/dlq``.
        stall_timeout: seconds one batch may take before health turns unhealthy and
            new emits are rejected (until the batch completes).
        housekeeping_interval: seconds between housekeeping rounds (sync, retention,
            free-space check), idle or busy.
        reject_emit_when_disk_full: while the disk-full latch is set, reject emits at
            once (``PipelineClosedError``) instead of queueing them for the DLQ.
        low_disk_bytes: ``health()["low_disk"]`` when less is free (int or ``"1GiB"``).
        low_disk_ratio: ... or when less than this fraction of the file system is free.
        close_timeout: what ``close(timeout=None)`` waits for the writer, in seconds.
    """

    queue_size: int = 4096
    batch_max: int = 256
    slice_time: float = 0.00025
    retries: int = 3
    retry_backoff: float = 0.02
    dlq_dir: str | os.PathLike[str] | None = None
    stall_timeout: float = 30.0
    housekeeping_interval: float = 30.0
    reject_emit_when_disk_full: bool = False
    low_disk_bytes: int | str = 1024**3
    low_disk_ratio: float = 0.10
    close_timeout: float = 10.0

    def __post_init__(self) -> None:
        _count("queue_size", self.queue_size, 1)
        _count("batch_max", self.batch_max, 1)
        _count("retries", self.retries, 0)
        seconds = {
            "slice_time": _positive("slice_time", self.slice_time),
            "retry_backoff": _positive("retry_backoff", self.retry_backoff, zero_ok=True),
            "stall_timeout": _positive("stall_timeout", self.stall_timeout),
            "housekeeping_interval": _positive("housekeeping_interval", self.housekeeping_interval),
            "close_timeout": _positive("close_timeout", self.close_timeout, zero_ok=True),
        }
        for name, value in seconds.items():
            object.__setattr__(self, name, value)
        if self.dlq_dir is not None:
            if not isinstance(self.dlq_dir, (str, os.PathLike)):
                raise ConfigError(f"PipelineConfig.dlq_dir: expected a path, got {self.dlq_dir!r}")
            object.__setattr__(self, "dlq_dir", os.fspath(self.dlq_dir))
        if not isinstance(self.reject_emit_when_disk_full, bool):
            raise ConfigError(
                f"PipelineConfig.reject_emit_when_disk_full: expected True or False, "
                f"got {self.reject_emit_when_disk_full!r}"
            )
        low = parse_size(self.low_disk_bytes, "PipelineConfig.low_disk_bytes")
        object.__setattr__(self, "low_disk_bytes", low)
        ratio = self.low_disk_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
            raise ConfigError(f"PipelineConfig.low_disk_ratio: expected a fraction in [0, 1), got {ratio!r}")
        object.__setattr__(self, "low_disk_ratio", float(ratio))


# ------------------------------------------------------------------ control commands


@dataclass(eq=False)
class _Command:
    """A request to the writer; ``done`` is set when it has been handled (or cannot be)."""

    kind: str
    done: threading.Event = field(default_factory=threading.Event)
    ok: bool = False
    result: Any = None
    error: BaseException | None = None
    release: threading.Event | None = None  # pause: the writer waits on it


class _WriterFatal(Exception):
    """The writer cannot go on (the store cannot be reopened)."""


# ------------------------------------------------------------------ process registry

_registry_lock = threading.Lock()
_live: dict[str, AuditPipeline] = {}
_every: weakref.WeakSet[AuditPipeline] = weakref.WeakSet()


def _close_all_at_exit() -> None:
    with _registry_lock:
        pipelines = list(_live.values())
    for p in pipelines:
        try:
            p.close()
        except Exception:  # pragma: no cover - best effort at interpreter exit
            pass


def _after_fork_in_child() -> None:
    global _registry_lock
    _registry_lock = threading.Lock()  # a parent thread may have held it at fork time
    _live.clear()
    for p in list(_every):
        p._after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


# ------------------------------------------------------------------ the pipeline


class AuditPipeline:
    """One writer thread owning one :class:`AuditStore`, fed by any number of :class:`AuditHandle` s.

    Build it with :meth:`start`; stop it with :meth:`close` (also run at interpreter
    exit). At most one pipeline per store root (by real path) per process.

    Attributes:
        config: the :class:`PipelineConfig`.
        store_root: the store's root directory (real path).
    """

    def __init__(
        self,
        store: AuditStore,
        permissions: PermissionPolicy,
        config: PipelineConfig,
        on_lost: OnLost | None,
        root: str,
    ) -> None:
        # Use AuditPipeline.start().
        self.config = config
        self.store_root = root
        self._store = store
        self._policy = permissions
        self._on_lost = on_lost
        self._run_id = secrets.token_hex(8)
        dlq_dir = config.dlq_dir if config.dlq_dir is not None else os.path.join(store.root, "dlq")
        assert isinstance(dlq_dir, str)
        self._dlq = DeadLetterQueue(dlq_dir, store.config.file_layer or FileLayer(), self._run_id)
        self._clock: Callable[[], float] = _monotonic

        # The front end (read by every producer; written by the writer or by close).
        self._queue: queue.SimpleQueue[Mapping[str, Any]] = queue.SimpleQueue()
        self._capacity = config.queue_size
        self._stall_timeout = config.stall_timeout
        self._reject_disk_full = config.reject_emit_when_disk_full
        self._accepting = True
        self._why_closed = f"audit pipeline for {root!r} is closed"
        self._busy_since: float | None = None
        # What AuditHandler's fast path reads instead of _accepting and _busy_since:
        # None while accepting with no batch running, the batch's stall deadline while
        # one runs, _CLOSED (-inf) once not accepting. The deadline is in time.time()
        # terms: the fast path compares it with record.created, which logging read
        # already, instead of calling a clock. emit() checks with the monotonic clock and
        # has the last word: a wall-clock step forward only sends records to emit(). Once
        # emit() or health() sees the batch stalled, the gate is _CLOSED until the batch
        # ends (_stall_seen), so records created before the deadline but handled after it
        # (a lagging QueueListener, replays) are refused too. Until someone looks, such
        # records, or a wall-clock step backwards, can still queue behind the stalled
        # batch (in the bounded queue: nothing is lost while the writer recovers).
        self._gate: float | None = None
        self._disk_full = False
        self._low_disk = False
        self._idle = False
        self._sealed = False  # the writer's final drain has begun
        # True while _idle or _sealed is: a producer that just put an event looks at this
        # one flag and only then at the two (see _settle). Only the writer
        # thread writes it.
        self._attn = False
        self._drained = threading.Event()  # ... and has taken everything it will take
        self._stranded: list[Mapping[str, Any]] = []
        self._stranded_lock = threading.Lock()
        self._gap_pending = False
        # A lock used as a doorbell: the writer blocks acquiring it; anyone wakes it by
        # releasing it. Releasing never blocks, and a double release just raises.
        self._bell = threading.Lock()
        self._bell.acquire()

        # Control channel: never bounded, never competes with events for a slot.
        self._control: collections.deque[_Command] = collections.deque()
        self._control_lock = threading.Lock()  # held only for appends and flags, never across I/O
        self._finished = False
        self._pauses: list[_Command] = []
        self._close_lock = threading.Lock()
        self._close_requested = False
        self._close_ok = False
        self._foreign = False
        self._death: BaseException | None = None

        # Counters bumped by producers (see metrics.py for why these are exact). ``offered``
        # is their sum (every offered event is accepted or rejected exactly once), so an
        # emit bumps one counter, not two.
        self._accepted = Counter()
        self._rejected_full = Counter()
        self._rejected_closed = Counter()
        self._rejected_disk_full = Counter()
        self._denied = Counter()
        # Counters only the writer changes.
        self._written = 0
        self._parked = 0
        self._redriven = 0
        self._redriven_total = 0
        self._parked_now = 0
        self._handed_off = 0
        self._lost = 0
        self._system_records = 0
        self._gap_records = 0
        self._retries = 0
        self._reopens = 0
        self._batches = 0
        self._dlq_entries = 0
        self._fsyncs_before = 0  # fsyncs of stores this pipeline closed and reopened
        self._latency = LatencyHistogram()
        self._taken = 0  # events the writer took off the queue
        # Events the next slice takes: sized by time (PipelineConfig.slice_time) from the
        # writer's smoothed CPU seconds per event.
        self._slice = min(64, config.batch_max)
        self._contended = True  # producers logged while the last slice was written
        self._cpu_per_event = 0.0
        self._batch: list[Mapping[str, Any]] = []  # the batch being written
        self._backlog: list[Mapping[str, Any]] = []  # the final drain's events not yet written
        self._dying = False
        self._current: _Command | None = None  # the control command being handled
        # What the last gap record covered: (full, closed, disk_full, handed_off, lost).
        self._gap_seen = (0, 0, 0, 0, 0)
        self._gap_from = store.tree_size
        self._synced_size = 0
        self._progress = threading.Condition(threading.Lock())
        self._next_housekeeping = 0.0
        self._dirty = False

        self._handle = AuditHandle(self)
        self._thread = threading.Thread(target=self._run, name="quipu-writer", daemon=True)

    # ------------------------------------------------------------------ starting

    @classmethod
    def start(
        cls,
        store_or_config: AuditStore | StoreConfig | str | os.PathLike[str],
        *,
        permissions: PermissionPolicy | None = None,
        config: PipelineConfig | None = None,
        on_lost: OnLost | None = None,
    ) -> AuditPipeline:
        """Starts a pipeline and its writer thread.

        Args:
            store_or_config: an open, writable :class:`AuditStore` (the pipeline takes
                it over and closes it), a :class:`StoreConfig`, or a store root path.
            permissions: who may do what; ``None`` allows every role everything.
            config: a :class:`PipelineConfig`; ``None`` uses the defaults.
            on_lost: called on the writer thread as ``on_lost(event, error)`` for each
                event that the store and the DLQ both refused. Returning counts it as
                ``handed_off``, raising as ``lost``. See also :meth:`set_on_lost`.

        Returns:
            The running pipeline.

        Raises:
            StoreLockedError: a pipeline (or another writer) already holds this root.
            ConfigError: a bad argument.
            Any error of :meth:`AuditStore.open`.
        """
        if permissions is None:
            permissions = PermissionPolicy.allow_all()
        elif not isinstance(permissions, PermissionPolicy):
            raise ConfigError(f"permissions: expected a PermissionPolicy, got {permissions!r}")
        if config is None:
            config = PipelineConfig()
        elif not isinstance(config, PipelineConfig):
            raise ConfigError(f"config: expected a PipelineConfig, got {config!r}")
        if on_lost is not None and not callable(on_lost):
            raise ConfigError(f"on_lost: expected a callable(event, error), got {on_lost!r}")
        if isinstance(store_or_config, AuditStore):
            store = store_or_config
            if store.closed or not store._writable:
                raise ConfigError(
                    f"{store!r}: a pipeline needs a store open for writing (AuditStore.open), "
                    "not a closed store or a reader"
                )
            owned = False
        else:
            root = os.path.realpath(os.fspath(StoreConfig.coerce(store_or_config).root))
            with _registry_lock:
                _refuse_live(root)
            store = AuditStore.open(store_or_config)
            owned = True
        root = os.path.realpath(store.root)
        with _registry_lock:
            try:
                _refuse_live(root)
            except StoreLockedError:
                if owned:
                    store.close()
                raise
            pipeline = cls(store, permissions, config, on_lost, root)
            _live[root] = pipeline
            _every.add(pipeline)
        # Re-registering puts our hook after logging's (atexit runs last-in first-out),
        # so pipelines close before logging.shutdown flushes the handlers.
        atexit.unregister(_close_all_at_exit)
        atexit.register(_close_all_at_exit)
        pipeline._thread.start()
        return pipeline

    def handle(self) -> AuditHandle:
        """The pipeline's :class:`AuditHandle` (cheap; any thread may use it)."""
        return self._handle

    def set_on_lost(self, on_lost: OnLost | None) -> None:
        """Sets (or clears) the callback for events the store and the DLQ both refused."""
        if on_lost is not None and not callable(on_lost):
            raise ConfigError(f"on_lost: expected a callable(event, error), got {on_lost!r}")
        self._on_lost = on_lost

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called (or the writer stopped, or in a forked child)."""
        return self._close_requested or self._finished

    def __repr__(self) -> str:
        state = "closed" if self.closed else "running"
        return f"<AuditPipeline {self.store_root!r} {state}>"

    # ------------------------------------------------------------------ emit path

    def _closed_reason(self) -> str:
        if self._accepting:
            return (
                f"audit writer for {self.store_root!r} is stalled: one batch has taken longer than "
                f"stall_timeout={self._stall_timeout}s"
            )
        return self._why_closed

    def _stall_seen(self, busy: float) -> None:
        """Someone saw the running batch past its stall deadline by the monotonic clock.

        Closes the fast path's gate as well: it compares the wall-clock deadline with
        ``record.created``, which a record delivered late (a lagging ``QueueListener``, a
        replay through ``makeLogRecord``) has from before the deadline. The writer opens
        the gate again when the batch ends. (Should the batch end between the caller's
        look and this, the gate stays closed until the next batch ends: records meanwhile
        take ``emit()``, which accepts them, and the first of them starts that batch.)
        """
        if self._busy_since is busy and self._accepting:
            self._gate = _CLOSED

    def _disk_full_reason(self) -> str:
        return f"audit store {self.store_root!r} is out of disk space; event rejected"

    def _rescue(self, event: Mapping[str, Any]) -> bool:
        """After a put that raced with the final drain: True if ``event`` was left behind.

        The writer sets ``_drained`` right after its last take (no I/O in between), so
        this wait is short. Anything still queued then will never be written: it is
        moved to ``_stranded``, and each producer takes its own event back.
        """
        self._drained.wait()
        q = self._queue
        with self._stranded_lock:
            while True:
                try:
                    self._stranded.append(q.get_nowait())
                except queue.Empty:
                    break
            for i, item in enumerate(self._stranded):
                if item is event:
                    del self._stranded[i]
                    return True
        return False

    def _set_gate(self, value: float | None) -> None:
        """Sets ``_gate`` (writer thread); ``_CLOSED`` wins once ``_accepting`` is false.

        ``close()`` clears ``_accepting`` and then closes the gate from another thread: the
        second look at ``_accepting`` after the store makes sure the writer never reopens it.
        """
        self._gate = value if self._accepting else _CLOSED
        if not self._accepting:
            self._gate = _CLOSED

    def _settle(self, item: Any) -> bool:
        """After a put that saw ``_attn``: wakes an idle writer, or takes ``item`` back if
        the final drain has passed (counted ``rejected_closed``). True when it stays queued."""
        if self._sealed and self._rescue(item):
            self._rejected_closed.add()
            self._gap_pending = True
            return False
        if self._idle:
            self._idle = False
            self._ring()
        return True

    def _ring(self) -> None:
        try:
            self._bell.release()
        except RuntimeError:
            pass  # already rung

    def _front(self, role: RoleLike) -> tuple[Any, ...] | None:
        """What :class:`~quipu_logging.AuditHandler`'s fast path needs to queue on its own.

        ``(pipeline, queue, capacity, accepted)``, or ``None`` when every emit must
        take :meth:`AuditHandle.emit` (the role may not emit, the disk-full latch may
        reject emits, or the pipeline is closed). The fast path repeats the checks of
        ``emit`` that can change (accepting and stall, through ``_gate``; capacity), puts
        a deferred ``(build, data)`` item (built by the writer, see :func:`_resolve`),
        then calls :meth:`_settle` when ``_attn`` is set,
        and counts with ``next(accepted)`` (the ``itertools.repeat`` inside the ``accepted``
        counter, see :class:`~quipu_logging.metrics.Counter`: ``next()`` on it is cheaper
        than the bound ``__next__``). Any refusal it leaves to ``emit``, which raises the
        right error.
        """
        policy = self._policy
        if self._reject_disk_full or self._foreign or not self._accepting:
            return None
        if not (policy._open or policy.allows(role, _EMIT)):
            return None
        return (self, self._queue, self._capacity, self._accepted._count)

    # ------------------------------------------------------------------ control

    def _post(self, cmd: _Command) -> bool:
        with self._control_lock:
            if self._finished:
                return False
            self._control.append(cmd)
            if cmd.kind == "pause":
                self._pauses.append(cmd)
        self._ring()
        return True

    def _wait(self, cmd: _Command, timeout: float | None) -> bool:
        if threading.current_thread() is self._thread:
            return False  # the writer cannot wait for itself
        return cmd.done.wait(timeout)

    def flush(self, timeout: float | None = None) -> bool:
        """Waits until everything accepted before the call is durable.

        Durable means: appended and fsynced, or parked in the (fsynced) DLQ, or handed
        to ``on_lost``. Needs no free queue slot and no role.

        Args:
            timeout: seconds to wait; ``None`` waits as long as the writer lives.

        Returns:
            ``True`` when the barrier was reached; ``False`` on timeout, or when the
            writer is dead or cannot sync. Once :meth:`close` was called it returns at
            once: ``True`` after a clean, finished close.
        """
        if self._foreign:
            return True
        if self._close_requested or self._finished:
            # A no-op (logging.shutdown flushes after our atexit close): never wait here.
            return self._close_ok and not self._thread.is_alive()
        cmd = _Command("flush")
        if not self._post(cmd):
            return self._close_ok
        if not self._wait(cmd, timeout):
            return False
        return cmd.ok

    def close(self, timeout: float | None = None) -> bool:
        """Stops accepting, drains the queue, syncs, writes one checkpoint and releases the store.

        Idempotent, and registered to run at interpreter exit (before
        ``logging.shutdown``); later calls are no-ops. It returns even when the writer
        hangs (say in a ``repr`` that never returns); the writer then finishes the
        close on its own if it ever gets unstuck. It also ends a ``testing.paused()``
        hold.

        Args:
            timeout: seconds to wait for the writer; ``None`` means ``config.close_timeout``.

        Returns:
            ``True`` when everything accepted was settled (stored, parked or handed off)
            and the store closed cleanly; ``False`` on timeout or failure.
        """
        if timeout is None:
            timeout = self.config.close_timeout
        with self._close_lock:
            first = not self._close_requested
            self._close_requested = True
        if self._foreign:
            return True
        if first:
            self._accepting = False
            self._gate = _CLOSED
            self._why_closed = f"audit pipeline for {self.store_root!r} is closed"
            self._post(_Command("close"))
            with self._control_lock:
                for pause in self._pauses:
                    if pause.release is not None:
                        pause.release.set()
            with _registry_lock:
                if _live.get(self.store_root) is self:
                    del _live[self.store_root]
        if threading.current_thread() is self._thread:
            return False  # on_lost closing its own pipeline: the loop ends after this batch
        if self._thread.is_alive():
            self._thread.join(timeout)
        return self._close_ok and not self._thread.is_alive()

    def _redrive(self, timeout: float | None) -> RedriveResult:
        cmd = _Command("redrive")
        if not self._post(cmd):
            raise PipelineClosedError(None, self._why_closed)
        if not self._wait(cmd, timeout):
            raise TimeoutError(f"the DLQ redrive did not finish within {timeout} s")
        if cmd.error is not None:
            raise cmd.error
        if not cmd.ok:
            raise PipelineClosedError(None, self._why_closed)
        result: RedriveResult = cmd.result
        return result

    def _hold(self, timeout: float) -> Callable[[], None]:
        """Testing hook: holds the writer after its current batch; returns the release function."""
        cmd = _Command("pause", release=threading.Event())
        if not self._post(cmd) or not cmd.done.wait(timeout) or not cmd.ok:
            why = f"cannot hold the writer of {self.store_root!r}: {self._why_closed}"
            raise PipelineClosedError(None, why)
        release = cmd.release
        assert release is not None
        return release.set

    def _wait_synced(self, size: int, timeout: float) -> bool:
        """Testing hook: waits until the writer itself fsynced at least ``size`` records."""
        with self._progress:
            return self._progress.wait_for(lambda: self._synced_size >= size or self._finished, timeout) and (
                self._synced_size >= size
            )

    # ------------------------------------------------------------------ fork

    def _after_fork_in_child(self) -> None:
        self._foreign = True
        self._accepting = False
        self._gate = _CLOSED
        self._finished = True
        self._why_closed = (
            f"audit pipeline for {self.store_root!r} belongs to the parent process; "
            "a forked child never writes it"
        )
        self._control_lock = threading.Lock()
        self._close_lock = threading.Lock()
        self._stranded_lock = threading.Lock()
        self._progress = threading.Condition(threading.Lock())
        self._control.clear()
        self._dlq.after_fork_in_child()

    # ================================================================== the writer

    def _run(self) -> None:
        _in_audit_path.set(True)  # this thread's own context: records logged here are diverted
        try:
            self._startup()
            self._loop()
            self._shutdown()
        except BaseException as e:
            try:
                self._die(e)
            except BaseException:  # pragma: no cover - settling failed too; counters say so
                pass
        finally:
            self._finish()

    def _startup(self) -> None:
        self._next_housekeeping = self._clock() + self.config.housekeeping_interval
        self._check_disk()
        try:
            self._dlq_entries = self._dlq.count()
        except OSError:
            self._dlq_entries = 0
        if self._dlq.has_leftovers():
            # A redrive was killed half-way: finish it (at-least-once) before anything else.
            res = RedriveResult()
            try:
                self._dlq.redrive(self._store, self.config.batch_max, leftovers_only=True, result=res)
            except (StoreBrokenError, StoreClosedError):
                self._reopen()
            except Exception:
                pass  # the .redriving file stays for the next redrive
            self._redriven_total += res.replayed
            self._dlq_entries = max(0, self._dlq_entries - res.replayed)

    def _loop(self) -> None:
        q = self._queue
        while True:
            if self._control and self._run_controls():
                return
            n = q.qsize()
            if n:
                # The segment pwrite of each slice releases the GIL, so producers run
                # between slices; an extra sleep(0) would only make the writer wait a whole
                # switch interval to get it back. While producers are logging (the queue grew
                # during the last slice) a slice is sized by time, so none of them waits long
                # for the GIL; with nobody logging, the backlog goes in slices of batch_max.
                self._write_batch([q.get_nowait() for _ in range(min(n, self._slice_cap()))])
                self._after_work()
                continue
            self._after_work()
            timeout = self._idle_timeout()
            self._idle = True
            self._attn = True
            if q.qsize() or self._control:
                self._idle = False
                self._attn = self._sealed
                continue
            self._bell.acquire(timeout=timeout)
            self._idle = False
            self._attn = self._sealed

    def _idle_timeout(self) -> float:
        now = self._clock()
        waits = [max(0.0, self._next_housekeeping - now)]
        due = self._store.sync_due()
        if due is not None:
            waits.append(due)
        if self._gap_pending and self._disk_full:
            waits.append(1.0)  # retry the gap record soon: it is also what clears the latch
        return min(waits)

    def _after_work(self) -> None:
        """What the writer does after a batch and on every wake-up."""
        try:
            if self._store.maybe_sync():
                self._note_synced()
        except (StoreBrokenError, StoreClosedError):
            self._reopen()
        self._record_gap()
        if self._clock() >= self._next_housekeeping:
            self._housekeeping()

    def _run_controls(self) -> bool:
        """Handles queued control commands; True when the writer must stop."""
        while True:
            with self._control_lock:
                if not self._control:
                    return False
                cmd = self._control.popleft()
            if cmd.kind == "close":
                return True
            # If handling it kills the writer, _finish answers it once everything is settled.
            self._current = cmd
            if cmd.kind == "flush":
                self._do_flush(cmd)
            elif cmd.kind == "pause":
                self._do_pause(cmd)
            elif cmd.kind == "redrive":
                self._do_redrive(cmd)
            self._current = None
            cmd.done.set()

    def _do_flush(self, cmd: _Command) -> None:
        # Everything accepted before flush() was called is in the queue now (or done):
        # FIFO, so the first qsize() events include all of them.
        self._drain(self._queue.qsize())
        self._record_gap()
        cmd.ok = self._sync()

    def _do_pause(self, cmd: _Command) -> None:
        cmd.ok = True
        cmd.done.set()
        assert cmd.release is not None
        cmd.release.wait()
        with self._control_lock:
            if cmd in self._pauses:
                self._pauses.remove(cmd)

    def _do_redrive(self, cmd: _Command) -> None:
        res = RedriveResult()
        try:
            self._dlq.redrive(self._store, self.config.batch_max, result=res)
            cmd.ok = True
        except (StoreBrokenError, StoreClosedError) as e:
            cmd.error = e
            self._reopen()
        except Exception as e:
            cmd.error = e
        finally:
            self._redriven += res.mine
            self._parked_now -= res.mine
            self._redriven_total += res.replayed
            self._dlq_entries = max(0, self._dlq_entries - res.replayed)
            if res.replayed:
                self._dirty = False  # the redrive synced the store
                self._note_synced()
        cmd.result = res

    def _drain(self, count: int) -> None:
        q = self._queue
        while count > 0:
            take = min(count, self._slice_cap())  # sliced as in _loop
            batch = []
            for _ in range(take):
                try:
                    batch.append(q.get_nowait())
                except queue.Empty:  # a rescuing producer took the rest back
                    count = 0
                    break
            count -= len(batch)
            if batch:
                self._write_batch(batch)

    def _sync(self) -> bool:
        """Syncs the store (reopening it after a failed fsync); True when everything is durable."""
        for _attempt in range(2):
            try:
                self._store.sync()
            except (StoreBrokenError, StoreClosedError):
                self._reopen()
                continue
            except OSError:
                return False
            self._dirty = False
            self._note_synced()
            return True
        return False

    def _note_synced(self) -> None:
        size = self._store.tree_size
        if size != self._synced_size:
            with self._progress:
                self._synced_size = size
                self._progress.notify_all()

    # ------------------------------------------------------------------ writing

    def _write_batch(self, batch: list[Any]) -> None:
        self._taken += len(batch)
        waiting = self._queue.qsize()
        started = time.perf_counter()
        cpu = time.thread_time()
        self._busy_since = self._clock()
        # The fast path compares this with record.created (wall-clock, read by logging).
        self._set_gate(time.time() + self._stall_timeout)
        try:
            # Events an AuditHandler deferred are built here, inside the stall watch.
            batch = self._batch = _resolve(batch)
            self._store_events(batch)
        finally:
            self._busy_since = None
            self._set_gate(None)
        self._latency.observe(time.perf_counter() - started)
        self._size_slice(len(batch), time.thread_time() - cpu, self._queue.qsize() > waiting)
        self._batches += 1
        self._batch = []

    def _slice_cap(self) -> int:
        """Most events the next slice takes: time-sized while producers log, else ``batch_max``."""
        return self._slice if self._contended else self.config.batch_max

    def _size_slice(self, events: int, cpu: float, grew: bool) -> None:
        """Sizes the next slice so that it takes about ``slice_time`` of the writer's CPU;
        ``grew``: the queue grew while this one was written (producers are logging).

        CPU time, not wall time: a slice that waited on an fsync or a retry's backoff
        held no GIL meanwhile, and counting the wait would shrink the slices of the
        ``always`` policy, adding fsyncs. Smoothed, so one slow slice (a rollover, a
        checkpoint) does not halve the next one.
        """
        self._contended = grew
        if events <= 0:
            return
        per = cpu / events
        old = self._cpu_per_event
        if old > 0.0:
            per = old + (per - old) * 0.25
        self._cpu_per_event = per
        top = self.config.batch_max
        self._slice = top if per <= 0.0 else max(1, min(top, int(self.config.slice_time / per)))

    def _store_events(self, events: list[Mapping[str, Any]]) -> None:
        """Appends ``events``, retrying and then parking what the store would not take."""
        pending = events
        attempt = 0
        retries = self.config.retries
        while pending:
            store = self._store
            before = store.tree_size
            try:
                store.append_batch(pending)
            except (StoreBrokenError, StoreClosedError) as e:
                # A failed fsync is never retried: reopen (recovery re-reads the tail) and
                # give the reopened store what it does not have yet.
                stored = self._reopen(before, len(pending))
                self._credit(stored)
                pending = pending[stored:]
                if stored == 0:
                    attempt += 1
                    if attempt > retries:
                        self._park(pending, e)
                        return
            except OSError as e:
                stored = max(0, min(len(pending), store.tree_size - before))
                self._credit(stored)
                pending = pending[stored:]
                if is_disk_full(e):
                    self._disk_full = True
                    self._park(pending, e)
                    return
                attempt += 1
                if attempt > retries:
                    self._park(pending, e)
                    return
                self._retries += 1
                self._backoff(attempt)
            except (TypeError, ValueError) as e:
                # An event the store can never take (over 16 MiB, not a mapping): the whole
                # batch was refused before any write, so find the culprit one by one.
                if len(pending) == 1:
                    self._park(pending, e)
                    return
                for event in pending:
                    self._store_events([event])
                return
            except Exception as e:
                # Not an I/O error, not the event's fault: treat like a transient failure.
                stored = max(0, min(len(pending), store.tree_size - before))
                self._credit(stored)
                pending = pending[stored:]
                attempt += 1
                if attempt > retries:
                    self._park(pending, e)
                    return
                self._retries += 1
                self._backoff(attempt)
            else:
                self._credit(len(pending))
                if store.sync_due() is None and store.config.sync_policy.mode in ("always", "group"):
                    self._note_synced()
                return

    def _credit(self, n: int) -> None:
        if n > 0:
            self._written += n
            self._dirty = True
            if self._disk_full:
                self._clear_disk_full()

    def _backoff(self, attempt: int) -> None:
        delay = self.config.retry_backoff * (2 ** (attempt - 1)) * random.uniform(0.5, 1.5)
        if delay > 0:
            time.sleep(delay)

    def _park(self, events: list[Mapping[str, Any]], error: BaseException) -> None:
        if not events:
            return
        try:
            refused = self._dlq.park(events, error)
        except Exception as dlq_error:
            if is_disk_full(dlq_error):
                self._disk_full = True
            for event in events:
                self._give_up(event, dlq_error)
            return
        n = len(events) - len(refused)
        self._parked += n
        self._parked_now += n
        self._dlq_entries += n
        for event, why in refused:
            self._give_up(event, why)

    def _give_up(self, event: Mapping[str, Any], error: BaseException) -> None:
        on_lost = self._on_lost
        if on_lost is None:
            self._lost += 1
            return
        try:
            on_lost(event, error)
        except BaseException as e:
            self._lost += 1
            if not isinstance(e, Exception) and not self._dying:
                raise
        else:
            self._handed_off += 1

    def _reopen(self, before: int | None = None, pending: int = 0) -> int:
        """Closes the (broken) store and opens it again; returns how many of ``pending`` it holds."""
        old = self._store
        try:
            old.close()
        except Exception:
            pass
        try:
            new = AuditStore.open(old.config)
        except Exception as e:
            raise _WriterFatal(f"the audit store {self.store_root!r} could not be reopened: {e!r}") from e
        self._fsyncs_before += old.fsyncs
        self._store = new
        self._reopens += 1
        if before is None:
            return 0
        return max(0, min(pending, new.tree_size - before))

    # ------------------------------------------------------------------ gaps, housekeeping

    def _record_gap(self) -> None:
        handed, lost = self._handed_off, self._lost
        seen = self._gap_seen
        if not self._gap_pending and (handed, lost) == seen[3:]:
            return
        self._gap_pending = False
        now = (
            self._rejected_full.value,
            self._rejected_closed.value,
            self._rejected_disk_full.value,
            handed,
            lost,
        )
        delta = [a - b for a, b in zip(now, seen, strict=True)]
        count = sum(delta)
        if count <= 0:
            return
        parts = [f"{label}: {n}" for label, n in zip(_GAP_LABELS, delta, strict=True) if n]
        store = self._store
        first = self._gap_from
        try:
            receipt = store.record_gap(
                count,
                f"{count} records went to the fallback instead of the store ({'; '.join(parts)})",
                first_seq=first,
                last_seq=store.tree_size,
                queue_full=delta[0],
                closed=delta[1],
                disk_full=delta[2],
                handed_off=delta[3],
                lost=delta[4],
            )
        except (StoreBrokenError, StoreClosedError):
            self._gap_pending = True
            self._reopen()
            return
        except Exception as e:
            self._gap_pending = True
            if is_disk_full(e):
                self._disk_full = True
            return
        self._gap_seen = now
        self._gap_from = receipt.seq + 1
        self._system_records += 1
        self._gap_records += 1
        self._dirty = True
        if self._disk_full:
            self._clear_disk_full()

    def _clear_disk_full(self) -> None:
        """A successful write clears the disk-full latch, unless the file system still has no space.

        A full file system still takes writes into the free part of a file's last allocated
        block (a small gap record often fits), so success alone does not show the disk has
        room again; the latch stays while ``statvfs`` reports no block available.
        """
        try:
            free = os.statvfs(self._store.root).f_bavail
        except OSError:
            free = 1  # cannot tell: trust the write
        if free > 0:
            self._disk_full = False

    def _housekeeping(self) -> None:
        self._next_housekeeping = self._clock() + self.config.housekeeping_interval
        if self._dirty:
            self._sync()
        store = self._store
        if store.config.retention is not None:
            apply = getattr(store, "apply_retention", None)
            if callable(apply):
                try:
                    apply()
                except (StoreBrokenError, StoreClosedError):
                    self._reopen()
                except Exception:
                    pass  # retried at the next housekeeping
        self._check_disk()

    def _check_disk(self) -> None:
        try:
            st = os.statvfs(self._store.root)
        except OSError:
            return
        free = st.f_bavail * st.f_frsize
        total = st.f_blocks * st.f_frsize
        low_bytes = self.config.low_disk_bytes
        assert isinstance(low_bytes, int)
        self._low_disk = free < low_bytes or (total > 0 and free / total < self.config.low_disk_ratio)

    # ------------------------------------------------------------------ stopping

    def _shutdown(self) -> None:
        """The normal end: take everything left, store it, checkpoint, release the lock."""
        self._accepting = False
        self._gate = _CLOSED
        self._sealed = True
        self._attn = True
        # Take everything at once, with no I/O before _drained is set: a producer whose
        # put raced with the seal waits on _drained, and must not wait on the disk.
        self._backlog = self._take_all()
        self._drained.set()
        batch_max = self.config.batch_max
        while self._backlog:
            batch, self._backlog = self._backlog[:batch_max], self._backlog[batch_max:]
            self._write_batch(batch)
        self._record_gap()
        try:
            self._store.close()
        except (StoreBrokenError, StoreClosedError, OSError):
            return
        self._note_synced()
        self._close_ok = True

    def _take_all(self) -> list[Mapping[str, Any]]:
        out = []
        q = self._queue
        while True:
            try:
                out.append(q.get_nowait())
            except queue.Empty:
                return out

    def _die(self, error: BaseException) -> None:
        """The writer cannot go on: settle what it holds (DLQ, else on_lost), then stop."""
        self._dying = True
        self._death = error
        self._accepting = False
        self._gate = _CLOSED
        self._why_closed = f"audit writer for {self.store_root!r} died: {error!r}"
        self._sealed = True
        self._attn = True
        try:
            # Events are settled in batch order, so the unsettled ones are the batch's tail.
            unsettled = self._taken - (self._written + self._parked + self._handed_off + self._lost)
            batch = self._batch
            orphans = list(batch[len(batch) - unsettled :]) if 0 < unsettled <= len(batch) else []
            rest = _resolve(self._backlog + self._take_all())
            self._backlog = []
            self._drained.set()
            self._taken += len(rest)
            orphans.extend(rest)
            self._park(orphans, error)
        finally:
            self._drained.set()
            try:
                self._store.close()
            except Exception:
                pass

    def _finish(self) -> None:
        self._accepting = False
        self._gate = _CLOSED
        self._sealed = True
        self._attn = True
        self._drained.set()
        self._dlq.close()
        with self._control_lock:
            self._finished = True
            pending = list(self._control)
            self._control.clear()
        if self._current is not None:
            pending.append(self._current)
            self._current = None
        for cmd in pending:
            cmd.done.set()
        with self._progress:
            self._progress.notify_all()
        with _registry_lock:
            if _live.get(self.store_root) is self:
                del _live[self.store_root]


def _resolve(items: list[Any]) -> list[Mapping[str, Any]]:
    """The events of ``items``, with each deferred one built (on the writer thread).

    A producer may queue ``(build, data)`` instead of an event (see
    :meth:`AuditPipeline._front`): ``build(data)`` returns the event. Nothing else in the
    queue is a ``tuple``: :meth:`AuditHandle.emit` only queues mappings.
    """
    out: list[Mapping[str, Any]] = []
    append = out.append
    for x in items:
        if type(x) is tuple:
            try:
                x = x[0](x[1])
            except Exception as e:  # the builders never raise; a record is kept whatever happens
                x = {"$unrepresentable": "deferred event", "error": repr(e)}
        append(x)
    return out


def _refuse_live(root: str) -> None:
    other = _live.get(root)
    if other is not None and not other.closed:
        raise StoreLockedError(root, os.getpid())


# ------------------------------------------------------------------ the handle


class AuditHandle:
    """What producers use: :meth:`emit`, plus :meth:`redrive_dlq`, :meth:`metrics`, :meth:`health`.

    Cheap, shareable between threads; get it from :meth:`AuditPipeline.handle`.
    """

    __slots__ = ("_p",)

    def __init__(self, pipeline: AuditPipeline) -> None:
        self._p = pipeline

    @property
    def pipeline(self) -> AuditPipeline:
        """The pipeline this handle feeds."""
        return self._p

    def emit(self, role: RoleLike, event: Mapping[str, Any]) -> None:
        """Queues ``event`` for the writer without waiting on the disk (or on any lock held across I/O).

        The event is not copied: the caller must not change it afterwards. If it has no
        ``"ts"`` key, a shallow copy with ``"ts"`` = now (UTC µs) is queued instead, so
        the record (and a parked copy of it) keeps the time of the call.

        Args:
            role: who emits; needs the ``emit`` action.
            event: the event mapping.

        Raises:
            PermissionDeniedError: the role may not emit (counted ``denied``).
            QueueFullError: the queue is full (``.event`` is the event).
            PipelineClosedError: the pipeline is closed, its writer dead or stalled, or
                the disk full with ``reject_emit_when_disk_full`` (``.event`` is the event).
            TypeError: ``event`` is not a mapping.
        """
        p = self._p
        policy = p._policy
        if not (policy._open or policy.allows(role, _EMIT)):
            p._denied.add()
            raise PermissionDeniedError(policy.denial(role, _EMIT))
        if type(event) is not dict and not isinstance(event, Mapping):
            raise TypeError(f"an audit event must be a mapping, got {type(event).__name__}")
        busy = p._busy_since
        if not p._accepting or (busy is not None and p._clock() - busy > p._stall_timeout):
            if busy is not None:
                p._stall_seen(busy)
            p._rejected_closed.add()
            p._gap_pending = True
            raise PipelineClosedError(event, p._closed_reason())
        if p._disk_full and p._reject_disk_full:
            p._rejected_disk_full.add()
            p._gap_pending = True
            raise PipelineClosedError(event, p._disk_full_reason())
        q = p._queue
        if q.qsize() >= p._capacity:
            p._rejected_full.add()
            p._gap_pending = True
            raise QueueFullError(event, f"audit queue of {p.store_root!r} is full ({p._capacity} events)")
        item = event if "ts" in event else {**event, "ts": _time_ns() // 1000}
        q.put(item)
        if p._attn and not p._settle(item):
            raise PipelineClosedError(event, p._why_closed)
        p._accepted.add()

    def flush(self, timeout: float | None = None) -> bool:
        """Same as :meth:`AuditPipeline.flush` (no role needed)."""
        return self._p.flush(timeout)

    def redrive_dlq(self, role: RoleLike, *, timeout: float | None = None) -> int:
        """Appends every parked event to the store again, keeping its original ``ts``; at least once.

        Runs on the writer thread (ingestion waits meanwhile). Crash-safe: killed at any
        point, nothing parked is lost (some events may be stored twice).

        Args:
            role: who asks; needs the ``administer`` action.
            timeout: seconds to wait; ``None`` waits as long as the writer lives.

        Returns:
            How many parked events were stored.

        Raises:
            PermissionDeniedError: the role may not administer.
            PipelineClosedError: the pipeline is closed or its writer dead.
            TimeoutError: the redrive did not finish in time (it goes on).
            OSError, StoreBrokenError: the store or the DLQ failed; entries not stored
                stay parked.
        """
        p = self._p
        if not p._policy.allows(role, _ADMINISTER):
            p._denied.add()
            raise PermissionDeniedError(p._policy.denial(role, _ADMINISTER))
        return p._redrive(timeout).replayed

    def metrics(self) -> dict[str, Any]:
        """A snapshot of the pipeline's counters; any thread, no role, never waits on the writer.

        Once flushed, with nothing else in flight::

            offered  == accepted + rejected_full + rejected_closed + rejected_disk_full
            accepted == written + parked + handed_off + lost
            parked   == redriven + parked_now

        ``denied`` emits are not ``offered``. ``written`` counts user events stored by
        normal writes; redriven ones are in ``redriven`` (this run's parked events) and
        ``redriven_total`` (any run's). ``system_records`` counts ``$sys`` records the
        pipeline wrote (``gap_records`` of them gaps). ``dlq_entries`` is what waits in
        the DLQ on disk, whichever run parked it. ``write_latency`` is the time each
        batch took, retries included (see :class:`~quipu_logging.metrics.LatencyHistogram`).

        Returns:
            A dict of plain values.
        """
        p = self._p
        store = p._store
        accepted = p._accepted.value
        full = p._rejected_full.value
        closed = p._rejected_closed.value
        disk_full = p._rejected_disk_full.value
        return {
            "offered": accepted + full + closed + disk_full,
            "accepted": accepted,
            "rejected_full": full,
            "rejected_closed": closed,
            "rejected_disk_full": disk_full,
            "denied": p._denied.value,
            "written": p._written,
            "parked": p._parked,
            "redriven": p._redriven,
            "parked_now": p._parked_now,
            "handed_off": p._handed_off,
            "lost": p._lost,
            "system_records": p._system_records,
            "gap_records": p._gap_records,
            "retries": p._retries,
            "store_reopens": p._reopens,
            "redriven_total": p._redriven_total,
            "dlq_entries": p._dlq_entries,
            "queue_depth": p._queue.qsize(),
            "queue_capacity": p._capacity,
            "batches": p._batches,
            "fsyncs": p._fsyncs_before + store.fsyncs,
            "write_latency": p._latency.snapshot(),
        }

    def health(self) -> dict[str, Any]:
        """The pipeline's health; any thread, no role, never waits on the writer.

        Returns:
            ``writer_alive``, ``disk_full`` (the latch), ``low_disk`` (below
            ``low_disk_bytes`` or ``low_disk_ratio`` free at the last check), ``stalled``
            (a batch is taking longer than ``stall_timeout``), ``closed``, and
            ``status``: ``"unhealthy"`` when the writer is not alive, stalled, or the
            disk is full (records cannot be stored: they go to the DLQ or the fallback),
            ``"degraded"`` when the disk is low or events wait in the DLQ, else ``"ok"``.
        """
        p = self._p
        alive = p._thread.is_alive() and not (p._foreign or p._finished or p._dying)
        busy = p._busy_since
        stalled = busy is not None and p._clock() - busy > p._stall_timeout
        if stalled:
            assert busy is not None
            p._stall_seen(busy)
        if not alive or stalled or p._disk_full:
            status = "unhealthy"
        elif p._low_disk or p._dlq_entries > 0:
            status = "degraded"
        else:
            status = "ok"
        return {
            "writer_alive": alive,
            "disk_full": p._disk_full,
            "low_disk": p._low_disk,
            "stalled": stalled,
            "closed": p.closed,
            "status": status,
        }
