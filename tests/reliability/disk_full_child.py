"""The full-disk scenario, run inside a private mount namespace (``unshare --mount``).

Started by ``test_disk_full.py`` as ``unshare --mount -- python disk_full_child.py ARGS``:
it mounts a small tmpfs on ``--mount`` (the mount dies with this process), puts the
store there, fills the rest of the tmpfs with a ballast file, logs through an
``AuditHandler`` while the disk is full, frees the space, logs again, redrives the
DLQ, closes, verifies, and prints one JSON report on stdout for the test to judge.

``--dlq other`` puts the DLQ on another file system (``--outside``); ``--dlq same``
leaves it in the store root, on the full tmpfs, so parking fails too and records go
to the fallback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import threading
from typing import Any

from quipu_logging import AuditHandler, AuditPipeline, AuditStore, PipelineConfig, StoreConfig

WAIT = 60.0
THREADS = 3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mount", required=True)
    parser.add_argument("--outside", required=True)
    parser.add_argument("--dlq", choices=("other", "same"), required=True)
    parser.add_argument("--size", default="2m")
    args = parser.parse_args()

    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={args.size}", "tmpfs", args.mount], check=True)
    root = os.path.join(args.mount, "store")
    dlq_dir = os.path.join(args.outside, "dlq") if args.dlq == "other" else None
    fallback_path = os.path.join(args.outside, "fallback.jsonl")
    fallback_fd = os.open(fallback_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    class FileFallback(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            os.write(fallback_fd, (json.dumps({"n": getattr(record, "n", None)}) + "\n").encode())

    if dlq_dir is not None:
        pipeline = AuditPipeline.start(
            StoreConfig(root=root, sync="group:100:5", max_segment_bytes=128 * 1024),
            config=PipelineConfig(dlq_dir=dlq_dir, retry_backoff=0.001, housekeeping_interval=0.05),
        )
        handler = AuditHandler(pipeline=pipeline, fallback=FileFallback())
    else:
        # The plain form, as a dictConfig user has it: the handler owns the pipeline and binds
        # the pipeline's on_lost to its fallback (with pipeline=..., on_lost is the caller's).
        handler = AuditHandler(root, sync="group:100:5", fallback=FileFallback())
        assert handler.pipeline is not None
        pipeline = handler.pipeline
    logger = logging.getLogger("diskfull")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    raised: list[str] = []
    counter = {"n": 0}
    lock = threading.Lock()

    def log_some(count: int) -> None:
        def work() -> None:
            for _ in range(count):
                with lock:
                    n = counter["n"]
                    counter["n"] += 1
                try:
                    logger.info("record %d", n, extra={"n": n, "pad": "p" * 400})
                except BaseException as e:  # the app must never see one
                    raised.append(repr(e))

        threads = [threading.Thread(target=work) for _ in range(THREADS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(WAIT)
            if t.is_alive():
                raised.append("a logging call did not return")

    report: dict[str, Any] = {}
    log_some(30)
    report["flush_before"] = handler.flush(WAIT)

    # Fill the tmpfs: whatever the store wants to write next will not fit.
    ballast = os.path.join(args.mount, "ballast")
    fd = os.open(ballast, os.O_WRONLY | os.O_CREAT, 0o644)
    chunk = b"\0" * 4096
    try:
        while True:
            os.write(fd, chunk)
    except OSError as e:
        report["ballast_errno"] = e.errno
    finally:
        os.close(fd)
    report["free_when_full"] = os.statvfs(args.mount).f_bavail

    log_some(200)
    report["flush_full"] = handler.flush(WAIT)
    report["health_full"] = handler.health()
    report["metrics_full"] = _plain(handler.metrics())

    os.unlink(ballast)
    log_some(30)
    report["flush_after"] = handler.flush(WAIT)
    report["health_after"] = handler.health()
    try:
        report["redriven"] = pipeline.handle().redrive_dlq("app", timeout=WAIT)
    except Exception as e:
        report["redrive_error"] = repr(e)
    report["flush_final"] = handler.flush(WAIT)
    report["metrics_final"] = _plain(handler.metrics())
    report["health_final"] = handler.health()
    logger.removeHandler(handler)
    handler.close()
    report["pipeline_closed"] = pipeline.close(WAIT) and pipeline.closed
    report["raised"] = raised
    report["logged"] = counter["n"]

    with AuditStore.open_reader(root) as reader:
        verify = reader.verify()
        report["verify_ok"] = verify.ok
        report["problems"] = [str(p) for p in verify.problems[:10]]
        stored: dict[int, int] = {}
        gaps = 0
        for r in reader.scan():
            if r.payload.get("$sys") == "gap":
                gaps += 1
            elif "n" in r.payload:
                stored[r.payload["n"]] = stored.get(r.payload["n"], 0) + 1
    report["stored"] = stored
    report["gap_records"] = gaps
    with open(fallback_path) as f:
        report["fallback"] = [json.loads(line)["n"] for line in f]
    report["dlq_left"] = sorted(os.listdir(dlq_dir or os.path.join(root, "dlq")))
    sys.stdout.write(json.dumps(report) + "\n")


def _plain(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, bool))}


if __name__ == "__main__":
    main()
