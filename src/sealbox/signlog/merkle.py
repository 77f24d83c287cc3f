"""RFC 9162 (Certificate Transparency v2, section 2.1) Merkle tree hashing and proofs.

Leaves hash as ``SHA-256(0x00 || entry)``, interior nodes as ``SHA-256(0x01 || left || right)``;
a tree of ``n`` leaves splits at the largest power of two below ``n``. :class:`Tree` holds
every perfect subtree's hash (``levels[k][i]`` covers leaves ``i*2^k .. (i+1)*2^k - 1``), so
appending costs O(1) amortised and a root or a proof O(log^2 n) hashes at worst. The
verification functions are the RFC's algorithms (2.1.3.2 and 2.1.4.2), written apart from
the proof generation so that one cannot hide a mistake of the other.

Why not a library: the maintained one on PyPI (pymerkle) numbers leaves from 1, uses its own
proof encoding, keeps its own copy of every entry and is GPL-3.0; this is the RFC's
algorithms and nothing else, checked against its published test vectors.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

HASH_SIZE = 32


class ProofError(ValueError):
    """A proof does not verify (or is malformed for the sizes it claims)."""


def leaf_hash(entry: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + entry).digest()


def node_hash(left: bytes | bytearray, right: bytes | bytearray) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


EMPTY_ROOT = hashlib.sha256(b"").digest()


def _split(n: int) -> int:
    """The largest power of two strictly below ``n`` (n > 1)."""
    return 1 << ((n - 1).bit_length() - 1)


class Tree:
    """An append-only Merkle tree over leaf hashes."""

    def __init__(self) -> None:
        self.levels: list[bytearray] = [bytearray()]
        self.size = 0

    def append(self, leaf: bytes) -> int:
        """Add a leaf hash; returns its index."""
        index = self.size
        self.levels[0] += leaf
        self.size += 1
        level, n = 0, self.size
        while n % 2 == 0:  # a perfect subtree completed: hash it into the level above
            row = self.levels[level]
            if level + 1 == len(self.levels):
                self.levels.append(bytearray())
            self.levels[level + 1] += node_hash(row[-2 * HASH_SIZE : -HASH_SIZE], row[-HASH_SIZE:])
            level, n = level + 1, n // 2
        return index

    def leaf(self, index: int) -> bytes:
        return bytes(self.levels[0][index * HASH_SIZE : (index + 1) * HASH_SIZE])

    def _hash(self, start: int, end: int) -> bytes:
        """MTH of leaves ``start .. end - 1``; ``start`` is aligned to the largest power of
        two not above ``end - start``, as every subtree the RFC's recursion visits is."""
        n = end - start
        if n & (n - 1) == 0:  # perfect: stored
            k = n.bit_length() - 1
            i = start >> k
            return bytes(self.levels[k][i * HASH_SIZE : (i + 1) * HASH_SIZE])
        k = _split(n)
        return node_hash(self._hash(start, start + k), self._hash(start + k, end))

    def root(self, size: int | None = None) -> bytes:
        """The root of the first ``size`` leaves (default: all)."""
        size = self.size if size is None else size
        if not 0 <= size <= self.size:
            raise ValueError(f"tree size {size} is not between 0 and {self.size}")
        return EMPTY_ROOT if size == 0 else self._hash(0, size)

    def inclusion_proof(self, index: int, size: int | None = None) -> list[bytes]:
        """RFC 9162 PATH(index, D[0:size])."""
        size = self.size if size is None else size
        if not 0 <= index < size <= self.size:
            raise ValueError(f"no leaf {index} in a tree of size {size}")
        return self._path(index, 0, size)

    def _path(self, m: int, start: int, end: int) -> list[bytes]:
        n = end - start
        if n == 1:
            return []
        k = _split(n)
        if m < k:
            return [*self._path(m, start, start + k), self._hash(start + k, end)]
        return [*self._path(m - k, start + k, end), self._hash(start, start + k)]

    def consistency_proof(self, old: int, new: int | None = None) -> list[bytes]:
        """RFC 9162 PROOF(old, D[0:new])."""
        new = self.size if new is None else new
        if not 0 < old <= new <= self.size:
            raise ValueError(f"no consistency proof from size {old} to {new} (tree size {self.size})")
        return self._subproof(old, 0, new, True)

    def _subproof(self, m: int, start: int, end: int, whole: bool) -> list[bytes]:
        n = end - start
        if m == n:
            return [] if whole else [self._hash(start, end)]
        k = _split(n)
        if m <= k:
            return [*self._subproof(m, start, start + k, whole), self._hash(start + k, end)]
        return [*self._subproof(m - k, start + k, end, False), self._hash(start, start + k)]

    def truncate(self, size: int) -> None:
        """Forget every leaf from ``size`` on (a batch that never became durable)."""
        for k, row in enumerate(self.levels):
            del row[(size >> k) * HASH_SIZE :]
        self.size = size


def root_of(leaves: Sequence[bytes]) -> bytes:
    """The root over leaf hashes (a fresh tree: for checks and tests)."""
    tree = Tree()
    for leaf in leaves:
        tree.append(leaf)
    return tree.root()


def verify_inclusion(leaf: bytes, index: int, size: int, proof: Sequence[bytes], root: bytes) -> None:
    """RFC 9162 2.1.3.2; raises :class:`ProofError` unless ``leaf`` is leaf ``index`` of the
    tree of ``size`` leaves whose root is ``root``."""
    if not 0 <= index < size:
        raise ProofError(f"leaf index {index} is not in a tree of size {size}")
    fn, sn = index, size - 1
    r = leaf
    for p in proof:
        if sn == 0:
            raise ProofError("inclusion proof is longer than the tree is deep")
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while not fn & 1 and fn != 0:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ProofError("inclusion proof is shorter than the tree is deep")
    if r != root:
        raise ProofError("inclusion proof does not lead to the root")


def verify_consistency(
    old_size: int, new_size: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]
) -> None:
    """RFC 9162 2.1.4.2; raises :class:`ProofError` unless the tree of ``new_size`` leaves
    with ``new_root`` extends the one of ``old_size`` with ``old_root``."""
    if not 0 < old_size <= new_size:
        raise ProofError(f"no consistency between sizes {old_size} and {new_size}")
    if old_size == new_size:
        if proof:
            raise ProofError("a proof between equal sizes must be empty")
        if old_root != new_root:
            raise ProofError("equal sizes, different roots")
        return
    path = list(proof)
    if old_size & (old_size - 1) == 0:  # a power of two: the old root is the first node
        path.insert(0, old_root)
    if not path:
        raise ProofError("empty consistency proof")
    fn, sn = old_size - 1, new_size - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            raise ProofError("consistency proof is longer than the tree is deep")
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            if not fn & 1:
                while not fn & 1 and fn != 0:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ProofError("consistency proof is shorter than the tree is deep")
    if fr != old_root:
        raise ProofError("consistency proof does not lead to the old root")
    if sr != new_root:
        raise ProofError("consistency proof does not lead to the new root")
