"""Splitting a training set between hospitals (federation partitions).

Four schemes, all returning one sorted ``int64`` index array per hospital:

* :func:`iid_partition`: uniform at random, sizes within one of each other;
* :func:`dirichlet_partition`: label skew, each class spread over the hospitals
  in Dirichlet(``alpha``) proportions (small ``alpha``: each hospital sees few
  classes; large ``alpha``: close to IID);
* :func:`quantity_skew_partition`: hospitals of Dirichlet(``alpha``) sizes, with
  labels spread at random;
* :func:`column_partition`: a natural split by a column, e.g. one hospital per
  value of a categorical column (a site id), or quantile bins of a continuous
  one (age bands).

Common guarantees: every index in ``[0, n)`` is in exactly one partition; every
partition holds at least ``min_size`` indices (default 1: no empty hospital;
``min_size=0`` allows empty ones), or a :class:`~bract.data.errors.DataError`
says why that is impossible; the same arguments (seed included) give the same
partitions. Seeds drive ``numpy.random.default_rng``: partitions are meant to be
reproducible, not secret.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from bract.data.errors import DataError

if TYPE_CHECKING:
    from bract.data.tabular import FederatedDataset

__all__ = [
    "COLUMN_KINDS",
    "LABEL_COLUMN",
    "PARTITION_SCHEMES",
    "REGRESSION_LABEL_BINS",
    "column_partition",
    "dataset_partitions",
    "dirichlet_partition",
    "iid_partition",
    "partition_dataset",
    "partition_indices",
    "quantity_skew_partition",
    "resolve_column",
]

#: The partition schemes :func:`partition_indices` and :func:`partition_dataset` know.
PARTITION_SCHEMES: tuple[str, ...] = ("iid", "dirichlet", "quantity", "column")
#: How :func:`column_partition` reads a column.
COLUMN_KINDS: tuple[str, ...] = ("auto", "categorical", "quantile")
#: The column name that means "the label (or regression target)" in :func:`dataset_partitions`.
LABEL_COLUMN = "label"
#: Regression targets are cut into this many quantile bins for Dirichlet label skew.
REGRESSION_LABEL_BINS = 4
#: In ``kind="auto"``, a numeric column with at most this many distinct values is categorical.
AUTO_CATEGORICAL_MAX = 16


def _check_counts(n_samples: int, num_partitions: int, min_size: int) -> None:
    if n_samples < 0:
        raise DataError(f"n_samples must be >= 0, got {n_samples}")
    if num_partitions < 1:
        raise DataError(f"num_partitions must be >= 1, got {num_partitions}")
    if min_size < 0:
        raise DataError(f"min_size must be >= 0, got {min_size}")
    if num_partitions * min_size > n_samples:
        # Worded for the command line: bract's commands reach this with their
        # --clients hospitals and the training samples of --samples or the data given.
        raise DataError(
            f"{num_partitions} hospitals of at least {min_size} sample(s) each need "
            f"{num_partitions * min_size} samples to train on but there are {n_samples}: "
            "some hospital would get an empty partition. Use fewer hospitals (--clients) "
            "or more data (a larger --samples, or a larger dataset)."
        )


def _check_alpha(alpha: float) -> None:
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
        raise DataError(
            f"alpha must be a finite number > 0 (small: strong skew, large: close to IID), "
            f"got {alpha!r}"
        )


def _from_owner(owner: np.ndarray, num_partitions: int) -> list[np.ndarray]:
    """Sorted index arrays from an owner-per-sample array."""
    order = np.argsort(owner, kind="stable")
    counts = np.bincount(owner, minlength=num_partitions)
    return [part.astype(np.int64) for part in np.split(order, np.cumsum(counts)[:-1])]


def _top_up(
    owner: np.ndarray, num_partitions: int, min_size: int, rng: np.random.Generator
) -> None:
    """Move random samples from the largest partitions to those below ``min_size``.

    Moves the fewest samples needed; feasible because ``n >= num_partitions * min_size``.
    """
    counts = np.bincount(owner, minlength=num_partitions)
    for j in np.flatnonzero(counts < min_size):
        while counts[j] < min_size:
            donor = int(np.argmax(counts))
            give = int(min(min_size - counts[j], counts[donor] - min_size))
            members = np.flatnonzero(owner == donor)
            moved = rng.choice(members, size=give, replace=False)
            owner[moved] = j
            counts[donor] -= give
            counts[j] += give


def _split_points(proportions: np.ndarray, total: int) -> np.ndarray:
    """Cut points splitting ``total`` items in the given proportions (sum exactly ``total``)."""
    cum = np.cumsum(proportions / proportions.sum())[:-1]
    return np.clip(np.round(cum * total).astype(np.int64), 0, total)


def iid_partition(n_samples: int, num_partitions: int, seed: int) -> list[np.ndarray]:
    """Split ``range(n_samples)`` uniformly at random into ``num_partitions`` parts.

    Guarantees: every index in ``[0, n_samples)`` appears in exactly one
    partition; partition sizes differ by at most one (no partition is empty);
    the result depends only on the arguments (same seed, same split). Each
    returned array is ``int64`` and sorted ascending.

    Raises ValueError if ``num_partitions < 1`` or ``num_partitions > n_samples``.
    """
    _check_counts(n_samples, num_partitions, 1)
    perm = np.random.default_rng(seed).permutation(n_samples)
    return [np.sort(part).astype(np.int64) for part in np.array_split(perm, num_partitions)]


def dirichlet_partition(
    labels: Sequence[int] | np.ndarray,
    num_partitions: int,
    alpha: float,
    seed: int,
    min_size: int = 1,
) -> list[np.ndarray]:
    """Label-skewed split: each class is divided between the partitions in
    proportions drawn from Dirichlet(``alpha``, ..., ``alpha``) (Hsu et al. 2019).

    Small ``alpha`` (0.1) gives each hospital mostly one or two classes; large
    ``alpha`` (100) approaches an IID split. If a draw leaves a partition below
    ``min_size``, the fewest samples needed are moved to it at random from the
    largest partitions (this softens the skew only when ``alpha`` is tiny).

    Guarantees: the common ones of this module (exactly once, ``>= min_size``,
    reproducible by seed). Raises :class:`DataError` for ``alpha <= 0`` or too
    few samples for ``num_partitions * min_size``.
    """
    y = np.asarray(labels)
    if y.ndim != 1:
        raise DataError(f"labels must be one label per sample (1-D), got shape {y.shape}")
    _check_alpha(alpha)
    _check_counts(len(y), num_partitions, min_size)
    rng = np.random.default_rng(seed)
    owner = np.empty(len(y), dtype=np.int64)
    for cls in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == cls))
        proportions = rng.dirichlet(np.full(num_partitions, float(alpha)))
        if not np.all(np.isfinite(proportions)) or proportions.sum() <= 0:
            # numpy can underflow to 0/0 for extremely small alpha: all to one partition.
            proportions = np.eye(num_partitions)[rng.integers(num_partitions)]
        for j, chunk in enumerate(np.split(members, _split_points(proportions, len(members)))):
            owner[chunk] = j
    _top_up(owner, num_partitions, min_size, rng)
    return _from_owner(owner, num_partitions)


def quantity_skew_partition(
    n_samples: int,
    num_partitions: int,
    alpha: float,
    seed: int,
    min_size: int = 1,
) -> list[np.ndarray]:
    """Size-skewed split: partition sizes are ``min_size`` plus a Dirichlet(``alpha``)
    share of the rest; which samples go where is uniform at random.

    Small ``alpha`` gives a few large hospitals and many small ones; large
    ``alpha`` gives near-equal sizes. Guarantees: the common ones of this module
    (exactly once, ``>= min_size``, reproducible by seed). Raises
    :class:`DataError` for ``alpha <= 0`` or too few samples.
    """
    _check_alpha(alpha)
    _check_counts(n_samples, num_partitions, min_size)
    rng = np.random.default_rng(seed)
    proportions = rng.dirichlet(np.full(num_partitions, float(alpha)))
    if not np.all(np.isfinite(proportions)) or proportions.sum() <= 0:
        proportions = np.eye(num_partitions)[rng.integers(num_partitions)]
    rest = n_samples - num_partitions * min_size
    extra = np.diff(np.concatenate([[0], _split_points(proportions, rest), [rest]]))
    sizes = extra + min_size
    perm = rng.permutation(n_samples)
    parts = np.split(perm, np.cumsum(sizes)[:-1])
    return [np.sort(p).astype(np.int64) for p in parts]


def _is_numeric(values: np.ndarray) -> bool:
    return bool(
        np.issubdtype(values.dtype, np.number) and not np.issubdtype(values.dtype, np.bool_)
    )


def column_partition(
    values: Sequence[object] | np.ndarray,
    num_partitions: int,
    *,
    kind: str = "auto",
    min_size: int = 1,
) -> list[np.ndarray]:
    """Natural split by a column of per-sample values (no randomness).

    * ``kind="categorical"``: samples with the same value always share a
      partition. With as many distinct values as partitions, each partition
      holds one value; with more values, whole groups are dealt out largest
      first to the currently smallest partition (balanced sizes); with fewer
      values than partitions, some partitions would be empty, which is an error
      unless ``min_size=0``.
    * ``kind="quantile"``: samples sorted by value (stable, ties kept in index
      order) are cut into ``num_partitions`` contiguous bands of near-equal size:
      every value in partition ``j`` is ``<=`` every value in partition ``j+1``
      (tied values at a band edge may fall on either side).
    * ``kind="auto"``: categorical for non-numeric or boolean columns and for
      numeric ones with at most 16 distinct values (e.g. a site id or sex);
      quantile bins otherwise (e.g. age).

    Guarantees: the common ones of this module; the result depends only on the
    values (and ``kind``). Raises :class:`DataError` for NaN values, an unknown
    ``kind``, or a partition that would hold fewer than ``min_size`` samples.
    """
    v = np.asarray(values)
    if v.ndim != 1:
        raise DataError(f"a column must hold one value per sample (1-D), got shape {v.shape}")
    if kind not in COLUMN_KINDS:
        raise DataError(f"unknown column kind {kind!r}; choose one of {COLUMN_KINDS}")
    _check_counts(len(v), num_partitions, min_size)
    numeric = _is_numeric(v)
    if numeric and not np.isfinite(v.astype(np.float64)).all():
        raise DataError("the partition column holds NaN or infinite values; fill or drop them")
    if kind == "auto":
        distinct = len(np.unique(v)) if len(v) else 0
        kind = "quantile" if numeric and distinct > AUTO_CATEGORICAL_MAX else "categorical"
    if kind == "quantile":
        if not numeric:
            raise DataError("quantile bins need a numeric column; use kind='categorical'")
        order = np.argsort(v, kind="stable")
        return [np.sort(p).astype(np.int64) for p in np.array_split(order, num_partitions)]

    groups, codes = np.unique(v.astype(str) if not numeric else v, return_inverse=True)
    codes = codes.reshape(-1)
    group_sizes = np.bincount(codes, minlength=len(groups))
    if len(groups) < num_partitions and min_size > 0:
        raise DataError(
            f"the column has {len(groups)} distinct value(s) ({_preview(groups)}) for "
            f"{num_partitions} hospitals: each value stays in one hospital, so "
            f"{num_partitions - len(groups)} hospital(s) would be empty. Use at most "
            f"{len(groups)} hospitals, a column with more values, or quantile bins."
        )
    sizes = np.zeros(num_partitions, dtype=np.int64)
    group_owner = np.empty(len(groups), dtype=np.int64)
    # Largest group first (ties: by value order) to the smallest partition (ties: lowest index).
    for g in sorted(range(len(groups)), key=lambda g: (-group_sizes[g], g)):
        j = int(np.argmin(sizes))
        group_owner[g] = j
        sizes[j] += group_sizes[g]
    if sizes.min() < min_size:
        j = int(np.argmin(sizes))
        raise DataError(
            f"partition {j} would hold {int(sizes[j])} sample(s), fewer than min_size="
            f"{min_size}: the column's groups are too uneven for {num_partitions} hospitals"
        )
    return _from_owner(group_owner[codes], num_partitions)


def _preview(groups: np.ndarray, k: int = 5) -> str:
    shown = ", ".join(str(g) for g in groups[:k])
    return shown + (", ..." if len(groups) > k else "")


def partition_indices(
    scheme: str,
    num_partitions: int,
    seed: int,
    *,
    n_samples: int | None = None,
    labels: Sequence[int] | np.ndarray | None = None,
    values: Sequence[object] | np.ndarray | None = None,
    alpha: float = 0.5,
    min_size: int = 1,
    column_kind: str = "auto",
) -> list[np.ndarray]:
    """One entry point for every scheme in :data:`PARTITION_SCHEMES`.

    ``iid`` and ``quantity`` need ``n_samples`` (or ``labels`` for their length);
    ``dirichlet`` needs ``labels``; ``column`` needs ``values``. ``iid`` always
    gives non-empty partitions of near-equal size (``min_size`` is not used).
    Raises :class:`DataError` for an unknown scheme or a missing input.
    """
    if scheme not in PARTITION_SCHEMES:
        raise DataError(f"unknown partition scheme {scheme!r}; choose one of {PARTITION_SCHEMES}")
    if n_samples is None and labels is not None:
        n_samples = len(labels)
    if scheme == "iid":
        if n_samples is None:
            raise DataError("the iid scheme needs n_samples")
        return iid_partition(n_samples, num_partitions, seed)
    if scheme == "quantity":
        if n_samples is None:
            raise DataError("the quantity scheme needs n_samples")
        return quantity_skew_partition(n_samples, num_partitions, alpha, seed, min_size)
    if scheme == "dirichlet":
        if labels is None:
            raise DataError("the dirichlet scheme needs the labels")
        return dirichlet_partition(labels, num_partitions, alpha, seed, min_size)
    if values is None:
        raise DataError("the column scheme needs the column's values")
    return column_partition(values, num_partitions, kind=column_kind, min_size=min_size)


def _regression_bins(y: np.ndarray) -> np.ndarray:
    """Quantile-bin codes of a regression target (for label skew)."""
    edges = np.quantile(y, np.linspace(0, 1, REGRESSION_LABEL_BINS + 1)[1:-1])
    return np.searchsorted(edges, y, side="right").astype(np.int64)


def resolve_column(ds: FederatedDataset, column: str) -> np.ndarray:
    """The training split's values of ``column``: ``"label"`` (the labels, or the
    regression target), a name in ``ds.train_columns``, or a feature index
    (``"0"``, ``"1"``, ...) into ``ds.feature_names``.

    Raises :class:`DataError` listing the valid names when ``column`` is none of these.
    """
    column = str(column).strip()
    if column == LABEL_COLUMN:
        return ds.y_train
    if column in ds.train_columns:
        return np.asarray(ds.train_columns[column])
    if column.lstrip("-").isdigit():
        j = int(column)
        if not ds.feature_names or not 0 <= j < len(ds.feature_names):
            raise DataError(
                f"column index {j} is out of range for dataset {ds.name!r}, which has "
                f"{len(ds.feature_names)} named feature column(s)"
                + (f" (0..{len(ds.feature_names) - 1})" if ds.feature_names else "")
            )
        name = ds.feature_names[j]
        if name in ds.train_columns:
            return np.asarray(ds.train_columns[name])
        return ds.x_train[:, j]
    valid = [LABEL_COLUMN, *ds.train_columns]
    raise DataError(
        f"dataset {ds.name!r} has no column {column!r}; partition by one of {valid}"
        + (" or a feature index" if ds.feature_names else "")
    )


def dataset_partitions(
    ds: FederatedDataset,
    num_partitions: int,
    seed: int,
    *,
    scheme: str = "iid",
    alpha: float = 0.5,
    column: str | None = None,
    min_size: int = 1,
) -> list[np.ndarray]:
    """Index arrays into ``ds``'s training split, one per hospital, under ``scheme``.

    ``dirichlet`` skews the labels; for a regression dataset it skews the
    target's quartile bins (:data:`REGRESSION_LABEL_BINS`). ``column`` names the
    column for the ``column`` scheme (see :func:`resolve_column`). The test split
    is never partitioned. Raises :class:`DataError` as the schemes do, and when
    the ``column`` scheme has no column.
    """
    labels = ds.y_train
    if scheme == "dirichlet" and ds.task == "regression":
        labels = _regression_bins(np.asarray(ds.y_train, dtype=np.float64))
    values = None
    if scheme == "column":
        if not column:
            names = [LABEL_COLUMN, *list(ds.train_columns)[:3]]
            raise DataError(
                f"the column scheme needs a column: give --partition-column NAME (one of {names}"
                + (", ...)" if len(ds.train_columns) > 3 else ")")
            )
        values = resolve_column(ds, column)
    return partition_indices(
        scheme, num_partitions, seed, n_samples=ds.n_train, labels=labels, values=values,
        alpha=alpha, min_size=min_size,
    )


def partition_dataset(
    ds: FederatedDataset,
    num_partitions: int,
    partition_id: int,
    seed: int,
    *,
    scheme: str = "iid",
    alpha: float = 0.5,
    column: str | None = None,
    min_size: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """Return hospital ``partition_id``'s ``(x, y)`` from the training split of ``ds``.

    The split is :func:`dataset_partitions` with the given scheme and seed, so
    the ``num_partitions`` hospitals together hold every training sample
    exactly once. The test split is never partitioned (it is the central
    evaluation set). Returned arrays are copies.

    Raises ValueError if ``partition_id`` is not in ``[0, num_partitions)`` or
    the partition arguments are invalid for the dataset.
    """
    if not 0 <= partition_id < num_partitions:
        raise DataError(
            f"partition_id must be in [0, {num_partitions}) for num_partitions="
            f"{num_partitions}, got {partition_id}"
        )
    idx = dataset_partitions(
        ds, num_partitions, seed, scheme=scheme, alpha=alpha, column=column, min_size=min_size
    )[partition_id]
    return ds.x_train[idx], ds.y_train[idx]
