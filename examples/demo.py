"""The main job: a real HTTP service audited end to end, driven hard, stopped, then verified.

``make demo`` runs this. It

1. starts ``examples/service.py`` as a subprocess on a free port on 127.0.0.1, with a
   deliberately small audit queue;
2. drives it with real HTTP requests (``http.client``, keep-alive) from several client
   threads: a mix of reads, writes, deletes and transfers by several users;
3. in the middle, pauses the service's audit writer (an admin endpoint; a stalled disk
   would do the same) and sends a burst, so the queue overflows and the fallback file is
   visibly used;
4. stops the service with SIGTERM, which it turns into a clean shutdown;
5. runs the command line on the store: ``quipu-log verify``, a ``quipu-log query`` for one
   actor, ``quipu-log prove`` into a proof file and ``quipu-log prove --check`` on it
   offline, and ``quipu-log stats``;
6. prints a summary and checks that the counts add up: every request has exactly one
   access record (stored, or in the fallback file), and the records diverted equal both
   the fallback file's line count and the total of the store's ``gap`` records. Any
   mismatch, or a store that does not verify, exits non-zero.

Everything it writes is under one directory, named first thing (default: a fresh
temporary directory, kept so you can look at it; ``--dir`` to choose, which must be empty
or absent). ``--requests`` sets the request count (default 20,000).

``--workers N`` runs the service with N worker processes writing one store set (one shard
each, see README "Multi-process servers"); the counts are checked the same way, and the
writer-pause burst is left out (pausing one worker's writer would show nothing new).
"""

from __future__ import annotations

import argparse
import collections
import http.client
import json
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from quipu_logging import AuditStore

HERE = Path(__file__).resolve().parent
SERVICE = HERE / "service.py"
ACTORS = ["alice", "bob", "carol", "dave", "erin", "admin", None]
CLI = [sys.executable, "-m", "quipu_logging"]


def request_for(client: int, i: int) -> tuple[str, str, str | None, dict[str, Any] | None]:
    """The ``i``-th request of client ``client``: a deterministic mix of what users do."""
    actor = ACTORS[(i * 7 + client) % len(ACTORS)]
    doc = (i * 31 + client * 17) % 300
    kind = (i + client) % 10
    if kind < 5:
        return "GET", f"/docs/{doc}", actor, None
    if kind < 7:
        return "PUT", f"/docs/{doc}", actor, {"title": f"document {doc}, edit {i}"}
    if kind == 7:
        return "POST", "/transfers", actor, {"amount": i % 900 + 1, "to": f"acct-{doc}"}
    if kind == 8:
        return "DELETE", f"/docs/{doc}", actor, None
    return "GET", "/health", actor, None


class Client:
    """One keep-alive HTTP connection."""

    def __init__(self, port: int) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)

    def send(self, method: str, path: str, actor: str | None, body: dict[str, Any] | None = None) -> int:
        headers = {"X-User": actor} if actor else {}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        self.conn.request(method, path, body=data, headers=headers)
        response = self.conn.getresponse()
        response.read()
        return response.status

    def close(self) -> None:
        self.conn.close()


