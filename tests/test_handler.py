"""Tests of quipu_logging.handler: AuditHandler's emit rules, fallback, sharing and hostile moments.

Hostile moments (writer thread, fallback, signal handler, ``__del__``, shutdown, fork, exit
without close, a second process) run in subprocesses with a timeout, so a deadlock fails
the test instead of hanging the suite.
"""

from __future__ import annotations

import io
import json
import logging
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import quipu_logging
from quipu_logging import (
    AuditContextFilter,
    AuditHandler,
    AuditJsonFormatter,
    AuditPipeline,
    AuditStore,
    ConfigError,
    PermissionPolicy,
    StoreConfig,
)
from quipu_logging.context import audit_context
from quipu_logging.testing import paused

PACKAGE_PARENT = str(Path(quipu_logging.__file__).resolve().parent.parent)


class Capture(logging.Handler):
    """A fallback that keeps every record it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []
        self.flushes = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def flush(self) -> None:
        self.flushes += 1

    @property
    def messages(self) -> list[str]:
        return [r.getMessage() for r in self.records]


def stored(root: Path) -> list[dict[str, Any]]:
    """Every payload in the store at ``root``, in order."""
    with AuditStore.open_reader(root) as reader:
        return [rec.payload for rec in reader.scan()]


def user_records(root: Path) -> list[dict[str, Any]]:
    """The stored payloads that are not ``$sys`` records."""
    return [p for p in stored(root) if "$sys" not in p]


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "audit"


@pytest.fixture
def logger(request: pytest.FixtureRequest) -> Iterator[logging.Logger]:
    lg = logging.getLogger(f"quipu.test.{request.node.name}")
    lg.propagate = False
    lg.setLevel(logging.DEBUG)
    yield lg
    for h in list(lg.handlers):
        lg.removeHandler(h)


@pytest.fixture
def make_handler(root: Path, logger: logging.Logger) -> Iterator[Callable[..., AuditHandler]]:
    made: list[AuditHandler] = []

    def make(*args: Any, attach: bool = True, **kwargs: Any) -> AuditHandler:
        if not args and "pipeline" not in kwargs:
            args = (root,)
        handler = AuditHandler(*args, **kwargs)
        made.append(handler)
        if attach:
            logger.addHandler(handler)
        return handler

    yield make
    for handler in made:
        handler.close()


def run_script(code: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Runs ``code`` in a fresh interpreter that imports the quipu_logging under test."""
    env = dict(os.environ, PYTHONPATH=PACKAGE_PARENT, PYTHONWARNINGS="ignore::DeprecationWarning")
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )


class TestConstruction:
    def test_needs_exactly_one_of_root_and_pipeline(self, root: Path) -> None:
        """Neither, or both, of root and pipeline is a ConfigError."""
        with pytest.raises(ConfigError, match="exactly one"):
            AuditHandler()
        pipeline = AuditPipeline.start(root)
        try:
            with pytest.raises(ConfigError, match="exactly one"):
                AuditHandler(root, pipeline=pipeline)
        finally:
            pipeline.close()

    @pytest.mark.parametrize("shards", [0, -1, "many", True, 2.5])
    def test_bad_shards_are_refused(self, root: Path, shards: object) -> None:
        """``shards`` is "auto" or a positive number; anything else is a ConfigError."""
        with pytest.raises(ConfigError, match="shards"):
            AuditHandler(root, shards=shards)

    def test_misspelt_option_names_the_right_one(self, root: Path) -> None:
        """A typo in a handler keyword is a ConfigError suggesting the intended one."""
        with pytest.raises(ConfigError, match="did you mean 'fallback'"):
            AuditHandler(root, fallbak="console")

    @pytest.mark.parametrize(
        "kwargs",
        [
            {"sync": "sometimes"},
            {"queue_size": 0},
            {"flush_timeout": -1},
            {"max_field_chars": 0},
            {"role": ""},
            {"fallback": 42},
            {"rename_fields": {"levelname": "sev"}},
        ],
    )
    def test_bad_values_are_config_errors(self, root: Path, kwargs: dict[str, Any]) -> None:
        """Invalid option values fail at construction, before any store is opened."""
        with pytest.raises(ConfigError):
            AuditHandler(root, **kwargs)
        assert not root.exists()

    @pytest.mark.parametrize("empty", ["", "   "])
    def test_empty_root_is_refused(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, empty: str) -> None:
        """An empty root (an unset environment variable) never silently means the current directory."""
        monkeypatch.chdir(tmp_path)
        with pytest.raises(ConfigError, match="root is empty"):
            AuditHandler(empty)
        with pytest.raises(ConfigError, match="root is empty"):
            StoreConfig(root=empty)
        assert list(tmp_path.iterdir()) == []

    def test_unreadable_signing_key_is_a_config_error(self, root: Path, tmp_path: Path) -> None:
        """signing_key is loaded at construction: a missing or non-key file fails there."""
        with pytest.raises(ConfigError, match=r"missing\.pem"):
            AuditHandler(root, signing_key=tmp_path / "missing.pem")
        not_a_key = tmp_path / "key.pem"
        not_a_key.write_text("hello\n")
        with pytest.raises(ConfigError, match=r"key\.pem"):
            AuditHandler(root, signing_key=not_a_key)

    def test_signing_key_signs_the_checkpoints(
        self,
        root: Path,
        logger: logging.Logger,
        make_handler: Callable[..., AuditHandler],
        ed25519_pem: tuple[Path, bytes],
    ) -> None:
        """With signing_key, every checkpoint the handler's store writes verifies with the public key."""
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519

        pem, public = ed25519_pem
        handler = make_handler(signing_key=pem)
        logger.warning("signed")
        handler.close()
        lines = (root / "checkpoints.jsonl").read_text().splitlines()
        assert lines and all(json.loads(line)["key_id"] != "sha256" for line in lines)
        with AuditStore.open_reader(root) as reader:
            assert reader.verify(public_keys=[public]).ok
        other = (
            ed25519.Ed25519PrivateKey.generate()
            .public_key()
            .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        )
        with AuditStore.open_reader(root) as reader:
            assert not reader.verify(public_keys=[other]).ok

    def test_pipeline_options_belong_to_the_pipeline(self, root: Path) -> None:
        """With ``pipeline=``, queue_size and sync cannot be given to the handler."""
        pipeline = AuditPipeline.start(root)
        try:
            with pytest.raises(ConfigError, match="belong to the pipeline"):
                AuditHandler(pipeline=pipeline, queue_size=8)
        finally:
            pipeline.close()

    def test_given_pipeline_is_used_and_left_open(
        self, root: Path, logger: logging.Logger, make_handler: Callable[..., AuditHandler]
    ) -> None:
        """A handler on a caller's pipeline feeds it, and closing the handler leaves it open."""
        pipeline = AuditPipeline.start(root)
        try:
            handler = make_handler(pipeline=pipeline)
            logger.info("via pipeline")
            assert handler.flush()
            handler.close()
            assert not pipeline.closed
        finally:
            pipeline.close()
        assert [p["message"] for p in user_records(root)] == ["via pipeline"]


