"""Counters and a latency histogram for the audit pipeline, cheap enough for the emit path.

Two kinds of counter, chosen by who writes them:

* :class:`Counter` is bumped by any producer thread. It wraps an
  ``itertools.repeat(None, sys.maxsize)`` and counts down: its ``__next__`` runs
  entirely in C without releasing the GIL, so concurrent increments are never lost (a
  plain ``x += 1`` is a read, an add and a store, and a thread switch between them loses
  an update). An increment costs one C call that decrements a C integer and returns
  ``None``: unlike ``itertools.count``, which it replaced, no ``int`` object is made and
  freed per increment (about 250 instructions less per record on the caller's path,
  bench/README.md). Reading the value asks the iterator how many are left. On a
  free-threaded build this exactness argument does not hold.
* Everything only the writer thread changes is a plain ``int`` attribute on the
  pipeline: one writer means no lost updates, and readers see some recent value.

Readers never take a lock and never talk to the writer, so ``metrics()`` still answers
while the writer is stuck or dead.
"""

from __future__ import annotations

import bisect
import itertools
import operator
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Final

__all__ = ["DEFAULT_LATENCY_BOUNDS", "Counter", "LatencyHistogram"]

DEFAULT_LATENCY_BOUNDS: tuple[float, ...] = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)
"""Upper bounds (seconds) of the write-latency buckets; one more bucket catches the rest."""


# What a Counter counts down from. On a 64-bit build, at ten million increments a second
# it would last for 29,000 years (past it, add() would raise StopIteration). On a 32-bit
# build 2**31 - 1 increments would be a few weeks of a busy service: there it counts up an
# itertools.count instead (no end, an int made per increment).
_TIMES: Final = sys.maxsize
_COUNT_DOWN: Final = sys.maxsize >= 2**62


class Counter:
    """A monotonically increasing count that any thread may bump without a lock.

    Attributes:
        add: call it (no arguments) to add one; what it returns means nothing.
    """

    __slots__ = ("_count", "_down", "add")

    def __init__(self, *, count_down: bool = _COUNT_DOWN) -> None:
        # next() on it is the increment (what AuditPipeline._front hands the fast path).
        self._down = count_down
        self._count: Iterator[object] = itertools.repeat(None, _TIMES) if count_down else itertools.count()
        self.add: Callable[[], object] = self._count.__next__

    @property
    def value(self) -> int:
        """The current count."""
        if self._down:
            return _TIMES - operator.length_hint(self._count)
        # repr is "count(N)"; itertools.count has no other public way to peek.
        return int(repr(self._count)[6:-1])

    def __repr__(self) -> str:
        return f"<Counter {self.value}>"


class LatencyHistogram:
    """Durations in fixed buckets, Prometheus style. Only the writer thread observes.

    Args:
        bounds: ascending bucket upper bounds in seconds; a last, unbounded bucket is added.
    """

    __slots__ = ("_bounds", "_counts", "count", "total")

    def __init__(self, bounds: Sequence[float] = DEFAULT_LATENCY_BOUNDS) -> None:
        if list(bounds) != sorted(bounds) or not bounds:
            raise ValueError("histogram bounds must be a non-empty ascending sequence")
        self._bounds = tuple(float(b) for b in bounds)
        self._counts = [0] * (len(self._bounds) + 1)
        self.count = 0
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        """Adds one duration."""
        self._counts[bisect.bisect_left(self._bounds, seconds)] += 1
        self.count += 1
        self.total += seconds

    def snapshot(self) -> dict[str, object]:
        """The histogram as plain data.

        Returns:
            ``{"buckets": {"<le seconds>": cumulative count, ..., "+Inf": count},
            "count": n, "sum": total seconds}`` (cumulative, like Prometheus ``le``).
        """
        counts = list(self._counts)
        buckets: dict[str, int] = {}
        running = 0
        for bound, n in zip(self._bounds, counts[:-1], strict=True):
            running += n
            buckets[repr(bound)] = running
        buckets["+Inf"] = running + counts[-1]
        return {"buckets": buckets, "count": self.count, "sum": self.total}
