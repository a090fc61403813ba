#!/usr/bin/env python3
"""Front-end benchmark of quipu_logging: what a ``logger.info`` call costs the caller.

    python bench/emit.py [--calls N] [--repeat R] [--quick] [--check] [--json FILE] [--dir PARENT]

One command, one markdown table. Every figure is the median of ``--repeat``
repetitions (default 5); the runs go round-robin over every (handler, threads) pair,
the order rotating each repetition, so a machine that slows down part way through
hurts every row alike. A warm-up round (not recorded) runs first.

Each run logs ``--calls`` records (split over the threads) with
``logger.info("user %s updated doc %s", actor, i, extra={"actor": ..., "action": ...,
"target": ...})`` and times every call with ``time.perf_counter_ns`` around it
(caller-side latency: p50, p99, p99.9 over all the run's calls). End-to-end
throughput is calls / (first call .. everything durable): for our handler
``handler.flush()`` (appended and fsynced), for the file-writing peers their own
barrier (``QueueListener.stop()``, ``logger.complete()``) then ``flush`` and one
``os.fsync`` of the file, so every run ends with the data on disk.

Handlers compared:

* a do-nothing ``logging.Handler`` (its ``emit`` returns): the logging module's floor;
* ``AuditHandler`` with ``sync=os``, ``group:1000:20`` and ``every:64``, with a queue
  larger than the run (nothing diverted), plus ``group:1000:20`` at the default queue of
  4096 (the table shows how many records went to the fallback);
* stdlib ``QueueHandler`` + ``QueueListener`` + ``FileHandler`` with python-json-logger's
  ``JsonFormatter`` (no fsync per record, no hashing);
* a synchronous ``FileHandler`` + ``JsonFormatter``;
* loguru with ``enqueue=True, serialize=True`` to a file.

A last row holds the writer (``quipu_logging.testing.paused``) with the queue full and
times 10,000 calls that all go to a counting fallback.

Goal rows (PASS/FAIL; ``--check`` exits 1 when one fails) compare ``group:1000:20`` with
the big queue against the floor and the stdlib pipeline, per repetition (the median of
the per-repetition ratios).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import logging.handlers
import os
import queue
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import import_package, load_average, log, machine_info, percentile, print_table

import_package()

from quipu_logging import AuditHandler  # noqa: E402
from quipu_logging.testing import paused  # noqa: E402

try:
    from pythonjsonlogger.json import JsonFormatter
except ImportError:  # python-json-logger < 3.1
    from pythonjsonlogger.jsonlogger import JsonFormatter  # type: ignore[no-redef]

try:
    from loguru import logger as loguru_logger
except ImportError:  # the bench extra is not installed: the loguru rows say so
    loguru_logger = None

MSG = "user %s updated doc %s"
MSG_BRACES = "user {} updated doc {}"  # loguru formats with str.format
JSON_FIELDS = (
    "%(levelname)s %(levelno)s %(name)s %(message)s %(process)d %(threadName)s "
    "%(filename)s %(funcName)s %(lineno)d"
)
BIG_QUEUE = 1 << 22
DEFAULT_QUEUE = 4096
PAUSED_CALLS = 10_000
LOGGER_NAME = "bench.emit"

# Goals (see bench/README.md).
GOAL_P50_VS_FLOOR = 1.4  # at most
GOAL_P50_VS_STDLIB = 0.6  # at most
GOAL_P999_VS_STDLIB = 1.0  # at most
GOAL_E2E_VS_STDLIB = 1.3  # at least
GOAL_PAUSED_P99_US = 50.0  # under

_perf = time.perf_counter
_cpu = time.process_time


# ---------------------------------------------------------------- the handlers under test


class NopHandler(logging.Handler):
    """Does nothing: what ``logger.info`` costs with a handler attached (the floor)."""

    def emit(self, record: logging.LogRecord) -> None:
        pass


class CountingHandler(logging.Handler):
    """A fallback that only counts (``Handler.handle`` holds its lock, so the count is exact)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1


