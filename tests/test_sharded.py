"""``AuditHandler(shards=...)`` in one process (issue 7): lazy shards, the pre-shard queue, busy sets, fork.

Real worker pools and servers are in ``tests/test_processes.py``.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from quipu_logging import AuditHandler, AuditStore, StoreSet, StoreSetReader, _sharded

FORK_WARNING = "ignore:This process .* is multi-threaded:DeprecationWarning"


class ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def logger() -> Iterator[logging.Logger]:
    log = logging.getLogger(f"test.sharded.{os.getpid()}.{id(object())}")
    log.setLevel(logging.INFO)
    log.propagate = False
    yield log
    for h in list(log.handlers):
        log.removeHandler(h)
        h.close()


def _records(root: Path) -> list[dict[str, object]]:
    with AuditStore.open_reader(root) as reader:
        assert isinstance(reader, StoreSetReader)
        return [r.payload | {"$shard": r.shard} for r in reader.scan() if "$sys" not in r.payload]


class TestLazyShard:
    def test_no_shard_before_the_first_record(self, tmp_path: Path, logger: logging.Logger) -> None:
        """Building the handler creates the set, not a shard; the first record takes shard-000."""
        root = tmp_path / "set"
        h = AuditHandler(root, shards=3)
        logger.addHandler(h)
        assert (root / "SET").is_file() and not (root / "shard-000").exists()
        assert h.metrics()["shard"] is None
        logger.info("first", extra={"n": 1})
        assert h.flush()
        assert h.metrics()["shard"] == "shard-000"
        assert [r["message"] for r in _records(root)] == ["first"]

    def test_a_damaged_shard_passed_over_is_said(
        self, tmp_path: Path, logger: logging.Logger, capfd: pytest.CaptureFixture[str]
    ) -> None:
        """A shard skipped as damaged is named on stderr; the records go to the next free shard."""
        root = tmp_path / "set"
        StoreSet.open(root, shards=3).acquire()[1].close()
        (root / "shard-000" / "FORMAT").write_text("not json")
        h = AuditHandler(root, shards=3)
        logger.addHandler(h)
        logger.info("after", extra={"n": 1})
        assert h.flush()
        assert h.metrics()["shard"] == "shard-001"
        err = capfd.readouterr().err
        assert "passed over shard-000" in err and "writes shard-001" in err

    def test_signing_key_signs_the_shard_checkpoints(
        self, tmp_path: Path, logger: logging.Logger, ed25519_pem: tuple[Path, bytes]
    ) -> None:
        """signing_key reaches the shard's store: its checkpoints verify with the public key."""
        import json

        pem, public = ed25519_pem
        root = tmp_path / "set"
        h = AuditHandler(root, shards=2, signing_key=pem)
        logger.addHandler(h)
        logger.info("signed")
        assert h.flush()
        logger.removeHandler(h)
        h.close()
        lines = (root / "shard-000" / "checkpoints.jsonl").read_text().splitlines()
        assert lines and all(json.loads(line)["key_id"] != "sha256" for line in lines)
        with AuditStore.open_reader(root / "shard-000") as shard:
            assert shard.verify(public_keys=[public]).ok

    def test_records_before_the_shard_opens_keep_their_order(
        self, tmp_path: Path, logger: logging.Logger
    ) -> None:
        """A burst logged while the shard is being taken waits in the process's queue, in order."""
        root = tmp_path / "set"
        fallback = ListHandler()
        h = AuditHandler(root, shards=2, fallback=fallback)
        logger.addHandler(h)
        for i in range(2000):
            logger.info("burst", extra={"i": i})
        assert h.flush()
        assert fallback.records == []
        assert [r["i"] for r in _records(root)] == list(range(2000))
        m = h.metrics()
        assert m["offered"] == m["accepted"] == m["written"] == 2000

    def test_small_queue_overflow_is_counted_not_lost(self, tmp_path: Path, logger: logging.Logger) -> None:
        """With a tiny queue, the overflow goes to the fallback, counted: stored + diverted == sent."""
        root = tmp_path / "set"
        fallback = ListHandler()
        h = AuditHandler(root, shards=2, fallback=fallback, queue_size=4)
        logger.addHandler(h)
        for i in range(300):
            logger.info("x", extra={"i": i})
        assert h.flush()
        stored = {r["i"] for r in _records(root)}
        diverted = {r.i for r in fallback.records}
        assert stored | diverted == set(range(300)) and not stored & diverted
        m = h.metrics()
        assert m["rejected"] == len(diverted) == m["fallback_ok"]

    def test_dictconfig_builds_a_set_handler(self, tmp_path: Path) -> None:
        """``shards`` works from dictConfig (the "class" form)."""
        import logging.config

        root = tmp_path / "set"
        name = f"dc.{id(tmp_path)}"
        logging.config.dictConfig(
            {
                "version": 1,
                "disable_existing_loggers": False,
                "handlers": {
                    "audit": {"class": "quipu_logging.AuditHandler", "root": str(root), "shards": "auto"}
                },
                "loggers": {name: {"handlers": ["audit"], "level": "INFO", "propagate": False}},
            }
        )
        log = logging.getLogger(name)
        log.info("via dictConfig")
        handler = log.handlers[0]
        assert isinstance(handler, AuditHandler) and handler.flush()
        assert StoreSet.open(root).limit == max(8, 2 * (os.cpu_count() or 1))
        logging.config.dictConfig({"version": 1, "disable_existing_loggers": False})
        assert [r["message"] for r in _records(root)] == ["via dictConfig"]


