"""One audit trail from real worker processes (issue 7 requirement 5).

``multiprocessing.Pool`` of 4 under fork and under spawn, workers SIGKILLed and
restarted, and a WSGI app behind real gunicorn with 4 workers, with and without
``--preload``, configured through dictConfig (the README's gunicorn.conf.py as pasted),
4,000 real HTTP requests from concurrent clients. Afterwards the set verifies, holds
exactly one record per request id, and nothing went to the fallback.

Waiting is always on a real condition with a deadline (a socket accepting
connections, a counter, a process exit), never a sleep.
"""

from __future__ import annotations

import collections
import http.client
import multiprocessing
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from quipu_logging import AuditStore, StoreSetReader

CHECKOUT = Path(__file__).resolve().parent.parent
FORK_WARNING = "ignore:This process .* is multi-threaded:DeprecationWarning"

WORKER_MODULE = '''
"""Workers for tests/test_processes.py (importable by spawned children)."""
import logging
import logging.config
import os

LOG = logging.getLogger("audit")


def configure(root, fallback):
    logging.config.dictConfig({
        "version": 1,
        "disable_existing_loggers": False,
        "handlers": {
            "audit": {"class": "quipu_logging.AuditHandler", "root": root, "shards": "auto",
                      "fallback": "audit_fallback"},
            "audit_fallback": {"class": "logging.FileHandler", "filename": fallback},
        },
        "loggers": {"audit": {"handlers": ["audit"], "level": "INFO", "propagate": False}},
    })


def handle(request_id):
    LOG.info("handled", extra={"request_id": request_id, "worker": os.getpid()})
    return os.getpid()


def run_forever(prefix, counter):
    """Logs until killed; counter says how many records are known durable."""
    handler = LOG.handlers[0]
    i = 0
    while True:
        LOG.info("loop", extra={"request_id": f"{prefix}-{i}"})
        i += 1
        if i % 25 == 0:
            assert handler.flush()
            with counter.get_lock():
                counter.value = i


def run_some(prefix, n):
    for i in range(n):
        LOG.info("loop", extra={"request_id": f"{prefix}-{i}"})
'''


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[object]:
    """The worker module, importable here and in spawned children (sys.path is inherited)."""
    (tmp_path / "qp_workers.py").write_text(WORKER_MODULE)
    sys.path.insert(0, str(tmp_path))
    try:
        import qp_workers

        yield qp_workers
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("qp_workers", None)
        import logging.config

        logging.config.dictConfig({"version": 1, "disable_existing_loggers": False})


def _check_set(root: Path, expected_ids: set[str], fallback: Path) -> StoreSetReader:
    """The set verifies, holds each request id exactly once, and nothing went to the fallback."""
    reader = AuditStore.open_reader(root)
    assert isinstance(reader, StoreSetReader)
    report = reader.verify()
    assert report.ok, report.problems[:5]
    ids = collections.Counter(
        r.payload["request_id"]
        for r in reader.scan()
        if "$sys" not in r.payload and "request_id" in r.payload
    )
    assert {i for i in ids if not i.startswith("probe-")} == expected_ids  # readiness probes aside
    assert max(ids.values()) == 1
    assert not fallback.exists() or fallback.read_text() == ""
    gaps = [r for r in reader.scan() if r.payload.get("$sys") == "gap"]
    assert gaps == []
    return reader


class TestPool:
    @pytest.mark.filterwarnings(FORK_WARNING)
    def test_fork_pool_of_4(self, tmp_path: Path, workers: object) -> None:
        """Configured once in the parent, forked Pool(4) workers each take a shard; one trail."""
        root, fallback = tmp_path / "set", tmp_path / "fallback.jsonl"
        w: object = workers
        w.configure(str(root), str(fallback))  # type: ignore[attr-defined]
        w.handle("parent-0")  # type: ignore[attr-defined]
        ids = [f"req-{i}" for i in range(800)]
        with multiprocessing.get_context("fork").Pool(4) as pool:
            pids = set(pool.map(w.handle, ids, chunksize=20))  # type: ignore[attr-defined]
            pool.close()
            pool.join()
        w.handle("parent-1")  # type: ignore[attr-defined]
        import logging

        assert logging.getLogger("audit").handlers[0].flush()
        with _check_set(root, {*ids, "parent-0", "parent-1"}, fallback) as reader:
            shards = reader.shards
            # The parent kept shard-000; each worker that served a request has its own shard.
            assert [r.payload["request_id"] for r in shards["shard-000"].scan()] == ["parent-0", "parent-1"]
            worker_shards = {
                name: {r.payload["worker"] for r in s.scan()}
                for name, s in shards.items()
                if name != "shard-000"
            }
        assert all(len(p) == 1 for p in worker_shards.values())
        assert {p for ps in worker_shards.values() for p in ps} == pids
        assert 1 <= len(worker_shards) <= 4

    def test_spawn_pool_of_4(self, tmp_path: Path, workers: object) -> None:
        """Under spawn each worker configures itself (Pool initializer) and takes a shard the same way."""
        root, fallback = tmp_path / "set", tmp_path / "fallback.jsonl"
        w: object = workers
        ids = [f"req-{i}" for i in range(800)]
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(4, initializer=w.configure, initargs=(str(root), str(fallback))) as pool:  # type: ignore[attr-defined]
            pids = set(pool.map(w.handle, ids, chunksize=20))  # type: ignore[attr-defined]
            pool.close()
            pool.join()
        with _check_set(root, set(ids), fallback) as reader:
            assert len(reader.shards) == len(pids) <= 4

    @pytest.mark.filterwarnings(FORK_WARNING)
    def test_sigkilled_workers_restart_on_their_shards(self, tmp_path: Path, workers: object) -> None:
        """Workers SIGKILLed mid-run and restarted reuse their shards; the set still verifies."""
        root, fallback = tmp_path / "set", tmp_path / "fallback.jsonl"
        w: object = workers
        w.configure(str(root), str(fallback))  # type: ignore[attr-defined]
        ctx = multiprocessing.get_context("fork")
        durable: dict[str, int] = {}
        for generation in range(2):
            counters = [ctx.Value("i", 0) for _ in range(3)]
            procs = [
                ctx.Process(target=w.run_forever, args=(f"g{generation}w{k}", counters[k]))  # type: ignore[attr-defined]
                for k in range(3)
            ]
            for p in procs:
                p.start()
            _wait_for(
                lambda cs=counters: all(c.value >= 100 for c in cs), 60, "workers to make 100 records durable"
            )
            for p in procs:
                assert p.pid is not None
                os.kill(p.pid, signal.SIGKILL)
            for k, p in enumerate(procs):
                p.join(30)
                assert p.exitcode == -signal.SIGKILL
                durable[f"g{generation}w{k}"] = counters[k].value
        # A clean last generation on the same shards.
        procs = [ctx.Process(target=w.run_some, args=(f"final{k}", 50)) for k in range(3)]  # type: ignore[attr-defined]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
            assert p.exitcode == 0
        with AuditStore.open_reader(root) as reader:
            report = reader.verify()
            assert report.ok, report.problems[:5]
            # Shards track peak concurrency (3), not the 9 processes that ran.
            assert sorted(reader.shards) == ["shard-000", "shard-001", "shard-002"]
            seen = collections.Counter(r.payload.get("request_id") for r in reader.scan())
        for prefix, n in durable.items():
            assert all(seen[f"{prefix}-{i}"] == 1 for i in range(n)), prefix
        assert all(seen[f"final{k}-{i}"] == 1 for k in range(3) for i in range(50))
        assert max(seen.values()) == 1
        assert not fallback.exists() or fallback.read_text() == ""


