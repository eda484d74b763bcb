"""The coordinator's ServerApp: secure FedAvg over the hospitals, every hospital's epsilon
after every round, the signed ledger and the report (bract)."""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from bract.flower import SecAggSettings, ServerConfig, run_federation, simulated_identities
from bract.privacy import load_weights, weights_of
from bract.records.ledger import SignerRoster
from custom_app.task import accuracy, make_model

app = ServerApp()


def evaluate(weights: dict) -> dict[str, float]:
    """The global model on the coordinator's own test set."""
    model = make_model()
    load_weights(model, weights)
    return accuracy(model)


@app.main()
def main(grid: Grid, context: Context) -> None:
    out = Path(str(context.run_config["out"]))
    hospitals = len(grid.get_node_ids())
    # Flower's simulation engine: this process plays every hospital's operator and makes
    # their identities (under OUT/hospitals/) and the roster (OUT/roster.json).
    roster, _ = simulated_identities(out, hospitals)
    cfg = ServerConfig(
        rounds=int(context.run_config["num-server-rounds"]), num_clients=hospitals,
        delta=1e-5, out_dir=out, roster=SignerRoster.of(roster),
        secagg=SecAggSettings(roster.federation_id, roster.keys),
    )
    run_federation(grid, weights_of(make_model()), evaluate, cfg)
