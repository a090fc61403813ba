"""Tests of quipu_logging.structlog: AuditProcessor, the ProcessorFormatter bridge, and the optional extra.

Loggers are built with ``structlog.wrap_logger`` and explicit processor chains, so no test
changes structlog's global configuration.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

structlog = pytest.importorskip("structlog")

import quipu_logging  # noqa: E402
from quipu_logging import (  # noqa: E402
    AuditContextFilter,
    AuditHandler,
    AuditJsonFormatter,
    AuditPipeline,
    AuditStore,
    ConfigError,
    StoreConfig,
)
from quipu_logging.context import audit_context  # noqa: E402
from quipu_logging.structlog import AuditProcessor  # noqa: E402
from quipu_logging.testing import paused  # noqa: E402

PACKAGE_PARENT = str(Path(quipu_logging.__file__).resolve().parent.parent)


class Capture(logging.Handler):
    """A fallback that keeps every record it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def stored(root: Path) -> list[dict[str, Any]]:
    """Every payload in the store at ``root``, in order."""
    with AuditStore.open_reader(root) as reader:
        return [rec.payload for rec in reader.scan()]


def user_records(root: Path) -> list[dict[str, Any]]:
    """The stored payloads that are not ``$sys`` records."""
    return [p for p in stored(root) if "$sys" not in p]


@pytest.fixture(autouse=True)
def _clean_contextvars() -> Iterator[None]:
    structlog.contextvars.clear_contextvars()
    yield
    structlog.contextvars.clear_contextvars()


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "audit"


@pytest.fixture
def handler(root: Path) -> Iterator[AuditHandler]:
    h = AuditHandler(root, sync="os")
    yield h
    h.close()


def chain(*processors: Any) -> list[Any]:
    """A typical chain: context, level, logger name, time stamp, then ``processors``."""
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso"),
        *processors,
    ]


RENDER = structlog.processors.KeyValueRenderer()


def stdlib_logger(name: str, *handlers: logging.Handler) -> logging.Logger:
    lg = logging.getLogger(name)
    lg.handlers[:] = list(handlers) or [logging.NullHandler()]
    lg.setLevel(logging.DEBUG)
    lg.propagate = False
    return lg


def bound(processors: list[Any], name: str = "app.audit", *handlers: logging.Handler) -> Any:
    """A structlog stdlib BoundLogger over a stdlib logger with ``handlers``."""
    return structlog.wrap_logger(
        stdlib_logger(name, *handlers),
        processors=processors,
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )


