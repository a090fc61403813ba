"""SIGKILL crash harness (issue 6 requirement 1).

A writer runs in a child process through the real front end (``AuditHandler`` on an
``AuditPipeline``, several producer threads, one sync policy), and is killed with
SIGKILL, either

* by the parent at a random moment, or
* by itself, from inside its file layer, at the k-th file operation of the kind a
  scenario targets (a segment rollover, a checkpoint write, a retention unlink, a DLQ
  redrive step), just before or just after the operation: a kill *during* that
  operation, wherever the store is in it.

The parent first verifies the store with a reader, as the kill left it: it must pass
(records the writer had not hashed yet are ``pending``: a crash is not tampering). Then
it reopens the store as its writer (recovery) and checks DESIGN §5/§8: ``verify()``
passes; ``seq`` is continuous; every record whose ``flush()`` had returned ``True``
before the kill is present, with the content it was logged with;
every record seen at a ``seq`` by an earlier check still has the same leaf hash
(byte-identical across later crashes and recoveries); nothing is duplicated (except
events replayed by a killed redrive: redrive is at-least-once); and the accounting
counters the child wrote after its last successful flush are consistent with what
is stored and with the fallback file.

The child reports through two append-only files, each line written by one
``os.write`` after the fact it reports: the ack file (after ``flush()`` returned
``True``: the last record number of every producer and the metrics snapshot) and
the fallback file (one line per record the handler diverted).

Everything random derives from ``--seed``; thread scheduling does not, so a run is
reproducible in its kill points and workloads, not in its interleavings.

The full campaign (at least 200 kills over every scenario and sync policy)::

    python tests/reliability/crash_harness.py --kills 200 --seed 1

``tests/reliability/test_crash.py`` runs a short version in the normal suite.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import logging
import os
import random
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCENARIOS = ("steady", "rollover", "checkpoint", "retention", "redrive")
POLICIES = ("always", "every:7", "group:50:5", "group", "os")
PRODUCERS = 3
STORE_CYCLES = 8  # kills per store before a scenario starts a fresh one
# An upper bound for a child to start or a check to finish: a failure bound, never a delay.
WAIT = 60.0
USER_FIELDS = ("run", "p", "n", "round", "body", "phase")


# ============================================================================ child


def body_of(seed: int, run: int, p: int, n: int) -> str:
    """The deterministic, variable-size body of one record."""
    h = hashlib.sha256(f"{seed}:{run}:{p}:{n}".encode()).hexdigest()
    return h * (1 + (int(h[:2], 16) % 4))


def _kind_matches(kind: str, op: str, path: str) -> bool:
    name = os.path.basename(path)
    if kind == "steady":
        return False
    if kind == "rollover":
        # creating a segment, writing/renaming its predecessor's sidecar, fsyncing the log dir
        return (
            (op == "create" and name.startswith("seg-"))
            or ".idx" in name
            or (op == "fsync_dir" and name == "log")
        )
    if kind == "checkpoint":
        return name == "checkpoints.jsonl" and op in ("pwrite", "fsync")
    if kind == "retention":
        return op == "unlink" and name.startswith("seg-")
    if kind == "redrive":
        return os.sep + "dlq" in path and op in ("create", "rename", "unlink", "pwrite", "fsync", "fsync_dir")
    raise ValueError(kind)


def child_main(cfg: dict[str, Any]) -> None:  # pragma: no cover - runs in the child
    from quipu_logging import AuditHandler, AuditPipeline, PipelineConfig, RetentionPolicy, StoreConfig
    from quipu_logging.store import FileLayer

    run, seed, kind = cfg["run"], cfg["seed"], cfg["scenario"]
    kill_at, kill_after = cfg["kill_at"], cfg["kill_after"]
    rng = random.Random(f"{seed}:{kind}:{run}:workload")

    class KillLayer(FileLayer):
        """The real file layer, plus a self-SIGKILL at the k-th operation of one kind, and injected EIO."""

        def __init__(self) -> None:
            self.paths: dict[int, str] = {}
            self.count = 0
            self.armed = False  # armed once the workload runs (redrive: once redriving starts)
            self.fail_segments = False
            self.lock = threading.Lock()

        def _op(self, op: str, path: str, phase: str) -> None:
            if not (self.armed and kill_at and _kind_matches(kind, op, path)):
                return
            with self.lock:
                if phase == "before":
                    self.count += 1
                hit = self.count == kill_at and (phase == "after") == kill_after
            if hit:
                os.kill(os.getpid(), signal.SIGKILL)

        def _fd_path(self, fd: int) -> str:
            return self.paths.get(fd, "")

        def open(self, path: str, flags: int, mode: int = 0o644) -> int:
            op = "create" if flags & os.O_CREAT and not os.path.exists(path) else "open"
            self._op(op, path, "before")
            fd = super().open(path, flags, mode)
            self.paths[fd] = os.path.abspath(path)
            self._op(op, path, "after")
            return fd

        def close(self, fd: int) -> None:
            self.paths.pop(fd, None)
            super().close(fd)

        def pwrite(self, fd: int, data: bytes, offset: int) -> None:
            path = self._fd_path(fd)
            if self.fail_segments and os.path.basename(path).startswith("seg-"):
                raise OSError(errno.EIO, "injected I/O error", path)
            self._op("pwrite", path, "before")
            super().pwrite(fd, data, offset)
            self._op("pwrite", path, "after")

        def fsync(self, fd: int) -> None:
            path = self._fd_path(fd)
            self._op("fsync", path, "before")
            super().fsync(fd)
            self._op("fsync", path, "after")

        def fsync_dir(self, path: str) -> None:
            self._op("fsync_dir", path, "before")
            super().fsync_dir(path)
            self._op("fsync_dir", path, "after")

        def rename(self, src: str, dst: str) -> None:
            self._op("rename", dst, "before")
            super().rename(src, dst)
            self._op("rename", dst, "after")

        def unlink(self, path: str) -> None:
            self._op("unlink", path, "before")
            super().unlink(path)
            self._op("unlink", path, "after")

    layer = KillLayer()
    retention = RetentionPolicy(max_bytes=cfg["segment_bytes"] * 4) if kind == "retention" else None
    store_config = StoreConfig(
        root=cfg["root"],
        sync=cfg["policy"],
        max_segment_bytes=cfg["segment_bytes"],
        retention=retention,
        file_layer=layer,
    )
    pipeline = AuditPipeline.start(
        store_config,
        config=PipelineConfig(queue_size=cfg["queue_size"], retry_backoff=0.001, housekeeping_interval=0.05),
    )

    fallback_fd = os.open(cfg["fallback"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    ack_fd = os.open(cfg["ack"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    class FileFallback(logging.Handler):
        """One line per diverted record, written by a single os.write (whole lines survive a kill)."""

        def emit(self, record: logging.LogRecord) -> None:
            line = {"run": getattr(record, "run", None), "p": getattr(record, "p", None)}
            line.update(n=getattr(record, "n", None), round=getattr(record, "round", None))
            os.write(fallback_fd, (json.dumps(line) + "\n").encode())

    handler = AuditHandler(pipeline=pipeline, fallback=FileFallback())
    layer.armed = kind != "redrive"
    logger = logging.getLogger(f"crash.{kind}")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)

    last = [-1] * PRODUCERS
    state = {"round": 0}
    phase_a_rounds = 3 if kind == "redrive" else 0
    if phase_a_rounds:
        layer.fail_segments = True

    def end_of_round() -> None:
        # Runs in one producer while the others wait at the barrier: nothing is being emitted.
        r = state["round"]
        if handler.flush(timeout=WAIT):
            metrics = {k: v for k, v in handler.metrics().items() if isinstance(v, int)}
            line = {"round": r, "last": list(last), "metrics": metrics}
            os.write(ack_fd, (json.dumps(line) + "\n").encode())
        state["round"] = r + 1
        if r + 1 == phase_a_rounds:
            layer.fail_segments = False
            layer.armed = True
            threading.Thread(target=redrive_forever, name="redriver", daemon=True).start()

    def redrive_forever() -> None:
        handle = pipeline.handle()
        while True:
            try:
                handle.redrive_dlq("admin", timeout=WAIT)
            except Exception:
                pass

    barrier = threading.Barrier(PRODUCERS, action=end_of_round)
    sizes = [rng.randint(1, 40) for _ in range(100_000)]

    def produce(p: int) -> None:
        n = 0
        while True:
            r = state["round"]
            phase = "A" if r < phase_a_rounds else "B"
            for _ in range(sizes[(r * PRODUCERS + p) % len(sizes)]):
                extra = {
                    "run": run,
                    "p": p,
                    "n": n,
                    "round": r,
                    "body": body_of(seed, run, p, n),
                    "phase": phase,
                }
                logger.info("rec %s %d %d", run, p, n, extra=extra)
                last[p] = n
                n += 1
            barrier.wait()

    for p in range(PRODUCERS):
        threading.Thread(target=produce, args=(p,), name=f"producer-{p}", daemon=True).start()
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    threading.Event().wait()  # until killed


# ============================================================================ parent


@dataclass
class Campaign:
    """The state one scenario's store carries from kill to kill."""

    scenario: str
    base: Path
    seed: int
    # (tree size, root) at the previous check: every record below that size must be unchanged
    previous: tuple[int, bytes] | None = None
    cycle: int = 0
    kills: int = 0
    self_kills: int = 0
    acked: int = 0
    checked: int = 0
    duplicates: int = 0
    crash_tails: int = 0  # kills after which verify (before the reopen) found unhashed records

    @property
    def root(self) -> Path:
        # A fresh store every STORE_CYCLES kills keeps each check (a full verify) small.
        return self.base / f"store-{self.cycle // STORE_CYCLES}"