def json_formatter() -> logging.Formatter:
    return JsonFormatter(JSON_FIELDS, timestamp=True)


def fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Sink:
    """One handler set-up for one run: ``handler`` (or loguru), ``durable()``, ``close()``."""

    loguru = False
    handler: logging.Handler | None = None

    def __init__(self, work: str) -> None:
        self.work = work

    def durable(self) -> None:
        pass

    def diverted(self) -> int:
        return 0

    def close(self, calls: int) -> None:
        pass


class FloorSink(Sink):
    def __init__(self, work: str) -> None:
        super().__init__(work)
        self.handler = NopHandler()


class FileSink(Sink):
    def __init__(self, work: str) -> None:
        super().__init__(work)
        self.path = os.path.join(work, "sync.jsonl")
        self.fh = logging.FileHandler(self.path, encoding="utf-8")
        self.fh.setFormatter(json_formatter())
        self.handler = self.fh

    def durable(self) -> None:
        self.fh.flush()
        os.fsync(self.fh.stream.fileno())

    def close(self, calls: int) -> None:
        self.fh.close()
        check_lines(self.path, calls)


class QueueSink(Sink):
    def __init__(self, work: str) -> None:
        super().__init__(work)
        self.path = os.path.join(work, "queue.jsonl")
        self.q: queue.Queue[Any] = queue.Queue(-1)
        self.fh = logging.FileHandler(self.path, encoding="utf-8")
        self.fh.setFormatter(json_formatter())
        self.listener = logging.handlers.QueueListener(self.q, self.fh)
        self.listener.start()
        self.handler = logging.handlers.QueueHandler(self.q)

    def durable(self) -> None:
        self.listener.stop()  # drains the queue, joins the listener thread
        self.fh.flush()
        os.fsync(self.fh.stream.fileno())

    def close(self, calls: int) -> None:
        self.fh.close()
        check_lines(self.path, calls)


class LoguruSink(Sink):
    loguru = True

    def __init__(self, work: str) -> None:
        super().__init__(work)
        assert loguru_logger is not None
        self.path = os.path.join(work, "loguru.jsonl")
        self.sink_id = loguru_logger.add(self.path, enqueue=True, serialize=True, level="INFO")

    def durable(self) -> None:
        assert loguru_logger is not None
        loguru_logger.complete()  # waits until the enqueued messages are written
        fsync_path(self.path)

    def close(self, calls: int) -> None:
        assert loguru_logger is not None
        loguru_logger.remove(self.sink_id)
        check_lines(self.path, calls)


class AuditSink(Sink):
    def __init__(self, work: str, sync: str, queue_size: int) -> None:
        super().__init__(work)
        self.fallback = CountingHandler()
        self.audit = AuditHandler(
            os.path.join(work, "store"), sync=sync, queue_size=queue_size, fallback=self.fallback
        )
        if self.audit.pipeline is None:
            raise SystemExit(f"AuditHandler could not open its store: {self.audit.unavailable}")
        self.handler = self.audit

    def durable(self) -> None:
        if not self.audit.flush(timeout=300):
            raise SystemExit("AuditHandler.flush() did not reach the barrier")

    def diverted(self) -> int:
        return int(self.audit.metrics()["rejected"])

    def close(self, calls: int) -> None:
        m = self.audit.metrics()
        self.audit.close()
        if m["written"] + m["rejected"] != calls or self.fallback.count != m["rejected"]:
            raise SystemExit(
                f"accounting: {calls} calls, written {m['written']}, rejected {m['rejected']}, "
                f"fallback took {self.fallback.count}"
            )


def check_lines(path: str, calls: int) -> None:
    with open(path, "rb") as f:
        n = sum(1 for _ in f)
    if n != calls:
        raise SystemExit(f"{path}: {n} lines, expected {calls}")


# ---------------------------------------------------------------- one run


