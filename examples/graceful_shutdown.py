"""Turning SIGTERM into a clean shutdown, so every record the application logged is stored.

A container runtime, systemd or Kubernetes stops a process with SIGTERM. Its default
action kills the process on the spot: whatever the audit queue still holds is lost
(``flush()`` returning ``True`` is the only durability promise). One line turns it into
an ordinary exit instead::

    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))

``SystemExit`` is raised in the main thread: ``finally`` blocks run (here: stop the
workers and wait for them), then the audit pipeline closes (``logging.shutdown()``, or
``atexit`` if you do not call it) by draining its queue, fsyncing and writing a checkpoint.

This worker logs one audit record per job from two threads and prints ``ack N`` after
each logging call returned; a test sends it SIGTERM and checks every acknowledged job is
in the store. Run it with ``python examples/graceful_shutdown.py DIR`` and stop it with
``kill -TERM <pid>`` (or Ctrl-C).
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from pathlib import Path

from quipu_logging import AuditHandler


def work(worker: int, stop: threading.Event, log: logging.Logger, out_lock: threading.Lock) -> None:
    job = 0
    while not stop.is_set():
        job_id = f"{worker}-{job}"
        log.info(
            "job %s done", job_id, extra={"action": "process", "target": job_id, "actor": f"worker-{worker}"}
        )
        with out_lock:
            print(f"ack {job_id}", flush=True)
        job += 1
        stop.wait(0.0005)  # the job's real work would be here


def main(directory: Path) -> int:
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))

    handler = AuditHandler(directory / "audit")
    log = logging.getLogger("worker.audit")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False

    stop = threading.Event()
    out_lock = threading.Lock()
    workers = [
        threading.Thread(target=work, args=(n, stop, log, out_lock), name=f"worker-{n}") for n in range(2)
    ]
    for t in workers:
        t.start()
    try:
        stop.wait()  # the main thread only waits: SIGTERM raises SystemExit here
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the shutdown short
        stop.set()
        for t in workers:
            t.join()
        queued = handler.metrics()["queue_depth"]
        logging.shutdown()  # closes the handler: the queue is drained, fsynced, checkpointed
        written = handler.metrics()["written"]
        print(f"shut down cleanly: {queued} records were still queued; {written} stored", file=sys.stderr)
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python examples/graceful_shutdown.py DIR")
    sys.exit(main(Path(sys.argv[1])))
