"""Merkle trees as Certificate Transparency defines them (RFC 6962, RFC 9162).

Leaves and interior nodes are hashed with different one-byte prefixes
(RFC 6962 section 2.1), so a leaf can never be passed off as a node::

    leaf hash = SHA-256(0x00 || entry)
    node hash = SHA-256(0x01 || left || right)

A tree of ``n`` leaves splits at the largest power of two below ``n``. That
shape makes the tree append-only: a :class:`Frontier` keeps only the roots of
its perfect subtrees (one per set bit of ``n``), so appending a leaf costs
one hash amortised and the root of any size is ``O(log n)`` away.

Proofs are generated from the full list of leaf hashes (RFC 6962 sections
2.1.1 and 2.1.2) and verified with the algorithms of RFC 9162 sections
2.1.3.2 and 2.1.4.2, which need nothing but the proof, the sizes and roots.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

HASH_SIZE = 32
_LEAF = b"\x00"
_NODE = b"\x01"

#: The root of the empty tree: SHA-256 of nothing (RFC 6962 section 2.1).
EMPTY_ROOT = hashlib.sha256(b"").digest()


def leaf_hash(data: bytes) -> bytes:
    """The hash of one leaf: SHA-256 of 0x00 and the data."""
    return hashlib.sha256(_LEAF + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """The hash of an interior node: SHA-256 of 0x01, left child, right child."""
    return hashlib.sha256(_NODE + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two strictly below ``n`` (n > 1)."""
    return 1 << ((n - 1).bit_length() - 1)


class Frontier:
    """The incremental state of a tree: the roots of its perfect subtrees.

    ``peaks`` run from the largest subtree (the leftmost leaves) to the
    smallest; their sizes are the set bits of ``size``, highest first.
    """

    __slots__ = ("peaks", "size")

    def __init__(self, size: int = 0, peaks: Sequence[bytes] = ()) -> None:
        if len(peaks) != size.bit_count():
            raise ValueError(
                f"a tree of {size} leaves has {size.bit_count()} peaks, "
                f"not {len(peaks)}"
            )
        self.size = size
        self.peaks = list(peaks)

    def append(self, leaf: bytes) -> None:
        """Add one leaf hash, merging equal-sized subtrees as a binary counter does."""
        peaks = self.peaks
        peaks.append(leaf)
        merges = self.size
        while merges & 1:
            right = peaks.pop()
            peaks[-1] = hashlib.sha256(_NODE + peaks[-1] + right).digest()
            merges >>= 1
        self.size += 1

    def root(self) -> bytes:
        """The Merkle tree hash of every leaf so far.

        Folding the peaks from the right reproduces RFC 6962's split at the
        largest power of two: the biggest subtree is always the left child.
        """
        if not self.peaks:
            return EMPTY_ROOT
        peaks = self.peaks
        root = peaks[-1]
        for peak in reversed(peaks[:-1]):
            root = hashlib.sha256(_NODE + peak + root).digest()
        return root

    def copy(self) -> Frontier:
        """An independent copy."""
        return Frontier(self.size, self.peaks)

    def to_hex(self) -> list[str]:
        """The peaks as hex strings, for a checkpoint file."""
        return [p.hex() for p in self.peaks]

    @classmethod
    def from_hex(cls, size: int, peaks: Sequence[str]) -> Frontier:
        """Rebuild a frontier from :meth:`to_hex`.

        Raises:
            ValueError: the peaks are not hex hashes or do not match ``size``.
        """
        raw = [bytes.fromhex(p) for p in peaks]
        if any(len(p) != HASH_SIZE for p in raw):
            raise ValueError("a peak is not a 32-byte hash")
        return cls(size, raw)


def levels_of(leaves: Sequence[bytes]) -> list[list[bytes]]:
    """Every level of the perfect subtrees over ``leaves``, bottom up.

    Level ``h`` holds the roots of the complete runs of ``2**h`` leaves, left
    to right; a trailing leaf without a partner stays out of the level above.
    Hashing a level at a time costs one hash per node and little else, which
    is why bulk verification builds trees this way.
    """
    levels = [list(leaves)]
    while len(levels[-1]) > 1:
        pairs = iter(levels[-1])
        levels.append(
            [
                hashlib.sha256(_NODE + left + right).digest()
                for left, right in zip(pairs, pairs, strict=False)
            ]
        )
    return levels


