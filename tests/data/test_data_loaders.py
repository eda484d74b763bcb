"""load_dataset and FederatedDataset."""

from __future__ import annotations

import dataclasses

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
