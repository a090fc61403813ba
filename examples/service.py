"""A small document service audited end to end: the way an application uses quipu_logging.

* **Every HTTP request** is audited through ordinary ``logging``, configured with
  ``dictConfig`` (the ``logging_config`` below): the ``service.access`` logger writes one
  record per request through an :class:`~quipu_logging.AuditHandler`, whose
  :class:`~quipu_logging.AuditContextFilter` adds ``actor`` (from the ``X-User`` header)
  and ``request_id`` (``X-Request-Id``, or a fresh one), which the request handler sets
  once with ``audit_context``; the record's ``action`` is the HTTP method, ``target`` the
  path and ``outcome`` the status code. It is logged before the response is sent: the
  client never hears of an action the trail does not hold (the call never waits on the
  disk, so this costs nothing).
* **Business events** (a document saved, a transfer created, a delete refused) go through
  structlog with :class:`~quipu_logging.structlog.AuditProcessor` on the same handler, so
  they share its queue, its fallback, its counters and its request context.
* Records the audit queue cannot take go to the ``audit_fallback`` file handler (JSON
  lines shaped like stored records), and the store records a ``gap`` saying how many.
* **SIGTERM** is turned into a clean shutdown: stop accepting, let the request threads
  finish, then ``logging.shutdown()`` drains the queue, fsyncs and writes a checkpoint.

Endpoints: ``GET /health``; ``GET|PUT|DELETE /docs/<id>`` (writing needs an ``X-User``;
deleting needs ``admin``); ``POST /transfers`` with ``{"amount": cents, "to": account}``;
for the demo, as ``admin``: ``POST /admin/writer/pause`` and ``/admin/writer/resume``
(hold the audit writer, as a stalled disk would, so a burst overflows the queue) and
``GET /admin/metrics``.

Run it with ``python examples/service.py --dir DIR [--port N] [--queue-size N] [--workers N]``;
it prints one JSON line ``{"port": ..., "pid": ...}`` when it listens (on 127.0.0.1 only), and
on exit writes ``DIR/service-metrics.json``. ``examples/demo.py`` drives it (``make demo``).

With ``--workers N`` (N > 1) it runs like ``gunicorn --preload``: the parent configures
logging once, with ``shards="auto"`` (the store becomes a store set), binds the socket and
forks N worker processes that share it; each worker takes its own shard at its first
record. SIGTERM to the parent stops every worker cleanly; ``service-metrics.json`` then
holds the workers' counters added up.
"""

from __future__ import annotations

import argparse
import http.server
import itertools
import json
import logging
import logging.config
import os
import signal
import socket
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import structlog

from quipu_logging import AuditHandler
from quipu_logging.context import audit_context
from quipu_logging.structlog import AuditProcessor
from quipu_logging.testing import paused

ACCESS = logging.getLogger("service.access")


def logging_config(directory: Path, queue_size: int, shards: str | None = None) -> dict[str, Any]:
    """The service's logging: the audit handler, its fallback file and the context filter.

    ``shards="auto"`` makes the store a store set, for several worker processes.
    """
    audit: dict[str, Any] = {
        "class": "quipu_logging.AuditHandler",
        "root": str(directory / "audit"),
        "queue_size": queue_size,
        "fallback": "audit_fallback",
        "filters": ["audit_context"],
    }
    if shards is not None:
        audit["shards"] = shards
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {
            "audit_context": {"()": "quipu_logging.AuditContextFilter", "fields": ["actor", "request_id"]},
        },
        "formatters": {
            "audit_json": {"()": "quipu_logging.AuditJsonFormatter"},
        },
        "handlers": {
            "audit": audit,
            "audit_fallback": {
                "class": "logging.FileHandler",
                "filename": str(directory / "fallback.jsonl"),
                "formatter": "audit_json",
            },
        },
        "loggers": {
            "service.access": {"handlers": ["audit"], "level": "INFO", "propagate": False},
        },
    }