def _read_lines(path: Path) -> Iterator[dict[str, Any]]:
    """Whole lines only: a line cut by the kill was never reported."""
    if not path.exists():
        return
    data = path.read_bytes()
    for line in data.split(b"\n")[:-1]:
        yield json.loads(line)


def _child_env(package_parent: str | None) -> dict[str, str]:
    env = dict(os.environ)
    if package_parent:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_parent, env.get("PYTHONPATH")) if p)
    return env


def run_cycle(c: Campaign, cycle: int, *, package_parent: str | None = None) -> dict[str, Any]:
    """One child, one SIGKILL, one reopen and check. Returns what was checked."""
    rng = random.Random(f"{c.seed}:{c.scenario}:{cycle}")
    policy = POLICIES[cycle % len(POLICIES)]
    run = cycle
    ack = c.base / f"ack-{run}.jsonl"
    fallback = c.base / f"fallback-{run}.jsonl"
    # Most kills of an operation scenario come from inside that operation; the rest (and all of
    # "steady") at a random moment chosen by the parent.
    in_op = c.scenario != "steady" and rng.random() < 0.75
    kill_at = rng.randint(1, 30 if c.scenario == "rollover" else 12) if in_op else 0
    cfg = {
        "root": str(c.root),
        "run": run,
        "seed": c.seed,
        "scenario": c.scenario,
        "policy": policy,
        "segment_bytes": rng.choice([2048, 4096, 16384]) if c.scenario != "steady" else 256 * 1024,
        "queue_size": rng.choice([16, 64, 1024]),
        "kill_at": kill_at,
        "kill_after": rng.random() < 0.5,
        "ack": str(ack),
        "fallback": str(fallback),
    }
    delay = rng.uniform(2.0, 3.0) if in_op else rng.uniform(0.05, 1.0)
    err_path = c.base / f"stderr-{run}.txt"
    with open(err_path, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "child", json.dumps(cfg)],
            stdout=subprocess.PIPE,
            stderr=err,
            env=_child_env(package_parent),
        )
        assert proc.stdout is not None
        try:
            ready, _, _ = select.select([proc.stdout], [], [], WAIT)
            line = proc.stdout.readline() if ready else b""
            if line != b"ready\n":
                # It died before saying so (its file layer can kill it that early) or is stuck.
                proc.wait(timeout=WAIT)
                self_killed = True
            else:
                # The kill moment: a random point of the workload (this wait *is* the experiment).
                try:
                    proc.wait(timeout=delay)
                    self_killed = True
                except subprocess.TimeoutExpired:
                    proc.send_signal(signal.SIGKILL)
                    proc.wait(timeout=WAIT)
                    self_killed = False
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stdout.close()
    if proc.returncode != -signal.SIGKILL:
        raise AssertionError(
            f"child ended with {proc.returncode}, not SIGKILL: {err_path.read_text(errors='replace')[-3000:]}"
        )
    c.kills += 1
    c.self_kills += int(self_killed)
    return check_store(c, run, ack, fallback, policy=policy, cfg=cfg)


