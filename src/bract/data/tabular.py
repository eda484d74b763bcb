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

from bract.data.errors import DataError
from bract.data.synthetic import CLASS_NAMES, synthetic_chest_xray

__all__ = ["DATASET_NAMES", "FederatedDataset", "load_dataset"]

#: Names accepted by :func:`load_dataset`.
DATASET_NAMES: tuple[str, ...] = ("synthetic", "breast-cancer", "diabetes")

_TASKS = ("classification", "regression")


@dataclass(frozen=True, eq=False)
class FederatedDataset:
    """A dataset with a training split (to be partitioned between hospitals)
    and a held-out central test split.

    For classification, ``y_*`` are int64 labels ``[N]`` in ``[0, num_classes)``.
    For regression, ``y_*`` are float32 targets ``[N]`` and ``num_classes`` is 1
    (the width of the model's output). ``x_*`` are float32. ``input_shape`` is the
    shape of one sample (``x_train.shape[1:]``).

    Construction checks these invariants, converting only what converts without
    changing a value's meaning (so a hospital's own loader may hand over what pandas
    or numpy gave it):

    * inputs (and regression targets) of any integer, boolean or float type become
      float32, rounded to the nearest float32; a finite value beyond float32's range
      (about ±3.4e38) is refused, not turned into infinity. NaN and infinity are kept
      as they are (a hospital refuses them before training:
      :func:`bract.tasks.check_fits_model`);
    * class labels of any integer or boolean type, or floats that are all whole
      numbers, become int64; labels shaped ``[N, 1]`` (one column) become ``[N]``
      (so do regression targets);
    * refused: arrays of text, Python objects, dates or complex numbers; labels that
      are not whole numbers (or NaN), negative, or not below ``num_classes``; labels
      of several columns; splits whose inputs and labels differ in length.

    A refusal is a :class:`~bract.data.DataError` (a ``ValueError``) in one line
    naming the array (``x_train``, ``y_test``, ...) and the problem; its
    ``public_reason`` (what a hospital's failure reply carries) names the same without
    any value, count or shape of the hospital's records.
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
            raise public_error(f"task must be one of {_TASKS}, got {self.task!r}")
        if isinstance(self.num_classes, bool) or not isinstance(
                self.num_classes, (int, np.integer)) or self.num_classes < 1:
            raise public_error(f"num_classes must be a whole number >= 1, got "
                               f"{str(self.num_classes)[:40]}")
        try:
            shape = tuple(int(d) for d in self.input_shape)
        except (TypeError, ValueError):
            raise public_error("input_shape must be a tuple of whole numbers (the shape of "
                               f"one sample), got {str(self.input_shape)[:40]}") from None
        object.__setattr__(self, "input_shape", shape)
        for split in ("x_train", "x_test"):
            object.__setattr__(self, split, _as_float32(split, getattr(self, split)))
        for split in ("y_train", "y_test"):
            y = getattr(self, split)
            y = (_class_labels(split, y, int(self.num_classes))
                 if self.task == "classification" else _targets(split, y))
            object.__setattr__(self, split, y)
        for x_name, y_name in (("x_train", "y_train"), ("x_test", "y_test")):
            x, y = getattr(self, x_name), getattr(self, y_name)
            if len(x) != len(y):
                raise DataError(f"{x_name} has {len(x)} samples but {y_name} has {len(y)}",
                                public_reason=_public(f"{x_name} and {y_name} hold different "
                                                      "numbers of samples"))
        for split, x in (("x_train", self.x_train), ("x_test", self.x_test)):
            if tuple(x.shape[1:]) != shape:
                raise DataError(
                    f"{split} sample shape {tuple(x.shape[1:])} != input_shape {shape}",
                    public_reason=_public(f"{split} samples are not of its input_shape {shape}"),
                )
        if self.class_names and len(self.class_names) != self.num_classes:
            raise public_error(
                f"{len(self.class_names)} class names for {self.num_classes} classes"
            )
        for col, values in self.test_columns.items():
            if len(values) != len(self.y_test):
                raise DataError(
                    f"test column {col!r} has {len(values)} values but the held-out split "
                    f"has {len(self.y_test)} samples",
                    public_reason=_public("test columns are not one value per held-out "
                                          "sample"))
        for col, values in self.train_columns.items():
            if len(values) != len(self.y_train):
                raise DataError(
                    f"train column {col!r} has {len(values)} values but the training split "
                    f"has {len(self.y_train)} samples",
                    public_reason=_public("train columns are not one value per training "
                                          "sample"))

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


#: What each array holds, in the words of a refusal.
_WHAT = {"x_train": "training inputs", "x_test": "held-out inputs",
         "y_train": "training labels", "y_test": "held-out labels"}
#: numpy's kinds of arrays that hold no numbers, in words.
_NOT_NUMBERS = {"U": "text", "S": "bytes", "O": "Python objects", "M": "dates",
                "m": "durations", "c": "complex numbers", "V": "raw records"}


def _public(what: str) -> str:
    """A refusal's ``public_reason``: what is wrong, none of the records' values."""
    return f"the hospital's dataset: {what} (details in its own log)"


def public_error(message: str) -> DataError:
    """A refusal whose message holds only what the loader's code declared (no value of
    a record): the message itself is its ``public_reason``."""
    return DataError(message, public_reason=_public(message))


def _what(split: str, task: str = "classification") -> str:
    words = _WHAT[split]
    return words.replace("labels", "targets") if task == "regression" else words


def _numbers(split: str, values: Any, task: str = "classification") -> np.ndarray:
    """``values`` as a numpy array of integers, booleans or floats, one entry per sample;
    :class:`DataError` naming ``split`` for anything else."""
    what = _what(split, task)
    try:
        arr = np.asarray(values)
    except (TypeError, ValueError) as exc:  # e.g. rows of different lengths
        raise DataError(f"{split}: the {what} cannot be read as one array ({exc})",
                        public_reason=_public(f"{split} cannot be read as one array")) from None
    if arr.ndim == 0:
        raise DataError(f"{split}: the {what} must be an array with one entry per sample, "
                        f"got a single {type(values).__name__}",
                        public_reason=_public(f"{split} is not an array"))
    if arr.dtype.kind not in "biuf":
        words = _NOT_NUMBERS.get(arr.dtype.kind, f"of type {arr.dtype.kind}")
        raise DataError(f"{split}: {what} of type {arr.dtype} are not numbers; convert them "
                        "to numbers (e.g. encode categories) before building the "
                        "FederatedDataset",
                        public_reason=_public(f"{split} ({what}) holds {words}, not numbers"))
    return arr


def _as_float32(split: str, values: Any, task: str = "classification") -> np.ndarray:
    """``values`` as a C-contiguous float32 array (no copy when it is one already);
    :class:`DataError` for non-numbers or a finite value beyond float32's range."""
    arr = _numbers(split, values, task)
    if arr.dtype == np.float32:  # native byte order too
        return np.ascontiguousarray(arr)
    with np.errstate(over="ignore"):
        out = np.ascontiguousarray(arr, dtype=np.float32)
    if arr.dtype.kind == "f":
        beyond = int(np.count_nonzero(np.isinf(out) & np.isfinite(arr)))
        if beyond:
            what = _what(split, task)
            raise DataError(
                f"{split}: {beyond} of the {what} are beyond float32's range (about "
                "±3.4e38), which bract trains in; rescale them (e.g. standardise)",
                public_reason=_public(f"{split} ({what}) holds values beyond float32's "
                                      "range"))
    return out


