"""Datasets for federations: the container type and the bundled loaders.

Nothing here downloads data: the synthetic set is generated, and the tabular
sets ship with scikit-learn.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sklearn.datasets import load_breast_cancer, load_diabetes
from sklearn.model_selection import train_test_split

from bract.data.synthetic import CLASS_NAMES, synthetic_chest_xray

__all__ = ["DATASET_NAMES", "FederatedDataset", "load_dataset"]

#: Names accepted by :func:`load_dataset`.
DATASET_NAMES: tuple[str, ...] = ("synthetic", "breast-cancer", "diabetes")

_TASKS = ("classification", "regression")


@dataclass(frozen=True, eq=False)
class FederatedDataset:
    """A dataset with a training split (to be partitioned between hospitals)
    and a held-out central test split.

    For classification, ``y_*`` are int64 labels in ``[0, num_classes)``. For
    regression, ``y_*`` are float32 targets and ``num_classes`` is 1 (the width
    of the model's output). ``input_shape`` is the shape of one sample
    (``x_train.shape[1:]``). Construction checks these invariants.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    input_shape: tuple[int, ...]
    task: str = "classification"
    #: Names of the features (tabular data) in column order; empty for images.
    feature_names: tuple[str, ...] = ()
    #: Names of the classes, indexed by label (classification); may be empty.
    class_names: tuple[str, ...] = ()
    #: Per-sample metadata of the *training* split in original units (e.g. a
    #: hospital id or age before standardisation), for partitioning by a column.
    train_columns: Mapping[str, np.ndarray] = field(default_factory=dict)
    #: The same for the held-out split (e.g. its ``patient_id``s, which a hospital's
    #: metrics release under patient-level privacy needs).
    test_columns: Mapping[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.task not in _TASKS:
            raise ValueError(f"task must be one of {_TASKS}, got {self.task!r}")
        if len(self.x_train) != len(self.y_train):
            raise ValueError(
                f"x_train has {len(self.x_train)} samples but y_train has {len(self.y_train)}"
            )
        if len(self.x_test) != len(self.y_test):
            raise ValueError(
                f"x_test has {len(self.x_test)} samples but y_test has {len(self.y_test)}"
            )
        for split, x in (("x_train", self.x_train), ("x_test", self.x_test)):
            if tuple(x.shape[1:]) != tuple(self.input_shape):
                raise ValueError(
                    f"{split} sample shape {tuple(x.shape[1:])} != input_shape {self.input_shape}"
                )
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        if self.class_names and len(self.class_names) != self.num_classes:
            raise ValueError(
                f"{len(self.class_names)} class names for {self.num_classes} classes"
            )
        for col, values in self.test_columns.items():
            if len(values) != len(self.y_test):
                raise ValueError(
                    f"test column {col!r} has {len(values)} values but the held-out split "
                    f"has {len(self.y_test)} samples")
        for col, values in self.train_columns.items():
            if len(values) != len(self.y_train):
                raise ValueError(
                    f"train column {col!r} has {len(values)} values but the training split "
                    f"has {len(self.y_train)} samples"
                )

    @property
    def n_train(self) -> int:
        """Number of training samples."""
        return len(self.y_train)

    @property
    def n_test(self) -> int:
        """Number of test samples."""
        return len(self.y_test)

    def describe(self) -> dict[str, Any]:
        """Summary as a JSON-serialisable dict: name, task, shapes, sizes and,
        for classification, per-class counts of each split."""
        out: dict[str, Any] = {
            "name": self.name,
            "task": self.task,
            "num_classes": self.num_classes,
            "input_shape": list(self.input_shape),
            "n_train": self.n_train,
            "n_test": self.n_test,
        }
        if self.task == "classification":
            out["train_class_counts"] = np.bincount(
                self.y_train, minlength=self.num_classes
            ).tolist()
            out["test_class_counts"] = np.bincount(self.y_test, minlength=self.num_classes).tolist()
        return out


def _standardize(x_train: np.ndarray, x_test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scale both splits with the training split's per-feature mean and std."""
    mean = x_train.mean(axis=0)
    std = x_train.std(axis=0)
    std = np.where(std > 0, std, 1.0)
    return (
        ((x_train - mean) / std).astype(np.float32),
        ((x_test - mean) / std).astype(np.float32),
    )


def load_dataset(
    name: str,
    *,
    seed: int = 0,
    image_size: int = 28,
    n_samples: int | None = None,
    test_fraction: float = 0.2,
) -> FederatedDataset:
    """Load a bundled dataset and split it into train and central test sets.

    * ``"synthetic"``: :func:`synthetic_chest_xray` images ``[1, image_size,
      image_size]``, 3 classes; ``n_samples`` total images (default 2400).
    * ``"breast-cancer"``: scikit-learn's Wisconsin breast cancer set (569
      samples, 30 features, 2 classes).
    * ``"diabetes"``: scikit-learn's diabetes regression set (442 samples, 10
      features); targets float32, unscaled; ``num_classes`` 1.

    Guarantees: deterministic given the arguments; the split is stratified by
    class when possible for classification; ``ceil(test_fraction * n)``
    samples go to the test split; tabular features are standardised with
    the mean and std of the training split only and cast to float32;
    classification labels are int64. The tabular sets carry their scikit-learn
    feature names and, in ``train_columns``, the training split's features in
    original units (for :func:`~bract.data.partition.column_partition`). For the
    tabular sets ``n_samples`` (if given) draws a (stratified) subset first;
    ``image_size`` is ignored.

    Raises ValueError for an unknown name or invalid sizes.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if n_samples is not None and n_samples < 2:
        raise ValueError(f"n_samples must be >= 2 (one train, one test), got {n_samples}")

    if name == "synthetic":
        n = 2400 if n_samples is None else n_samples
        x, y = synthetic_chest_xray(n, image_size=image_size, seed=seed, num_classes=3)
        num_classes, task = 3, "classification"
        feature_names: tuple[str, ...] = ()
        class_names: tuple[str, ...] = CLASS_NAMES
    elif name in ("breast-cancer", "diabetes"):
        if name == "breast-cancer":
            bunch = load_breast_cancer()
            x, y = bunch.data.astype(np.float64), bunch.target.astype(np.int64)
            num_classes, task = 2, "classification"
            class_names = tuple(str(c) for c in bunch.target_names)
        else:
            bunch = load_diabetes(scaled=False)
            x, y = bunch.data.astype(np.float64), bunch.target.astype(np.float32)
            num_classes, task = 1, "regression"
            class_names = ()
        feature_names = tuple(str(f) for f in bunch.feature_names)
        if n_samples is not None:
            if n_samples > len(y):
                raise ValueError(f"{name} has {len(y)} samples; n_samples={n_samples} is too many")
            if n_samples < len(y):
                x, y = _subsample(x, y, n_samples, seed, stratify=task == "classification")
    else:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASET_NAMES)}")

    stratify = y if task == "classification" and _can_stratify(y, test_fraction) else None
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=stratify
    )
    # Raw (unstandardised) training features, for partitioning by a column.
    train_columns = {f: np.ascontiguousarray(x_tr[:, j]) for j, f in enumerate(feature_names)}
    if name != "synthetic":
        x_tr, x_te = _standardize(x_tr, x_te)
    return FederatedDataset(
        name=name,
        x_train=np.ascontiguousarray(x_tr),
        y_train=np.ascontiguousarray(y_tr),
        x_test=np.ascontiguousarray(x_te),
        y_test=np.ascontiguousarray(y_te),
        num_classes=num_classes,
        input_shape=tuple(int(d) for d in x_tr.shape[1:]),
        task=task,
        feature_names=feature_names,
        class_names=class_names,
        train_columns=train_columns,
    )


def _can_stratify(y: np.ndarray, test_fraction: float) -> bool:
    """Whether a stratified split is possible (each class has >= 2 samples and
    both splits can hold one of every class)."""
    counts = np.bincount(y)
    counts = counts[counts > 0]
    n_test = int(np.ceil(test_fraction * len(y)))
    return bool(counts.min() >= 2 and len(counts) <= min(n_test, len(y) - n_test))


def _subsample(
    x: np.ndarray, y: np.ndarray, n: int, seed: int, *, stratify: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic subset of ``n`` samples, stratified by label when asked and possible."""
    strat = y if stratify and _can_stratify(y, n / len(y)) else None
    x_sub, _, y_sub, _ = train_test_split(x, y, train_size=n, random_state=seed, stratify=strat)
    return x_sub, y_sub
