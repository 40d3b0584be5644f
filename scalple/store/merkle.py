"""The audit log's Merkle tree, shaped exactly as RFC 9162 (and RFC 6962) define it.

Everything here is pure computation on hashes; nothing reads or writes files.

The tree over leaves ``D[0:n]`` is the RFC's Merkle Tree Hash (MTH)::

    MTH({})     = H()
    MTH({d})    = leaf hash of d          (H(0x00 || d), see hashing.py)
    MTH(D[0:n]) = H(0x01 || MTH(D[0:k]) || MTH(D[k:n]))   for n > 1,
                  where k is the largest power of two smaller than n.

Using the RFC's shape, rather than any other balanced tree, means an auditor
can check Scalple's proofs with any Certificate Transparency tooling (given
the hash function), and that the published CT test vectors apply to this code.

Functions below that take leaf hashes expect them already hashed: the leaf
hash is computed once, when a record is written, and stored beside it.

The pieces:

* :class:`CompactRange`: the writer's running state, enough to extend the tree
  and compute its root without keeping any old leaf.
* :func:`root_of`: the MTH definition, written as the RFC writes it.
* :class:`LeafNodes`: computes the MTH of any range a proof asks for, from the
  leaves still kept plus the compact range of those removed by retention.
* :func:`inclusion_proof` / :func:`verify_inclusion` and
  :func:`consistency_proof` / :func:`verify_consistency`: RFC 9162 sections
  2.1.3 and 2.1.4, step by step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TypeAlias

from scalple.store.hashing import BLAKE3, Hasher

__all__ = [
    "CompactRange",
    "LeafNodes",
    "NodeSource",
    "consistency_proof",
    "inclusion_proof",
    "root_from_inclusion",
    "root_of",
    "verify_consistency",
    "verify_inclusion",
]

NodeSource: TypeAlias = Callable[[int, int], bytes]
"""``nodes(lo, hi)`` returns MTH(D[lo:hi]); the proof builders ask for nothing else."""


def _split(n: int) -> int:
    """The RFC's k for a tree of n > 1 leaves: the largest power of two below n."""
    return 1 << ((n - 1).bit_length() - 1)


def _check_hash(value: bytes, hasher: Hasher, what: str) -> None:
    """Reject a hash of the wrong length before it is mixed into anything.

    A wrong-length value can only come from a bug or a malformed proof; caught
    here it gets a message that says which, instead of a root mismatch later.
    """
    if len(value) != hasher.size:
        raise ValueError(f"{what} is {len(value)} bytes, expected {hasher.size}")


