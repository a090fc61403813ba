"""AuditHandler and AuditJsonFormatter configured through logging.config.dictConfig.

Runs on Python 3.10 to 3.13: the ``"class"`` and ``"()"`` forms, every way of naming the
fallback (whichever order dictConfig builds the handlers in), reconfiguration, and typos.
"""

from __future__ import annotations

import gc
import json
import logging
import logging.config
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from quipu_logging import AuditHandler, AuditStore, ConfigError
from quipu_logging.testing import paused

LOGGER = "quipu.dictconfig"


class Capture(logging.Handler):
    """A fallback that keeps every record it is given (built with the ``"()"`` form)."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def handler_named(name: str) -> logging.Handler:
    """The live handler dictConfig registered under ``name`` (any Python version)."""
    found = logging._handlers.get(name)  # type: ignore[attr-defined]
    assert isinstance(found, logging.Handler), name
    return found


def audit_named(name: str) -> AuditHandler:
    """The live AuditHandler dictConfig registered under ``name``."""
    found = handler_named(name)
    assert isinstance(found, AuditHandler)
    return found


def user_records(root: Path) -> list[dict[str, Any]]:
    with AuditStore.open_reader(root) as reader:
        return [rec.payload for rec in reader.scan() if "$sys" not in rec.payload]


def configure(handlers: dict[str, Any], formatters: dict[str, Any] | None = None, **extra: Any) -> None:
    """dictConfig with the audit handlers (not the fallbacks) attached to the test logger."""
    attached = [n for n in sorted(handlers) if not n.endswith("_console")]
    logging.config.dictConfig(
        {
            "version": 1,
            "disable_existing_loggers": False,
            "formatters": formatters or {},
            "handlers": handlers,
            "loggers": {LOGGER: {"handlers": attached, "level": "DEBUG", "propagate": False}},
            **extra,
        }
    )


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "audit"


@pytest.fixture
def log() -> Iterator[logging.Logger]:
    yield logging.getLogger(LOGGER)
    # Closes every handler dictConfig made, ours included (their pipelines close with them).
    logging.config.dictConfig({"version": 1, "disable_existing_loggers": False})


class TestForms:
    def test_class_form(self, root: Path, log: logging.Logger) -> None:
        """``"class": "quipu_logging.AuditHandler"`` with handler options builds a working handler."""
        configure({"audit": {"class": "quipu_logging.AuditHandler", "root": str(root), "sync": "always"}})
        log.info("hello %s", "world", extra={"actor": "a"})
        audit = handler_named("audit")
        assert isinstance(audit, AuditHandler) and audit.flush()
        (payload,) = user_records(root)
        assert payload["message"] == "hello world" and payload["actor"] == "a"

    def test_factory_form(self, root: Path, log: logging.Logger) -> None:
        """``"()": "quipu_logging.AuditHandler"`` builds one too, formatter options included."""
        configure(
            {
                "audit": {
                    "()": "quipu_logging.AuditHandler",
                    "root": str(root),
                    "static_fields": {"service": "billing"},
                    "level": "INFO",
                }
            }
        )
        log.debug("below the handler level")
        log.info("stored")
        assert audit_named("audit").flush()
        (payload,) = user_records(root)
        assert payload["service"] == "billing" and payload["message"] == "stored"

    def test_formatter_factory_form_shapes_the_stored_record(self, root: Path, log: logging.Logger) -> None:
        """A ``"()"`` AuditJsonFormatter set with ``formatter:`` shapes what is stored."""
        configure(
            {"audit": {"class": "quipu_logging.AuditHandler", "root": str(root), "formatter": "audit"}},
            formatters={
                "audit": {
                    "()": "quipu_logging.AuditJsonFormatter",
                    "format": "%(module)s",
                    "static_fields": {"env": "prod"},
                    "rename_fields": {"actor": "who"},
                }
            },
        )
        log.info("x", extra={"actor": "a"})
        assert audit_named("audit").flush()
        (payload,) = user_records(root)
        assert payload["env"] == "prod" and payload["who"] == "a" and payload["module"] == "test_dictconfig"

    def test_formatter_class_form(self, root: Path, log: logging.Logger) -> None:
        """The ``"class"`` form builds an AuditJsonFormatter from ``format`` alone."""
        configure(
            {"audit": {"class": "quipu_logging.AuditHandler", "root": str(root), "formatter": "audit"}},
            formatters={
                "audit": {"class": "quipu_logging.AuditJsonFormatter", "format": "%(funcName)s %(module)s"}
            },
        )
        log.info("x")
        assert audit_named("audit").flush()
        assert user_records(root)[0]["module"] == "test_dictconfig"

    def test_plain_formatter_leaves_the_record_shape(self, root: Path, log: logging.Logger) -> None:
        """A plain logging.Formatter on our handler changes nothing in the stored shape."""
        configure(
            {"audit": {"class": "quipu_logging.AuditHandler", "root": str(root), "formatter": "plain"}},
            formatters={"plain": {"format": "%(levelname)s %(message)s"}},
        )
        log.info("x")
        assert audit_named("audit").flush()
        payload = user_records(root)[0]
        assert payload["message"] == "x" and payload["level"] == "INFO"

    def test_context_filter_from_config(self, root: Path, log: logging.Logger) -> None:
        """AuditContextFilter configured with ``"()"`` adds the context fields."""
        from quipu_logging.context import audit_context

        configure(
            {"audit": {"class": "quipu_logging.AuditHandler", "root": str(root), "filters": ["ctx"]}},
            filters={"ctx": {"()": "quipu_logging.AuditContextFilter", "fields": ["actor"]}},
        )
        with audit_context(actor="alice"):
            log.info("x")
        assert audit_named("audit").flush()
        assert user_records(root)[0]["actor"] == "alice"


class TestFallbackReferences:
    def rejected_to(self, log: logging.Logger, name: str) -> list[str]:
        """Logs two records with the writer held and capacity 1; returns what ``name`` got.

        The fallback is attached to no logger: only the audit handler keeps it alive.
        """
        gc.collect()
        audit = handler_named("audit")
        with paused(audit):
            log.info("kept")
            log.info("diverted")
        target = handler_named(name)
        assert isinstance(target, Capture)
        return [r.getMessage() for r in target.records]

    @pytest.mark.parametrize("name", ["aaa_console", "zzz_console"])
    def test_by_name_in_either_order(self, root: Path, log: logging.Logger, name: str) -> None:
        """A handler name works whether dictConfig builds that handler before or after ours."""
        configure(
            {
                name: {"()": Capture},
                "audit": {
                    "class": "quipu_logging.AuditHandler",
                    "root": str(root),
                    "queue_size": 1,
                    "fallback": name,
                },
            }
        )
        assert self.rejected_to(log, name) == ["diverted"]

    @pytest.mark.parametrize("name", ["aaa_console", "zzz_console"])
    def test_by_cfg_reference_in_either_order(self, root: Path, log: logging.Logger, name: str) -> None:
        """``cfg://handlers.NAME`` works too: an instance when built first, a config dict otherwise."""
        configure(
            {
                name: {"()": Capture},
                "audit": {
                    "()": "quipu_logging.AuditHandler",
                    "root": str(root),
                    "queue_size": 1,
                    "fallback": f"cfg://handlers.{name}",
                },
            }
        )
        assert self.rejected_to(log, name) == ["diverted"]

    def test_ext_sys_stderr(self, root: Path, log: logging.Logger, capfd: pytest.CaptureFixture[str]) -> None:
        """``ext://sys.stderr`` arrives as a stream: rejected records are JSON lines there."""
        configure(
            {
                "audit": {
                    "class": "quipu_logging.AuditHandler",
                    "root": str(root),
                    "queue_size": 1,
                    "fallback": "ext://sys.stderr",
                }
            }
        )
        with paused(handler_named("audit")):
            log.info("kept")
            log.info("diverted %d", 2)
        lines = [json.loads(line) for line in capfd.readouterr().err.splitlines() if line.startswith("{")]
        assert [obj["message"] for obj in lines] == ["diverted 2"]

    def test_no_fallback_means_stderr(
        self, root: Path, log: logging.Logger, capfd: pytest.CaptureFixture[str]
    ) -> None:
        """With no fallback configured, rejected records are one JSON line each on stderr."""
        configure({"audit": {"class": "quipu_logging.AuditHandler", "root": str(root), "queue_size": 1}})
        with paused(handler_named("audit")):
            for i in range(3):
                log.info("r%d", i)
        lines = [json.loads(line) for line in capfd.readouterr().err.splitlines() if line.startswith("{")]
        assert [obj["message"] for obj in lines] == ["r1", "r2"]

    def test_fallback_instance_in_a_factory_form(self, root: Path, log: logging.Logger) -> None:
        """A handler object passed directly (``"()"`` form with a callable) is used as is."""
        target = Capture()
        configure(
            {
                "audit": {
                    "()": lambda **kw: AuditHandler(fallback=target, **kw),
                    "root": str(root),
                    "queue_size": 1,
                }
            }
        )
        with paused(handler_named("audit")):
            log.info("kept")
            log.info("diverted")
        assert [r.getMessage() for r in target.records] == ["diverted"]
        target.close()


