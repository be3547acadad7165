"""Merkle trees, proofs and their verification, against RFC 6962 and a naive model."""

from __future__ import annotations

import hashlib

import pytest

from projections.merkle import (
    EMPTY_ROOT,
    Frontier,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    levels_of,
    node_hash,
    peaks_of,
    root_of,
    verify_consistency,
    verify_inclusion,
)

# The Certificate Transparency reference leaves and the tree heads of their
# first 0..8 leaves, as every RFC 6962 implementation publishes them.
CT_LEAVES = [
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
CT_ROOTS = [
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
CT_HASHES = [leaf_hash(d) for d in CT_LEAVES]


def naive_root(leaves: list[bytes]) -> bytes:
    """MTH exactly as RFC 6962 section 2.1 writes it, recursively."""
    n = len(leaves)
    if n == 0:
        return hashlib.sha256(b"").digest()
    if n == 1:
        return leaves[0]
    k = 1
    while k * 2 < n:
        k *= 2
    return node_hash(naive_root(leaves[:k]), naive_root(leaves[k:]))


MANY = [leaf_hash(b"entry %d" % i) for i in range(40)]


def test_roots_match_the_rfc_6962_reference_heads() -> None:
    """Every prefix of the reference leaves hashes to the published root."""
    assert EMPTY_ROOT.hex() == CT_ROOTS[0]
    for size in range(len(CT_LEAVES) + 1):
        assert root_of(CT_HASHES[:size]).hex() == CT_ROOTS[size]


def test_reference_inclusion_and_consistency_paths() -> None:
    """Proofs equal the published paths for the reference tree."""
    assert [p.hex() for p in inclusion_proof(CT_HASHES, 0, 8)] == [
        "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
        "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
        "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
    ]
    assert [p.hex() for p in inclusion_proof(CT_HASHES, 5, 8)] == [
        "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
        "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    ]
    assert [p.hex() for p in consistency_proof(CT_HASHES, 2, 5)] == [
        "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
        "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
    ]


def test_frontier_gives_the_naive_root_at_every_size() -> None:
    """The incremental frontier keeps one peak per set bit and the right root."""
    frontier = Frontier()
    for size, leaf in enumerate(MANY, start=1):
        frontier.append(leaf)
        assert len(frontier.peaks) == size.bit_count()
        assert frontier.root() == naive_root(MANY[:size])
        again = Frontier.from_hex(size, frontier.to_hex())
        assert again.root() == frontier.root()


def test_frontier_refuses_peaks_that_do_not_fit_the_size() -> None:
    """A frontier read back from a checkpoint must match its size."""
    with pytest.raises(ValueError, match="peaks"):
        Frontier(3, [MANY[0]])
    with pytest.raises(ValueError, match="32-byte"):
        Frontier.from_hex(1, ["abcd"])


def test_every_inclusion_proof_verifies_and_nothing_else_does() -> None:
    """Each leaf proves at its index in every tree size, and not elsewhere."""
    for size in range(1, len(MANY) + 1):
        root = naive_root(MANY[:size])
        for index in range(size):
            path = inclusion_proof(MANY, index, size)
            assert verify_inclusion(MANY[index], index, size, path, root)
            assert not verify_inclusion(MANY[index], index, size, path, EMPTY_ROOT)
            if size > 1:
                other = (index + 1) % size
                assert not verify_inclusion(MANY[other], index, size, path, root)
                assert not verify_inclusion(MANY[index], other, size, path, root)
            if path:
                bent = [bytes([path[0][0] ^ 1]) + path[0][1:], *path[1:]]
                assert not verify_inclusion(MANY[index], index, size, bent, root)
                assert not verify_inclusion(MANY[index], index, size, path[:-1], root)
        assert not verify_inclusion(MANY[0], size, size, [], root)


def test_every_consistency_proof_verifies_and_tampering_fails() -> None:
    """Every earlier tree is proven a prefix of every later one."""
    for second in range(1, 24):
        root2 = naive_root(MANY[:second])
        for first in range(0, second + 1):
            root1 = naive_root(MANY[:first])
            proof = consistency_proof(MANY, first, second)
            assert verify_consistency(first, second, root1, root2, proof)
            if 0 < first < second:
                assert not verify_consistency(first, second, root2, root2, proof)
                assert not verify_consistency(first, second, root1, root1, proof)
                bent = [bytes([proof[-1][0] ^ 1]) + proof[-1][1:], *proof[:-1]]
                assert not verify_consistency(first, second, root1, root2, bent[::-1])
                assert not verify_consistency(first, second, root1, root2, [])


def test_a_rewritten_history_is_not_consistent() -> None:
    """A later tree whose early leaves differ does not extend the earlier one."""
    forked = [*MANY[:5], leaf_hash(b"forged"), *MANY[6:20]]
    proof = consistency_proof(forked, 10, 20)
    assert not verify_consistency(
        10, 20, naive_root(MANY[:10]), naive_root(forked), proof
    )


def test_proof_generation_refuses_impossible_sizes() -> None:
    """Out-of-range indexes and sizes are errors, not empty proofs."""
    with pytest.raises(ValueError, match="no leaf"):
        inclusion_proof(MANY[:4], 4, 4)
    with pytest.raises(ValueError, match="no consistency"):
        consistency_proof(MANY[:4], 3, 5)


def test_levels_give_the_peaks_of_every_prefix() -> None:
    """Hashing a level at a time yields each prefix's frontier peaks."""
    levels = levels_of(MANY[:37])
    assert levels[-1] == [naive_root(MANY[:32])]
    for count in range(38):
        peaks = peaks_of(levels, count)
        assert Frontier(count, peaks).root() == naive_root(MANY[:count])
