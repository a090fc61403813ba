#!/usr/bin/env python3
"""What one ``logger.info`` call costs the caller, in CPU instructions (needs valgrind).

    python bench/emit_cost.py [--calls N]

Wall-clock percentiles on a shared machine move by tens of percent; instruction counts
do not. Each case runs in its own interpreter under ``valgrind --tool=callgrind``, with
``PYTHONHASHSEED=0`` and address-space randomisation off (``setarch -R``), and counts
only the instructions of the logging thread while it makes ``--calls`` calls of the
benchmark's call (``logger.info("user %s updated doc %s", actor, i, extra={...})``),
the loop being ``list(map(call, items))`` so that callgrind's ``--toggle-collect=map_next``
brackets exactly the calls. Background threads are held or absent, so only the caller's
work is counted (the writer's and the listener's are not); the garbage collector runs as
usual, so the cost of keeping queued objects alive is in.

Cases: the do-nothing handler (the floor of ``bench/emit.py``), the same with ``handle``
overridden to return at once (no handler lock: the least any handler costs), the least
any queueing handler costs (``handle`` puts a shallow copy of the record's attributes on
a ``SimpleQueue``, nothing else: no check that the copy is a snapshot, no bound, no
accounting), ``AuditHandler`` with its writer held between batches
(``testing.paused``), ``AuditHandler`` with its writer held in the middle of a batch
(by a logged value whose ``repr`` waits: while a batch runs, every call compares the
batch's stall deadline with ``record.created``, and that is what most calls of
``bench/emit.py`` meet, the writer being in a batch 95% of the time when the logging
thread runs), and the stdlib ``QueueHandler`` (no listener; its queue is unbounded).
The child checks that the writer really was held (all the calls still queued) and
fails otherwise.

Besides the total, the table gives the instructions the garbage collector's
collections took (counted inside ``gc_collect_main``): they are spread as a few long
pauses over the run, so they move the mean and the tail, not the median. The last
column compares the rest, what a typical call costs, which is what the p50 of
``bench/emit.py`` follows. One markdown table.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import import_package, log, machine_info, print_table

import_package()

CASES = {
    "floor": "do-nothing handler (the floor)",
    "lockfree": "handle() returns at once (no handler lock)",
    "copyput": "handle() puts record.__dict__.copy() on a SimpleQueue, nothing else",
    "audit": "AuditHandler (writer held between batches)",
    "audit-busy": "AuditHandler (writer held in the middle of a batch)",
    "stdqueue": "stdlib QueueHandler (no listener)",
}

CHILD = r"""
import sys
if sys.path and sys.path[0] == "":
    del sys.path[0]  # -c puts the current directory first: import what the parent imports
import logging, logging.handlers, os, queue, tempfile, threading
kind, n, work = sys.argv[1], int(sys.argv[2]), sys.argv[3]
sys.path += sys.argv[4:]  # the checkout, when the package is not installed
from quipu_logging import AuditHandler
from quipu_logging.testing import paused

class Nop(logging.Handler):
    def emit(self, record):
        pass

class LockFree(logging.Handler):
    def handle(self, record):
        return True

class Hang:  # an extra whose repr waits: the writer stops inside its batch
    def __init__(self):
        self.entered = threading.Event()
        self.release = threading.Event()
    def __repr__(self):
        self.entered.set()
        self.release.wait()
        return "hang"

class CopyPut(logging.Handler):
    def __init__(self):
        super().__init__()
        self.q = queue.SimpleQueue()
    def handle(self, record):
        self.q.put(record.__dict__.copy())
        return True

logger = logging.getLogger("bench.emit_cost")
logger.propagate = False
logger.setLevel(logging.INFO)
if kind == "floor":
    h = Nop()
elif kind == "lockfree":
    h = LockFree()
elif kind == "copyput":
    h = CopyPut()
elif kind == "audit":
    h = AuditHandler(os.path.join(work, "store"), queue_size=1 << 22)
    hold = paused(h)  # keep the reference: a dropped context manager releases the writer
    hold.__enter__()
elif kind == "audit-busy":
    h = AuditHandler(os.path.join(work, "store"), queue_size=1 << 22)
else:
    h = logging.handlers.QueueHandler(queue.Queue(-1))
logger.handlers[:] = [h]
if kind == "audit-busy":
    hang = Hang()
    logger.info("held", extra={"hang": hang})
    if not hang.entered.wait(600):
        sys.exit("the writer did not reach the hanging value")
info = logger.info
items = [(f"user-{i % 50}", i, {"actor": f"user-{i % 50}", "action": "update", "target": f"doc-{i}"})
         for i in range(n)]
