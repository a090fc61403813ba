"""structlog: ``AuditProcessor`` keeps a copy of every event in the audit store.

The chain goes on as before (here to a JSON line on stdout); the audit store gets the
same event with the same keys a stdlib record has: ``message``, ``level``, ``levelno``,
``logger``, ``ts``, ``source``, the bound and context values, ``exc`` for exceptions.

Needs the extra: ``pip install 'quipu-logging[structlog]'``. Run it with
``python examples/structlog_app.py [DIR]`` (default: a temporary directory).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import structlog

from quipu_logging import AuditStore
from quipu_logging.structlog import AuditProcessor


def main(directory: Path) -> int:
    audit = AuditProcessor(directory / "audit")
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,  # request context reaches the audit record
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso"),
            audit,  # stores a copy; the event goes on unchanged
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        logger_factory=structlog.PrintLoggerFactory(sys.stdout),
        cache_logger_on_first_use=False,
    )
    log = structlog.get_logger().bind(logger="billing")  # names the stored record's logger

    # Middleware binds who is asking, once per request.
    structlog.contextvars.bind_contextvars(actor="alice", request_id="req-0042")
    log.info("invoice.paid", action="pay", target="invoice-881", amount_cents=129_00)
    try:
        raise TimeoutError("payment provider did not answer")
    except TimeoutError:
        log.exception("refund.failed", action="refund", target="invoice-880")
    structlog.contextvars.clear_contextvars()

    audit.close()  # the processor built its handler, so it closes it (also done at exit)

    with AuditStore.open_reader(directory / "audit") as store:
        records = [r.payload for r in store.scan()]
        report = store.verify()
    for p in records:
        extra = f" exc={p['exc'].splitlines()[-1]!r}" if "exc" in p else ""
        line = f"stored seq {p['seq']}: {p['level']} {p['logger']} {p['message']} actor={p['actor']}{extra}"
        print(line, file=sys.stderr)
    print(f"verify: {'intact' if report.ok else 'PROBLEMS'}", file=sys.stderr)
    ok = report.ok and [p["message"] for p in records] == ["invoice.paid", "refund.failed"]
    return 0 if ok and all(p["actor"] == "alice" for p in records) else 1


if __name__ == "__main__":
    if len(sys.argv) > 1:
        sys.exit(main(Path(sys.argv[1])))
    with tempfile.TemporaryDirectory(prefix="quipu-structlog-") as tmp:
        sys.exit(main(Path(tmp)))
