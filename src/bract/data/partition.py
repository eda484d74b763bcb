"""Splitting a training set between hospitals (federation partitions)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from bract.data.tabular import FederatedDataset

__all__ = ["iid_partition", "partition_dataset"]


def iid_partition(n_samples: int, num_partitions: int, seed: int) -> list[np.ndarray]:
    """Split ``range(n_samples)`` uniformly at random into ``num_partitions`` parts.

    Guarantees: every index in ``[0, n_samples)`` appears in exactly one
    partition; partition sizes differ by at most one (no partition is empty);
    the result depends only on the arguments (same seed, same split). Each
    returned array is ``int64`` and sorted ascending.

    Raises ValueError if ``num_partitions < 1`` or ``num_partitions > n_samples``.
    """
    if n_samples < 0:
        raise ValueError(f"n_samples must be >= 0, got {n_samples}")
    if num_partitions < 1:
        raise ValueError(f"num_partitions must be >= 1, got {num_partitions}")
    if num_partitions > n_samples:
        raise ValueError(
            f"num_partitions={num_partitions} exceeds n_samples={n_samples}: at least one "
            f"partition would be empty. Use at most {n_samples} partitions or more data."
        )
    perm = np.random.default_rng(seed).permutation(n_samples)
    return [np.sort(part).astype(np.int64) for part in np.array_split(perm, num_partitions)]


def partition_dataset(
    ds: FederatedDataset, num_partitions: int, partition_id: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Return hospital ``partition_id``'s ``(x, y)`` from the training split of ``ds``.

    The split is :func:`iid_partition` over ``len(ds.y_train)`` with the given
    seed, so the ``num_partitions`` hospitals together hold every training
    sample exactly once. The test split is never partitioned (it is the
    central evaluation set). Returned arrays are copies.

    Raises ValueError if ``partition_id`` is not in ``[0, num_partitions)`` or
    the partition arguments are invalid for the dataset size.
    """
    if not 0 <= partition_id < num_partitions:
        raise ValueError(
            f"partition_id must be in [0, {num_partitions}) for num_partitions="
            f"{num_partitions}, got {partition_id}"
        )
    idx = iid_partition(len(ds.y_train), num_partitions, seed)[partition_id]
    return ds.x_train[idx], ds.y_train[idx]
