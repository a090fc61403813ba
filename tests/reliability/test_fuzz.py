"""Fuzzing every reader of untrusted bytes (issue 6 requirement 5).

Each reader gets arbitrary bytes, and damaged versions of valid input (bit flips,
cuts, splices, overwritten length fields), and must either parse or raise the
package's own error type (:class:`~quipu_logging.QuipuError`): never another
exception, never a hang (every call runs under a watchdog alarm), and never an
allocation driven by a length field (a 4 GiB length is fed explicitly, under
``tracemalloc``).

The readers: the segment reader (header parser, frame scanner and a whole store
reader over a fuzzed segment), the spine reader, the sidecar parser, the
checkpoint parser (lines and ``Checkpoint.from_json``), the cursor decoder, the
DLQ decoder, and the proof checker (``InclusionProof``/``ConsistencyProof.from_json``
followed by the ``merkle`` checks).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import struct
import tempfile
import threading
import tracemalloc
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quipu_logging import (
    AuditStore,
    Checkpoint,
    ConsistencyProof,
    InclusionProof,
    MalformedError,
    QuipuError,
    StoreConfig,
)
from quipu_logging._dlq import _decode as decode_dlq
from quipu_logging.store import FileLayer, merkle
from quipu_logging.store._checkpoint import parse_checkpoint_lines
from quipu_logging.store._format import Sidecar, parse_segment_header, scan_frames
from quipu_logging.store._query import Cursor
from quipu_logging.store._spine import Spine

FRAME = struct.Struct("<II")
FOUR_GIB = 0xFFFF_FFFF
# A reader may allocate what the input's own size justifies; nothing near a length field's claim.
ALLOCATION_LIMIT = 8 * 1024 * 1024
HANG_LIMIT = 20  # seconds per call: far above any honest parse of these small inputs
FUZZ = settings(
    max_examples=300, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)


@contextlib.contextmanager
def watchdog(seconds: int = HANG_LIMIT) -> Iterator[None]:
    """Raises in the main thread if the body runs longer than ``seconds`` (a hang)."""

    def expired(signum: int, frame: Any) -> None:
        raise TimeoutError(f"reader still running after {seconds}s: a hang")

    if threading.current_thread() is not threading.main_thread():  # pragma: no cover
        yield
        return
    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def only_own_errors(fn: Callable[[], Any]) -> Any:
    """Runs ``fn`` under the watchdog; any exception other than a QuipuError fails the test."""
    with watchdog():
        try:
            return fn()
        except QuipuError:
            return None


# ---------------------------------------------------------------------------- valid inputs


def _valid_store(root: Path) -> None:
    with AuditStore.open(StoreConfig(root=root, max_segment_bytes=600)) as store:
        for i in range(12):
            store.append({"i": i, "actor": "alice", "note": "x" * i})


@pytest.fixture(scope="module")
def valid(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The bytes of a small, honest store's files, to damage."""
    root = tmp_path_factory.mktemp("fuzz") / "store"
    _valid_store(root)
    segs = sorted((root / "log").glob("seg-*.log"))
    idx = sorted((root / "log").glob("seg-*.idx"))
    with AuditStore.open_reader(root) as reader:
        inclusion = reader.prove_inclusion(3).to_json()
        consistency = reader.prove_consistency(4).to_json()
        page = reader.query(limit=2)
        cursor = page.next_cursor
        store_id = reader._store_id()
    assert cursor is not None
    return {
        "root": root,
        "segment": segs[0].read_bytes(),
        "sidecar": idx[0].read_bytes(),
        "spine": (root / "merkle.spine").read_bytes(),
        "checkpoints": (root / "checkpoints.jsonl").read_bytes(),
        "inclusion": inclusion.encode(),
        "consistency": consistency.encode(),
        "cursor": cursor,
        "store_id": store_id,
        "fingerprint": json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))["f"],
    }


@st.composite
def damaged(draw: st.DrawFn, original: bytes) -> bytes:
    """``original`` with a few bit flips, a cut, a splice of random bytes, or a forged u32."""
    data = bytearray(original)
    for _ in range(draw(st.integers(1, 4))):
        if not data:
            break
        kind = draw(st.sampled_from(["flip", "cut", "splice", "u32"]))
        at = draw(st.integers(0, len(data) - 1))
        if kind == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "cut":
            del data[at:]
        elif kind == "splice":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif at + 4 <= len(data):
            value = draw(st.sampled_from([0, 1, 2, FOUR_GIB, 16 * 1024 * 1024, 16 * 1024 * 1024 + 1, 2**31]))
            struct.pack_into("<I", data, at, value)
    return bytes(data)


def fuzzed(key: str) -> Callable[[dict[str, Any]], st.SearchStrategy[bytes]]:
    return lambda v: st.one_of(st.binary(max_size=512), damaged(v[key]))