class TestReconfiguration:
    def test_reconfigure_reopens_the_same_root(self, root: Path, log: logging.Logger) -> None:
        """A second dictConfig closes the old pipeline; the new one, with new options, takes over."""
        configure({"audit": {"class": "quipu_logging.AuditHandler", "root": str(root)}})
        old = handler_named("audit")
        assert isinstance(old, AuditHandler)
        log.info("one")
        configure(
            {
                "audit": {
                    "class": "quipu_logging.AuditHandler",
                    "root": str(root),
                    "sync": "always",
                    "queue_size": 64,
                }
            }
        )
        new = handler_named("audit")
        assert isinstance(new, AuditHandler) and new is not old
        assert old.pipeline is not None and old.pipeline.closed
        assert new.pipeline is not old.pipeline and new.sync == "always"
        log.info("two")
        assert new.flush()
        assert [p["message"] for p in user_records(root)] == ["one", "two"]
        with AuditStore.open_reader(root) as reader:
            assert reader.verify()

    def test_two_handlers_share_then_reconfigure(self, root: Path, log: logging.Logger) -> None:
        """Two handlers on one root share a pipeline, and reconfiguring replaces it cleanly."""
        spec = {"class": "quipu_logging.AuditHandler", "root": str(root)}
        configure({"a": dict(spec), "b": dict(spec, role="app")})
        a, b = handler_named("a"), handler_named("b")
        assert isinstance(a, AuditHandler) and isinstance(b, AuditHandler) and a.pipeline is b.pipeline
        log.info("twice")
        configure({"a": dict(spec)})
        log.info("once")
        assert audit_named("a").flush()
        assert [p["message"] for p in user_records(root)] == ["twice", "twice", "once"]


