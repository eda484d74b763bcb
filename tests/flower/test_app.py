"""bract as a Flower app: the run config drives the same federation as the CLI."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from flwr.app import Context, RecordDict

from bract.flower.app import (
    client_app,
    identity_from_node_config,
    policy_from_run_config,
    server_app,
    task_from_run_config,
)
from bract.flower.config import RUN_CONFIG_DEFAULTS, FederationConfig
from bract.tasks import TaskConfig
from tests.flwr_cli import flwr_run

from .conftest import FakeGrid, write_operator_files

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


@pytest.mark.parametrize(("key", "value", "needle"), [
    ("noise-multiplier", -1.0, "a finite number >= 0 and <= 10000, or 'calibrate'"),
    ("noise-multiplier", "auto", "a finite number >= 0 and <= 10000, or 'calibrate'"),
    ("batch-size", 0.5, "an integer >= 1, or 'dataset-default'"),
    ("batch-size", -1, "an integer >= 1, or 'dataset-default'"),
    ("secagg-colluders", "lots", "an integer >= 0, or 'one-third'"),
    ("num-classes", True, "an integer >= 2, or 'from-data'"),
    ("round-timeout", 0, "a finite number > 0, or 'none'"),
    ("max-grad-norm", 0.0, "a finite number > 0"),
    ("secagg", "yes", "true or false"),
    ("dataset", "mnist", "one of synthetic, breast-cancer"),
])
def test_the_run_config_has_no_sentinels_and_refuses_a_bad_value_by_name(key, value,
                                                                          needle) -> None:
    """Each optional key is its default word or a number; a number never means "not set"
    (the old -1 / 0 sentinels are refused, naming the key and what it takes)."""
    assert {k for k, v in RUN_CONFIG_DEFAULTS.items() if v in (-1, -1.0)} == set()
    with pytest.raises(ValueError, match=re.escape(f"run config {key}={value!r}: must be ")
                       + ".*" + re.escape(needle)):
        FederationConfig.from_run_config({key: value})


def test_the_run_config_refuses_a_key_bract_does_not_know() -> None:
    with pytest.raises(ValueError, match=r"keys bract does not know: \['target_epsilon'\]"):
        FederationConfig.from_run_config({"target_epsilon": 1.0})


def test_optional_run_config_values_read_back_as_numbers() -> None:
    rc = {"batch-size": 16, "lr": 0.05, "momentum": 0.0, "samples": 200, "seed": 1}
    task = task_from_run_config({**rc, "dataset": "breast-cancer"})
    assert (task.batch_size, task.lr, task.momentum, task.n_samples) == (16, 0.05, 0.0, 200)
    fed = FederationConfig.from_run_config({"round-timeout": 30, "secagg-colluders": 0})
    assert fed.round_timeout == 30.0
    assert fed.secagg_colluders == 0  # 0 is a bound, not "unset"
    assert FederationConfig.from_run_config(RUN_CONFIG_DEFAULTS) == FederationConfig()


def _run_app(rc: dict, node_configs: list[dict] | None = None) -> dict:
    nodes = (11, 22, 33)[:len(node_configs or [{}, {}])]
    grid = FakeGrid(dict.fromkeys(nodes, client_app), run_config=rc)
    for ctx, extra in zip(grid.contexts.values(), node_configs or [{}, {}], strict=True):
        ctx.node_config.update(extra)
    server_app(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                             run_config=rc))
    return json.loads((Path(rc["out"]) / "report.json").read_text())


@pytest.mark.parametrize(("rc", "needle"), [
    ({"target-epsilon": 100}, "run config target-epsilon=100: must be a finite number"),
    ({"clients": 3, "secagg": False}, "asks for clients=3 but Flower's simulation started 2"),
])
def test_a_refused_run_is_one_line_in_flowers_log_not_a_traceback(tmp_path, monkeypatch, rc,
                                                                   needle) -> None:
    """`flwr run` with a bad run config: the ServerApp still raises (Flower marks the
    run failed), and Flower's own log of that exception is one line naming the cause."""
    import io
    import logging

    from flwr.common.logger import log

    import bract.flower.app as app

    monkeypatch.setattr(app, "_in_simulation", lambda grid: True)
    with pytest.raises(ValueError, match=re.escape(needle)) as refused:
        _run_app({"dataset": "breast-cancer", "rounds": 1, "out": str(tmp_path), **rc})
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger = logging.getLogger("flwr")
    logger.addHandler(handler)
    try:  # what Flower's simulation and flwr-serverapp do with a ServerApp's exception
        log(logging.ERROR, "%s raised an exception", "ServerApp", exc_info=refused.value)
    finally:
        logger.removeHandler(handler)
    text = stream.getvalue()
    assert "Traceback" not in text and len(text.strip().splitlines()) == 1, text
    assert text.startswith("bract refused the run: ") and needle in text
    assert not (tmp_path / "report.json").exists()


