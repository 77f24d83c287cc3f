"""The Merkle tree against RFC 6962 / RFC 9162: the CT reference vectors, and a naive
implementation written straight from the RFC's recursive definitions for every shape."""

from __future__ import annotations

import hashlib

import pytest

from sealbox.signlog import merkle

# The Certificate Transparency reference leaves (RFC 6962 test data, as published with the
# reference implementations) and the root of the tree of the first n of them, n = 0..8.
LEAVES = [
    bytes.fromhex(h)
    for h in (
        "",
        "00",
        "10",
        "2021",
        "3031",
        "40414243",
        "5051525354555657",
        "606162636465666768696a6b6c6d6e6f",
    )
]
ROOTS = [
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]
# (leaf index, tree size, audit path) from the same reference data
INCLUSION = [
    (0, 8, ["96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"]),
    (5, 8, ["bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"]),
    (2, 3, ["fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"]),
    (1, 5, ["6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"]),
    (0, 1, []),
]  # fmt: skip
# (old size, new size, consistency proof)
CONSISTENCY = [
    (1, 1, []),
    (1, 8, ["96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"]),
    (6, 8, ["0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"]),
    (2, 5, ["5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"]),
]  # fmt: skip


# -- the RFC's definitions, written out naively (section 2.1.1, 2.1.3.1, 2.1.4.1) ------------
def _k(n: int) -> int:
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def mth(d: list[bytes]) -> bytes:
    if not d:
        return hashlib.sha256(b"").digest()
    if len(d) == 1:
        return hashlib.sha256(b"\x00" + d[0]).digest()
    k = _k(len(d))
    return hashlib.sha256(b"\x01" + mth(d[:k]) + mth(d[k:])).digest()


def path(m: int, d: list[bytes]) -> list[bytes]:
    if len(d) == 1:
        return []
    k = _k(len(d))
    if m < k:
        return [*path(m, d[:k]), mth(d[k:])]
    return [*path(m - k, d[k:]), mth(d[:k])]


def subproof(m: int, d: list[bytes], b: bool) -> list[bytes]:
    if m == len(d):
        return [] if b else [mth(d)]
    k = _k(len(d))
    if m <= k:
        return [*subproof(m, d[:k], b), mth(d[k:])]
    return [*subproof(m - k, d[k:], False), mth(d[:k])]


def _tree(entries: list[bytes]) -> merkle.Tree:
    tree = merkle.Tree()
    for e in entries:
        tree.append(merkle.leaf_hash(e))
    return tree


def test_reference_roots() -> None:
    tree = _tree(LEAVES)
    for n, want in enumerate(ROOTS):
        assert tree.root(n).hex() == want, n
        assert mth(LEAVES[:n]).hex() == want, n  # the naive reading of the RFC agrees


@pytest.mark.parametrize(("index", "size", "proof"), INCLUSION)
def test_reference_inclusion_proofs(index: int, size: int, proof: list[str]) -> None:
    tree = _tree(LEAVES)
    got = tree.inclusion_proof(index, size)
    assert [h.hex() for h in got] == proof
    merkle.verify_inclusion(tree.leaf(index), index, size, got, bytes.fromhex(ROOTS[size]))


@pytest.mark.parametrize(("old", "new", "proof"), CONSISTENCY)
def test_reference_consistency_proofs(old: int, new: int, proof: list[str]) -> None:
    tree = _tree(LEAVES)
    got = tree.consistency_proof(old, new)
    assert [h.hex() for h in got] == proof
    merkle.verify_consistency(old, new, bytes.fromhex(ROOTS[old]), bytes.fromhex(ROOTS[new]), got)


ENTRIES = [bytes([i, i * 7 % 256, 3]) * (i % 5) for i in range(70)]


def test_every_shape_agrees_with_the_naive_definitions() -> None:
    tree = _tree(ENTRIES)
    for n in range(1, len(ENTRIES) + 1):
        d = ENTRIES[:n]
        root = tree.root(n)
        assert root == mth(d)
        for m in range(n):
            proof = tree.inclusion_proof(m, n)
            assert proof == path(m, d)
            merkle.verify_inclusion(tree.leaf(m), m, n, proof, root)
        for old in range(1, n + 1):
            proof = tree.consistency_proof(old, n)
            assert proof == subproof(old, d, True)
            merkle.verify_consistency(old, n, tree.root(old), root, proof)


def test_wrong_proofs_are_refused() -> None:
    tree = _tree(ENTRIES[:13])
    root, leaf = tree.root(), tree.leaf(6)
    proof = tree.inclusion_proof(6)
    bad_cases = [
        (tree.leaf(7), 6, 13, proof, root),  # another leaf
        (leaf, 7, 13, proof, root),  # another index
        (leaf, 6, 8, proof, root),  # a size with a shallower tree
        (leaf, 6, 13, proof[:-1], root),  # too short
        (leaf, 6, 13, [*proof, proof[0]], root),  # too long
        (leaf, 6, 13, [proof[1], proof[0], *proof[2:]], root),  # reordered
        (leaf, 6, 13, proof, tree.root(12)),  # another root
        (leaf, 13, 13, proof, root),  # no such index
    ]
    for args in bad_cases:
        with pytest.raises(merkle.ProofError):
            merkle.verify_inclusion(*args)
    cons = tree.consistency_proof(5, 13)
    for old, new, old_root, new_root, p in [
        (5, 13, tree.root(6), root, cons),
        (5, 13, tree.root(5), tree.root(12), cons),
        (6, 13, tree.root(5), root, cons),
        (5, 13, tree.root(5), root, cons[:-1]),
        (5, 13, tree.root(5), root, [*cons, cons[0]]),
        (4, 4, tree.root(4), tree.root(4), [cons[0]]),
        (0, 13, merkle.EMPTY_ROOT, root, []),
    ]:
        with pytest.raises(merkle.ProofError):
            merkle.verify_consistency(old, new, old_root, new_root, p)
