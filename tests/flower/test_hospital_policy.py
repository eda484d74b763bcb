"""The hospital owns its privacy policy: the coordinator's run config can only ask.

The module-level apps of ``bract.flower.app`` (what ``flwr run`` and ``bract deploy``
run) read each hospital's limits from the policy file its node config names; any
request looser than them is refused before training, the reason reaches the
coordinator's report, and nothing of the hospital's update or metrics leaves.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Context, RecordDict
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from bract.flower.app import client_app, hospital_policy_of, server_app
from bract.flower.client import PrivacyPolicy
from bract.flower.hospital_policy import HospitalPolicy, PolicyFieldError, PolicyRefusal
from bract.flower.records import SECAGG

from .conftest import FakeGrid, assert_no_update_in_clear, write_operator_files

NODES = (11, 22, 33)


def _run(tmp_path: Path, rc: dict, policy: HospitalPolicy | None) -> tuple[dict, FakeGrid]:
    node_configs, roster = write_operator_files(tmp_path, "policy-federation", len(NODES),
                                                policy)
    rc = {"dataset": "breast-cancer", "clients": 3, "rounds": 1, "out": str(tmp_path / "out"),
          "roster": str(roster), **rc}
    grid = FakeGrid(dict.fromkeys(NODES, client_app), run_config=rc)
    for ctx, extra in zip(grid.contexts.values(), node_configs, strict=True):
        ctx.node_config.update(extra)
    server_app(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                             run_config=rc))
    return json.loads((Path(rc["out"]) / "report.json").read_text()), grid


def _nothing_private_left(grid: FakeGrid) -> None:
    assert_no_update_in_clear(grid.replies)
    for reply in grid.replies:  # and no shares either: nobody took part
        assert reply.has_error() or SECAGG not in reply.content.config_records or \
            reply.content.config_records[SECAGG]["kind"] != "secagg.v2.share_keys"


@pytest.mark.parametrize(
    ("ask", "why"),
    [
        ({"noise-multiplier": 0.0}, "training without noise (non-private)"),
        ({"target-epsilon": 20.0}, "asks for epsilon 20; this hospital's policy allows at most 8"),
        ({"target-epsilon": 4.0, "delta": 1e-3}, "asks for delta 0.001"),
        ({"secagg": False, "release-metrics": "clear"}, "release training metrics 'clear'"),
    ],
    ids=["non-private", "looser-epsilon", "looser-delta", "metrics-in-clear"],
)
def test_every_hospital_refuses_a_looser_request_with_its_reason(tmp_path, ask, why) -> None:
    """The coordinator asks for more than the hospitals allow (their policy files say
    epsilon <= 8 at delta <= 1e-5, noise always, metrics stay home): each refuses before
    training, the report names the reason, and nothing of an update leaves."""
    report, grid = _run(tmp_path, ask, HospitalPolicy(target_epsilon=8.0, delta=1e-5))
    (row,) = report["rounds"]
    assert row["trained"] == []
    assert len(row["failed"]) == len(NODES)
    for reason in row["failed"].values():
        assert "PolicyRefusal" in reason and why in reason
    _nothing_private_left(grid)
    assert report["final"]["rounds_completed"] == 0 and report["final"]["epsilon"] == 0.0
    assert report["final"]["model_trained"] is False and "accuracy" not in report["final"]


def test_without_a_policy_file_the_defaults_refuse_non_private_training(tmp_path) -> None:
    report, grid = _run(tmp_path, {"noise-multiplier": 0.0}, None)
    assert report["rounds"][0]["trained"] == []
    _nothing_private_left(grid)


def test_a_request_within_the_policy_trains_with_the_hospitals_accountant(tmp_path) -> None:
    own = HospitalPolicy(target_epsilon=3.0, delta=1e-5, accountant="pld")
    report, _ = _run(tmp_path, {"target-epsilon": 2.0, "accountant": "prv"}, own)
    (row,) = report["rounds"]
    assert sorted(row["trained"]) == ["hospital-0", "hospital-1", "hospital-2"]
    assert 0 < row["epsilon"] <= 2.0
    ledger = [json.loads(line) for line in
              (tmp_path / "out" / "ledger.jsonl").read_text().splitlines()]
    assert {e["accountant"] for e in ledger} == {"pld"}  # the hospital's, not the ask


def test_policy_admission_rules() -> None:
    own = HospitalPolicy(target_epsilon=4.0, delta=1e-5, min_noise_multiplier=0.8,
                         release_metrics="aggregate")
    ask = PrivacyPolicy(target_epsilon=4.0, delta=1e-5, rounds=3, noise_multiplier=1.0)
    assert own.admit(ask).noise_multiplier == 1.0
    with pytest.raises(PolicyRefusal, match=r"requires at least 0\.8"):
        own.admit(PrivacyPolicy(target_epsilon=4.0, delta=1e-5, rounds=3, noise_multiplier=0.5))
    with pytest.raises(PolicyRefusal, match="non-private"):
        own.admit(PrivacyPolicy(target_epsilon=4.0, delta=1e-5, rounds=3, noise_multiplier=0.0,
                                allow_non_private=True))
    assert own.admit_release("aggregate") == "aggregate" and own.admit_release("none") == "none"
    with pytest.raises(PolicyRefusal, match="'clear'"):
        own.admit_release("clear")
    lax = HospitalPolicy(allow_non_private=True)
    assert lax.admit(PrivacyPolicy(target_epsilon=1.0, delta=1e-5, rounds=1,
                                   noise_multiplier=0.0, allow_non_private=True)
                     ).allow_non_private


def test_the_noise_floor_holds_when_the_coordinator_asks_for_calibrated_noise(
        tmp_path) -> None:
    """A policy's min_noise_multiplier is a floor on the noise, not only on the noise a
    coordinator names: asked to calibrate for one round with every record in the batch
    (sample rate 1, which calibrates to about 0.6 at epsilon 8), the hospital trains
    with its floor of 2 (a lower epsilon than asked, never a higher one)."""
    own = HospitalPolicy(target_epsilon=8.0, min_noise_multiplier=2.0)
    report, _ = _run(tmp_path, {"target-epsilon": 8.0, "batch-size": 4096}, own)
    (row,) = report["rounds"]
    assert sorted(row["trained"]) == ["hospital-0", "hospital-1", "hospital-2"]
    ledger = [json.loads(line) for line in
              (tmp_path / "out" / "ledger.jsonl").read_text().splitlines()]
    dp = [e for e in ledger if e["event"].get("mechanism", "dp-sgd") == "dp-sgd"]
    assert len(dp) == 3
    assert all(e["event"]["sample_rate"] == 1.0 for e in dp)
    assert all(e["event"]["noise_multiplier"] == 2.0 for e in dp)
    assert 0 < row["epsilon"] < 8.0


def test_a_hospital_with_an_identity_refuses_to_send_its_update_in_clear(tmp_path) -> None:
    """Leaving secure aggregation out of the training request is no way around it: a
    hospital its operator gave an identity refuses a plain FedAvg round before it
    trains, with its reason, and nothing of its update or count leaves; its policy's
    allow_plain_aggregation lets it take part."""
    (tmp_path / "strict").mkdir()
    (tmp_path / "lax").mkdir()
    report, grid = _run(tmp_path / "strict", {"secagg": False}, HospitalPolicy())
    (row,) = report["rounds"]
    assert row["trained"] == []
    assert all("without secure aggregation" in why for why in row["failed"].values())
    assert len(row["failed"]) == 3
    _nothing_private_left(grid)
    report, _ = _run(tmp_path / "lax", {"secagg": False},
                     HospitalPolicy(allow_plain_aggregation=True))
    assert sorted(report["rounds"][0]["trained"]) == ["hospital-0", "hospital-1",
                                                      "hospital-2"]


def test_an_app_of_its_own_is_held_to_the_operators_policy_and_state_dir(tmp_path) -> None:
    """A hospital's own ClientApp (make_client_app, the policy read from the run config
    as docs/integrate.md's simulation example does) deployed on a SuperNode whose node
    config names a policy file (one that lets its update leave in plain FedAvg): it
    refuses to train without a state directory, refuses a target looser than its
    policy, and its budget carries from run to run."""
    from bract import tasks
    from bract.flower.client import HospitalSetup, make_client_app
    from bract.flower.server import ServerConfig, run_federation
    from bract.privacy import weights_of

    task = tasks.TaskConfig(dataset="breast-cancer", clients=2, batch_size=32, lr=0.2)
    own = tmp_path / "policy.json"
    HospitalPolicy(target_epsilon=4.0, allow_plain_aggregation=True).write(own)
    state = {"state_dir": None}

    def setup(ctx):
        model = tasks.build_model(task)
        pid = int(ctx.node_config["partition-id"])
        return HospitalSetup(model, tasks.make_optimizer(task, model),
                             tasks.hospital_loader(task, pid), client_id=f"hospital-{pid}",
                             state_dir=state["state_dir"] and state["state_dir"] / str(pid))

    def ask(ctx):
        return PrivacyPolicy(target_epsilon=float(ctx.run_config["target-epsilon"]),
                             delta=1e-5, rounds=1)

    def run(k: int, target: float) -> dict:
        grid = FakeGrid({1: make_client_app(setup, ask), 2: make_client_app(setup, ask)},
                        run_config={"target-epsilon": target})
        for ctx in grid.contexts.values():
            ctx.node_config.update({"policy": str(own), "name": "x"})
        cfg = ServerConfig(rounds=1, num_clients=2, delta=1e-5, out_dir=tmp_path / f"out-{k}",
                           node_wait_seconds=1, show_progress=False)
        return run_federation(grid, weights_of(tasks.build_model(task)), lambda w: {}, cfg)

    (row,) = run(0, 3.0)["rounds"]
    assert row["trained"] == [] and len(row["failed"]) == 2
    assert all("no state_dir" in why for why in row["failed"].values())
    state["state_dir"] = tmp_path / "state"
    (row,) = run(1, 50.0)["rounds"]
    assert row["trained"] == []
    assert len(row["failed"]) == 2
    assert all("allows at most 4" in why for why in row["failed"].values())
    (row,) = run(2, 3.0)["rounds"]
    assert len(row["trained"]) == 2 and row["epsilon"] <= 3.0
    (row,) = run(3, 3.0)["rounds"]  # a new run: the budget spent in run 2 carries on
    assert row["trained"] == []
    assert all("budget" in v.get("reason", "") for v in row["per_client"].values())


def test_the_noise_floor_holds_for_a_calibration_cached_in_the_run_and_for_fixed_noise(
        ) -> None:
    """A calibration is kept for the run it was made in; the floor holds when the
    coordinator names that run again after the operator raised it, and for fixed
    noise an app asks below it."""
    from bract.flower.client import _noise_multiplier
    from bract.privacy import PrivacyLedger

    ask = PrivacyPolicy(target_epsilon=8.0, delta=1e-5, rounds=1)
    state = {"noise-multiplier": 0.6, "calibrated-run": "run-7"}
    floored = dataclasses.replace(ask, min_noise_multiplier=1.5)
    assert _noise_multiplier(floored, None, state, PrivacyLedger("h"), "run-7", 1) == 1.5
    assert _noise_multiplier(ask, None, state, PrivacyLedger("h"), "run-7", 1) == 0.6
    fixed = dataclasses.replace(floored, noise_multiplier=0.8)
    assert _noise_multiplier(fixed, None, {}, PrivacyLedger("h"), "run-8", 1) == 1.5


def test_policy_files_round_trip_and_bad_ones_are_named(tmp_path) -> None:
    own = HospitalPolicy(target_epsilon=2.5, secagg_colluders=1)
    own.write(tmp_path / "p.json")
    assert HospitalPolicy.read(tmp_path / "p.json") == own
    assert hospital_policy_of({"policy": str(tmp_path / "p.json")}) == own
    assert hospital_policy_of({}) == HospitalPolicy()
    (tmp_path / "bad.json").write_text('{"target_epsilon": 2, "epsilon_max": 3}')
    with pytest.raises(ValueError, match="unknown field"):
        HospitalPolicy.read(tmp_path / "bad.json")
    (tmp_path / "neg.json").write_text('{"target_epsilon": -1}')
    with pytest.raises(ValueError, match="target_epsilon must be a finite number > 0"):
        HospitalPolicy.read(tmp_path / "neg.json")
    with pytest.raises(ValueError, match="unreadable"):
        HospitalPolicy.read(tmp_path / "missing.json")


asks = st.fixed_dictionaries({
    "target-epsilon": st.sampled_from([1.0, 2.5, 4.0, 9.0]),
    "rounds": st.integers(1, 2),
    "seed": st.integers(0, 3),
    "partition": st.sampled_from(["iid", "dirichlet"]),
    "noise-multiplier": st.sampled_from(["calibrate", 0.0, 0.6, 3.0]),
    "batch-size": st.sampled_from([32, 4096]),
    "secagg": st.just(False),
})


@settings(max_examples=5, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(requests=st.lists(asks, min_size=2, max_size=3))
@example(requests=[  # spend 2.5, try to reset without noise, then ask for the whole 4 again
    {"target-epsilon": 2.5, "rounds": 2, "seed": 0, "partition": "iid",
     "noise-multiplier": "calibrate", "batch-size": 32, "secagg": False},
    {"target-epsilon": 9.0, "rounds": 1, "seed": 1, "partition": "iid",
     "noise-multiplier": 0.0, "batch-size": 32, "secagg": False},
    {"target-epsilon": 4.0, "rounds": 2, "seed": 2, "partition": "dirichlet",
     "noise-multiplier": "calibrate", "batch-size": 32, "secagg": False}])
def test_no_sequence_of_coordinator_requests_takes_a_hospital_past_its_lifetime_policy(
        tmp_path_factory, requests) -> None:
    """Whatever a coordinator asks, run after run (a larger epsilon, no noise, little
    noise, calibrated noise for a batch of every record, another seed or split, new run
    ids), each hospital's lifetime ledger on its data stays within its own policy:
    epsilon <= 4 at delta 1e-5, never non-private, DP-SGD noise never below its floor
    of 0.5, and its chain verifies whole with its key."""
    from bract.flower.app import dataset_source, task_from_run_config
    from bract.flower.client import LEDGER_FILE, privacy_dir
    from bract.privacy import epsilon_of
    from bract.records.ledger import check_chain, read_ledger
    from bract.records.roster import read_roster

    tmp_path = tmp_path_factory.mktemp("lifetime")
    node_configs, roster_path = write_operator_files(
        tmp_path, "policy-federation", len(NODES),
        HospitalPolicy(target_epsilon=4.0, min_noise_multiplier=0.5,
                       allow_plain_aggregation=True))
    roster = read_roster(roster_path)
    for k, ask in enumerate(requests):
        rc = {"dataset": "breast-cancer", "clients": 3, "out": str(tmp_path / f"out-{k}"),
              "roster": str(roster_path), **ask}
        grid = FakeGrid(dict.fromkeys(NODES, client_app), run_config=rc)
        for ctx, extra in zip(grid.contexts.values(), node_configs, strict=True):
            ctx.node_config.update(extra)
        server_app(grid, Context(run_id=k, node_id=0, node_config={}, state=RecordDict(),
                                 run_config=rc))
    source = dataset_source(task_from_run_config({"dataset": "breast-cancer"}))
    # A first request for calibrated noise within the policy always trains.
    first = requests[0]
    must_spend = first["target-epsilon"] <= 4.0 and first["noise-multiplier"] == "calibrate"
    spent = 0
    for i, cfg in enumerate(node_configs):
        own = privacy_dir(Path(cfg["state-dir"]), source) / LEDGER_FILE
        chain = read_ledger(own) if own.exists() else []
        cid = f"hospital-{i}"
        assert check_chain(chain, roster.keys[i + 1], client_id=cid).ok
        events = [e.event for e in chain]
        assert all(e.is_private for e in events)
        assert all(e.noise_multiplier >= 0.5 for e in events if e.mechanism == "dp-sgd")
        assert epsilon_of(events, 1e-5, "prv") <= 4.0 * (1 + 1e-9)
        spent += len(chain)
    if must_spend:
        assert spent > 0


def test_a_public_size_bound_hides_each_hospitals_exact_count(tmp_path) -> None:
    """Hospitals of different sizes that declare the same public bound release the same
    sample rate, steps and noise (and weigh the average by the bound): nothing the
    server sees is a function of their exact counts."""
    policy = HospitalPolicy(target_epsilon=4.0, public_dataset_size=400)
    report, _ = _run(tmp_path, {"target-epsilon": 4.0, "partition": "quantity", "alpha": 0.3},
                     policy)
    per = report["rounds"][0]["per_client"]
    assert all(v["trained"] for v in per.values())
    released = {(v["sample_rate"], v["steps"], v["noise_multiplier"]) for v in per.values()}
    assert released == {(1 / math.ceil(400 / 32), math.ceil(400 / 32),
                         per["hospital-0"]["noise_multiplier"])}
    too_small = HospitalPolicy(target_epsilon=4.0, public_dataset_size=10)
    (tmp_path / "small").mkdir()
    report, _ = _run(tmp_path / "small", {"target-epsilon": 4.0}, too_small)
    # Refused, saying why, and the reason that reaches the coordinator gives no count.
    assert all("public size bound is not an integer at least the hospital's number of "
               "records" in why for why in report["rounds"][0]["failed"].values())


# ------------------------------------------------------------------ the sizes it allocates
def _size_request(tmp_path: Path, ask: dict, policy: HospitalPolicy | None = None) -> str:
    """The reason a configured hospital whose data file does not exist refuses ``ask``
    (a medmnist run whose model the coordinator declares)."""
    from flwr.app import ConfigRecord, Message

    from bract.flower.records import ROUND_CONFIG

    policy_file = tmp_path / "policy.json"
    (policy or HospitalPolicy(allow_plain_aggregation=True)).write(policy_file)
    node_config = {"name": "st-mary", "state-dir": str(tmp_path / "state"),
                   "policy": str(policy_file), "data-path": str(tmp_path / "never.npz"),
                   "dataset-id": "st-mary-chest"}
    rc = {"dataset": "medmnist", "num-classes": 3, "in-channels": 1, "secagg": False,
          "rounds": 1, **ask}
    content = RecordDict()
    content.config_records[ROUND_CONFIG] = ConfigRecord({"round": 1})
    reply = client_app(Message(content, dst_node_id=5, message_type="train"),
                       Context(run_id=1, node_id=5, node_config=node_config,
                               state=RecordDict(), run_config=rc))
    assert reply.has_error()
    return reply.error.reason


@pytest.mark.parametrize(("ask", "why"), [
    ({"image-size": 8192}, "image-size 8192; this hospital's policy allows at most 512 "
                           "(max_image_size)"),
    ({"num-classes": 10**6}, "a model of 217343800 parameters; this hospital's policy allows "
                             "at most 120000000 (max_model_parameters)"),
    ({"in-channels": 10**6}, "(max_model_parameters)"),
    ({"batch-size": 100000}, "batch-size 100000; this hospital's policy allows at most 4096 "
                             "(max_batch_size)"),
    ({"local-epochs": 1000}, "local-epochs 1000; this hospital's policy allows at most 10 "
                             "(max_local_epochs)"),
    ({"grad-sample-mode": "hooks", "image-size": 128, "batch-size": 1000},
     "grad-sample-mode hooks with per-example gradients of 7083651000 values (batch-size x "
     "parameters); this hospital's policy allows at most 2000000000 "
     "(max_per_example_gradients)"),
], ids=["image-size", "classes", "channels", "batch-size", "local-epochs", "hooks"])
def test_a_run_config_past_a_size_limit_is_refused_before_the_model_or_the_data(
        tmp_path, monkeypatch, ask, why) -> None:
    """The coordinator's run config sizes what every hospital allocates (the model, each
    image, each batch, per-example gradients) and computes (local epochs): each size
    past the hospital's policy is refused, naming the setting and the policy's field,
    before the model is built or the data read (its file here does not even exist)."""
    import bract.flower.app as app
    from bract import tasks

    def never(*args, **kwargs):
        raise AssertionError("the model was built or the data read")

    monkeypatch.setattr(app, "hospital_setup", never)
    monkeypatch.setattr(tasks, "build_model", never)
    monkeypatch.setattr(tasks, "dataset_for", never)
    reason = _size_request(tmp_path, ask)
    assert reason.startswith("PolicyRefusal: refused: the coordinator asks for ")
    assert reason.endswith(why)


def test_a_size_refusal_is_the_same_whatever_the_hospital_holds_and_its_limits_are_its_own(
        tmp_path) -> None:
    """The refusal is a function of the run config and the policy only: a hospital with a
    data file and one without give the same reason; a hospital may raise its limits."""
    import numpy as np

    (tmp_path / "with").mkdir()
    (tmp_path / "without").mkdir()
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "with" / "never.npz",
             train_images=rng.integers(0, 255, (40, 28, 28), dtype=np.uint8),
             train_labels=rng.integers(0, 3, (40, 1)),
             test_images=rng.integers(0, 255, (8, 28, 28), dtype=np.uint8),
             test_labels=rng.integers(0, 3, (8, 1)))
    ask = {"batch-size": 100000}
    assert _size_request(tmp_path / "with", ask) == _size_request(tmp_path / "without", ask)
    raised = HospitalPolicy(allow_plain_aggregation=True, max_batch_size=100000)
    admitted = _size_request(tmp_path / "without", ask, raised)  # then: the missing file
    assert admitted == "the hospital's data file was not found (details in its own log)"
    with pytest.raises(PolicyRefusal, match=r"batch-size 64; .* at most 16 \(max_batch_size\)"):
        HospitalPolicy(max_batch_size=16).admit_task(_task(), PrivacyPolicy(1.0, 1e-5, 1))
    with pytest.raises(PolicyRefusal, match=r"local-epochs 3; .* \(max_local_epochs\)"):
        HospitalPolicy(max_local_epochs=2).admit(PrivacyPolicy(1.0, 1e-5, 1, local_epochs=3))
    for name in ("max_image_size", "max_model_parameters", "max_batch_size",
                 "max_local_epochs", "max_per_example_gradients"):
        for bad in (0, -1, 1.5, True, "512"):
            with pytest.raises(ValueError, match=f"{name} must be an integer"):
                HospitalPolicy(**{name: bad})


def _task(**kw):
    from bract import tasks

    return tasks.TaskConfig.for_dataset("medmnist", num_classes=3, in_channels=1, **kw)


def test_the_default_size_limits_admit_every_documented_run() -> None:
    """Image sides up to 512 (docs/data.md names 28, 64, 128 and 224) at the default
    batch sizes in any clipping mode (hooks, which holds a gradient per example, up to
    224 px), the bundled tabular sets at a batch of every record, bract's run-config
    defaults; the red team's sizes are refused."""
    from bract.flower.config import RUN_CONFIG_DEFAULTS, FederationConfig
    from bract.flower.hospital_policy import image_model_parameters

    own = HospitalPolicy()
    for side in (28, 64, 128, 224, 512):
        for mode in ("auto", "bk", "ghost", "hooks"):
            task = _task(image_size=side)
            if mode == "hooks" and side > 224:
                continue
            own.admit_task(task, PrivacyPolicy(8.0, 1e-5, 3, local_epochs=3,
                                               grad_sample_mode=mode))
    assert image_model_parameters(_task(image_size=512)) == 113_251_971  # 3 classes
    for dataset in ("breast-cancer", "diabetes"):
        from bract import tasks

        own.admit_task(tasks.TaskConfig.for_dataset(dataset, batch_size=4096),
                       PrivacyPolicy(8.0, 1e-5, 3, grad_sample_mode="hooks"))
    defaults = FederationConfig.from_run_config(RUN_CONFIG_DEFAULTS)
    own.admit_task(defaults.task(), defaults.policy())
    with pytest.raises(PolicyRefusal, match="max_per_example_gradients"):
        own.admit_task(_task(image_size=128, batch_size=1000),
                       PrivacyPolicy(8.0, 1e-5, 1, grad_sample_mode="hooks"))
    with pytest.raises(PolicyRefusal, match="max_image_size"):
        own.admit_task(_task(image_size=8192), PrivacyPolicy(8.0, 1e-5, 1))


