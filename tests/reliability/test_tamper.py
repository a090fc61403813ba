"""The tamper matrix (issue 6 requirement 4, DESIGN §8 "stored records cannot be edited ...").

One store is built once (signed, several sealed segments, an anchor saved "elsewhere"), and
every row of :data:`CASES` damages a private copy of it the way an operator with file access
would: with ``struct``/``zlib`` on the closed store's bytes. The real console entry
(``python -m quipu_logging verify --json``) then has to exit 1 and name the damaged place;
the untouched copy exits 0 with the same key and anchor.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

import quipu_logging
from quipu_logging import AuditStore, StoreConfig

SEG_HEADER = struct.Struct("<4sB3sQ")
FRAME = struct.Struct("<II")
HASH = 32
SPINE_HEADER = 8
PACKAGE_PARENT = str(Path(quipu_logging.__file__).resolve().parent.parent)
N = 60


# ---------------------------------------------------------------------------- building


def event(i: int) -> dict[str, Any]:
    return {"i": i, "actor": f"user-{i % 4}", "action": "update", "note": "n" * ((i * 13) % 40)}


def seg(root: Path, number: int) -> Path:
    return root / "log" / f"seg-{number:010d}.log"


def segments(root: Path) -> list[Path]:
    return sorted((root / "log").glob("seg-*.log"))


def frames(data: bytes) -> list[tuple[int, int]]:
    """``[(offset, payload length)]`` of a segment's frames, trusting the lengths."""
    out = []
    pos = SEG_HEADER.size
    while pos + FRAME.size <= len(data):
        length = FRAME.unpack_from(data, pos)[0]
        out.append((pos, length))
        pos += FRAME.size + length
    return out


def _base(root: Path, number: int) -> int:
    """The base index (first seq) in segment ``number``'s header."""
    return int(SEG_HEADER.unpack_from(seg(root, number).read_bytes(), 0)[3])


def flip(path: Path, offset: int, bit: int = 0) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 1 << bit
    path.write_bytes(bytes(data))


def build_store(root: Path, key: Path, n: int, salt: str = "") -> None:
    with AuditStore.open(StoreConfig(root=root, max_segment_bytes=1200, signing_key=key)) as store:
        for i in range(n):
            store.append({**event(i), "salt": salt} if salt else event(i))


