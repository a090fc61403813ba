"""Soak: 8 producer threads against a writer slowed on purpose, with a tailing reader and a verifier.

Issue 6 requirement 8. For ``--seconds`` (default 300) eight threads log through an
``AuditHandler`` at a steady pace; every ``--period`` seconds the writer's file layer turns
slow for a while (each segment write sleeps ``--delay`` ms), so the bounded queue overflows
and records go to the fallback, then it recovers. Meanwhile a reader tails the store with
``open_reader``/``refresh`` checking that ``seq`` never skips, and a verifier runs
``verify()`` on a separate reader again and again. At the end it checks and prints, as one
table:

* the accounting identities (``offered == accepted + rejected_*``, ``accepted == written +
  parked + handed_off + lost``, ``rejected == fallback_ok + fallback_failed``);
* that every record logged is in the store exactly once or in the fallback exactly once;
* a final ``verify()``;
* peak RSS (``ru_maxrss``) and RSS samples over the run, to show memory stayed bounded.

It exits 1 when a check fails. ::

    python bench/soak.py                 # 5 minutes
    python bench/soak.py --seconds 60    # a shorter run
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import shutil
import sys
import tempfile
import threading
import time
from typing import Any

from _common import cpu_model, filesystem_of, import_package, log

import_package()

from quipu_logging import AuditHandler, AuditPipeline, AuditStore, PipelineConfig, StoreConfig  # noqa: E402
from quipu_logging.store import FileLayer  # noqa: E402

PRODUCERS = 8


class SlowLayer(FileLayer):
    """The real file layer; while ``slow`` is set, each segment write sleeps first (the injected fault)."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.slow = threading.Event()
        self.paths: dict[int, str] = {}

    def open(self, path: str, flags: int, mode: int = 0o644) -> int:
        fd = super().open(path, flags, mode)
        self.paths[fd] = path
        return fd

    def close(self, fd: int) -> None:
        self.paths.pop(fd, None)
        super().close(fd)

    def pwrite(self, fd: int, data: bytes, offset: int) -> None:
        if self.slow.is_set() and os.path.basename(self.paths.get(fd, "")).startswith("seg-"):
            time.sleep(self.delay)
        super().pwrite(fd, data, offset)


class CountingFallback(logging.Handler):
    """Marks each diverted record in a per-producer bitmap (bounded memory for millions of records)."""

    def __init__(self, marks: list[bytearray]) -> None:
        super().__init__()
        self.marks = marks
        self.count = 0
        self.twice = 0

    def emit(self, record: logging.LogRecord) -> None:
        p, n = record.p, record.n  # type: ignore[attr-defined]
        self.count += 1
        if self.marks[p][n]:
            self.twice += 1
        self.marks[p][n] = 2