def _own_app_hospital(tmp_path: Path, calls: list[str]):
    """A hospital's own setup (a small model on 64 records) that notes each call."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from bract.flower.client import HospitalSetup

    def setup(ctx: Context) -> HospitalSetup:
        calls.append("setup")
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 2)
        data = TensorDataset(torch.randn(64, 4), torch.arange(64) % 2)
        return HospitalSetup(model, torch.optim.SGD(model.parameters(), lr=0.1),
                             DataLoader(data, batch_size=16), client_id="hospital-0",
                             state_dir=tmp_path / "state", dataset_id="st-mary",
                             held_out=data)

    return setup


def _train_message():
    """A plain train message (no secure-aggregation record) with a global model."""
    import torch
    from flwr.app import ConfigRecord, Message

    from bract.flower.records import GLOBAL_WEIGHTS, ROUND_CONFIG, weights_to_record
    from bract.privacy import weights_of

    content = RecordDict()
    content.config_records[ROUND_CONFIG] = ConfigRecord({"round": 1, "run-id": "r1"})
    torch.manual_seed(0)
    content.array_records[GLOBAL_WEIGHTS] = weights_to_record(weights_of(torch.nn.Linear(4, 2)))
    return Message(content, dst_node_id=1, message_type="train")


@pytest.mark.parametrize(
    ("ask", "why"),
    [
        ({"target_epsilon": 50.0}, "asks for epsilon 50; this hospital's policy allows at most 8"),
        ({"delta": 1e-2}, "asks for delta 0.01; this hospital's policy allows at most 1e-05"),
        ({"noise_multiplier": 0.0, "allow_non_private": True},
         "training without noise (non-private); this hospital's policy never allows it"),
    ],
    ids=["epsilon-50", "delta-0.01", "noise-0"],
)
def test_an_app_of_its_own_on_a_hospital_without_a_policy_file_is_held_to_the_defaults(
        tmp_path, ask, why) -> None:
    """Property: a make_client_app app on a configured hospital (its node config names an
    operator-only key) whose node config names no policy file admits only what the
    default HospitalPolicy allows (epsilon <= 8 at delta <= 1e-5, never non-private):
    whatever the app asks beyond that is refused, with its reason, before the app's
    setup runs, so no data is read and nothing is spent or written. A simulated
    hospital (partition only) running the same app trains under what it asks."""
    from bract.flower.client import make_client_app

    calls: list[str] = []
    asked = PrivacyPolicy(**{"target_epsilon": 8.0, "delta": 1e-5, "rounds": 1, **ask})
    app = make_client_app(_own_app_hospital(tmp_path, calls), lambda ctx: asked)
    configured = Context(run_id=1, node_id=1, state=RecordDict(), run_config={},
                         node_config={"name": "st-mary", "state-dir": str(tmp_path / "state")})
    reply = app(_train_message(), configured)
    assert reply.has_error() and why in reply.error.reason
    assert calls == [] and not (tmp_path / "state").exists()
    if "target_epsilon" in ask:
        simulated = Context(run_id=1, node_id=1, state=RecordDict(), run_config={},
                            node_config={"partition-id": 0, "num-partitions": 1})
        reply = app(_train_message(), simulated)
        assert not reply.has_error() and calls == ["setup"]


@pytest.mark.parametrize(
    ("own", "ask"),
    [(HospitalPolicy(release_metrics="none", allow_plain_aggregation=True), "clear"),
     (HospitalPolicy(release_metrics="aggregate", allow_plain_aggregation=True), "clear"),
     (None, "aggregate")],
    ids=["file-none-asks-clear", "file-aggregate-asks-clear", "defaults-ask-aggregate"],
)
def test_an_app_of_its_own_releases_metrics_only_as_its_hospitals_policy_allows(
        tmp_path, own, ask) -> None:
    """Property: on a configured hospital, a make_client_app app whose release_metrics
    (here read from the coordinator's run config) asks for more than the hospital's
    policy's release_metrics (its file's, else "none") is refused before its setup
    runs, and no metric leaves; the same app on a hospital whose policy allows the
    release sends them."""
    from bract.flower.client import make_client_app
    from bract.flower.records import LOCAL_METRICS

    calls: list[str] = []
    app = make_client_app(_own_app_hospital(tmp_path, calls),
                          PrivacyPolicy(target_epsilon=8.0, delta=1e-5, rounds=1),
                          release_metrics=lambda ctx: ctx.run_config["release"])
    nc = {"name": "st-mary", "state-dir": str(tmp_path / "state")}
    if own is not None:
        own.write(tmp_path / "policy.json")
        nc["policy"] = str(tmp_path / "policy.json")
    ctx = Context(run_id=1, node_id=1, state=RecordDict(), run_config={"release": ask},
                  node_config=nc)
    reply = app(_train_message(), ctx)
    assert reply.has_error()
    assert f"asks to release training metrics {ask!r}; this hospital's policy allows" in \
        reply.error.reason
    assert calls == []
    if ask == "clear":
        HospitalPolicy(release_metrics="clear", allow_plain_aggregation=True).write(
            tmp_path / "policy.json")
        nc["policy"] = str(tmp_path / "policy.json")
        reply = app(_train_message(), ctx)
        assert not reply.has_error() and LOCAL_METRICS in reply.content.metric_records


@pytest.mark.parametrize("app_has_secagg", [True, False], ids=["secagg-app", "plain-app"])
def test_an_app_of_its_own_sends_its_update_in_clear_only_if_its_hospitals_policy_allows(
        tmp_path, app_has_secagg) -> None:
    """Property: on a configured hospital whose policy (its file's, else the defaults)
    does not allow plain aggregation, a train message without secure aggregation is
    refused before the app's setup runs, whatever the app's own
    allow_plain_aggregation says and whether or not it does secure aggregation at all;
    nothing of its update leaves. An app without secure aggregation refuses even a
    message that carries a secure-aggregation record: it has nothing that would mask
    its update."""
    from bract.flower.client import make_client_app
    from bract.flower.secagg_client import make_identities

    calls: list[str] = []
    _, identities = make_identities(3, "own-app")
    app = make_client_app(_own_app_hospital(tmp_path, calls),
                          PrivacyPolicy(target_epsilon=8.0, delta=1e-5, rounds=1),
                          secagg=identities[0] if app_has_secagg else None,
                          allow_plain_aggregation=True)
    for own in (None, HospitalPolicy(allow_plain_aggregation=False)):
        nc = {"name": "st-mary", "state-dir": str(tmp_path / "state")}
        if own is not None:
            own.write(tmp_path / "policy.json")
            nc["policy"] = str(tmp_path / "policy.json")
        ctx = Context(run_id=1, node_id=1, state=RecordDict(), run_config={}, node_config=nc)
        reply = app(_train_message(), ctx)
        assert reply.has_error()
        assert "update without secure aggregation" in reply.error.reason
        assert "allow_plain_aggregation is false" in reply.error.reason
        assert calls == []
        if not app_has_secagg:  # a record named like secure aggregation masks nothing
            msg = _train_message()
            msg.content.config_records[SECAGG] = ConfigRecord({"kind": "anything"})
            ctx = Context(run_id=1, node_id=1, state=RecordDict(), run_config={},
                          node_config=nc)
            reply = app(msg, ctx)
            assert reply.has_error() and "allow_plain_aggregation is false" in \
                reply.error.reason
            assert calls == []


def test_ghost_clipping_is_refused_by_every_hospital_and_by_bracts_run_config() -> None:
    """Ghost clipping's terms come from a second backward pass that crafted weights can
    move past the clipping norm: a hospital's policy (the defaults, or any file) refuses
    a request for it, whichever app asks, and bract's run config does not offer it."""
    from bract.flower.config import RUN_CONFIG_DEFAULTS, FederationConfig

    for own in (HospitalPolicy(), HospitalPolicy(target_epsilon=50.0, delta=1e-3)):
        with pytest.raises(PolicyRefusal, match="asks for grad-sample-mode ghost"):
            own.admit(PrivacyPolicy(4.0, 1e-5, 3, grad_sample_mode="ghost"))
        for mode in ("auto", "bk", "hooks"):
            own.admit(PrivacyPolicy(4.0, 1e-5, 3, grad_sample_mode=mode))
    with pytest.raises(ValueError, match="grad-sample-mode='ghost': must be one of"):
        FederationConfig.from_run_config({**RUN_CONFIG_DEFAULTS, "grad-sample-mode": "ghost"})


@pytest.mark.parametrize("field", ["target_epsilon", "delta", "noise_multiplier",
                                   "local_epochs", "max_grad_norm",
                                   "metrics_noise_multiplier", "metrics_loss_bound"])
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_a_request_holding_nan_or_infinity_is_refused(field: str, value: float) -> None:
    """Every limit is written so that NaN (which compares False with anything) and
    infinity are refused, not admitted: an app's policy may come from the run config."""
    from dataclasses import replace

    asked = replace(PrivacyPolicy(4.0, 1e-5, 3), **{field: value})
    if field == "noise_multiplier" and value == math.inf:
        # infinite noise is more private than any minimum: admitted (and trains nothing)
        HospitalPolicy().admit(asked)
        return
    with pytest.raises(PolicyRefusal, match="refused: the coordinator asks for"):
        HospitalPolicy().admit(asked)


def test_runs_of_one_flower_run_series_never_read_one_datasets_ledger_as_anothers(
        tmp_path) -> None:
    """Flower hands every run of one run series (which the coordinator names) the same
    ``ctx.state``. Property: a dataset's spent budget is read only from that dataset's
    own privacy state, so a run on another dataset in the same series neither carries
    that dataset's events into this one's ledger nor lets this one's spent budget be
    spent again, and each dataset's own ledger keeps exactly its own entries."""
    import torch
    from flwr.app import Message

    from bract import tasks
    from bract.flower.client import LEDGER_FILE, privacy_dir
    from bract.flower.config import FederationConfig
    from bract.flower.records import (
        GLOBAL_WEIGHTS,
        PRIVACY_REPORT,
        ROUND_CONFIG,
        weights_to_record,
    )
    from bract.privacy import weights_of
    from bract.records.ledger import read_ledger

    HospitalPolicy(target_epsilon=8.0, allow_plain_aggregation=True).write(
        tmp_path / "policy.json")
    nc = {"name": "st-mary", "state-dir": str(tmp_path / "state"),
          "policy": str(tmp_path / "policy.json"), "partition-id": 0}

    def train(run_id: int, dataset: str, epsilon: float, state: RecordDict) -> bool:
        fed = FederationConfig(dataset=dataset, rounds=1, clients=3, secagg=False,
                               target_epsilon=epsilon, out=tmp_path / "out")
        ctx = Context(run_id=run_id, node_id=1, state=state, run_config=fed.to_run_config(),
                      node_config=dict(nc))
        content = RecordDict()
        content.config_records[ROUND_CONFIG] = ConfigRecord({"round": 1,
                                                             "run-id": f"run-{run_id}"})
        torch.manual_seed(0)
        content.array_records[GLOBAL_WEIGHTS] = weights_to_record(
            weights_of(tasks.build_model(fed.task())))
        reply = client_app(Message(content, dst_node_id=1, message_type="train"), ctx)
        assert not reply.has_error(), reply.error.reason
        return bool(reply.content.config_records[PRIVACY_REPORT]["trained"])

    def ledger(dataset: str) -> list:
        path = privacy_dir(tmp_path / "state", dataset) / LEDGER_FILE
        return read_ledger(path) if path.exists() else []

    assert train(1, "diabetes", 8.0, RecordDict())  # spends diabetes's whole budget
    spent = ledger("diabetes")
    assert len(spent) == 1
    assert not train(2, "diabetes", 8.0, RecordDict())  # a new series: refused
    series = RecordDict()  # one Context for the runs of one series
    assert train(3, "breast-cancer", 0.05, series)
    assert len(ledger("breast-cancer")) == 1  # its own round only
    assert not train(4, "diabetes", 8.0, series)  # still spent
    assert ledger("diabetes") == spent
    assert len(ledger("breast-cancer")) == 1


def test_an_app_composed_by_hand_from_the_lower_level_parts_trains_in_secure_rounds(
        tmp_path) -> None:
    """docs/integrate.md's lower level: an app that registers ``secagg_mod`` and
    ``dp_train_handler`` itself, on configured hospitals whose policy refuses plain
    aggregation, trains in secure rounds (its update leaves only inside the masked
    sum) exactly as ``make_client_app``'s app does; the same app without
    ``secagg_mod`` is refused, even for a message that carries a secure-aggregation
    record, since nothing in it masks the update."""
    from flwr.clientapp import ClientApp

    import bract.flower.app as bract_app
    from bract.flower.client import contain_errors_mod, dp_train_handler, metrics_guard_mod
    from bract.flower.secagg_client import register_secagg, secagg_mod

    hospitals = bract_app.CONFIGURED_HOSPITALS

    def composed(with_secagg: bool) -> ClientApp:
        app = ClientApp()
        mods = [contain_errors_mod, metrics_guard_mod(hospitals.release_metrics)]
        if with_secagg:
            mods.append(secagg_mod(hospitals.secagg, hospitals.release_metrics))
        register_secagg(app, hospitals.secagg, mods=[contain_errors_mod])
        app.train(mods=mods)(dp_train_handler(hospitals.setup, hospitals.policy,
                                              hospitals.secagg, hospitals.release_metrics))
        return app

    for with_secagg in (True, False):
        out = tmp_path / f"secagg-{with_secagg}"
        out.mkdir()
        node_configs, roster = write_operator_files(out, "composed", len(NODES))
        rc = {"dataset": "breast-cancer", "clients": 3, "rounds": 1, "target-epsilon": 2.0,
              "out": str(out / "out"), "roster": str(roster)}
        grid = FakeGrid(dict.fromkeys(NODES, composed(with_secagg)), run_config=rc)
        for ctx, extra in zip(grid.contexts.values(), node_configs, strict=True):
            ctx.node_config.update(extra)
        server_app(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                                 run_config=rc))
        row = json.loads((out / "out" / "report.json").read_text())["rounds"][0]
        assert_no_update_in_clear(grid.replies)
        if with_secagg:
            assert sorted(row["trained"]) == [f"hospital-{i}" for i in range(3)], row["failed"]
        else:
            assert row["trained"] == []
            assert all("allow_plain_aggregation is false" in why
                       for why in row["failed"].values()), row["failed"]


