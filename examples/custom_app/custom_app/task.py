"""What the hospital already has: data, a torch model, a DataLoader, an evaluation.

Nothing here knows about bract (or about privacy)."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.datasets import load_breast_cancer
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

X, y = load_breast_cancer(return_X_y=True)
X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.2, random_state=0)
_scaler = StandardScaler().fit(X_train)
X_train, X_test = (_scaler.transform(a).astype(np.float32) for a in (X_train, X_test))


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(30, 16), nn.ReLU(), nn.Linear(16, 2))


def hospital_loader(hospital: int, hospitals: int) -> DataLoader:
    idx = np.arange(len(X_train))[hospital::hospitals]
    data = TensorDataset(torch.from_numpy(X_train[idx]), torch.from_numpy(y_train[idx]))
    return DataLoader(data, batch_size=32)


def accuracy(model: nn.Module) -> dict[str, float]:
    with torch.no_grad():
        pred = model(torch.from_numpy(X_test)).argmax(1).numpy()
    return {"accuracy": float((pred == y_test).mean())}
