"""Hooks for testing code that logs through an audit pipeline, without ``time.sleep``.

``paused(pipeline)`` holds the writer thread so a test can fill the queue, race a
close, or look at counters while nothing is written::

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

from collections.abc import Iterator
from contextlib import contextmanager

from .pipeline import AuditHandle, AuditPipeline

__all__ = ["paused", "wait_synced"]


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