def check_store(
    c: Campaign, run: int, ack: Path, fallback: Path, *, policy: str, cfg: dict[str, Any]
) -> dict[str, Any]:
    from quipu_logging import AuditPipeline, AuditStore

    where = f"scenario={c.scenario} seed={c.seed} run={run} policy={policy} cfg={cfg}"
    # Before any writer reopens it, a reader's verify already passes: a crash is not tampering.
    # Records the kill left unhashed are pending (the reopen below hashes them in).
    with AuditStore.open_reader(c.root) as reader:
        before = reader.verify()
    assert before.ok, f"{where}: verify failed before the reopen: {before.problems[:5]}"
    c.crash_tails += int(before.pending > 0)
    if c.scenario == "redrive":
        # Finish what the killed redrive left parked (recovery of the store happens on open).
        pipeline = AuditPipeline.start(str(c.root))
        try:
            pipeline.handle().redrive_dlq("admin", timeout=WAIT)
        finally:
            assert pipeline.close(timeout=WAIT), where
    mine: dict[tuple[int, int], list[dict[str, Any]]] = {}
    count = 0
    with AuditStore.open(c.root) as store:  # the writer's recovery must accept what the kill left
        report = store.verify()
        assert report.ok, f"{where}: verify failed after the kill: {report.problems[:5]}"
        # Byte-identical: verify re-hashed every record against the spine, so the spine's root at
        # the previous check's size being the root seen then means no record below it changed.
        if c.previous is not None:
            size, root = c.previous
            assert store.tree_size >= size, f"{where}: the tree shrank from {size} to {store.tree_size}"
            assert store.merkle_root(size) == root, f"{where}: records below {size} changed after a crash"
        c.previous = (store.tree_size, store.merkle_root())
        expected_seq = None
        for r in store.scan():
            count += 1
            assert expected_seq is None or r.seq == expected_seq, f"{where}: seq jumps to {r.seq}"
            expected_seq = r.seq + 1
            pl = r.payload
            if "$sys" in pl or pl.get("run") != run:
                continue
            key = (pl["p"], pl["n"])
            mine.setdefault(key, []).append({"round": pl["round"], "phase": pl["phase"]})
            assert pl["message"] == f"rec {run} {pl['p']} {pl['n']}", f"{where}: {pl}"
            assert pl["body"] == body_of(c.seed, run, pl["p"], pl["n"]), f"{where}: body of {key} differs"
    for key, copies in mine.items():
        if len(copies) > 1:
            # only events parked and replayed by a redrive may appear twice (at-least-once)
            assert c.scenario == "redrive" and all(pl["phase"] == "A" for pl in copies), (
                f"{where}: {key} stored {len(copies)} times"
            )
            c.duplicates += len(copies) - 1
    diverted = {(d["p"], d["n"]) for d in _read_lines(fallback) if d["run"] == run}
    acks = list(_read_lines(ack))
    acked = 0
    if acks:
        final = acks[-1]
        for p, last_n in enumerate(final["last"]):
            stored_ns = sorted(n for (q, n) in mine if q == p)
            missing = [n for n in range(last_n + 1) if (p, n) not in diverted and (p, n) not in mine]
            if c.scenario == "retention" and missing:
                # retention deletes the oldest segments: what is gone must be a prefix of p's records
                assert not stored_ns or max(missing) < stored_ns[0], f"{where}: p{p} lost {missing[:10]}"
            else:
                assert not missing, (
                    f"{where}: acknowledged records of producer {p} are missing: {missing[:10]}"
                )
            acked += last_n + 1
        m = final["metrics"]
        assert (
            m["offered"]
            == m["accepted"] + m["rejected_full"] + m["rejected_closed"] + m["rejected_disk_full"]
        ), f"{where}: {m}"
        assert m["accepted"] == m["written"] + m["parked"] + m["handed_off"] + m["lost"], f"{where}: {m}"
        assert m["parked"] == m["redriven"] + m["parked_now"], f"{where}: {m}"
        assert m["rejected"] == m["fallback_ok"] + m["fallback_failed"], f"{where}: {m}"
        assert m["lost"] == 0 and m["fallback_failed"] == 0, f"{where}: {m}"
        upto = final["round"]
        stored_then = sum(1 for pls in mine.values() if pls[0]["round"] <= upto)
        diverted_then = {
            (d["p"], d["n"])
            for d in _read_lines(fallback)
            if d["run"] == run and d["round"] is not None and d["round"] <= upto
        }
        # The fallback file holds exactly the records the counters say were diverted by then.
        assert len(diverted_then) == m["fallback_ok"], f"{where}: fallback file {len(diverted_then)} vs {m}"
        if c.scenario == "retention":
            assert stored_then <= m["written"], f"{where}: {stored_then} stored vs {m}"
        elif c.scenario == "redrive":
            assert stored_then >= m["written"], f"{where}: {stored_then} stored vs {m}"
            # after the parent's redrive, everything accepted by then is stored
            assert stored_then == m["accepted"] - m["handed_off"] - m["lost"], (
                f"{where}: {stored_then} vs {m}"
            )
        else:
            assert stored_then == m["written"], f"{where}: {stored_then} stored vs written in {m}"
    c.acked += acked
    c.checked += count
    return {"records": count, "acked": acked}


