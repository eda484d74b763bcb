"""bract's built-in tasks: which data, which model, how it is evaluated.

Composes :mod:`bract.data` and :mod:`bract.models` for the ``bract`` command and
the examples. A hospital integrating its own model does not need this module:
it hands its own model, optimizer and DataLoader to :mod:`bract.flower`.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bract.data import FederatedDataset, load_dataset, partition_dataset
from bract.models import ChestCNN, TabularMLP

DATASETS = ("synthetic", "breast-cancer")

#: Local-training defaults per dataset, chosen on this project's 2-core machine so the
#: 3-hospital, 3-round demo at epsilon 8 learns in about two minutes (docs/benchmarks.md).
DATASET_DEFAULTS: dict[str, dict[str, Any]] = {
    "synthetic": {"n_samples": 4800, "batch_size": 64, "lr": 0.3, "momentum": 0.5},
    "breast-cancer": {"n_samples": None, "batch_size": 32, "lr": 0.2, "momentum": 0.0},
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

    def __post_init__(self) -> None:
        if self.dataset not in DATASETS:
            raise ValueError(f"unknown dataset {self.dataset!r}; choose one of {DATASETS}")
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
def dataset_for(cfg: TaskConfig) -> FederatedDataset:
    """The task's dataset (train split to partition, central test split), cached per process."""
    return load_dataset(
        cfg.dataset, seed=cfg.seed, image_size=cfg.image_size, n_samples=cfg.n_samples
    )


def build_model(cfg: TaskConfig) -> nn.Module:
    """The task's model, initialised deterministically from the seed."""
    ds = dataset_for(cfg)
    torch.manual_seed(cfg.seed)
    if cfg.dataset == "synthetic":
        return ChestCNN(
            image_size=cfg.image_size, in_channels=ds.input_shape[0], num_classes=ds.num_classes
        )
    return TabularMLP(n_features=ds.input_shape[0], n_classes=ds.num_classes)


def hospital_data(cfg: TaskConfig, partition_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Hospital ``partition_id``'s training examples (IID split of the training set)."""
    return partition_dataset(dataset_for(cfg), cfg.clients, partition_id, cfg.seed)


def hospital_loader(cfg: TaskConfig, partition_id: int) -> DataLoader:
    """A DataLoader over the hospital's data with the task's (expected) batch size."""
    x, y = hospital_data(cfg, partition_id)
    return DataLoader(
        TensorDataset(torch.from_numpy(x), torch.from_numpy(y)), batch_size=cfg.batch_size
    )


def make_optimizer(cfg: TaskConfig, model: nn.Module) -> torch.optim.Optimizer:
    """Plain SGD for the local steps (Opacus wraps it for DP)."""
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)


def evaluate(model: nn.Module, x: np.ndarray, y: np.ndarray, batch: int = 512) -> dict[str, float]:
    """Cross-entropy loss and accuracy of ``model`` on (x, y)."""
    model.eval()
    loss_sum, correct = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(x), batch):
            xb = torch.from_numpy(x[i : i + batch])
            yb = torch.from_numpy(y[i : i + batch])
            out = model(xb)
            loss_sum += float(nn.functional.cross_entropy(out, yb, reduction="sum"))
            correct += int((out.argmax(1) == yb).sum())
    n = max(len(x), 1)
    return {"loss": loss_sum / n, "accuracy": correct / n}