def configure_structlog(handler: AuditHandler) -> None:
    """Business events: structlog, stored through the same audit handler (and nowhere else)."""
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso"),
            AuditProcessor(handler, drop=True),  # the audit store is this chain's only output
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        cache_logger_on_first_use=True,
    )


class WriterHold:
    """Holds the audit writer from one request to another (the demo's stalled disk)."""

    def __init__(self, handler: AuditHandler) -> None:
        self._handler = handler
        self._lock = threading.Lock()
        self._release = threading.Event()
        self._thread: threading.Thread | None = None

    def pause(self) -> bool:
        with self._lock:
            if self._thread is not None:
                return False
            held = threading.Event()
            self._release.clear()

            def hold() -> None:
                with paused(self._handler):
                    held.set()
                    self._release.wait()

            self._thread = threading.Thread(target=hold, name="writer-hold", daemon=True)
            self._thread.start()
            return held.wait(10)

    def resume(self) -> bool:
        with self._lock:
            thread, self._thread = self._thread, None
            if thread is None:
                return False
            self._release.set()
            thread.join()
            return True


class DocumentApp:
    """The business logic: documents and transfers in memory."""

    def __init__(self, handler: AuditHandler) -> None:
        self.handler = handler
        self.hold = WriterHold(handler)
        self.events = structlog.get_logger().bind(logger="service.events")
        self._lock = threading.Lock()
        self._docs: dict[str, dict[str, Any]] = {
            str(i): {"title": f"document {i}", "version": 1} for i in range(200)
        }
        self._transfers = itertools.count(1)

    def route(self, method: str, path: str, actor: str, body: bytes) -> tuple[int, Any]:
        parts = path.split("?", 1)[0].strip("/").split("/")
        if parts == ["health"] and method == "GET":
            return 200, {"status": "ok", "audit": self.handler.health()["status"]}
        if len(parts) == 2 and parts[0] == "docs":
            return self._document(method, parts[1], actor, body)
        if parts == ["transfers"] and method == "POST":
            return self._transfer(actor, body)
        if parts[0] == "admin":
            return self._admin(method, parts[1:], actor)
        return 404, {"error": "not found"}

    def _document(self, method: str, doc_id: str, actor: str, body: bytes) -> tuple[int, Any]:
        if method == "GET":
            with self._lock:
                doc = self._docs.get(doc_id)
            return (200, doc) if doc is not None else (404, {"error": "no such document"})
        if actor == "anonymous":
            return 401, {"error": "sign in first"}
        if method == "PUT":
            try:
                title = str(json.loads(body)["title"])
            except (ValueError, KeyError, TypeError):
                return 400, {"error": 'expected {"title": ...}'}
            with self._lock:
                version = self._docs.get(doc_id, {"version": 0})["version"] + 1
                self._docs[doc_id] = {"title": title, "version": version}
            self.events.info("document.saved", doc=doc_id, version=version, title_chars=len(title))
            return 200, {"doc": doc_id, "version": version}
        if method == "DELETE":
            if actor != "admin":
                self.events.warning("document.delete_denied", doc=doc_id)
                return 403, {"error": "only admin may delete"}
            with self._lock:
                gone = self._docs.pop(doc_id, None)
            if gone is None:
                return 404, {"error": "no such document"}
            self.events.info("document.deleted", doc=doc_id, version=gone["version"])
            return 204, None
        return 405, {"error": "method not allowed"}

    def _transfer(self, actor: str, body: bytes) -> tuple[int, Any]:
        if actor == "anonymous":
            return 401, {"error": "sign in first"}
        try:
            order = json.loads(body)
            amount, to = int(order["amount"]), str(order["to"])
        except (ValueError, KeyError, TypeError):
            return 400, {"error": 'expected {"amount": cents, "to": account}'}
        if amount <= 0:
            return 400, {"error": "amount must be positive"}
        transfer = f"t-{next(self._transfers)}"
        self.events.info("transfer.created", transfer=transfer, amount_cents=amount, to=to)
        return 201, {"transfer": transfer}

    def _admin(self, method: str, parts: list[str], actor: str) -> tuple[int, Any]:
        if actor != "admin":
            return 403, {"error": "admin only"}
        if parts == ["writer", "pause"] and method == "POST":
            return (200, {"writer": "paused"}) if self.hold.pause() else (409, {"error": "already paused"})
        if parts == ["writer", "resume"] and method == "POST":
            return (200, {"writer": "running"}) if self.hold.resume() else (409, {"error": "not paused"})
        if parts == ["metrics"] and method == "GET":
            metrics = self.handler.metrics()
            metrics.pop("write_latency", None)
            return 200, metrics
        return 404, {"error": "not found"}


