"""metrics.Counter: exact under concurrent increments, in both of its forms."""

from __future__ import annotations

import sys
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from quipu_logging.metrics import Counter


@pytest.mark.parametrize("count_down", [True, False])
def test_concurrent_increments_are_never_lost(count_down: bool) -> None:
    """8 threads x 20,000 add() calls: the value is exactly 160,000 (the 64-bit count-down form
    and the count-up form a 32-bit build uses)."""
    counter = Counter(count_down=count_down)
    start = threading.Barrier(8)

    def bump() -> None:
        start.wait()
        add = counter.add
        for _ in range(20_000):
            add()

    threads = [threading.Thread(target=bump) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert counter.value == 160_000
    assert repr(counter) == "<Counter 160000>"


@settings(max_examples=25)
@given(n=st.integers(min_value=0, max_value=3000), count_down=st.booleans())
def test_value_is_the_number_of_increments(n: int, count_down: bool) -> None:
    counter = Counter(count_down=count_down)
    assert counter.value == 0
    for _ in range(n):
        counter.add()
    assert counter.value == n


def test_the_default_form_follows_the_build() -> None:
    """Counting down from sys.maxsize only where that cannot run out (64-bit builds)."""
    assert Counter()._down is (sys.maxsize >= 2**62)