# ---------------------------------------------------------------------------- segment reader


class TestSegmentReader:
    """The segment header parser, the frame scanner and a store reader over a fuzzed segment."""

    @FUZZ
    @given(data=st.data())
    def test_header_and_frames(self, valid: dict[str, Any], data: st.DataObject) -> None:
        """parse_segment_header and scan_frames parse or raise CorruptionError."""
        raw = data.draw(fuzzed("segment")(valid))
        only_own_errors(lambda: parse_segment_header(raw, "seg"))
        scan = only_own_errors(lambda: scan_frames(raw))
        assert scan is not None  # the scanner reports damage in its result, never by raising
        for pos, length in scan.frames:
            assert pos + 8 + length <= len(raw)
        assert scan.end <= max(len(raw), 16)

    @settings(FUZZ, max_examples=60)
    @given(data=st.data())
    def test_store_reader_over_fuzzed_segment(self, valid: dict[str, Any], data: st.DataObject) -> None:
        """open_reader/scan/query/verify over a fuzzed first segment: own errors only, verify never raises."""
        raw = data.draw(fuzzed("segment")(valid))
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp) / "store"
            shutil.copytree(valid["root"], root, ignore=shutil.ignore_patterns("LOCK"))
            (root / "log" / "seg-0000000000.log").write_bytes(raw)
            (root / "log" / "seg-0000000000.idx").unlink()

            def read() -> None:
                with AuditStore.open_reader(root) as reader:
                    report = reader.verify()
                    assert report.ok is (raw == valid["segment"])
                    with contextlib.suppress(QuipuError):
                        list(reader.scan())
                    with contextlib.suppress(QuipuError):
                        reader.query(limit=5)

            only_own_errors(read)


# ---------------------------------------------------------------------------- spine, sidecar, checkpoints


class TestSpineReader:
    @FUZZ
    @given(data=st.data())
    def test_spine(self, valid: dict[str, Any], data: st.DataObject) -> None:
        """A reader's Spine over arbitrary bytes opens or raises CorruptionError; its queries too."""
        raw = data.draw(fuzzed("spine")(valid))
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "merkle.spine")
            Path(path).write_bytes(raw)

            def read() -> None:
                with Spine.open(path, FileLayer(), writable=False) as spine:
                    spine.check()
                    if spine.size:
                        spine.root()
                        spine.inclusion_proof(spine.size - 1)
                        spine.consistency_proof(1)

            only_own_errors(read)


class TestSidecar:
    @FUZZ
    @given(data=st.data())
    def test_sidecar(self, valid: dict[str, Any], data: st.DataObject) -> None:
        """Sidecar.from_bytes returns a Sidecar or None, never raises."""
        raw = data.draw(st.one_of(fuzzed("sidecar")(valid), st.builds(orjson.dumps, json_values())))
        with watchdog():
            side = Sidecar.from_bytes(raw)
        assert side is None or isinstance(side, Sidecar)


def json_values() -> st.SearchStrategy[Any]:
    scalars = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**63), 2**64 - 1),
        st.floats(allow_nan=False),
        st.text(max_size=8),
    )
    return st.recursive(
        scalars,
        lambda inner: st.one_of(
            st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=5)
        ),
        max_leaves=12,
    )


def checkpoint_like() -> st.SearchStrategy[dict[str, Any]]:
    """Dicts with the checkpoint's keys holding values of any JSON type."""
    keys = ["tree_size", "root", "created_at", "segment_seq", "prev", "key_id", "sig"]
    return st.fixed_dictionaries({k: json_values() for k in keys})


class TestCheckpointParser:
    @FUZZ
    @given(data=st.data())
    def test_lines(self, valid: dict[str, Any], data: st.DataObject) -> None:
        """parse_checkpoint_lines never raises: bad lines come back with their error."""
        raw = data.draw(fuzzed("checkpoints")(valid))
        with watchdog():
            lines, torn = parse_checkpoint_lines(raw)
        assert 0 <= torn <= len(raw)
        for offset, cp, error in lines:
            assert (cp is None) != (error == "")
            assert 0 <= offset < len(raw)

    @FUZZ
    @given(data=st.data())
    def test_from_json(self, valid: dict[str, Any], data: st.DataObject) -> None:
        """Checkpoint.from_json on bytes or a dict parses or raises MalformedError."""
        first = valid["checkpoints"].splitlines()[0]
        raw = data.draw(st.one_of(damaged(first), st.binary(max_size=200), checkpoint_like()))
        only_own_errors(lambda: Checkpoint.from_json(raw))


# ---------------------------------------------------------------------------- cursors, DLQ