_FIELD_TYPES = {f.name: f.type for f in dataclasses.fields(HospitalPolicy)}
#: Values of the wrong JSON type for each declared type (null is wrong unless optional).
_WRONG = {"bool": ["false", "true", 0, 1, 1.0, None, [], {}],
          "int": ["2", 2.0, 2.5, True, False, None, [2], {}],
          "float": ["4", "nan", True, False, None, [4.0], {}],
          "str": [1, True, None, ["prv"], {}]}


def _wrong_values(declared: str) -> list:
    base = declared.removesuffix(" | None")
    return [v for v in _WRONG[base] if not (v is None and declared.endswith("| None"))]


@pytest.mark.parametrize(("field", "bad"), [
    (name, bad) for name, declared in _FIELD_TYPES.items() for bad in _wrong_values(declared)])
def test_every_policy_field_of_the_wrong_json_type_is_refused_naming_file_and_field(
        tmp_path, field: str, bad) -> None:
    """Every field (found from the dataclass, so none is forgotten) refuses a value of
    the wrong JSON type with a one-line ValueError naming the file, the field and the
    value; in particular no boolean field takes the string "false" (which is truthy)."""
    path = tmp_path / "policy.json"
    path.write_text(json.dumps({field: bad}))
    with pytest.raises(PolicyFieldError) as info:
        HospitalPolicy.read(path)
    message = str(info.value)
    assert info.value.field == field
    assert message.startswith(f"hospital policy {path}: {field} must be ")
    assert message.endswith(f"got {json.dumps(bad)}")
    assert "\n" not in message
    with pytest.raises(PolicyFieldError, match=f"hospital policy: {field} must be "):
        HospitalPolicy(**{field: bad})