def _producer(
    call: Callable[..., Any],
    loguru: bool,
    items: list[tuple[str, int, dict[str, str]]],
    lat: list[int],
    barrier: threading.Barrier | None,
) -> None:
    pc = time.perf_counter_ns
    if barrier is not None:
        barrier.wait()
    k = 0
    if loguru:
        for actor, i, extra in items:
            a = pc()
            call(MSG_BRACES, actor, i, **extra)
            lat[k] = pc() - a
            k += 1
    else:
        for actor, i, extra in items:
            a = pc()
            call(MSG, actor, i, extra=extra)
            lat[k] = pc() - a
            k += 1


@dataclass
class Sample:
    lat_ns: list[int]  # sorted
    seconds: float  # first call .. durable
    cpu: float  # process CPU seconds of that region
    diverted: int

    def pct_us(self, q: float) -> float:
        return percentile(self.lat_ns, q, presorted=True) / 1000.0


def run_once(make: Callable[[str], Sink], threads: int, items: list[Any], parent: str) -> Sample:
    work = tempfile.mkdtemp(prefix="emit-", dir=parent)
    try:
        sink = make(work)
        logger = logging.getLogger(LOGGER_NAME)
        if sink.loguru:
            assert loguru_logger is not None
            call = loguru_logger.info
        else:
            assert sink.handler is not None
            logger.handlers[:] = [sink.handler]
            call = logger.info
        chunks = [items[t::threads] for t in range(threads)]
        lats = [[0] * len(c) for c in chunks]
        gc.collect()
        if threads == 1:
            c0 = _cpu()
            t0 = _perf()
            _producer(call, sink.loguru, chunks[0], lats[0], None)
        else:
            barrier = threading.Barrier(threads + 1)
            workers = [
                threading.Thread(target=_producer, args=(call, sink.loguru, chunks[t], lats[t], barrier))
                for t in range(threads)
            ]
            for w in workers:
                w.start()
            barrier.wait()
            c0 = _cpu()
            t0 = _perf()
            for w in workers:
                w.join()
        sink.durable()
        seconds = _perf() - t0
        cpu = _cpu() - c0
        diverted = sink.diverted()
        logger.handlers[:] = []
        sink.close(len(items))
        lat = [x for chunk in lats for x in chunk]
        lat.sort()
        return Sample(lat, seconds, cpu, diverted)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run_paused(items: list[Any], parent: str) -> Sample:
    """Writer held, queue full: every timed call goes to the counting fallback."""
    work = tempfile.mkdtemp(prefix="emit-paused-", dir=parent)
    try:
        sink = AuditSink(work, "group:1000:20", DEFAULT_QUEUE)
        logger = logging.getLogger(LOGGER_NAME)
        logger.handlers[:] = [sink.audit]
        info = logger.info
        lat = [0] * len(items)
        gc.collect()
        with paused(sink.audit):
            for i in range(DEFAULT_QUEUE):
                info(MSG, "filler", i, extra={"actor": "filler", "action": "fill", "target": f"q-{i}"})
            depth = sink.audit.metrics()["queue_depth"]
            if depth != DEFAULT_QUEUE:
                raise SystemExit(f"paused: the queue holds {depth}, expected {DEFAULT_QUEUE}")
            c0 = _cpu()
            t0 = _perf()
            _producer(info, False, items, lat, None)
            seconds = _perf() - t0
            cpu = _cpu() - c0
        diverted = sink.diverted()
        if diverted != len(items) or sink.fallback.count != len(items):
            raise SystemExit(f"paused: {diverted} diverted, fallback took {sink.fallback.count}")
        sink.durable()
        logger.handlers[:] = []
        sink.close(DEFAULT_QUEUE + len(items))
        lat.sort()
        return Sample(lat, seconds, cpu, diverted)
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ---------------------------------------------------------------- cases


@dataclass
class Case:
    key: str
    label: str
    make: Callable[[str], Sink]
    threads: int
    note: str = ""
    samples: list[Sample] = field(default_factory=list)

    def med(self, fn: Callable[[Sample], float]) -> float:
        return statistics.median(fn(s) for s in self.samples)


