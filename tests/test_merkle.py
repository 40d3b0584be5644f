"""The Merkle tree layer: RFC 6962 reference vectors, then exhaustive cross-checks.

The vectors are the Certificate Transparency test data (SHA-256, eight leaves)
that CT implementations share; they pin the tree *shape*.  Everything else runs
on BLAKE3 and checks the fast code against the RFC's recursive definitions
(``root_of`` and the proof recursions), plus tampering that must be caught.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from functools import cache

import blake3
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scalple.store.hashing import BLAKE3, HASH_SIZE, SHA256, Hasher, leaf_hash, node_hash
from scalple.store.merkle import (
    CompactRange,
    LeafNodes,
    consistency_proof,
    inclusion_proof,
    root_from_inclusion,
    root_of,
    verify_consistency,
    verify_inclusion,
)

# ---------------------------------------------------------------- RFC 6962 vectors

CT_INPUTS = [
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

# MTH of the first n inputs, indexed by n (0 is the empty tree, SHA-256 of "").
CT_ROOTS = [
    bytes.fromhex(h)
    for h in (
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
        "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
        "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
        "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
        "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
        "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
    )
]

# Every perfect subtree of the 8-leaf tree: CT_NODES[level][i] is MTH of
# leaves [i * 2**level, (i + 1) * 2**level).
CT_NODES = [
    [
        bytes.fromhex(h)
        for h in (
            "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
            "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "0298d122906dcfc10892cb53a73992fc5b9f493ea4c9badb27b791b4127a7fe7",
            "07506a85fd9dd2f120eb694f86011e5bb4662e5c415a62917033d4a9624487e7",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
            "4271a26be0d8a84f0bd54c8c302e7cb3a3b5d1fa6780a40bcce2873477dab658",
            "b08693ec2e721597130641e8211e7eedccb4c26413963eee6c1e2ed16ffb1a5f",
            "46f6ffadd3d06a09ff3c5860d2755c8b9819db7df44251788c7d8e3180de8eb1",
        )
    ],
    [
        bytes.fromhex(h)
        for h in (
            "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
        )
    ],
    [
        bytes.fromhex(h)
        for h in (
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
        )
    ],
    [bytes.fromhex("5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328")],
]

N0, N1, N2, N3 = CT_NODES

# (leaf index, tree size, path); indices are 0-based here.
CT_INCLUSION = [
    (0, 1, []),
    (0, 8, [N0[1], N1[1], N2[1]]),
    (5, 8, [N0[4], N1[3], N2[0]]),
    (2, 3, [N1[0]]),
    (1, 5, [N0[0], N1[1], N0[4]]),
]

# (old size, new size, proof)
CT_CONSISTENCY = [
    (1, 1, []),
    (1, 8, [N0[1], N1[1], N2[1]]),
    (6, 8, [N1[2], N1[3], N2[0]]),
    (2, 5, [N1[1], N0[4]]),
    (6, 7, [N1[2], N0[6], N2[0]]),
]

CT_LEAVES = [SHA256.leaf(d) for d in CT_INPUTS]
CT_NODE_SOURCE = LeafNodes(CT_LEAVES, hasher=SHA256)


def test_empty_tree_root_is_hash_of_nothing() -> None:
    assert SHA256.empty() == CT_ROOTS[0] == hashlib.sha256().digest()
    assert BLAKE3.empty() == blake3.blake3().digest()
    assert CompactRange(hasher=SHA256).root() == CT_ROOTS[0]
    assert root_of([], hasher=SHA256) == CT_ROOTS[0]
    assert CT_NODE_SOURCE(0, 0) == CT_ROOTS[0]


def test_ct_leaf_hashes() -> None:
    assert CT_LEAVES == N0


@pytest.mark.parametrize("size", range(1, 9))
def test_ct_roots(size: int) -> None:
    tree = CompactRange(hasher=SHA256)
    tree.extend(CT_LEAVES[:size])
    assert tree.root() == CT_ROOTS[size]
    assert root_of(CT_LEAVES[:size], hasher=SHA256) == CT_ROOTS[size]
    assert CT_NODE_SOURCE(0, size) == CT_ROOTS[size]


def test_ct_perfect_subtrees() -> None:
    for level, row in enumerate(CT_NODES):
        width = 1 << level
        for i, expected in enumerate(row):
            assert CT_NODE_SOURCE(i * width, (i + 1) * width) == expected


def test_ct_compact_range_hashes() -> None:
    # The compact range of n leaves holds one perfect subtree per set bit of n.
    expected = {
        0: [],
        1: [N0[0]],
        2: [N1[0]],
        3: [N1[0], N0[2]],
        4: [N2[0]],
        5: [N2[0], N0[4]],
        6: [N2[0], N1[2]],
        7: [N2[0], N1[2], N0[6]],
        8: [N3[0]],
    }
    tree = CompactRange(hasher=SHA256)
    for size in range(9):
        assert tree.size == size
        assert list(tree.hashes) == expected[size]
        if size < 8:
            tree.append(CT_LEAVES[size])


@pytest.mark.parametrize(("index", "size", "path"), CT_INCLUSION)
def test_ct_inclusion(index: int, size: int, path: list[bytes]) -> None:
    assert inclusion_proof(index, size, CT_NODE_SOURCE) == path
    leaf = CT_LEAVES[index]
    assert root_from_inclusion(leaf, index, size, path, hasher=SHA256) == CT_ROOTS[size]
    assert verify_inclusion(leaf, index, size, path, CT_ROOTS[size], hasher=SHA256)


@pytest.mark.parametrize(("old", "new", "proof"), CT_CONSISTENCY)
def test_ct_consistency(old: int, new: int, proof: list[bytes]) -> None:
    assert consistency_proof(old, new, CT_NODE_SOURCE) == proof
    assert verify_consistency(old, new, CT_ROOTS[old], CT_ROOTS[new], proof, hasher=SHA256)


# ---------------------------------------------------------------- hashing


def test_blake3_fast_path_matches_hasher() -> None:
    for data in (b"", b"x", bytes(range(256)) * 2):
        expected = blake3.blake3(b"\x00" + data).digest()
        assert leaf_hash(data) == BLAKE3.leaf(data) == expected
    left, right = leaf_hash(b"l"), leaf_hash(b"r")
    assert node_hash(left, right) == BLAKE3.node(left, right)
    assert node_hash(left, right) == blake3.blake3(b"\x01" + left + right).digest()
    assert BLAKE3.size == SHA256.size == HASH_SIZE == len(leaf_hash(b""))


def test_leaf_and_node_are_domain_separated() -> None:
    # A node's two children, presented as one record, must not hash to the node.
    left, right = leaf_hash(b"a"), leaf_hash(b"b")
    assert leaf_hash(left + right) != node_hash(left, right)


def test_hasher_rejects_wrong_digest_size() -> None:
    with pytest.raises(ValueError, match="digest is 32 bytes"):
        Hasher("short", hashlib.sha256, 20)


# ---------------------------------------------------------------- compact range


@cache
def leaves(n: int) -> tuple[bytes, ...]:
    return tuple(leaf_hash(i.to_bytes(4, "big")) for i in range(n))


def test_compact_range_root_matches_definition_for_every_size_to_300() -> None:
    tree = CompactRange()
    all_leaves = leaves(300)
    for size in range(301):
        assert tree.size == size
        assert len(tree.hashes) == size.bit_count()
        assert tree.root() == root_of(all_leaves[:size])
        if size < 300:
            tree.append(all_leaves[size])


@settings(max_examples=60, deadline=None)
@given(st.integers(min_value=0, max_value=5000))
def test_compact_range_root_matches_definition_for_random_sizes(size: int) -> None:
    tree = CompactRange()
    tree.extend(leaves(size))
    assert tree.root() == root_of(leaves(size))


def test_compact_range_state_round_trip_and_copy() -> None:
    tree = CompactRange()
    tree.extend(leaves(37))
    size, hashes = tree.to_state()
    restored = CompactRange.from_state(size, hashes)
    assert restored == tree
    assert restored.root() == tree.root()

    fork = tree.copy()
    fork.append(leaf_hash(b"more"))
    assert fork.size == 38
    assert tree.size == 37
    assert tree.root() == root_of(leaves(37))
    assert fork != tree

    # Continuing from a saved state is the same as never having stopped.
    restored.extend(leaves(100)[37:])
    assert restored.root() == root_of(leaves(100))


def test_compact_range_hashes_are_a_copy() -> None:
    tree = CompactRange()
    tree.extend(leaves(3))
    _, state_hashes = tree.to_state()
    state_hashes.clear()
    assert len(tree.hashes) == 2


def test_compact_range_rejects_bad_state() -> None:
    with pytest.raises(ValueError, match="2 perfect subtrees"):
        CompactRange(3, [leaf_hash(b"")])
    with pytest.raises(ValueError, match="negative"):
        CompactRange(-1)
    with pytest.raises(ValueError, match="expected 32"):
        CompactRange(1, [b"short"])
    with pytest.raises(ValueError, match="expected 32"):
        CompactRange().append(b"short")


# ---------------------------------------------------------------- node source


def test_leaf_nodes_match_definition_for_every_range() -> None:
    all_leaves = leaves(40)
    nodes = LeafNodes(all_leaves)
    for lo in range(40):
        for hi in range(lo + 1, 41):
            assert nodes(lo, hi) == root_of(all_leaves[lo:hi])


def test_leaf_nodes_large_range_matches_compact_range() -> None:
    # Big enough to go through many levels of the level-by-level hashing.
    many = [leaf_hash(i.to_bytes(4, "big")) for i in range((1 << 16) + 4321)]
    tree = CompactRange()
    tree.extend(many)
    assert LeafNodes(many)(0, len(many)) == tree.root()
    pruned = _pruned(many, 12345)
    assert pruned(0, len(many)) == tree.root()


def test_leaf_nodes_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="base covers 0 leaves but first is 3"):
        LeafNodes(leaves(5), 3)
    with pytest.raises(ValueError, match="base uses sha256"):
        LeafNodes(leaves(5), 0, CompactRange(hasher=SHA256))
    nodes = LeafNodes(leaves(5))
    with pytest.raises(ValueError, match="not within the 5 known leaves"):
        nodes(0, 6)
    with pytest.raises(ValueError, match="not within"):
        nodes(3, 2)
    with pytest.raises(ValueError, match="empty range"):
        nodes(2, 2)


def test_leaf_nodes_refuses_removed_leaves() -> None:
    nodes = _pruned(leaves(20), 8)
    assert nodes.first == 8
    assert nodes.end == 20
    with pytest.raises(ValueError, match="leaf 0 was removed"):
        nodes(0, 4)  # inside the removed perfect subtree [0, 8)
    with pytest.raises(ValueError, match="was removed"):
        inclusion_proof(3, 20, nodes)
    with pytest.raises(ValueError, match="was removed"):
        consistency_proof(5, 20, nodes)
    assert nodes(0, 8) == root_of(leaves(8))


# ---------------------------------------------------------------- inclusion


def _flip(value: bytes, at: int = 0) -> bytes:
    return value[:at] + bytes([value[at] ^ 0x01]) + value[at + 1 :]


def _reference_path(index: int, hashes: Sequence[bytes]) -> list[bytes]:
    """PATH(m, D[n]) exactly as RFC 9162 2.1.3.1 writes it, for cross-checking."""
    n = len(hashes)
    if n == 1:
        return []
    k = 1 << ((n - 1).bit_length() - 1)
    if index < k:
        return [*_reference_path(index, hashes[:k]), root_of(hashes[k:])]
    return [*_reference_path(index - k, hashes[k:]), root_of(hashes[:k])]


def test_inclusion_every_index_and_size_to_64() -> None:
    all_leaves = leaves(64)
    nodes = LeafNodes(all_leaves)
    for size in range(1, 65):
        root = root_of(all_leaves[:size])
        for index in range(size):
            leaf = all_leaves[index]
            path = inclusion_proof(index, size, nodes)
            assert path == _reference_path(index, all_leaves[:size])
            assert root_from_inclusion(leaf, index, size, path) == root
            assert verify_inclusion(leaf, index, size, path, root)
            _assert_inclusion_tampering_fails(leaf, index, size, path, root)


def _assert_inclusion_tampering_fails(
    leaf: bytes, index: int, size: int, path: list[bytes], root: bytes
) -> None:
    assert not verify_inclusion(_flip(leaf), index, size, path, root)
    assert not verify_inclusion(leaf, index, size, path, _flip(root, 31))
    for i in range(len(path)):
        bad = list(path)
        bad[i] = _flip(bad[i], i % HASH_SIZE)
        assert not verify_inclusion(leaf, index, size, bad, root)
    for other in {index - 1, index + 1, index ^ 2}:
        if 0 <= other < size:
            assert not verify_inclusion(leaf, other, size, path, root)
    assert not verify_inclusion(leaf, index, size * 2, path, root)
    if index < size // 2:
        assert not verify_inclusion(leaf, index, size // 2, path, root)
    assert not verify_inclusion(leaf, index, size, [*path, root], root)
    assert not verify_inclusion(leaf, index, size, [root, *path], root)
    if path:
        assert not verify_inclusion(leaf, index, size, path[:-1], root)
    if len(path) > 1:
        assert not verify_inclusion(leaf, index, size, path[::-1], root)


def test_inclusion_rejects_malformed() -> None:
    nodes = LeafNodes(leaves(8))
    with pytest.raises(ValueError, match="not in a tree of 8"):
        inclusion_proof(8, 8, nodes)
    with pytest.raises(ValueError, match="not in a tree of 0"):
        inclusion_proof(0, 0, nodes)

    leaf, root = leaves(8)[2], root_of(leaves(8))
    path = inclusion_proof(2, 8, nodes)
    with pytest.raises(ValueError, match="not in a tree"):
        root_from_inclusion(leaf, 8, 8, path)
    with pytest.raises(ValueError, match="too long"):
        root_from_inclusion(leaf, 2, 8, [*path, root])
    with pytest.raises(ValueError, match="too short"):
        root_from_inclusion(leaf, 2, 8, path[:-1])
    with pytest.raises(ValueError, match="path entry 1 is 3 bytes"):
        root_from_inclusion(leaf, 2, 8, [path[0], b"abc", path[2]])
    with pytest.raises(ValueError, match="leaf hash is 0 bytes"):
        root_from_inclusion(b"", 0, 1, [])
    assert not verify_inclusion(leaf, 8, 8, path, root)
    assert not verify_inclusion(leaf, -1, 8, path, root)
    assert not verify_inclusion(leaf, 2, 8, path[:-1], root)
    # A one-leaf tree: the leaf is the root and the path is empty.
    assert verify_inclusion(leaf, 0, 1, [], leaf)
    assert not verify_inclusion(leaf, 0, 1, [], root)


# ---------------------------------------------------------------- consistency


def _reference_subproof(m: int, hashes: Sequence[bytes], whole: bool) -> list[bytes]:
    """SUBPROOF(m, D[n], b) exactly as RFC 9162 2.1.4.1 writes it."""
    n = len(hashes)
    if m == n:
        return [] if whole else [root_of(hashes)]
    k = 1 << ((n - 1).bit_length() - 1)
    if m <= k:
        return [*_reference_subproof(m, hashes[:k], whole), root_of(hashes[k:])]
    return [*_reference_subproof(m - k, hashes[k:], False), root_of(hashes[:k])]


def test_consistency_every_pair_to_40() -> None:
    all_leaves = leaves(40)
    nodes = LeafNodes(all_leaves)
    roots = [root_of(all_leaves[:n]) for n in range(41)]
    for new in range(41):
        for old in range(new + 1):
            proof = consistency_proof(old, new, nodes)
            if 0 < old < new:
                assert proof == _reference_subproof(old, all_leaves[:new], True)
            else:
                assert proof == []
            assert verify_consistency(old, new, roots[old], roots[new], proof)
            if 0 < old < new:
                _assert_consistency_tampering_fails(old, new, roots, proof)


def _assert_consistency_tampering_fails(
    old: int, new: int, roots: list[bytes], proof: list[bytes]
) -> None:
    old_root, new_root = roots[old], roots[new]
    assert not verify_consistency(old, new, _flip(old_root), new_root, proof)
    assert not verify_consistency(old, new, old_root, _flip(new_root, 31), proof)
    assert not verify_consistency(old, new, new_root, old_root, proof)
    for i in range(len(proof)):
        bad = list(proof)
        bad[i] = _flip(bad[i], i % HASH_SIZE)
        assert not verify_consistency(old, new, old_root, new_root, bad)
    assert not verify_consistency(old, new, old_root, new_root, [])
    assert not verify_consistency(old, new, old_root, new_root, proof[:-1])
    assert not verify_consistency(old, new, old_root, new_root, [*proof, old_root])
    assert not verify_consistency(old, new, old_root, new_root, [new_root, *proof])
    for other in {old - 1, old + 1, old ^ 2}:
        if 0 < other < new:
            # The sizes change, the roots are those of the real sizes.
            assert not verify_consistency(other, new, old_root, new_root, proof)
    assert not verify_consistency(old, new * 2, old_root, new_root, proof)
    if old < new // 2:
        assert not verify_consistency(old, new // 2, old_root, new_root, proof)


def test_consistency_trivial_and_malformed_cases() -> None:
    a, b = root_of(leaves(3)), root_of(leaves(5))
    empty = BLAKE3.empty()
    assert verify_consistency(0, 0, empty, empty, [])
    assert verify_consistency(0, 5, empty, b, [])
    assert not verify_consistency(0, 5, a, b, [])  # the empty tree's root is H()
    assert not verify_consistency(0, 5, empty, b, [a])
    assert verify_consistency(3, 3, a, a, [])
    assert not verify_consistency(3, 3, a, b, [])
    assert not verify_consistency(3, 3, a, a, [a])
    assert not verify_consistency(5, 3, b, a, [])
    assert not verify_consistency(-1, 3, a, a, [])
    assert not verify_consistency(3, 5, a, b, [b"short"])
    assert not verify_consistency(3, 5, a[:-1], b, consistency_proof(3, 5, LeafNodes(leaves(5))))
    with pytest.raises(ValueError, match="from size 5 to 3"):
        consistency_proof(5, 3, LeafNodes(leaves(5)))


# ---------------------------------------------------------------- retention


def _pruned(all_leaves: Sequence[bytes], first: int) -> LeafNodes:
    """The node source left after retention removed leaves [0, first)."""
    base = CompactRange()
    base.extend(all_leaves[:first])
    return LeafNodes(all_leaves[first:], first, base)


def test_pruned_nodes_give_the_same_proofs_exhaustively() -> None:
    total = 33
    all_leaves = leaves(total)
    full = LeafNodes(all_leaves)
    for first in range(total + 1):
        pruned = _pruned(all_leaves, first)
        for size in range(max(first, 1), total + 1):
            assert pruned(0, size) == full(0, size)
            for index in range(first, size):
                assert inclusion_proof(index, size, pruned) == inclusion_proof(index, size, full)
            for old in range(first, size + 1):
                assert consistency_proof(old, size, pruned) == consistency_proof(old, size, full)


def test_pruned_nodes_removed_leaves_either_prove_identically_or_refuse() -> None:
    # A removed leaf can still be proved when every sibling on its path is a
    # retained subtree or a kept leaf (e.g. the last removed leaf when first is
    # odd); otherwise the node source must refuse, never return something else.
    total = 24
    all_leaves = leaves(total)
    full = LeafNodes(all_leaves)
    provable = 0
    for first in range(1, total + 1):
        pruned = _pruned(all_leaves, first)
        for size in range(first, total + 1):
            for index in range(first):
                try:
                    path = inclusion_proof(index, size, pruned)
                except ValueError:
                    continue
                provable += 1
                assert path == inclusion_proof(index, size, full)
    assert provable > 0


@cache
def _many_leaves() -> tuple[bytes, ...]:
    return leaves(3000)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_pruned_nodes_random_combinations(data: st.DataObject) -> None:
    all_leaves = _many_leaves()
    size = data.draw(st.integers(min_value=1, max_value=len(all_leaves)), label="size")
    first = data.draw(st.integers(min_value=0, max_value=size - 1), label="first")
    index = data.draw(st.integers(min_value=first, max_value=size - 1), label="index")
    old = data.draw(st.integers(min_value=first, max_value=size), label="old")
    full = LeafNodes(all_leaves[:size])
    pruned = _pruned(all_leaves[:size], first)
    root = root_of(all_leaves[:size])

    path = inclusion_proof(index, size, pruned)
    assert path == inclusion_proof(index, size, full)
    assert verify_inclusion(all_leaves[index], index, size, path, root)

    proof = consistency_proof(old, size, pruned)
    assert proof == consistency_proof(old, size, full)
    old_root = CompactRange(hasher=BLAKE3)
    old_root.extend(all_leaves[:old])
    assert verify_consistency(old, size, old_root.root(), root, proof)