@dataclass(frozen=True)
class Built:
    root: Path
    key: Path
    public: Path
    anchor: Path
    n_segments: int


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    """A closed, signed store of N records over at least five segments, and its anchor line."""
    base = tmp_path_factory.mktemp("tamper")
    private = ed25519.Ed25519PrivateKey.generate()
    key = base / "signing.pem"
    key.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    public = base / "signing.pub"
    public.write_bytes(
        private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    root = base / "store"
    build_store(root, key, N)
    # The anchor is the newest checkpoint, copied off the host when the store was closed.
    anchor = base / "anchor.json"
    anchor.write_bytes((root / "checkpoints.jsonl").read_bytes().splitlines()[-1] + b"\n")
    n = len(segments(root))
    assert n >= 5, n
    return Built(root, key, public, anchor, n)


# ---------------------------------------------------------------------------- the cases


@dataclass(frozen=True)
class Case:
    name: str
    tamper: Callable[[Path, Built], None]
    place: str  # the file name (or its tail) the report must name
    offset: int | None = None  # when set, some problem about ``place`` must carry it
    anchor: bool = True  # whether verify is given the anchor (and the public key)
    seq: int | Callable[[Path], int] | None = None  # when set, some problem about ``place`` carries it


def _nothing(root: Path, b: Built) -> None:
    pass


def _segment_header(root: Path, b: Built) -> None:
    flip(seg(root, 1), 1)  # inside the magic


def _segment_version(root: Path, b: Built) -> None:
    flip(seg(root, 1), 4)


def _segment_base_index(root: Path, b: Built) -> None:
    flip(seg(root, 2), 8)


def _frame_length(root: Path, b: Built) -> None:
    pos = frames(seg(root, 1).read_bytes())[2][0]
    flip(seg(root, 1), pos, 1)


def _crc(root: Path, b: Built) -> None:
    pos = frames(seg(root, 1).read_bytes())[2][0]
    flip(seg(root, 1), pos + 4, 3)


def _payload(root: Path, b: Built) -> None:
    pos = frames(seg(root, 1).read_bytes())[2][0]
    flip(seg(root, 1), pos + FRAME.size + 5, 0)


def _payload_crc_fixed(root: Path, b: Built) -> None:
    path = seg(root, 1)
    data = bytearray(path.read_bytes())
    pos, length = frames(bytes(data))[2]
    body = pos + FRAME.size
    # "update" -> "updatf": still valid JSON, same length, a clean CRC: only the hashes can tell.
    at = bytes(data).index(b'"update"', body) + 6
    data[at] ^= 0x03
    FRAME.pack_into(data, pos, length, zlib.crc32(bytes(data[body : body + length])))
    path.write_bytes(bytes(data))


def _payload_active_crc_fixed(root: Path, b: Built) -> None:
    # The last record of the active segment: the writer's recovery must not "repair" it away.
    path = segments(root)[-1]
    data = bytearray(path.read_bytes())
    pos, length = frames(bytes(data))[-1]
    body = pos + FRAME.size
    at = bytes(data).index(b'"update"', body) + 6
    data[at] ^= 0x03
    FRAME.pack_into(data, pos, length, zlib.crc32(bytes(data[body : body + length])))
    path.write_bytes(bytes(data))


def _spine_leaf(root: Path, b: Built) -> None:
    flip(root / "merkle.spine", SPINE_HEADER + 3 * HASH + 7)


def _spine_last_hash(root: Path, b: Built) -> None:
    path = root / "merkle.spine"
    flip(path, path.stat().st_size - 1)


def _checkpoint_root(root: Path, b: Built) -> None:
    path = root / "checkpoints.jsonl"
    lines = path.read_bytes().splitlines(keepends=True)
    cp = json.loads(lines[1])
    cp["root"] = ("0" if cp["root"][0] != "0" else "1") + cp["root"][1:]
    lines[1] = json.dumps(cp, separators=(",", ":"), sort_keys=True).encode() + b"\n"
    path.write_bytes(b"".join(lines))


def _checkpoint_bit(root: Path, b: Built) -> None:
    path = root / "checkpoints.jsonl"
    data = path.read_bytes()
    # a bit of a digit of the first line's tree_size ("tree_size":N -> another digit)
    at = data.index(b'"tree_size":') + len(b'"tree_size":')
    flip(path, at, 0)


def _delete(number: Callable[[Built], int]) -> Callable[[Path, Built], None]:
    def tamper(root: Path, b: Built) -> None:
        k = number(b)
        seg(root, k).unlink()
        seg(root, k).with_suffix(".idx").unlink(missing_ok=True)

    return tamper


def _reorder(root: Path, b: Built) -> None:
    one, two = seg(root, 1), seg(root, 2)
    tmp = one.with_name("swap")
    one.rename(tmp)
    two.rename(one)
    tmp.rename(two)
    for k in (1, 2):
        seg(root, k).with_suffix(".idx").unlink(missing_ok=True)


def _duplicate(root: Path, b: Built) -> None:
    shutil.copyfile(seg(root, 1), seg(root, 2))
    seg(root, 2).with_suffix(".idx").unlink(missing_ok=True)


def _truncate_sealed(root: Path, b: Built) -> None:
    path = seg(root, 1)
    data = path.read_bytes()
    last = frames(data)[-1][0]
    path.write_bytes(data[:last])  # whole frames, so only the count and the hashes can tell


def _truncate_spine(root: Path, b: Built) -> None:
    path = root / "merkle.spine"
    data = path.read_bytes()
    path.write_bytes(data[: SPINE_HEADER + 20 * HASH])


def _drop_trailing(root: Path, b: Built, *, drop_checkpoints: bool) -> None:
    """Removes the last 3 records from the active segment and the spine, consistently."""
    last = segments(root)[-1]
    data = last.read_bytes()
    fr = frames(data)
    assert len(fr) > 3
    last.write_bytes(data[: fr[-3][0]])
    keep = N - 3
    # Rebuild the spine for `keep` leaves with the store's own code: a forger's consistent spine.
    from quipu_logging.store import FileLayer
    from quipu_logging.store._spine import Spine

    spine = Spine.open(str(root / "merkle.spine"), FileLayer(), writable=True)
    spine.truncate(keep)
    spine.sync()
    spine.close()
    if drop_checkpoints:
        path = root / "checkpoints.jsonl"
        lines = path.read_bytes().splitlines(keepends=True)
        path.write_bytes(b"".join(line for line in lines if json.loads(line)["tree_size"] <= keep))


def _rebuild(root: Path, b: Built) -> None:
    """The whole store replaced by one with other content, signed with the same key."""
    shutil.rmtree(root)
    build_store(root, b.key, N + 5, salt="forged")


CASES = [
    Case("segment header magic", _segment_header, "seg-0000000001.log", 0),
    Case("segment header version", _segment_version, "seg-0000000001.log", 4),
    Case("segment base index", _segment_base_index, "seg-0000000002.log"),
    Case("frame length", _frame_length, "seg-0000000001.log"),
    Case("frame crc", _crc, "seg-0000000001.log"),
    Case("payload bit, crc not fixed", _payload, "seg-0000000001.log"),
    Case("payload bit, crc fixed", _payload_crc_fixed, "seg-0000000001.log"),
    Case("active payload bit, crc fixed", _payload_active_crc_fixed, "seg-"),
    Case("spine leaf hash", _spine_leaf, "merkle.spine"),
    Case("spine last hash", _spine_last_hash, "merkle.spine"),
    Case("checkpoint root", _checkpoint_root, "checkpoints.jsonl"),
    Case("checkpoint bit", _checkpoint_bit, "checkpoints.jsonl"),
    # The hole is named where the log now starts, with the missing seq range.
    Case("first segment deleted", _delete(lambda b: 0), "seg-0000000001.log", 0, seq=0),
    Case("middle segment deleted", _delete(lambda b: 2), "seg-0000000002.log"),
    Case("last sealed segment deleted", _delete(lambda b: b.n_segments - 2), "seg-"),
    Case("segments reordered", _reorder, "seg-0000000001.log"),
    Case("segment duplicated", _duplicate, "seg-0000000002.log"),
    # Whole frames cut off the end: named where the next segment's records no longer follow on.
    Case(
        "sealed segment truncated", _truncate_sealed, "seg-0000000002.log", 0, seq=lambda r: _base(r, 2) - 1
    ),
    Case("spine truncated", _truncate_spine, "merkle.spine"),
    Case(
        "trailing records removed with their spine hashes",
        lambda r, b: _drop_trailing(r, b, drop_checkpoints=False),
        "checkpoints.jsonl",
        anchor=False,
    ),
    Case(
        "trailing records, spine hashes and checkpoints removed",
        lambda r, b: _drop_trailing(r, b, drop_checkpoints=True),
        "anchor",
    ),
    Case("store rebuilt with other content", _rebuild, "anchor"),
]


def verify(root: Path, b: Built, *, anchor: bool) -> tuple[int, dict[str, Any], str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (PACKAGE_PARENT, env.get("PYTHONPATH")) if p)
    args = [sys.executable, "-m", "quipu_logging", "verify", "--json", str(root)]
    if anchor:
        args += ["--public-key", str(b.public), "--anchor", str(b.anchor)]
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=120, check=False)
    report = json.loads(proc.stdout) if proc.stdout.strip() else {}
    return proc.returncode, report, proc.stderr


