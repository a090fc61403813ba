"""Hostile log input through the real handler (issue 6 requirement 6).

One table: each row logs something nasty through an ``AuditHandler`` and then says
where the record must be: stored (with the markers the format promises) or diverted
to the fallback, and counted. In every row the logging call returns without raising,
and the accounting identities hold afterwards. The ``__repr__`` that hangs on a lock
and the dictConfig typo have their own tests below the table.
"""

from __future__ import annotations

import logging
import logging.config
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from quipu_logging import AuditHandler, AuditPipeline, AuditStore, PipelineConfig, StoreConfig

WAIT = 60.0


class RaisingRepr:
    def __repr__(self) -> str:
        raise RuntimeError("repr refuses")


class Unpicklable:
    """Holds a lock and a lambda: neither pickles, copies or serialises."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.fn = lambda: None

    def __reduce__(self) -> Any:
        raise TypeError("not picklable")

    def __repr__(self) -> str:
        return "<Unpicklable>"


def circular_dict() -> dict[str, Any]:
    d: dict[str, Any] = {"name": "loop"}
    d["self"] = d
    return d


def circular_list() -> list[Any]:
    x: list[Any] = [1]
    x.append([x])
    return x


def deep(levels: int) -> dict[str, Any]:
    root: dict[str, Any] = {}
    node = root
    for _ in range(levels):
        child: dict[str, Any] = {}
        node["d"] = child
        node = child
    return root


@dataclass(frozen=True)
class Row:
    name: str
    log: Callable[[logging.Logger], None]
    check: Callable[[dict[str, Any] | None, list[logging.LogRecord]], None]
    handler_options: tuple[tuple[str, Any], ...] = ()


def _stored(check: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any] | None, list[Any]], None]:
    def outer(payload: dict[str, Any] | None, diverted: list[Any]) -> None:
        assert payload is not None, "the record was not stored"
        assert diverted == []
        check(payload)

    return outer


def _depth_of(value: Any) -> int:
    n = 0
    while isinstance(value, dict) and "d" in value:
        value = value["d"]
        n += 1
    return n


def _diverted(payload: dict[str, Any] | None, diverted: list[Any]) -> None:
    assert payload is None and len(diverted) == 1


def _message_error(template: str, args: list[Any]) -> Callable[[dict[str, Any] | None, list[Any]], None]:
    """Stored with the template, the (normalised) args and the formatting error, nothing lost."""

    def check(p: dict[str, Any]) -> None:
        assert p["message"] == template and p["args"] == args, p
        assert p["message_error"], p

    return _stored(check)


ROWS = [
    Row(
        "circular dict",
        lambda lg: lg.info("m", extra={"c": circular_dict()}),
        _stored(
            lambda p: (p["c"]["name"] == "loop" and p["c"]["self"] == {"$cycle": True}) or pytest.fail(str(p))
        ),
    ),
    Row(
        "circular list",
        lambda lg: lg.info("m", extra={"c": circular_list()}),
        _stored(lambda p: p["c"] == [1, [{"$cycle": True}]] or pytest.fail(str(p["c"]))),
    ),
    Row(
        "unpicklable object",
        lambda lg: lg.info("m", extra={"u": Unpicklable(), "f": lambda: 1}),
        _stored(
            lambda p: (
                (p["u"] == {"$repr": "<Unpicklable>"} and "lambda" in p["f"]["$repr"]) or pytest.fail(str(p))
            )
        ),
    ),
    Row(
        "50 MB string, cut",
        lambda lg: lg.info("m", extra={"big": "x" * 50_000_000}),
        _stored(
            lambda p: (len(p["big"]) == 65536 and p["$truncated"] == {"big": 50_000_000}) or pytest.fail("")
        ),
    ),
    Row(
        "50 MB bytes, cut",
        lambda lg: lg.info("m", extra={"big": b"\x01" * 50_000_000}),
        _stored(lambda p: ("$truncated" in p and "big" in p["$truncated"]) or pytest.fail(str(p)[:300])),
    ),
    Row(
        "50 MB string, no cut: over the frame limit, diverted",
        lambda lg: lg.info("m", extra={"big": "x" * 50_000_000}),
        _diverted,
        (("max_field_chars", None),),
    ),
    Row(
        "10,000 levels deep",
        lambda lg: lg.info("m", extra={"deep": deep(10_000)}),
        _stored(
            lambda p: (
                (_depth_of(p["deep"]) <= 64 and "'$depth'" in str(p["deep"])) or pytest.fail(str(p)[-300:])
            )
        ),
    ),
    Row(
        "non-string keys",
        lambda lg: lg.info(
            "m", extra={"k": {1: "int", "1": "str", None: "none", (1, 2): "tuple", 2.5: "float"}}
        ),
        _stored(
            lambda p: (
                (
                    sorted(p["k"].values()) == ["float", "int", "none", "str", "tuple"]
                    and all(isinstance(k, str) for k in p["k"])
                )
                or pytest.fail(str(p["k"]))
            )
        ),
    ),
    Row(
        "reserved keys",
        lambda lg: lg.info("m", extra={"seq": 1, "ts": "t", "$sys": "gap", "$x": 1, "n": {"$y": {"$z": 2}}}),
        _stored(
            lambda p: (
                (
                    isinstance(p["seq"], int)
                    and isinstance(p["ts"], int)
                    and p["seq#2"] == 1
                    and p["ts#2"] == "t"
                    and "$sys" not in p
                    and p["$$sys"] == "gap"
                    and p["$$x"] == 1
                    and p["n"] == {"$$y": {"$$z": 2}}
                )
                or pytest.fail(str(p))
            )
        ),
    ),
    Row("% args that do not match", lambda lg: lg.info("a %s and %s", 1), _message_error("a %s and %s", [1])),
    Row("% args of the wrong type", lambda lg: lg.info("n=%d", "nope"), _message_error("n=%d", ["nope"])),
    Row(
        "__repr__ that raises",
        lambda lg: lg.info("m", extra={"r": RaisingRepr()}),
        _stored(lambda p: p["r"] == {"$unrepresentable": "RaisingRepr"} or pytest.fail(str(p))),
    ),
    Row(
        "__repr__ that raises, as a % arg",
        lambda lg: lg.info("value %r", RaisingRepr()),
        _message_error("value %r", [{"$unrepresentable": "RaisingRepr"}]),
    ),
    Row(
        "lone surrogates",
        lambda lg: lg.info("msg \udcff", extra={"s": "a\ud800b", "k": {"\udc80key": 1}}),
        _stored(
            lambda p: (
                (
                    p["$lossy"] is True
                    and p["s"] == "a\ufffdb"
                    and p["message"] == "msg \ufffd"
                    and list(p["k"]) == ["\ufffdkey"]
                )
                or pytest.fail(str(p))
            )
        ),
    ),
    Row(
        "invalid UTF-8 bytes",
        lambda lg: lg.info("m", extra={"b": b"\xff\xfe\xc3\x28", "nested": [b"\x80"]}),
        _stored(
            lambda p: (
                (p["b"] == {"$bytes": "//7DKA=="} and p["nested"] == [{"$bytes": "gA=="}])
                or pytest.fail(str(p))
            )
        ),
    ),
]


@pytest.fixture
def logger(request: pytest.FixtureRequest) -> Iterator[logging.Logger]:
    # A logger outside logging's registry: pytest attaches its capture handlers to registered
    # loggers that do not propagate, and those re-raise formatting errors by design; here
    # only the AuditHandler (whose behaviour is under test) sees the records.
    lg = logging.Logger(f"hostile.{request.node.name}", logging.INFO)
    yield lg
    for h in list(lg.handlers):
        lg.removeHandler(h)


def _identities(m: dict[str, Any]) -> None:
    assert m["offered"] == m["accepted"] + m["rejected_full"] + m["rejected_closed"] + m["rejected_disk_full"]
    assert m["accepted"] == m["written"] + m["parked"] + m["handed_off"] + m["lost"]
    assert m["parked"] == m["redriven"] + m["parked_now"]
    assert m["rejected"] == m["fallback_ok"] + m["fallback_failed"]


@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
def test_hostile_input(row: Row, tmp_path: Path, logger: logging.Logger, capture: Any) -> None:
    """The call returns; the record is stored with markers or diverted, and counted."""
    fallback = capture
    root = tmp_path / "store"
    handler = AuditHandler(root, fallback=fallback, **dict(row.handler_options))
    # handleError would print "--- Logging error ---"; here it records that it was called.
    handled: list[str] = []
    handler.handleError = lambda record: handled.append(record.msg)  # type: ignore[method-assign]
    logger.addHandler(handler)
    try:
        row.log(logger)  # must not raise
        assert handler.flush(WAIT)
        m = handler.metrics()
    finally:
        logger.removeHandler(handler)
        handler.close()
    _identities(m)
    with AuditStore.open_reader(root) as reader:
        assert reader.verify().ok
        users = [r.payload for r in reader.scan() if "$sys" not in r.payload]
    # whatever happened to it, the record is in exactly one place, and the counters say which
    assert len(users) + len(fallback.records) + m["parked_now"] == 1, (users, fallback.records, m)
    assert m["written"] == len(users)
    assert m["rejected"] + m["handed_off"] + m["parked_now"] == len(fallback.records) + m["parked_now"]
    row.check(users[0] if users else None, fallback.records)
    if users:
        assert handled == [], "a stored record must not also be reported as a logging error"


# ---------------------------------------------------------------------------- a repr that hangs


class HangingRepr:
    """Its repr blocks on a lock the test holds: the writer thread hangs inside a batch."""

    def __init__(self, lock: threading.Lock, entered: threading.Event) -> None:
        self.lock = lock
        self.entered = entered

    def __repr__(self) -> str:
        self.entered.set()
        with self.lock:
            return "<released>"


def test_repr_that_hangs_on_a_lock(tmp_path: Path, logger: logging.Logger, capture: Any) -> None:
    """The heartbeat reports the stall, later emits are diverted, close(timeout) returns."""
    lock = threading.Lock()
    lock.acquire()
    entered = threading.Event()
    pipeline = AuditPipeline.start(
        StoreConfig(root=tmp_path / "store"), config=PipelineConfig(stall_timeout=0.2, close_timeout=0.5)
    )
    fallback = capture
    handler = AuditHandler(pipeline=pipeline, fallback=fallback)
    logger.addHandler(handler)
    try:
        logger.info("before")
        assert handler.flush(WAIT)
        logger.info("hangs", extra={"h": HangingRepr(lock, entered)})
        assert entered.wait(WAIT), "the writer never reached the repr"
        # The heartbeat: a batch older than stall_timeout turns health unhealthy (polled, deadline-bound).
        deadline = threading.Event()
        timer = threading.Timer(WAIT, deadline.set)
        timer.start()
        try:
            while handler.health()["status"] != "unhealthy" and not deadline.is_set():
                deadline.wait(0.01)
        finally:
            timer.cancel()
        health = handler.health()
        assert health["stalled"] is True and health["status"] == "unhealthy"
        logger.info("while stalled")  # must not block or raise: diverted to the fallback
        assert [r.getMessage() for r in fallback.records] == ["while stalled"]
        m = handler.metrics()
        assert m["rejected_closed"] == 1 and m["diverted_closed"] == 1 and m["fallback_ok"] == 1
        assert pipeline.close(timeout=0.5) is False  # returns, saying the writer did not finish
    finally:
        logger.removeHandler(handler)
        lock.release()  # let the stuck writer finish its close on its own
    pipeline._thread.join(WAIT)
    assert not pipeline._thread.is_alive()
    with AuditStore.open_reader(tmp_path / "store") as reader:
        assert reader.verify().ok
        messages = [r.payload.get("message") for r in reader.scan() if "$sys" not in r.payload]
    # the hanging record itself was accepted before the stall: the writer stored it once unstuck
    assert messages == ["before", "hangs"]
    handler.close()


# ---------------------------------------------------------------------------- dictConfig typo


def test_dictconfig_factory_typo_is_a_clear_configuration_error(tmp_path: Path) -> None:
    """A misspelt option in the "()" form fails at configuration time, naming the right option."""
    config = {
        "version": 1,
        "disable_existing_loggers": False,
        "handlers": {
            "audit": {"()": "quipu_logging.AuditHandler", "root": str(tmp_path / "s"), "queue_sise": 10}
        },
        "loggers": {"hostile.typo": {"handlers": ["audit"]}},
    }
    with pytest.raises(ValueError, match="audit") as info:
        logging.config.dictConfig(config)
    cause = str(info.value.__cause__)  # dictConfig wraps the handler's own ConfigError
    assert "queue_sise" in cause and "queue_size" in cause
    assert not (tmp_path / "s").exists() or not any((tmp_path / "s").iterdir())
