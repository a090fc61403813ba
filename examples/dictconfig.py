"""The configuration the README shows: ``dictConfig`` with an AuditHandler, a fallback file
and an AuditContextFilter.

* ``audit`` stores every record of the ``app.audit`` logger; when it cannot take one
  (the queue is full, the store is closed), the record goes to ``audit_fallback``,
  exactly once, and the store later says so in a ``gap`` record.
* ``audit_fallback`` writes those records as JSON lines shaped like the stored ones.
* ``audit_context`` copies ``actor`` and ``request_id`` (set once per request by your
  middleware with ``audit_context(...)``) into every record.

Run it with ``python examples/dictconfig.py [DIR]`` (default: a temporary directory).
"""

from __future__ import annotations

import logging
import logging.config
import sys
import tempfile
from pathlib import Path
from typing import Any

from quipu_logging import AuditStore
from quipu_logging.context import audit_context


def logging_config(directory: Path) -> dict[str, Any]:
    """The ``dictConfig`` dictionary, with the store and the fallback file under ``directory``."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {
            "audit_context": {
                "()": "quipu_logging.AuditContextFilter",
                "fields": ["actor", "request_id"],
            },
        },
        "formatters": {
            # The "()" form: the "class" form would drop a formatter's keyword options.
            "audit_json": {"()": "quipu_logging.AuditJsonFormatter"},
        },
        "handlers": {
            "audit": {
                "class": "quipu_logging.AuditHandler",
                "root": str(directory / "audit"),
                "fallback": "audit_fallback",
                "filters": ["audit_context"],
            },
            "audit_fallback": {
                "class": "logging.FileHandler",
                "filename": str(directory / "audit-fallback.jsonl"),
                "formatter": "audit_json",
            },
        },
        "loggers": {
            "app.audit": {"handlers": ["audit"], "level": "INFO", "propagate": False},
        },
    }


def update_document(doc_id: str) -> None:
    """Application code: it knows what happened, not who asked."""
    logging.getLogger("app.audit").info("document updated", extra={"action": "update", "target": doc_id})


def main(directory: Path) -> int:
    logging.config.dictConfig(logging_config(directory))

    # What web middleware does once per request:
    with audit_context(actor="alice", request_id="req-0001"):
        update_document("doc-42")
    with audit_context(actor="bob", request_id="req-0002"):
        update_document("doc-7")

    logging.shutdown()  # closes the handler: drain, fsync, checkpoint

    with AuditStore.open_reader(directory / "audit") as store:
        records = [r.payload for r in store.scan()]
        report = store.verify()
    for p in records:
        print(f"seq {p['seq']}: {p['actor']} {p['action']} {p['target']} ({p['request_id']})")
    status = "intact" if report.ok else "PROBLEMS"
    print(f"verify: {status}; fallback file: {directory / 'audit-fallback.jsonl'}")
    ok = report.ok and [(p["actor"], p["request_id"]) for p in records] == [
        ("alice", "req-0001"),
        ("bob", "req-0002"),
    ]
    return 0 if ok else 1


if __name__ == "__main__":
    if len(sys.argv) > 1:
        sys.exit(main(Path(sys.argv[1])))
    with tempfile.TemporaryDirectory(prefix="quipu-dictconfig-") as tmp:
        sys.exit(main(Path(tmp)))