class CompactRange:
    """The tree of ``size`` leaves, kept as the roots of its perfect subtrees.

    ``size`` written in binary says which perfect subtrees the tree splits
    into: one of 2**i leaves for every bit i that is set, the largest
    leftmost.  Their roots (``hashes``, leftmost first) are all that is needed
    to compute the tree's root and to keep appending, so the writer never
    holds more than about 64 hashes however long the log grows.

    This is also what a segment header stores for the leaves before it, so
    that proofs still work once older segments are removed (see
    :class:`LeafNodes`).
    """

    __slots__ = ("_hasher", "_hashes", "_node", "_size")

    def __init__(
        self, size: int = 0, hashes: Sequence[bytes] = (), *, hasher: Hasher = BLAKE3
    ) -> None:
        if size < 0:
            raise ValueError(f"tree size must not be negative, got {size}")
        if len(hashes) != size.bit_count():
            raise ValueError(
                f"a tree of {size} leaves has {size.bit_count()} perfect subtrees, "
                f"got {len(hashes)} hashes"
            )
        for i, value in enumerate(hashes):
            _check_hash(value, hasher, f"compact range hash {i}")
        self._size = size
        self._hashes = list(hashes)
        self._hasher = hasher
        # Bound once: append() runs once per record on the writer's thread.
        self._node = hasher.node

    @classmethod
    def from_state(
        cls, size: int, hashes: Sequence[bytes], *, hasher: Hasher = BLAKE3
    ) -> CompactRange:
        """Rebuild a range saved with :meth:`to_state` (e.g. from a segment header)."""
        return cls(size, hashes, hasher=hasher)

    def to_state(self) -> tuple[int, list[bytes]]:
        """``(size, hashes)``, the form stored in segment headers and checkpoints."""
        return self._size, list(self._hashes)

    @property
    def size(self) -> int:
        """Number of leaves in the tree."""
        return self._size

    @property
    def hashes(self) -> tuple[bytes, ...]:
        """Roots of the perfect subtrees, leftmost (largest) first; a copy."""
        return tuple(self._hashes)

    @property
    def hasher(self) -> Hasher:
        """The hash function this tree is built with."""
        return self._hasher

    def append(self, leaf_hash: bytes) -> None:
        """Add one leaf (given as its leaf hash).

        The new leaf is a perfect subtree of one leaf.  While the subtree to
        its left has the same size (the low bits of ``size`` that are set),
        the two merge into one twice as big; this is binary increment, with a
        node hash per carry, so one node hash per leaf on average.
        """
        if len(leaf_hash) != self._hasher.size:
            raise ValueError(f"leaf hash is {len(leaf_hash)} bytes, expected {self._hasher.size}")
        hashes = self._hashes
        node = self._node
        carry = self._size
        while carry & 1:
            leaf_hash = node(hashes.pop(), leaf_hash)
            carry >>= 1
        hashes.append(leaf_hash)
        self._size += 1

    def extend(self, leaf_hashes: Iterable[bytes]) -> None:
        """Append every leaf hash of ``leaf_hashes``, in order."""
        append = self.append
        for value in leaf_hashes:
            append(value)

    def root(self) -> bytes:
        """MTH of the whole tree.

        With k the largest power of two below ``size``, the leftmost perfect
        subtree is exactly the RFC's left half D[0:k], and the remainder is
        again a tree of the remaining perfect subtrees.  So the root is the
        subtree roots folded together from the right.
        """
        if not self._hashes:
            return self._hasher.empty()
        node = self._node
        root = self._hashes[-1]
        for value in reversed(self._hashes[:-1]):
            root = node(value, root)
        return root

    def copy(self) -> CompactRange:
        """An independent range with the same state."""
        return CompactRange(self._size, self._hashes, hasher=self._hasher)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CompactRange):
            return NotImplemented
        return (
            self._size == other._size
            and self._hashes == other._hashes
            and self._hasher == other._hasher
        )

    __hash__ = None  # type: ignore[assignment]  # mutable: equality without hashing

    def __repr__(self) -> str:
        return f"CompactRange(size={self._size}, hasher={self._hasher.name})"


def root_of(leaf_hashes: Sequence[bytes], *, hasher: Hasher = BLAKE3) -> bytes:
    """MTH of ``leaf_hashes``, computed literally by the RFC's recursive definition.

    This is the reference the faster code is tested against, and it is fine
    for verifying short ranges; it is not meant for millions of leaves.
    """

    def mth(lo: int, hi: int) -> bytes:
        if hi - lo == 1:
            return leaf_hashes[lo]
        k = _split(hi - lo)
        return hasher.node(mth(lo, lo + k), mth(lo + k, hi))

    if not leaf_hashes:
        return hasher.empty()
    return mth(0, len(leaf_hashes))