class TestEmit:
    def test_stored_record_shape(
        self, root: Path, logger: logging.Logger, make_handler: Callable[..., AuditHandler]
    ) -> None:
        """The stored record has DESIGN §7's keys, with ``seq`` added by the store."""
        handler = make_handler()
        logger.info(
            "user %s updated doc", "alice", extra={"actor": "alice", "action": "update", "target": "doc-42"}
        )
        assert handler.flush()
        (payload,) = stored(root)
        assert set(payload) == {
            "action",
            "actor",
            "level",
            "levelno",
            "logger",
            "message",
            "process",
            "seq",
            "source",
            "target",
            "thread",
            "ts",
        }
        assert payload["message"] == "user alice updated doc"
        assert payload["level"] == "INFO" and payload["levelno"] == 20 and payload["seq"] == 0
        assert payload["source"] == {
            "file": "test_handler.py",
            "func": "test_stored_record_shape",
            "line": payload["source"]["line"],
        }
        assert payload["thread"] == "MainThread" and payload["process"] == os.getpid()

    def test_handle_does_not_take_the_handler_lock(
        self, logger: logging.Logger, make_handler: Callable[..., AuditHandler]
    ) -> None:
        """A producer is not held up by another thread holding the handler lock."""
        handler = make_handler()
        assert handler.lock is not None
        locked, release, done = threading.Event(), threading.Event(), threading.Event()

        def hold() -> None:
            assert handler.lock is not None
            with handler.lock:
                locked.set()
                release.wait(10)

        def produce() -> None:
            logger.info("while locked")
            done.set()

        holder = threading.Thread(target=hold)
        holder.start()
        assert locked.wait(10)
        producer = threading.Thread(target=produce)
        producer.start()
        try:
            assert done.wait(10)
        finally:
            release.set()
            holder.join()
            producer.join()

    def test_filters_still_apply(
        self, root: Path, logger: logging.Logger, make_handler: Callable[..., AuditHandler]
    ) -> None:
        """A handler filter that returns False keeps the record out, uncounted."""
        handler = make_handler()
        handler.addFilter(lambda r: "keep" in r.getMessage())
        logger.info("drop me")
        logger.info("keep me")
        assert handler.flush()
        assert [p["message"] for p in user_records(root)] == ["keep me"]
        assert handler.metrics()["rejected"] == 0

    @pytest.mark.skipif(sys.version_info < (3, 12), reason="filters return records from 3.12")
    def test_filter_returning_a_new_record(
        self, root: Path, logger: logging.Logger, make_handler: Callable[..., AuditHandler]
    ) -> None:
        """A 3.12 filter's replacement record is what gets stored; the original is untouched."""
        handler = make_handler()
        seen: list[logging.LogRecord] = []

        def enrich(record: logging.LogRecord) -> logging.LogRecord:
            seen.append(record)
            copy = logging.makeLogRecord(record.__dict__)
            copy.tenant = "t1"
            return copy

        handler.addFilter(enrich)  # type: ignore[arg-type]
        logger.info("enriched")
        assert handler.flush()
        assert user_records(root)[0]["tenant"] == "t1"
        assert not hasattr(seen[0], "tenant")

    def test_context_filter_adds_fields(
        self, root: Path, logger: logging.Logger, make_handler: Callable[..., AuditHandler]
    ) -> None:
        """AuditContextFilter copies contextvars into the stored record."""
        handler = make_handler()
        handler.addFilter(AuditContextFilter(fields=("actor", "request_id")))
        with audit_context(actor="alice", request_id="r-1"):
            logger.info("inside")
        logger.info("outside")
        assert handler.flush()
        inside, outside = user_records(root)
        assert inside["actor"] == "alice" and inside["request_id"] == "r-1"
        assert "actor" not in outside

    def test_record_reuse_output_is_byte_identical(self, root: Path, logger: logging.Logger) -> None:
        """Row "record reuse": a handler after ours formats exactly what it would without ours."""

        def run(with_ours: bool) -> list[str]:
            lines: list[str] = []

            class Lines(logging.Handler):
                def emit(self, record: logging.LogRecord) -> None:
                    lines.append(self.format(record))

            capture = Lines()
            capture.setFormatter(logging.Formatter("%(levelname)s|%(name)s|%(message)s|%(args)s"))
            ours = AuditHandler(root) if with_ours else None
            for h in (ours, capture):
                if h is not None:
                    logger.addHandler(h)
            try:
                try:
                    raise ValueError("boom")
                except ValueError:
                    logger.error("user=%s", "u1", exc_info=True)
            finally:
                for h in (ours, capture):
                    if h is not None:
                        logger.removeHandler(h)
                        h.close()
            return lines

        assert run(True) == run(False)
        assert "ValueError: boom" in run(False)[0]

    def test_record_attributes_unchanged(
        self, logger: logging.Logger, make_handler: Callable[..., AuditHandler]
    ) -> None:
        """After our handle(), the record's attributes are exactly as the logger made them."""
        handler = make_handler(attach=False)
        try:
            raise KeyError("k")
        except KeyError:
            record = logger.makeRecord(
                logger.name,
                logging.ERROR,
                __file__,
                1,
                "failed %s",
                ("x",),
                sys.exc_info(),
                extra={"ctx": {"a": 1}},
                sinfo="Stack (most recent call last):\n  here",
            )
        before = dict(record.__dict__)
        handler.handle(record)
        assert record.__dict__ == before
        assert handler.flush()

    def test_late_mutation(
        self, root: Path, logger: logging.Logger, make_handler: Callable[..., AuditHandler]
    ) -> None:
        """Row "late mutation": containers in extra are frozen at call time."""
        handler = make_handler()
        d: dict[str, Any] = {"k": [1]}
        with paused(handler):
            logger.info("ctx", extra={"ctx": d})
            d["k"].append(2)
        assert handler.flush()
        assert user_records(root)[0]["ctx"] == {"k": [1]}

    def test_odd_values(
        self, root: Path, logger: logging.Logger, make_handler: Callable[..., AuditHandler]
    ) -> None:
        """Row "odd values": the call returns, the record is stored with markers, and counted."""
        handler = make_handler()
        cyc: list[Any] = [1]
        cyc.append(cyc)
        with socket.socket() as sock:
            extra = {
                "cyc": cyc,
                "sock": sock,
                "raw": b"\x00\xff",
                "nan": float("nan"),
                "lone": "a\ud800b",
                "huge": "x" * 20_000_000,
                "seq": 7,
                "ts": "forged",
                "$sys": "gap",
            }
            logger.info("odd", extra=extra)
            assert handler.flush()
        (payload,) = user_records(root)
        assert payload["cyc"] == [1, {"$cycle": True}]
        assert "socket" in payload["sock"]["$repr"]
        assert payload["raw"] == {"$bytes": "AP8="}
        assert payload["nan"] == "NaN"
        assert payload["lone"] == "a\ufffdb" and payload["$lossy"] is True
        assert payload["huge"] == "x" * 65536
        assert payload["seq"] == 0 and payload["seq#2"] == 7
        assert isinstance(payload["ts"], int) and payload["ts#2"] == "forged"
        assert payload["$$sys"] == "gap" and "$sys" not in payload
        metrics = handler.metrics()
        assert metrics["written"] == 1 and metrics["truncated"] == 1 and metrics["rejected"] == 0

    def test_truncation_marker_is_stored_unescaped(
        self, root: Path, logger: logging.Logger, make_handler: Callable[..., AuditHandler]
    ) -> None:
        """A cut field is listed under ``$truncated`` with its original length."""
        handler = make_handler(max_field_chars=10)
        logger.info("m", extra={"long": "y" * 25, "nested": {"deep": ["z" * 11]}})
        assert handler.flush()
        payload = user_records(root)[0]
        assert payload["$truncated"] == {"long": 25, "nested.deep.0": 11}

    def test_truncation_cuts_fields(
        self, root: Path, logger: logging.Logger, make_handler: Callable[..., AuditHandler]
    ) -> None:
        """Strings longer than max_field_chars are cut at any depth; the lengths are recorded."""
        handler = make_handler(max_field_chars=10)
        nested = {"deep": ["z" * 11]}
        logger.info("m" * 12, extra={"long": "y" * 25, "nested": nested, "short": "ok"})
        assert handler.flush()
        payload = user_records(root)[0]
        assert payload["long"] == "y" * 10 and payload["nested"] == {"deep": ["z" * 10]}
        assert payload["message"] == "m" * 10 and payload["short"] == "ok"
        assert payload["$truncated"] == {"long": 25, "nested.deep.0": 11, "message": 12}
        assert "$$truncated" not in payload
        assert nested == {"deep": ["z" * 11]}

    def test_exception_once(
        self, root: Path, logger: logging.Logger, make_handler: Callable[..., AuditHandler]
    ) -> None:
        """Row "exception once": one traceback in exc, one stack in stack, a clean message."""
        handler = make_handler()
        try:
            raise RuntimeError("bad")
        except RuntimeError:
            logger.exception("failed", stack_info=True)
        assert handler.flush()
        payload = user_records(root)[0]
        assert payload["message"] == "failed"
        assert payload["exc"].count("Traceback (most recent call last)") == 1
        assert "RuntimeError: bad" in payload["exc"]
        assert payload["stack"].count("Stack (most recent call last)") == 1
        assert "Traceback" not in payload["stack"]

    def test_errors_go_through_handle_error_without_payload(
        self,
        logger: logging.Logger,
        make_handler: Callable[..., AuditHandler],
        capfd: pytest.CaptureFixture[str],
    ) -> None:
        """A failure preparing a record is reported once, without content; the record is diverted."""

        class Broken(AuditJsonFormatter):
            def add_fields(
                self, log_data: dict[str, Any], record: logging.LogRecord, message_dict: dict[str, Any]
            ) -> None:
                raise RuntimeError("formatter exploded")

        fallback = Capture()
        handler = make_handler(fallback=fallback)
        handler.setFormatter(Broken())
        logger.info("secret %s", "s3cret-value", extra={"card": "4111-1111"})
        err = capfd.readouterr().err
        assert err.count("--- Logging error in quipu_logging.AuditHandler ---") == 1
        assert "formatter exploded" in err
        assert "s3cret" not in err and "4111" not in err
        assert fallback.messages == ["secret s3cret-value"]
        metrics = handler.metrics()
        assert metrics["diverted_error"] == 1 and metrics["handler_errors"] == 1
        assert metrics["rejected"] == metrics["fallback_ok"] == 1

    def test_emit_never_raises_even_with_raise_exceptions_off(
        self,
        logger: logging.Logger,
        make_handler: Callable[..., AuditHandler],
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """With logging.raiseExceptions false, errors are silent, and still counted."""
        monkeypatch.setattr(logging, "raiseExceptions", False)

        class Broken(AuditJsonFormatter):
            def to_mapping(
                self, record: logging.LogRecord, *, max_field_chars: int | None = None
            ) -> dict[str, Any]:
                raise ValueError("nope")

        fallback = Capture()
        handler = make_handler(fallback=fallback)
        handler.setFormatter(Broken())
        logger.info("x")
        assert len(fallback.records) == 1 and handler.metrics()["handler_errors"] == 1


class TestFallback:
    def test_full_queue(
        self, root: Path, logger: logging.Logger, make_handler: Callable[..., AuditHandler]
    ) -> None:
        """Row "full queue": 100 prompt calls, 99 originals to the fallback in order, counters agree."""
        fallback = Capture()
        after = Capture()
        handler = make_handler(queue_size=1, fallback=fallback)
        logger.addHandler(after)
        slowest = 0.0
        with paused(handler):
            for i in range(100):
                started = time.perf_counter()
                logger.info("r%d", i)
                slowest = max(slowest, time.perf_counter() - started)
        assert slowest < 1.0
        assert fallback.messages == [f"r{i}" for i in range(1, 100)]
        assert all(a is b for a, b in zip(fallback.records, after.records[1:], strict=True))
        assert handler.flush()
        m = handler.metrics()
        assert m["rejected"] == m["fallback_ok"] == m["diverted_full"] == 99 and m["fallback_failed"] == 0
        assert m["offered"] == 100 and m["accepted"] == 1 and m["rejected_full"] == 99 and m["written"] == 1
        records = stored(root)
        assert [p["message"] for p in records if "$sys" not in p] == ["r0"]
        gaps = [p for p in records if p.get("$sys") == "gap"]
        assert len(gaps) == 1 and gaps[0]["count"] == 99

    def test_stop_when_full(
        self, root: Path, logger: logging.Logger, make_handler: Callable[..., AuditHandler]
    ) -> None:
        """Row "stop when full": capacity 8, writer held, queue full, close(): all 8 stored."""
        fallback = Capture()
        handler = make_handler(queue_size=8, fallback=fallback)
        with paused(handler):
            for i in range(9):
                logger.info("r%d", i)
            assert handler.metrics()["queue_depth"] == 8
            handler.close()
        assert [p["message"] for p in user_records(root)] == [f"r{i}" for i in range(8)]
        assert fallback.messages == ["r8"]
        assert handler.pipeline is not None and handler.pipeline.closed

    def test_writer_dies(
        self,
        logger: logging.Logger,
        make_handler: Callable[..., AuditHandler],
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """Row "writer dies": health says not alive; later records go to the fallback; no raise."""

        class Fatal(BaseException):
            pass

        def die(events: Any) -> Any:
            raise Fatal("injected")

        fallback = Capture()
        handler = make_handler(fallback=fallback)
        assert handler.pipeline is not None
        monkeypatch.setattr(handler.pipeline._store, "append_batch", die)
        logger.info("kills the writer")
        assert handler.flush(timeout=10) is False
        health = handler.health()
        assert health["writer_alive"] is False and health["status"] == "unhealthy"
        logger.info("after death")
        assert fallback.messages == ["after death"]
        m = handler.metrics()
        assert m["diverted_closed"] == 1 and m["rejected"] == m["fallback_ok"] == 1

    def test_fallback_instance(
        self, logger: logging.Logger, make_handler: Callable[..., AuditHandler]
    ) -> None:
        """A handler instance as fallback receives the rejected record synchronously."""
        fallback = Capture()
        handler = make_handler(queue_size=1, fallback=fallback)
        with paused(handler):
            logger.info("a")
            logger.info("b")
            assert fallback.messages == ["b"]

    def test_fallback_by_name_resolved_lazily(
        self, logger: logging.Logger, make_handler: Callable[..., AuditHandler]
    ) -> None:
        """A fallback named before the named handler exists is found when first needed."""
        handler = make_handler(queue_size=1, fallback="later-console")
        fallback = Capture()
        fallback.set_name("later-console")
        try:
            with paused(handler):
                logger.info("a")
                logger.info("b")
            assert fallback.messages == ["b"]
        finally:
            fallback.close()

    def test_fallback_stream(self, logger: logging.Logger, make_handler: Callable[..., AuditHandler]) -> None:
        """A stream as fallback gets one JSON line per rejected record."""
        stream = io.StringIO()
        handler = make_handler(queue_size=1, fallback=stream)
        with paused(handler):
            logger.info("a")
            logger.info("b %s", "x", extra={"actor": "u"})
        (line,) = stream.getvalue().splitlines()
        obj = json.loads(line)
        assert obj["message"] == "b x" and obj["actor"] == "u" and obj["level"] == "INFO"

    def test_no_fallback_means_stderr_json(
        self,
        logger: logging.Logger,
        make_handler: Callable[..., AuditHandler],
        capfd: pytest.CaptureFixture[str],
    ) -> None:
        """Without a fallback, each rejected record is one JSON line on stderr."""
        handler = make_handler(queue_size=1)
        with paused(handler):
            for i in range(4):
                logger.info("r%d", i)
        err = capfd.readouterr().err
        lines = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
        assert [obj["message"] for obj in lines] == ["r1", "r2", "r3"]

    def test_another_audit_handler_as_fallback(
        self, tmp_path: Path, logger: logging.Logger, make_handler: Callable[..., AuditHandler]
    ) -> None:
        """An AuditHandler on a second root can be the fallback: diverted records are stored there."""
        spare = make_handler(tmp_path / "spare", attach=False)
        handler = make_handler(queue_size=1, fallback=spare)
        with paused(handler):
            logger.info("kept")
            logger.info("diverted")
        assert spare.flush() and handler.flush()
        assert [p["message"] for p in user_records(tmp_path / "spare")] == ["diverted"]

    def test_failing_fallback_is_counted(
        self, logger: logging.Logger, make_handler: Callable[..., AuditHandler]
    ) -> None:
        """A fallback that raises costs the app nothing; it is counted as fallback_failed."""

        class Failing(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                raise OSError("disk gone")

            def handle(self, record: logging.LogRecord) -> bool:
                self.emit(record)
                return True

        handler = make_handler(queue_size=1, fallback=Failing())
        with paused(handler):
            for i in range(3):
                logger.info("r%d", i)
        m = handler.metrics()
        assert m["rejected"] == 2 and m["fallback_failed"] == 2 and m["fallback_ok"] == 0

    def test_warnings_are_rate_limited(
        self,
        logger: logging.Logger,
        make_handler: Callable[..., AuditHandler],
        capfd: pytest.CaptureFixture[str],
    ) -> None:
        """Many diversions produce one warning line (records themselves all go through)."""
        fallback = Capture()
        handler = make_handler(queue_size=1, fallback=fallback)
        with paused(handler):
            for i in range(50):
                logger.info("r%d", i)
        err = capfd.readouterr().err
        assert err.count("the audit queue is full") == 1
        assert len(fallback.records) == 49

    def test_denied_role_goes_to_fallback(self, root: Path, logger: logging.Logger) -> None:
        """A role the policy denies: the record goes to the fallback and is counted."""
        policy = PermissionPolicy({"auditor": {"query"}})
        pipeline = AuditPipeline.start(root, permissions=policy)
        fallback = Capture()
        handler = AuditHandler(pipeline=pipeline, role="app", fallback=fallback)
        logger.addHandler(handler)
        try:
            logger.info("denied")
            assert fallback.messages == ["denied"]
            m = handler.metrics()
            assert m["diverted_denied"] == 1 and m["denied"] == 1 and m["rejected"] == m["fallback_ok"] == 1
        finally:
            handler.close()
            pipeline.close()

    def test_flush_flushes_the_fallback(self, make_handler: Callable[..., AuditHandler]) -> None:
        """``flush()`` returns True and flushes the fallback too."""
        fallback = Capture()
        handler = make_handler(fallback=fallback)
        handler._fallback_handler()
        assert handler.flush() is True
        assert fallback.flushes >= 1

    @pytest.mark.parametrize("form", ["root", "pipeline"])
    def test_lost_events_reach_the_fallback(
        self,
        root: Path,
        logger: logging.Logger,
        make_handler: Callable[..., AuditHandler],
        monkeypatch: pytest.MonkeyPatch,
        form: str,
    ) -> None:
        """An event the store and the DLQ both refuse is handed to the fallback as a record,
        also through a pipeline the caller started without an ``on_lost`` of its own."""
        fallback = Capture()
        if form == "root":
            handler = make_handler(fallback=fallback)
        else:
            own = AuditPipeline.start(root)
            handler = make_handler(pipeline=own, fallback=fallback)
        pipeline = handler.pipeline
        assert pipeline is not None

        def refuse(events: Any) -> Any:
            raise OSError(28, "No space left on device")

        def refuse_park(events: Any, error: BaseException) -> Any:
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(pipeline._store, "append_batch", refuse)
        monkeypatch.setattr(pipeline._dlq, "park", refuse_park)
        logger.warning("lost %s", "one", extra={"actor": "alice"})
        handler.flush()
        (record,) = fallback.records
        assert record.getMessage() == "lost one" and record.actor == "alice"  # type: ignore[attr-defined]
        assert record.levelname == "WARNING" and "No space" in record.quipu_lost  # type: ignore[attr-defined]
        assert handler.metrics()["handed_off"] == 1
        if form == "pipeline":
            handler.close()
            pipeline.close()


class TestSharing:
    def test_handlers_on_one_root_share_a_pipeline(
        self, root: Path, tmp_path: Path, make_handler: Callable[..., AuditHandler]
    ) -> None:
        """Handlers naming one root (even via a symlink) share a pipeline; the last close stops it."""
        link = tmp_path / "link"
        root.mkdir()
        link.symlink_to(root)
        first = make_handler(root)
        second = make_handler(link)
        assert first.pipeline is second.pipeline and first.pipeline is not None
        first.close()
        assert not second.pipeline.closed  # type: ignore[union-attr]
        second.close()
        assert second.pipeline.closed  # type: ignore[union-attr]

    def test_conflicting_options_are_refused(
        self, root: Path, make_handler: Callable[..., AuditHandler]
    ) -> None:
        """A second live handler with another sync policy for the same root is a ConfigError."""
        make_handler(sync="os")
        with pytest.raises(ConfigError, match="same options"):
            AuditHandler(root, sync="always")
        with pytest.raises(ConfigError, match="signing_key"):
            AuditHandler(root, sync="os", signing_key="/elsewhere/key.pem")

    def test_handlers_dropped_without_close(
        self, root: Path, make_handler: Callable[..., AuditHandler]
    ) -> None:
        """A pipeline whose handlers were dropped unclosed is reused, or replaced on new options."""
        import gc

        orphan = AuditHandler(root)
        old = orphan.pipeline
        del orphan
        gc.collect()
        same = make_handler()
        assert same.pipeline is old
        same.close()
        orphan = AuditHandler(root)
        old = orphan.pipeline
        del orphan
        gc.collect()
        other = make_handler(sync="always")
        assert old is not None and old.closed and other.pipeline is not old

    def test_pipeline_opened_elsewhere_in_process(
        self, root: Path, capfd: pytest.CaptureFixture[str]
    ) -> None:
        """A root this process already writes elsewhere: clear message, records to the fallback."""
        pipeline = AuditPipeline.start(root)
        fallback = Capture()
        handler = AuditHandler(root, fallback=fallback)
        try:
            assert handler.unavailable is not None and "pipeline=" in handler.unavailable
            assert "AuditHandler(pipeline=...)" in capfd.readouterr().err
            handler.handle(logging.makeLogRecord({"msg": "x"}))
            assert fallback.messages == ["x"] and handler.health()["status"] == "unhealthy"
        finally:
            handler.close()
            pipeline.close()

    def test_reopen_after_last_close(
        self, root: Path, logger: logging.Logger, make_handler: Callable[..., AuditHandler]
    ) -> None:
        """After the last close, a new handler opens a new pipeline on the same root."""
        first = make_handler()
        logger.info("one")
        first.close()
        second = make_handler(sync="always")
        assert second.pipeline is not first.pipeline
        logger.info("two")
        assert second.flush()
        assert [p["message"] for p in user_records(root)] == ["one", "two"]

    def test_close_is_idempotent_and_later_records_divert(
        self, logger: logging.Logger, make_handler: Callable[..., AuditHandler]
    ) -> None:
        """close() twice is fine; a record handled after close goes to the fallback."""
        fallback = Capture()
        handler = make_handler(fallback=fallback)
        handler.close()
        handler.close()
        logger.info("late")
        assert fallback.messages == ["late"]
        assert handler.flush() is True


class TestHostileMoments:
    PRELUDE = """
        import json, logging, os, signal, sys
        from quipu_logging import AuditHandler, AuditJsonFormatter, AuditStore
        root = sys.argv[1]

        class Capture(logging.Handler):
            def __init__(self):
                super().__init__()
                self.messages = []
            def emit(self, record):
                self.messages.append(record.getMessage())

        log = logging.getLogger("hostile")
        log.propagate = False
        log.setLevel(logging.INFO)

        def report(handler, **more):
            m = handler.metrics()
            keys = ("rejected", "fallback_ok", "fallback_failed", "diverted_reentrant", "written", "offered")
            print(json.dumps({**{k: m[k] for k in keys}, **more}), flush=True)

        def stored():
            with AuditStore.open_reader(root) as r:
                return [rec.payload for rec in r.scan() if "$sys" not in rec.payload]
    """

    def run(self, body: str, root: Path) -> tuple[dict[str, Any], str]:
        proc = run_script(textwrap.dedent(self.PRELUDE) + textwrap.dedent(body), str(root))
        assert proc.returncode == 0, proc.stderr
        assert "Traceback" not in proc.stderr, proc.stderr
        return json.loads(proc.stdout.splitlines()[-1]), proc.stderr

    def test_logging_from_the_writer_thread(self, root: Path) -> None:
        """A record logged while the writer renders a value goes to the fallback."""
        out, _ = self.run(
            """
            cap = Capture()
            h = AuditHandler(root, fallback=cap)
            log.addHandler(h)
            class Loud:
                def __repr__(self):
                    log.warning("from repr")
                    return "<loud>"
            log.info("outer", extra={"obj": Loud()})
            assert h.flush()
            report(h, fallback=cap.messages, stored=[p["obj"] for p in stored()])
            h.close()
            """,
            root,
        )
        assert out["fallback"] == ["from repr"] and out["stored"] == [{"$repr": "<loud>"}]
        assert out["diverted_reentrant"] == 1 and out["rejected"] == out["fallback_ok"] == 1

    def test_logging_inside_the_fallback(self, root: Path) -> None:
        """A fallback that logs again: the inner record is written once to stderr, no recursion."""
        out, err = self.run(
            """
            from quipu_logging.testing import paused
            seen = []
            class Chatty(logging.Handler):
                def emit(self, record):
                    seen.append(record.getMessage())
                    log.warning("from fallback about %s", record.getMessage())
            h = AuditHandler(root, queue_size=1, fallback=Chatty())
            log.addHandler(h)
            with paused(h):
                log.info("r0")
                log.info("r1")
            report(h, fallback=seen)
            h.close()
            """,
            root,
        )
        assert out["fallback"] == ["r1"]
        assert err.count('"message": "from fallback about r1"') == 1
        assert out["rejected"] == out["fallback_ok"] == 2

    def test_logging_from_a_signal_handler(self, root: Path) -> None:
        """A signal handler logging inside emit or inside the fallback neither deadlocks nor recurses."""
        out, err = self.run(
            """
            from quipu_logging.testing import paused
            cap = Capture()
            def on_signal(signum, frame):
                log.warning("from signal")
            signal.signal(signal.SIGUSR1, on_signal)
            class Poking(AuditJsonFormatter):
                def add_fields(self, log_data, record, message_dict):
                    super().add_fields(log_data, record, message_dict)
                    if record.getMessage() == "poke":
                        os.kill(os.getpid(), signal.SIGUSR1)
            class PokingFallback(logging.Handler):
                def emit(self, record):
                    cap.messages.append(record.getMessage())
                    if record.getMessage() == "rejected":
                        os.kill(os.getpid(), signal.SIGUSR1)
            h = AuditHandler(root, queue_size=1, fallback=PokingFallback())
            h.setFormatter(Poking())
            log.addHandler(h)
            log.info("poke")
            assert h.flush()
            with paused(h):
                log.info("fills the queue")
                log.info("rejected")
            assert h.flush()
            report(h, fallback=cap.messages, stored=[p["message"] for p in stored()])
            h.close()
            """,
            root,
        )
        assert out["fallback"] == ["from signal", "rejected"]
        assert out["stored"] == ["poke", "fills the queue"]
        assert err.count('"message": "from signal"') == 1
        assert out["rejected"] == out["fallback_ok"] == 3

    def test_logging_from_del(self, root: Path) -> None:
        """A ``__del__`` that logs while emit is running goes to the fallback."""
        out, _ = self.run(
            """
            cap = Capture()
            class Noisy:
                def __del__(self):
                    log.warning("from __del__")
            holder = [Noisy()]
            class Dropping(AuditJsonFormatter):
                def add_fields(self, log_data, record, message_dict):
                    super().add_fields(log_data, record, message_dict)
                    if holder:
                        holder.pop()
            h = AuditHandler(root, fallback=cap)
            h.setFormatter(Dropping())
            log.addHandler(h)
            log.info("outer")
            assert h.flush()
            report(h, fallback=cap.messages, stored=[p["message"] for p in stored()])
            h.close()
            """,
            root,
        )
        assert out["fallback"] == ["from __del__"] and out["stored"] == ["outer"]

    def test_logging_during_interpreter_shutdown(self, root: Path) -> None:
        """Records logged at exit, after the pipeline closed, go to the fallback; exit is clean."""
        proc = run_script(
            textwrap.dedent(self.PRELUDE)
            + textwrap.dedent(
                """
                import atexit
                atexit.register(lambda: log.warning("late record"))
                h = AuditHandler(root)
                log.addHandler(h)
                log.info("before exit")
                class AtTeardown:
                    def __del__(self, log=log):
                        log.warning("from teardown")
                keep = AtTeardown()
                """
            ),
            str(root),
        )
        assert proc.returncode == 0, proc.stderr
        assert "Traceback" not in proc.stderr and "Logging error" not in proc.stderr, proc.stderr
        lines = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith("{")]
        messages = [obj["message"] for obj in lines]
        assert "late record" in messages and "from teardown" in messages
        assert [p["message"] for p in user_records(root)] == ["before exit"]

    def test_fork_child_never_writes_the_parent_store(self, root: Path) -> None:
        """After fork the child's records go to the fallback, counted, with one warning."""
        proc = run_script(
            textwrap.dedent(self.PRELUDE)
            + textwrap.dedent(
                """
                h = AuditHandler(root)
                log.addHandler(h)
                log.info("parent before")
                assert h.flush()
                pid = os.fork()
                if pid == 0:
                    for i in range(3):
                        log.info("child %d", i)
                    m = h.metrics()
                    keys = ("rejected", "fallback_ok", "diverted_forked")
                    print(json.dumps({k: m[k] for k in keys}), flush=True)
                    os._exit(0)
                os.waitpid(pid, 0)
                log.info("parent after")
                h.close()
                """
            ),
            str(root),
        )
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout.splitlines()[0]) == {
            "rejected": 3,
            "fallback_ok": 3,
            "diverted_forked": 3,
        }
        lines = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith("{")]
        assert [obj["message"] for obj in lines] == ["child 0", "child 1", "child 2"]
        assert proc.stderr.count("was forked from pid") == 1
        assert [p["message"] for p in user_records(root)] == ["parent before", "parent after"]
        with AuditStore.open_reader(root) as reader:
            assert reader.verify()

    def test_exit_without_close_keeps_every_record(self, root: Path) -> None:
        """A script logging 10,000 records and never closing leaves all 10,000 durable and verified."""
        proc = run_script(
            textwrap.dedent(self.PRELUDE)
            + textwrap.dedent(
                """
                def main():
                    h = AuditHandler(root, queue_size=20000)
                    log.addHandler(h)
                    for i in range(10_000):
                        log.info("n %d", i, extra={"i": i})
                main()
                """
            ),
            str(root),
            timeout=120,
        )
        assert proc.returncode == 0, proc.stderr
        records = user_records(root)
        assert [p["i"] for p in records] == list(range(10_000))
        with AuditStore.open_reader(root) as reader:
            report = reader.verify()
        assert report and report.tree_size == 10_000

    def test_second_process_on_the_same_root(
        self, root: Path, logger: logging.Logger, make_handler: Callable[..., AuditHandler]
    ) -> None:
        """A second process on a held root is told the holder's pid and diverts to its fallback."""
        make_handler()
        logger.info("first process")
        proc = run_script(
            """
            import json, logging, logging.config, sys
            logging.config.dictConfig({
                "version": 1,
                "handlers": {"audit": {"class": "quipu_logging.AuditHandler", "root": sys.argv[1]}},
                "root": {"handlers": ["audit"], "level": "INFO"},
            })
            logging.getLogger("second").info("from the second process")
            handler = logging.getLogger().handlers[0]
            print(json.dumps({"unavailable": handler.unavailable, **{k: handler.metrics()[k]
                  for k in ("rejected", "fallback_ok", "diverted_unavailable")}}))
            """,
            str(root),
        )
        assert proc.returncode == 0, proc.stderr
        out = json.loads(proc.stdout)
        assert str(root) in out["unavailable"] and f"process {os.getpid()}" in out["unavailable"]
        assert out["rejected"] == out["fallback_ok"] == out["diverted_unavailable"] == 1
        assert str(root) in proc.stderr and f"process {os.getpid()} holds its writer lock" in proc.stderr
        lines = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith("{")]
        assert [obj["message"] for obj in lines] == ["from the second process"]
