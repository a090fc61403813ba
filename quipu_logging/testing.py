"""Helpers for testing code that writes an audit trail, without ``time.sleep``.

**Asserting what your application audited.** The ``audit_log`` pytest fixture (registered
through the ``pytest11`` entry point: installing quipu-logging makes it available in every
test) attaches an :class:`~quipu_logging.AuditHandler` writing a fresh store under
``tmp_path`` to the root logger for the duration of one test::

    def test_update_is_audited(client, audit_log):
        client.put("/docs/42", headers={"X-User": "alice"})
        audit_log.assert_audited(actor="alice", action="PUT", target="/docs/42")

:class:`AuditLog` is the same thing outside pytest (a context manager), and
:func:`temporary_store` opens a bare :class:`~quipu_logging.AuditStore` in a directory
removed afterwards. pytest is an optional import: this module works without it (the
fixture is then not defined).

**Holding the writer.** ``paused(pipeline)`` holds the writer thread so a test can fill
the queue, race a close, or look at counters while nothing is written::

    from quipu_logging.testing import paused

    with paused(pipeline):
        for i in range(pipeline.config.queue_size + 10):
            try:
                handle.emit("app", {"i": i})
            except QueueFullError:
                ...                 # the last 10 are rejected
    pipeline.flush()                # the writer runs again: the queued ones are stored

``wait_synced(pipeline, n)`` waits until the writer, on its own (no ``flush``), has
fsynced at least ``n`` records: the group-commit deadline of ``group:N:MS`` in
action.

Each accepts an :class:`~quipu_logging.AuditPipeline`, an
:class:`~quipu_logging.AuditHandle`, or anything with a ``pipeline`` attribute
holding one (an ``AuditHandler``).
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final

from ._types import VerifyReport
from .context import AuditContextFilter
from .errors import ConfigError
from .handler import AuditHandler
from .pipeline import AuditHandle, AuditPipeline
from .store import AuditStore, StoreConfig

if TYPE_CHECKING:
    from .structlog import AuditProcessor

try:
    import pytest
except ImportError:  # pragma: no cover - exercised in a subprocess by the tests
    _HAVE_PYTEST = False
else:
    _HAVE_PYTEST = True

__all__ = ["AuditLog", "paused", "temporary_store", "wait_synced"]
if _HAVE_PYTEST:
    __all__ += ["audit_log"]

_SHOWN: Final = 10


def _pipeline_of(obj: object) -> AuditPipeline:
    if isinstance(obj, AuditPipeline):
        return obj
    if isinstance(obj, AuditHandle):
        return obj.pipeline
    inner = getattr(obj, "pipeline", None)
    if isinstance(inner, AuditPipeline):
        return inner
    raise TypeError(f"expected an AuditPipeline, an AuditHandle or an object with a .pipeline, got {obj!r}")


@contextmanager
def paused(pipeline: object, *, timeout: float = 10.0) -> Iterator[None]:
    """Holds the pipeline's writer for the duration of the ``with`` block.

    On entry the writer finishes the batch it is writing (if any), then waits; the
    context manager returns once it does. Emits keep being accepted into the queue
    (up to its capacity) but nothing is written, synced or parked until the block
    exits. ``flush()`` inside the block times out (returns ``False``); ``close()``
    inside the block ends the hold, drains and closes as usual.

    Args:
        pipeline: the pipeline (or its handle, or an object with a ``.pipeline``).
        timeout: seconds to wait for the writer to reach the hold.

    Raises:
        PipelineClosedError: the pipeline is closed, its writer dead, or it did not
            reach the hold within ``timeout``.
    """
    release = _pipeline_of(pipeline)._hold(timeout)
    try:
        yield
    finally:
        release()


def wait_synced(pipeline: object, records: int, *, timeout: float = 5.0) -> bool:
    """Waits until the writer itself has fsynced at least ``records`` records.

    It never triggers a sync (unlike ``flush()``): it only watches the writer, so it
    proves a sync policy's background durability.

    Args:
        pipeline: the pipeline (or its handle, or an object with a ``.pipeline``).
        records: the tree size the writer's last own fsync must cover.
        timeout: seconds to wait.

    Returns:
        ``True`` once reached; ``False`` on timeout or when the writer stopped first.
    """
    return _pipeline_of(pipeline)._wait_synced(records, timeout)


@contextmanager
def temporary_store(**config: Any) -> Iterator[AuditStore]:
    """Opens a writable :class:`~quipu_logging.AuditStore` in a temporary directory.

    The store is closed and the directory removed when the block ends.

    Args:
        **config: :class:`~quipu_logging.StoreConfig` keywords other than ``root``
            (default ``sync="os"``: a throwaway store needs no fsyncs).

    Yields:
        The open store.
    """
    config.setdefault("sync", "os")
    with tempfile.TemporaryDirectory(prefix="quipu-test-") as tmp:
        store = AuditStore.open(StoreConfig(root=os.path.join(tmp, "audit"), **config))
        try:
            yield store
        finally:
            store.close()


def _level_number(level: int | str) -> int:
    number = logging.getLevelName(level.upper()) if isinstance(level, str) else level
    if isinstance(number, bool) or not isinstance(number, int):
        raise ConfigError(f"AuditLog: unknown level {level!r}")
    return number


class _Diverted(logging.Handler):
    """The fallback of an :class:`AuditLog`: keeps what the audit handler diverted."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _describe(record: dict[str, Any], keys: Iterable[str]) -> str:
    shown = {k: record.get(k, "<missing>") for k in keys}
    return f"seq {record.get('seq')}: {record.get('message')!r} " + ", ".join(
        f"{k}={v!r}" for k, v in shown.items()
    )