def _last_segment_number(b: Built) -> int:
    return b.n_segments - 1


@pytest.mark.parametrize("anchor", [True, False], ids=["with-anchor", "plain"])
def test_untouched_copy_verifies(built: Built, tmp_path: Path, anchor: bool) -> None:
    """An untouched copy exits 0, with and without the key and the anchor."""
    root = tmp_path / "store"
    shutil.copytree(built.root, root, ignore=shutil.ignore_patterns("LOCK"))
    code, report, err = verify(root, built, anchor=anchor)
    assert code == 0, (report, err)
    assert report["ok"] is True and report["problems"] == []
    assert report["tree_size"] == N


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_tampering_is_found(built: Built, tmp_path: Path, case: Case) -> None:
    """``quipu-log verify`` exits 1 and names the damaged place."""
    root = tmp_path / "store"
    shutil.copytree(built.root, root, ignore=shutil.ignore_patterns("LOCK"))
    want_seq = case.seq(root) if callable(case.seq) else case.seq
    case.tamper(root, built)
    code, report, err = verify(root, built, anchor=case.anchor)
    assert code == 1, (code, report, err)
    assert report["ok"] is False
    problems = report["problems"]
    assert problems and all(p["reason"] for p in problems)
    named = [p for p in problems if case.place in (p["file"] or "")]
    assert named, f"no problem names {case.place!r}: {problems}"
    if case.offset is not None:
        assert any(p["offset"] == case.offset for p in named), problems
    if want_seq is not None:
        assert any(p["seq"] == want_seq for p in named), problems
