"""Tests of quipu_logging.testing: the ``audit_log`` pytest fixture, AuditLog and temporary_store.

The fixture is exercised the way an application uses it: ``pytester`` writes a small app
and its test file, and runs pytest on them in a subprocess.
"""

from __future__ import annotations

import configparser
import importlib.metadata
import logging
import logging.config
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

import quipu_logging
from quipu_logging import AuditStore, ConfigError
from quipu_logging.context import audit_context
from quipu_logging.testing import AuditLog, paused, temporary_store

pytest_plugins = ["pytester"]

PACKAGE_PARENT = str(Path(quipu_logging.__file__).resolve().parent.parent)
CHECKOUT = Path(__file__).resolve().parent.parent

APP = '''
import logging

from quipu_logging.context import audit_context

log = logging.getLogger("app.audit")


def update_document(user, doc_id):
    """What a request handler does: middleware sets the actor, the handler logs the action."""
    with audit_context(actor=user, request_id="req-1"):
        log.info("document updated", extra={"action": "update", "target": doc_id})
'''


def _plugin_installed() -> bool:
    """Whether this interpreter loads quipu_logging.testing through the pytest11 entry point."""
    return any(
        ep.value == "quipu_logging.testing" for ep in importlib.metadata.entry_points(group="pytest11")
    )


