"""Tests of quipu_logging.store.merkle: RFC 6962 / RFC 9162 Merkle trees and proofs."""

from __future__ import annotations

import hashlib
import itertools
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from quipu_logging.store import merkle

VECTORS: dict[str, Any] = json.loads((Path(__file__).parent / "vectors" / "ct_vectors.json").read_text())
H = bytes.fromhex

# Deterministic leaf hashes for the exhaustive tests (enough for size 2 * 64).
LEAVES = [merkle.leaf_hash(i.to_bytes(4, "big")) for i in range(300)]
MAX_EXHAUSTIVE = 64


def naive_root(hashes: list[bytes]) -> bytes:
    """MTH written straight from RFC 6962 §2.1, recursively."""
    n = len(hashes)
    if n == 0:
        return hashlib.sha256(b"").digest()
    if n == 1:
        return hashes[0]
    k = 1
    while k * 2 < n:
        k *= 2
    return hashlib.sha256(b"\x01" + naive_root(hashes[:k]) + naive_root(hashes[k:])).digest()


def flip(data: bytes, pos: int) -> bytes:
    """Return ``data`` with the byte at ``pos`` changed."""
    b = bytearray(data)
    b[pos] ^= 0x5A
    return bytes(b)


def sample_positions(i: int, j: int) -> tuple[int, ...]:
    """A few byte positions to tamper with (first, last, and one that varies)."""
    return (0, 31, (7 * i + 13 * j) % 32)


class TestConstants:
    def test_prefixes(self) -> None:
        """The domain-separation prefixes are the RFC 6962 bytes 0x00 and 0x01."""
        assert merkle.LEAF_PREFIX == b"\x00"
        assert merkle.NODE_PREFIX == b"\x01"

    def test_empty_root(self) -> None:
        """The empty-tree root is SHA-256 of the empty string."""
        assert hashlib.sha256(b"").digest() == merkle.EMPTY_ROOT
        assert merkle.root([]) == merkle.EMPTY_ROOT
        assert merkle.HASH_SIZE == 32

    def test_vectors_comment_names_source(self) -> None:
        """The copied vector file keeps its provenance comment."""
        assert "transparency-dev/merkle" in VECTORS["_comment"]
        assert VECTORS["source_commit"] == "417fb0c314750d94e53942e9f92e79b6d35915db"


class TestLeafAndNodeHash:
    def test_leaf_hash_vectors(self) -> None:
        """leaf_hash matches the CT leaf hashes (level 0 of node_hashes)."""
        for data, want in zip(VECTORS["leaf_inputs"], VECTORS["node_hashes"][0], strict=True):
            assert merkle.leaf_hash(H(data)).hex() == want

    def test_node_hash_levels(self) -> None:
        """node_hash of each pair gives the next level of the CT node_hashes."""
        levels = VECTORS["node_hashes"]
        for lower, upper in itertools.pairwise(levels):
            pairs = [merkle.node_hash(H(lower[i]), H(lower[i + 1])).hex() for i in range(0, len(lower), 2)]
            assert pairs == upper

    def test_definitions(self) -> None:
        """Leaf and node hashes are SHA-256 over the prefixed bytes."""
        assert merkle.leaf_hash(b"abc") == hashlib.sha256(b"\x00abc").digest()
        a, b = b"a" * 32, b"b" * 32
        assert merkle.node_hash(a, b) == hashlib.sha256(b"\x01" + a + b).digest()

    def test_bytes_like_input(self) -> None:
        """leaf_hash accepts bytearray and memoryview like bytes."""
        assert merkle.leaf_hash(bytearray(b"xy")) == merkle.leaf_hash(b"xy")
        assert merkle.leaf_hash(memoryview(b"xy")) == merkle.leaf_hash(b"xy")