@pytest.mark.parametrize("text", ['"false"', '"False"', '"no"', "0", "1", '""'])
def test_a_policy_saying_non_private_false_in_any_non_boolean_way_is_refused(
        tmp_path, text: str) -> None:
    path = tmp_path / "policy.json"
    path.write_text('{"allow_non_private": ' + text + "}")
    with pytest.raises(PolicyFieldError, match="allow_non_private must be true or false"):
        hospital_policy_of({"policy": str(path)})
    own = HospitalPolicy()
    with pytest.raises(PolicyRefusal, match="never allows it"):
        own.admit(PrivacyPolicy(8.0, 1e-5, 3, noise_multiplier=0.0, allow_non_private=True))


@pytest.mark.parametrize(("field", "value", "ok"), [
    ("target_epsilon", 0.05, True), ("target_epsilon", 50, True),
    ("target_epsilon", 0.049, True), ("target_epsilon", 100, True),
    ("target_epsilon", 1e308, True), ("target_epsilon", 0, False),
    ("target_epsilon", -1, False),
    ("delta", 0, False), ("delta", 1, False), ("delta", 0.5, True),
    ("min_noise_multiplier", -0.1, False), ("min_noise_multiplier", 1e4, True),
    ("min_noise_multiplier", 1e5, True), ("metrics_loss_bound", 0, False),
    ("accountant", "rdp", True), ("accountant", "gdp", False),
    ("release_metrics", "all", False), ("privacy_unit", "person", False)])