def peaks_of(levels: Sequence[Sequence[bytes]], count: int) -> list[bytes]:
    """The frontier peaks of the first ``count`` leaves, from :func:`levels_of`."""
    peaks: list[bytes] = []
    start = 0
    for height in range(len(levels) - 1, -1, -1):
        if count >> height & 1:
            peaks.append(levels[height][start >> height])
            start += 1 << height
    return peaks


def root_of(leaves: Sequence[bytes]) -> bytes:
    """The Merkle tree hash of a list of leaf hashes."""
    frontier = Frontier()
    for leaf in leaves:
        frontier.append(leaf)
    return frontier.root()


def _subtree(leaves: Sequence[bytes], lo: int, hi: int) -> bytes:
    """MTH of ``leaves[lo:hi]``, in one pass over the range."""
    frontier = Frontier()
    for i in range(lo, hi):
        frontier.append(leaves[i])
    return frontier.root()


def inclusion_proof(leaves: Sequence[bytes], index: int, size: int) -> list[bytes]:
    """The audit path of leaf ``index`` in the tree of the first ``size`` leaves.

    RFC 6962 section 2.1.1: siblings from the leaf up to the root.

    Raises:
        ValueError: ``index`` is not below ``size``, or ``size`` exceeds the leaves.
    """
    if not 0 <= index < size <= len(leaves):
        raise ValueError(f"no leaf {index} in a tree of {size} (of {len(leaves)})")
    path: list[bytes] = []
    lo, hi = 0, size
    # Walk down from the root, collecting the sibling of each subtree chosen;
    # the path is read leaf-first, so it is built in reverse.
    while hi - lo > 1:
        k = _split(hi - lo)
        if index - lo < k:
            path.append(_subtree(leaves, lo + k, hi))
            hi = lo + k
        else:
            path.append(_subtree(leaves, lo, lo + k))
            lo += k
    path.reverse()
    return path


def consistency_proof(leaves: Sequence[bytes], first: int, second: int) -> list[bytes]:
    """The proof that the tree of ``first`` leaves is a prefix of that of ``second``.

    RFC 6962 section 2.1.2 (SUBPROOF). Empty when ``first`` is 0 or equals
    ``second``.

    Raises:
        ValueError: not ``0 <= first <= second <= len(leaves)``.
    """
    if not 0 <= first <= second <= len(leaves):
        raise ValueError(f"no consistency between sizes {first} and {second}")
    if first in (0, second):
        return []
    proof: list[bytes] = []
    lo, hi, m, whole = 0, second, first, True
    while m != hi - lo:
        k = _split(hi - lo)
        if m <= k:
            proof.append(_subtree(leaves, lo + k, hi))
            hi = lo + k
        else:
            proof.append(_subtree(leaves, lo, lo + k))
            lo += k
            m -= k
            whole = False
    if not whole:
        proof.append(_subtree(leaves, lo, hi))
    proof.reverse()
    return proof


def verify_inclusion(
    leaf: bytes, index: int, size: int, path: Sequence[bytes], root: bytes
) -> bool:
    """Whether ``path`` proves leaf hash ``leaf`` at ``index`` under ``root``.

    The algorithm of RFC 9162 section 2.1.3.2.
    """
    if not 0 <= index < size:
        return False
    fn, sn, r = index, size - 1, leaf
    for p in path:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    return sn == 0 and r == root


def verify_consistency(
    first: int,
    second: int,
    first_root: bytes,
    second_root: bytes,
    proof: Sequence[bytes],
) -> bool:
    """Whether ``proof`` shows the tree of ``first`` leaves is a prefix of ``second``'s.

    The algorithm of RFC 9162 section 2.1.4.2, with its two trivial cases:
    every tree extends the empty one, and a tree extends itself only when the
    roots are equal.
    """
    if not 0 <= first <= second:
        return False
    if first == 0:
        return not proof
    if first == second:
        return not proof and first_root == second_root
    if not proof:
        return False
    path = list(proof)
    if first & (first - 1) == 0:
        path.insert(0, first_root)
    fn, sn = first - 1, second - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    return sn == 0 and fr == first_root and sr == second_root
