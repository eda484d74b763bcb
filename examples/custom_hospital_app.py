"""A hospital's own model and DataLoader, made private and secure with bract.

Run:  python examples/custom_hospital_app.py   (3 simulated hospitals, 3 rounds)

Everything above the "bract" marker (imports aside) is what a hospital developer
already has: a torch model, an optimizer, a DataLoader over its patients, an
evaluation. The 17 lines below it are all bract needs: DP-SGD with a privacy
budget, an accountant that spans rounds, secure aggregation, a report per round.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from flwr.simulation import run_simulation
from sklearn.datasets import load_breast_cancer
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bract.flower import (
    HospitalSetup,
    PrivacyPolicy,
    SecAggSettings,
    ServerConfig,
    make_client_app,
    make_identities,
    make_server_app,
)
from bract.privacy import load_weights, weights_of

HOSPITALS, ROUNDS = 3, 3

# ----------------------------------------------------------- what the hospital already has
X, y = load_breast_cancer(return_X_y=True)
X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.2, random_state=0)
scaler = StandardScaler().fit(X_train)
X_train, X_test = (scaler.transform(a).astype(np.float32) for a in (X_train, X_test))


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(30, 16), nn.ReLU(), nn.Linear(16, 2))


def hospital_loader(hospital: int) -> DataLoader:
    idx = np.arange(len(X_train))[hospital::HOSPITALS]
    data = TensorDataset(torch.from_numpy(X_train[idx]), torch.from_numpy(y_train[idx]))
    return DataLoader(data, batch_size=32)


def accuracy(model: nn.Module) -> dict[str, float]:
    with torch.no_grad():
        pred = model(torch.from_numpy(X_test)).argmax(1).numpy()
    return {"accuracy": float((pred == y_test).mean())}


# --------------------------------------------------------------------------------- bract
policy = PrivacyPolicy(target_epsilon=3.0, delta=1e-5, rounds=ROUNDS)
roster, identities = make_identities(HOSPITALS, "custom-federation")  # the operators' job


def setup(ctx) -> HospitalSetup:
    pid = int(ctx.node_config["partition-id"])
    model = make_model()
    return HospitalSetup(model, torch.optim.SGD(model.parameters(), lr=0.2),
                         hospital_loader(pid), client_id=f"hospital-{pid}")


def evaluate(weights: dict) -> dict[str, float]:
    model = make_model()
    load_weights(model, weights)
    return accuracy(model)


client_app = make_client_app(
    setup, policy, secagg=lambda ctx: identities[int(ctx.node_config["partition-id"])])
server_app = make_server_app(
    lambda: weights_of(make_model()), evaluate,
    ServerConfig(rounds=ROUNDS, num_clients=HOSPITALS, delta=policy.delta,
                 out_dir=Path("runs/custom"), secagg=SecAggSettings("custom-federation", roster)))

if __name__ == "__main__":
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_simulation(server_app, client_app, num_supernodes=HOSPITALS,
                       backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})
    print("report: runs/custom/report.json")
