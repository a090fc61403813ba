"""Merkle history trees: pure functions over bytes (RFC 6962 §2.1, RFC 9162 §2.1).

This module implements the Merkle Tree Hash (MTH), audit (inclusion) paths and
consistency proofs of a Certificate Transparency log, with SHA-256 and the
domain-separation prefixes of the RFCs:

* RFC 6962, "Certificate Transparency", §2.1 (https://www.rfc-editor.org/rfc/rfc6962#section-2.1):
  the tree hash, ``PATH(m, D[n])`` and ``PROOF(m, D[n])`` / ``SUBPROOF``.
* RFC 9162, "Certificate Transparency Version 2.0", §2.1
  (https://www.rfc-editor.org/rfc/rfc9162#section-2.1): the same tree, plus the
  verification algorithms of §2.1.3.2 (inclusion) and §2.1.4.2 (consistency),
  which :func:`verify_inclusion` and :func:`verify_consistency` follow step by
  step, final checks included (``sn == 0`` at the end of both, and both
  recomputed roots compared in a consistency proof).

Definitions (``||`` is concatenation, ``H`` is SHA-256)::

    leaf hash     H(0x00 || data)
    node hash     H(0x01 || left || right)
    MTH({})       H("")                       (the empty tree)
    MTH(D[n])     H(0x01 || MTH(D[0:k]) || MTH(D[k:n])),  k = largest power of 2 < n

Everything is bytes in, bytes out; leaf indices and tree sizes count from 0
and from 1 as in the RFCs (a tree of size ``n`` holds leaves ``0 .. n-1``).

Edge cases (not covered by the RFC algorithms, which assume ``0 < m < n``):

* the root of the empty tree is ``SHA-256(b"")`` (:data:`EMPTY_ROOT`);
* a consistency proof from ``old_size == new_size`` is the empty list and
  verifies only when the two roots are equal: byte for byte, whatever their
  length, for a non-empty tree (proving nothing beyond equality; the
  Certificate Transparency probe vectors accept equal 12-byte roots there),
  and both :data:`EMPTY_ROOT` for size 0;
* a consistency proof from ``old_size == 0`` is the empty list: every tree
  extends the empty one; it verifies when ``old_root`` is :data:`EMPTY_ROOT`
  (the only root a tree of size 0 has) and ``new_root`` is a 32-byte hash;
* the ``verify_*`` functions return ``False`` and never raise, whatever they are
  given (impossible sizes or indices, hashes of the wrong length other than in
  the equal-sizes case above, non-bytes);
* the proof builders raise :class:`ValueError` for impossible input.

The proof algorithms are also available as ``_inclusion_path`` and
``_consistency_path``, which take a ``subtree_hash(start, end)`` callback
instead of a list of leaves, so that a store holding the hashes of complete
subtrees on disk (the spine) can build proofs reading O(log n) hashes. All
algorithms here are iterative; none recurses.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence

__all__ = [
    "EMPTY_ROOT",
    "HASH_SIZE",
    "LEAF_PREFIX",
    "NODE_PREFIX",
    "consistency_proof",
    "inclusion_proof",
    "leaf_hash",
    "node_hash",
    "root",
    "verify_consistency",
    "verify_inclusion",
]

#: Domain-separation prefix of a leaf hash (RFC 6962 §2.1: ``MTH({d(0)}) = SHA-256(0x00 || d(0))``).
LEAF_PREFIX = b"\x00"
#: Domain-separation prefix of an interior node hash (RFC 6962 §2.1: ``SHA-256(0x01 || left || right)``).
NODE_PREFIX = b"\x01"
#: Length in bytes of every hash (SHA-256).
HASH_SIZE = 32
#: The root of the empty tree: ``SHA-256(b"")``.
EMPTY_ROOT = hashlib.sha256(b"").digest()

_sha256 = hashlib.sha256

#: ``subtree_hash(start, end)`` returns MTH of the leaves ``[start, end)``.
SubtreeHash = Callable[[int, int], bytes]
#: What the hashing functions accept as data.
BytesLike = bytes | bytearray | memoryview
#: What the verifiers accept as a hash (anything else, or another length, fails verification).
HashLike = bytes | bytearray


def leaf_hash(data: BytesLike) -> bytes:
    """Hash one leaf's data: ``SHA-256(0x00 || data)``.

    Args:
        data: the leaf's bytes (any bytes-like object).

    Returns:
        The 32-byte leaf hash.
    """
    return _sha256(LEAF_PREFIX + bytes(data)).digest()


def node_hash(left: BytesLike, right: BytesLike) -> bytes:
    """Hash two children into their parent: ``SHA-256(0x01 || left || right)``.

    Args:
        left: the left child's hash.
        right: the right child's hash.

    Returns:
        The 32-byte node hash.
    """
    return _sha256(NODE_PREFIX + bytes(left) + bytes(right)).digest()


def root(leaf_hashes: Iterable[BytesLike]) -> bytes:
    """Compute the Merkle Tree Hash of a list of leaf hashes, level by level.

    Pairs are hashed left to right on each level and an odd last node is carried
    up unchanged; this gives exactly the RFC 6962 tree, whose left subtree is
    always the largest power of two smaller than the size.

    Args:
        leaf_hashes: the leaf hashes (as returned by :func:`leaf_hash`), in order.

    Returns:
        The 32-byte root; :data:`EMPTY_ROOT` for no leaves, the leaf hash itself
        for one leaf.
    """
    level = [bytes(h) for h in leaf_hashes]
    if not level:
        return EMPTY_ROOT
    sha = _sha256
    prefix = NODE_PREFIX
    while len(level) > 1:
        odd = len(level) & 1
        nxt = [sha(prefix + level[i] + level[i + 1]).digest() for i in range(0, len(level) - 1, 2)]
        if odd:
            nxt.append(level[-1])
        level = nxt
    return level[0]


def _split(n: int) -> int:
    """The largest power of two strictly smaller than ``n`` (``n >= 2``)."""
    return 1 << ((n - 1).bit_length() - 1)


def _inclusion_ranges(index: int, size: int) -> list[tuple[int, int]]:
    """The leaf ranges ``[start, end)`` whose hashes form ``PATH(index, D[size])``.

    Follows RFC 6962 §2.1.1 iteratively: descending from the root, the sibling of
    the subtree holding ``index`` is collected at each level; the path lists
    them from the leaf upwards.

    Raises:
        ValueError: unless ``0 <= index < size``.
    """
    _check_int("index", index)
    _check_int("size", size)
    if index < 0 or index >= size:
        raise ValueError(f"leaf index {index} is not in a tree of size {size}")
    ranges: list[tuple[int, int]] = []
    start, end = 0, size
    while end - start > 1:
        k = _split(end - start)
        mid = start + k
        if index < mid:
            ranges.append((mid, end))
            end = mid
        else:
            ranges.append((start, mid))
            start = mid
    ranges.reverse()
    return ranges


def _consistency_ranges(old_size: int, new_size: int) -> list[tuple[int, int]]:
    """The leaf ranges ``[start, end)`` whose hashes form ``PROOF(old_size, D[new_size])``.

    Follows ``SUBPROOF(m, D[n], b)`` of RFC 6962 §2.1.2 iteratively. The empty
    list when ``old_size`` is 0 or equals ``new_size``.

    Raises:
        ValueError: unless ``0 <= old_size <= new_size``.
    """
    _check_int("old_size", old_size)
    _check_int("new_size", new_size)
    if old_size < 0 or new_size < 0:
        raise ValueError(f"tree sizes must not be negative (old {old_size}, new {new_size})")
    if old_size > new_size:
        raise ValueError(f"old size {old_size} is larger than new size {new_size}")
    if old_size == 0 or old_size == new_size:
        return []
    ranges: list[tuple[int, int]] = []
    start, end, m = 0, new_size, old_size
    whole_old_tree = True  # the flag b of SUBPROOF: is D[start:start+m] the entire old tree?
    while True:
        n = end - start
        if m == n:
            if not whole_old_tree:
                ranges.append((start, end))
            break
        k = _split(n)
        if m <= k:
            ranges.append((start + k, end))
            end = start + k
        else:
            ranges.append((start, start + k))
            start += k
            m -= k
            whole_old_tree = False
    ranges.reverse()
    return ranges


def _inclusion_path(index: int, size: int, subtree_hash: SubtreeHash) -> list[bytes]:
    """Build the audit path of leaf ``index`` in the tree of ``size`` leaves.

    Args:
        index: the leaf, from 0.
        size: the tree size.
        subtree_hash: returns MTH of leaves ``[start, end)``; called O(log size) times,
            only for ranges that start at a multiple of a power of two at least as
            large as the range.

    Returns:
        The path, from the leaf's sibling up to the root's child.

    Raises:
        ValueError: unless ``0 <= index < size``.
    """
    return [subtree_hash(s, e) for s, e in _inclusion_ranges(index, size)]


def _consistency_path(old_size: int, new_size: int, subtree_hash: SubtreeHash) -> list[bytes]:
    """Build the consistency proof from the tree of ``old_size`` leaves to ``new_size`` leaves.

    Args:
        old_size: the earlier tree size.
        new_size: the later tree size.
        subtree_hash: as for :func:`_inclusion_path`.

    Returns:
        The proof (empty when ``old_size`` is 0 or equals ``new_size``).

    Raises:
        ValueError: unless ``0 <= old_size <= new_size``.
    """
    return [subtree_hash(s, e) for s, e in _consistency_ranges(old_size, new_size)]


def _list_subtree_hash(leaf_hashes: Sequence[bytes]) -> SubtreeHash:
    def subtree_hash(start: int, end: int) -> bytes:
        return root(leaf_hashes[start:end])

    return subtree_hash


def inclusion_proof(leaf_hashes: Sequence[bytes], index: int) -> list[bytes]:
    """Build the inclusion proof (audit path) of one leaf in the tree of all ``leaf_hashes``.

    Args:
        leaf_hashes: every leaf hash of the tree, in order; the tree size is their number.
        index: the leaf, from 0.

    Returns:
        The audit path ``PATH(index, D[n])`` of RFC 6962 §2.1.1, leaf side first.

    Raises:
        ValueError: when ``index`` is negative or not smaller than the tree size.
    """
    leaves = list(leaf_hashes)
    return _inclusion_path(index, len(leaves), _list_subtree_hash(leaves))


def consistency_proof(leaf_hashes: Sequence[bytes], old_size: int) -> list[bytes]:
    """Build the consistency proof from the first ``old_size`` leaves to all of ``leaf_hashes``.

    Args:
        leaf_hashes: every leaf hash of the new tree, in order; the new size is their number.
        old_size: the size of the earlier tree (a prefix of the new one).

    Returns:
        ``PROOF(old_size, D[n])`` of RFC 6962 §2.1.2; the empty list when
        ``old_size`` is 0 or equals the new size.

    Raises:
        ValueError: when ``old_size`` is negative or larger than the new size.
    """
    leaves = list(leaf_hashes)
    return _consistency_path(old_size, len(leaves), _list_subtree_hash(leaves))


def verify_inclusion(
    leaf_hash: HashLike, index: int, tree_size: int, proof: Sequence[HashLike], root: HashLike
) -> bool:
    """Verify an inclusion proof, following RFC 9162 §2.1.3.2 exactly.

    Args:
        leaf_hash: the 32-byte hash of the leaf claimed to be included.
        index: the leaf's index, from 0.
        tree_size: the size of the tree whose root is ``root``.
        proof: the audit path, leaf side first.
        root: the 32-byte root of the tree of ``tree_size`` leaves.

    Returns:
        True when the proof shows the leaf at ``index`` in that tree; False
        otherwise, including for an impossible index or size, a hash of the
        wrong length, or arguments of the wrong type. Never raises.
    """
    try:
        if not (_is_size(index) and _is_size(tree_size)):
            return False
        if not (_is_hash(leaf_hash) and _is_hash(root)):
            return False
        path = list(proof)
        if not all(_is_hash(p) for p in path):
            return False
        # Step 1: the index must lie inside the tree.
        if index >= tree_size:
            return False
        # Step 2, 3.
        fn, sn = index, tree_size - 1
        r = bytes(leaf_hash)
        sha, prefix = _sha256, NODE_PREFIX
        # Step 4.
        for p in path:
            if sn == 0:
                return False
            if fn & 1 or fn == sn:
                r = sha(prefix + bytes(p) + r).digest()
                if not fn & 1:
                    while not fn & 1 and fn != 0:
                        fn >>= 1
                        sn >>= 1
            else:
                r = sha(prefix + r + bytes(p)).digest()
            fn >>= 1
            sn >>= 1
        # Step 5: sn must be 0 and the recomputed root must match.
        return sn == 0 and r == bytes(root)
    except Exception:  # pragma: no cover - defensive: "never raises"
        return False


def verify_consistency(
    old_size: int, new_size: int, old_root: HashLike, new_root: HashLike, proof: Sequence[HashLike]
) -> bool:
    """Verify a consistency proof, following RFC 9162 §2.1.4.2 exactly.

    Cases outside the RFC's ``0 < old_size < new_size``: equal sizes verify only
    with an empty proof and equal roots (both :data:`EMPTY_ROOT` for size 0);
    ``old_size == 0`` verifies only with an empty proof, ``old_root`` equal to
    :data:`EMPTY_ROOT` (the root of every empty tree) and a 32-byte ``new_root``.
    These are the design's edge cases made to agree with the CT probe vectors,
    which reject a size-0 tree whose root is not the empty root.

    Args:
        old_size: the earlier tree size.
        new_size: the later tree size.
        old_root: the root of the earlier tree.
        new_root: the root of the later tree.
        proof: the consistency proof.

    Returns:
        True when the proof shows that the tree of ``old_size`` leaves with
        ``old_root`` is a prefix of the tree of ``new_size`` leaves with
        ``new_root``; False otherwise, including for impossible sizes, hashes of
        the wrong length, or arguments of the wrong type. Never raises.
    """
    try:
        if not (_is_size(old_size) and _is_size(new_size)):
            return False
        if old_size > new_size:
            return False
        if not (_is_bytes(old_root) and _is_bytes(new_root)):
            return False
        path = list(proof)
        if old_size == new_size:
            # Nothing to prove beyond equality. For a non-empty tree the roots are
            # compared as given (the CT probe vectors accept any equal roots there);
            # the empty tree has exactly one root.
            if path or bytes(old_root) != bytes(new_root):
                return False
            return old_size != 0 or bytes(old_root) == EMPTY_ROOT
        if not (_is_hash(old_root) and _is_hash(new_root)):
            return False
        if not all(_is_hash(p) for p in path):
            return False
        if old_size == 0:
            # Every tree extends the empty tree, whose root is fixed; the proof must be empty.
            return not path and bytes(old_root) == EMPTY_ROOT
        # Step 1.
        if not path:
            return False
        hashes = [bytes(p) for p in path]
        # Step 2.
        if old_size & (old_size - 1) == 0:
            hashes.insert(0, bytes(old_root))
        # Step 3.
        fn, sn = old_size - 1, new_size - 1
        # Step 4.
        while fn & 1:
            fn >>= 1
            sn >>= 1
        # Step 5.
        fr = sr = hashes[0]
        sha, prefix = _sha256, NODE_PREFIX
        # Step 6.
        for c in hashes[1:]:
            if sn == 0:
                return False
            if fn & 1 or fn == sn:
                fr = sha(prefix + c + fr).digest()
                sr = sha(prefix + c + sr).digest()
                if not fn & 1:
                    while not fn & 1 and fn != 0:
                        fn >>= 1
                        sn >>= 1
            else:
                sr = sha(prefix + sr + c).digest()
            fn >>= 1
            sn >>= 1
        # Step 7: both roots recomputed, and sn must be 0.
        return fr == bytes(old_root) and sr == bytes(new_root) and sn == 0
    except Exception:  # pragma: no cover - defensive: "never raises"
        return False


def _is_size(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_bytes(value: object) -> bool:
    return isinstance(value, (bytes, bytearray))


def _is_hash(value: object) -> bool:
    return isinstance(value, (bytes, bytearray)) and len(value) == HASH_SIZE


def _check_int(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{name} must be an int, not {type(value).__name__}")