class AuditLog:
    """An :class:`~quipu_logging.AuditHandler` on a store of its own, attached to loggers.

    Use it as a context manager (or the ``audit_log`` pytest fixture): on entry the
    handler is added to each logger in ``loggers`` (default: the root logger) and a
    logger whose level would drop records below ``level`` is lowered to it; on exit
    everything is put back and the handler closed. The handler carries an
    :class:`~quipu_logging.AuditContextFilter` for ``context_fields``, so context your
    middleware sets with ``audit_context`` reaches the records as it would in production.

    Args:
        root: the store directory (created when missing; a fresh one per test).
        loggers: names of the loggers to attach to (``""`` is the root logger).
        level: records below this level are not audited.
        context_fields: the ``AuditContextFilter`` fields; ``()`` for none.
        **handler_options: other ``AuditHandler`` keywords (default ``sync="os"``).

    Attributes:
        root: the store directory.
        handler: the ``AuditHandler``.
        diverted: the records the handler handed to its fallback (a full queue, say):
            kept here instead of printed.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        loggers: Iterable[str] = ("",),
        level: int | str = logging.INFO,
        context_fields: Iterable[str] = ("actor", "request_id"),
        **handler_options: Any,
    ) -> None:
        self.root = Path(root)
        self._fallback = _Diverted()
        handler_options.setdefault("sync", "os")
        self._options = handler_options
        self._fields = tuple(context_fields)
        self._names = tuple(loggers)
        self._level = _level_number(level)
        self._saved: dict[logging.Logger, int] = {}
        self._closed = False
        self.handler = self._new_handler()

    def _new_handler(self) -> AuditHandler:
        handler = AuditHandler(self.root, fallback=self._fallback, **self._options)
        if self._fields:
            handler.addFilter(AuditContextFilter(fields=self._fields))
        return handler

    @property
    def diverted(self) -> list[logging.LogRecord]:
        """Records the handler could not store and handed to its fallback instead."""
        return self._fallback.records

    # ------------------------------------------------------------------ lifetime

    def __enter__(self) -> AuditLog:
        self.attach()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def attach(self, *names: str) -> None:
        """Adds the handler to the named loggers (default: the ``loggers`` given at construction).

        Call it again after your application reconfigured logging (``dictConfig`` with
        ``disable_existing_loggers``, or a new root handler list, removes handlers it did
        not create; a non-incremental ``dictConfig`` even closes them: then a new handler
        on the same store replaces the closed one). Each logger's original level is
        restored by :meth:`close`.
        """
        pipeline = self.handler.pipeline
        if not self._closed and (pipeline is None or pipeline.closed):
            closed, self.handler = self.handler, self._new_handler()
            for logger in self._saved:
                logger.removeHandler(closed)
        for name in names or self._names:
            logger = logging.getLogger(name)
            self._saved.setdefault(logger, logger.level)
            if self.handler not in logger.handlers:
                logger.addHandler(self.handler)
            if logger.getEffectiveLevel() > self._level:
                logger.setLevel(self._level)

    def close(self) -> None:
        """Detaches the handler, restores logger levels and closes the store. Idempotent."""
        self._closed = True
        for logger, level in self._saved.items():
            logger.removeHandler(self.handler)
            logger.setLevel(level)
        self._saved.clear()
        self.handler.close()

    def processor(self, **options: Any) -> AuditProcessor:
        """A structlog :class:`~quipu_logging.structlog.AuditProcessor` writing to this store.

        Args:
            **options: ``AuditProcessor`` keywords (``drop``).
        """
        from .structlog import AuditProcessor

        return AuditProcessor(self.handler, **options)

    # ------------------------------------------------------------------ reading

    def flush(self) -> None:
        """Waits until everything logged so far is stored.

        Raises:
            AssertionError: the store did not take the records in time.
        """
        if not self.handler.flush():
            raise AssertionError(f"the audit store {str(self.root)!r} did not flush in time")

    def records(self, **where: Any) -> list[dict[str, Any]]:
        """The audited records (no ``$sys`` records), oldest first, after a flush.

        Args:
            **where: only records whose top-level fields equal these values (type-exact, as
                in ``query(where=...)``: ``1`` does not match ``True``).

        Returns:
            The stored payloads (``seq``, ``ts``, ``message``, ``actor``, ...).
        """
        self.flush()
        with AuditStore.open_reader(self.root) as reader:
            payloads = [rec.payload for rec in reader.scan()]
        return [p for p in payloads if "$sys" not in p and _matches(p, where)]

    def assert_audited(self, **where: Any) -> dict[str, Any]:
        """Asserts that a record with these field values was audited; returns the newest one.

        Args:
            **where: field → expected value (``actor="alice", action="update"``).

        Raises:
            AssertionError: none matched; the message lists what was audited.
        """
        if not where:
            raise TypeError("assert_audited needs at least one field=value")
        everything = self.records()
        matches = [p for p in everything if _matches(p, where)]
        if matches:
            return matches[-1]
        wanted = ", ".join(f"{k}={v!r}" for k, v in where.items())
        if not everything:
            raise AssertionError(f"no record with {wanted} was audited: nothing was audited at all")
        lines = [_describe(p, where) for p in everything[-_SHOWN:]]
        more = f" (the last {_SHOWN} shown)" if len(everything) > _SHOWN else ""
        raise AssertionError(
            f"no record with {wanted} was audited; {len(everything)} records were{more}:\n  "
            + "\n  ".join(lines)
        )

    def assert_not_audited(self, **where: Any) -> None:
        """Asserts that no record with these field values was audited.

        Raises:
            AssertionError: one did; the message shows it.
        """
        found = self.records(**where)
        if found:
            wanted = ", ".join(f"{k}={v!r}" for k, v in where.items())
            raise AssertionError(
                f"{len(found)} records with {wanted} were audited: " + _describe(found[-1], where)
            )

    def verify(self) -> VerifyReport:
        """Flushes, then verifies the store (see ``AuditStore.verify``)."""
        self.flush()
        with AuditStore.open_reader(self.root) as reader:
            return reader.verify()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {str(self.root)!r}>"


def _matches(payload: Mapping[str, Any], where: Mapping[str, Any]) -> bool:
    return all(k in payload and _same(payload[k], v) for k, v in where.items())


def _same(stored: Any, expected: Any) -> bool:
    """Type-exact equality, like ``AuditStore.query(where=...)``: ``1`` is not ``True`` nor ``1.0``.

    Containers compare item by item (a tuple stands for the list JSON stores).
    """
    if isinstance(expected, tuple):
        expected = list(expected)
    if type(stored) is not type(expected):
        return False
    if isinstance(stored, dict):
        return stored.keys() == expected.keys() and all(_same(stored[k], expected[k]) for k in stored)
    if isinstance(stored, list):
        return len(stored) == len(expected) and all(
            _same(a, b) for a, b in zip(stored, expected, strict=True)
        )
    return bool(stored == expected)


if _HAVE_PYTEST:

    @pytest.fixture
    def audit_log(tmp_path: Path) -> Iterator[AuditLog]:
        """An :class:`AuditLog` on a fresh store under ``tmp_path``, on the root logger for one test."""
        with AuditLog(tmp_path / "quipu-audit") as log:
            yield log