def _one_column(split: str, arr: np.ndarray, task: str) -> np.ndarray:
    """``[N]`` or ``[N, 1]`` as ``[N]``; :class:`DataError` for any other shape."""
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1:
        what = _what(split, task)
        raise DataError(f"{split}: {what} must be one per sample, shaped [N] or [N, 1]; "
                        f"got shape {list(arr.shape)}",
                        public_reason=_public(f"{split} ({what}) is not one per sample, "
                                              "in one column"))
    return arr


def _figure(value: Any) -> str:
    number = float(value)
    return str(int(value)) if abs(number) < 2**53 else f"{number:g}"


def _class_labels(split: str, values: Any, num_classes: int) -> np.ndarray:
    """``values`` as int64 class labels ``[N]`` in ``[0, num_classes)``; integer and
    boolean labels, and floats that are all whole numbers, convert; anything else is a
    :class:`DataError` naming ``split`` and the problem."""
    what = _what(split)
    arr = _one_column(split, _numbers(split, values), "classification")
    if arr.dtype.kind == "f":
        whole = np.isfinite(arr) & (arr == np.round(arr))
        if not whole.all():
            raise DataError(
                f"{split}: {what} must be whole numbers (class indices 0..{num_classes - 1}); "
                f"{int(np.count_nonzero(~whole))} are not",
                public_reason=_public(f"{split} ({what}) holds values that are not whole "
                                      "numbers (class indices)"))
    if arr.size:
        low, high = arr.min(), arr.max()
        if low < 0:
            raise DataError(f"{split}: {what} must be >= 0, found {_figure(low)}",
                            public_reason=_public(f"{split} ({what}) holds a negative label "
                                                  "(class indices start at zero)"))
        if high >= num_classes:
            raise DataError(f"{split}: {what} must be below num_classes={num_classes}, found "
                            f"{_figure(high)}",
                            public_reason=_public(f"{split} ({what}) holds a label not below "
                                                  "its num_classes"))
    return np.ascontiguousarray(arr, dtype=np.int64)


def _targets(split: str, values: Any) -> np.ndarray:
    """``values`` as float32 regression targets ``[N]`` (see :func:`_as_float32`)."""
    return _one_column(split, _as_float32(split, values, "regression"), "regression")


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
