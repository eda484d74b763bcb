"""bract on Flower: the only package that imports flwr.

A hospital developer needs only this package's top level:

* :class:`HospitalSetup`, :class:`PrivacyPolicy`, :func:`make_client_app` — the
  hospital's ClientApp (DP-SGD, privacy ledger in ``ctx.state``, secure aggregation);
* :class:`ServerConfig`, :class:`SecAggSettings`, :func:`make_server_app` — the
  ServerApp (secure FedAvg over the Grid, budgets, report and checkpoints);
* :func:`simulated_identities` (ServerApp) and :func:`simulated_identity` (ClientApp) —
  identities and roster for a federation in Flower's simulation engine (the
  simulation plays every operator); :func:`make_identities` — the same in memory.
"""

from bract.flower.client import (
    HospitalSetup,
    PrivacyPolicy,
    dp_train_handler,
    make_client_app,
    metrics_guard_mod,
)
from bract.flower.secagg_client import SecAggIdentity, make_identities, secagg_mod
from bract.flower.secagg_server import SecAggSettings
from bract.flower.server import ServerConfig, fedavg, make_server_app, run_federation
from bract.flower.simulated_operators import simulated_identities, simulated_identity

__all__ = [
    "HospitalSetup",
    "PrivacyPolicy",
    "SecAggIdentity",
    "SecAggSettings",
    "ServerConfig",
    "dp_train_handler",
    "fedavg",
    "make_client_app",
    "make_identities",
    "make_server_app",
    "metrics_guard_mod",
    "run_federation",
    "secagg_mod",
    "simulated_identities",
    "simulated_identity",
]