class AuditedRequestHandler(http.server.BaseHTTPRequestHandler):
    """Reads one request, audits it, answers it (HTTP/1.1 keep-alive)."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body leave in separate writes
    timeout = 30  # seconds a silent keep-alive connection is kept
    server: Service

    def setup(self) -> None:
        super().setup()
        self.server.track(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.untrack(self.connection)

    def log_message(self, format: str, *args: Any) -> None:
        """The audit trail replaces the stderr access log."""

    def do_GET(self) -> None:
        self._serve()

    def do_PUT(self) -> None:
        self._serve()

    def do_POST(self) -> None:
        self._serve()

    def do_DELETE(self) -> None:
        self._serve()

    def _serve(self) -> None:
        started = time.perf_counter_ns()
        actor = self.headers.get("X-User") or "anonymous"
        request_id = self.headers.get("X-Request-Id") or uuid.uuid4().hex
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        with audit_context(actor=actor, request_id=request_id):
            try:
                status, payload = self.server.app.route(self.command, self.path, actor, body)
            except Exception:
                structlog.get_logger().bind(logger="service.events").exception("request.failed")
                status, payload = 500, {"error": "internal error"}
            ACCESS.info(
                "%s %s -> %d",
                self.command,
                self.path,
                status,
                extra={
                    "action": self.command,
                    "target": self.path,
                    "outcome": status,
                    "duration_us": (time.perf_counter_ns() - started) // 1000,
                },
            )
        data = b"" if payload is None else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("X-Request-Id", request_id)
        self.end_headers()
        if data:
            self.wfile.write(data)
        self.server.served()


class Service(http.server.ThreadingHTTPServer):
    """A thread per connection; ``server_close()`` waits for every one of them."""

    # Joined on close, so no request logs after the audit handler has closed.
    daemon_threads = False
    block_on_close = True

    def __init__(self, address: tuple[str, int], app: DocumentApp) -> None:
        super().__init__(address, AuditedRequestHandler)
        self.app = app
        self.requests_served = 0
        self._count_lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()

    def served(self) -> None:
        with self._count_lock:
            self.requests_served += 1

    def track(self, conn: socket.socket) -> None:
        with self._open_lock:
            self._open.add(conn)

    def untrack(self, conn: socket.socket) -> None:
        with self._open_lock:
            self._open.discard(conn)

    def end_idle_connections(self) -> None:
        """Ends the wait for a next request on every open keep-alive connection."""
        with self._open_lock:
            conns = list(self._open)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RD)
            except OSError:
                pass


def audit_handler() -> AuditHandler:
    for handler in ACCESS.handlers:
        if isinstance(handler, AuditHandler):
            return handler
    raise RuntimeError("logging is not configured with an AuditHandler on service.access")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--dir", required=True, type=Path, help="where the store and the fallback file go")
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default: a free one)")
    parser.add_argument("--queue-size", type=int, default=4096, help="the audit queue's capacity")
    parser.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    args = parser.parse_args(argv)
    directory: Path = args.dir
    directory.mkdir(parents=True, exist_ok=True)
    if args.workers > 1:
        return serve_workers(directory, args.queue_size, args.port, args.workers)

    # SIGTERM (docker stop, systemd, Kubernetes) becomes SystemExit in the main thread,
    # so the finally block below runs instead of the process dying with records queued.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    logging.config.dictConfig(logging_config(directory, args.queue_size))
    handler = audit_handler()
    configure_structlog(handler)
    app = DocumentApp(handler)
    server = Service(("127.0.0.1", args.port), app)
    print(json.dumps({"port": server.server_address[1], "pid": os.getpid()}), flush=True)
    started = time.monotonic()
    try:
        server.serve_forever(poll_interval=0.2)
    except (SystemExit, KeyboardInterrupt):
        pass
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        server.end_idle_connections()
        server.server_close()  # stops accepting and waits for every request thread
        app.hold.resume()
        logging.shutdown()  # the audit handler drains its queue, fsyncs, writes a checkpoint
        metrics = handler.metrics()
        metrics.pop("write_latency", None)
        report = {
            "requests_served": server.requests_served,
            "uptime_s": round(time.monotonic() - started, 3),
            "audit": metrics,
        }
        (directory / "service-metrics.json").write_text(json.dumps(report, indent=2, sort_keys=True))
        print(
            f"service: stopped cleanly after {server.requests_served} requests; "
            f"{metrics['written']} audit records stored, {metrics['rejected']} diverted to the fallback",
            file=sys.stderr,
        )
    return 0


def _report(server: Service, handler: AuditHandler, started: float) -> dict[str, Any]:
    metrics = handler.metrics()
    metrics.pop("write_latency", None)
    return {
        "requests_served": server.requests_served,
        "uptime_s": round(time.monotonic() - started, 3),
        "audit": metrics,
    }


def serve_workers(directory: Path, queue_size: int, port: int, workers: int) -> int:
    """``--workers N``: configure once, bind once, fork N workers (as ``gunicorn --preload``)."""
    logging.config.dictConfig(logging_config(directory, queue_size, shards="auto"))
    handler = audit_handler()
    configure_structlog(handler)
    server = Service(("127.0.0.1", port), DocumentApp(handler))
    pids = []
    for _ in range(workers):
        pid = os.fork()
        if pid == 0:  # a worker: serve until SIGTERM, then close its own shard
            code = 1
            try:
                signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
                server.app = DocumentApp(handler)  # per-process state
                started = time.monotonic()
                try:
                    server.serve_forever(poll_interval=0.2)
                except (SystemExit, KeyboardInterrupt):
                    pass
                finally:
                    signal.signal(signal.SIGTERM, signal.SIG_IGN)
                    server.end_idle_connections()
                    server.server_close()
                    logging.shutdown()  # this worker's shard: drained, fsynced, checkpointed
                    report = _report(server, handler, started)
                    (directory / f"service-metrics-{os.getpid()}.json").write_text(json.dumps(report))
                code = 0
            finally:
                os._exit(code)  # never run the parent's code in a worker
        pids.append(pid)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    print(json.dumps({"port": server.server_address[1], "pid": os.getpid(), "workers": pids}), flush=True)
    status = 0
    try:
        while pids:
            done, code = os.wait()
            if done in pids:
                pids.remove(done)
                status = status or os.waitstatus_to_exitcode(code)
    except (SystemExit, KeyboardInterrupt):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for pid in pids:
            os.kill(pid, signal.SIGTERM)
        for pid in pids:
            _, code = os.waitpid(pid, 0)
            status = status or os.waitstatus_to_exitcode(code)
    server.server_close()
    logging.shutdown()
    total: dict[str, Any] = {"requests_served": 0, "workers": 0, "audit": {}}
    for path in sorted(directory.glob("service-metrics-*.json")):
        report = json.loads(path.read_text())
        total["workers"] += 1
        total["requests_served"] += report["requests_served"]
        for key, value in report["audit"].items():
            if isinstance(value, int) and not isinstance(value, bool):
                total["audit"][key] = total["audit"].get(key, 0) + value
    (directory / "service-metrics.json").write_text(json.dumps(total, indent=2, sort_keys=True))
    return status


if __name__ == "__main__":
    sys.exit(main())