class TestBusy:
    def test_every_shard_busy_goes_to_the_fallback_counted(
        self,
        tmp_path: Path,
        logger: logging.Logger,
        capfd: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """With every shard held: one clear message (root, limit, pid), records to the fallback, counted."""
        root = tmp_path / "set"
        s = StoreSet.open(root, shards=1)
        _, held = s.acquire()
        fallback = ListHandler()
        h = AuditHandler(root, shards=1, fallback=fallback)
        logger.addHandler(h)
        for i in range(5):
            logger.info("busy", extra={"i": i})
        assert h.flush()
        for i in range(5, 8):
            logger.info("busy", extra={"i": i})
        assert sorted(r.i for r in fallback.records) == list(range(8))
        m = h.metrics()
        assert m["handed_off"] + m["rejected"] == 8 and m["written"] == 0
        # Diverted as "unavailable" (every shard busy), not as a closed pipeline.
        assert m["diverted_closed"] == 0 and m["diverted_unavailable"] == m["rejected"] > 0
        err = capfd.readouterr().err
        # One line per attempt to take a shard (the one below), nothing misleading beside it.
        assert "is closed or its writer" not in err and "dead-letter queue" not in err
        assert err.count("quipu_logging:") == 1, err
        assert (
            f"all 1 shards of store set {str(root.resolve())!r} are busy (held by pids {os.getpid()})" in err
        )
        assert h.health()["status"] == "unhealthy"
        # Once a shard is free again, the next attempt (here: at once) takes it.
        held.close()
        monkeypatch.setattr(_sharded, "RETRY_INTERVAL", 0.0)
        logger.info("busy", extra={"i": 8})  # still inside the old retry window: diverted
        handle = h._set_handle
        assert handle is not None
        handle._retry_at = 0.0
        logger.info("back", extra={"i": 9})
        assert h.flush()
        assert [r["i"] for r in _records(root)] == [9]


@pytest.mark.filterwarnings(FORK_WARNING)
class TestFork:
    def test_child_takes_its_own_shard_parent_keeps_its_own(
        self, tmp_path: Path, logger: logging.Logger
    ) -> None:
        """After fork the child's first record takes a new shard; the parent keeps shard-000."""
        root = tmp_path / "set"
        h = AuditHandler(root, shards=4)
        logger.addHandler(h)
        logger.info("parent before", extra={"who": "parent"})
        assert h.flush()
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: no pytest machinery from here on
            code = 1
            try:
                os.close(r)
                for i in range(50):
                    logger.info("child", extra={"who": "child", "i": i})
                ok = h.flush()
                os.write(w, f"{h.metrics()['shard']} {ok}".encode())
                h.close()
                code = 0
            finally:
                os._exit(code)
        os.close(w)
        with os.fdopen(r) as pipe:
            answer = pipe.read()
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert answer == "shard-001 True"
        logger.info("parent after", extra={"who": "parent"})
        assert h.flush()
        assert h.metrics()["shard"] == "shard-000"
        recs = _records(root)
        assert [r["message"] for r in recs if r["$shard"] == "shard-000"] == ["parent before", "parent after"]
        assert [r["i"] for r in recs if r["$shard"] == "shard-001"] == list(range(50))
        with AuditStore.open_reader(root) as reader:
            assert reader.verify().ok

    def test_child_killed_shard_is_reused(self, tmp_path: Path, logger: logging.Logger) -> None:
        """A SIGKILLed child's shard is free again; the next child continues its tree."""
        root = tmp_path / "set"
        h = AuditHandler(root, shards=2)
        logger.addHandler(h)
        logger.info("parent")
        assert h.flush()
        sizes = []
        for round_ in range(2):
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:
                try:
                    os.close(r)
                    for i in range(20):
                        logger.info("child", extra={"round": round_, "i": i})
                    h.flush()
                    os.write(w, b"flushed")
                    signal.pause()  # killed here, never closing anything
                finally:
                    os._exit(1)
            os.close(w)
            try:
                got = os.read(r, 7)  # the child keeps its end open until it is killed: no EOF to wait for
            finally:
                os.close(r)
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            assert got == b"flushed"
            with AuditStore.open_reader(root) as reader:
                sizes.append(reader.shard("shard-001").tree_size)
        assert sorted(os.listdir(root)) == [
            "SET",
            "SET.lock",
            "set-checkpoints.jsonl",
            "shard-000",
            "shard-001",
        ]
        assert sizes[1] >= sizes[0] + 20
        with AuditStore.open_reader(root) as reader:
            assert reader.verify().ok
