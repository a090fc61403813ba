"""A full disk (issue 6 requirement 3): for real on a small tmpfs, and injected through the file layer.

The real one runs ``disk_full_child.py`` under ``unshare --mount`` (a private mount
namespace: the tmpfs dies with the child), because only there can an unprivileged
test mount a file system of its own size. The child does the whole scenario and
reports; this file judges the report. It is skipped only where the kernel or the
system refuses the namespace or the mount, with the reason.

The injected variant runs everywhere: a file layer raises ENOSPC from ``pwrite``,
from ``fsync`` or from ``close`` (file systems that report deferred write errors
there), and the same promises are checked.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

import quipu_logging
from quipu_logging import AuditHandler, AuditPipeline, AuditStore, PipelineConfig, StoreConfig
from quipu_logging.store import FileLayer

PACKAGE_PARENT = str(Path(quipu_logging.__file__).resolve().parent.parent)
CHILD = Path(__file__).with_name("disk_full_child.py")
WAIT = 60.0


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (PACKAGE_PARENT, env.get("PYTHONPATH")) if p)
    return env


def _namespace_prefix(tmp: Path) -> list[str]:
    """The ``unshare`` command line that can mount a tmpfs here, or a skip with the reason."""
    if sys.platform != "linux":
        pytest.skip(f"mount namespaces are a Linux feature (this is {sys.platform})")
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("no unshare(1) on this system (util-linux)")
    probe = tmp / "probe"
    probe.mkdir()
    reasons = []
    for prefix in ([unshare, "--mount"], [unshare, "--mount", "--map-root-user"]):
        proc = subprocess.run(
            [*prefix, "--", "mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(probe)],
            capture_output=True,
            text=True,
            timeout=WAIT,
            check=False,
        )
        if proc.returncode == 0:
            return prefix
        reasons.append(f"{' '.join(prefix[1:])}: {proc.stderr.strip() or proc.returncode}")
    pytest.skip("the kernel refuses a private mount namespace with a tmpfs: " + "; ".join(reasons))


def _identities(m: dict[str, Any]) -> None:
    assert m["offered"] == m["accepted"] + m["rejected_full"] + m["rejected_closed"] + m["rejected_disk_full"]
    assert m["accepted"] == m["written"] + m["parked"] + m["handed_off"] + m["lost"]
    assert m["parked"] == m["redriven"] + m["parked_now"]
    assert m["rejected"] == m["fallback_ok"] + m["fallback_failed"]
    assert m["lost"] == 0 and m["fallback_failed"] == 0


@pytest.mark.parametrize("dlq", ["other", "same"], ids=["dlq-elsewhere", "dlq-on-the-full-disk"])
def test_real_full_tmpfs(tmp_path: Path, dlq: str) -> None:
    """ENOSPC on a real tmpfs: latch, DLQ or fallback, counted; freed: resumes, redrives, verifies."""
    prefix = _namespace_prefix(tmp_path)
    mount = tmp_path / "mnt"
    outside = tmp_path / "outside"
    mount.mkdir()
    outside.mkdir()
    proc = subprocess.run(
        [
            *prefix,
            "--",
            sys.executable,
            str(CHILD),
            "--mount",
            str(mount),
            "--outside",
            str(outside),
            "--dlq",
            dlq,
        ],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.splitlines()[-1])
    assert r["ballast_errno"] == errno.ENOSPC and r["free_when_full"] == 0
    # The app was never raised into and no logging call hung.
    assert r["raised"] == []
    # While full: the latch is set and health says so; every record went somewhere, counted.
    assert r["health_full"]["disk_full"] is True
    assert r["health_full"]["status"] == "unhealthy" and r["health_full"]["writer_alive"] is True
    full = r["metrics_full"]
    _identities(full)
    if dlq == "other":
        assert full["parked"] > 0 and full["parked_now"] == full["parked"]
    else:  # the DLQ is on the full disk too: records go to the fallback, and a gap record says so
        assert full["parked"] == 0 and full["handed_off"] > 0
        assert r["gap_records"] >= 1
    assert r["flush_full"] is True  # parked (fsynced) or handed off: durable or accounted
    # Freed: the next successful write clears the latch; the redrive brings parked records back.
    assert r["health_after"]["disk_full"] is False
    final = r["metrics_final"]
    _identities(final)
    assert final["parked_now"] == 0 and final["dlq_entries"] == 0 and r["dlq_left"] == []
    assert r.get("redriven", 0) == full["parked"], r.get("redrive_error")
    assert r["pipeline_closed"] is True
    assert r["verify_ok"] is True, r["problems"]
    # Every record logged is stored exactly once or was handed to the fallback; none both, none lost.
    stored = {int(n): c for n, c in r["stored"].items()}
    fallback = r["fallback"]
    assert all(c == 1 for c in stored.values())
    assert len(fallback) == len(set(fallback)) == final["handed_off"] + final["fallback_ok"]
    assert not set(stored) & set(fallback)
    assert set(stored) | set(fallback) == set(range(r["logged"]))
    assert len(stored) == final["written"] + final["redriven"]


# ---------------------------------------------------------------------------- injected ENOSPC


class EnospcLayer(FileLayer):
    """The real file layer, raising ENOSPC on demand from pwrite, fsync or close of segments."""

    def __init__(self) -> None:
        self.paths: dict[int, str] = {}
        self.lock = threading.Lock()
        self.where: str | None = None  # "pwrite", "fsync" or "close": fail there while set
        self.once = False  # fail only the next matching call
        self.raised = 0

    def _fail(self, op: str, fd: int) -> bool:
        with self.lock:
            path = self.paths.get(fd, "")
            if self.where != op or not os.path.basename(path).startswith("seg-") or not path.endswith(".log"):
                return False
            if self.once:
                self.where = None
            self.raised += 1
            return True

    def open(self, path: str, flags: int, mode: int = 0o644) -> int:
        fd = super().open(path, flags, mode)
        with self.lock:
            self.paths[fd] = path
        return fd

    def pwrite(self, fd: int, data: bytes, offset: int) -> None:
        if self._fail("pwrite", fd):
            raise OSError(errno.ENOSPC, "injected: no space left on device")
        super().pwrite(fd, data, offset)

    def fsync(self, fd: int) -> None:
        if self._fail("fsync", fd):
            raise OSError(errno.ENOSPC, "injected: no space left on device (fsync)")
        super().fsync(fd)

    def close(self, fd: int) -> None:
        fail = self._fail("close", fd)
        with self.lock:
            self.paths.pop(fd, None)
        super().close(fd)  # the descriptor is gone either way, as close(2) leaves it
        if fail:
            raise OSError(errno.ENOSPC, "injected: no space left on device (close)")


class ListFallback(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.ns: list[int] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.ns.append(record.n)  # type: ignore[attr-defined]


@pytest.mark.parametrize("where", ["pwrite", "fsync", "close"])
def test_injected_enospc(tmp_path: Path, where: str) -> None:
    """ENOSPC from pwrite, fsync or close: nothing lost or doubled, counted, never raised; recovers."""
    layer = EnospcLayer()
    root = tmp_path / "store"
    # Small segments so that rollovers (which close segments) happen while the fault is armed.
    pipeline = AuditPipeline.start(
        StoreConfig(root=root, sync="always", max_segment_bytes=4096, file_layer=layer),
        config=PipelineConfig(dlq_dir=str(tmp_path / "dlq"), retry_backoff=0.0, housekeeping_interval=0.05),
    )
    fallback = ListFallback()
    handler = AuditHandler(pipeline=pipeline, fallback=fallback)
    logger = logging.getLogger(f"enospc.{where}")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    n = 0

    def log(count: int) -> None:
        nonlocal n
        for _ in range(count):
            logger.info("record %d", n, extra={"n": n, "pad": "x" * 200})
            n += 1

    try:
        log(10)
        assert handler.flush(WAIT)
        layer.where, layer.once = where, where != "pwrite"
        log(60)
        assert handler.flush(WAIT)
        assert layer.raised >= 1
        during = handler.metrics()
        _identities(during)
        if where == "pwrite":
            assert handler.health()["disk_full"] is True
            assert during["parked_now"] > 0
        layer.where = None
        log(10)
        assert handler.flush(WAIT)
        assert handler.health()["disk_full"] is False
        pipeline.handle().redrive_dlq("app", timeout=WAIT)
        assert handler.flush(WAIT)
        final = handler.metrics()
        _identities(final)
        assert final["parked_now"] == 0
    finally:
        logger.removeHandler(handler)
        handler.close()
        assert pipeline.close(WAIT)
    with AuditStore.open_reader(root) as reader:
        report = reader.verify()
        assert report.ok, report.problems
        stored = [r.payload["n"] for r in reader.scan() if "n" in r.payload]
    assert sorted(stored) == sorted(set(stored)), "a record was stored twice"
    assert not set(stored) & set(fallback.ns)
    assert set(stored) | set(fallback.ns) == set(range(n))


def test_close_error_at_rollover_never_reuses_the_descriptor(tmp_path: Path) -> None:
    """A close() error when sealing a segment breaks the store; it never writes through the freed fd.

    close(2) frees the descriptor even when it fails, and the next open() gets the same
    number: before the fix the store kept the old number and its next pwrite landed in
    whatever file had it (here, an unrelated file).
    """
    from quipu_logging import StoreBrokenError

    layer = EnospcLayer()
    root = tmp_path / "store"
    store = AuditStore.open(StoreConfig(root=root, sync="always", max_segment_bytes=1024, file_layer=layer))
    try:
        kept = []
        while len(list((root / "log").glob("seg-*.log"))) == 1:
            kept.append(store.append({"i": len(kept), "pad": "x" * 100}).seq)
        layer.where, layer.once = "close", True
        other = tmp_path / "unrelated"
        with pytest.raises(StoreBrokenError):
            for i in range(100):
                store.append({"i": len(kept) + i, "pad": "x" * 100})
        fd = os.open(other, os.O_RDWR | os.O_CREAT, 0o644)  # likely gets the freed number
        try:
            with pytest.raises(StoreBrokenError):
                store.append({"i": -1})
        finally:
            os.close(fd)
        assert other.read_bytes() == b""
    finally:
        store.close()
    with AuditStore.open(root) as reopened:
        assert reopened.verify().ok
        assert [r.payload["i"] for r in reopened.scan()][: len(kept)] == list(range(len(kept)))
