#!/usr/bin/env python3
"""Multi-process benchmark of quipu_logging: one command, one markdown table.

    python bench/processes.py [--records N] [--repeat R] [--quick] [--check] [--dir PARENT]

Durable records per second, through the real path (``logging`` -> ``AuditHandler`` ->
pipeline -> store, sync ``group:1000:20``), for:

* a single plain store written by one process (``AuditHandler(root)``), the baseline;
* a store set (``AuditHandler(root, shards="auto")``) written by 1, 2 and 4 processes,
  each on its own shard.

Each process is forked from a parent with no threads, builds its handler, logs one
warm-up record (so taking the shard is not timed), waits on a barrier, logs
``--records`` records as fast as it can, and calls ``flush()`` (which returns once
everything is fsynced). The figure is the processes' total records divided by the
time from the first process's start to the last process's ``flush()`` returning
(``time.monotonic`` is one clock for every process). Every figure is the median of
``--repeat`` repetitions, run round-robin. The goal row: 2 processes reach at least
1.7 x one process on the set; ``--check`` exits 1 when it fails.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import import_package, log, machine_info, print_table

import_package()

from quipu_logging import AuditHandler  # noqa: E402

SYNC = "group:1000:20"
GOAL = 1.7


def _worker(root: str, shards: Any, n: int, barrier: Any, results: Any) -> None:
    logger = logging.getLogger("bench.audit")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    # A queue that holds the whole run: the figure is the writer's durable rate, never the cost
    # of a fallback (a full queue would divert records to stderr and time that instead).
    handler = AuditHandler(
        root, shards=shards, sync=SYNC, queue_size=n + 1024, fallback=logging.NullHandler()
    )
    logger.addHandler(handler)
    logger.info("warm-up")  # takes the shard (or opens the store): not timed
    assert handler.flush(60)
    barrier.wait()
    start = time.monotonic()
    for i in range(n):
        logger.info("user %s updated doc", "alice", extra={"actor": "alice", "action": "update", "i": i})
    ok = handler.flush(120)
    end = time.monotonic()
    m = handler.metrics()
    handler.close()
    results.put((start, end, ok, m.get("written", 0), m.get("rejected", 0)))


def run_once(kind: str, procs: int, n: int, parent: str) -> float:
    """Durable records/s for one configuration."""
    ctx = multiprocessing.get_context("fork")
    root = tempfile.mkdtemp(prefix=f"{kind}-{procs}-", dir=parent)
    store_root = os.path.join(root, "audit")
    shards = "auto" if kind == "set" else None
    barrier = ctx.Barrier(procs)
    results = ctx.Queue()
    workers = [
        ctx.Process(target=_worker, args=(store_root, shards, n, barrier, results)) for _ in range(procs)
    ]
    for w in workers:
        w.start()
    got = [results.get(timeout=600) for _ in workers]
    for w in workers:
        w.join(60)
        if w.exitcode != 0:
            raise RuntimeError(f"a worker failed (exit code {w.exitcode})")
    shutil.rmtree(root)
    if not all(ok for _, _, ok, _, _ in got):
        raise RuntimeError("a flush timed out")
    diverted = sum(r for *_, r in got)
    if diverted:
        raise RuntimeError(
            f"{diverted} records went to the fallback in {kind} x{procs}: the figure would be wrong"
        )
    written = sum(w for _, _, _, w, _ in got) - procs  # the warm-up records are not timed
    elapsed = max(e for _, e, *_ in got) - min(s for s, *_ in got)
    return written / elapsed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--records", type=int, default=100_000, help="records per process (default 100,000)")
    p.add_argument("--repeat", type=int, default=5, help="repetitions per figure (default 5)")
    p.add_argument("--quick", action="store_true", help="small sizes for a fast smoke run")
    p.add_argument("--check", action="store_true", help="exit with status 1 when the goal fails")
    p.add_argument("--dir", default=None, help="where the stores go (default: a temporary directory)")
    args = p.parse_args(argv)
    if args.quick:
        args.records, args.repeat = 5_000, 1
    parent = tempfile.mkdtemp(prefix="quipu-bench-processes-", dir=args.dir)
    configs = [("store", 1), ("set", 1), ("set", 2), ("set", 4)]
    samples: dict[tuple[str, int], list[float]] = {c: [] for c in configs}
    try:
        info = machine_info(parent, {"records per process": f"{args.records:,}", "sync": SYNC})
        for key, value in info.items():
            print(f"- {key}: {value}")
        print()
        for rep in range(args.repeat):
            for kind, procs in configs:
                rate = run_once(kind, procs, args.records, parent)
                samples[(kind, procs)].append(rate)
                log(f"rep {rep + 1}/{args.repeat}: {kind} x{procs}: {rate:,.0f} records/s")
    finally:
        shutil.rmtree(parent, ignore_errors=True)
    median = {c: statistics.median(v) for c, v in samples.items()}
    one = median[("set", 1)]
    rows = []
    for kind, procs in configs:
        what = (
            "single plain store"
            if kind == "store"
            else f"store set, {procs} process{'es' if procs > 1 else ''}"
        )
        rows.append(
            [
                what,
                str(procs),
                f"{median[(kind, procs)]:,.0f}",
                f"{median[(kind, procs)] / one:.2f}x",
                ", ".join(f"{x:,.0f}" for x in samples[(kind, procs)]),
            ]
        )
    scaling = median[("set", 2)] / one
    passed = scaling >= GOAL
    rows.append(
        [
            f"goal: 2 processes >= {GOAL}x one process",
            "",
            "",
            f"{scaling:.2f}x",
            "PASS" if passed else "FAIL",
        ]
    )
    print_table(
        ["configuration", "processes", "durable records/s (median)", "vs set x1", "samples"],
        rows,
        right={1, 2, 3},
    )
    return 1 if args.check and not passed else 0


if __name__ == "__main__":
    sys.exit(main())
