"""bract.tasks with the new datasets, partitions and regression: configuration
errors, models, the regression loss and metrics, and file datasets end to end."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.linear_model import LinearRegression
from sklearn.metrics import mean_squared_error, r2_score

from bract import tasks
from bract.models import ChestCNN, TabularMLP
from bract.privacy import PrivateTrainer

DIABETES = tasks.TaskConfig.for_dataset("diabetes", clients=3)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"dataset": "medmnist"}, "needs --data-path: the MedMNIST .npz file"),
        ({"dataset": "imagefolder"}, "needs --data-path: the image folder"),
        ({"dataset": "diabetes", "data_path": "x.npz"}, "--data-path is read only by"),
        ({"partition": "pathological"}, "unknown partition"),
        ({"alpha": 0.0}, "alpha must be a finite number > 0"),
        ({"alpha": float("nan")}, "alpha must be a finite number > 0"),
        ({"partition": "column"}, "--partition column needs --partition-column"),
        ({"dataset": "mnist"}, "unknown dataset"),
    ],
)
def test_task_config_errors_name_the_fix(kwargs, needle) -> None:
    with pytest.raises(ValueError, match=None) as err:
        tasks.TaskConfig(**kwargs)
    assert needle in str(err.value)


def test_data_path_is_made_absolute(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = tasks.TaskConfig(dataset="medmnist", data_path="data/p.npz")
    assert cfg.data_path == str(tmp_path / "data" / "p.npz")


def test_every_dataset_has_defaults() -> None:
    assert set(tasks.DATASET_DEFAULTS) == set(tasks.DATASETS)


def test_regression_model_predicts_in_target_units() -> None:
    model = tasks.build_model(DIABETES)
    assert isinstance(model, tasks.TargetScaled) and isinstance(model.inner, TabularMLP)
    mean, std = tasks.target_stats(DIABETES)
    y = tasks.dataset_for(DIABETES).y_train
    assert mean == pytest.approx(float(y.mean()), rel=1e-6)
    assert std == pytest.approx(float(y.std()), rel=1e-5)
    x = torch.randn(5, 10)
    np.testing.assert_allclose(
        model(x).detach().numpy(), (model.inner(x) * std + mean).detach().numpy(), rtol=1e-6
    )
    # the scale is no weight: nothing to aggregate, nothing to train
    assert set(model.state_dict()) == {"inner.net.weight", "inner.net.bias"}
    with pytest.raises(ValueError, match="std > 0"):
        tasks.TargetScaled(TabularMLP(2, 1), 0.0, 0.0)


def test_models_per_dataset() -> None:
    assert isinstance(tasks.build_model(tasks.TaskConfig.for_dataset("breast-cancer")), TabularMLP)
    assert isinstance(tasks.make_criterion(DIABETES), tasks.StandardizedMSELoss)
    breast = tasks.TaskConfig.for_dataset("breast-cancer")
    assert isinstance(tasks.make_criterion(breast), torch.nn.CrossEntropyLoss)


def test_standardized_mse_loss() -> None:
    loss = tasks.StandardizedMSELoss(std=2.0)
    pred, target = torch.tensor([[1.0], [3.0], [5.0]]), torch.tensor([1.0, 1.0, 1.0])
    assert float(loss(pred, target)) == pytest.approx((0 + 1 + 4) / 3)  # ((p - t) / 2)^2
    assert float(loss(pred[:, 0], target)) == pytest.approx(5 / 3)
    loss.reduction = "none"
    np.testing.assert_allclose(loss(pred, target).numpy(), [0.0, 1.0, 4.0])
    loss.reduction = "sum"
    assert float(loss(pred, target)) == pytest.approx(5.0)
    loss.reduction = "mean"
    empty = loss(torch.zeros(0, 1, requires_grad=True), torch.zeros(0))
    assert float(empty) == 0.0  # an empty Poisson batch
    with pytest.raises(ValueError, match="does not match"):
        loss(torch.zeros(3, 2), torch.zeros(3))
    with pytest.raises(ValueError, match="std"):
        tasks.StandardizedMSELoss(std=0.0)


def test_regression_metrics_agree_with_scikit_learn() -> None:
    ds = tasks.dataset_for(DIABETES)
    model = tasks.build_model(DIABETES)
    got = tasks.evaluate(model, ds.x_test, ds.y_test, batch=7)
    with torch.no_grad():
        pred = model(torch.from_numpy(ds.x_test)).numpy()[:, 0]
    assert set(got) == {"loss", "mse", "r2"}
    assert got["mse"] == pytest.approx(mean_squared_error(ds.y_test, pred), rel=1e-5)
    assert got["r2"] == pytest.approx(r2_score(ds.y_test, pred), rel=1e-5, abs=1e-6)
    assert got["loss"] == got["mse"]
    assert tasks.regression_metrics(np.ones(3), np.ones(3)) == {"mse": 0.0, "r2": 1.0}


def test_centralized_baseline_is_scikit_learn_on_the_same_split() -> None:
    ds = tasks.dataset_for(DIABETES)
    base = tasks.centralized_baseline(ds)
    pred = LinearRegression().fit(ds.x_train, ds.y_train).predict(ds.x_test)
    assert base["r2"] == pytest.approx(r2_score(ds.y_test, pred))
    assert 0.2 < base["r2"] < 0.7
    breast = tasks.dataset_for(tasks.TaskConfig.for_dataset("breast-cancer"))
    clf = tasks.centralized_baseline(breast)
    assert clf["accuracy"] > 0.9
    with pytest.raises(ValueError, match="tabular"):
        tasks.centralized_baseline(tasks.dataset_for(tasks.TaskConfig(image_size=16, n_samples=30)))


def test_dp_sgd_on_diabetes_lowers_the_test_mse() -> None:
    """Opacus hooks mode with the regression loss: DP training learns (epsilon ~ 8)."""
    ds = tasks.dataset_for(DIABETES)
    model = tasks.build_model(DIABETES)
    before = tasks.evaluate(model, ds.x_test, ds.y_test)
    trainer = PrivateTrainer(
        model, tasks.make_optimizer(DIABETES, model), tasks.hospital_loader(DIABETES, 0),
        noise_multiplier=0.8, max_grad_norm=1.0, delta=1e-5,
        criterion=tasks.make_criterion(DIABETES), local_epochs=3, grad_sample_mode="hooks",
    )
    for rnd in (1, 2):
        outcome = trainer.train_round(rnd)
        assert outcome.trained and np.isfinite(outcome.train_loss)
    after = tasks.evaluate(model, ds.x_test, ds.y_test)
    assert after["mse"] < 0.7 * before["mse"]
    assert after["r2"] > 0.05 > before["r2"]


def test_ghost_clipping_works_with_the_regression_loss() -> None:
    model = tasks.build_model(DIABETES)
    trainer = PrivateTrainer(
        model, tasks.make_optimizer(DIABETES, model), tasks.hospital_loader(DIABETES, 1),
        noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5,
        criterion=tasks.make_criterion(DIABETES), grad_sample_mode="ghost",
    )
    assert trainer.train_round(1).trained


def test_hospital_data_follows_the_partition_scheme() -> None:
    cfg = tasks.TaskConfig.for_dataset(
        "breast-cancer", clients=2, partition="column", partition_column="label"
    )
    labels = [set(np.unique(tasks.hospital_data(cfg, pid)[1]).tolist()) for pid in range(2)]
    assert sorted(map(sorted, labels)) == [[0], [1]]  # one class per hospital
    assert sum(len(p) for p in tasks.partitions(cfg)) == tasks.dataset_for(cfg).n_train
    with pytest.raises(ValueError, match="partition_id"):
        tasks.hospital_data(cfg, 2)


def test_medmnist_task_end_to_end(tmp_path) -> None:
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 40), ("val", 8), ("test", 12)):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 2).reshape(-1, 1).astype(np.uint8)
    path = tmp_path / "pneumoniamnist.npz"
    np.savez(path, **arrays)
    cfg = tasks.TaskConfig.for_dataset(
        "medmnist", data_path=str(path), image_size=16, clients=2, partition="dirichlet",
        alpha=1.0,
    )
    model = tasks.build_model(cfg)
    assert isinstance(model, ChestCNN)
    x, _ = tasks.hospital_data(cfg, 0)
    assert x.shape[1:] == (1, 16, 16) and model(torch.from_numpy(x[:2])).shape == (2, 2)
    metrics = tasks.evaluate(model, tasks.dataset_for(cfg).x_test, tasks.dataset_for(cfg).y_test)
    assert set(metrics) == {"loss", "accuracy"}


def test_imagefolder_task_end_to_end(tmp_path) -> None:
    for cls in ("normal", "pneumonia"):
        (tmp_path / cls).mkdir()
        for k in range(6):
            Image.fromarray(np.full((10, 10), 30 * k, np.uint8)).save(tmp_path / cls / f"{k}.png")
    cfg = tasks.TaskConfig.for_dataset("imagefolder", data_path=str(tmp_path), image_size=8)
    ds = tasks.dataset_for(cfg)
    assert ds.class_names == ("normal", "pneumonia") and ds.input_shape == (1, 8, 8)
    assert isinstance(tasks.build_model(cfg), ChestCNN)


def test_missing_file_dataset_is_a_clear_value_error(tmp_path) -> None:
    cfg = tasks.TaskConfig.for_dataset("medmnist", data_path=str(Path(tmp_path) / "none.npz"))
    with pytest.raises(ValueError, match="not found"):
        tasks.dataset_for(cfg)


def test_a_hospitals_data_with_nan_or_infinite_values_is_refused_without_naming_them() -> None:
    """Loading a hospital's own data refuses NaN or infinite inputs (or regression
    targets): no training or evaluation can use them. The refusal is the operator's to
    fix; the reply that leaves says only that, not which or how many records."""
    import dataclasses

    from bract.flower.client import failure_reason

    task = tasks.TaskConfig.for_dataset("breast-cancer")
    ds = tasks.dataset_for(task)
    assert tasks.check_fits_model(task, ds, "loader site:load") is ds
    for bad in (np.nan, np.inf, -np.inf):
        x = ds.x_train.copy()
        x[3, 1] = bad
        with pytest.raises(ValueError, match=r"1 record\(s\) of its training inputs hold NaN "
                                             r"or infinite") as refused:
            tasks.check_fits_model(task, dataclasses.replace(ds, x_train=x), "loader site:load")
        reason = failure_reason(refused.value)
        assert reason == "the hospital's data holds NaN or infinite values (details in its own log)"
    held = ds.x_test.copy()
    held[:2] = np.nan
    with pytest.raises(ValueError, match=r"2 record\(s\) of its held-out inputs"):
        tasks.check_fits_model(task, dataclasses.replace(ds, x_test=held), "loader")
    regression = tasks.dataset_for(DIABETES)
    y = regression.y_train.copy()
    y[0] = np.nan
    with pytest.raises(ValueError, match="training targets hold NaN"):
        tasks.check_fits_model(DIABETES, dataclasses.replace(regression, y_train=y), "loader")
