"""``AuditHandler``: the ``logging.Handler`` that feeds the audit pipeline.

The contract is DESIGN §7. In short, ``emit``:

1. never raises into the application; its own errors go through :meth:`handleError`
   once, and that output never contains the audit payload;
2. never changes the ``LogRecord`` other handlers see (it only reads it);
3. freezes the record at call time through its formatter's ``to_mapping`` (the message
   is ``getMessage()``, containers in extras are copied, other objects are rendered by the
   writer later); for the common record, whose values are all plain, a shallow copy of
   its attributes is that snapshot, and the writer thread runs ``to_mapping`` on it later
   (the fast path of :meth:`AuditHandler.handle`: same stored record, less work on the
   logging thread);
4. cuts string fields longer than ``max_field_chars`` and lists them under
   ``"$truncated": {field: original_length}``;
5. enqueues without waiting; when the pipeline rejects the record (queue full, closed,
   writer dead or stalled, disk full, role denied) the **original record** goes to the
   fallback handler exactly once, synchronously, and is counted:
   ``rejected == fallback_ok + fallback_failed`` in :meth:`AuditHandler.metrics`;
6. when called re-entrantly (from the pipeline's writer thread, from inside the fallback,
   from a signal handler or a ``__del__`` that interrupted a logging call) or during
   interpreter shutdown, goes straight to the fallback (a thread-local flag): no deadlock,
   no recursion. A record logged from inside the fallback itself is written to the
   process's stderr file descriptor as one JSON line.

``handle()`` is overridden so producers never serialise on the handler lock; filters
still run, including 3.12's filters that return a replacement record.

Sharing and lifetime: every live handler naming one store root (by real path) shares one
:class:`~quipu_logging.AuditPipeline`; the last :meth:`~AuditHandler.close` closes it. A
``dictConfig`` reconfiguration closes the old handlers first, so the new ones open a new
pipeline on the same root, with their new options. The pipeline closes itself at exit
(``atexit``, before ``logging.shutdown``), so a program that never closes its handlers
still leaves every accepted record durable.

When the store cannot be opened for environmental reasons (another process holds its
writer lock, a permission problem), the handler is still built, so ``dictConfig`` does
not crash the application: it says so once on stderr, naming the root and the lock
holder's pid, and sends its records to the fallback. In a child process after
``os.fork()`` the inherited handler never writes the parent's store: the child's records
go to the fallback with one warning. With ``shards=``, ``root`` is a store set instead
(``_sharded.py``): every process, forked children included, takes a shard of its own at
its first record. Warnings about diverted records are written to
stderr at most once a minute per handler and reason, with a count of those held back.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
import time
import traceback
import weakref
from collections.abc import Callable, Mapping
from types import FrameType
from typing import Any, Final

from . import _sharded
from .errors import ConfigError, PermissionDeniedError, PipelineClosedError, QueueFullError
from .formatter import _N_STD, _STD_ATTRS, CORE_KEYS, TRUNCATED, AuditJsonFormatter, check_formatter_options
from .metrics import Counter
from .pipeline import AuditHandle, AuditPipeline, PipelineConfig, _in_audit_path
from .store import StoreConfig, SyncPolicy
from .store._checkpoint import Signer
from .store._set import parse_shards_option

__all__ = ["AuditHandler"]

_WARN_INTERVAL: Final = 60.0
_THREAD_PREFIX: Final = "quipu-"
_HANDLER_OPTIONS: Final = (
    "root",
    "pipeline",
    "queue_size",
    "fallback",
    "sync",
    "role",
    "flush_timeout",
    "max_field_chars",
    "shards",
    "signing_key",
    "level",
)
_DEFAULT_QUEUE_SIZE: Final = 4096
_DEFAULT_SYNC: Final = "group"

# Every LogRecord attribute (plus what Formatter.format adds): an event field with one of
# these names is not copied back onto a record rebuilt from an event.
_RECORD_ATTRS: Final = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}

# The fast path (see AuditHandler.handle). LogRecord.__init__ sets the same attributes in
# the same order every time; makeRecord's extras and what filters add come after them.
_LogRecord: Final = logging.LogRecord
_LAST_STD: Final = _STD_ATTRS[-1]
# Values the writer may read later unchanged: immutable, and str() of them runs no user
# code. Exact types: a subclass may be mutable or have a __str__ of its own.
_PLAIN: Final[frozenset[type]] = frozenset({str, int, float, bool, type(None)})
_FILTER_GIVES_RECORD: Final = sys.version_info >= (3, 12)  # Filterer.filter returns the record
_NOT_PLAIN: Final = (object(),)  # stands for arguments that are not a tuple
_LAST_POS: Final = _N_STD - 1
# Called directly, these skip reversed()'s lookup of __reversed__ and its bound method.
_dict_reversed: Final = dict.__reversed__
# How many keys a reverse dict iterator has left (typeshed does not know the method).
_length_hint: Final[Callable[[Any], int]] = type(reversed({})).__length_hint__  # type: ignore[attr-defined]
_new_record: Final = _LogRecord.__new__
_in_audit_path_get: Final = _in_audit_path.get

_REASONS: Final = (
    "full",
    "closed",
    "denied",
    "error",
    "reentrant",
    "finalizing",
    "forked",
    "unavailable",
)


class _Local(threading.local):
    """Per-thread state of the re-entrancy guard.

    ``busy`` maps ``id(handler)`` to where this thread is in that handler: 1 inside
    ``emit``, 2 inside its fallback (absent: outside). Per handler, so one AuditHandler can
    serve as another's fallback. ``pipeline_thread``: whether this is one of the
    pipeline's own threads (``None`` until first looked at).

    The fast path of :meth:`AuditHandler.handle` does not look at this (a thread-local
    lookup costs more than the rest of its checks together): it reads the context variable
    ``_in_audit_path``, which the writer thread sets for itself and :meth:`AuditHandler.emit`
    and the fallback set while they run, so a record logged there takes ``emit``, which
    looks here.
    """

    pipeline_thread: bool | None = None

    def __init__(self) -> None:
        self.busy: dict[int, int] = {}


_local = _Local()

# Bumped in a forked child: handlers built before the fork compare it with their own.
_fork_generation = 0


def _restore(busy: dict[int, int], key: int, previous: int | None) -> None:
    if previous is None:
        busy.pop(key, None)
    else:
        busy[key] = previous


def _write_stderr(text: str) -> None:
    """Writes ``text`` to stderr; never raises. Safe in a signal handler that interrupted a
    write to ``sys.stderr``: it goes to the file descriptor when there is one."""
    try:
        stream = sys.stderr
        if stream is None:
            return
        try:
            fd = stream.fileno()
        except (AttributeError, OSError, ValueError):
            fd = -1
        if fd >= 0:
            data = text.encode("utf-8", "backslashreplace")
            while data:
                n = os.write(fd, data)
                data = data[n:]
        else:
            stream.write(text)
            stream.flush()
    except Exception:
        pass


class _StderrJsonHandler(logging.Handler):
    """The default fallback: one JSON line per record on the *current* ``sys.stderr``.

    Errors propagate, so the AuditHandler counts them as ``fallback_failed``.
    """

    terminator = "\n"

    def __init__(self, formatter: logging.Formatter) -> None:
        super().__init__()
        self.setFormatter(formatter)

    def emit(self, record: logging.LogRecord) -> None:
        stream = sys.stderr
        if stream is None:
            raise OSError("sys.stderr is gone")
        stream.write(self.format(record) + self.terminator)
        stream.flush()

    def flush(self) -> None:
        stream = sys.stderr
        if stream is not None:
            try:
                stream.flush()
            except Exception:
                pass


class _Shared:
    """One pipeline shared by every live handler of one store root in this process."""

    def __init__(self, root: str, key: tuple[str, int, str | None]) -> None:
        self.root = root
        self.key = key
        self.pipeline: AuditPipeline | None = None
        self.handlers: list[weakref.ref[AuditHandler]] = []

    def on_lost(self, event: Any, error: BaseException) -> None:
        """Binds the pipeline's ``on_lost`` to the oldest live handler's fallback."""
        for ref in list(self.handlers):
            handler = ref()
            if handler is not None:
                handler._hand_off_lost(event, error)
                return
        raise RuntimeError("no live AuditHandler to take the event") from error


def _hand_off_through(ref: weakref.ref[AuditHandler]) -> Callable[[Any, BaseException], None]:
    def on_lost(event: Any, error: BaseException) -> None:
        handler = ref()
        if handler is None:
            raise RuntimeError("no live AuditHandler to take the event") from error
        handler._hand_off_lost(event, error)

    return on_lost


_registry_lock = threading.Lock()
_registry: dict[str, _Shared] = {}
# Every AuditHandler alive: a fork or the interpreter's exit turns their fast paths off.
_handlers: weakref.WeakSet[AuditHandler] = weakref.WeakSet()
_exiting = False


def _stop_fast_paths() -> None:
    for handler in list(_handlers):
        handler._front = None


def _at_exit() -> None:
    """Runs before the pipelines close at exit (atexit is last in, first out): from here on
    every record takes the complete path, which knows about finalisation."""
    global _exiting
    _exiting = True
    _stop_fast_paths()


atexit.register(_at_exit)


def _after_fork_in_child() -> None:
    global _fork_generation
    _fork_generation += 1
    _stop_fast_paths()
    # The child owns none of its parent's pipelines; a handler configured in the child
    # starts afresh (and meets the parent's writer lock).
    _registry.clear()
    global _registry_lock
    _registry_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _lookup_handler(name: str) -> logging.Handler | None:
    finder = getattr(logging, "getHandlerByName", None)
    if finder is not None:  # Python 3.12+
        found: logging.Handler | None = finder(name)
        return found
    handlers = getattr(logging, "_handlers", None)  # weak dict of named handlers, older versions
    if handlers is None:  # pragma: no cover - always there in CPython
        return None
    try:
        found = handlers.get(name)
    except Exception:  # pragma: no cover - defensive: a weak dict changing under us
        return None
    return found if isinstance(found, logging.Handler) else None


def _describe(handler: logging.Handler) -> str:
    name = handler.get_name()
    kind = type(handler).__name__
    return f"handler {name!r} ({kind})" if name else kind


class AuditHandler(logging.Handler):
    """Sends every record it handles into a tamper-evident audit store, never waiting on disk.

    Args:
        root: the store directory (created when missing). Exactly one of ``root`` and
            ``pipeline``.
        pipeline: an :class:`~quipu_logging.AuditPipeline` you started and will close
            yourself (``queue_size`` and ``sync`` then belong to it; if it has no
            ``on_lost``, the handler binds it to its fallback).
        queue_size: capacity of the pipeline's bounded queue.
        fallback: where rejected records go: a ``logging.Handler``; the name of another
            handler (resolved when first needed, so ``dictConfig`` may build them in any
            order; ``"cfg://handlers.NAME"`` works too); a stream such as
            ``ext://sys.stderr``; or ``None``: one JSON line per record on stderr.
        sync: the store's :class:`~quipu_logging.SyncPolicy` (``always``, ``every:N``,
            ``group:N:MS``, ``group`` = ``group:1000:20``, ``os``).
        role: the role the records are emitted as (see ``PermissionPolicy``).
        flush_timeout: seconds :meth:`flush` and :meth:`close` wait by default.
        max_field_chars: longer string (and bytes) fields are cut to this length and listed
            under ``"$truncated"``; ``None`` keeps them whole.
        shards: ``"auto"`` or a number makes ``root`` a store set for multi-process
            servers: every process (a forked child, the parent of forked workers, a
            spawned worker) takes the first free single-writer shard at its first record
            (see README, "Multi-process servers"). The number is the most shards the set
            may have, fixed when the set is created; ``"auto"`` = the larger of 8 and
            2 x CPU count. ``None``: ``root`` is one store, written by this process only.
        signing_key: path of a PEM Ed25519 private key (``pip install
            'quipu_logging[crypto]'``) that signs every checkpoint the store writes (on seal,
            after retention, on close); ``None`` writes unsigned checkpoints. An unreadable
            key is a ``ConfigError`` here, at configuration time.
        level: the handler's level.
        **formatter_options: :class:`~quipu_logging.AuditJsonFormatter` keywords for the
            records' shape (``static_fields``, ``rename_fields``, ...). A formatter set
            later with ``setFormatter`` (``dictConfig``'s ``formatter`` key) replaces it
            when it is an ``AuditJsonFormatter``; any other formatter only serves
            ``format()`` and leaves the stored records as they are.

    Raises:
        ConfigError: invalid options, a misspelt keyword, both or neither of ``root`` and
            ``pipeline``, or options conflicting with a live handler on the same root.
    """

    # Slots, not the instance __dict__, hold this class's state. With logging.Handler's own
    # attributes the dict would have over 30 keys, past CPython's shared-key limit: logging's
    # callHandlers() then looks up hdlr.handle without specialising on every record (~250
    # instructions), and each self._front costs more too. The dict keeps Handler's few.
    __slots__ = (
        "_audit_closed",
        "_closed_set",
        "_config_section",
        "_counters",
        "_default_fallback",
        "_fallback",
        "_fallback_spec",
        "_front",
        "_generation",
        "_handle",
        "_mapper",
        "_owned_fallback",
        "_pid",
        "_pipeline",
        "_set_handle",
        "_shared",
        "_warned",
        "flush_timeout",
        "max_field_chars",
        "queue_size",
        "role",
        "root",
        "signing_key",
        "sync",
        "unavailable",
    )

    def __init__(
        self,
        root: str | os.PathLike[str] | None = None,
        *,
        pipeline: AuditPipeline | None = None,
        queue_size: int = _DEFAULT_QUEUE_SIZE,
        fallback: Any = None,
        sync: str | SyncPolicy = _DEFAULT_SYNC,
        role: str = "app",
        flush_timeout: float = 10.0,
        max_field_chars: int | None = 65536,
        shards: Any = None,
        signing_key: str | os.PathLike[str] | None = None,
        level: int | str = logging.NOTSET,
        **formatter_options: Any,
    ) -> None:
        check_formatter_options(formatter_options, _HANDLER_OPTIONS, what="AuditHandler")
        _check_args(root, pipeline, queue_size, sync, role, flush_timeout, max_field_chars, shards)
        if signing_key is not None:
            if pipeline is not None:
                raise ConfigError(
                    "AuditHandler: signing_key belongs to the pipeline you passed; set it in its StoreConfig"
                )
            if not isinstance(signing_key, (str, os.PathLike)) or not os.fspath(signing_key):
                raise ConfigError(
                    f"AuditHandler: signing_key must be the path of a PEM file, got {signing_key!r}"
                )
        _check_fallback(fallback)
        audit_formatter = AuditJsonFormatter(**formatter_options)
        super().__init__(level)
        self.role = role
        self.flush_timeout = float(flush_timeout)
        self.max_field_chars = max_field_chars
        self.queue_size = queue_size
        self.sync = str(SyncPolicy.parse(sync))
        self.signing_key = None if signing_key is None else os.path.realpath(os.fspath(signing_key))
        if self.signing_key is not None:
            Signer(self.signing_key)  # load it now: a bad key is a ConfigError at configuration time
        self.formatter = audit_formatter
        self._mapper = audit_formatter
        self._fallback_spec = _config_name(fallback) if isinstance(fallback, Mapping) else fallback
        self._fallback: logging.Handler | None = None
        # A fallback named in the same dictConfig call may be built after this handler, and
        # nothing but that call's configuration refers to it if no logger uses it: keep the
        # configuration's handlers section, where dictConfig puts the built handler, so it
        # stays alive until it is first needed.
        self._config_section: Mapping[Any, Any] | None = None
        if isinstance(self._fallback_spec, str):
            self._config_section = _dictconfig_handlers()
        self._default_fallback: _StderrJsonHandler | None = None
        self._owned_fallback: logging.Handler | None = None
        self._generation = _fork_generation
        self._pid = os.getpid()
        self._audit_closed = False
        self._shared: _Shared | None = None
        self._set_handle: _sharded.ShardedHandle | None = None
        self._closed_set: _sharded.ShardedHandle | None = None
        self._handle: AuditHandle | None = None
        self._pipeline: AuditPipeline | None = None
        self.unavailable: str | None = None
        """Why this handler has no pipeline (the store could not be opened), else ``None``."""
        self.root: str | None = None
        self._counters = {
            name: Counter()
            for name in (
                "rejected",
                "fallback_ok",
                "fallback_failed",
                "truncated",
                "handler_errors",
                *(f"diverted_{r}" for r in _REASONS),
            )
        }
        self._warned: dict[str, tuple[float, int]] = {}
        # The fast path's state (see handle()): None sends every record the complete way.
        self._front: tuple[Any, ...] | None = None
        if pipeline is not None:
            self._pipeline = pipeline
            self._handle = pipeline.handle()
            self.root = str(pipeline.store_root)
            if pipeline._on_lost is None:
                # Nobody takes what the store and the DLQ both refuse: this handler's fallback
                # does (DESIGN §6), through a weak reference so the pipeline keeps no handler alive.
                pipeline.set_on_lost(_hand_off_through(weakref.ref(self)))
        else:
            assert root is not None
            self.root = os.path.realpath(os.fspath(root))
            if shards is not None:
                self._attach_set(self.root, shards)  # shard mode: no fast path (no pipeline yet)
            else:
                self._attach(self.root)
        _handlers.add(self)
        self._update_front()

    # ------------------------------------------------------------------ pipeline sharing

    def _attach(self, root: str) -> None:
        key = (self.sync, self.queue_size, self.signing_key)
        with _registry_lock:
            shared = _registry.get(root)
            if shared is not None and not any(ref() is not None for ref in shared.handlers):
                # Orphaned: its handlers were dropped without close() (say a dictConfig call
                # that failed half-way). Reuse its pipeline if the options agree, else replace it.
                if shared.key != key:
                    del _registry[root]
                    if shared.pipeline is not None:
                        shared.pipeline.close(timeout=self.flush_timeout)
                    shared = None
            if shared is not None and shared.key != key:
                raise ConfigError(
                    f"AuditHandler: another live handler writes {root!r} with sync={shared.key[0]!r}, "
                    f"queue_size={shared.key[1]}, signing_key={shared.key[2]!r}; this one asks for "
                    f"sync={key[0]!r}, queue_size={key[1]}, signing_key={key[2]!r}. Handlers sharing a "
                    "store root share one pipeline: give them the same options, or close the other "
                    "handler first"
                )
            if shared is None:
                shared = _Shared(root, key)
                try:
                    shared.pipeline = AuditPipeline.start(
                        StoreConfig(root=root, sync=self.sync, signing_key=self.signing_key),
                        config=PipelineConfig(queue_size=self.queue_size),
                        on_lost=shared.on_lost,
                    )
                except ConfigError:
                    raise
                except Exception as exc:
                    self._mark_unavailable(root, exc)
                    return
                _registry[root] = shared
            shared.handlers.append(weakref.ref(self))
            self._shared = shared
            pipeline = shared.pipeline
            assert pipeline is not None
            self._pipeline = pipeline
            self._handle = pipeline.handle()

    def _attach_set(self, root: str, shards: Any) -> None:
        """Joins this process's handle on the store set ``root``; no shard is taken yet."""
        try:
            handle = _sharded.attach(
                root,
                shards=shards,
                sync=self.sync,
                queue_size=self.queue_size,
                on_lost=self._hand_off_lost,
                signing_key=self.signing_key,
            )
        except ConfigError:
            raise
        except Exception as exc:
            self._mark_unavailable(root, exc)
            return
        self._set_handle = handle
        self._handle = handle

    def _mark_unavailable(self, root: str, exc: BaseException) -> None:
        pid = getattr(exc, "pid", None)
        if pid is not None and pid == os.getpid():
            why = (
                "this process already writes it through an AuditPipeline or AuditStore opened "
                "elsewhere; pass that pipeline as AuditHandler(pipeline=...) to share it"
            )
        elif pid is not None:
            why = (
                f"process {pid} holds its writer lock (a store root has exactly one writer process: "
                "give each process its own root)"
            )
        else:
            why = f"{type(exc).__name__}: {exc}"
        self.unavailable = f"cannot open audit store {root!r} for writing: {why}"
        _write_stderr(
            f"quipu_logging: {self.unavailable}. This AuditHandler (pid {os.getpid()}) sends its "
            "records to its fallback until logging is configured again.\n"
        )

    def _detach(self) -> AuditPipeline | None:
        """Drops this handler's share; returns the pipeline when it was the last one."""
        shared = self._shared
        self._shared = None
        if shared is None:
            return None
        with _registry_lock:
            shared.handlers = [r for r in shared.handlers if r() is not None and r() is not self]
            if shared.handlers or _registry.get(shared.root) is not shared:
                return None
            del _registry[shared.root]
            return shared.pipeline

    # ------------------------------------------------------------------ the hot path

    def handle(self, record: logging.LogRecord) -> Any:
        """Filters ``record`` and emits it, without taking the handler lock.

        The common record takes a fast path that does on the calling thread only what
        must happen there. When the record's message is a ``str``, it carries no
        exception, and its arguments and extras are all ``str``, ``int``, ``float``,
        ``bool`` or ``None``, a shallow copy of its attributes is already a snapshot of the
        call: that copy is queued, and the writer thread builds the stored record from it
        with the formatter of the moment of the call, the record :meth:`emit` would have
        built here. Anything else (an exception, a container or other object among the
        arguments or extras, a ``dict`` message, a ``LogRecord`` subclass, a formatter
        subclass, a full queue, a closed or stalled pipeline, a forked child, a call from
        the writer thread or from inside this handler) takes :meth:`emit`, which builds
        the record here and handles every refusal.

        Returns:
            What ``filter()`` returned: false when a filter dropped the record; on 3.12+ the
            (possibly replaced) record otherwise.
        """
        if self.filters:
            rv: Any = self.filter(record)
            if not rv:
                return rv
            if isinstance(rv, _LogRecord):
                record = rv
        else:
            rv = record if _FILTER_GIVES_RECORD else True
        front = self._front
        if front is not None and type(record) is _LogRecord and not _in_audit_path_get():
            attrs = record.__dict__
            # The builtins in locals: LOAD_FAST instead of LOAD_GLOBAL's two dict-version
            # checks, for the dozen uses below (~50 instructions a record; calling the
            # local type still specialises). In the arguments, int is tested before the
            # frozenset: the common non-str argument, and an identity test costs less
            # than CONTAINS_OP (~100 instructions an int).
            type_ = type
            str_ = str
            if type_(attrs["msg"]) is str_ and attrs["exc_info"] is None:
                args = attrs["args"]
                if type_(args) is tuple and len(args) == 2:
                    # Two arguments, the common call, unpacked: a loop would make and free
                    # a tuple iterator (~60 instructions a record).
                    a, b = args
                    plain = (type_(a) is str_ or type_(a) is int or type_(a) in _PLAIN) and (
                        type_(b) is str_ or type_(b) is int or type_(b) in _PLAIN
                    )
                else:
                    if type_(args) is not tuple:
                        args = _NOT_PLAIN if args else ()
                    plain = True
                    for value in args:
                        if (
                            type_(value) is not str_
                            and type_(value) is not int
                            and type_(value) not in _PLAIN
                        ):
                            plain = False
                            break
                if plain:
                    # The extras are the attributes after the last one LogRecord.__init__
                    # sets, and that one must still be where __init__ put it (else an
                    # attribute was deleted, and positions say nothing): walk the keys
                    # from the end, checking values, until it turns up, then ask the
                    # iterator how many keys are left before it. A plain value continues
                    # the loop at once, and is indexed again rather than kept in a local
                    # (for a str, one store and one load fewer).
                    keys = _dict_reversed(attrs)
                    for key in keys:
                        if key is not _LAST_STD:
                            if type_(attrs[key]) is str_ or type_(attrs[key]) in _PLAIN:
                                continue
                            break
                        if _length_hint(keys) == _LAST_POS:
                            p, q, capacity, accepted, build = front
                            gate = p._gate
                            # While a batch runs, gate is its stall deadline in wall-clock
                            # time, compared with the time logging already read for the
                            # record: no clock call here. A filter that broke "created"
                            # (gone, or not a number) sends the record to emit(). The
                            # comparison jumps at once (a specialised COMPARE_OP on 3.11)
                            # and gate becomes None when it passes: no flag to store.
                            if gate is not None:
                                try:
                                    if attrs["created"] < gate:
                                        gate = None
                                except Exception:  # never into the caller: emit() decides
                                    pass
                            if gate is None and q.qsize() < capacity:
                                item = (build, attrs.copy())
                                q.put(item)
                                if p._attn and not p._settle(item):
                                    self._divert(record, "closed")
                                    return rv
                                # accepted is an itertools.repeat counting down (metrics.Counter)
                                next(accepted)
                                return rv
                        break
        self.emit(record)
        return rv

    def _update_front(self) -> None:
        """(Re)computes the fast path's state; ``None`` when records must take :meth:`emit`."""
        front = None
        pipeline = self._pipeline
        mapper = self._mapper
        if (
            self._handle is not None
            and pipeline is not None
            and not self._audit_closed
            and not _exiting
            and self._generation == _fork_generation
            and type(self).emit is AuditHandler.emit
            and mapper._deferrable
        ):
            base = pipeline._front(self.role)
            if base is not None:
                front = (*base, _Builder(self, mapper))
        self._front = front

    def emit(self, record: logging.LogRecord) -> None:
        """Hands ``record`` to the audit pipeline, or to the fallback; never raises.

        Args:
            record: the record; it is not modified.
        """
        try:
            busy = _local.busy
            key = id(self)
            if key in busy:
                self._divert(record, "reentrant")
                return
            reason = self._refusal(_local)
            if reason is not None:
                self._divert(record, reason)
                return
            busy[key] = 1
            token = _in_audit_path.set(True)
            try:
                try:
                    event = self._mapper.to_mapping(record, max_field_chars=self.max_field_chars)
                    if TRUNCATED in event:
                        self._counters["truncated"].add()
                except Exception:
                    self.handleError(record)
                    self._divert(record, "error")
                    return
                handle = self._handle
                if handle is None:
                    self._divert(record, "closed")
                    return
                try:
                    handle.emit(self.role, event)
                except QueueFullError:
                    self._divert(record, "full")
                except PipelineClosedError:
                    # A store set whose shards are all busy (or cannot be opened) says why itself.
                    shard_set = self._set_handle
                    busy_set = shard_set is not None and shard_set.unavailable is not None
                    self._divert(record, "unavailable" if busy_set else "closed")
                except PermissionDeniedError:
                    self._divert(record, "denied")
                except Exception:
                    self.handleError(record)
                    self._divert(record, "error")
            finally:
                _in_audit_path.reset(token)
                busy.pop(key, None)
        except Exception:
            # Only reachable if the bookkeeping itself failed (say during interpreter teardown).
            try:
                self.handleError(record)
            except Exception:
                pass

    def _refusal(self, local: _Local) -> str | None:
        """Why this record cannot go to the pipeline from here, or ``None`` when it can."""
        if self._generation != _fork_generation:
            if self._set_handle is None:
                return "forked"
            # A store set follows the fork: the child takes a shard of its own.
            self._generation = _fork_generation
        if self._handle is None:
            return "unavailable" if self.unavailable is not None else "closed"
        if sys.is_finalizing():
            return "finalizing"
        own = local.pipeline_thread
        if own is None:
            own = local.pipeline_thread = threading.current_thread().name.startswith(_THREAD_PREFIX)
        return "reentrant" if own else None

    # ------------------------------------------------------------------ the fallback

    def _divert(self, record: logging.LogRecord, reason: str) -> None:
        """Hands the original record to the fallback, exactly once, and counts it."""
        counters = self._counters
        counters["rejected"].add()
        counters[f"diverted_{reason}"].add()
        busy = _local.busy
        key = id(self)
        previous = busy.get(key)
        busy[key] = 2
        token = _in_audit_path.set(True)
        try:
            if previous == 2:
                # Logged from inside the fallback: the fallback would only recurse.
                self._last_resort(record)
            else:
                target = self._fallback_handler()
                self._warn(reason, target)
                target.handle(record)
            counters["fallback_ok"].add()
        except Exception:
            counters["fallback_failed"].add()
        finally:
            _in_audit_path.reset(token)
            _restore(busy, key, previous)

    def _fallback_handler(self) -> logging.Handler:
        """The fallback, resolved now if it was given by name."""
        target = self._fallback
        if target is not None:
            return target
        spec = self._fallback_spec
        if spec is None:
            target = self._stderr_handler()
        elif isinstance(spec, logging.Handler):
            target = spec
        elif isinstance(spec, str):
            name = spec[len("cfg://handlers.") :] if spec.startswith("cfg://handlers.") else spec
            found = _lookup_handler(name)
            section = self._config_section
            if found is None and section is not None:
                built = section.get(name)
                found = built if isinstance(built, logging.Handler) else None
            if found is None or found is self:
                self._warn(
                    "fallback-missing",
                    None,
                    f"the fallback handler {name!r} does not exist (yet); rejected records go to "
                    "stderr until it does",
                )
                return self._stderr_handler()
            target = found
        else:
            stream_handler = logging.StreamHandler(spec)
            stream_handler.setFormatter(self._mapper)
            self._owned_fallback = stream_handler
            target = stream_handler
        self._fallback = target
        self._config_section = None
        return target

    def _stderr_handler(self) -> _StderrJsonHandler:
        handler = self._default_fallback
        if handler is None:
            handler = self._default_fallback = _StderrJsonHandler(self._mapper)
        return handler

    def _last_resort(self, record: logging.LogRecord) -> None:
        """One JSON line on stderr's file descriptor, for records logged inside the fallback."""
        try:
            line = self._mapper.format(record)
        except Exception:
            line = f'{{"logger": {record.name!r}, "unformattable": true}}'
        stream = sys.stderr
        if stream is None:
            raise OSError("sys.stderr is gone")
        fd = stream.fileno()
        data = (line + "\n").encode("utf-8", "backslashreplace")
        while data:
            data = data[os.write(fd, data) :]

    def _hand_off_lost(self, event: Mapping[str, Any], error: BaseException) -> None:
        """``on_lost``: an event the store and the dead-letter queue both refused (writer thread).

        Raises when the fallback failed too, so the pipeline counts the event as lost.
        """
        record = _record_from_event(event, error)
        busy = _local.busy
        key = id(self)
        previous = busy.get(key)
        busy[key] = 2
        token = _in_audit_path.set(True)
        try:
            target = self._fallback_handler()
            if self._set_handle is None:
                self._warn("lost", target, f"the store and its dead-letter queue refused a record ({error})")
            # else: records waiting for a shard that could not be taken; the set handle has said
            # why on stderr itself (one line per attempt).
            target.handle(record)
        finally:
            _in_audit_path.reset(token)
            _restore(busy, key, previous)

    def _warn(self, reason: str, target: logging.Handler | None, text: str | None = None) -> None:
        """At most one warning per reason per minute on stderr; counts the ones held back."""
        if reason == "unavailable" and self._set_handle is not None:
            return  # the set handle prints its own line per attempt to take a shard (_sharded.py)
        now = time.monotonic()
        last, held = self._warned.get(reason, (-_WARN_INTERVAL, 0))
        if now - last < _WARN_INTERVAL:
            self._warned[reason] = (last, held + 1)
            return
        self._warned[reason] = (now, 0)
        if text is None:
            text = _REASON_TEXT.get(reason, reason).format(root=self.root, pid=os.getpid(), ppid=self._pid)
        where = f"; they go to the fallback ({_describe(target)})" if target is not None else ""
        more = f" [{held} similar warnings held back]" if held else ""
        _write_stderr(f"quipu_logging: AuditHandler for {self.root!r}: {text}{where}{more}\n")

    # ------------------------------------------------------------------ errors

    def handleError(self, record: logging.LogRecord) -> None:
        """Reports an error of this handler on stderr, without the record's content.

        Like ``logging.Handler.handleError`` (silent when ``logging.raiseExceptions`` is
        false), but the message and arguments are withheld: they belong to the audit
        trail, not to a console.
        """
        self._counters["handler_errors"].add()
        if not logging.raiseExceptions:
            return
        try:
            exc = sys.exc_info()[1]
            lines = ["--- Logging error in quipu_logging.AuditHandler ---\n"]
            if exc is not None:
                lines.extend(traceback.format_exception(type(exc), exc, exc.__traceback__))
            lines.append(
                f"Record from logger {record.name!r} at {record.pathname}:{record.lineno} "
                f"(level {record.levelname}); its message and arguments are withheld (audit data). "
                "The record went to the fallback handler.\n"
            )
            _write_stderr("".join(lines))
        except Exception:
            pass

    # ------------------------------------------------------------------ formatter

    def setFormatter(self, fmt: logging.Formatter | None) -> None:
        """Sets the formatter; an ``AuditJsonFormatter`` also shapes the stored records."""
        if fmt is None:
            fmt = AuditJsonFormatter()
        super().setFormatter(fmt)
        if isinstance(fmt, AuditJsonFormatter):
            self._mapper = fmt
            for owned in (self._default_fallback, self._owned_fallback):
                if owned is not None:
                    owned.setFormatter(fmt)
            if hasattr(self, "_front"):  # not while logging.Handler.__init__ runs
                self._update_front()

    # ------------------------------------------------------------------ flush / close

    def flush(self, timeout: float | None = None) -> bool:  # type: ignore[override]
        """Waits until every record this process handed to the pipeline is durable.

        Also flushes the fallback. Never raises.

        Args:
            timeout: seconds to wait; ``None`` means ``flush_timeout``.

        Returns:
            ``True`` when everything accepted so far is durable (or there was nothing to do).
        """
        try:
            ok = True
            handle = self._handle
            if handle is not None and self._generation == _fork_generation:
                ok = bool(handle.flush(self.flush_timeout if timeout is None else timeout))
            target = self._fallback or self._default_fallback
            if target is not None and target is not self:
                try:
                    target.flush()
                except Exception:
                    pass
            return ok
        except Exception:
            return False

    def close(self) -> None:
        """Closes the handler; the last live handler of a root closes its pipeline.

        The pipeline drains, syncs, writes one checkpoint and releases the store (waiting at
        most ``flush_timeout``). Idempotent; records handled afterwards go to the fallback.
        """
        self._front = None
        # logging.Handler.close takes logging's module lock: never while holding ours.
        super().close()
        if self._audit_closed:
            return
        self._audit_closed = True
        self._handle = None
        self._config_section = None
        set_handle, self._set_handle = self._set_handle, None
        if set_handle is not None:
            self._closed_set = set_handle  # metrics() after close still reports its counters
            # This process's shard only: a forked child never closes its parent's.
            try:
                _sharded.release(set_handle, self.flush_timeout)
            except Exception:
                self._warn("close", None, "closing the audit pipeline failed")
        elif self._generation != _fork_generation:
            # Inherited across fork: the parent's pipeline is not ours to close.
            self._shared = None
            return
        pipeline = self._detach()
        if pipeline is not None:
            try:
                pipeline.close(timeout=self.flush_timeout)
            except Exception:
                self._warn("close", None, "closing the audit pipeline failed")
        owned = self._owned_fallback
        if owned is not None:
            try:
                owned.flush()
            except Exception:
                pass

    # ------------------------------------------------------------------ introspection

    @property
    def pipeline(self) -> AuditPipeline | None:
        """The pipeline this handler feeds (``None`` when the store could not be opened)."""
        return self._pipeline

    def metrics(self) -> dict[str, Any]:
        """The pipeline's metrics merged with this handler's counters.

        Handler counters: ``rejected`` (records handed to the fallback) ``== fallback_ok +
        fallback_failed``; ``diverted_<reason>`` for each reason (``full``, ``closed``,
        ``denied``, ``error``, ``reentrant``, ``finalizing``, ``forked``, ``unavailable``);
        ``truncated`` (records with a cut field); ``handler_errors``. The pipeline's
        counters cover every handler sharing it.
        """
        out: dict[str, Any] = {}
        handle = self._handle
        if handle is None and self._pipeline is not None:
            try:
                handle = self._pipeline.handle()
            except Exception:
                handle = None
        if handle is None:
            handle = self._closed_set
        if handle is not None:
            try:
                out.update(handle.metrics())
            except Exception:
                pass
        for name, counter in self._counters.items():
            out[name] = counter.value
        return out

    def health(self) -> dict[str, Any]:
        """The pipeline's health, or ``status: unhealthy`` with the reason it has none."""
        handle = self._handle
        if handle is not None and self._generation == _fork_generation:
            try:
                return dict(handle.health())
            except Exception as exc:
                return {"status": "unhealthy", "writer_alive": False, "error": repr(exc)}
        reason = self.unavailable or ("forked" if self._generation != _fork_generation else "closed")
        return {"status": "unhealthy", "writer_alive": False, "error": reason}

    def __repr__(self) -> str:
        level = logging.getLevelName(self.level)
        return f"<{type(self).__name__} {self.root!r} ({level})>"


class _Builder:
    """Builds, on the writer thread, the event of a record the fast path queued.

    Called with the snapshot of the record's attributes (a ``dict`` nobody else holds);
    uses the formatter that was the handler's at the logging call. Never raises: the
    pipeline could then only keep a placeholder.
    """

    __slots__ = ("handler", "mapper")

    def __init__(self, handler: AuditHandler, mapper: AuditJsonFormatter) -> None:
        self.handler = handler
        self.mapper = mapper

    def __call__(self, attrs: dict[str, Any]) -> dict[str, Any]:
        handler = self.handler
        mapper = self.mapper
        limit = handler.max_field_chars
        try:
            event = None
            if mapper._plain and not attrs["exc_text"] and not attrs["stack_info"]:
                event = mapper._plain_mapping(attrs, limit)
            if event is None:
                record = _new_record(_LogRecord)
                record.__dict__ = attrs
                event = mapper.to_mapping(record, max_field_chars=limit)
        except Exception as exc:  # not expected: only plain values come this way
            event = {
                "level": str(attrs.get("levelname")),
                "levelno": attrs.get("levelno"),
                "logger": str(attrs.get("name")),
                "message": str(attrs.get("msg")),
                "message_error": f"{type(exc).__name__}: {exc}",
            }
            try:
                event["ts"] = round(attrs["created"] * 1_000_000)
            except Exception:
                pass  # a filter broke "created": the store stamps the time it appends
        if TRUNCATED in event:
            handler._counters["truncated"].add()
        return event


_REASON_TEXT: Final = {
    "full": "the audit queue is full: records are being diverted (raise queue_size if this persists)",
    "closed": "the audit pipeline is closed or its writer is not running: records are being diverted",
    "denied": "the role may not emit into this store: records are being diverted",
    "error": "a record could not be prepared (see the logging error above): it was diverted",
    "reentrant": (
        "a record was logged from inside the audit path (the writer thread, the fallback, or a "
        "signal handler or __del__ that interrupted a logging call): it was diverted"
    ),
    "finalizing": "the interpreter is shutting down: records are being diverted",
    "forked": (
        "this process (pid {pid}) was forked from pid {ppid} after the handler was configured; "
        "a child never writes its parent's store, so its records are diverted (configure "
        "logging again in the child to give it a store of its own)"
    ),
    "unavailable": (
        "the audit store (or every shard of the store set) could not be opened (see above): "
        "records are being diverted"
    ),
}


def _record_from_event(event: Mapping[str, Any], error: BaseException) -> logging.LogRecord:
    """A ``LogRecord`` carrying an event the pipeline lost, for a fallback handler."""
    source = event.get("source")
    if not isinstance(source, Mapping):
        source = {}
    ts = event.get("ts")
    created = ts / 1_000_000 if isinstance(ts, int) else time.time()
    attrs: dict[str, Any] = {
        key: value
        for key, value in event.items()
        if isinstance(key, str) and key.isidentifier() and key not in CORE_KEYS and key not in _RECORD_ATTRS
    }
    levelno = event.get("levelno")
    attrs.update(
        name=str(event.get("logger", "quipu_logging")),
        levelno=levelno if isinstance(levelno, int) else logging.WARNING,
        levelname=str(event.get("level", "WARNING")),
        msg=str(event.get("message", "")),
        args=None,
        created=created,
        msecs=(created - int(created)) * 1000,
        process=event.get("process"),
        threadName=event.get("thread"),
        filename=source.get("file", ""),
        funcName=source.get("func", ""),
        lineno=source.get("line", 0),
        exc_text=event.get("exc"),
        stack_info=event.get("stack"),
        quipu_lost=f"{type(error).__name__}: {error}",
    )
    return logging.makeLogRecord(attrs)


def _check_args(
    root: Any,
    pipeline: Any,
    queue_size: Any,
    sync: Any,
    role: Any,
    flush_timeout: Any,
    max_field_chars: Any,
    shards: Any,
) -> None:
    if (root is None) == (pipeline is None):
        raise ConfigError(
            "AuditHandler: give exactly one of root (a store directory) and pipeline (an AuditPipeline)"
        )
    if root is not None and not isinstance(root, (str, os.PathLike)):
        raise ConfigError(f"AuditHandler: root must be a directory path, got {root!r}")
    if root is not None and not os.fspath(root).strip():
        # "" would silently mean the current directory (an unset environment variable, say).
        raise ConfigError("AuditHandler: root is empty: give the directory of the audit store")
    if pipeline is not None:
        if not isinstance(pipeline, AuditPipeline):
            raise ConfigError(f"AuditHandler: pipeline must be an AuditPipeline, got {pipeline!r}")
        if queue_size != _DEFAULT_QUEUE_SIZE or sync != _DEFAULT_SYNC:
            raise ConfigError(
                "AuditHandler: queue_size and sync belong to the pipeline you passed; set them in "
                "PipelineConfig / StoreConfig instead"
            )
    if shards is not None:
        if pipeline is not None:
            raise ConfigError("AuditHandler: shards= goes with root= (a store set), not with pipeline=")
        parse_shards_option(shards, "AuditHandler: shards")
    if type(queue_size) is not int or queue_size < 1:
        raise ConfigError(f"AuditHandler: queue_size must be a positive integer, got {queue_size!r}")
    SyncPolicy.parse(sync)
    if not isinstance(role, str) or not role:
        raise ConfigError(f"AuditHandler: role must be a non-empty string, got {role!r}")
    if (
        isinstance(flush_timeout, bool)
        or not isinstance(flush_timeout, (int, float))
        or not flush_timeout > 0
    ):
        raise ConfigError(
            f"AuditHandler: flush_timeout must be a positive number of seconds, got {flush_timeout!r}"
        )
    if max_field_chars is not None and (type(max_field_chars) is not int or max_field_chars < 1):
        raise ConfigError(
            f"AuditHandler: max_field_chars must be a positive integer or None, got {max_field_chars!r}"
        )


def _dictconfig_handlers() -> Mapping[Any, Any] | None:
    """The ``handlers`` section of the ``dictConfig`` call building this handler, if any.

    ``DictConfigurator.configure`` (3.10 to 3.13) holds it in its local ``handlers`` and
    replaces each entry with the built handler.
    """
    try:
        frame: FrameType | None = sys._getframe(2)
    except ValueError:  # pragma: no cover - shallow stack
        return None
    suffix = os.path.join("logging", "config.py")
    for _ in range(16):
        if frame is None:
            return None
        code = frame.f_code
        if code.co_name == "configure" and code.co_filename.endswith(suffix):
            try:
                section = frame.f_locals.get("handlers")
            except Exception:  # pragma: no cover - defensive
                return None
            return section if isinstance(section, Mapping) else None
        frame = frame.f_back
    return None


def _config_name(spec: Mapping[Any, Any]) -> str | None:
    """The handler name of a ``dictConfig`` handler configuration, or ``None``.

    ``"cfg://handlers.NAME"`` naming a handler that ``dictConfig`` has not built yet
    arrives as that handler's configuration dict (a ``ConvertingDict``): its ``parent`` is
    our own configuration, whose ``parent`` is the ``handlers`` section, where the dict
    still sits under its name.
    """
    owner = getattr(spec, "parent", None)
    section = getattr(owner, "parent", None)
    if isinstance(section, dict):
        for name, value in dict.items(section):
            if value is spec and isinstance(name, str):
                return name
    return None


def _check_fallback(fallback: Any) -> None:
    if fallback is None or isinstance(fallback, (logging.Handler, str)):
        return
    if isinstance(fallback, Mapping) and _config_name(fallback) is not None:
        return
    if callable(getattr(fallback, "write", None)):
        return
    raise ConfigError(
        "AuditHandler: fallback must be a logging.Handler, a handler name, a stream or None, "
        f"got {fallback!r}"
    )