def _mth_by_levels(
    leaves: Sequence[bytes], lo: int, hi: int, node: Callable[[bytes, bytes], bytes]
) -> bytes:
    """MTH(leaves[lo:hi]) for hi > lo, hashing level by level instead of recursing.

    Pairing neighbours from the left and carrying an unpaired last node up
    unchanged builds the same tree as the RFC recursion (its left subtrees are
    always perfect, so only the rightmost node of a level can be unpaired).
    Doing it a level at a time keeps the Python overhead to one comprehension
    per level, which matters for ranges of millions of leaves.
    """
    level = [node(leaves[i], leaves[i + 1]) for i in range(lo, hi - 1, 2)]
    if (hi - lo) & 1:
        level.append(leaves[hi - 1])
    while len(level) > 1:
        paired = [node(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) & 1:
            paired.append(level[-1])
        level = paired
    return level[0]


class LeafNodes:
    """A :data:`NodeSource` over the leaves still kept, after retention removed a prefix.

    ``leaves`` holds the leaf hashes of ``[first, first + len(leaves))``.  The
    removed leaves ``[0, first)`` survive only as ``base``, their compact range
    (stored in the header of the oldest kept segment).  Each of its hashes is
    the root of one perfect subtree of the removed prefix; those are the only
    nodes inside ``[0, first)`` that can still be produced.

    That is enough for the root of any tree of at least ``first`` leaves, the
    inclusion proof of any kept leaf, and any consistency proof from a tree of
    at least ``first`` leaves: in the RFC recursion, a range reaching past
    ``first`` splits at powers of two that coincide with the boundaries of
    base's subtrees.  A range wholly inside the prefix that is not one of
    those subtrees (e.g. for a proof about a removed leaf, or from a tree
    smaller than ``first``) cannot be rebuilt; asking for it raises
    :class:`ValueError`.
    """

    __slots__ = ("_base", "_end", "_first", "_hasher", "_leaves")

    def __init__(
        self,
        leaves: Sequence[bytes],
        first: int = 0,
        base: CompactRange | None = None,
        *,
        hasher: Hasher = BLAKE3,
    ) -> None:
        if base is None:
            base = CompactRange(hasher=hasher)
        if base.size != first:
            raise ValueError(f"base covers {base.size} leaves but first is {first}")
        if base.hasher != hasher:
            raise ValueError(f"base uses {base.hasher.name}, these nodes use {hasher.name}")
        self._leaves = leaves
        self._first = first
        self._end = first + len(leaves)
        self._hasher = hasher
        self._base = self._index_base(base)

    @staticmethod
    def _index_base(base: CompactRange) -> dict[tuple[int, int], bytes]:
        """Map each of base's subtrees, as a leaf range (lo, hi), to its root."""
        ranges: dict[tuple[int, int], bytes] = {}
        lo = 0
        for bit, value in zip(_set_bits_high_first(base.size), base.hashes, strict=True):
            hi = lo + (1 << bit)
            ranges[lo, hi] = value
            lo = hi
        return ranges

    @property
    def first(self) -> int:
        """Index of the oldest kept leaf."""
        return self._first

    @property
    def end(self) -> int:
        """One past the newest leaf: the largest tree size these nodes can serve."""
        return self._end

    def __call__(self, lo: int, hi: int) -> bytes:
        """MTH(D[lo:hi])."""
        if not 0 <= lo <= hi <= self._end:
            raise ValueError(f"range [{lo}, {hi}) is not within the {self._end} known leaves")
        if lo == hi:
            if lo == 0:
                return self._hasher.empty()
            raise ValueError(f"empty range [{lo}, {hi}) has no hash")
        return self._mth(lo, hi)

    def _mth(self, lo: int, hi: int) -> bytes:
        """The RFC recursion, down to ranges that are kept leaves or base subtrees."""
        if lo >= self._first:
            off = self._first
            return _mth_by_levels(self._leaves, lo - off, hi - off, self._hasher.node)
        known = self._base.get((lo, hi))
        if known is not None:
            return known
        if hi - lo == 1:
            raise ValueError(
                f"leaf {lo} was removed (kept leaves start at {self._first}) and is not "
                f"covered by a retained subtree hash"
            )
        k = _split(hi - lo)
        return self._hasher.node(self._mth(lo, lo + k), self._mth(lo + k, hi))


def _set_bits_high_first(n: int) -> list[int]:
    """Positions of the bits set in n, most significant first."""
    return [bit for bit in range(n.bit_length() - 1, -1, -1) if n >> bit & 1]


def inclusion_proof(index: int, size: int, nodes: NodeSource) -> list[bytes]:
    """PATH(index, D[0:size]) of RFC 9162 section 2.1.3.1, leaf end first.

    The RFC defines the path recursively: descend into the half containing
    the leaf and append the root of the other half.  Walking down from the
    root collects those sibling roots top first, so the list is reversed to
    the RFC's order (the leaf's sibling first, the root's child last).
    """
    if not 0 <= index < size:
        raise ValueError(f"leaf {index} is not in a tree of {size} leaves")
    siblings: list[bytes] = []
    lo, hi = 0, size
    while hi - lo > 1:
        mid = lo + _split(hi - lo)
        if index < mid:
            siblings.append(nodes(mid, hi))
            hi = mid
        else:
            siblings.append(nodes(lo, mid))
            lo = mid
    siblings.reverse()
    return siblings


def consistency_proof(old_size: int, new_size: int, nodes: NodeSource) -> list[bytes]:
    """PROOF(old_size, D[0:new_size]) of RFC 9162 section 2.1.4.1.

    The RFC defines ``SUBPROOF(m, D[lo:hi], b)``: while the old tree is not
    the whole of the current range, descend into the half that holds the old
    tree's right edge and append the root of the other half; once it is, the
    range's root is included unless the range is the old tree itself (``b``
    still true: never went right), whose root the verifier already has.

    Sizes 0 and ``old_size == new_size`` need no proof and get an empty one.
    """
    if not 0 <= old_size <= new_size:
        raise ValueError(f"no consistency proof from size {old_size} to {new_size}")
    if old_size in (0, new_size):
        return []
    tail: list[bytes] = []
    lo, hi, m = 0, new_size, old_size
    whole_old_tree = True
    while m != hi - lo:
        mid = lo + _split(hi - lo)
        if m <= mid - lo:
            tail.append(nodes(mid, hi))
            hi = mid
        else:
            tail.append(nodes(lo, mid))
            m -= mid - lo
            lo = mid
            whole_old_tree = False
    proof = [] if whole_old_tree else [nodes(lo, hi)]
    proof.extend(reversed(tail))
    return proof


def root_from_inclusion(
    leaf_hash: bytes,
    index: int,
    size: int,
    path: Sequence[bytes],
    *,
    hasher: Hasher = BLAKE3,
) -> bytes:
    """The root that ``path`` proves ``leaf_hash`` is leaf ``index`` of (RFC 9162 2.1.3.2).

    Raises :class:`ValueError` for a malformed proof: index outside the tree,
    a path of the wrong length, or hashes of the wrong size.  Comparing the
    result with a trusted root is :func:`verify_inclusion`'s job.

    ``fn`` and ``sn`` are the leaf's and the last leaf's positions at the
    current level; a right-shift moves one level up.  Where ``fn`` is the last
    node of its level and has no right sibling (``fn == sn`` and ``fn`` even),
    the RFC skips the levels it is carried up unchanged.
    """
    if not 0 <= index < size:
        raise ValueError(f"leaf {index} is not in a tree of {size} leaves")
    _check_hash(leaf_hash, hasher, "leaf hash")
    fn, sn = index, size - 1
    r = leaf_hash
    for i, p in enumerate(path):
        _check_hash(p, hasher, f"inclusion path entry {i}")
        if sn == 0:
            raise ValueError(f"inclusion path is too long for leaf {index} of {size}")
        if fn & 1 or fn == sn:
            r = hasher.node(p, r)
            while fn and not fn & 1:
                fn >>= 1
                sn >>= 1
        else:
            r = hasher.node(r, p)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ValueError(f"inclusion path is too short for leaf {index} of {size}")
    return r


def verify_inclusion(
    leaf_hash: bytes,
    index: int,
    size: int,
    path: Sequence[bytes],
    root: bytes,
    *,
    hasher: Hasher = BLAKE3,
) -> bool:
    """Whether ``path`` proves ``leaf_hash`` is leaf ``index`` of the tree with ``root``.

    A malformed proof is simply not a proof, so it returns False rather than
    raising; use :func:`root_from_inclusion` to learn what was wrong.
    """
    try:
        return root_from_inclusion(leaf_hash, index, size, path, hasher=hasher) == root
    except ValueError:
        return False


def verify_consistency(
    old_size: int,
    new_size: int,
    old_root: bytes,
    new_root: bytes,
    proof: Sequence[bytes],
    *,
    hasher: Hasher = BLAKE3,
) -> bool:
    """Whether ``proof`` shows the tree ``(new_size, new_root)`` extends ``(old_size, old_root)``.

    Follows RFC 9162 section 2.1.4.2, whose algorithm assumes
    ``0 < old_size < new_size``.  The two cases outside that need no proof and
    accept only an empty one: equal sizes must have equal roots, and the empty
    tree (whose root must be ``H()``) is a prefix of every tree.  Anything
    malformed returns False.
    """
    if not 0 <= old_size <= new_size:
        return False
    if any(len(h) != hasher.size for h in (old_root, new_root, *proof)):
        return False
    if old_size == new_size:
        return not proof and old_root == new_root
    if old_size == 0:
        return not proof and old_root == hasher.empty()
    roots = _roots_from_consistency(old_size, new_size, old_root, proof, hasher)
    return roots == (old_root, new_root)


def _roots_from_consistency(
    first: int, second: int, first_hash: bytes, proof: Sequence[bytes], hasher: Hasher
) -> tuple[bytes, bytes] | None:
    """Steps 1 to 7 of RFC 9162 2.1.4.2 for ``0 < first < second``.

    Returns the old and new roots the proof implies (``fr``, ``sr``), or None
    when the proof has the wrong length.  ``fr`` is rebuilt from the proof
    too, so a proof that does not contain the old tree cannot pass.
    """
    if not proof:  # step 1
        return None
    path = list(proof)
    if first & (first - 1) == 0:  # step 2: the old tree is a perfect subtree
        path.insert(0, first_hash)
    fn, sn = first - 1, second - 1  # step 3
    while fn & 1:  # step 4
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]  # step 5
    for c in path[1:]:  # step 6
        if sn == 0:
            return None
        if fn & 1 or fn == sn:
            fr = hasher.node(c, fr)
            sr = hasher.node(c, sr)
            while fn and not fn & 1:
                fn >>= 1
                sn >>= 1
        else:
            sr = hasher.node(sr, c)
        fn >>= 1
        sn >>= 1
    if sn != 0:  # step 7
        return None
    return fr, sr