# ---------------------------------------------------------------------------------- gunicorn

APP = """
import logging

AUDIT = logging.getLogger("audit")


def app(environ, start_response):
    request_id = environ.get("HTTP_X_REQUEST_ID", "none")
    AUDIT.info("request", extra={"request_id": request_id, "path": environ["PATH_INFO"]})
    body = request_id.encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
"""


def _readme_gunicorn_conf() -> str:
    """The gunicorn.conf.py block of the README, exactly as printed there."""
    text = (CHECKOUT / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(# gunicorn\.conf\.py.*?)```", text, flags=re.S)
    assert len(blocks) == 1, "the README has one gunicorn.conf.py block"
    return blocks[0]


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=30)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(30)
        sock.connect(self._path)
        self.sock = sock


def _wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        threading.Event().wait(0.02)  # a poll interval between checks of a real condition


_probe_ids = iter(range(10**9))


def _accepts(path: str) -> bool:
    if not os.path.exists(path):
        return False
    try:
        conn = _UnixHTTPConnection(path)
        conn.request("GET", "/ready", headers={"X-Request-Id": f"probe-{next(_probe_ids)}"})
        conn.getresponse().read()
        conn.close()
        return True
    except OSError:
        return False


@pytest.mark.parametrize("preload", [False, True], ids=["no-preload", "preload"])
def test_gunicorn_four_workers(tmp_path: Path, preload: bool) -> None:
    """4 gunicorn workers, 4,000 concurrent requests: set verifies, one record per request, no fallback."""
    (tmp_path / "myapp.py").write_text(APP)
    (tmp_path / "gunicorn.conf.py").write_text(_readme_gunicorn_conf())
    root, fallback, sock = tmp_path / "audit", tmp_path / "fallback.jsonl", tmp_path / "g.sock"
    env = dict(os.environ, AUDIT_ROOT=str(root), AUDIT_FALLBACK=str(fallback))
    args = [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "--bind", f"unix:{sock}"]
    args += ["--preload"] if preload else []
    log = (tmp_path / "gunicorn.log").open("w")
    server = subprocess.Popen(
        [*args, "myapp:app"], cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT
    )
    try:
        _wait_for(
            lambda: _accepts(str(sock)) or server.poll() is not None, 60, "gunicorn to accept connections"
        )
        assert server.poll() is None, (tmp_path / "gunicorn.log").read_text()
        ids = [f"r{i:05d}" for i in range(4000)]
        errors: list[str] = []

        def client(chunk: list[str]) -> None:
            for rid in chunk:
                try:
                    conn = _UnixHTTPConnection(str(sock))
                    conn.request("GET", f"/item/{rid}", headers={"X-Request-Id": rid})
                    resp = conn.getresponse()
                    body = resp.read().decode()
                    conn.close()
                    if resp.status != 200 or body != rid:
                        errors.append(f"{rid}: {resp.status} {body!r}")
                except OSError as e:
                    errors.append(f"{rid}: {e!r}")

        threads = [threading.Thread(target=client, args=(ids[k::8],)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        assert errors == []
    finally:
        server.send_signal(signal.SIGTERM)  # graceful: workers finish, close their shards, exit
        try:
            server.wait(60)
        finally:
            log.close()
            if server.poll() is None:
                server.kill()
                server.wait()
    output = (tmp_path / "gunicorn.log").read_text()
    assert server.returncode == 0, output
    assert "quipu_logging:" not in output  # no diverted-record warnings
    with _check_set(root, set(ids), fallback) as reader:
        assert 2 <= len(reader.shards) <= 4  # several workers served, each on its own shard