def test_policy_values_out_of_range_are_refused(
        tmp_path, field: str, value, ok: bool) -> None:
    """A policy's epsilon and noise floor are caps on what a run may ask (epsilon at
    most, noise at least): any finite epsilon > 0 and noise floor >= 0 reads (a policy
    written as "anything bract allows", e.g. 100, keeps working); the rest is refused
    naming the field."""
    path = tmp_path / "policy.json"
    path.write_text(json.dumps({field: value}))
    if ok:
        assert getattr(HospitalPolicy.read(path), field) == value
    else:
        where = re.escape(str(path))
        with pytest.raises(PolicyFieldError, match=f"{where}: {field} must be .*, got "):
            HospitalPolicy.read(path)


def test_a_policy_file_naming_a_field_twice_is_refused_naming_the_field(tmp_path) -> None:
    path = tmp_path / "policy.json"
    path.write_text('{"target_epsilon": 1, "delta": 1e-6, "target_epsilon": 40}')
    where = re.escape(str(path))
    with pytest.raises(ValueError, match=f"hospital policy {where} names the field "
                                         "'target_epsilon' twice"):
        HospitalPolicy.read(path)


@pytest.mark.parametrize("value", [-2, -1, 0, 1, 2, 3, 7])
@pytest.mark.parametrize(("field", "key"), [("secagg_colluders", "colluders"),
                                            ("secagg_min_honest", "min_honest")])