class TestTypos:
    def test_handler_option_typo(self, root: Path, log: logging.Logger) -> None:
        """A misspelt handler option fails dictConfig with a ConfigError that names the fix."""
        with pytest.raises(ValueError, match="audit") as info:
            configure({"audit": {"class": "quipu_logging.AuditHandler", "root": str(root), "queue_sise": 8}})
        cause = info.value.__cause__
        assert isinstance(cause, ConfigError) and "did you mean 'queue_size'" in str(cause)
        assert not root.exists()

    def test_formatter_option_typo_in_factory_form(self, root: Path, log: logging.Logger) -> None:
        """A misspelt AuditJsonFormatter option in the ``"()"`` form fails at configuration time."""
        with pytest.raises(ValueError, match="audit") as info:
            configure(
                {"audit": {"class": "quipu_logging.AuditHandler", "root": str(root), "formatter": "audit"}},
                formatters={"audit": {"()": "quipu_logging.AuditJsonFormatter", "static_feilds": {"a": 1}}},
            )
        cause = info.value.__cause__
        assert isinstance(cause, ConfigError) and "did you mean 'static_fields'" in str(cause)

    def test_formatter_option_typo_on_the_handler(self, root: Path, log: logging.Logger) -> None:
        """A misspelt formatter option given to the handler is caught the same way."""
        with pytest.raises(ValueError) as info:
            configure({"audit": {"()": "quipu_logging.AuditHandler", "root": str(root), "rename_field": {}}})
        assert "did you mean 'rename_fields'" in str(info.value.__cause__)

    def test_bad_sync_policy(self, root: Path, log: logging.Logger) -> None:
        """A bad sync string is a configuration error, not a crash at the first record."""
        with pytest.raises(ValueError) as info:
            configure(
                {"audit": {"class": "quipu_logging.AuditHandler", "root": str(root), "sync": "group:x"}}
            )
        assert isinstance(info.value.__cause__, ConfigError)