def test_progress_false_prints_one_plain_line_per_round_and_deploy_asks_for_it(
        tmp_path, capsys, monkeypatch) -> None:
    """Run config progress=false (bract deploy --no-progress): the ServerApp prints one
    plain line per round, as bract simulate --no-progress does, not the live table."""
    from bract.cli import build_parser

    assert build_parser().parse_args(["deploy", "--no-progress"]).no_progress is True
    monkeypatch.setenv("COLUMNS", "400")
    rc = {"dataset": "breast-cancer", "clients": 2, "rounds": 1, "target-epsilon": 2.0,
          "out": str(tmp_path), "secagg": False, "progress": False}
    _run_app(rc)
    out = capsys.readouterr().out
    assert any(line.startswith("round 1: loss ") for line in out.splitlines()), out
    assert "┏" not in out


def test_module_level_apps_run_a_plain_round(tmp_path) -> None:
    rc = {"dataset": "breast-cancer", "clients": 2, "rounds": 1, "target-epsilon": 2.0,
          "out": str(tmp_path), "secagg": False}
    report = _run_app(rc)
    assert report["final"]["rounds_completed"] == 1
    per = report["rounds"][0]["per_client"]
    assert set(per) == {"hospital-0", "hospital-1"}
    assert all(0.98 * 2.0 <= v["epsilon"] <= 2.0 for v in per.values())
    assert "secagg" not in report["rounds"][0]


def test_module_level_apps_run_a_secure_round_from_operator_files(tmp_path) -> None:
    """Identities and rosters come from files named in each hospital's node config."""
    node_configs, _ = write_operator_files(tmp_path, "files-federation", 3)
    rc = {"dataset": "breast-cancer", "clients": 3, "rounds": 2, "target-epsilon": 2.0,
          "out": str(tmp_path / "out"), "roster": str(tmp_path / "server-roster.json")}
    report = _run_app(rc, node_configs)
    row = report["rounds"][0]
    assert row["secagg"]["aborted"] is None
    assert set(row["secagg"]["alive"]) == {"hospital-0", "hospital-1", "hospital-2"}
    assert (row["secagg"]["threshold"], row["secagg"]["colluders"]) == (2, 0)
    # The report shows the ring and graph the hospitals masked with. Round 1: no weight
    # is known yet, so 3 hospitals x weight 2^20 x clip 8 at 2^-16 resolution need 42
    # bits: the 64-bit ring.
    assert (row["secagg"]["ring_bits"], row["secagg"]["graph"]) == (64, "complete")
    assert row["secagg"]["max_weight"] == 2**20
    # Round 2 is sized from the weight bounds the hospitals reported (batch 32 x their
    # batches per epoch, a little over their ~150 records): 3 x 160 x 2^19 < 2^31.
    second = report["rounds"][1]["secagg"]
    assert second["aborted"] is None and len(second["alive"]) == 3
    assert second["ring_bits"] == 32
    assert second["max_weight"] % 32 == 0 and 100 < second["max_weight"] <= 256
    assert (tmp_path / "op-0" / "identity.key").stat().st_mode & 0o077 == 0


def test_secure_app_without_operator_files_fails_clearly(tmp_path) -> None:
    rc = {"dataset": "breast-cancer", "clients": 3, "rounds": 1, "out": str(tmp_path)}
    with pytest.raises(ValueError, match="needs the roster file"):
        _run_app(rc, [{}, {}, {}])
    with pytest.raises(ValueError, match="needs at least 3 hospitals"):
        _run_app({**rc, "clients": 2})
    with pytest.raises(ValueError, match="needs node config"):
        identity_from_node_config({"partition-id": 0})