class TestAuditProcessor:
    def test_returns_the_event_dict_unchanged(self, handler: AuditHandler) -> None:
        """The processor returns the very dict it got, with the same content."""
        processor = AuditProcessor(handler)
        event = {"event": "login", "level": "info", "tags": ["a"], "exc_info": False}
        before = {k: (list(v) if isinstance(v, list) else v) for k, v in event.items()}
        assert processor(None, "info", event) is event
        assert event == before

    def test_stores_the_handler_keys(self, handler: AuditHandler, root: Path) -> None:
        """event→message, upper-case level, levelno, logger, timestamp as a field, ts = call time."""
        log = bound(chain(AuditProcessor(handler), structlog.processors.JSONRenderer()))
        before = time.time_ns() // 1000
        log.warning("doc updated", actor="alice", action="update", target="doc-42")
        after = time.time_ns() // 1000
        handler.flush()
        [rec] = user_records(root)
        assert rec["message"] == "doc updated"
        assert (rec["level"], rec["levelno"], rec["logger"]) == ("WARNING", 30, "app.audit")
        assert (rec["actor"], rec["action"], rec["target"]) == ("alice", "update", "doc-42")
        assert isinstance(rec["timestamp"], str) and rec["timestamp"].endswith("Z")
        assert before <= rec["ts"] <= after
        assert not {"event", "level#2", "logger#2"} & rec.keys()

    def test_source_is_the_application_call_site(self, handler: AuditHandler, root: Path) -> None:
        """``source`` names the line that logged, not structlog's or quipu_logging's frames."""
        log = bound(chain(AuditProcessor(handler), RENDER), "app.src")
        log.info("here")
        line = sys._getframe().f_lineno - 1
        handler.flush()
        [rec] = user_records(root)
        here = {"file": Path(__file__).name, "func": "test_source_is_the_application_call_site", "line": line}
        assert rec["source"] == here
        assert rec["thread"] == "MainThread"

    def test_exc_info_is_rendered_once(self, handler: AuditHandler, root: Path) -> None:
        """``log.exception`` stores one traceback in ``exc`` and no ``exc_info`` field."""
        log = bound(chain(AuditProcessor(handler), RENDER))
        try:
            1 / 0  # noqa: B018
        except ZeroDivisionError:
            log.exception("boom")
        handler.flush()
        [rec] = user_records(root)
        assert rec["level"] == "ERROR" and rec["levelno"] == 40
        assert rec["exc"].count("Traceback (most recent call last)") == 1
        assert "ZeroDivisionError: division by zero" in rec["exc"]
        assert not {"exc_info", "exception", "exc#2"} & rec.keys()

    def test_traceback_rendered_by_format_exc_info_becomes_exc(
        self, handler: AuditHandler, root: Path
    ) -> None:
        """A traceback ``format_exc_info`` put in ``exception`` is stored once, as ``exc``."""
        log = bound(chain(structlog.processors.format_exc_info, AuditProcessor(handler), RENDER))
        try:
            raise KeyError("k")
        except KeyError:
            log.error("failed", exc_info=True)
        handler.flush()
        [rec] = user_records(root)
        assert rec["exc"].count("Traceback (most recent call last)") == 1 and "KeyError" in rec["exc"]
        assert "exception" not in rec

    def test_contextvars_and_bound_values_reach_the_record(self, handler: AuditHandler, root: Path) -> None:
        """Values from ``bind_contextvars`` and from ``log.bind`` are stored as fields."""
        log = bound(chain(AuditProcessor(handler), RENDER))
        structlog.contextvars.bind_contextvars(actor="alice", request_id="r-1")
        log.bind(tenant="t-9").info("export", target="all")
        handler.flush()
        [rec] = user_records(root)
        fields = (rec["actor"], rec["request_id"], rec["tenant"], rec["target"])
        assert fields == ("alice", "r-1", "t-9", "all")

    def test_sends_a_copy(self, handler: AuditHandler, root: Path) -> None:
        """A later processor changing the event dict does not change the stored record."""

        def meddle(_: Any, __: str, event_dict: dict[str, Any]) -> dict[str, Any]:
            event_dict["tags"].append("late")
            event_dict["added"] = True
            return event_dict

        log = bound(chain(AuditProcessor(handler), meddle, RENDER))
        log.info("tagged", tags=["early"])
        handler.flush()
        [rec] = user_records(root)
        assert rec["tags"] == ["early"] and "added" not in rec

    @pytest.mark.parametrize(
        ("method", "level", "levelno"),
        [("debug", "DEBUG", 10), ("warn", "WARNING", 30), ("critical", "CRITICAL", 50), ("msg", "INFO", 20)],
    )
    def test_method_names_map_to_stdlib_levels(
        self, handler: AuditHandler, root: Path, method: str, level: str, levelno: int
    ) -> None:
        """structlog method names and aliases map to the stdlib level name and number."""
        AuditProcessor(handler)(None, method, {"event": "e"})
        handler.flush()
        [rec] = user_records(root)
        assert (rec["level"], rec["levelno"]) == (level, levelno)

    def test_an_unknown_level_name_is_kept_apart(self, handler: AuditHandler, root: Path) -> None:
        """A ``level`` the stdlib does not know falls back to the method's level and stays as ``level#2``."""
        AuditProcessor(handler)(None, "warning", {"event": "e", "level": "notice"})
        handler.flush()
        [rec] = user_records(root)
        assert (rec["level"], rec["levelno"], rec["level#2"]) == ("WARNING", 30, "notice")

    def test_logger_name_comes_from_the_wrapped_logger(self, handler: AuditHandler, root: Path) -> None:
        """Without ``add_logger_name``, ``logger`` is the wrapped logger's name, else "structlog"."""
        processor = AuditProcessor(handler)
        processor(logging.getLogger("svc.payments"), "info", {"event": "a"})
        processor(structlog.PrintLogger(), "info", {"event": "b"})
        handler.flush()
        assert [r["logger"] for r in user_records(root)] == ["svc.payments", "structlog"]

    def test_drop_ends_the_chain_after_storing(self, handler: AuditHandler, root: Path) -> None:
        """With ``drop=True`` the event is stored and the wrapped logger never sees it."""
        capture = structlog.testing.CapturingLogger()
        log = structlog.wrap_logger(capture, processors=[AuditProcessor(handler, drop=True)])
        log.info("audited only")
        handler.flush()
        assert capture.calls == []
        assert [r["message"] for r in user_records(root)] == ["audited only"]

    def test_without_drop_the_chain_goes_on(self, handler: AuditHandler) -> None:
        """Without ``drop`` the wrapped logger still gets the event."""
        capture = structlog.testing.CapturingLogger()
        log = structlog.wrap_logger(capture, processors=[AuditProcessor(handler)])
        log.info("both", n=1)
        assert [(c.method_name, c.kwargs) for c in capture.calls] == [("info", {"event": "both", "n": 1})]

    def test_rejected_events_go_to_the_fallback_and_are_counted(self, root: Path) -> None:
        """A full queue diverts the event dict to the fallback once; counters and the gap record agree."""
        fallback = Capture()
        handler = AuditHandler(root, queue_size=4, sync="os", fallback=fallback)
        try:
            processor = AuditProcessor(handler)
            with paused(handler):
                for i in range(10):
                    processor(None, "info", {"event": f"e{i}", "i": i})
            assert handler.flush()
            m = handler.metrics()
            assert m["rejected"] == m["fallback_ok"] == m["diverted_full"] == 6
            assert m["fallback_failed"] == 0
            assert [r.msg["i"] for r in fallback.records] == [4, 5, 6, 7, 8, 9]  # type: ignore[index]
            # The fallback gets the event as a record the audit formatter renders like a stored one.
            diverted = AuditJsonFormatter().to_mapping(fallback.records[0])
            assert (diverted["message"], diverted["i"], diverted["level"]) == ("e4", 4, "INFO")
        finally:
            handler.close()
        payloads = stored(root)
        assert [p["i"] for p in payloads if "$sys" not in p] == [0, 1, 2, 3]
        assert sum(p["count"] for p in payloads if p.get("$sys") == "gap") == 6

    def test_never_raises_after_close(self, root: Path) -> None:
        """Events logged after the store closed go to the fallback; the application sees nothing."""
        fallback = Capture()
        processor = AuditProcessor(root, fallback=fallback, sync="os")
        processor.close()
        event = {"event": "late"}
        assert processor(None, "info", event) is event
        assert len(fallback.records) == 1 and processor.metrics()["diverted_closed"] == 1

    def test_an_unreadable_event_dict_is_reported_not_raised(self, handler: AuditHandler, root: Path) -> None:
        """An event dict whose items cannot be read is reported and leaves a stand-in record."""

        class Hostile(dict[str, Any]):
            def __iter__(self) -> Any:
                raise RuntimeError("no")

            def keys(self) -> Any:
                raise RuntimeError("no")

        errors: list[str] = []
        handler.handleError = lambda record: errors.append(record.getMessage())  # type: ignore[method-assign]
        event = Hostile(event="x")
        assert AuditProcessor(handler)(None, "info", event) is event
        handler.flush()
        [rec] = user_records(root)
        assert rec["structlog_method"] == "info" and "could not be read" in rec["message"]
        assert len(errors) == 1

    def test_a_raising_filter_is_reported_and_the_event_diverted(self, root: Path) -> None:
        """A user filter that raises does not reach the application; the event goes to the fallback."""

        def broken(record: logging.LogRecord) -> bool:
            raise RuntimeError("filter bug")

        fallback = Capture()
        handler = AuditHandler(root, sync="os", fallback=fallback)
        handler.addFilter(broken)
        handler.handleError = lambda record: None  # type: ignore[method-assign]
        try:
            event = {"event": "kept somewhere"}
            assert AuditProcessor(handler)(None, "info", event) is event
            m = handler.metrics()
            assert m["diverted_error"] == m["fallback_ok"] == 1
            assert fallback.records[0].msg == {"event": "kept somewhere"}
        finally:
            handler.close()

    def test_a_root_shares_the_handlers_pipeline(self, handler: AuditHandler, root: Path) -> None:
        """``AuditProcessor(root)`` joins the live handler's pipeline for that root."""
        processor = AuditProcessor(root, sync="os")
        try:
            assert processor.handler.pipeline is handler.pipeline
            processor(None, "info", {"event": "via processor"})
        finally:
            processor.close()
        assert handler.pipeline is not None and not handler.pipeline.closed
        handler.flush()
        assert [r["message"] for r in user_records(root)] == ["via processor"]

    def test_conflicting_options_for_a_root_raise(self, handler: AuditHandler, root: Path) -> None:
        """Options that disagree with the live handler on the same root are a ConfigError."""
        with pytest.raises(ConfigError, match="share one pipeline"):
            AuditProcessor(root, sync="os", queue_size=8)

    def test_a_handle_with_its_own_role(self, tmp_path: Path) -> None:
        """With an AuditHandle, events are emitted with the processor's role; the pipeline stays open."""
        pipeline = AuditPipeline.start(StoreConfig(root=tmp_path / "p", sync="os"))
        try:
            processor = AuditProcessor(pipeline.handle(), role="billing")
            assert processor.handler.role == "billing"
            processor(None, "info", {"event": "charged", "amount": 3})
            processor.close()
            assert not pipeline.closed
            assert pipeline.flush(5)
        finally:
            pipeline.close()
        assert [(r["message"], r["amount"]) for r in user_records(tmp_path / "p")] == [("charged", 3)]

    def test_a_handler_keeps_its_own_options(self, handler: AuditHandler) -> None:
        """Role, fallback or handler options next to an AuditHandler are a ConfigError."""
        for options in ({"role": "x"}, {"fallback": Capture()}, {"queue_size": 2}):
            with pytest.raises(ConfigError, match="belong to the AuditHandler"):
                AuditProcessor(handler, **options)
        with pytest.raises(ConfigError, match="expected a store directory"):
            AuditProcessor(42)  # type: ignore[arg-type]

    def test_the_handlers_filters_and_level_apply(self, handler: AuditHandler, root: Path) -> None:
        """A context filter on the handler adds its fields (event keys win); its level filters."""
        handler.addFilter(AuditContextFilter(fields=("actor", "request_id")))
        handler.setLevel(logging.INFO)
        processor = AuditProcessor(handler)
        with audit_context(actor="ctx-actor", request_id="r-7"):
            processor(None, "info", {"event": "from context"})
            processor(None, "info", {"event": "explicit", "actor": "bob"})
            processor(None, "debug", {"event": "below the handler's level"})
        handler.flush()
        recs = user_records(root)
        assert [(r["message"], r["actor"], r["request_id"]) for r in recs] == [
            ("from context", "ctx-actor", "r-7"),
            ("explicit", "bob", "r-7"),
        ]