def campaign(
    kills: int,
    seed: int,
    scenarios: tuple[str, ...] = SCENARIOS,
    base: Path | None = None,
    package_parent: str | None = None,
) -> list[Campaign]:
    """Runs ``kills`` kills spread over ``scenarios`` (each its own store); raises on the first failure."""
    own = base is None
    tmp = Path(tempfile.mkdtemp(prefix="quipu-crash-")) if base is None else base
    results = []
    per = [kills // len(scenarios) + (1 if i < kills % len(scenarios) else 0) for i in range(len(scenarios))]
    for scenario, n in zip(scenarios, per, strict=True):
        c = Campaign(scenario, tmp / scenario, seed)
        c.base.mkdir(parents=True, exist_ok=True)
        for cycle in range(n):
            c.cycle = cycle
            if cycle % STORE_CYCLES == 0:
                c.previous = None
            run_cycle(c, cycle, package_parent=package_parent)
        results.append(c)
    if own:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return results


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] == "child":
        child_main(json.loads(args[1]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=200, help="total SIGKILLs (default 200)")
    parser.add_argument("--seed", type=int, default=1, help="seed of every kill point and workload")
    parser.add_argument("--scenario", action="append", choices=SCENARIOS, help="repeatable; default all")
    ns = parser.parse_args(args)
    started = time.monotonic()
    results = campaign(ns.kills, ns.seed, tuple(ns.scenario or SCENARIOS))
    print(f"{'scenario':<12}{'kills':>7}{'in-op':>7}{'tails':>7}{'acked':>10}{'checked':>10}{'replayed':>10}")
    for c in results:
        print(
            f"{c.scenario:<12}{c.kills:>7}{c.self_kills:>7}{c.crash_tails:>7}{c.acked:>10}{c.checked:>10}"
            f"{c.duplicates:>10}"
        )
    total = sum(c.kills for c in results)
    print(f"{total} kills, seed {ns.seed}, all checks passed in {time.monotonic() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
