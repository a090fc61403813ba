"""Tests of quipu_logging.context: AuditContextFilter and audit_context."""

from __future__ import annotations

import asyncio
import logging
import sys
import threading

import pytest

from quipu_logging import AuditContextFilter, ConfigError
from quipu_logging.context import audit_context


def record(**extra: object) -> logging.LogRecord:
    return logging.getLogger("ctx").makeRecord("ctx", logging.INFO, __file__, 1, "m", (), None, extra=extra)


def applied(flt: AuditContextFilter, rec: logging.LogRecord) -> logging.LogRecord:
    """The record later handlers see after ``flt`` (3.12+ filters may return a replacement)."""
    rv = flt.filter(rec)
    assert rv
    return rv if isinstance(rv, logging.LogRecord) else rec


class TestAuditContextFilter:
    def test_copies_set_fields(self) -> None:
        """Fields set with audit_context appear on the record; unset ones are left out."""
        flt = AuditContextFilter(fields=("actor", "request_id", "tenant"))
        with audit_context(actor="alice", request_id="r-1"):
            rec = applied(flt, record())
        assert rec.actor == "alice" and rec.request_id == "r-1"  # type: ignore[attr-defined]
        assert not hasattr(rec, "tenant")

    def test_explicit_extra_wins(self) -> None:
        """A value given with ``extra=`` is kept over the context's."""
        flt = AuditContextFilter(fields=("actor",))
        with audit_context(actor="ctx"):
            rec = applied(flt, record(actor="explicit"))
        assert rec.actor == "explicit"  # type: ignore[attr-defined]

    @pytest.mark.skipif(sys.version_info < (3, 12), reason="filters return records from 3.12")
    def test_original_record_untouched_on_312(self) -> None:
        """From 3.12 the filter returns a copy, so other handlers see the record unchanged."""
        flt = AuditContextFilter(fields=("actor",))
        original = record()
        with audit_context(actor="alice"):
            rec = applied(flt, original)
        assert rec is not original and not hasattr(original, "actor")

    def test_nesting_restores_outer_values(self) -> None:
        """Nested blocks override and then restore."""
        var = AuditContextFilter.var("actor")
        with audit_context(actor="outer"):
            with audit_context(actor="inner"):
                assert var.get() == "inner"
            assert var.get() == "outer"
        assert var.get(None) is None

    def test_values_follow_threads_and_tasks(self) -> None:
        """Each thread and each asyncio task sees its own context."""
        flt = AuditContextFilter(fields=("actor",))
        seen: dict[str, object] = {}

        def worker() -> None:
            seen["thread"] = getattr(applied(flt, record()), "actor", None)

        async def task(name: str) -> str:
            with audit_context(actor=name):
                await asyncio.sleep(0)
                return str(applied(flt, record()).actor)  # type: ignore[attr-defined]

        async def main() -> list[str]:
            return list(await asyncio.gather(task("a"), task("b")))

        with audit_context(actor="main"):
            t = threading.Thread(target=worker)
            t.start()
            t.join()
        assert seen["thread"] is None
        assert asyncio.run(main()) == ["a", "b"]

    @pytest.mark.parametrize("name", ["msg", "level", "not an identifier", "ts"])
    def test_bad_field_names(self, name: str) -> None:
        """Names that clash with record attributes or core keys, or are not identifiers, are refused."""
        with pytest.raises(ConfigError):
            AuditContextFilter(fields=(name,))
        with pytest.raises(ConfigError), audit_context(**{name: 1}):
            pass

    def test_never_drops(self) -> None:
        """Records outside the filter's logger prefix pass through unchanged."""
        flt = AuditContextFilter(fields=("actor",), name="other")
        rec = record()
        with audit_context(actor="alice"):
            assert flt.filter(rec)
        assert not hasattr(rec, "actor")