class TestProcessorFormatterBridge:
    def test_both_roads_store_the_same_fields(self, tmp_path: Path) -> None:
        """The processor and the stdlib bridge store equal records, ``seq`` and ``ts`` aside."""
        via_processor = AuditHandler(tmp_path / "processor", sync="os")
        via_bridge = AuditHandler(tmp_path / "bridge", sync="os")
        try:
            log = bound(
                chain(AuditProcessor(via_processor), structlog.stdlib.ProcessorFormatter.wrap_for_formatter),
                "app.bridge",
                via_bridge,
            )
            structlog.contextvars.bind_contextvars(actor="alice")
            log.bind(request_id="r-1").info("doc updated", target="doc-42", tags=["x"], n=3)
            log.warning("slow", ms=812.5, stack_info=True)
            try:
                {}["missing"]
            except KeyError:
                log.exception("lookup failed", target="doc-43")
            log.error("explicit exc", exc_info=ValueError("v"))
        finally:
            via_processor.close()
            via_bridge.close()
        a = user_records(tmp_path / "processor")
        b = user_records(tmp_path / "bridge")
        assert len(a) == len(b) == 4
        for x, y in zip(a, b, strict=True):
            # seq: each store numbers its own records; ts: each road reads the clock itself,
            # microseconds apart. Everything else, source and thread included, is equal.
            assert {k: v for k, v in x.items() if k != "ts"} == {k: v for k, v in y.items() if k != "ts"}
            assert abs(x["ts"] - y["ts"]) < 1_000_000
        assert a[0]["source"]["file"] == Path(__file__).name
        assert "stack" in a[1] and a[1]["stack"].startswith("Stack (most recent call last):")
        assert "KeyError" in a[2]["exc"] and "ValueError" in a[3]["exc"]

    def test_bridge_records_no_longer_collide_with_core_keys(self, handler: AuditHandler, root: Path) -> None:
        """A bridged event's ``level`` and ``logger`` are the core keys, not ``level#2`` / ``logger#2``."""
        log = bound(chain(structlog.stdlib.ProcessorFormatter.wrap_for_formatter), "app.b", handler)
        log.info("hello")
        handler.flush()
        [rec] = user_records(root)
        assert (rec["level"], rec["logger"], rec["message"]) == ("INFO", "app.b", "hello")
        assert not {"level#2", "logger#2", "event", "_record", "_from_structlog"} & rec.keys()

    def test_a_bridged_record_formatted_later_keeps_its_own_source(self) -> None:
        """Formatted after the call, a bridged record keeps the call site logging gave it."""
        kept = Capture()
        log = bound(chain(structlog.stdlib.ProcessorFormatter.wrap_for_formatter), "app.later", kept)
        log.info("later")
        [record] = kept.records
        out = AuditJsonFormatter().to_mapping(record)
        assert out["source"] == {"file": record.filename, "func": record.funcName, "line": record.lineno}
        assert out["message"] == "later" and "level#2" not in out

    def test_other_dict_messages_keep_the_old_rule(self) -> None:
        """A plain dict message (python-json-logger style) still keeps a ``level`` key apart."""
        record = logging.makeLogRecord({"msg": {"event": "e", "level": "x"}, "levelname": "INFO"})
        out = AuditJsonFormatter().to_mapping(record)
        assert out["level"] == "INFO" and out["level#2"] == "x"