def rss_kib() -> int:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=300.0, help="how long producers log (default 300)")
    parser.add_argument("--rate", type=int, default=1500, help="records/s per producer (default 1500)")
    parser.add_argument("--queue-size", type=int, default=2048)
    parser.add_argument("--delay", type=float, default=20.0, help="ms each segment write sleeps while slow")
    parser.add_argument("--period", type=float, default=10.0, help="seconds between slow phases")
    parser.add_argument("--slow-for", type=float, default=2.0, help="seconds each slow phase lasts")
    parser.add_argument("--dir", default=".", help="where the temporary store goes (removed afterwards)")
    args = parser.parse_args()

    base = tempfile.mkdtemp(prefix="quipu-soak-", dir=args.dir)
    root = os.path.join(base, "store")
    layer = SlowLayer(args.delay / 1000.0)
    capacity = int(args.rate * args.seconds * 1.2) + 10_000
    marks = [bytearray(capacity) for _ in range(PRODUCERS)]
    fallback = CountingFallback(marks)
    pipeline = AuditPipeline.start(
        StoreConfig(root=root, file_layer=layer, max_segment_bytes="16MiB"),
        config=PipelineConfig(queue_size=args.queue_size, stall_timeout=30.0),
    )
    handler = AuditHandler(pipeline=pipeline, fallback=fallback)
    logger = logging.Logger("soak", logging.INFO)
    logger.addHandler(handler)
    stop = threading.Event()
    logged = [0] * PRODUCERS
    raised: list[str] = []
    tail = {"records": 0, "skips": 0, "refreshes": 0}
    verifies = {"runs": 0, "failed": 0, "last_size": 0}
    rss: list[tuple[float, int]] = []
    slow_phases = [0]

    def produce(p: int) -> None:
        n = 0
        started = time.monotonic()
        burst = max(1, args.rate // 100)
        while not stop.is_set():
            for _ in range(burst):
                try:
                    logger.info("soak %d %d", p, n, extra={"p": p, "n": n, "actor": f"user-{n % 97}"})
                except BaseException as e:  # the app must never see one
                    raised.append(repr(e))
                n += 1
            logged[p] = n
            # pace to --rate: sleep until this many records are due (the workload, not synchronisation)
            ahead = n / args.rate - (time.monotonic() - started)
            if ahead > 0:
                stop.wait(ahead)

    def slow_controller() -> None:
        while not stop.wait(args.period - args.slow_for):
            layer.slow.set()
            slow_phases[0] += 1
            stop.wait(args.slow_for)
            layer.slow.clear()

    def tailer() -> None:
        reader = AuditStore.open_reader(root)
        nxt = 0
        try:
            while not stop.is_set():
                reader.refresh()
                tail["refreshes"] += 1
                got = False
                for rec in reader.scan(nxt):
                    if rec.seq != nxt:
                        tail["skips"] += 1
                    nxt = rec.seq + 1
                    tail["records"] += 1
                    got = True
                if not got:
                    stop.wait(0.05)
        finally:
            reader.close()

    def verifier() -> None:
        while not stop.is_set():
            with AuditStore.open_reader(root) as reader:
                report = reader.verify()
            verifies["runs"] += 1
            verifies["failed"] += int(not report.ok)
            verifies["last_size"] = report.tree_size
            stop.wait(1.0)

    def sampler() -> None:
        t0 = time.monotonic()
        while not stop.wait(5.0):
            rss.append((time.monotonic() - t0, rss_kib()))

    threads = [threading.Thread(target=produce, args=(p,), name=f"producer-{p}") for p in range(PRODUCERS)]
    helpers = (slow_controller, tailer, verifier, sampler)
    threads += [threading.Thread(target=f, name=f.__name__) for f in helpers]
    log(f"soak: {PRODUCERS} producers x {args.rate}/s for {args.seconds:.0f}s, store {root}")
    t0 = time.monotonic()
    for t in threads:
        t.start()
    try:
        while time.monotonic() - t0 < args.seconds:
            time.sleep(min(10.0, max(0.0, args.seconds - (time.monotonic() - t0))))
            m = handler.metrics()
            log(
                f"  {time.monotonic() - t0:6.0f}s written {m['written']:>10,} diverted {m['rejected']:>9,} "
                f"queue {m['queue_depth']:>5} rss {rss_kib() // 1024} MiB"
            )
    finally:
        stop.set()
        for t in threads:
            t.join(120)
    layer.slow.clear()
    flushed = handler.flush(120)
    handler.close()
    closed = pipeline.close(120)
    m = handler.metrics()
    elapsed = time.monotonic() - t0

    # Every record is in exactly one place: the store (once) or the fallback (once).
    twice_stored = 0
    gaps = 0
    with AuditStore.open_reader(root) as reader:
        final = reader.verify()
        for rec in reader.scan():
            pl = rec.payload
            if "$sys" in pl:
                gaps += pl.get("$sys") == "gap"
                continue
            p, n = pl["p"], pl["n"]
            if marks[p][n]:
                twice_stored += 1
            marks[p][n] = 1
    missing = sum(1 for p in range(PRODUCERS) for n in range(logged[p]) if not marks[p][n])
    total = sum(logged)
    identities = (
        m["offered"] == m["accepted"] + m["rejected_full"] + m["rejected_closed"] + m["rejected_disk_full"]
        and m["accepted"] == m["written"] + m["parked"] + m["handed_off"] + m["lost"]
        and m["parked"] == m["redriven"] + m["parked_now"]
        and m["rejected"] == m["fallback_ok"] + m["fallback_failed"]
        and m["offered"] == total
    )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    quarter = [kib for t, kib in rss if t >= elapsed / 4]
    checks = {
        "identities hold": identities,
        "each record stored once or in the fallback once": not (missing or twice_stored or fallback.twice),
        "final verify": final.ok,
        "verifier never failed": verifies["failed"] == 0 and verifies["runs"] > 0,
        "tail never skipped a seq": tail["skips"] == 0 and tail["records"] > 0,
        "the app was never raised into": not raised,
        "flush and close succeeded": flushed and closed,
        "the queue overflowed (the test did its job)": m["rejected_full"] > 0,
    }
    rows: list[tuple[str, Any]] = [
        ("duration", f"{elapsed:.0f} s ({args.seconds:.0f} s of logging)"),
        ("producers x target rate", f"{PRODUCERS} x {args.rate:,}/s"),
        (f"slow phases (segment writes +{args.delay:.0f} ms)", f"{slow_phases[0]} x {args.slow_for:.0f} s"),
        ("records logged (offered)", f"{m['offered']:,}"),
        ("written to the store", f"{m['written']:,}"),
        ("diverted to the fallback (queue full)", f"{m['rejected_full']:,}"),
        ("other diversions (closed / disk full)", f"{m['rejected_closed'] + m['rejected_disk_full']:,}"),
        ("parked / handed off / lost", f"{m['parked']:,} / {m['handed_off']:,} / {m['lost']:,}"),
        ("gap records in the trail", f"{gaps:,}"),
        ("records read by the tailing reader", f"{tail['records']:,}"),
        ("concurrent verify runs (failed)", f"{verifies['runs']} ({verifies['failed']})"),
        ("final verify", f"{'ok' if final.ok else 'FAILED'}, tree size {final.tree_size:,}"),
        ("peak RSS", f"{peak / 1024:.0f} MiB"),
        (
            "RSS after the first quarter: min / max",
            f"{min(quarter) / 1024:.0f} / {max(quarter) / 1024:.0f} MiB" if quarter else "n/a",
        ),
    ]
    python = sys.version.split()[0]
    print(f"Soak on {cpu_model()}, {os.cpu_count()} CPUs, Python {python}, {filesystem_of(base)}")
    print()
    print("| soak | value |")
    print("|---|--:|")
    for name, value in rows:
        print(f"| {name} | {value} |")
    for name, ok in checks.items():
        print(f"| check: {name} | {'PASS' if ok else '**FAIL**'} |")
    shutil.rmtree(base, ignore_errors=True)
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