def build_cases(thread_counts: list[int]) -> list[Case]:
    kinds: list[tuple[str, str, Callable[[str], Sink], str]] = [
        ("floor", "do-nothing handler (the floor)", FloorSink, "logging.Handler whose emit() returns"),
        (
            "os",
            "AuditHandler, sync=os",
            lambda w: AuditSink(w, "os", BIG_QUEUE),
            "big queue",
        ),
        (
            "group",
            "AuditHandler, sync=group:1000:20",
            lambda w: AuditSink(w, "group:1000:20", BIG_QUEUE),
            "big queue; the default policy",
        ),
        (
            "every64",
            "AuditHandler, sync=every:64",
            lambda w: AuditSink(w, "every:64", BIG_QUEUE),
            "big queue",
        ),
        (
            "group4096",
            f"AuditHandler, sync=group:1000:20, queue {DEFAULT_QUEUE}",
            lambda w: AuditSink(w, "group:1000:20", DEFAULT_QUEUE),
            "default queue; diverted records went to a counting fallback",
        ),
        (
            "stdqueue",
            "stdlib QueueHandler + QueueListener + FileHandler + JsonFormatter",
            QueueSink,
            "no fsync per record, no hashing",
        ),
        ("stdfile", "stdlib FileHandler + JsonFormatter (synchronous)", FileSink, "flush per record"),
    ]
    if loguru_logger is not None:
        kinds.append(
            ("loguru", "loguru, enqueue=True, serialize=True, to a file", LoguruSink, "barrier: complete()")
        )
    cases = []
    for threads in thread_counts:
        for key, label, make, note in kinds:
            cases.append(Case(f"{key}/{threads}", label, make, threads, note))
    return cases


# ---------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="quipu_logging front-end benchmark: prints one markdown table.")
    p.add_argument(
        "--calls", type=int, default=None, help="logger calls per run (default 40,000; --quick 8,000)"
    )
    p.add_argument("--repeat", type=int, default=None, help="repetitions per figure (default 5)")
    p.add_argument("--threads", default="1,4", help="producer thread counts (default 1,4)")
    p.add_argument("--quick", action="store_true", help="small sizes for a fast smoke run")
    p.add_argument(
        "--dir", default=None, help="parent directory of the temporary files (default: the current directory)"
    )
    p.add_argument("--json", default=None, help="also write every sample's summary to this file")
    p.add_argument("--check", action="store_true", help="exit with status 1 when a goal fails")
    args = p.parse_args(argv)
    if args.calls is None:
        args.calls = 8_000 if args.quick else 40_000
    if args.repeat is None:
        args.repeat = 5
    args.thread_counts = [int(x) for x in args.threads.split(",") if x.strip()]
    if args.calls < 1000 or args.repeat < 1 or not args.thread_counts:
        p.error("--calls must be >= 1000, --repeat >= 1, --threads non-empty")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = _perf()
    parent = os.path.abspath(args.dir or os.getcwd())
    os.makedirs(parent, exist_ok=True)
    scratch = tempfile.mkdtemp(prefix="quipu-bench-emit-", dir=parent)
    if loguru_logger is not None:
        loguru_logger.remove()  # its default stderr sink
    logger = logging.getLogger(LOGGER_NAME)
    logger.propagate = False
    logger.setLevel(logging.INFO)
    versions = {"python-json-logger": _version("python-json-logger")}
    versions["loguru"] = _version("loguru") if loguru_logger is not None else "not installed (no loguru rows)"
    info = machine_info(parent, {"versions": ", ".join(f"{k} {v}" for k, v in versions.items())})
    try:
        return _main(args, scratch, info, started)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _version(dist: str) -> str:
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:
        return "?"


