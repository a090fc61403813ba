"""Tests of quipu_logging.formatter: the stored record shape and python-json-logger options."""

from __future__ import annotations

import datetime
import json
import logging
import logging.config
import sys
from typing import Any

import pytest

from quipu_logging.errors import ConfigError
from quipu_logging.formatter import CORE_KEYS, AuditJsonFormatter, freeze


def make_record(msg: Any = "user %s updated doc", *args: Any, **extra: Any) -> logging.LogRecord:
    """A record as ``logging.getLogger("app.audit").info(msg, *args, extra=extra)`` makes it."""
    logger = logging.getLogger("app.audit")
    record = logger.makeRecord(
        "app.audit", logging.INFO, "/srv/app.py", 88, msg, args or (), None, func="save", extra=extra
    )
    return record


def exc_record(**kwargs: Any) -> logging.LogRecord:
    try:
        raise KeyError("missing")
    except KeyError:
        return logging.getLogger("app.audit").makeRecord(
            "app.audit", logging.ERROR, "/srv/app.py", 9, "failed", (), sys.exc_info(), **kwargs
        )


class TestToMapping:
    def test_design_example_shape(self) -> None:
        """The mapping for DESIGN §7's example has exactly the documented keys and values."""
        record = make_record("user %s updated doc", "alice", actor="alice", action="update", target="doc-42")
        out = AuditJsonFormatter().to_mapping(record)
        assert out == {
            "action": "update",
            "actor": "alice",
            "level": "INFO",
            "levelno": 20,
            "logger": "app.audit",
            "message": "user alice updated doc",
            "process": record.process,
            "source": {"file": "app.py", "func": "save", "line": 88},
            "target": "doc-42",
            "thread": record.threadName,
            "ts": round(record.created * 1_000_000),
        }

    def test_ts_is_integer_microseconds_of_the_call(self) -> None:
        """``ts`` is ``record.created`` as an int in microseconds."""
        record = make_record()
        record.created = 1764779926.123456
        out = AuditJsonFormatter().to_mapping(record)
        assert out["ts"] == 1764779926123456 and type(out["ts"]) is int

    def test_exception_and_stack_once_each(self) -> None:
        """``exc`` holds one traceback, ``stack`` one stack, and the message neither."""
        record = exc_record(sinfo="Stack (most recent call last):\n  File x")
        out = AuditJsonFormatter().to_mapping(record)
        assert out["message"] == "failed"
        assert out["exc"].count("Traceback (most recent call last)") == 1
        assert "KeyError: 'missing'" in out["exc"]
        assert out["stack"].count("Stack (most recent call last)") == 1
        assert "Traceback" not in out["stack"]

    def test_exc_text_used_when_exc_info_is_gone(self) -> None:
        """A record that only has ``exc_text`` (say after a QueueHandler) keeps it as ``exc``."""
        record = make_record()
        record.exc_text = "Traceback (most recent call last):\nValueError: x"
        assert AuditJsonFormatter().to_mapping(record)["exc"] == record.exc_text

    def test_no_exc_or_stack_keys_without_them(self) -> None:
        """Records without an exception or stack have no ``exc``/``stack`` keys."""
        out = AuditJsonFormatter().to_mapping(make_record())
        assert "exc" not in out and "stack" not in out

    def test_record_is_not_modified(self) -> None:
        """``to_mapping`` and ``format`` leave the record's attributes exactly as they were."""
        record = exc_record(sinfo="stack")
        before = dict(record.__dict__)
        formatter = AuditJsonFormatter(fmt="%(asctime)s %(module)s", timestamp=True)
        formatter.to_mapping(record)
        formatter.format(record)
        assert record.__dict__ == before

    def test_extras_colliding_with_core_keys_are_kept_apart(self) -> None:
        """An extra named like a core key keeps its value under ``name#2``; the core key wins."""
        record = make_record(level="forged", ts="yesterday", seq=5, exc="no")
        out = AuditJsonFormatter().to_mapping(record)
        assert out["level"] == "INFO" and out["level#2"] == "forged"
        assert isinstance(out["ts"], int) and out["ts#2"] == "yesterday"
        assert "seq" not in out and out["seq#2"] == 5
        assert "exc" not in out and out["exc#2"] == "no"

    def test_private_and_reserved_attributes_are_skipped(self) -> None:
        """Attributes starting with ``_`` and the standard LogRecord attributes are not fields."""
        record = make_record(_secret=1, visible=2)
        out = AuditJsonFormatter().to_mapping(record)
        assert out["visible"] == 2
        assert not {"_secret", "pathname", "module", "msecs", "args", "msg", "created"} & out.keys()

    def test_dict_message_becomes_fields(self) -> None:
        """A dict message contributes its items; its ``event`` string becomes the message."""
        msg = {"event": "login", "user": "u1", "level": "x"}
        out = AuditJsonFormatter().to_mapping(make_record(msg))
        assert out["message"] == "login" and out["user"] == "u1" and out["level#2"] == "x"
        assert msg == {"event": "login", "user": "u1", "level": "x"}

    def test_dict_message_with_message_key(self) -> None:
        """Without ``event``, a dict message's ``message`` string is the message."""
        out = AuditJsonFormatter().to_mapping(make_record({"message": "hello", "n": 1}))
        assert out["message"] == "hello" and out["n"] == 1

    def test_broken_format_arguments_keep_the_event(self) -> None:
        """A call whose arguments do not fit its format string still gives a record."""
        out = AuditJsonFormatter().to_mapping(make_record("user %d logged in", "alice"))
        assert out["message"] == "user %d logged in" and out["args"] == ["alice"]
        assert "TypeError" in out["message_error"]

    def test_core_keys_constant(self) -> None:
        """The core keys are the documented set."""
        assert {
            "exc",
            "level",
            "levelno",
            "logger",
            "message",
            "process",
            "seq",
            "source",
            "stack",
            "thread",
            "ts",
        } == CORE_KEYS


