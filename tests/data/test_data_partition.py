"""IID partitioning: properties checked with hypothesis."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bract.data import iid_partition, load_dataset, partition_dataset


@st.composite
def sizes(draw: st.DrawFn) -> tuple[int, int, int]:
    n = draw(st.integers(min_value=1, max_value=2000))
    k = draw(st.integers(min_value=1, max_value=min(n, 64)))
    seed = draw(st.integers(min_value=0, max_value=2**32 - 1))
    return n, k, seed


@settings(max_examples=150, deadline=None)
@given(sizes())
def test_every_index_exactly_once(args: tuple[int, int, int]) -> None:
    n, k, seed = args
    parts = iid_partition(n, k, seed)
    assert len(parts) == k
    allidx = np.concatenate(parts)
    assert len(allidx) == n
    np.testing.assert_array_equal(np.sort(allidx), np.arange(n))
    assert all(p.dtype == np.int64 for p in parts)


@settings(max_examples=150, deadline=None)
@given(sizes())
def test_sizes_differ_by_at_most_one(args: tuple[int, int, int]) -> None:
    n, k, seed = args
    lens = [len(p) for p in iid_partition(n, k, seed)]
    assert max(lens) - min(lens) <= 1
    assert min(lens) >= 1


@settings(max_examples=50, deadline=None)
@given(sizes())
def test_reproducible_by_seed(args: tuple[int, int, int]) -> None:
    n, k, seed = args
    a = iid_partition(n, k, seed)
    b = iid_partition(n, k, seed)
    assert all(np.array_equal(p, q) for p, q in zip(a, b, strict=True))


def test_different_seeds_give_different_splits() -> None:
    a = iid_partition(1000, 4, 0)
    b = iid_partition(1000, 4, 1)
    assert not all(np.array_equal(p, q) for p, q in zip(a, b, strict=True))


@given(st.integers(min_value=0, max_value=100), st.integers(max_value=0))
def test_rejects_fewer_than_one_partition(n: int, k: int) -> None:
    with pytest.raises(ValueError, match="num_partitions must be >= 1"):
        iid_partition(n, k, 0)


@given(st.integers(min_value=0, max_value=100), st.integers(min_value=1, max_value=50))
def test_rejects_more_partitions_than_samples(n: int, extra: int) -> None:
    with pytest.raises(ValueError, match="empty"):
        iid_partition(n, n + extra, 0)


def test_partition_dataset_covers_training_split() -> None:
    ds = load_dataset("breast-cancer", seed=3)
    parts = [partition_dataset(ds, 5, i, seed=11) for i in range(5)]
    assert sum(len(y) for _, y in parts) == ds.n_train
    xs = np.concatenate([x for x, _ in parts])
    # same multiset of rows as the training split
    key = lambda a: a[np.lexsort(a.T[::-1])]  # noqa: E731
    np.testing.assert_array_equal(key(xs), key(ds.x_train))
    x0, y0 = partition_dataset(ds, 5, 0, seed=11)
    np.testing.assert_array_equal(x0, parts[0][0])
    np.testing.assert_array_equal(y0, parts[0][1])


@pytest.mark.parametrize("pid", [-1, 5, 100])
def test_partition_dataset_rejects_bad_id(pid: int) -> None:
    ds = load_dataset("breast-cancer")
    with pytest.raises(ValueError, match="partition_id"):
        partition_dataset(ds, 5, pid, seed=0)