class TestCursorDecoder:
    @FUZZ
    @given(data=st.data())
    def test_cursor(self, valid: dict[str, Any], data: st.DataObject) -> None:
        """Cursor.decode on arbitrary text raises QueryError or returns this store's cursor."""
        text = data.draw(
            st.one_of(
                st.text(max_size=200),
                damaged(valid["cursor"].encode()).map(lambda b: b.decode("latin-1")),
                st.builds(
                    lambda v: base64.urlsafe_b64encode(orjson.dumps(v)).decode().rstrip("="),
                    st.fixed_dictionaries({k: json_values() for k in "vsdlhf"}),
                ),
            )
        )

        def decode() -> Cursor:
            return Cursor.decode(
                text, store_id=valid["store_id"], newest_first=True, fingerprint=valid["fingerprint"]
            )

        cursor = only_own_errors(decode)
        if cursor is not None:
            assert cursor.store_id == valid["store_id"] and cursor.last_seq >= 0

    @FUZZ
    @given(data=st.data())
    def test_cursor_through_query(self, valid: dict[str, Any], data: st.DataObject) -> None:
        """AuditStore.query with a damaged cursor raises QueryError or pages normally."""
        text = data.draw(damaged(valid["cursor"].encode())).decode("latin-1")
        with AuditStore.open_reader(valid["root"]) as reader:
            only_own_errors(lambda: reader.query(limit=2, cursor=text))


class TestDlqDecoder:
    @FUZZ
    @given(raw=st.binary(max_size=600))
    def test_dlq(self, raw: bytes) -> None:
        """The DLQ decoder sorts any bytes into entries and undecodable runs, keeping every byte."""
        from quipu_logging._dlq import DLQ_HEADER

        for data in (raw, DLQ_HEADER + raw):
            with watchdog():
                entries, bad = decode_dlq(data)
            assert all(isinstance(e.record, dict) for e, _ in entries)
            # nothing vanishes: good frames plus undecodable runs account for all the bytes
            kept = sum(8 + len(r) for _, r in entries) + sum(len(b) for b in bad)
            header = len(DLQ_HEADER) if data.startswith(DLQ_HEADER) else 0
            assert kept == len(data) - header


# ---------------------------------------------------------------------------- proofs


class TestProofChecker:
    @FUZZ
    @given(data=st.data())
    def test_inclusion(self, valid: dict[str, Any], data: st.DataObject) -> None:
        """InclusionProof.from_json + verify_inclusion: MalformedError or a bool, true only if honest."""
        raw = data.draw(st.one_of(fuzzed("inclusion")(valid), st.builds(orjson.dumps, json_values())))
        proof = only_own_errors(lambda: InclusionProof.from_json(raw))
        if proof is None:
            return
        with watchdog():
            ok = merkle.verify_inclusion(
                proof.leaf_hash, proof.seq, proof.tree_size, list(proof.path), proof.root
            )
        assert isinstance(ok, bool)
        if ok and raw != valid["inclusion"]:
            # Only a proof with the honest numbers and hashes can verify (JSON layout may differ).
            honest = InclusionProof.from_json(valid["inclusion"])
            assert (proof.leaf_hash, proof.seq, proof.tree_size, proof.path, proof.root) == (
                honest.leaf_hash,
                honest.seq,
                honest.tree_size,
                honest.path,
                honest.root,
            )

    @FUZZ
    @given(data=st.data())
    def test_consistency(self, valid: dict[str, Any], data: st.DataObject) -> None:
        """ConsistencyProof.from_json + merkle.verify_consistency: MalformedError or a bool."""
        raw = data.draw(st.one_of(fuzzed("consistency")(valid), st.builds(orjson.dumps, json_values())))
        proof = only_own_errors(lambda: ConsistencyProof.from_json(raw))
        if proof is None:
            return
        with watchdog():
            ok = merkle.verify_consistency(
                proof.old_size, proof.new_size, proof.old_root, proof.new_root, list(proof.path)
            )
        assert isinstance(ok, bool)

    @pytest.mark.parametrize("size", [2**64, 2**200, 2**4096])
    def test_huge_sizes_do_not_hang(self, valid: dict[str, Any], size: int) -> None:
        """Absurd tree sizes in a proof are rejected (False) quickly, never looped over."""
        obj = json.loads(valid["inclusion"])
        obj["tree_size"] = size
        obj["seq"] = size - 1
        proof = only_own_errors(lambda: InclusionProof.from_json(json.dumps(obj)))
        if proof is not None:
            with watchdog():
                assert not merkle.verify_inclusion(
                    proof.leaf_hash, proof.seq, proof.tree_size, list(proof.path), proof.root
                )


