"""Regression federations (scikit-learn diabetes): DP-SGD on every hospital, plain and
secure FedAvg, MSE and R² on the central test set every round."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from bract import tasks
from bract.flower.app import hospital_setup
from bract.flower.client import PrivacyPolicy, make_client_app
from bract.flower.observer import LiveTable, summarize
from bract.flower.secagg_client import make_identities
from bract.flower.secagg_server import SecAggSettings
from bract.flower.server import ServerConfig, run_federation
from bract.privacy import load_weights, weights_of
from bract.records.report import RunReport

from .conftest import FakeGrid

TASK = tasks.TaskConfig.for_dataset("diabetes", clients=3, seed=1)
NODES = [7, 8, 9]


def _run(tmp_path, *, secure: bool, rounds: int = 2, epsilon: float = 8.0) -> dict:
    policy = PrivacyPolicy(target_epsilon=epsilon, delta=1e-5, rounds=rounds, local_epochs=2)
    settings, identities = None, []
    if secure:
        roster, identities = make_identities(len(NODES), "regression-test")
        settings = SecAggSettings("regression-test", roster, clip=8.0)
    apps = {
        node: make_client_app(
            lambda ctx: hospital_setup(TASK, ctx), policy,
            secagg=(lambda ctx: identities[int(ctx.node_config["partition-id"])])
            if secure else None,
        )
        for node in NODES
    }
    ds = tasks.dataset_for(TASK)
    model = tasks.build_model(TASK)

    def evaluate(w):
        load_weights(model, w)
        return tasks.evaluate(model, ds.x_test, ds.y_test)

    cfg = ServerConfig(
        rounds=rounds, num_clients=len(NODES), delta=policy.delta, out_dir=tmp_path,
        node_wait_seconds=1, show_progress=False, secagg=settings,
    )
    return run_federation(FakeGrid(apps), weights_of(tasks.build_model(TASK)), evaluate, cfg)


@pytest.fixture(scope="module")
def plain_report(tmp_path_factory) -> dict:
    return _run(tmp_path_factory.mktemp("plain"), secure=False)


def test_dp_federation_on_diabetes_lowers_the_mse(plain_report) -> None:
    initial, final = plain_report["initial"], plain_report["final"]
    assert set(initial) == {"loss", "mse", "r2"}
    assert "accuracy" not in final
    assert final["mse"] < 0.8 * initial["mse"]
    assert final["r2"] > 0.25 > initial["r2"]
    assert not final["non_private"] and 0 < final["epsilon"] <= 8.0
    assert all(v["trained"] for v in plain_report["rounds"][-1]["per_client"].values())


def test_mse_is_in_target_units_comparable_with_scikit_learn(plain_report) -> None:
    baseline = tasks.centralized_baseline(tasks.dataset_for(TASK))
    # diabetes targets have a variance near 6000: MSE in those units, not standardised ones
    assert plain_report["final"]["mse"] > 1000
    assert plain_report["final"]["mse"] < 2.0 * baseline["mse"]


def test_secure_federation_on_diabetes_reports_mse_and_r2_every_round(tmp_path) -> None:
    report = _run(tmp_path, secure=True)
    rounds = report["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    for row in rounds:
        assert row["secagg"]["aborted"] is None
        assert {"mse", "r2", "loss"} <= set(row) and "accuracy" not in row
        assert np.isfinite(row["mse"]) and row["loss"] == row["mse"]
    assert rounds[-1]["mse"] < report["initial"]["mse"]
    assert rounds[-1]["r2"] > 0.0


def test_summary_and_live_table_show_r2_and_mse(plain_report) -> None:
    text = summarize(plain_report)
    assert "R²" in text and "MSE" in text and "accuracy" not in text
    display = LiveTable(rounds=1, enabled=False)
    row = RunReport.from_plain(plain_report).rounds[0]
    display.row(row)
    headers = [str(c.header) for c in display.table.columns]
    assert headers[:3] == ["round", "MSE", "R²"]
    cells = [next(iter(c.cells)) for c in display.table.columns[:3]]
    assert cells[1] == f"{row.metrics['mse']:.1f}" and cells[2] == f"{row.metrics['r2']:.3f}"
    # classification rows keep loss and accuracy
    cls = LiveTable(rounds=1, enabled=False)
    classification = {k: v for k, v in row.metrics.items() if k not in ("r2", "mse")}
    cls.row(replace(row, metrics={**classification, "accuracy": 0.5}))
    assert [str(c.header) for c in cls.table.columns][:3] == ["round", "loss", "acc"]