class Traffic:
    """Several client threads sending requests concurrently; counts the answers by status."""

    def __init__(self, clients: list[Client]) -> None:
        self.clients = clients
        self.statuses: collections.Counter[int] = collections.Counter()
        self.sent = 0
        self._offset = 0
        self._lock = threading.Lock()
        self.errors: list[BaseException] = []

    def run(self, total: int) -> float:
        """Sends ``total`` requests split over the clients; returns the seconds it took."""
        n = len(self.clients)
        shares = [total // n + (1 if k < total % n else 0) for k in range(n)]
        offset = self._offset
        self._offset += max(shares)

        def drive(k: int) -> None:
            counts: collections.Counter[int] = collections.Counter()
            try:
                for i in range(offset, offset + shares[k]):
                    method, path, actor, body = request_for(k, i)
                    counts[self.clients[k].send(method, path, actor, body)] += 1
            except BaseException as exc:  # reported by the driver
                self.errors.append(exc)
            finally:
                with self._lock:
                    self.statuses.update(counts)
                    self.sent += sum(counts.values())

        threads = [threading.Thread(target=drive, args=(k,), name=f"client-{k}") for k in range(n)]
        started = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return time.perf_counter() - started


def run_cli(*args: str, stdout: Any = None) -> subprocess.CompletedProcess[str]:
    """Runs ``quipu-log ARGS`` as ``python -m quipu_logging ARGS``."""
    return subprocess.run(
        [*CLI, *args],
        stdout=stdout if stdout is not None else subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        timeout=120,
        check=False,
    )


def show(title: str, result: subprocess.CompletedProcess[str], limit: int = 12) -> None:
    print(f"\n$ {title}   (exit {result.returncode})")
    lines = ((result.stdout or "") + (result.stderr or "")).rstrip("\n").splitlines()
    for line in lines[:limit]:
        print(f"  {line[:160]}{'...' if len(line) > 160 else ''}")
    if len(lines) > limit:
        print(f"  ... {len(lines) - limit} more lines")


def start_service(directory: Path, queue_size: int, workers: int = 1) -> tuple[subprocess.Popen[str], int]:
    log = (directory / "service.log").open("w")
    proc = subprocess.Popen(
        [
            sys.executable,
            str(SERVICE),
            "--dir",
            str(directory),
            "--queue-size",
            str(queue_size),
            "--workers",
            str(workers),
        ],
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
    )
    log.close()
    first: list[str] = []
    reader = threading.Thread(target=lambda: first.append(proc.stdout.readline() if proc.stdout else ""))
    reader.start()
    reader.join(60)
    if not first or not first[0].strip():
        proc.kill()
        proc.wait()
        raise SystemExit(f"the service did not start; see {directory / 'service.log'}")
    return proc, int(json.loads(first[0])["port"])


def store_counts(root: Path) -> dict[str, Any]:
    """What the store holds, read with the library (no lock; the service has stopped)."""
    by_logger: collections.Counter[str] = collections.Counter()
    gaps = gap_total = system = 0
    largest_gap: tuple[int, str] = (0, "")
    with AuditStore.open_reader(root) as store:
        for rec in store.scan():
            payload = rec.payload
            if "$sys" in payload:
                system += 1
                if payload["$sys"] == "gap":
                    gaps += 1
                    gap_total += int(payload["count"])
                    largest_gap = max(largest_gap, (int(payload["count"]), str(payload.get("reason"))))
            else:
                by_logger[str(payload.get("logger"))] += 1
    return {
        "by_logger": by_logger,
        "gaps": gaps,
        "gap_total": gap_total,
        "system": system,
        "largest_gap": largest_gap[1],
    }


def fallback_counts(path: Path) -> tuple[int, collections.Counter[str]]:
    by_logger: collections.Counter[str] = collections.Counter()
    lines = 0
    if path.exists():
        with path.open(encoding="utf-8") as f:
            for line in f:
                lines += 1
                by_logger[str(json.loads(line).get("logger"))] += 1
    return lines, by_logger


def check(ok: bool, text: str, failures: list[str]) -> str:
    if not ok:
        failures.append(text)
    return "OK" if ok else "MISMATCH"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Drive the audited example service, then verify its trail.")
    parser.add_argument("--dir", type=Path, help="where everything goes (must be empty or absent)")
    parser.add_argument("--requests", type=int, default=20_000, help="requests to send (default 20,000)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent keep-alive clients (default 8)")
    parser.add_argument("--burst", type=int, help="requests sent while the writer is paused (default 1/5)")
    parser.add_argument("--queue-size", type=int, default=512, help="the service's audit queue (default 512)")
    parser.add_argument("--workers", type=int, default=1, help="service worker processes (default 1)")
    args = parser.parse_args(argv)
    if args.requests < 10 or args.clients < 1:
        parser.error("--requests must be at least 10 and --clients at least 1")
    burst = args.burst if args.burst is not None else args.requests // 5
    if not 0 < burst < args.requests:
        parser.error("--burst must be between 1 and --requests - 1")

    if args.dir is None:
        directory = Path(tempfile.mkdtemp(prefix="quipu-demo-"))
    else:
        directory = args.dir.resolve()
        if directory.exists() and any(directory.iterdir()):
            parser.error(f"--dir {directory} is not empty; the demo needs a fresh directory")
        directory.mkdir(parents=True, exist_ok=True)
    root = directory / "audit"
    print(f"demo directory: {directory}  (everything the demo writes goes here)")
    began = time.perf_counter()

    proc, port = start_service(directory, args.queue_size, args.workers)
    print(f"service: pid {proc.pid} listening on 127.0.0.1:{port}, audit queue of {args.queue_size} records")
    if args.workers > 1:
        print(f"  {args.workers} worker processes, one shard each of the store set {root}")
    clients = [Client(port) for _ in range(args.clients)]
    admin = Client(port)
    traffic = Traffic(clients)
    try:
        normal = args.requests - burst
        first = normal // 2
        print(f"driving {args.requests:,} requests from {args.clients} keep-alive clients ...")
        if args.workers > 1:
            seconds = traffic.run(args.requests)
            admin_requests = 0
        else:
            seconds = traffic.run(first)
            assert admin.send("POST", "/admin/writer/pause", "admin") == 200, "could not pause the writer"
            seconds += traffic.run(burst)
            print(f"  burst of {burst:,} requests sent while the audit writer was paused")
            assert admin.send("POST", "/admin/writer/resume", "admin") == 200, "could not resume the writer"
            seconds += traffic.run(normal - first)
            admin_requests = 2
    finally:
        for c in [*clients, admin]:
            c.close()
        proc.send_signal(signal.SIGTERM)
        try:
            exit_code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            exit_code = proc.wait()
    if traffic.errors:
        print(f"client error: {traffic.errors[0]!r}", file=sys.stderr)
        return 1
    served = json.loads((directory / "service-metrics.json").read_text())
    audit = served["audit"]
    print(f"service stopped by SIGTERM, exit code {exit_code}")

    # The command line, as an operator would run it.
    verify = run_cli("verify", str(root), "--json")
    show(f"quipu-log verify {root} --json", verify)
    report = json.loads(verify.stdout) if verify.returncode in (0, 1) else {}
    query = run_cli(
        "query", str(root), "--where", "actor=alice", "--where", "action=PUT", "--limit", "3", "--json"
    )
    found = [json.loads(line) for line in query.stdout.splitlines()] if query.returncode == 0 else []
    print(
        f"\n$ quipu-log query {root} --where actor=alice --where action=PUT --limit 3 --json   "
        f"(exit {query.returncode}; fields shown: seq, actor, message, request_id)"
    )
    for rec in found:
        print(f"  seq {rec['seq']:>6}  {rec['actor']:<6} {rec['message']:<28} request_id={rec['request_id']}")
    newest = found[0] if found else None
    proof_file = directory / "proof.json"
    seq = newest["seq"] if newest else 0
    shard = ["--shard", str(newest["$shard"])] if newest and "$shard" in newest else []
    with proof_file.open("w") as out:
        prove = run_cli("prove", str(root), str(seq), *shard, stdout=out)
    show(f"quipu-log prove {root} {seq} {' '.join(shard)} > {proof_file}", prove)
    if prove.returncode == 0:
        proof = json.loads(proof_file.read_text())
        print(
            f"  {proof_file.name}: seq {proof['seq']} in a tree of {proof['tree_size']:,}, "
            f"{len(proof['path'])} hashes on its audit path"
        )
    trusted = str(report.get("root", ""))
    if shard:  # a store set: the proof is against its shard's tree, verified on its own
        shard_verify = run_cli("verify", str(root / shard[1]), "--json")
        trusted = str(json.loads(shard_verify.stdout).get("root", "")) if shard_verify.returncode == 0 else ""
    check_proof = run_cli("prove", "--check", str(proof_file), "--root", trusted)
    show(f"quipu-log prove --check {proof_file} --root {trusted[:16]}...", check_proof)
    stats = run_cli("stats", str(root))
    show(f"quipu-log stats {root}", stats)

    # The counts.
    stored = store_counts(root)
    fallback_lines, fallback_by_logger = fallback_counts(directory / "fallback.jsonl")
    requests_sent = traffic.sent + admin_requests
    access_stored = stored["by_logger"]["service.access"]
    access_diverted = fallback_by_logger["service.access"]
    events_stored = stored["by_logger"]["service.events"]
    user_stored = sum(stored["by_logger"].values())
    diverted = audit["rejected"]
    total_s = time.perf_counter() - began
    failures: list[str] = []

    print("\nsummary")
    statuses = ", ".join(f"{code}: {n:,}" for code, n in sorted(traffic.statuses.items()))
    ok = served["requests_served"] == requests_sent and exit_code == 0
    print(
        f"  requests served    {served['requests_served']:,} of {requests_sent:,} sent ({statuses}; "
        f"+{admin_requests} admin)  {check(ok, 'requests served != sent, or a bad exit', failures)}"
    )
    print(
        f"  throughput         {traffic.sent / seconds:,.0f} requests/s over {seconds:.1f} s "
        f"({args.clients} clients); {(user_stored + diverted) / seconds:,.0f} audit records/s"
    )
    ok = user_stored == audit["written"] and audit["lost"] == 0 and audit["fallback_failed"] == 0
    print(
        f"  records stored     {user_stored + stored['system']:,} ({access_stored:,} requests, "
        f"{events_stored:,} business events, {stored['system']} system: {stored['gaps']} gap)  "
        f"{check(ok, 'stored records != written, or records lost', failures)}"
    )
    ok = diverted == fallback_lines == stored["gap_total"] and (diverted > 0 or args.workers > 1)
    why = {"full": "queue full"}
    reasons = ", ".join(
        f"{why.get(name[9:], name[9:])}: {n:,}"
        for name, n in sorted(audit.items())
        if name.startswith("diverted_") and n
    )
    print(
        f"  records diverted   {diverted:,} ({reasons or 'none'}) = {fallback_lines:,} lines in "
        f"fallback.jsonl = {stored['gap_total']:,} in gap records  "
        f"{check(ok, 'diverted counts differ', failures)}"
    )
    if stored["largest_gap"]:
        print(f"                     the largest gap record says: {stored['largest_gap']!r}")
    ok = access_stored + access_diverted == requests_sent
    print(
        f"  every request      {access_stored + access_diverted:,} access records = {access_stored:,} stored "
        f"+ {access_diverted:,} in the fallback  {check(ok, 'a request without its access record', failures)}"
    )
    ok = verify.returncode == 0 and bool(report.get("ok"))
    root_hex = str(report.get("root", ""))
    print(
        f"  verification       {'intact' if ok else 'FAILED'}: tree size {report.get('tree_size', 0):,}, "
        f"root {root_hex[:16]}...  {check(ok, 'verify failed', failures)}"
    )
    ok = check_proof.returncode == 0 and newest is not None
    print(
        f"  inclusion proof    seq {seq:,} ({newest['actor'] if newest else '?'}: "
        f"{newest['message'] if newest else '?'}) checked offline against the verified root  "
        f"{check(ok, 'proof check failed', failures)}"
    )
    print(f"  total time         {total_s:.1f} s; files in {directory}")
    if failures:
        print(f"\nFAILED: {'; '.join(failures)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