class TestFreeze:
    def test_late_mutation_of_nested_containers(self) -> None:
        """Containers in extras are copied at every depth at call time."""
        d: dict[str, Any] = {"k": [1], "t": ({"x": 1},), "s": {1, 2}}
        out = AuditJsonFormatter().to_mapping(make_record(ctx=d))
        d["k"].append(2)
        d["t"][0]["x"] = 2
        d["s"].add(3)
        d["new"] = True
        assert out["ctx"] == {"k": [1], "t": [{"x": 1}], "s": {1, 2}}

    def test_cycles_are_kept_as_cycles(self) -> None:
        """A self-referencing list is copied into a self-referencing copy (the store marks it)."""
        cyc: list[Any] = [1]
        cyc.append(cyc)
        copied = freeze(cyc)
        assert copied is not cyc and copied[1] is copied

    def test_other_objects_pass_through(self) -> None:
        """Non-container objects are handed on as they are, for the writer to render."""
        obj = object()
        assert freeze(obj) is obj
        assert freeze({"o": obj})["o"] is obj

    def test_failing_mapping_returns_original(self) -> None:
        """A mapping whose ``items()`` raises is passed on uncopied; freeze never raises."""

        class Bad(dict):  # type: ignore[type-arg]
            def items(self) -> Any:
                raise RuntimeError("no")

        bad = Bad(a=1)
        assert freeze(bad) is bad

    def test_json_default_converts_unknown_objects_at_call_time(self) -> None:
        """With ``json_default``, objects the store would ``repr`` are converted in the call."""

        class Money:
            def __init__(self) -> None:
                self.cents = 5

        m = Money()
        formatter = AuditJsonFormatter(json_default=lambda o: {"cents": o.cents})
        out = formatter.to_mapping(make_record(price=m, when=datetime.date(2026, 1, 2)))
        m.cents = 7
        assert out["price"] == {"cents": 5}
        assert out["when"] == datetime.date(2026, 1, 2)