def call(item, info=info):
    info("user %s updated doc %s", item[0], item[1], extra=item[2])
list(map(call, items))
if kind.startswith("audit"):
    m = h.metrics()
    if m["queue_depth"] != n or m["rejected"] or m["diverted_full"]:
        sys.stderr.write(f"the writer was not held: {m}\n")
        sys.stderr.flush()
        os._exit(3)
sys.stdout.flush()
os._exit(0)  # leave the held writer and the queue as they are: only the calls count
"""


def instructions(kind: str, calls: int, scratch: str) -> tuple[float, float | None]:
    """Instructions per call of the logging thread, and how many of them GC collections took."""
    work = tempfile.mkdtemp(prefix=f"cost-{kind}-", dir=scratch)
    out = os.path.join(work, "callgrind.out")
    here = os.path.dirname(os.path.abspath(__file__))
    cmd = [
        "valgrind",
        "--tool=callgrind",
        "--separate-threads=yes",
        "--toggle-collect=map_next",
        f"--callgrind-out-file={out}",
        sys.executable,
        "-c",
        CHILD,
        kind,
        str(calls),
        work,
        os.path.dirname(here),
    ]
    if shutil.which("setarch"):
        cmd = ["setarch", "-R", *cmd]
    env = dict(os.environ, PYTHONHASHSEED="0")
    done = subprocess.run(cmd, capture_output=True, env=env, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{kind}: the child failed ({done.returncode}): {done.stderr[-2000:]}")
    # Thread 1 is the logging thread; -02 and later are the writer's (held).
    total = None
    with open(out + "-01", encoding="utf-8") as f:
        for line in f:
            m = re.match(r"(?:summary|totals):\s+(\d+)", line)
            if m:
                total = int(m.group(1))
                break
    if total is None:
        raise SystemExit(f"no instruction total in {out}-01")
    return total / calls, _collections(out + "-01", calls)


def _collections(path: str, calls: int) -> float | None:
    """Instructions per call spent inside the garbage collector's collections, if known."""
    if shutil.which("callgrind_annotate") is None:
        return None
    annotated = subprocess.run(
        ["callgrind_annotate", "--inclusive=yes", "--threshold=100", path],
        capture_output=True,
        text=True,
    ).stdout
    found = [
        int(m.group(1).replace(",", ""))
        for m in re.finditer(r"^\s*([\d,]+) .*:gc_collect_main\b", annotated, re.MULTILINE)
    ]
    return max(found) / calls if found else 0.0


def main() -> int:
    p = argparse.ArgumentParser(description="caller-side instructions per logger.info call (valgrind)")
    p.add_argument("--calls", type=int, default=5000, help="calls per case (default 5,000)")
    p.add_argument("--dir", default=None, help="parent of the temporary files (default: current directory)")
    args = p.parse_args()
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed")
    parent = os.path.abspath(args.dir or os.getcwd())
    scratch = tempfile.mkdtemp(prefix="quipu-bench-cost-", dir=parent)
    try:
        cost, gc = {}, {}
        for kind in CASES:
            log(f"{kind} ...")
            cost[kind], gc[kind] = instructions(kind, args.calls, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    floor, std = cost["floor"], cost["stdqueue"]

    def typical(k: str) -> float | None:
        return None if gc[k] is None else cost[k] - gc[k]

    rows = []
    for k, label in CASES.items():
        t, t_std = typical(k), typical("stdqueue")
        rows.append(
            [
                label,
                f"{cost[k]:,.0f}",
                "?" if gc[k] is None else f"{gc[k]:,.0f}",
                f"{cost[k] - cost['lockfree']:+,.0f}",
                f"{cost[k] / floor:.3f}x",
                f"{cost[k] / std:.3f}x",
                "?" if t is None or not t_std else f"{t / t_std:.3f}x",
            ]
        )
    info = machine_info(parent)
    print("## quipu_logging caller-side cost (`bench/emit_cost.py`)")
    print()
    for key in ("date", "python", "platform", "quipu_logging"):
        if key in info:
            print(f"- {key}: {info[key]}")
    print(f"- {args.calls:,} calls per case; instructions of the logging thread only (callgrind)")
    print()
    print_table(
        [
            "case",
            "instructions / call",
            "of which GC collections",
            "vs no-lock handler",
            "÷ floor",
            "÷ stdlib QueueHandler",
            "÷ stdlib QueueHandler, collections left out",
        ],
        rows,
        right={1, 2, 3, 4, 5, 6},
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
