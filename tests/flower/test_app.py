"""bract as a Flower app: the run config drives the same federation as the CLI."""

from __future__ import annotations

import json
from pathlib import Path

from flwr.app import Context, RecordDict

from bract.flower.app import (
    RUN_CONFIG_DEFAULTS,
    client_app,
    policy_from_run_config,
    server_app,
    task_from_run_config,
)
from bract.tasks import TaskConfig

from .conftest import FakeGrid

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]


def test_pyproject_run_config_matches_the_code() -> None:
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    app = meta["tool"]["flwr"]["app"]
    assert app["config"] == RUN_CONFIG_DEFAULTS
    assert app["components"] == {
        "serverapp": "bract.flower.app:server_app",
        "clientapp": "bract.flower.app:client_app",
    }


def test_defaults_are_the_cli_defaults() -> None:
    assert task_from_run_config({}) == TaskConfig.for_dataset("synthetic", clients=3)
    policy = policy_from_run_config({})
    assert policy.noise_multiplier is None  # calibrate
    assert (policy.target_epsilon, policy.delta, policy.rounds) == (8.0, 1e-5, 3)
    assert not policy.allow_non_private
    assert policy_from_run_config({"noise-multiplier": 0.0}).allow_non_private


def test_module_level_apps_run_a_round(tmp_path) -> None:
    rc = {"dataset": "breast-cancer", "clients": 2, "rounds": 1, "target-epsilon": 2.0,
          "out": str(tmp_path)}
    grid = FakeGrid({11: client_app, 22: client_app}, run_config=rc)
    server_app(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                             run_config=rc))
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["final"]["rounds_completed"] == 1
    per = report["rounds"][0]["per_client"]
    assert set(per) == {"hospital-0", "hospital-1"}
    assert all(0.98 * 2.0 <= v["epsilon"] <= 2.0 for v in per.values())