@pytest.fixture
def app_tests(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    """A pytester directory holding the app module; the package importable from the subprocess."""
    monkeypatch.setenv("PYTHONPATH", PACKAGE_PARENT)
    pytester.makepyfile(app=APP)
    return pytester


def run_app_tests(pytester: pytest.Pytester, source: str) -> pytest.RunResult:
    pytester.makepyfile(test_app=textwrap.dedent(source))
    # From a checkout the entry point is not installed: load the plugin the way it would be.
    plugin = [] if _plugin_installed() else ["-p", "quipu_logging.testing"]
    return pytester.runpytest_subprocess(*plugin, "-W", "error", "-p", "no:cacheprovider")


class TestAuditLogFixture:
    def test_an_audited_request_passes(self, app_tests: pytest.Pytester) -> None:
        """An app test asserts its request was audited with actor X and action Y, and it passes."""
        result = run_app_tests(
            app_tests,
            """
            from app import update_document

            def test_update_is_audited(audit_log):
                update_document("alice", "doc-42")
                record = audit_log.assert_audited(actor="alice", action="update", target="doc-42")
                assert record["request_id"] == "req-1" and record["logger"] == "app.audit"
                audit_log.assert_not_audited(actor="mallory")
                assert audit_log.verify()
            """,
        )
        result.assert_outcomes(passed=1)

    def test_a_missing_audit_record_fails_and_says_what_was_audited(self, app_tests: pytest.Pytester) -> None:
        """When no record matches, the test fails and the message lists the records there were."""
        result = run_app_tests(
            app_tests,
            """
            from app import update_document

            def test_wrong_actor(audit_log):
                update_document("alice", "doc-42")
                audit_log.assert_audited(actor="mallory", action="update")
            """,
        )
        result.assert_outcomes(failed=1)
        result.stdout.fnmatch_lines(
            [
                "*no record with actor='mallory', action='update' was audited; 1 records were:*",
                "*'document updated' actor='alice', action='update'*",
            ]
        )

    def test_each_test_gets_a_fresh_store(self, app_tests: pytest.Pytester) -> None:
        """Records of one test are not seen by the next."""
        result = run_app_tests(
            app_tests,
            """
            import pytest
            from app import update_document

            @pytest.mark.parametrize("user", ["alice", "bob"])
            def test_one_record_each(audit_log, user):
                update_document(user, "doc-1")
                assert [r["actor"] for r in audit_log.records()] == [user]
            """,
        )
        result.assert_outcomes(passed=2)

    def test_the_plugin_is_declared_as_an_entry_point(self) -> None:
        """setup.cfg registers quipu_logging.testing under pytest11; an installed wheel exposes it."""
        setup_cfg = CHECKOUT / "setup.cfg"
        if setup_cfg.exists():
            cfg = configparser.ConfigParser()
            cfg.read(setup_cfg)
            entries = cfg["options.entry_points"]["pytest11"].split()
            assert entries == ["quipu_logging", "=", "quipu_logging.testing"]
        if os.environ.get("QUIPU_EXPECT_INSTALLED") == "1":
            assert _plugin_installed()


@pytest.fixture
def audit(tmp_path: Path) -> Iterator[AuditLog]:
    with AuditLog(tmp_path / "audit") as log:
        yield log


class TestAuditLog:
    def test_records_filters_on_field_values(self, audit: AuditLog) -> None:
        """``records(**where)`` returns the user records whose fields equal the given values."""
        log = logging.getLogger("app.t1")
        log.info("a", extra={"actor": "alice", "action": "read"})
        log.info("b", extra={"actor": "bob", "action": "read"})
        log.info("c", extra={"actor": "alice", "action": "delete"})
        assert [r["message"] for r in audit.records()] == ["a", "b", "c"]
        assert [r["message"] for r in audit.records(actor="alice")] == ["a", "c"]
        assert [r["message"] for r in audit.records(actor="alice", action="delete")] == ["c"]

    def test_assert_audited_returns_the_newest_match(self, audit: AuditLog) -> None:
        """``assert_audited`` returns the newest matching record."""
        log = logging.getLogger("app.t2")
        log.info("first", extra={"actor": "alice"})
        log.info("second", extra={"actor": "alice"})
        assert audit.assert_audited(actor="alice")["message"] == "second"

    def test_matching_is_type_exact_like_query(self, audit: AuditLog) -> None:
        """``1`` is not ``True`` nor ``1.0`` (as in ``query(where=...)``), at any depth."""
        log = logging.getLogger("app.t2b")
        log.info("x", extra={"approved": 1, "ctx": {"n": [1, True]}})
        with pytest.raises(AssertionError):
            audit.assert_audited(approved=True)
        with pytest.raises(AssertionError):
            audit.assert_audited(approved=1.0)
        with pytest.raises(AssertionError):
            audit.assert_audited(ctx={"n": [True, True]})
        assert audit.assert_audited(approved=1, ctx={"n": (1, True)})["message"] == "x"
        assert audit.records(approved=True) == []
        audit.assert_not_audited(approved=True)

    def test_assert_audited_when_nothing_was_logged(self, audit: AuditLog) -> None:
        """With an empty trail the failure says nothing was audited at all."""
        with pytest.raises(AssertionError, match="nothing was audited at all"):
            audit.assert_audited(actor="alice")
        with pytest.raises(TypeError):
            audit.assert_audited()

    def test_assert_not_audited(self, audit: AuditLog) -> None:
        """``assert_not_audited`` fails when a matching record exists."""
        logging.getLogger("app.t3").warning("wiped", extra={"action": "delete"})
        audit.assert_not_audited(action="export")
        with pytest.raises(AssertionError, match="1 records with action='delete' were audited"):
            audit.assert_not_audited(action="delete")

    def test_context_fields_reach_the_records(self, audit: AuditLog) -> None:
        """``audit_context`` values are on the records, as AuditContextFilter puts them in production."""
        with audit_context(actor="carol", request_id="r-9"):
            logging.getLogger("app.t4").info("viewed")
        rec = audit.assert_audited(actor="carol")
        assert rec["request_id"] == "r-9"

    def test_levels_and_handlers_are_restored(self, tmp_path: Path) -> None:
        """During the block INFO records reach the store; afterwards the root logger is as it was."""
        root_logger = logging.getLogger()
        before = (root_logger.level, list(root_logger.handlers))
        with AuditLog(tmp_path / "a") as audit:
            assert audit.handler in root_logger.handlers
            assert root_logger.getEffectiveLevel() <= logging.INFO
            logging.getLogger("app.t5").info("kept")
            logging.getLogger("app.t5").debug("below the level")
            assert [r["message"] for r in audit.records()] == ["kept"]
        assert (root_logger.level, list(root_logger.handlers)) == before

    def test_attach_reaches_loggers_that_do_not_propagate(self, audit: AuditLog) -> None:
        """``attach(name)`` adds the handler to a logger that does not propagate to the root."""
        isolated = logging.getLogger("app.isolated")
        isolated.propagate = False
        try:
            isolated.info("lost")
            audit.attach("app.isolated")
            isolated.info("found")
            assert [r["message"] for r in audit.records()] == ["found"]
        finally:
            isolated.propagate = True
        audit.close()
        assert audit.handler not in isolated.handlers

    def test_attach_again_after_logging_was_reconfigured(self, tmp_path: Path) -> None:
        """After a dictConfig closed the fixture's handler, ``attach()`` puts a new one on the same store."""
        root_logger = logging.getLogger()
        saved_handlers, saved_level = list(root_logger.handlers), root_logger.level
        try:
            with AuditLog(tmp_path / "r") as audit:
                logging.config.dictConfig({"version": 1, "incremental": False, "root": {"handlers": []}})
                logging.getLogger("app.t7").info("unseen")
                audit.attach()
                logging.getLogger("app.t7").info("seen")
                assert [r["message"] for r in audit.records()] == ["seen"]
            assert root_logger.level == saved_level
        finally:
            root_logger.handlers[:] = saved_handlers
            root_logger.setLevel(saved_level)

    def test_diverted_records_are_kept_for_the_test(self, tmp_path: Path) -> None:
        """Records the handler could not queue are in ``diverted``, not lost and not printed."""
        with AuditLog(tmp_path / "d", queue_size=2) as audit:
            log = logging.getLogger("app.t6")
            with paused(audit.handler):
                for i in range(5):
                    log.info("r%d", i)
            assert [r.getMessage() for r in audit.diverted] == ["r2", "r3", "r4"]
            assert [r["message"] for r in audit.records()] == ["r0", "r1"]
            assert audit.verify()

    def test_a_structlog_processor_for_the_same_store(self, audit: AuditLog) -> None:
        """``processor()`` gives an AuditProcessor writing to the fixture's store."""
        structlog = pytest.importorskip("structlog")
        log = structlog.wrap_logger(
            structlog.testing.CapturingLogger(), processors=[audit.processor(drop=True)]
        )
        log.info("charged", actor="dave", amount=5)
        assert audit.assert_audited(actor="dave", message="charged")["amount"] == 5

    def test_a_bad_level_is_refused(self, tmp_path: Path) -> None:
        """An unknown level name is a ConfigError."""
        with pytest.raises(ConfigError, match="unknown level"):
            AuditLog(tmp_path / "x", level="LOUD")


class TestTemporaryStore:
    def test_a_writable_store_removed_afterwards(self) -> None:
        """``temporary_store()`` yields an open writer store whose directory is gone afterwards."""
        with temporary_store() as store:
            receipt = store.append({"actor": "alice"})
            where = Path(store.root)
            assert receipt.seq == 0 and store.tree_size == 1
            with AuditStore.open_reader(where) as reader:
                assert [r.payload["actor"] for r in reader.scan()] == ["alice"]
        assert not where.exists()


class TestWithoutPytest:
    def test_the_module_imports_without_pytest(self, tmp_path: Path) -> None:
        """With pytest unimportable, quipu_logging.testing imports and AuditLog works; no fixture."""
        code = textwrap.dedent(
            f"""
            import sys
            sys.modules["pytest"] = None
            sys.modules["_pytest"] = None
            import logging
            import quipu_logging.testing as t
            assert not hasattr(t, "audit_log") and "audit_log" not in t.__all__
            with t.AuditLog({str(tmp_path / "s")!r}) as audit:
                logging.getLogger("app").info("hello", extra={{"actor": "x"}})
                audit.assert_audited(actor="x")
            print("ok")
            """
        )
        result = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            timeout=60,
            env={"PYTHONPATH": PACKAGE_PARENT, "PATH": "/usr/bin:/bin"},
            check=False,
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == "ok"
