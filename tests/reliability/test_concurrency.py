"""Concurrency (issue 6 requirement 7): flush, close, metrics and logging at once; close racing
emits; two processes configuring one root at the same moment.

"None vanish" is checked by identity: every record carries a unique number, and after the
dust settles each number is in the store exactly once or in the fallback exactly once,
never both, never neither; the accounting identities hold.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import pytest

import quipu_logging
from quipu_logging import AuditHandler, AuditStore

PACKAGE_PARENT = str(Path(quipu_logging.__file__).resolve().parent.parent)
WAIT = 60.0


class Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.ns: list[int] = []
        self.guard = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        with self.guard:
            self.ns.append(record.n)  # type: ignore[attr-defined]


def _identities(m: dict[str, Any]) -> None:
    assert m["offered"] == m["accepted"] + m["rejected_full"] + m["rejected_closed"] + m["rejected_disk_full"]
    assert m["accepted"] == m["written"] + m["parked"] + m["handed_off"] + m["lost"]
    assert m["parked"] == m["redriven"] + m["parked_now"]
    assert m["rejected"] == m["fallback_ok"] + m["fallback_failed"]
    assert m["lost"] == 0 and m["fallback_failed"] == 0


def _stored_ns(root: Path) -> list[int]:
    with AuditStore.open_reader(root) as reader:
        assert reader.verify().ok
        return [r.payload["n"] for r in reader.scan() if "n" in r.payload]


@pytest.mark.parametrize("queue_size", [8, 4096], ids=["tiny-queue", "default-queue"])
def test_flush_close_metrics_and_logging_at_once(tmp_path: Path, queue_size: int) -> None:
    """Loggers, flushers, a metrics reader and finally close() from another thread: none vanish."""
    root = tmp_path / "store"
    fallback = Capture()
    handler = AuditHandler(root, fallback=fallback, queue_size=queue_size)
    logger = logging.Logger("concurrency", logging.INFO)
    logger.addHandler(handler)
    producers = 4
    counter = itertools.count()
    counter_lock = threading.Lock()
    go = threading.Barrier(producers + 3)
    halfway = threading.Event()
    closed = threading.Event()
    errors: list[BaseException] = []
    flush_results: list[bool] = []
    snapshots: list[dict[str, Any]] = []
    stop = threading.Event()
    used: list[int] = []

    def produce() -> None:
        try:
            go.wait()
            after = 0
            k = 0
            while after < 50:  # log until well after close() returned
                with counter_lock:
                    n = next(counter)
                    used.append(n)
                logger.info("r %d", n, extra={"n": n})
                k += 1
                if k == 500:
                    halfway.set()
                if closed.is_set():
                    after += 1
        except BaseException as e:
            errors.append(e)

    def flusher() -> None:
        go.wait()
        while not stop.is_set():
            flush_results.append(handler.flush(WAIT))

    def reader() -> None:
        go.wait()
        while not stop.is_set():
            snapshots.append(handler.metrics())

    def closer() -> None:
        go.wait()
        halfway.wait(WAIT)
        handler.close()  # races the producers, the flusher and the metrics reader
        closed.set()

    threads = [threading.Thread(target=produce) for _ in range(producers)]
    threads += [
        threading.Thread(target=flusher),
        threading.Thread(target=reader),
        threading.Thread(target=closer),
    ]
    for t in threads:
        t.start()
    for t in threads[:producers] + threads[-1:]:
        t.join(WAIT)
    stop.set()
    for t in threads:
        t.join(WAIT)
        assert not t.is_alive(), f"{t.name} is stuck"
    assert errors == []
    assert flush_results and snapshots  # they really ran concurrently with the loggers
    final = handler.metrics()
    _identities(final)
    stored = _stored_ns(root)
    assert len(stored) == len(set(stored)), "a record was stored twice"
    assert len(fallback.ns) == len(set(fallback.ns)), "a record reached the fallback twice"
    assert not set(stored) & set(fallback.ns)
    assert set(stored) | set(fallback.ns) == set(used)
    # emits accepted before close are stored, later ones went to the fallback, and the counters agree
    assert final["written"] == len(stored) and final["rejected"] == len(fallback.ns)
    assert final["diverted_closed"] >= 50 * producers  # at least the emits after close() returned


def test_close_racing_emits_from_many_threads(tmp_path: Path) -> None:
    """Many threads emit while close() runs, repeatedly: each record is stored or in the fallback."""
    n_per = 400
    for attempt in range(5):
        root = tmp_path / f"store{attempt}"
        fallback = Capture()
        handler = AuditHandler(root, fallback=fallback)
        logger = logging.Logger(f"race{attempt}", logging.INFO)
        logger.addHandler(handler)
        start = threading.Barrier(9)

        def emit(base: int, logger: logging.Logger = logger, start: threading.Barrier = start) -> None:
            start.wait()
            for k in range(n_per):
                logger.info("x", extra={"n": base + k})

        threads = [threading.Thread(target=emit, args=(i * n_per,)) for i in range(8)]
        for t in threads:
            t.start()
        start.wait()
        handler.close()
        for t in threads:
            t.join(WAIT)
        stored = _stored_ns(root)
        assert len(stored) == len(set(stored))
        assert not set(stored) & set(fallback.ns)
        assert set(stored) | set(fallback.ns) == set(range(8 * n_per))
        _identities(handler.metrics())


# ---------------------------------------------------------------------------- two processes


SCRIPT = textwrap.dedent(
    """
    import json, logging, logging.config, os, sys, time
    root, go, name = sys.argv[1], sys.argv[2], sys.argv[3]
    deadline = time.monotonic() + 60
    while not os.path.exists(go):  # both processes configure at the same moment
        if time.monotonic() > deadline:
            sys.exit("no go signal")
        time.sleep(0.001)
    logging.config.dictConfig({
        "version": 1,
        "handlers": {"audit": {"class": "quipu_logging.AuditHandler", "root": root}},
        "root": {"handlers": ["audit"], "level": "INFO"},
    })
    # Hold on until both have configured, so neither can exit (freeing the lock) before the other tries.
    open(go + "." + name, "w").close()
    while not all(os.path.exists(go + "." + other) for other in ("alpha", "beta")):
        if time.monotonic() > deadline:
            sys.exit("the other process never configured")
        time.sleep(0.001)
    log = logging.getLogger(name)
    for n in range(200):
        log.info("from %s", name, extra={"n": n, "who": name})
    handler = logging.getLogger().handlers[0]
    flushed = handler.flush()
    m = handler.metrics()
    print(json.dumps({"unavailable": handler.unavailable, "flushed": flushed,
                      "written": m.get("written", 0), "rejected": m["rejected"],
                      "fallback_ok": m["fallback_ok"], "diverted_unavailable": m["diverted_unavailable"]}))
    """
)


def test_two_processes_configure_one_root_at_once(tmp_path: Path) -> None:
    """One process gets the store; the other's records all go to its fallback, with a clear message."""
    root = tmp_path / "store"
    go = tmp_path / "go"
    env = dict(os.environ, PYTHONPATH=PACKAGE_PARENT)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", SCRIPT, str(root), str(go), name],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for name in ("alpha", "beta")
    ]
    # Both poll for this file, so they configure together whichever started first.
    go.write_text("go")
    outs = {}
    for name, proc in zip(("alpha", "beta"), procs, strict=True):
        out, err = proc.communicate(timeout=WAIT * 2)
        assert proc.returncode == 0, err
        outs[name] = (json.loads(out.splitlines()[-1]), err)
    winners = [n for n, (o, _) in outs.items() if o["unavailable"] is None]
    assert len(winners) == 1, outs
    winner = winners[0]
    loser = "beta" if winner == "alpha" else "alpha"
    w, _ = outs[winner]
    lo, lerr = outs[loser]
    assert w["flushed"] is True and w["written"] == 200 and w["rejected"] == 0
    assert lo["rejected"] == lo["fallback_ok"] == lo["diverted_unavailable"] == 200
    assert "holds its writer lock" in lo["unavailable"] or "locked" in lo["unavailable"].lower(), lo
    assert str(root) in lerr  # the clear message, on the loser's stderr
    diverted = [json.loads(line) for line in lerr.splitlines() if line.startswith("{")]
    assert sorted(d["n"] for d in diverted) == list(range(200))
    with AuditStore.open_reader(root) as reader:
        assert reader.verify().ok
        who = {r.payload.get("who") for r in reader.scan() if "n" in r.payload}
    assert who == {winner}
