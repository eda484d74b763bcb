"""The hospital's ClientApp: its model, optimizer and DataLoader, trained with DP-SGD
under a privacy budget, its update leaving only inside a secure sum (bract)."""

from __future__ import annotations

from pathlib import Path

import torch
from flwr.app import Context

from bract.flower import HospitalSetup, PrivacyPolicy, make_client_app, simulated_identity
from custom_app.task import hospital_loader, make_model


def policy(ctx: Context) -> PrivacyPolicy:
    """The budget over the whole run: epsilon at delta 1e-5, noise calibrated to it.
    Deployed on a SuperNode whose node config names a policy file, this is only an ask:
    bract admits it through the operator's policy (docs/integrate.md)."""
    return PrivacyPolicy(target_epsilon=float(ctx.run_config["target-epsilon"]), delta=1e-5,
                         rounds=int(ctx.run_config["num-server-rounds"]))


def setup(ctx: Context) -> HospitalSetup:
    """What this hospital brings: its model, optimizer and data."""
    pid, hospitals = int(ctx.node_config["partition-id"]), int(ctx.node_config["num-partitions"])
    model = make_model()
    # Deployed, the hospital's spent budget lives in its operator's state-dir, under the
    # name its operator gives the patients' dataset (node config dataset-id).
    state_dir = ctx.node_config.get("state-dir")
    return HospitalSetup(model, torch.optim.SGD(model.parameters(), lr=0.2),
                         hospital_loader(pid, hospitals), client_id=f"hospital-{pid}",
                         state_dir=Path(str(state_dir)) if state_dir else None,
                         dataset_id=str(ctx.node_config.get("dataset-id", "")))


def identity(ctx: Context):
    """Its identity for secure aggregation and ledger signing. In Flower's simulation
    engine the ServerApp makes them (it plays every operator); a deployed hospital
    reads its own from its node config instead: bract.flower.app.identity_from_node_config
    (files made by `bract hospital init`, docs/deployment.md)."""
    return simulated_identity(ctx, Path(str(ctx.run_config["out"])))


app = make_client_app(setup, policy, secagg=identity)