class TestOptions:
    def test_rename_non_core_field(self) -> None:
        """``rename_fields`` renames extras."""
        out = AuditJsonFormatter(rename_fields={"actor": "who"}).to_mapping(make_record(actor="a"))
        assert out["who"] == "a" and "actor" not in out

    @pytest.mark.parametrize("src", ["levelname", "message", "name", "level", "lineno", "exc_info"])
    def test_renaming_a_core_key_is_a_config_error(self, src: str) -> None:
        """Renaming a core key (or the attribute feeding it) fails at construction."""
        with pytest.raises(ConfigError, match="core key"):
            AuditJsonFormatter(rename_fields={src: "other"})

    def test_renaming_onto_a_core_key_is_a_config_error(self) -> None:
        """Renaming a field onto a core key name fails at construction."""
        with pytest.raises(ConfigError, match="shadow"):
            AuditJsonFormatter(rename_fields={"actor": "level"})

    def test_static_fields(self) -> None:
        """``static_fields`` appear on every record; one named like a core key is refused."""
        out = AuditJsonFormatter(static_fields={"service": "billing"}).to_mapping(make_record())
        assert out["service"] == "billing"
        with pytest.raises(ConfigError, match="core key"):
            AuditJsonFormatter(static_fields={"ts": 1})

    def test_reserved_attrs(self) -> None:
        """``reserved_attrs`` decides which record attributes stay out; core keys stay in."""
        out = AuditJsonFormatter(reserved_attrs=["secret"]).to_mapping(make_record(secret="x", a=1))
        assert "secret" not in out and out["a"] == 1
        assert out["module"] == "app" and out["level"] == "INFO"

    def test_timestamp(self) -> None:
        """``timestamp=True`` adds an aware UTC datetime; ``timestamp="ts"`` is refused."""
        record = make_record()
        out = AuditJsonFormatter(timestamp=True).to_mapping(record)
        assert out["timestamp"] == datetime.datetime.fromtimestamp(record.created, tz=datetime.timezone.utc)
        assert "@t" in AuditJsonFormatter(timestamp="@t").to_mapping(record)
        with pytest.raises(ConfigError):
            AuditJsonFormatter(timestamp="ts")

    def test_json_default_in_format(self) -> None:
        """``json_default`` serialises unknown objects in the JSON line."""
        line = AuditJsonFormatter(json_default=lambda o: "custom").format(make_record(o=object()))
        assert json.loads(line)["o"] == "custom"

    def test_fmt_fields_are_added_except_core_ones(self) -> None:
        """Fields named by ``fmt`` are added, but not again for what the core holds."""
        out = AuditJsonFormatter("%(asctime)s %(levelname)s %(module)s %(message)s").to_mapping(make_record())
        assert out["module"] == "app" and isinstance(out["asctime"], str)
        assert "levelname" not in out

    def test_array_options(self) -> None:
        """``exc_info_as_array`` gives the traceback as a list of lines."""
        out = AuditJsonFormatter(exc_info_as_array=True).to_mapping(exc_record())
        assert isinstance(out["exc"], list) and out["exc"][0].startswith("Traceback")

    def test_unknown_keyword_suggests_the_right_one(self) -> None:
        """A misspelt keyword is a ConfigError naming the closest valid option."""
        with pytest.raises(ConfigError, match="did you mean 'static_fields'"):
            AuditJsonFormatter(static_feilds={"a": 1})

    def test_add_fields_hook(self) -> None:
        """A subclass overriding ``add_fields`` contributes fields; core keys stay intact."""

        class Mine(AuditJsonFormatter):
            def add_fields(
                self, log_data: dict[str, Any], record: logging.LogRecord, message_dict: dict[str, Any]
            ) -> None:
                super().add_fields(log_data, record, message_dict)
                log_data["tenant"] = "t1"
                log_data["message"] = "forged"

        out = Mine().to_mapping(make_record("real"))
        assert out["tenant"] == "t1" and out["message"] == "real" and out["message#2"] == "forged"

    def test_process_log_record_hook(self) -> None:
        """``process_log_record`` sees and may extend the whole mapping."""

        class Mine(AuditJsonFormatter):
            def process_log_record(self, log_data: dict[str, Any]) -> dict[str, Any]:
                log_data["checked"] = True
                return log_data

        assert Mine().to_mapping(make_record())["checked"] is True


class TestFormat:
    def test_format_is_the_mapping_as_one_json_line(self) -> None:
        """``format()`` returns the same content as ``to_mapping`` on a single line."""
        formatter = AuditJsonFormatter()
        record = make_record("x", actor="a")
        line = formatter.format(record)
        assert "\n" not in line
        assert json.loads(line) == json.loads(json.dumps(formatter.to_mapping(record)))

    def test_format_survives_a_cycle(self) -> None:
        """A cycle that the JSON encoder refuses is rendered the store's way instead."""
        cyc: dict[str, Any] = {}
        cyc["me"] = cyc
        out = json.loads(AuditJsonFormatter().format(make_record(ctx=cyc)))
        assert out["ctx"] == {"me": {"$cycle": True}}

    def test_prefix(self) -> None:
        """``prefix`` goes in front of the JSON line."""
        assert AuditJsonFormatter(prefix="AUDIT ").format(make_record()).startswith("AUDIT {")


class TestDictConfigFormatter:
    def teardown_method(self) -> None:
        logging.config.dictConfig({"version": 1, "disable_existing_loggers": False})

    def test_factory_form_passes_options(self) -> None:
        """The ``"()"`` form hands every option to the formatter."""
        logging.config.dictConfig(
            {
                "version": 1,
                "formatters": {
                    "audit": {
                        "()": "quipu_logging.AuditJsonFormatter",
                        "static_fields": {"service": "s"},
                        "format": "%(module)s",
                    }
                },
                "handlers": {"h": {"class": "logging.NullHandler", "formatter": "audit"}},
                "root": {"handlers": ["h"]},
            }
        )
        formatter = logging.getLogger().handlers[0].formatter
        assert isinstance(formatter, AuditJsonFormatter)
        out = formatter.to_mapping(make_record())
        assert out["service"] == "s" and out["module"] == "app"

    def test_class_form_builds(self) -> None:
        """The ``"class"`` form builds the formatter from format/datefmt/style."""
        logging.config.dictConfig(
            {
                "version": 1,
                "formatters": {
                    "audit": {"class": "quipu_logging.AuditJsonFormatter", "format": "%(module)s"}
                },
            }
        )

    def test_typo_in_factory_form_is_a_clear_error(self) -> None:
        """A misspelt option in the ``"()"`` form fails configuration, naming the fix."""
        with pytest.raises(ValueError, match="audit") as info:
            logging.config.dictConfig(
                {
                    "version": 1,
                    "formatters": {"audit": {"()": "quipu_logging.AuditJsonFormatter", "rename_feilds": {}}},
                }
            )
        cause = info.value.__cause__
        assert isinstance(cause, ConfigError) and "did you mean 'rename_fields'" in str(cause)