class TestRoot:
    def test_root_vectors(self) -> None:
        """root of the first n CT leaves equals the published root for n = 0..8."""
        leaves = [H(h) for h in VECTORS["node_hashes"][0]]
        assert len(VECTORS["roots"]) == 9
        for n, want in enumerate(VECTORS["roots"]):
            assert merkle.root(leaves[:n]).hex() == want

    def test_root_equals_naive_recursive(self) -> None:
        """The iterative root equals the recursive RFC definition for every size 0..300."""
        for n in range(301):
            assert merkle.root(LEAVES[:n]) == naive_root(LEAVES[:n]), n

    def test_root_accepts_iterables(self) -> None:
        """root takes any iterable of leaf hashes, e.g. a generator."""
        assert merkle.root(h for h in LEAVES[:11]) == naive_root(LEAVES[:11])

    def test_single_leaf_root_is_leaf(self) -> None:
        """The root of a one-leaf tree is that leaf's hash."""
        assert merkle.root([LEAVES[5]]) == LEAVES[5]


class TestInclusionVectors:
    @pytest.mark.parametrize(
        "case", VECTORS["inclusion_proofs"], ids=lambda c: f"{c['leaf_index']}-of-{c['tree_size']}"
    )
    def test_builder_and_verifier(self, case: dict[str, Any]) -> None:
        """inclusion_proof reproduces each CT audit path and verify_inclusion accepts it."""
        leaves = [H(h) for h in VECTORS["node_hashes"][0]]
        n, i = case["tree_size"], case["leaf_index"]
        proof = merkle.inclusion_proof(leaves[:n], i)
        assert [p.hex() for p in proof] == case["path"]
        assert merkle.verify_inclusion(leaves[i], i, n, proof, H(VECTORS["roots"][n]))


class TestConsistencyVectors:
    @pytest.mark.parametrize(
        "case", VECTORS["consistency_proofs"], ids=lambda c: f"{c['old_size']}-to-{c['new_size']}"
    )
    def test_builder_and_verifier(self, case: dict[str, Any]) -> None:
        """consistency_proof reproduces each CT proof and verify_consistency accepts it."""
        leaves = [H(h) for h in VECTORS["node_hashes"][0]]
        old, new = case["old_size"], case["new_size"]
        proof = merkle.consistency_proof(leaves[:new], old)
        assert [p.hex() for p in proof] == case["path"]
        roots = VECTORS["roots"]
        assert merkle.verify_consistency(old, new, H(roots[old]), H(roots[new]), proof)


class TestProbeCases:
    def test_probe_files_present(self) -> None:
        """Both probe sets are present, with valid and invalid cases."""
        for key in ("inclusion_cases", "consistency_cases"):
            valid = [c["valid"] for c in VECTORS[key]]
            assert len(valid) == 98 and any(valid) and not all(valid)

    @pytest.mark.parametrize(
        "case", VECTORS["inclusion_cases"], ids=lambda c: c["file"].split("inclusion/")[1]
    )
    def test_inclusion_case(self, case: dict[str, Any]) -> None:
        """verify_inclusion agrees with the `valid` flag of every CT inclusion probe file."""
        got = merkle.verify_inclusion(
            H(case["leaf_hash"]),
            case["leaf_index"],
            case["tree_size"],
            [H(p) for p in case["proof"]],
            H(case["root"]),
        )
        assert got is case["valid"]

    @pytest.mark.parametrize(
        "case", VECTORS["consistency_cases"], ids=lambda c: c["file"].split("consistency/")[1]
    )
    def test_consistency_case(self, case: dict[str, Any]) -> None:
        """verify_consistency agrees with the `valid` flag of every CT consistency probe file."""
        got = merkle.verify_consistency(
            case["old_size"],
            case["new_size"],
            H(case["old_root"]),
            H(case["new_root"]),
            [H(p) for p in case["proof"]],
        )
        assert got is case["valid"]


