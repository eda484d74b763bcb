"""A Merkle tree over SHA-256, for committing to every holder's share commitments at once.

A dealer signs one root over its holders' commitments; each holder receives only its
own leaf and the sibling hashes on its path, so a mask request grows as
``O(n log n)`` bytes on the complete graph instead of ``O(n^2)``.

Construction (RFC 6962 style domain separation): a leaf is ``SHA-256(0x00 || data)``,
an inner node ``SHA-256(0x01 || left || right)``; a level with an odd number of nodes
promotes its last node unchanged. Guarantee: finding a leaf, index and path that
verify against a root other than the ones the tree was built from requires a
SHA-256 collision or second preimage.
"""

from __future__ import annotations

from collections.abc import Sequence

from .crypto import sha256

__all__ = ["leaf_hash", "merkle_path", "merkle_paths", "merkle_root", "merkle_verify"]


def leaf_hash(data: bytes) -> bytes:
    """The hash of one leaf."""
    return sha256(b"\x00" + data)


def _node(left: bytes, right: bytes) -> bytes:
    return sha256(b"\x01" + left + right)


def _levels(leaves: Sequence[bytes]) -> list[list[bytes]]:
    if not leaves:
        raise ValueError("a Merkle tree needs at least one leaf")
    levels = [[leaf_hash(x) for x in leaves]]
    while len(levels[-1]) > 1:
        cur = levels[-1]
        nxt = [_node(cur[i], cur[i + 1]) for i in range(0, len(cur) - 1, 2)]
        if len(cur) % 2:
            nxt.append(cur[-1])
        levels.append(nxt)
    return levels


def merkle_root(leaves: Sequence[bytes]) -> bytes:
    """The root over ``leaves`` (their data, in order)."""
    return _levels(leaves)[-1][0]


def merkle_path(leaves: Sequence[bytes], index: int) -> list[bytes]:
    """The sibling hashes from leaf ``index`` up to the root (none where a node is
    promoted without a sibling)."""
    if not 0 <= index < len(leaves):
        raise ValueError(f"leaf index {index} outside 0..{len(leaves) - 1}")
    path = []
    for level in _levels(leaves)[:-1]:
        sibling = index ^ 1
        if sibling < len(level):
            path.append(level[sibling])
        index //= 2
    return path


def merkle_paths(leaves: Sequence[bytes]) -> tuple[bytes, list[list[bytes]]]:
    """The root and every leaf's path, building the tree once."""
    levels = _levels(leaves)
    paths: list[list[bytes]] = []
    for index in range(len(leaves)):
        path, i = [], index
        for level in levels[:-1]:
            if i ^ 1 < len(level):
                path.append(level[i ^ 1])
            i //= 2
        paths.append(path)
    return levels[-1][0], paths


def merkle_verify(data: bytes, index: int, count: int, path: Sequence[bytes],
                  root: bytes) -> bool:
    """Whether ``data`` is leaf ``index`` of a tree of ``count`` leaves with ``root``."""
    if not 0 <= index < count:
        return False
    h, size, steps = leaf_hash(data), count, list(path)
    while size > 1:
        sibling = index ^ 1
        if sibling < size:
            if not steps:
                return False
            other = steps.pop(0)
            h = _node(h, other) if index % 2 == 0 else _node(other, h)
        index //= 2
        size = (size + 1) // 2
    return not steps and h == root