def run_isolated(code: str) -> subprocess.CompletedProcess[str]:
    """Runs ``code`` in a fresh interpreter where ``import structlog`` fails."""
    shim = "import sys\nsys.modules['structlog'] = None\n"
    return subprocess.run(
        [sys.executable, "-c", shim + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=PACKAGE_PARENT,
        env={"PYTHONPATH": PACKAGE_PARENT, "PATH": "/usr/bin:/bin"},
        check=False,
    )


class TestOptionalExtra:
    def test_the_package_imports_without_structlog(self, tmp_path: Path) -> None:
        """``import quipu_logging`` (and the testing helpers) work with structlog unimportable."""
        result = run_isolated(
            f"""
            import logging
            import quipu_logging, quipu_logging.testing
            h = quipu_logging.AuditHandler({str(tmp_path / "s")!r}, sync="os")
            logging.getLogger("x").addHandler(h)
            logging.getLogger("x").warning("works")
            assert h.flush()
            h.close()
            print("ok")
            """
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == "ok"

    def test_the_structlog_module_names_the_extra(self) -> None:
        """``import quipu_logging.structlog`` without structlog raises ImportError naming the extra."""
        result = run_isolated(
            """
            try:
                import quipu_logging.structlog
            except ImportError as exc:
                print(exc)
            """
        )
        assert result.returncode == 0, result.stderr
        assert "pip install 'quipu-logging[structlog]'" in result.stdout