class TestInclusionExhaustive:
    def test_every_proof_verifies(self) -> None:
        """Every inclusion proof verifies for every (index, size) up to 64 leaves."""
        for n in range(1, MAX_EXHAUSTIVE + 1):
            r = merkle.root(LEAVES[:n])
            for i in range(n):
                proof = merkle.inclusion_proof(LEAVES[:n], i)
                assert merkle.verify_inclusion(LEAVES[i], i, n, proof, r), (i, n)

    def test_tampering_fails(self) -> None:
        """Changing a byte of the leaf hash, of any proof element or of the root makes it fail."""
        for n in range(1, MAX_EXHAUSTIVE + 1):
            r = merkle.root(LEAVES[:n])
            for i in range(n):
                proof = merkle.inclusion_proof(LEAVES[:n], i)
                for pos in sample_positions(i, n):
                    assert not merkle.verify_inclusion(flip(LEAVES[i], pos), i, n, proof, r)
                    assert not merkle.verify_inclusion(LEAVES[i], i, n, proof, flip(r, pos))
                    for k in range(len(proof)):
                        bad = [*proof[:k], flip(proof[k], pos), *proof[k + 1 :]]
                        assert not merkle.verify_inclusion(LEAVES[i], i, n, bad, r), (i, n, k, pos)

    def test_every_byte_of_one_proof(self) -> None:
        """Every single byte of a deep proof, its leaf and its root matters."""
        n, i = 45, 37
        r = merkle.root(LEAVES[:n])
        proof = merkle.inclusion_proof(LEAVES[:n], i)
        for pos in range(32):
            assert not merkle.verify_inclusion(flip(LEAVES[i], pos), i, n, proof, r)
            assert not merkle.verify_inclusion(LEAVES[i], i, n, proof, flip(r, pos))
            for k in range(len(proof)):
                bad = [*proof[:k], flip(proof[k], pos), *proof[k + 1 :]]
                assert not merkle.verify_inclusion(LEAVES[i], i, n, bad, r)

    def test_dropped_or_appended_element_fails(self) -> None:
        """Removing any proof element, or adding one anywhere, makes the proof fail."""
        for n in range(1, MAX_EXHAUSTIVE + 1):
            r = merkle.root(LEAVES[:n])
            for i in range(n):
                proof = merkle.inclusion_proof(LEAVES[:n], i)
                for k in range(len(proof)):
                    assert not merkle.verify_inclusion(LEAVES[i], i, n, proof[:k] + proof[k + 1 :], r)
                for extra in (r, LEAVES[i], b"\x00" * 32):
                    assert not merkle.verify_inclusion(LEAVES[i], i, n, [*proof, extra], r)
                    assert not merkle.verify_inclusion(LEAVES[i], i, n, [extra, *proof], r)

    def test_wrong_index_fails(self) -> None:
        """A proof never verifies for any other index of the same tree."""
        for n in range(1, MAX_EXHAUSTIVE + 1):
            r = merkle.root(LEAVES[:n])
            for i in range(n):
                proof = merkle.inclusion_proof(LEAVES[:n], i)
                for j in range(-1, n + 2):
                    if j != i:
                        assert not merkle.verify_inclusion(LEAVES[i], j, n, proof, r), (i, j, n)

    def test_wrong_size_fails(self) -> None:
        """A proof fails for impossible, double and half sizes, and for any size of another shape."""
        for n in range(1, MAX_EXHAUSTIVE + 1):
            r = merkle.root(LEAVES[:n])
            for i in range(n):
                proof = merkle.inclusion_proof(LEAVES[:n], i)
                for s in (-1, 0, i, 2 * n, n // 2):
                    if s != n:
                        assert not merkle.verify_inclusion(LEAVES[i], i, s, proof, r), (i, n, s)
                for s in range(i + 1, 2 * n + 2):
                    if s != n and merkle.verify_inclusion(LEAVES[i], i, s, proof, r):
                        # RFC 9162 binds the size only through the path's shape: a
                        # different size can verify only if its audit path has the same shape.
                        assert len(merkle.inclusion_proof(LEAVES[:s], i)) == len(proof)

    def test_leaf_of_another_position_fails(self) -> None:
        """A proof for leaf i does not verify another leaf's hash at i."""
        n = 20
        r = merkle.root(LEAVES[:n])
        for i in range(n):
            proof = merkle.inclusion_proof(LEAVES[:n], i)
            assert not merkle.verify_inclusion(LEAVES[(i + 1) % n], i, n, proof, r)


class TestConsistencyExhaustive:
    def test_every_proof_verifies(self) -> None:
        """Every consistency proof verifies for every (old, new) pair up to 64 leaves."""
        roots = [merkle.root(LEAVES[:n]) for n in range(MAX_EXHAUSTIVE + 1)]
        for new in range(MAX_EXHAUSTIVE + 1):
            for old in range(new + 1):
                proof = merkle.consistency_proof(LEAVES[:new], old)
                assert merkle.verify_consistency(old, new, roots[old], roots[new], proof), (old, new)
                if old == 0 or old == new:
                    assert proof == []

    def test_tampering_fails(self) -> None:
        """Changing a byte of either root or of any proof element makes it fail (old >= 1)."""
        roots = [merkle.root(LEAVES[:n]) for n in range(MAX_EXHAUSTIVE + 1)]
        for new in range(1, MAX_EXHAUSTIVE + 1):
            for old in range(1, new + 1):
                proof = merkle.consistency_proof(LEAVES[:new], old)
                for pos in sample_positions(old, new):
                    assert not merkle.verify_consistency(old, new, flip(roots[old], pos), roots[new], proof)
                    assert not merkle.verify_consistency(old, new, roots[old], flip(roots[new], pos), proof)
                    for k in range(len(proof)):
                        bad = [*proof[:k], flip(proof[k], pos), *proof[k + 1 :]]
                        assert not merkle.verify_consistency(old, new, roots[old], roots[new], bad)

    def test_dropped_or_appended_element_fails(self) -> None:
        """Removing any proof element, or adding one at either end, makes the proof fail."""
        roots = [merkle.root(LEAVES[:n]) for n in range(MAX_EXHAUSTIVE + 1)]
        for new in range(MAX_EXHAUSTIVE + 1):
            for old in range(new + 1):
                proof = merkle.consistency_proof(LEAVES[:new], old)
                ro, rn = roots[old], roots[new]
                for k in range(len(proof)):
                    assert not merkle.verify_consistency(old, new, ro, rn, proof[:k] + proof[k + 1 :])
                for extra in (ro, rn, b"\x00" * 32):
                    assert not merkle.verify_consistency(old, new, ro, rn, [*proof, extra])
                    assert not merkle.verify_consistency(old, new, ro, rn, [extra, *proof])

    def test_wrong_sizes_fail(self) -> None:
        """A proof fails for any other old size, and for a new size of another shape."""
        leaves = LEAVES[: 2 * MAX_EXHAUSTIVE + 2]
        roots = [merkle.root(leaves[:n]) for n in range(len(leaves) + 1)]
        for new in range(1, MAX_EXHAUSTIVE + 1):
            for old in range(1, new + 1):
                proof = merkle.consistency_proof(leaves[:new], old)
                ro, rn = roots[old], roots[new]
                for o in range(-1, new + 2):
                    if o != old:
                        assert not merkle.verify_consistency(o, new, ro, rn, proof), (old, new, o)
                for s in (-1, 0, old - 1, 2 * new, new // 2):
                    if s != new:
                        assert not merkle.verify_consistency(old, s, ro, rn, proof), (old, new, s)
                for s in range(old, 2 * new + 2):
                    if s != new and merkle.verify_consistency(old, s, ro, rn, proof):
                        assert len(merkle.consistency_proof(leaves[:s], old)) == len(proof)

    def test_swapped_roots_fail(self) -> None:
        """Swapping the old and new roots makes a proof fail."""
        roots = [merkle.root(LEAVES[:n]) for n in range(MAX_EXHAUSTIVE + 1)]
        for new in range(2, MAX_EXHAUSTIVE + 1):
            for old in range(1, new):
                proof = merkle.consistency_proof(LEAVES[:new], old)
                assert not merkle.verify_consistency(old, new, roots[new], roots[old], proof)

    def test_divergent_history_fails(self) -> None:
        """A new tree that rewrote an old leaf is not consistent with the old root."""
        for new in range(2, 40):
            for old in range(1, new):
                forked = list(LEAVES[:new])
                forked[old - 1] = merkle.leaf_hash(b"rewritten")
                proof = merkle.consistency_proof(forked, old)
                assert not merkle.verify_consistency(
                    old, new, merkle.root(LEAVES[:old]), merkle.root(forked), proof
                )


class TestEdgeCases:
    def test_equal_sizes(self) -> None:
        """old == new is valid only with an empty proof and equal roots."""
        r = merkle.root(LEAVES[:5])
        assert merkle.verify_consistency(5, 5, r, r, [])
        assert not merkle.verify_consistency(5, 5, r, merkle.root(LEAVES[:4]), [])
        assert not merkle.verify_consistency(5, 5, r, r, [r])

    def test_equal_sizes_zero(self) -> None:
        """0 -> 0 is valid only with an empty proof and both roots the empty-tree root."""
        e = merkle.EMPTY_ROOT
        assert merkle.verify_consistency(0, 0, e, e, [])
        assert not merkle.verify_consistency(0, 0, e, e, [e])
        assert not merkle.verify_consistency(0, 0, LEAVES[0], LEAVES[0], [])

    def test_from_empty_tree(self) -> None:
        """0 -> n is valid with an empty proof and the empty-tree old root, and only then."""
        r = merkle.root(LEAVES[:7])
        e = merkle.EMPTY_ROOT
        assert merkle.verify_consistency(0, 7, e, r, [])
        assert merkle.verify_consistency(0, 7, e, LEAVES[3], [])  # nothing binds the new root
        assert not merkle.verify_consistency(0, 7, e, r, [r])
        assert not merkle.verify_consistency(0, 7, LEAVES[0], r, [])
        assert not merkle.verify_consistency(0, 7, e, r[:12], [])

    def test_builders_reject_impossible_input(self) -> None:
        """The proof builders raise ValueError for impossible indices and sizes."""
        leaves = LEAVES[:5]
        for bad_index in (-1, 5, 6, 2**64):
            with pytest.raises(ValueError):
                merkle.inclusion_proof(leaves, bad_index)
        with pytest.raises(ValueError):
            merkle.inclusion_proof([], 0)
        for bad_old in (-1, 6, 2**64):
            with pytest.raises(ValueError):
                merkle.consistency_proof(leaves, bad_old)
        with pytest.raises(ValueError):
            merkle.inclusion_proof(leaves, 1.0)  # type: ignore[arg-type]

    def test_path_helpers_reject_impossible_input(self) -> None:
        """The callback-based helpers validate like the list-based builders."""
        with pytest.raises(ValueError):
            merkle._inclusion_path(3, 3, lambda s, e: b"")
        with pytest.raises(ValueError):
            merkle._consistency_path(4, 3, lambda s, e: b"")
        with pytest.raises(ValueError):
            merkle._consistency_path(-1, 3, lambda s, e: b"")

    def test_verifiers_never_raise(self) -> None:
        """The verifiers return False, never raise, for nonsense arguments."""
        r = merkle.root(LEAVES[:4])
        proof = merkle.inclusion_proof(LEAVES[:4], 1)
        weird: list[Any] = [None, "x", 1.5, -1, 2**70, True, [], object()]
        for w in weird:
            assert merkle.verify_inclusion(w, 1, 4, proof, r) is False
            assert merkle.verify_inclusion(LEAVES[1], w, 4, proof, r) is False
            assert merkle.verify_inclusion(LEAVES[1], 1, w, proof, r) is False
            assert merkle.verify_inclusion(LEAVES[1], 1, 4, [w, *proof[1:]], r) is False
            assert merkle.verify_inclusion(LEAVES[1], 1, 4, proof, w) is False
            assert merkle.verify_consistency(w, 4, r, r, []) is False
            assert merkle.verify_consistency(2, w, r, r, []) is False
            assert merkle.verify_consistency(2, 4, w, r, [r]) is False
            assert merkle.verify_consistency(2, 4, r, w, [r]) is False
            assert merkle.verify_consistency(2, 4, r, r, [w]) is False
        assert merkle.verify_inclusion(LEAVES[1], 1, 4, None, r) is False  # type: ignore[arg-type]
        assert merkle.verify_consistency(2, 4, r, r, None) is False  # type: ignore[arg-type]

    def test_wrong_hash_lengths_fail(self) -> None:
        """Hashes of the wrong length fail verification instead of raising."""
        r = merkle.root(LEAVES[:6])
        proof = merkle.inclusion_proof(LEAVES[:6], 2)
        assert merkle.verify_inclusion(LEAVES[2], 2, 6, proof, r)
        assert not merkle.verify_inclusion(LEAVES[2][:31], 2, 6, proof, r)
        assert not merkle.verify_inclusion(LEAVES[2], 2, 6, proof, r + b"\x00")
        assert not merkle.verify_inclusion(LEAVES[2], 2, 6, [proof[0] + b"\x00", *proof[1:]], r)
        cproof = merkle.consistency_proof(LEAVES[:6], 3)
        r3 = merkle.root(LEAVES[:3])
        assert merkle.verify_consistency(3, 6, r3, r, cproof)
        assert not merkle.verify_consistency(3, 6, r3[:31], r, cproof)
        assert not merkle.verify_consistency(3, 6, r3, r, [cproof[0][:31], *cproof[1:]])

    def test_bytearray_hashes_accepted(self) -> None:
        """bytearray hashes verify like bytes."""
        r = merkle.root(LEAVES[:6])
        proof = [bytearray(p) for p in merkle.inclusion_proof(LEAVES[:6], 4)]
        assert merkle.verify_inclusion(bytearray(LEAVES[4]), 4, 6, proof, bytearray(r))


class TestProperties:
    @settings(max_examples=150, deadline=None)
    @given(st.integers(min_value=1, max_value=2000), st.data())
    def test_inclusion_roundtrip(self, size: int, data: st.DataObject) -> None:
        """For random sizes, a built inclusion proof verifies and a flipped byte breaks it."""
        leaves = [merkle.leaf_hash(b"p%d" % i) for i in range(size)]
        index = data.draw(st.integers(min_value=0, max_value=size - 1))
        r = merkle.root(leaves)
        proof = merkle.inclusion_proof(leaves, index)
        assert len(proof) <= max(1, size - 1).bit_length()
        assert merkle.verify_inclusion(leaves[index], index, size, proof, r)
        pos = data.draw(st.integers(min_value=0, max_value=31))
        assert not merkle.verify_inclusion(flip(leaves[index], pos), index, size, proof, r)
        if proof:
            k = data.draw(st.integers(min_value=0, max_value=len(proof) - 1))
            bad = [*proof[:k], flip(proof[k], pos), *proof[k + 1 :]]
            assert not merkle.verify_inclusion(leaves[index], index, size, bad, r)

    @settings(max_examples=150, deadline=None)
    @given(st.integers(min_value=0, max_value=2000), st.data())
    def test_consistency_roundtrip(self, new: int, data: st.DataObject) -> None:
        """For random sizes, a built consistency proof verifies and a flipped byte breaks it."""
        leaves = [merkle.leaf_hash(b"q%d" % i) for i in range(new)]
        old = data.draw(st.integers(min_value=0, max_value=new))
        ro, rn = merkle.root(leaves[:old]), merkle.root(leaves)
        proof = merkle.consistency_proof(leaves, old)
        assert len(proof) <= 2 * max(1, new).bit_length()
        assert merkle.verify_consistency(old, new, ro, rn, proof)
        if old > 0:
            pos = data.draw(st.integers(min_value=0, max_value=31))
            assert not merkle.verify_consistency(old, new, flip(ro, pos), rn, proof)
            assert not merkle.verify_consistency(old, new, ro, flip(rn, pos), proof)
            if proof:
                k = data.draw(st.integers(min_value=0, max_value=len(proof) - 1))
                bad = [*proof[:k], flip(proof[k], pos), *proof[k + 1 :]]
                assert not merkle.verify_consistency(old, new, ro, rn, bad)

    @settings(max_examples=100, deadline=None)
    @given(st.lists(st.binary(max_size=40), max_size=80))
    def test_root_matches_naive(self, datas: list[bytes]) -> None:
        """For random leaf data, the iterative root equals the recursive definition."""
        hashes = [merkle.leaf_hash(d) for d in datas]
        assert merkle.root(hashes) == naive_root(hashes)

    @settings(max_examples=100, deadline=None)
    @given(st.integers(min_value=0, max_value=10**12), st.integers(min_value=0, max_value=10**12))
    def test_path_sizes_are_logarithmic(self, a: int, b: int) -> None:
        """For huge trees the proofs ask for O(log n) subtree hashes, never recursing."""
        old, new = min(a, b), max(a, b)
        calls: list[tuple[int, int]] = []

        def subtree_hash(start: int, end: int) -> bytes:
            calls.append((start, end))
            assert 0 <= start < end <= new
            return b"\x00" * 32

        merkle._consistency_path(old, new, subtree_hash)
        assert len(calls) <= 2 * new.bit_length() + 1
        if new:
            calls.clear()
            merkle._inclusion_path(old if old < new else new - 1, new, subtree_hash)
            assert len(calls) <= new.bit_length()
