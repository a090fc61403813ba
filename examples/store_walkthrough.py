"""The store on its own, without logging: write an audit store, reopen it, verify it and query it.

Run it with ``python examples/store_walkthrough.py [DIR]`` (DIR must not hold anything
else; default: a temporary directory, removed afterwards). ``make demo`` runs the full
service demo (``examples/demo.py``) instead.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from quipu_logging import AuditStore, StoreConfig
from quipu_logging.store import merkle

ACTORS = ["alice", "bob", "carol"]
ACTIONS = ["read", "update", "delete"]


def main(root: Path) -> int:
    config = StoreConfig(root=root, sync="group:1000:20", max_segment_bytes="64KiB")
    print(f"store: {root}")

    # 1. write: 2,000 audit events, one per request, in batches (as the writer thread does)
    with AuditStore.open(config) as store:
        events = [
            {
                "actor": ACTORS[i % 3],
                "action": ACTIONS[i % 3 if i % 7 else 2],
                "target": f"doc-{i % 50}",
                "request_id": f"req-{i:05d}",
                "level": "INFO",
                "levelno": 20,
                "logger": "app.audit",
                "message": f"{ACTORS[i % 3]} touched doc-{i % 50}",
            }
            for i in range(2000)
        ]
        for start in range(0, len(events), 256):
            store.append_batch(events[start : start + 256])
        anchor = store.checkpoint()  # a checkpoint line to keep somewhere else
        print(f"wrote {store.tree_size} records; checkpoint root {anchor.root.hex()[:16]}...")

    # 2. reopen as the writer (crash recovery runs here) and append more
    with AuditStore.open(config) as store:
        receipt = store.append({"actor": "alice", "action": "export", "target": "all-docs"})
        print(f"reopened; appended seq {receipt.seq}")

    # 3. verify as an outside reader, against the anchor kept elsewhere
    with AuditStore.open_reader(root) as reader:
        report = reader.verify(anchor=anchor)
        status = "intact" if report.ok else "PROBLEMS"
        print(f"verify: {status}: {report.records_checked} records, tree size {report.tree_size}")
        for problem in report.problems:
            print(f"  {problem}")

        # 4. query: every delete by alice, newest first
        deletes = [
            r
            for r in reader.scan(reverse=True)
            if r.payload.get("actor") == "alice" and r.payload.get("action") == "delete"
        ]
        print(
            f"alice deleted {len(deletes)} times; newest: seq {deletes[0].seq} {deletes[0].payload['target']}"
        )

        # 5. prove one record is in the tree, the way an auditor would check it
        proof = reader.prove_inclusion(deletes[0].seq)
        ok = merkle.verify_inclusion(
            proof.leaf_hash, proof.seq, proof.tree_size, list(proof.path), proof.root
        )
        print(f"inclusion proof for seq {proof.seq}: {len(proof.path)} hashes, verifies={ok}")
    return 0 if report.ok and ok else 1


if __name__ == "__main__":
    if len(sys.argv) > 1:
        sys.exit(main(Path(sys.argv[1])))
    with tempfile.TemporaryDirectory(prefix="quipu-walkthrough-") as tmp:
        sys.exit(main(Path(tmp) / "audit"))
