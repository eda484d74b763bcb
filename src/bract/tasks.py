"""bract's built-in tasks: which data, which model, how it is evaluated.

Composes :mod:`bract.data` and :mod:`bract.models` for the ``bract`` command and
the examples. A hospital integrating its own model does not need this module:
it hands its own model, optimizer and DataLoader to :mod:`bract.flower`.

Regression (scikit-learn's diabetes set) trains on standardised targets: the
model is a :class:`TargetScaled` wrapper whose output is ``mean + std * f(x)``
with the training split's target mean and standard deviation, and the loss is
:class:`StandardizedMSELoss`, the squared error in units of that standard
deviation. DP-SGD's clipping norm and learning rate then mean the same for any
target scale, while the global model predicts, and :func:`evaluate` reports MSE,
in the target's original units (comparable with a centralized scikit-learn model,
see :func:`centralized_baseline`).
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bract.data import (
    PARTITION_SCHEMES,
    FederatedDataset,
    dataset_partitions,
    load_dataset,
    load_image_folder,
    load_medmnist,
)
from bract.models import ChestCNN, TabularMLP

DATASETS = ("synthetic", "breast-cancer", "diabetes", "medmnist", "imagefolder")
#: Datasets read from a file or folder the user gives (``data_path``); nothing is downloaded.
FILE_DATASETS = ("medmnist", "imagefolder")

#: Local-training defaults per dataset, chosen on this project's 2-core machine so the
#: 3-hospital, 3-round demo at epsilon 8 learns in about two minutes (docs/benchmarks.md).
DATASET_DEFAULTS: dict[str, dict[str, Any]] = {
    "synthetic": {"n_samples": 4800, "batch_size": 64, "lr": 0.3, "momentum": 0.5},
    "breast-cancer": {"n_samples": None, "batch_size": 32, "lr": 0.2, "momentum": 0.0},
    # Measured: 3 hospitals, 3 rounds, epsilon 8, seeds 0/1/2: test R² 0.31/0.42/0.43 vs
    # 0.33/0.44/0.44 for a centralized non-private LinearRegression (docs/data.md).
    "diabetes": {"n_samples": None, "batch_size": 32, "lr": 0.5, "momentum": 0.0},
    "medmnist": {"n_samples": None, "batch_size": 64, "lr": 0.3, "momentum": 0.5},
    "imagefolder": {"n_samples": None, "batch_size": 64, "lr": 0.3, "momentum": 0.5},
}


@dataclass(frozen=True)
class TaskConfig:
    """Data, model and local-training settings shared by every hospital."""

    dataset: str = "synthetic"
    clients: int = 3
    seed: int = 0
    image_size: int = 28
    n_samples: int | None = None
    batch_size: int = 32
    lr: float = 0.5
    momentum: float = 0.0
    #: The MedMNIST ``.npz`` file or image folder (medmnist / imagefolder only).
    data_path: str = ""
    #: How the training split is divided between hospitals (see :mod:`bract.data.partition`).
    partition: str = "iid"
    #: Dirichlet concentration of the ``dirichlet`` and ``quantity`` schemes.
    alpha: float = 0.5
    #: Column of the ``column`` scheme: ``"label"``, a feature name, or a feature index.
    partition_column: str = ""
    #: The image model's classes and input channels, declared when the coordinator holds
    #: no data (each hospital brings its own file): both set, or both ``None`` (read
    #: from the data).
    num_classes: int | None = None
    in_channels: int | None = None
    #: Image folders: stop at the first unreadable file instead of skipping it.
    strict_data: bool = False

    @property
    def declares_model(self) -> bool:
        """Whether the model's shape is declared (a coordinator without data)."""
        return self.num_classes is not None

    def __post_init__(self) -> None:
        if self.dataset not in DATASETS:
            raise ValueError(f"unknown dataset {self.dataset!r}; choose one of {DATASETS}")
        if (self.num_classes is None) != (self.in_channels is None):
            raise ValueError("declare the model with both num-classes and in-channels, or "
                             "neither (then the data's own shape is used)")
        if self.declares_model:
            if self.dataset not in FILE_DATASETS:
                raise ValueError(f"dataset {self.dataset} is bundled: its model is not declared")
            for name, value in (("num-classes", self.num_classes),
                                ("in-channels", self.in_channels)):
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise ValueError(f"{name} must be an integer >= 1 (got {value!r})")
            if self.num_classes < 2:  # type: ignore[operator]
                raise ValueError("num-classes must be at least 2")
        if self.dataset in FILE_DATASETS and not self.data_path and not self.declares_model:
            what = "MedMNIST .npz file" if self.dataset == "medmnist" else "image folder"
            raise ValueError(
                f"dataset {self.dataset} needs --data-path: the {what} to read "
                "(bract never downloads data), or, for a coordinator that holds no data, "
                "the model's num-classes and in-channels"
            )
        if self.data_path and self.dataset not in FILE_DATASETS:
            raise ValueError(
                f"--data-path is read only by {' and '.join(FILE_DATASETS)}; dataset "
                f"{self.dataset} is bundled"
            )
        if self.data_path:
            # Absolute, so that simulated hospitals in other processes read the same file.
            resolved = str(Path(self.data_path).expanduser().resolve())
            object.__setattr__(self, "data_path", resolved)
        if self.partition not in PARTITION_SCHEMES:
            raise ValueError(
                f"unknown partition {self.partition!r}; choose one of {PARTITION_SCHEMES}"
            )
        if not (
            isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and self.alpha > 0
        ):
            raise ValueError(
                f"alpha must be a finite number > 0 (small: strong skew), got {self.alpha!r}"
            )
        if self.partition == "column" and not str(self.partition_column).strip():
            raise ValueError(
                "--partition column needs --partition-column NAME (e.g. 'label', or a feature "
                "name such as 'age' for diabetes)"
            )
        if not isinstance(self.clients, int) or self.clients < 1:
            raise ValueError(f"clients must be an integer >= 1 (got {self.clients!r})")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch size must be an integer >= 1 (got {self.batch_size!r})")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"learning rate must be a finite number > 0 (got {self.lr!r})")

    def to_plain(self) -> dict[str, Any]:
        """Plain dict for reports."""
        return asdict(self)

    @classmethod
    def for_dataset(cls, dataset: str, **overrides: Any) -> TaskConfig:
        """The dataset's defaults (:data:`DATASET_DEFAULTS`), with ``None`` overrides ignored."""
        if dataset not in DATASETS:
            raise ValueError(f"unknown dataset {dataset!r}; choose one of {DATASETS}")
        values = dict(DATASET_DEFAULTS[dataset])
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(dataset=dataset, **values)


