"""The quick start: one handler, one logging call, a verified audit trail.

Run it with ``python examples/basic.py [DIR]`` (default: a temporary directory, removed
afterwards). Then, on a store you kept: ``quipu-log verify DIR/audit``.
"""

from __future__ import annotations

import logging
import sys
import tempfile
from pathlib import Path

from quipu_logging import AuditHandler, AuditStore


def main(directory: Path) -> int:
    root = directory / "audit"

    # The ten lines an application needs.
    handler = AuditHandler(root)  # creates the store; never makes logging calls wait on the disk
    audit = logging.getLogger("app.audit")
    audit.addHandler(handler)
    audit.setLevel(logging.INFO)

    audit.info(
        "user %s updated doc", "alice", extra={"actor": "alice", "action": "update", "target": "doc-42"}
    )
    audit.warning("user %s deleted doc", "bob", extra={"actor": "bob", "action": "delete", "target": "doc-7"})

    handler.close()  # drains the queue, fsyncs, writes a checkpoint (also done at exit)

    # Read it back, as an auditor would (no lock: this works while an application writes).
    with AuditStore.open_reader(root) as store:
        for record in store.scan():
            print(record.seq, record.payload["actor"], record.payload["action"], record.payload["message"])
        report = store.verify()
    print(f"verify: {'intact' if report.ok else 'PROBLEMS'}; tree size {report.tree_size}")
    return 0 if report.ok and report.tree_size == 2 else 1


if __name__ == "__main__":
    if len(sys.argv) > 1:
        sys.exit(main(Path(sys.argv[1])))
    with tempfile.TemporaryDirectory(prefix="quipu-basic-") as tmp:
        sys.exit(main(Path(tmp)))