class TestDeepNesting:
    """JSON nested far deeper than the interpreter's recursion limit (once a RecursionError escaped)."""

    DEEP = b"[" * 200_000 + b"]" * 200_000

    def test_checkpoint_line(self) -> None:
        """A checkpoints.jsonl line of deep nesting is a bad line, not an exception."""
        lines, torn = parse_checkpoint_lines(self.DEEP + b"\n")
        assert torn == len(self.DEEP) + 1
        assert len(lines) == 1 and lines[0][1] is None and lines[0][2]

    @pytest.mark.parametrize(
        "parse", [Checkpoint.from_json, InclusionProof.from_json, ConsistencyProof.from_json]
    )
    def test_from_json(self, parse: Callable[[bytes], Any]) -> None:
        """The checkpoint and proof parsers raise MalformedError."""
        with pytest.raises(MalformedError):
            parse(self.DEEP)

    def test_dlq_entry(self) -> None:
        """A parked frame of deep nesting is kept as undecodable bytes, not raised."""
        from quipu_logging._dlq import DLQ_HEADER

        frame = FRAME.pack(len(self.DEEP), zlib.crc32(self.DEEP)) + self.DEEP
        entries, bad = decode_dlq(DLQ_HEADER + frame)
        assert entries == [] and bad == [frame]


# ---------------------------------------------------------------------------- length fields


@contextlib.contextmanager
def allocation_budget(limit: int = ALLOCATION_LIMIT) -> Iterator[None]:
    """Fails if the body's peak Python allocation exceeds ``limit`` bytes."""
    tracemalloc.start()
    try:
        yield
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < limit, f"peak allocation {peak} bytes: a length field drove an allocation"


class TestLengthFields:
    """A 4 GiB (or 16 MiB + 1, or just-allowed 16 MiB) length field in a tiny file allocates nothing big."""

    @pytest.mark.parametrize("length", [FOUR_GIB, 2**31, 16 * 1024 * 1024 + 1, 16 * 1024 * 1024])
    def test_frame_length_in_segment(self, valid: dict[str, Any], tmp_path: Path, length: int) -> None:
        """A segment whose second frame claims ``length`` bytes: readers and verify stay small."""
        data = bytearray(valid["segment"])
        second = 16 + 8 + FRAME.unpack_from(data, 16)[0]
        FRAME.pack_into(data, second, length, 0)
        with allocation_budget(), watchdog():
            scan = scan_frames(bytes(data))
            assert len(scan.frames) == 1 and scan.stop_reason
        root = tmp_path / "store"
        shutil.copytree(valid["root"], root, ignore=shutil.ignore_patterns("LOCK"))
        (root / "log" / "seg-0000000000.log").write_bytes(bytes(data))
        (root / "log" / "seg-0000000000.idx").unlink()
        with allocation_budget(), watchdog(), AuditStore.open_reader(root) as reader:
            report = reader.verify()
            assert not report.ok
            with contextlib.suppress(QuipuError):
                list(reader.scan())

    def test_frame_length_in_active_segment_recovery(self, tmp_path: Path) -> None:
        """A writer recovering a last frame that claims 4 GiB truncates it, allocating little."""
        root = tmp_path / "store"
        with AuditStore.open(root) as store:
            for i in range(5):
                store.append({"i": i})
        # the crash: a frame header claiming 4 GiB, then a few bytes (a torn write) after the last record
        with open(root / "log" / "seg-0000000000.log", "ab") as f:
            f.write(FRAME.pack(FOUR_GIB, 0) + b'{"i":')
        with allocation_budget(), watchdog(), AuditStore.open(root) as store:
            assert store.tree_size == 5
            assert store.verify().ok
            assert [r.payload["i"] for r in store.scan()] == list(range(5))

    def test_dlq_frame_length(self) -> None:
        """A DLQ file whose frame claims 4 GiB decodes as one undecodable run."""
        from quipu_logging._dlq import DLQ_HEADER

        data = DLQ_HEADER + FRAME.pack(FOUR_GIB, zlib.crc32(b"{}")) + b"{}"
        with allocation_budget(), watchdog():
            entries, bad = decode_dlq(data)
        assert entries == [] and b"".join(bad) == data[len(DLQ_HEADER) :]

    def test_sidecar_claims(self, valid: dict[str, Any], tmp_path: Path) -> None:
        """A sidecar (CRC fixed up) claiming a huge length and index offsets is not believed."""
        root = tmp_path / "store"
        shutil.copytree(valid["root"], root, ignore=shutil.ignore_patterns("LOCK"))
        idx = root / "log" / "seg-0000000000.idx"
        body = orjson.loads(idx.read_bytes())
        del body["crc"]
        body["index"] = [[0, FOUR_GIB]]
        body["count"] = FOUR_GIB
        body["crc"] = zlib.crc32(orjson.dumps(body, option=orjson.OPT_SORT_KEYS))
        idx.write_bytes(orjson.dumps(body, option=orjson.OPT_SORT_KEYS))
        with allocation_budget(), watchdog(), AuditStore.open_reader(root) as reader:
            assert reader.verify().ok
            assert len(list(reader.scan())) == 12