@functools.lru_cache(maxsize=4)
def _load(
    dataset: str, seed: int, image_size: int, n_samples: int | None, data_path: str,
    strict: bool = False,
) -> FederatedDataset:
    if dataset == "medmnist":
        return load_medmnist(data_path, image_size=image_size, n_samples=n_samples, seed=seed)
    if dataset == "imagefolder":
        return load_image_folder(data_path, image_size, seed=seed, n_samples=n_samples,
                                 strict=strict)
    return load_dataset(dataset, seed=seed, image_size=image_size, n_samples=n_samples)


def dataset_for(cfg: TaskConfig) -> FederatedDataset:
    """The task's dataset (train split to partition, central test split), cached per
    process (keyed by the settings that shape the data only)."""
    return _load(cfg.dataset, cfg.seed, cfg.image_size, cfg.n_samples, cfg.data_path,
                 cfg.strict_data)


class TargetScaled(nn.Module):
    """A regressor whose inner model predicts standardised targets, returning
    predictions in the target's units: ``mean + std * inner(x)`` (shape ``[B, 1]``).

    ``mean`` and ``std`` are plain floats, not parameters or buffers: fixed for the
    federation, never trained, never aggregated, absent from the weights. With
    DP-SGD this keeps every gradient on the scale of a standardised problem.
    """

    def __init__(self, inner: nn.Module, mean: float, std: float) -> None:
        super().__init__()
        if not (math.isfinite(mean) and math.isfinite(std) and std > 0):
            raise ValueError(f"target mean and std must be finite with std > 0, got {mean}, {std}")
        self.inner = inner
        self.mean = float(mean)
        self.std = float(std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Predictions in the target's original units."""
        return self.inner(x) * self.std + self.mean


class StandardizedMSELoss(nn.Module):
    """Squared error in units of the target's standard deviation:
    ``((prediction - target) / std) ** 2``, averaged (``reduction="mean"``).

    Takes predictions ``[B]`` or ``[B, 1]`` and float targets ``[B]``. Works with
    Opacus in hooks mode and with ghost clipping (which sets ``reduction`` to
    ``"none"`` for per-sample losses). An empty batch (Poisson sampling) gives 0.
    """

    def __init__(self, std: float = 1.0, reduction: str = "mean") -> None:
        super().__init__()
        if not (math.isfinite(std) and std > 0):
            raise ValueError(f"std must be a finite number > 0, got {std}")
        self.std = float(std)
        self.reduction = reduction

    def forward(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The loss (scalar, or per sample with ``reduction="none"``)."""
        if prediction.dim() == 2 and prediction.shape[1] == 1:
            prediction = prediction[:, 0]
        if prediction.shape != target.shape:
            raise ValueError(
                f"prediction shape {tuple(prediction.shape)} does not match target shape "
                f"{tuple(target.shape)}; a regression model outputs [B] or [B, 1]"
            )
        per_sample = ((prediction - target.to(prediction.dtype)) / self.std) ** 2
        if self.reduction == "none":
            return per_sample
        if self.reduction == "sum":
            return per_sample.sum()
        if self.reduction == "mean":
            return per_sample.sum() / max(per_sample.numel(), 1)
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {self.reduction!r}")


def target_stats(cfg: TaskConfig) -> tuple[float, float]:
    """Mean and standard deviation of the training split's regression target.

    In a simulation these come from the pooled training split (as the feature
    scaling does); in a real federation the hospitals would agree on them up front.
    """
    y = dataset_for(cfg).y_train.astype(np.float64)
    std = float(y.std())
    return float(y.mean()), std if std > 0 else 1.0


def model_spec(cfg: TaskConfig) -> tuple[tuple[int, ...], int, str]:
    """The model's input shape, number of outputs and task kind: as declared (a
    coordinator without data), else read from the task's data."""
    if cfg.declares_model:
        assert cfg.in_channels is not None and cfg.num_classes is not None
        return (cfg.in_channels, cfg.image_size, cfg.image_size), cfg.num_classes, "classification"
    ds = dataset_for(cfg)
    return ds.input_shape, ds.num_classes, ds.task


def build_model(cfg: TaskConfig) -> nn.Module:
    """The task's model, initialised deterministically from the seed: ChestCNN for
    images, TabularMLP for tabular classification, :class:`TargetScaled` TabularMLP
    (one output) for regression."""
    input_shape, num_classes, kind = model_spec(cfg)
    torch.manual_seed(cfg.seed)
    if len(input_shape) == 3:
        return ChestCNN(
            image_size=input_shape[-1], in_channels=input_shape[0], num_classes=num_classes,
        )
    if kind == "regression":
        mean, std = target_stats(cfg)
        return TargetScaled(TabularMLP(n_features=input_shape[0], n_classes=1), mean, std)
    return TabularMLP(n_features=input_shape[0], n_classes=num_classes)


def make_criterion(cfg: TaskConfig) -> nn.Module:
    """The training loss: cross-entropy for classification, :class:`StandardizedMSELoss`
    (with the target's standard deviation) for regression."""
    if model_spec(cfg)[2] == "regression":
        return StandardizedMSELoss(target_stats(cfg)[1])
    return nn.CrossEntropyLoss()


def own_data(cfg: TaskConfig, data_path: str) -> FederatedDataset:
    """A hospital's own file of the task's dataset kind (its training split and its
    held-out split), checked against the federation's model.

    Raises ``ValueError`` naming the mismatch when the file's examples do not fit the
    model (input shape, or a label beyond its classes)."""
    if cfg.dataset not in FILE_DATASETS:
        raise ValueError(f"a hospital's own data-path is read for {' and '.join(FILE_DATASETS)}"
                         f"; dataset {cfg.dataset} is bundled")
    # The coordinator's `samples` never sizes a hospital's own file: it would subsample
    # the hospital's data, and a count beyond the file's would be refused naming it.
    ds = dataset_for(replace(cfg, data_path=data_path, num_classes=None, in_channels=None,
                             n_samples=None))
    return check_fits_model(cfg, ds, data_path)


def check_fits_model(cfg: TaskConfig, ds: FederatedDataset, source: str) -> FederatedDataset:
    """``ds`` if its examples fit the federation's model; ``ValueError`` naming the
    mismatch (input shape, task kind, a label beyond the model's classes, or a NaN or
    infinite input or target, which no training or evaluation can use: the operator
    fixes or drops those records)."""
    input_shape, num_classes, kind = model_spec(cfg)
    if ds.input_shape != tuple(input_shape):
        exc = ValueError(f"{source}: its examples have shape {ds.input_shape}, the "
                         f"federation's model takes {tuple(input_shape)}")
        # source is the hospital's own path: the reply names the mismatch without it.
        exc.public_reason = (f"the hospital's examples have shape {ds.input_shape}, the "
                             f"federation's model takes {tuple(input_shape)} (details in "
                             "its own log)")
        raise exc
    if ds.task != kind:
        exc = ValueError(f"{source}: a {ds.task} dataset, the federation trains {kind}")
        exc.public_reason = (f"the hospital's data is a {ds.task} dataset, the federation "
                             f"trains {kind} (details in its own log)")
        raise exc
    if kind == "classification":
        top = max(int(ds.y_train.max(initial=0)), int(ds.y_test.max(initial=0)))
        if top >= num_classes:
            exc = ValueError(f"{source}: label {top} is beyond the federation's model's "
                             f"{num_classes} classes")
            # A rare class is a fact about the hospital's patients: the reply says less.
            exc.public_reason = (f"the hospital's data holds a label beyond the "
                                 f"federation's model's {num_classes} classes (details "
                                 "in its own log)")
            raise exc
    arrays = [("training inputs", ds.x_train), ("held-out inputs", ds.x_test)]
    if kind == "regression":
        arrays += [("training targets", ds.y_train), ("held-out targets", ds.y_test)]
    for what, values in arrays:
        values = np.asarray(values)
        if not np.issubdtype(values.dtype, np.inexact):
            continue
        finite = np.isfinite(values)
        if not finite.all():
            bad = int(np.count_nonzero(~finite.reshape(len(values), -1).all(1)))
            exc = ValueError(f"{source}: {bad} record(s) of its {what} hold NaN or infinite "
                             "values; fix or drop them")
            # Which records, and how many, are facts about the patients: they stay local.
            exc.public_reason = ("the hospital's data holds NaN or infinite values (details "
                                 "in its own log)")
            raise exc
    return ds


def loader_of(cfg: TaskConfig, x: np.ndarray, y: np.ndarray) -> DataLoader:
    """A DataLoader over (x, y) with the task's (expected) batch size."""
    return DataLoader(
        TensorDataset(torch.from_numpy(x), torch.from_numpy(y)), batch_size=cfg.batch_size
    )


def partitions(cfg: TaskConfig) -> list[np.ndarray]:
    """Every hospital's indices into the training split under the task's partition scheme."""
    return dataset_partitions(
        dataset_for(cfg), cfg.clients, cfg.seed, scheme=cfg.partition, alpha=cfg.alpha,
        column=cfg.partition_column or None,
    )


def hospital_data(cfg: TaskConfig, partition_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Hospital ``partition_id``'s training examples under the task's partition scheme."""
    if not 0 <= partition_id < cfg.clients:
        raise ValueError(f"partition_id must be in [0, {cfg.clients}), got {partition_id}")
    ds = dataset_for(cfg)
    idx = partitions(cfg)[partition_id]
    return ds.x_train[idx], ds.y_train[idx]


def hospital_patients(cfg: TaskConfig, partition_id: int) -> list[str]:
    """The patient of each of hospital ``partition_id``'s training records, in order
    (``ValueError`` when the dataset names no patients: only image folders do, by
    patient sub-folder or DICOM PatientID; ``DataError`` for an image folder with any
    image whose patient is unknown, :func:`bract.data.imagefolder.check_patients_known`)."""
    ds = dataset_for(cfg)
    if "patient_id" not in ds.train_columns:
        raise ValueError(f"dataset {cfg.dataset} names no patient per record: the patient "
                         "privacy unit needs an image folder (patient sub-folders or DICOM "
                         "PatientID) or a hospital's own loader with a patient_id column")
    if cfg.dataset == "imagefolder":
        from bract.data.imagefolder import check_patients_known

        check_patients_known([*ds.train_columns["patient_id"],
                              *ds.test_columns.get("patient_id", ())], cfg.data_path)
    return [str(p) for p in np.asarray(ds.train_columns["patient_id"])[
        partitions(cfg)[partition_id]]]


def hospital_loader(cfg: TaskConfig, partition_id: int) -> DataLoader:
    """A DataLoader over the hospital's data with the task's (expected) batch size."""
    return loader_of(cfg, *hospital_data(cfg, partition_id))


def make_optimizer(cfg: TaskConfig, model: nn.Module) -> torch.optim.Optimizer:
    """Plain SGD for the local steps (Opacus wraps it for DP)."""
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)


def regression_metrics(prediction: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """MSE and R² (scikit-learn's ``r2_score`` definition: 1 - SSE / SST about the
    target's own mean; 1.0 for a perfect fit of a constant target, else 0.0 there)."""
    pred = np.asarray(prediction, dtype=np.float64).reshape(-1)
    y = np.asarray(target, dtype=np.float64).reshape(-1)
    if len(y) == 0:
        return {"mse": 0.0, "r2": 0.0}
    sse = float(np.sum((pred - y) ** 2))
    sst = float(np.sum((y - y.mean()) ** 2))
    r2 = 1.0 - sse / sst if sst > 0 else (1.0 if sse == 0 else 0.0)
    return {"mse": sse / len(y), "r2": r2}


def evaluate(model: nn.Module, x: np.ndarray, y: np.ndarray, batch: int = 512) -> dict[str, float]:
    """Metrics of ``model`` on (x, y), chosen by the label type.

    * integer labels (classification): ``{"loss": cross-entropy, "accuracy"}``;
    * float targets (regression): ``{"loss", "mse", "r2"}`` with ``loss`` = ``mse``,
      the mean squared error in the target's original units, and ``r2`` as
      scikit-learn's ``r2_score``.
    """
    model.eval()
    regression = np.issubdtype(np.asarray(y).dtype, np.floating)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    loss_sum, correct, preds = 0.0, 0, []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            xb = torch.from_numpy(x[i : i + batch]).to(device)
            out = model(xb)
            if regression:
                preds.append(out.reshape(len(xb), -1)[:, 0].double().cpu().numpy())
                continue
            yb = torch.from_numpy(y[i : i + batch]).to(device)
            loss_sum += float(nn.functional.cross_entropy(out, yb, reduction="sum"))
            correct += int((out.argmax(1) == yb).sum())
    if regression:
        metrics = regression_metrics(np.concatenate(preds) if preds else np.zeros(0), y)
        return {"loss": metrics["mse"], **metrics}
    n = max(len(x), 1)
    return {"loss": loss_sum / n, "accuracy": correct / n}


def centralized_baseline(ds: FederatedDataset) -> dict[str, float]:
    """A non-private, centralized scikit-learn model on the pooled training split,
    scored on the same central test set with the same metric names as :func:`evaluate`
    (linear regression for regression; logistic regression for tabular classification).

    Raises ValueError for image datasets (no scikit-learn baseline here).
    """
    if len(ds.input_shape) != 1:
        raise ValueError("the scikit-learn baseline covers tabular datasets only")
    if ds.task == "regression":
        from sklearn.linear_model import LinearRegression

        reg = LinearRegression().fit(ds.x_train, ds.y_train)
        metrics = regression_metrics(reg.predict(ds.x_test), ds.y_test)
        return {"loss": metrics["mse"], **metrics}
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss

    clf = LogisticRegression(max_iter=1000).fit(ds.x_train, ds.y_train)
    proba = clf.predict_proba(ds.x_test)
    return {
        "loss": float(log_loss(ds.y_test, proba, labels=list(range(ds.num_classes)))),
        "accuracy": float(np.mean(clf.predict(ds.x_test) == ds.y_test)),
    }
