"""Every example runs, in a subprocess with a timeout, and does what its docstring says.

The service demo (``examples/demo.py``, what ``make demo`` runs) is run once with a
reduced request count; a second test talks to ``examples/service.py`` directly and
checks the audit records of a few known requests field by field.
"""

from __future__ import annotations

import base64
import collections
import http.client
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import quipu_logging
from quipu_logging import AuditStore
from quipu_logging.store import merkle

PACKAGE_PARENT = str(Path(quipu_logging.__file__).resolve().parent.parent)
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
ENV = {**os.environ, "PYTHONPATH": PACKAGE_PARENT}


def run_example(name: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Runs ``examples/NAME ARGS`` with this interpreter; fails the test on a non-zero exit."""
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=ENV,
        check=False,
    )
    assert result.returncode == 0, f"{name} exited {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


def payloads(root: Path) -> list[dict[str, Any]]:
    with AuditStore.open_reader(root) as reader:
        return [r.payload for r in reader.scan()]


def verified(root: Path) -> bool:
    with AuditStore.open_reader(root) as reader:
        return reader.verify().ok


class TestBasic:
    def test_stores_and_verifies_two_records(self, tmp_path: Path) -> None:
        """The quick start stores its two records and the store verifies."""
        result = run_example("basic.py", str(tmp_path))
        assert "verify: intact; tree size 2" in result.stdout
        assert [p["actor"] for p in payloads(tmp_path / "audit")] == ["alice", "bob"]


class TestDictConfig:
    def test_context_filter_and_fallback_are_configured(self, tmp_path: Path) -> None:
        """The README's dictConfig stores actor and request_id; the fallback file exists, empty."""
        run_example("dictconfig.py", str(tmp_path))
        stored = payloads(tmp_path / "audit")
        assert [(p["actor"], p["request_id"], p["action"]) for p in stored] == [
            ("alice", "req-0001", "update"),
            ("bob", "req-0002", "update"),
        ]
        assert (tmp_path / "audit-fallback.jsonl").read_text() == ""
        assert verified(tmp_path / "audit")


class TestStructlogApp:
    def test_events_are_stored_and_the_chain_goes_on(self, tmp_path: Path) -> None:
        """The chain still prints its JSON lines; the store holds the same events with core keys."""
        pytest.importorskip("structlog")
        result = run_example("structlog_app.py", str(tmp_path))
        printed = [json.loads(line) for line in result.stdout.splitlines()]
        assert [e["event"] for e in printed] == ["invoice.paid", "refund.failed"]
        stored = payloads(tmp_path / "audit")
        assert [(p["message"], p["level"], p["logger"], p["actor"]) for p in stored] == [
            ("invoice.paid", "INFO", "billing", "alice"),
            ("refund.failed", "ERROR", "billing", "alice"),
        ]
        assert "TimeoutError" in stored[1]["exc"] and "exc_info" not in stored[1]


class TestVerifyAndProve:
    def test_a_third_party_can_check_the_proof_files(self, tmp_path: Path) -> None:
        """The proof and record files it writes verify with merkle alone; a changed record does not."""
        result = run_example("verify_and_prove.py", str(tmp_path))
        assert result.stdout.count(": True") == 3, result.stdout
        proof = json.loads((tmp_path / "proof.json").read_text())
        raw = base64.b64decode((tmp_path / "record.b64").read_text())
        path = [bytes.fromhex(h) for h in proof["path"]]
        root = bytes.fromhex(proof["root"])
        assert merkle.verify_inclusion(merkle.leaf_hash(raw), proof["seq"], proof["tree_size"], path, root)
        forged = raw.replace(b"rec-41", b"rec-14")
        assert not merkle.verify_inclusion(
            merkle.leaf_hash(forged), proof["seq"], proof["tree_size"], path, root
        )


class TestStoreWalkthrough:
    def test_runs_clean(self, tmp_path: Path) -> None:
        """The store-level walkthrough writes, reopens, verifies and proves."""
        result = run_example("store_walkthrough.py", str(tmp_path / "audit"))
        assert "verify: intact" in result.stdout and "verifies=True" in result.stdout


class TestGracefulShutdown:
    def test_every_acknowledged_record_is_stored_after_sigterm(self, tmp_path: Path) -> None:
        """After SIGTERM the worker exits 0 and every job it acknowledged is in the verified store."""
        proc = subprocess.Popen(
            [sys.executable, str(EXAMPLES / "graceful_shutdown.py"), str(tmp_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=ENV,
        )
        watchdog = threading.Timer(120, proc.kill)
        watchdog.start()
        try:
            acked: list[str] = []
            assert proc.stdout is not None
            for line in proc.stdout:
                acked.append(line.split()[1])
                if len(acked) >= 400:
                    break
            proc.send_signal(signal.SIGTERM)
            out, err = proc.communicate(timeout=60)
        finally:
            watchdog.cancel()
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        acked += [line.split()[1] for line in out.splitlines() if line.startswith("ack ")]
        assert proc.returncode == 0, err
        assert "shut down cleanly" in err
        assert len(acked) >= 400
        stored = {p["target"] for p in payloads(tmp_path / "audit") if "$sys" not in p}
        assert set(acked) <= stored
        assert verified(tmp_path / "audit")


@pytest.fixture
def service(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], int]]:
    """examples/service.py running on a free loopback port, stopped with SIGTERM afterwards."""
    pytest.importorskip("structlog")
    proc = subprocess.Popen(
        [sys.executable, str(EXAMPLES / "service.py"), "--dir", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    watchdog = threading.Timer(120, proc.kill)
    watchdog.start()
    try:
        assert proc.stdout is not None
        port = json.loads(proc.stdout.readline())["port"]
        yield proc, port
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=60)


class TestService:
    def test_requests_and_business_events_are_audited(
        self, service: tuple[subprocess.Popen[str], int], tmp_path: Path
    ) -> None:
        """Actor from X-User, action = method, target = path, outcome = status; events share the context."""
        proc, port = service
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        calls = [
            ("PUT", "/docs/5", {"X-User": "alice", "X-Request-Id": "r-1"}, b'{"title": "t"}'),
            ("DELETE", "/docs/5", {"X-User": "bob", "X-Request-Id": "r-2"}, None),
            ("GET", "/docs/999", {"X-Request-Id": "r-3"}, None),
        ]
        statuses = []
        for method, path, headers, body in calls:
            conn.request(method, path, body=body, headers=headers)
            response = conn.getresponse()
            response.read()
            statuses.append(response.status)
        conn.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        assert statuses == [200, 403, 404]

        stored = [p for p in payloads(tmp_path / "audit") if "$sys" not in p]
        access = [p for p in stored if p["logger"] == "service.access"]
        assert [(p["actor"], p["action"], p["target"], p["outcome"], p["request_id"]) for p in access] == [
            ("alice", "PUT", "/docs/5", 200, "r-1"),
            ("bob", "DELETE", "/docs/5", 403, "r-2"),
            ("anonymous", "GET", "/docs/999", 404, "r-3"),
        ]
        events = [p for p in stored if p["logger"] == "service.events"]
        assert [(p["message"], p["level"], p["actor"], p["request_id"]) for p in events] == [
            ("document.saved", "INFO", "alice", "r-1"),
            ("document.delete_denied", "WARNING", "bob", "r-2"),
        ]
        assert events[0]["doc"] == "5" and events[0]["version"] == 2 and "timestamp" in events[0]
        metrics = json.loads((tmp_path / "service-metrics.json").read_text())
        assert metrics["requests_served"] == 3 and metrics["audit"]["written"] == 5
        assert verified(tmp_path / "audit")


class TestDemo:
    def test_the_main_job_adds_up(self, tmp_path: Path) -> None:
        """A reduced demo run: counts add up, the fallback is used, the store verifies, all under --dir."""
        pytest.importorskip("structlog")
        where = tmp_path / "demo"
        result = run_example(
            "demo.py",
            "--dir",
            str(where),
            "--requests",
            "2000",
            "--clients",
            "4",
            "--queue-size",
            "64",
            timeout=170,
        )
        out = result.stdout
        assert "MISMATCH" not in out and "FAILED" not in out, out
        summary = out[out.index("\nsummary") :]
        for label in (
            "requests served",
            "records stored",
            "records diverted",
            "every request",
            "verification",
        ):
            line = next(x for x in summary.splitlines() if x.strip().startswith(label))
            assert line.rstrip().endswith("OK"), line
        assert "requests served    2,002 of 2,002 sent" in summary

        # Recount independently: fallback lines == gap totals, and both are non-zero.
        lines = (where / "fallback.jsonl").read_text().splitlines()
        gaps = [p for p in payloads(where / "audit") if p.get("$sys") == "gap"]
        assert len(lines) == sum(g["count"] for g in gaps) > 0
        assert verified(where / "audit")
        written = {p.name for p in where.iterdir()}
        assert written == {"audit", "fallback.jsonl", "proof.json", "service-metrics.json", "service.log"}

    def test_the_main_job_with_worker_processes(self, tmp_path: Path) -> None:
        """``--workers 3``: the service forks 3 workers onto one store set; every request is stored once."""
        pytest.importorskip("structlog")
        where = tmp_path / "demo"
        result = run_example(
            "demo.py", "--dir", str(where), "--requests", "1500", "--workers", "3", timeout=170
        )
        out = result.stdout
        assert "MISMATCH" not in out and "FAILED" not in out, out
        assert "requests served    1,500 of 1,500 sent" in out
        shards = sorted(p.name for p in (where / "audit").iterdir() if p.name.startswith("shard-"))
        assert 2 <= len(shards) <= 3, shards
        access = collections.Counter(
            p["request_id"] for p in payloads(where / "audit") if p.get("logger") == "service.access"
        )
        assert sum(access.values()) == 1500 and max(access.values()) == 1
        assert verified(where / "audit")

    def test_refuses_a_directory_in_use(self, tmp_path: Path) -> None:
        """``--dir`` must be empty or absent: the demo never mixes its files with others."""
        (tmp_path / "something").write_text("x")
        result = subprocess.run(
            [sys.executable, str(EXAMPLES / "demo.py"), "--dir", str(tmp_path)],
            capture_output=True,
            text=True,
            timeout=60,
            env=ENV,
            check=False,
        )
        assert result.returncode == 2 and "is not empty" in result.stderr
