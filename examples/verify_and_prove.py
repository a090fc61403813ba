"""Proving one record is in the trail, to someone who trusts nothing but a root hash.

Three parties:

1. the **application** writes audit records through ``logging``;
2. the **operator** verifies the store, keeps a checkpoint line elsewhere (an anchor) and
   hands an auditor a proof file and the exact bytes of one record;
3. the **auditor** checks them with :mod:`quipu_logging.store.merkle` alone: no store, no
   reader, just SHA-256 over bytes (RFC 6962/9162). A changed byte in the record fails
   the check; a later tree is shown to extend the anchored one (nothing rewritten).

Run it with ``python examples/verify_and_prove.py [DIR]`` (default: a temporary directory).
The command line does the same with ``quipu-log prove ROOT SEQ > proof.json`` and
``quipu-log prove --check proof.json --root HEX``.
"""

from __future__ import annotations

import base64
import json
import logging
import sys
import tempfile
from pathlib import Path

from quipu_logging import AuditHandler, AuditStore
from quipu_logging.store import merkle


def application(root: Path, start: int, count: int) -> None:
    handler = AuditHandler(root)
    audit = logging.getLogger("app.audit")
    audit.addHandler(handler)
    audit.setLevel(logging.INFO)
    try:
        for i in range(start, start + count):
            actor = ["alice", "bob", "carol"][i % 3]
            audit.info(
                "%s read record %d", actor, i, extra={"actor": actor, "action": "read", "target": f"rec-{i}"}
            )
    finally:
        audit.removeHandler(handler)
        handler.close()


def operator(root: Path, out: Path, target: str) -> tuple[str, str]:
    """Verifies the store and writes the proof bundle; returns (the anchor line, the trusted root hex)."""
    with AuditStore.open_reader(root) as store:
        report = store.verify()
        if not report.ok:
            raise SystemExit(f"store does not verify: {report.problems[0]}")
        [record] = [r for r in store.scan() if r.payload.get("target") == target]
        proof = store.prove_inclusion(record.seq)
        anchor = store.last_checkpoint
        assert anchor is not None
    (out / "proof.json").write_text(proof.to_json())
    (out / "record.b64").write_text(base64.b64encode(record.raw).decode())
    (out / "anchor.json").write_text(anchor.to_json())
    print(f"operator: store intact, {report.tree_size} records; proof for seq {record.seq} written")
    return anchor.to_json(), report.root.hex()


def auditor_checks_inclusion(proof_file: Path, record_bytes: bytes, trusted_root_hex: str) -> bool:
    """Only json, bytes and quipu_logging.store.merkle: is this exact record in the trusted tree?"""
    proof = json.loads(proof_file.read_text())
    leaf = merkle.leaf_hash(record_bytes)  # SHA-256(0x00 || the exact stored bytes)
    return leaf.hex() == proof["leaf_hash"] and merkle.verify_inclusion(
        leaf,
        proof["seq"],
        proof["tree_size"],
        [bytes.fromhex(h) for h in proof["path"]],
        bytes.fromhex(trusted_root_hex),
    )


def auditor_checks_consistency(consistency: dict[str, object], anchor: dict[str, object]) -> bool:
    """Does the newer tree extend the anchored one? (Also only merkle and bytes.)"""
    path = consistency["path"]
    assert isinstance(path, list) and consistency["old_root"] == anchor["root"]
    return merkle.verify_consistency(
        int(str(consistency["old_size"])),
        int(str(consistency["new_size"])),
        bytes.fromhex(str(anchor["root"])),
        bytes.fromhex(str(consistency["new_root"])),
        [bytes.fromhex(h) for h in path],
    )


def main(directory: Path) -> int:
    root = directory / "audit"
    application(root, 0, 100)
    anchor_line, trusted_root = operator(root, directory, target="rec-41")

    raw = base64.b64decode((directory / "record.b64").read_text())
    genuine = auditor_checks_inclusion(directory / "proof.json", raw, trusted_root)
    target = json.loads(raw)["target"]
    print(f"auditor: record {target} is in the tree with root {trusted_root[:16]}...: {genuine}")

    actor = json.loads(raw)["actor"]
    forged = raw.replace(f'"actor":"{actor}"'.encode(), b'"actor":"eve"')
    assert forged != raw
    caught = not auditor_checks_inclusion(directory / "proof.json", forged, trusted_root)
    print(f"auditor: the same record with its actor changed fails the check: {caught}")

    # Later: more records. The operator proves the new tree extends the anchored one.
    application(root, 100, 50)
    anchor = json.loads(anchor_line)
    with AuditStore.open_reader(root) as store:
        consistency = json.loads(store.prove_consistency(anchor["tree_size"]).to_json())
    extends = auditor_checks_consistency(consistency, anchor)
    sizes = f"tree of {consistency['new_size']} extends the anchored tree of {anchor['tree_size']}"
    print(f"auditor: {sizes}: {extends}")
    return 0 if genuine and caught and extends else 1


if __name__ == "__main__":
    if len(sys.argv) > 1:
        sys.exit(main(Path(sys.argv[1])))
    with tempfile.TemporaryDirectory(prefix="quipu-prove-") as tmp:
        sys.exit(main(Path(tmp)))