def test_loading_the_client_app_imports_neither_torch_nor_opacus() -> None:
    """A SuperNode starts a ClientApp process per message: the secure-aggregation stages
    (mask, check, unmask) must not pay for torch's import; only training loads it."""
    import subprocess
    import sys

    code = ("import sys, bract.flower.app; "
            "assert bract.flower.app.client_app is not None; "
            "print(sorted(m for m in ('torch', 'opacus', 'bract.tasks') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


def test_in_flowers_simulation_the_server_plays_the_operators(tmp_path, monkeypatch) -> None:
    """In Flower's simulation engine (an in-memory Grid) with no roster, the ServerApp
    makes the hospitals' identities and roster under the run's output, as bract
    simulate does, and each simulated hospital (node config: a partition, no
    identity) finds its own: secure aggregation runs. A SuperNode count other than
    ``clients`` is refused with the command that fixes it."""
    import bract.flower.app as app

    monkeypatch.setattr(app, "_in_simulation", lambda grid: True)
    rc = {"dataset": "breast-cancer", "clients": 3, "rounds": 1, "target-epsilon": 2.0,
          "out": str(tmp_path / "out")}
    report = _run_app(rc, [{}, {}, {}])  # FakeGrid gives each node its partition-id
    row = report["rounds"][0]
    assert row["secagg"]["aborted"] is None
    assert set(row["secagg"]["alive"]) == {"hospital-0", "hospital-1", "hospital-2"}
    assert (tmp_path / "out" / "roster.json").exists()
    assert (tmp_path / "out" / "hospitals" / "hospital-2" / "identity.key").stat().st_mode \
        & 0o077 == 0
    with pytest.raises(ValueError, match=r"started 2 SuperNodes: run flwr run \. "
                                         r"--federation-config \"num-supernodes=3\""):
        _run_app(rc, [{}, {}])


@pytest.mark.slow
def test_flwr_run_runs_the_app_in_flowers_simulation_engine_with_secure_aggregation(
        tmp_path) -> None:
    """`flwr run .` as the README says: Flower's own CLI and simulation engine, three
    simulated hospitals, secure aggregation, a report and a ledger that verifies."""

    from bract.cli import main

    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "out"
    proc = flwr_run(Path("."), f'clients=3 rounds=2 dataset="breast-cancer" out="{out}"',
                    root, tmp_path / "flwr-home", timeout=480)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert [sorted(r["trained"]) for r in report["rounds"]] == [
        ["hospital-0", "hospital-1", "hospital-2"]] * 2
    assert all(r["secagg"]["aborted"] is None for r in report["rounds"])
    assert main(["audit", "verify", str(out / "ledger.jsonl"), "--roster",
                 str(out / "roster.json"), "--report", str(out / "report.json"),
                 "--out", str(tmp_path / "audit")]) == 0


def test_the_server_app_never_overwrites_an_earlier_run_and_resumes_it_on_request(
        tmp_path) -> None:
    """Under `flwr run`, an out that holds a run is refused (its ledger and report stay
    byte for byte) unless the run config says resume=true, which continues it."""
    rc = {"dataset": "breast-cancer", "clients": 2, "rounds": 1, "target-epsilon": 2.0,
          "out": str(tmp_path), "secagg": False}
    first = _run_app(rc)
    kept = {name: (tmp_path / name).read_bytes() for name in ("report.json", "ledger.jsonl")}
    with pytest.raises(ValueError, match=r"already holds a run .*resume=true continues it"):
        _run_app(rc)
    assert {name: (tmp_path / name).read_bytes() for name in kept} == kept
    resumed = _run_app({**rc, "resume": True})
    assert [r["round"] for r in resumed["rounds"]] == [r["round"] for r in first["rounds"]]
    assert (tmp_path / "ledger.jsonl").read_bytes() == kept["ledger.jsonl"]


def test_every_client_app_pickles_as_flowers_ray_engine_needs() -> None:
    """Flower's simulation engine sends the ClientApp to its Ray actors with
    cloudpickle: bract's own app and any make_client_app app (with secure aggregation
    and a metrics release) pickle and unpickle (a ContextVar in a mod's globals did
    not, and every simulation failed)."""
    import cloudpickle

    from bract.flower.app import client_app as bract_client_app
    from bract.flower.client import PrivacyPolicy, make_client_app
    from bract.flower.secagg_client import make_identities

    _, identities = make_identities(3, "pickled")
    custom = make_client_app(lambda ctx: None, PrivacyPolicy(8.0, 1e-5, 1),
                             secagg=identities[0], release_metrics="aggregate")
    for app in (bract_client_app, custom):
        copy = cloudpickle.loads(cloudpickle.dumps(app))
        assert type(copy) is type(app)
