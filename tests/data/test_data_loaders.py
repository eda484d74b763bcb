"""load_dataset and FederatedDataset."""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest
from sklearn.datasets import load_breast_cancer
from sklearn.model_selection import train_test_split

from bract.data import DATASET_NAMES, FederatedDataset, load_dataset


def test_breast_cancer_shapes_and_types() -> None:
    ds = load_dataset("breast-cancer", seed=0)
    assert ds.n_train + ds.n_test == 569
    assert ds.input_shape == (30,)
    assert ds.x_train.shape == (ds.n_train, 30)
    assert ds.x_train.dtype == np.float32 and ds.x_test.dtype == np.float32
    assert ds.y_train.dtype == np.int64 and ds.y_test.dtype == np.int64
    assert ds.num_classes == 2 and ds.task == "classification"
    assert ds.n_test == int(np.ceil(0.2 * 569))


def test_breast_cancer_standardised_with_training_statistics_only() -> None:
    ds = load_dataset("breast-cancer", seed=5)
    np.testing.assert_allclose(ds.x_train.mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(ds.x_train.std(axis=0), 1.0, atol=1e-4)
    # Rebuild the same stratified split of the raw data and check that both splits
    # were scaled with the *training* mean/std (not the test split's or the full data's).
    bunch = load_breast_cancer()
    raw_tr, raw_te = train_test_split(
        bunch.data, test_size=0.2, random_state=5, stratify=bunch.target
    )
    mu, sd = raw_tr.mean(axis=0), raw_tr.std(axis=0)
    np.testing.assert_allclose(ds.x_train, (raw_tr - mu) / sd, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(ds.x_test, (raw_te - mu) / sd, rtol=1e-4, atol=1e-4)
    # leakage check: train and test together are not exactly centred
    both = np.concatenate([ds.x_train, ds.x_test])
    assert np.abs(both.mean(axis=0)).max() > 1e-3
    assert np.abs(ds.x_test.mean(axis=0)).max() > 1e-3


def test_stratified_split() -> None:
    ds = load_dataset("breast-cancer", seed=0)
    frac_tr = ds.y_train.mean()
    frac_te = ds.y_test.mean()
    assert abs(frac_tr - frac_te) < 0.02


def test_synthetic_dataset() -> None:
    ds = load_dataset("synthetic", seed=2, image_size=16, n_samples=300, test_fraction=0.25)
    assert ds.input_shape == (1, 16, 16)
    assert ds.n_train == 225 and ds.n_test == 75
    d = ds.describe()
    assert d["n_train"] == 225 and d["n_test"] == 75
    assert sum(d["train_class_counts"]) == 225
    assert max(d["test_class_counts"]) - min(d["test_class_counts"]) <= 1


def test_synthetic_default_size() -> None:
    ds = load_dataset("synthetic", image_size=16)
    assert ds.n_train + ds.n_test == 2400
    assert ds.num_classes == 3


def test_deterministic() -> None:
    a = load_dataset("breast-cancer", seed=4)
    b = load_dataset("breast-cancer", seed=4)
    c = load_dataset("breast-cancer", seed=5)
    np.testing.assert_array_equal(a.x_train, b.x_train)
    np.testing.assert_array_equal(a.y_test, b.y_test)
    assert not np.array_equal(a.x_train, c.x_train)


def test_diabetes_is_regression() -> None:
    ds = load_dataset("diabetes")
    assert ds.task == "regression" and ds.num_classes == 1
    assert ds.n_train + ds.n_test == 442
    assert ds.input_shape == (10,)
    assert ds.y_train.dtype == np.float32
    assert "train_class_counts" not in ds.describe()


def test_n_samples_subsets_tabular() -> None:
    ds = load_dataset("breast-cancer", n_samples=100)
    assert ds.n_train + ds.n_test == 100
    with pytest.raises(ValueError, match="too many"):
        load_dataset("breast-cancer", n_samples=1000)


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(ValueError) as err:
        load_dataset("mnist")
    for name in DATASET_NAMES:
        assert name in str(err.value)


@pytest.mark.parametrize("frac", [0.0, 1.0, -0.1])
def test_bad_test_fraction(frac: float) -> None:
    with pytest.raises(ValueError, match="test_fraction"):
        load_dataset("breast-cancer", test_fraction=frac)


def test_dataset_is_frozen_and_validated() -> None:
    ds = load_dataset("breast-cancer")
    with pytest.raises(dataclasses.FrozenInstanceError):
        ds.name = "x"  # type: ignore[misc]
    with pytest.raises(ValueError, match="samples"):
        FederatedDataset("x", ds.x_train, ds.y_train[:-1], ds.x_test, ds.y_test, 2, (30,))
    with pytest.raises(ValueError, match="task"):
        FederatedDataset("x", ds.x_train, ds.y_train, ds.x_test, ds.y_test, 2, (30,), "ranking")
    with pytest.raises(ValueError, match="input_shape"):
        FederatedDataset("x", ds.x_train, ds.y_train, ds.x_test, ds.y_test, 2, (31,))


def test_tabular_feature_names_and_raw_training_columns() -> None:
    from sklearn.datasets import load_diabetes

    ds = load_dataset("diabetes", seed=2)
    assert ds.feature_names == ("age", "sex", "bmi", "bp", "s1", "s2", "s3", "s4", "s5", "s6")
    raw = load_diabetes(scaled=False)
    # the columns are in original units (sex 1/2, ages in years) and follow x_train row by row
    assert set(np.unique(ds.train_columns["sex"]).tolist()) == {1.0, 2.0}
    assert 18 <= ds.train_columns["age"].min() and ds.train_columns["age"].max() <= 80
    age = ds.train_columns["age"]
    np.testing.assert_allclose((age - age.mean()) / age.std(), ds.x_train[:, 0], atol=1e-4)
    assert len(ds.train_columns) == 10
    assert all(len(v) == ds.n_train for v in ds.train_columns.values())
    assert raw.data.shape[1] == len(ds.feature_names)
    bc = load_dataset("breast-cancer")
    assert bc.class_names == ("malignant", "benign")
    assert load_dataset("synthetic", image_size=16, n_samples=30).class_names == (
        "normal", "pneumonia", "covid19",
    )


def test_dataset_checks_class_names_and_columns() -> None:
    ds = load_dataset("breast-cancer")
    with pytest.raises(ValueError, match="class names"):
        FederatedDataset("x", ds.x_train, ds.y_train, ds.x_test, ds.y_test, 2, (30,),
                         class_names=("a",))
    with pytest.raises(ValueError, match="train column 'site'"):
        FederatedDataset("x", ds.x_train, ds.y_train, ds.x_test, ds.y_test, 2, (30,),
                         train_columns={"site": np.zeros(3)})


def _small() -> dict:
    """A tiny classification dataset's arguments in bract's own types (12 training,
    4 held-out records of 3 features, 3 classes)."""
    rng = np.random.default_rng(0)
    return {"name": "tiny", "x_train": rng.normal(size=(12, 3)).astype(np.float32),
            "y_train": np.arange(12, dtype=np.int64) % 3,
            "x_test": rng.normal(size=(4, 3)).astype(np.float32),
            "y_test": np.arange(4, dtype=np.int64) % 3, "num_classes": 3, "input_shape": (3,)}


#: What a hospital's own loader may hand over as pandas or numpy gave it, and converts.
CONVERTED = {
    "float64 inputs": lambda a: {"x_train": a["x_train"].astype(np.float64)},
    "integer inputs": lambda a: {"x_train": (a["x_train"] * 10).astype(np.int64),
                                 "x_test": (a["x_test"] * 10).astype(np.int16)},
    "boolean inputs": lambda a: {"x_train": a["x_train"] > 0},
    "float16 inputs": lambda a: {"x_train": a["x_train"].astype(np.float16)},
    "big-endian inputs": lambda a: {"x_train": a["x_train"].astype(">f4")},
    "reversed-stride inputs": lambda a: {"x_train": a["x_train"][::-1]},
    "a list of rows": lambda a: {"x_train": a["x_train"].tolist()},
    "int32 labels": lambda a: {"y_train": a["y_train"].astype(np.int32)},
    "uint8 labels": lambda a: {"y_train": a["y_train"].astype(np.uint8)},
    "whole float labels": lambda a: {"y_train": a["y_train"].astype(np.float32),
                                     "y_test": a["y_test"].astype(np.float64)},
    "N x 1 labels": lambda a: {"y_train": a["y_train"].reshape(-1, 1),
                               "y_test": a["y_test"].reshape(-1, 1)},
    "a list input_shape": lambda a: {"input_shape": [3]},
}


@pytest.mark.parametrize("variant", CONVERTED)
def test_a_dataset_converts_what_keeps_its_values_to_bracts_types(variant: str) -> None:
    """Features of any number type become float32 (rounded to the nearest float32),
    labels of any integer type, whole floats or one column become int64 ``[N]``: what
    torch trains on, with the same values."""
    args = _small()
    given = CONVERTED[variant](args)
    ds = FederatedDataset(**{**args, **given})
    for split in ("x_train", "x_test"):
        x = getattr(ds, split)
        assert x.dtype == np.dtype(np.float32) and x.flags.c_contiguous
        np.testing.assert_array_equal(x, np.asarray(given.get(split, args[split]),
                                                    dtype=np.float32))
    for split in ("y_train", "y_test"):
        y = getattr(ds, split)
        assert y.dtype == np.dtype(np.int64) and y.ndim == 1
        np.testing.assert_array_equal(y, args[split])
    assert ds.input_shape == (3,)
    import torch
    torch.nn.functional.cross_entropy(torch.nn.Linear(3, 3)(torch.from_numpy(ds.x_train)),
                                      torch.from_numpy(ds.y_train))


def _with(split: str, make):
    return lambda a: {split: make(a[split])}


#: Arrays no conversion can keep the meaning of: (variant, the message's words, the
#: array named, the public reason's words).
REFUSED = {
    "text inputs": (_with("x_train", lambda x: x.astype(str)), "x_train: training inputs of "
                    "type <U", "x_train (training inputs) holds text, not numbers"),
    "object inputs": (_with("x_test", lambda x: x.astype(object)), "x_test: held-out inputs of "
                      "type object are not numbers", "x_test (held-out inputs) holds Python "
                      "objects, not numbers"),
    "complex inputs": (_with("x_train", lambda x: x.astype(np.complex64)), "are not numbers",
                       "x_train (training inputs) holds complex numbers"),
    "float64 beyond float32": (_with("x_train", lambda x: x.astype(np.float64) * 1e300),
                               r"x_train: \d+ of the training inputs are beyond float32's range",
                               "x_train (training inputs) holds values beyond float32's range"),
    "ragged rows": (_with("x_train", lambda x: [[1.0], [1.0, 2.0]] * 6),
                    "x_train: the training inputs cannot be read as one array",
                    "x_train cannot be read as one array"),
    "a negative label": (_with("y_train", lambda y: np.where(np.arange(12) == 5, -1, y)),
                         "y_train: training labels must be >= 0, found -1",
                         "y_train (training labels) holds a negative label"),
    "a label beyond num_classes": (_with("y_test", lambda y: y + 7),
                                   "y_test: held-out labels must be below num_classes=3, "
                                   "found 9", "y_test (held-out labels) holds a label not below"),
    "fractional labels": (_with("y_train", lambda y: y + 0.5),
                          r"y_train: training labels must be whole numbers .*; 12 are not",
                          "y_train (training labels) holds values that are not whole numbers"),
    "a NaN label": (_with("y_train", lambda y: np.where(np.arange(12) == 0, np.nan, y)),
                    "y_train: training labels must be whole numbers",
                    "holds values that are not whole numbers"),
    "text labels": (_with("y_train", lambda y: y.astype(str)), "y_train: training labels of "
                    "type <U", "y_train (training labels) holds text, not numbers"),
    "two label columns": (_with("y_train", lambda y: np.stack([y, y], 1)),
                          r"y_train: training labels must be one per sample, shaped \[N\] or "
                          r"\[N, 1\]; got shape \[12, 2\]",
                          "y_train (training labels) is not one per sample"),
    "fewer labels than inputs": (_with("y_test", lambda y: y[:3]),
                                 "x_test has 4 samples but y_test has 3",
                                 "x_test and y_test hold different numbers of samples"),
}


@pytest.mark.parametrize("variant", REFUSED)
def test_a_dataset_refuses_what_it_cannot_convert_naming_the_array_not_the_values(
        variant: str) -> None:
    """Text, objects, complex numbers, floats beyond float32, negative, fractional or
    out-of-range labels, several label columns: a one-line :class:`DataError` naming
    the array and the problem (never a torch error at training); its public reason
    names the same without a value, count or shape of the records."""
    from bract.data import DataError

    make, message, reason = REFUSED[variant]
    args = _small()
    with pytest.raises(DataError, match=message) as refused:
        FederatedDataset(**{**args, **make(args)})
    assert "\n" not in str(refused.value)
    public = refused.value.public_reason
    assert reason in public and public.startswith("the hospital's dataset: ")
    assert not re.search(r"\b\d", public), public  # no value, count or shape


def test_regression_targets_convert_to_float32_and_refuse_what_overflows() -> None:
    from bract.data import DataError

    ds = load_dataset("diabetes", seed=0)
    args = {"name": "d", "x_train": ds.x_train.astype(np.float64),
            "y_train": ds.y_train.astype(np.float64).reshape(-1, 1),
            "x_test": ds.x_test, "y_test": ds.y_test.astype(np.int64), "num_classes": 1,
            "input_shape": ds.input_shape, "task": "regression"}
    own = FederatedDataset(**args)
    assert own.y_train.dtype == np.float32 and own.y_train.shape == ds.y_train.shape
    assert own.y_test.dtype == np.float32
    with pytest.raises(DataError, match=r"y_train: .* training targets are beyond float32") as e:
        FederatedDataset(**{**args, "y_train": ds.y_train.astype(np.float64) * 1e300})
    assert "y_train (training targets) holds values beyond float32" in e.value.public_reason