def _main(args: argparse.Namespace, scratch: str, info: dict[str, str], started: float) -> int:
    n = args.calls
    reps = args.repeat
    items = [
        (f"user-{i % 50}", i, {"actor": f"user-{i % 50}", "action": "update", "target": f"doc-{i}"})
        for i in range(n)
    ]
    paused_items = [
        (f"user-{i % 50}", i, {"actor": f"user-{i % 50}", "action": "update", "target": f"doc-{i}"})
        for i in range(PAUSED_CALLS)
    ]
    cases = build_cases(args.thread_counts)
    paused_samples: list[Sample] = []

    log("warm-up round ...")
    warm = items[: min(2000, n)]
    for case in cases:
        run_once(case.make, case.threads, warm, scratch)
    run_paused(paused_items[:1000], scratch)

    slots: list[Case | None] = [*cases, None]  # None: the paused run
    for rep in range(reps):
        k = rep % len(slots)
        for slot in slots[k:] + slots[:k]:
            if slot is None:
                log(f"rep {rep + 1}/{reps}: writer held, queue full ...")
                paused_samples.append(run_paused(paused_items, scratch))
                continue
            log(f"rep {rep + 1}/{reps}: {slot.key} ...")
            slot.samples.append(run_once(slot.make, slot.threads, items, scratch))

    # ---- the table
    med = statistics.median
    by_key = {c.key: c for c in cases}
    header = [
        "handler",
        "threads",
        "calls",
        "p50 µs",
        "p99 µs",
        "p99.9 µs",
        "end-to-end rec/s",
        "CPU µs / rec",
        "diverted",
        "note",
    ]
    rows: list[list[str]] = []
    for c in cases:
        rows.append(
            [
                c.label,
                str(c.threads),
                f"{n:,}",
                f"{c.med(lambda s: s.pct_us(0.50)):.1f}",
                f"{c.med(lambda s: s.pct_us(0.99)):.1f}",
                f"{c.med(lambda s: s.pct_us(0.999)):.1f}",
                f"{c.med(lambda s: n / s.seconds):,.0f}",
                f"{c.med(lambda s: s.cpu / n * 1e6):.1f}",
                f"{c.med(lambda s: s.diverted):,.0f}",
                c.note,
            ]
        )
    rows.append(
        [
            f"AuditHandler, writer held (testing.paused), queue {DEFAULT_QUEUE} full",
            "1",
            f"{PAUSED_CALLS:,}",
            f"{med(s.pct_us(0.50) for s in paused_samples):.1f}",
            f"{med(s.pct_us(0.99) for s in paused_samples):.1f}",
            f"{med(s.pct_us(0.999) for s in paused_samples):.1f}",
            "",
            f"{med(s.cpu / PAUSED_CALLS * 1e6 for s in paused_samples):.1f}",
            f"{med(s.diverted for s in paused_samples):,.0f}",
            "every call goes to a counting fallback",
        ]
    )

    goals: list[dict[str, Any]] = []

    def goal(
        name: str, value: float, shown: str, threshold: float, ok: bool, rule: str, note: str = ""
    ) -> None:
        goals.append({"goal": name, "value": value, "threshold": threshold, "pass": ok, "rule": rule})
        verdict = f"**{'PASS' if ok else 'FAIL'}** ({rule}){'; ' + note if note else ''}"
        rows.append([f"**goal**: {name}", "", "", "", "", "", shown, "", "", verdict])

    def paired(a: Case, b: Case, fn: Callable[[Sample], float]) -> float:
        # The median of per-repetition ratios: the two runs of one repetition are close in time.
        return med(fn(x) / fn(y) for x, y in zip(a.samples, b.samples, strict=True))

    p50 = lambda s: s.pct_us(0.50)  # noqa: E731
    p999 = lambda s: s.pct_us(0.999)  # noqa: E731
    rate = lambda s: 1.0 / s.seconds  # noqa: E731
    for t in args.thread_counts:
        ours, floor, std = by_key[f"group/{t}"], by_key[f"floor/{t}"], by_key[f"stdqueue/{t}"]
        tt = f"{t} thread" + ("s" if t != 1 else "")
        r = paired(ours, floor, p50)
        goal(
            f"p50 `group:1000:20` ÷ floor, {tt}",
            r,
            f"{r:.3f}x",
            GOAL_P50_VS_FLOOR,
            r <= GOAL_P50_VS_FLOOR,
            f"≤ {GOAL_P50_VS_FLOOR}x",
        )
        r = paired(ours, std, p50)
        goal(
            f"p50 `group:1000:20` ÷ stdlib QueueHandler, {tt}",
            r,
            f"{r:.3f}x",
            GOAL_P50_VS_STDLIB,
            r <= GOAL_P50_VS_STDLIB,
            f"≤ {GOAL_P50_VS_STDLIB}x",
        )
        r = paired(ours, std, p999)
        goal(
            f"p99.9 `group:1000:20` ÷ stdlib QueueHandler, {tt}",
            r,
            f"{r:.3f}x",
            GOAL_P999_VS_STDLIB,
            r <= GOAL_P999_VS_STDLIB,
            f"≤ {GOAL_P999_VS_STDLIB}x",
        )
        r = paired(ours, std, rate)
        goal(
            f"end-to-end `group:1000:20` ÷ stdlib QueueHandler pipeline, {tt}",
            r,
            f"{r:.3f}x",
            GOAL_E2E_VS_STDLIB,
            r >= GOAL_E2E_VS_STDLIB,
            f"≥ {GOAL_E2E_VS_STDLIB}x",
        )
    pp = med(s.pct_us(0.99) for s in paused_samples)
    goal(
        "p99 with the writer held and the queue full",
        pp,
        f"{pp:.1f} µs",
        GOAL_PAUSED_P99_US,
        pp < GOAL_PAUSED_P99_US,
        f"< {GOAL_PAUSED_P99_US:g} µs",
        f"{PAUSED_CALLS:,} calls to a counting fallback",
    )

    total_s = _perf() - started
    print("## quipu_logging front-end benchmark (`bench/emit.py`)")
    print()
    for k, v in info.items():
        print(f"- {k}: {v}")
    print(
        f"- settings: calls={n:,} per run (split over the threads), repeat={reps}, "
        f"threads={','.join(map(str, args.thread_counts))}{', quick' if args.quick else ''}; "
        f"big queue = {BIG_QUEUE:,}"
    )
    print(
        f'- the call: logger.info("{MSG}", actor, i, extra={{"actor": ..., "action": "update", '
        '"target": ...}); loguru: logger.info("user {} updated doc {}", actor, i, actor=..., ...)'
    )
    print(
        f"- medians of {reps} repetitions (percentiles per run, over all the run's calls; a ratio: the "
        "median of the per-repetition ratios); end-to-end = calls / (first call .. durable): "
        "AuditHandler.flush(); QueueListener.stop() / loguru complete(), then flush + one fsync of the file"
    )
    print(f"- load average at end: {load_average()}; total benchmark time: {total_s:.0f} s")
    print()
    print_table(header, rows, right={1, 2, 3, 4, 5, 6, 7, 8})

    if args.json:
        out = {
            "machine": info,
            "settings": {"calls": n, "repeat": reps, "threads": args.thread_counts, "quick": args.quick},
            "cases": {
                c.key: {
                    "label": c.label,
                    "threads": c.threads,
                    "p50_us": [s.pct_us(0.5) for s in c.samples],
                    "p99_us": [s.pct_us(0.99) for s in c.samples],
                    "p999_us": [s.pct_us(0.999) for s in c.samples],
                    "max_us": [s.lat_ns[-1] / 1000 for s in c.samples],
                    "seconds": [s.seconds for s in c.samples],
                    "cpu_s": [s.cpu for s in c.samples],
                    "diverted": [s.diverted for s in c.samples],
                }
                for c in cases
            },
            "paused": {
                "p50_us": [s.pct_us(0.5) for s in paused_samples],
                "p99_us": [s.pct_us(0.99) for s in paused_samples],
                "p999_us": [s.pct_us(0.999) for s in paused_samples],
            },
            "goals": goals,
            "total_s": total_s,
        }
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=2)
            f.write("\n")
    failed = [g["goal"] for g in goals if not g["pass"]]
    if failed:
        log(f"goals failed: {', '.join(failed)}")
    return 1 if failed and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
