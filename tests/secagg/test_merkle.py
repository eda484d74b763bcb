"""The Merkle tree the share commitments are signed through: every leaf verifies with
its own path, and no change to leaf, index, count, path or root verifies."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from bract.secagg.merkle import merkle_path, merkle_root, merkle_verify


@settings(max_examples=100, deadline=None)
@given(st.lists(st.binary(min_size=1, max_size=70), min_size=1, max_size=140), st.data())
def test_every_leaf_verifies_and_nothing_else_does(leaves, data) -> None:
    root = merkle_root(leaves)
    n = len(leaves)
    i = data.draw(st.integers(0, n - 1))
    path = merkle_path(leaves, i)
    assert len(path) <= max(1, (n - 1).bit_length())
    assert merkle_verify(leaves[i], i, n, path, root)
    assert not merkle_verify(leaves[i] + b"x", i, n, path, root)
    j = data.draw(st.integers(0, n - 1))
    if leaves[j] != leaves[i]:
        assert not merkle_verify(leaves[j], i, n, path, root)  # another holder's leaf
    if n > 1:
        k = data.draw(st.integers(0, n - 1).filter(lambda k: k != i))
        assert not merkle_verify(leaves[i], k, n, path, root) or leaves[k] == leaves[i]
    if path:
        bad = list(path)
        bad[0] = bytes([bad[0][0] ^ 1]) + bad[0][1:]
        assert not merkle_verify(leaves[i], i, n, bad, root)
        assert not merkle_verify(leaves[i], i, n, path[:-1], root)
    assert not merkle_verify(leaves[i], i, n, [*path, root], root)
    assert not merkle_verify(leaves[i], i, n, path, bytes(32))
    assert not merkle_verify(leaves[i], n, n, path, root)


def test_roots_differ_when_any_leaf_or_the_order_differs() -> None:
    leaves = [bytes([i]) * 3 for i in range(9)]
    root = merkle_root(leaves)
    assert merkle_root(leaves[::-1]) != root
    assert merkle_root([*leaves[:-1], b"zz"]) != root
    assert merkle_root(leaves[:-1]) != root