def test_secagg_policy_fields_follow_secure_aggregations_own_rules_when_read(
        tmp_path, field: str, key: str, value: int) -> None:
    """A policy's secagg bound is accepted when read exactly when secure aggregation's
    ClientPolicy accepts it, so a bad one never reaches a secure round."""
    from bract.secagg.errors import ConfigurationError
    from bract.secagg.protocol import ClientPolicy

    try:
        ClientPolicy(**{key: value})
        accepted = True
    except ConfigurationError:
        accepted = False
    path = tmp_path / "policy.json"
    path.write_text(json.dumps({field: value}))
    if accepted:
        assert getattr(HospitalPolicy.read(path), field) == value
    else:
        where = re.escape(str(path))
        with pytest.raises(PolicyFieldError, match=f"{where}: {field} must be valid for "
                                                   "secure aggregation"):
            HospitalPolicy.read(path)


def test_a_bad_policy_field_reaches_the_coordinator_named_without_the_file_or_value(
        tmp_path) -> None:
    """A hospital whose policy file is invalid fails every message with a reason that
    names the field and what it must be (so the coordinator can tell its operator),
    never the policy file's path."""
    from bract.flower.reasons import failure_reason

    path = tmp_path / "secret-folder" / "policy.json"
    path.parent.mkdir()
    path.write_text('{"secagg_min_honest": 1}')
    with pytest.raises(PolicyFieldError) as info:
        hospital_policy_of({"policy": str(path)})
    reason = failure_reason(info.value)
    assert reason.startswith("this hospital's policy file is invalid: secagg_min_honest "
                             "must be valid for secure aggregation")
    assert "secret-folder" not in reason
