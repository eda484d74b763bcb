"""Partitioning (IID, Dirichlet label skew, quantity skew, by a column): properties
checked with hypothesis."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bract.data import (
    DataError,
    FederatedDataset,
    column_partition,
    dataset_partitions,
    dirichlet_partition,
    iid_partition,
    load_dataset,
    partition_dataset,
    partition_indices,
    quantity_skew_partition,
    resolve_column,
)


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


# ---------------------------------------------------------------- non-IID schemes


def _assert_exact_cover(parts: list[np.ndarray], n: int, k: int, min_size: int) -> None:
    assert len(parts) == k
    assert all(p.dtype == np.int64 for p in parts)
    assert all(np.all(np.diff(p) > 0) for p in parts)  # sorted, no repeats
    allidx = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    np.testing.assert_array_equal(np.sort(allidx), np.arange(n))  # exactly once
    assert min(len(p) for p in parts) >= min_size


@st.composite
def labelled(draw: st.DrawFn) -> tuple[np.ndarray, int, float, int, int]:
    n = draw(st.integers(min_value=1, max_value=600))
    n_classes = draw(st.integers(min_value=1, max_value=8))
    labels = np.asarray(
        draw(st.lists(st.integers(0, n_classes - 1), min_size=n, max_size=n)), dtype=np.int64
    )
    min_size = draw(st.integers(min_value=0, max_value=min(5, n)))
    k = draw(st.integers(min_value=1, max_value=min(32, n // max(min_size, 1))))
    alpha = draw(st.floats(min_value=0.01, max_value=100.0))
    seed = draw(st.integers(min_value=0, max_value=2**32 - 1))
    return labels, k, alpha, seed, min_size


@settings(max_examples=150, deadline=None)
@given(labelled())
def test_dirichlet_every_sample_once_and_min_size(args) -> None:
    labels, k, alpha, seed, min_size = args
    parts = dirichlet_partition(labels, k, alpha, seed, min_size=min_size)
    _assert_exact_cover(parts, len(labels), k, min_size)


@settings(max_examples=60, deadline=None)
@given(labelled())
def test_dirichlet_reproducible_by_seed(args) -> None:
    labels, k, alpha, seed, min_size = args
    a = dirichlet_partition(labels, k, alpha, seed, min_size=min_size)
    b = dirichlet_partition(labels, k, alpha, seed, min_size=min_size)
    assert all(np.array_equal(p, q) for p, q in zip(a, b, strict=True))


@settings(max_examples=150, deadline=None)
@given(labelled())
def test_quantity_skew_every_sample_once_and_min_size(args) -> None:
    labels, k, alpha, seed, min_size = args
    n = len(labels)
    parts = quantity_skew_partition(n, k, alpha, seed, min_size=min_size)
    _assert_exact_cover(parts, n, k, min_size)
    again = quantity_skew_partition(n, k, alpha, seed, min_size=min_size)
    assert all(np.array_equal(p, q) for p, q in zip(parts, again, strict=True))


@st.composite
def column_case(draw: st.DrawFn) -> tuple[np.ndarray, int, int]:
    n = draw(st.integers(min_value=1, max_value=400))
    if draw(st.booleans()):  # categorical: a few sites, as strings
        n_sites = draw(st.integers(min_value=1, max_value=12))
        values = np.asarray([f"site-{v}" for v in draw(
            st.lists(st.integers(0, n_sites - 1), min_size=n, max_size=n))])
    else:  # continuous, with ties
        values = np.asarray(draw(st.lists(
            st.floats(min_value=0, max_value=100, allow_nan=False).map(lambda f: round(f, 1)),
            min_size=n, max_size=n)))
    k = draw(st.integers(min_value=1, max_value=min(n, 16)))
    return values, k, n


@settings(max_examples=150, deadline=None)
@given(column_case())
def test_column_partition_covers_once_keeps_groups_and_orders_bands(args) -> None:
    values, k, n = args
    try:
        parts = column_partition(values, k)
    except DataError as err:  # only when there are fewer groups than hospitals
        assert "distinct value" in str(err)
        assert len(np.unique(values)) < k
        return
    _assert_exact_cover(parts, n, k, 1)
    owner = np.empty(n, np.int64)
    for j, p in enumerate(parts):
        owner[p] = j
    distinct = len(np.unique(values))
    if values.dtype.kind in "US" or distinct <= 16:
        # categorical: every value lives in exactly one partition
        for v in np.unique(values):
            assert len(np.unique(owner[values == v])) == 1
    else:
        # quantile bands: values of partition j never exceed those of partition j + 1
        for a, b in itertools.pairwise(parts):
            assert values[a].max() <= values[b].min()
        sizes = [len(p) for p in parts]
        assert max(sizes) - min(sizes) <= 1
    assert all(np.array_equal(p, q) for p, q in zip(parts, column_partition(values, k),
                                                     strict=True))


def test_column_partition_min_size_zero_allows_empty_hospitals() -> None:
    values = np.array(["a", "a", "b"])
    with pytest.raises(DataError, match=r"2 distinct value.*1 hospital"):
        column_partition(values, 3)
    parts = column_partition(values, 3, min_size=0)
    assert sorted(len(p) for p in parts) == [0, 1, 2]


def test_column_partition_one_value_per_hospital_and_balanced_grouping() -> None:
    values = np.array([3, 1, 2, 1, 3, 3, 2])
    parts = column_partition(values, 3, kind="categorical")
    assert sorted(tuple(np.unique(values[p])) for p in parts) == [(1,), (2,), (3,)]
    # 5 groups of sizes 5,4,3,2,1 over 2 hospitals: largest first to the smallest: 8 and 7
    grouped = np.repeat(np.arange(5), [5, 4, 3, 2, 1])
    sizes = sorted(len(p) for p in column_partition(grouped, 2, kind="categorical"))
    assert sizes == [7, 8]


def test_column_partition_kinds_and_errors() -> None:
    ages = np.arange(40, dtype=float)
    q = column_partition(ages, 4)  # auto: 40 distinct numbers -> quantile bands
    assert [p.tolist() for p in q] == [list(range(i, i + 10)) for i in (0, 10, 20, 30)]
    assert len(column_partition(np.arange(40) % 4, 4)) == 4  # auto: 4 values -> categorical
    with pytest.raises(DataError, match="numeric"):
        column_partition(np.array(["a", "b", "c"]), 2, kind="quantile")
    with pytest.raises(DataError, match="NaN"):
        column_partition(np.array([1.0, np.nan, 2.0]), 2)
    with pytest.raises(DataError, match="kind"):
        column_partition(ages, 2, kind="bins")


def test_small_alpha_skews_labels_and_large_alpha_does_not() -> None:
    labels = np.repeat(np.arange(4), 500)

    def label_spread(alpha: float) -> float:
        """Mean over hospitals of the largest class share (0.25 = balanced, 1 = one class)."""
        parts = dirichlet_partition(labels, 5, alpha, seed=0)
        return float(np.mean([np.bincount(labels[p], minlength=4).max() / len(p) for p in parts]))

    assert label_spread(0.05) > 0.6
    assert label_spread(1000.0) < 0.3


def test_small_alpha_skews_quantities_and_large_alpha_does_not() -> None:
    def size_ratio(alpha: float) -> float:
        sizes = [len(p) for p in quantity_skew_partition(5000, 5, alpha, seed=1)]
        return max(sizes) / min(sizes)

    assert size_ratio(0.1) > 10
    assert size_ratio(1000.0) < 1.2


def test_dirichlet_tops_up_empty_partitions() -> None:
    # alpha this small puts each class on one hospital: most would be empty without top-up
    labels = np.zeros(100, dtype=np.int64)
    parts = dirichlet_partition(labels, 10, 0.001, seed=3, min_size=4)
    assert min(len(p) for p in parts) >= 4
    assert max(len(p) for p in parts) >= 60  # still skewed: the top-up moves the fewest


@pytest.mark.parametrize(
    ("call", "needle"),
    [
        (lambda: dirichlet_partition([0, 1, 1], 2, 0.0, 0), "alpha must be"),
        (lambda: dirichlet_partition([0, 1, 1], 2, float("inf"), 0), "alpha must be"),
        (lambda: dirichlet_partition([0, 1, 1], 4, 0.5, 0), "empty partition"),
        (lambda: dirichlet_partition(np.zeros((2, 2)), 1, 0.5, 0), "1-D"),
        (lambda: quantity_skew_partition(10, 3, 0.5, 0, min_size=4), "12 samples"),
        (lambda: quantity_skew_partition(10, 3, -1.0, 0), "alpha must be"),
        (lambda: partition_indices("pathological", 2, 0, n_samples=4), "unknown partition"),
        (lambda: partition_indices("dirichlet", 2, 0, n_samples=4), "needs the labels"),
        (lambda: partition_indices("column", 2, 0, n_samples=4), "column's values"),
    ],
)
def test_bad_partition_arguments_name_the_problem(call, needle) -> None:
    with pytest.raises(DataError, match=needle):
        call()


def test_partition_indices_dispatches_to_each_scheme() -> None:
    labels = np.arange(60) % 3
    assert all(np.array_equal(a, b) for a, b in zip(
        partition_indices("iid", 4, 7, labels=labels), iid_partition(60, 4, 7), strict=True))
    assert all(np.array_equal(a, b) for a, b in zip(
        partition_indices("dirichlet", 4, 7, labels=labels, alpha=0.3),
        dirichlet_partition(labels, 4, 0.3, 7), strict=True))
    assert all(np.array_equal(a, b) for a, b in zip(
        partition_indices("quantity", 4, 7, n_samples=60, alpha=0.3),
        quantity_skew_partition(60, 4, 0.3, 7), strict=True))
    assert all(np.array_equal(a, b) for a, b in zip(
        partition_indices("column", 3, 7, values=labels), column_partition(labels, 3),
        strict=True))


@pytest.mark.parametrize(
    ("scheme", "column"), [("iid", None), ("dirichlet", None), ("quantity", None),
                           ("column", "label"), ("column", "mean radius"), ("column", "0")],
)
def test_partition_dataset_schemes_cover_the_training_split(scheme, column) -> None:
    ds = load_dataset("breast-cancer", seed=3)
    parts = [
        partition_dataset(ds, 2, i, seed=5, scheme=scheme, alpha=0.3, column=column)
        for i in range(2)
    ]
    assert sum(len(y) for _, y in parts) == ds.n_train
    key = lambda a: a[np.lexsort(a.T[::-1])]  # noqa: E731
    np.testing.assert_array_equal(key(np.concatenate([x for x, _ in parts])), key(ds.x_train))


def test_column_partition_of_a_dataset_uses_original_units() -> None:
    ds = load_dataset("diabetes", seed=0)
    # sex is 1 or 2 in the raw data: two hospitals, one sex each
    parts = dataset_partitions(ds, 2, 0, scheme="column", column="sex")
    assert sorted(np.unique(ds.train_columns["sex"][p]).tolist() for p in parts) == [[1.0], [2.0]]
    with pytest.raises(DataError, match="2 distinct value"):
        dataset_partitions(ds, 3, 0, scheme="column", column="sex")
    # age (many values): quantile bands, youngest hospital first
    bands = dataset_partitions(ds, 3, 0, scheme="column", column="age")
    ages = ds.train_columns["age"]
    assert ages[bands[0]].max() <= ages[bands[1]].min() <= ages[bands[2]].min()
    np.testing.assert_array_equal(resolve_column(ds, "0"), ages)  # index 0 is age


def test_dirichlet_on_regression_skews_target_quartiles() -> None:
    ds = load_dataset("diabetes", seed=0)
    parts = dataset_partitions(ds, 4, 0, scheme="dirichlet", alpha=0.05)
    assert sorted(np.concatenate(parts).tolist()) == list(range(ds.n_train))
    means = [float(ds.y_train[p].mean()) for p in parts]
    assert max(means) - min(means) > 60  # hospitals see very different targets


def test_resolve_column_errors_list_the_choices() -> None:
    ds = load_dataset("breast-cancer")
    with pytest.raises(DataError, match=r"no column 'height'.*label.*mean radius"):
        resolve_column(ds, "height")
    with pytest.raises(DataError, match="out of range"):
        resolve_column(ds, "30")
    images = FederatedDataset(
        "img", np.zeros((4, 1, 4, 4), np.float32), np.array([0, 1, 0, 1]),
        np.zeros((2, 1, 4, 4), np.float32), np.array([0, 1]), 2, (1, 4, 4),
    )
    np.testing.assert_array_equal(resolve_column(images, "label"), [0, 1, 0, 1])
    with pytest.raises(DataError, match="no column 'age'"):
        resolve_column(images, "age")
    with pytest.raises(DataError, match="needs a column"):
        dataset_partitions(images, 2, 0, scheme="column")


def test_too_few_samples_is_worded_for_the_command_line() -> None:
    """The refusal names the CLI's flags, not a Python argument (bract's users meet it
    through --clients and --samples)."""
    with pytest.raises(DataError) as refused:
        iid_partition(2, 3, 0)
    text = str(refused.value)
    assert "empty partition" in text and "--clients" in text and "--samples" in text
    assert "min_size" not in text
