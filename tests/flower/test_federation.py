"""Server loop + DP client handler, driven through an in-process Grid."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from bract import tasks
from bract.flower.app import hospital_setup
from bract.flower.client import PrivacyPolicy, make_client_app, privacy_state_key
from bract.flower.records import LOCAL_WEIGHTS, TRAIN_INFO
from bract.flower.server import ServerConfig, fedavg, run_federation
from bract.privacy import (
    PrivacyLedger,
    TrainingPlan,
    epsilon_of,
    load_weights,
    weights_of,
)
from bract.records.ledger import read_ledger

from .conftest import FakeGrid

TASK = tasks.TaskConfig(dataset="breast-cancer", clients=3, batch_size=32, lr=0.2)
NODES = [101, 202, 303]


def _setup(ctx):
    return hospital_setup(TASK, ctx)


def _federation(policy: PrivacyPolicy, tmp_path, rounds: int, **grid_kwargs):
    apps = {node: make_client_app(_setup, policy) for node in NODES}
    grid = FakeGrid(apps, **grid_kwargs)
    ds = tasks.dataset_for(TASK)
    eval_model = tasks.build_model(TASK)

    def evaluate(w):
        load_weights(eval_model, w)
        return tasks.evaluate(eval_model, ds.x_test, ds.y_test)

    init = weights_of(tasks.build_model(TASK))
    cfg = ServerConfig(
        rounds=rounds, num_clients=len(NODES), delta=policy.delta, out_dir=tmp_path,
        node_wait_seconds=1, show_progress=False, run_config={"test": True},
        save_model=tmp_path / "model.npz",
    )
    report = run_federation(grid, init, evaluate, cfg)
    return report, grid, init


@pytest.fixture(scope="module")
def calibrated_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run")
    policy = PrivacyPolicy(target_epsilon=3.0, delta=1e-5, rounds=3)
    report, grid, init = _federation(policy, tmp, rounds=3)
    return report, grid, init, tmp, policy


def test_report_schema_and_files(calibrated_run) -> None:
    report, _, _, tmp, _ = calibrated_run
    on_disk = json.loads((tmp / "report.json").read_text())
    assert on_disk == json.loads(json.dumps(report))
    assert [r["round"] for r in report["rounds"]] == [1, 2, 3]
    for row in report["rounds"]:
        assert set(row) >= {
            "round", "epsilon", "delta", "per_client", "accuracy", "loss", "seconds"
        }
        assert set(row["per_client"]) == {"hospital-0", "hospital-1", "hospital-2"}
        for v in row["per_client"].values():
            assert set(v) >= {"epsilon", "noise_multiplier", "sample_rate", "steps"}
        assert row["epsilon"] == max(v["epsilon"] for v in row["per_client"].values())
    entries = read_ledger(tmp / "ledger.jsonl")
    assert len(entries) == 3 * 3  # one signed entry per hospital per round
    assert report["final"]["rounds_completed"] == 3
    assert report["final"]["non_private"] is False


def test_epsilon_covers_all_rounds_and_meets_target(calibrated_run) -> None:
    report, _, _, tmp, policy = calibrated_run
    events = [e.event for e in read_ledger(tmp / "ledger.jsonl")]
    for cid in ("hospital-0", "hospital-1", "hospital-2"):
        mine = [e for e in events if e.client_id == cid]
        eps_by_round = [row["per_client"][cid]["epsilon"] for row in report["rounds"]]
        assert eps_by_round == sorted(eps_by_round) and eps_by_round[0] < eps_by_round[-1]
        for r, eps in enumerate(eps_by_round, 1):
            # The epsilon reported after round r is that of rounds 1..r together.
            assert eps == pytest.approx(epsilon_of(mine[:r], policy.delta), rel=1e-6)
        steps = [row["per_client"][cid]["steps"] for row in report["rounds"]]
        assert steps == list(np.cumsum([e.steps for e in mine]))
        assert eps_by_round[-1] <= policy.target_epsilon
        assert eps_by_round[-1] >= 0.98 * policy.target_epsilon


def test_ledger_lives_in_ctx_state(calibrated_run) -> None:
    _, grid, _, _, _ = calibrated_run
    for node in NODES:
        # One record per dataset (the task's dataset names it, having no dataset-id).
        state = grid.contexts[node].state.config_records[privacy_state_key(TASK.dataset)]
        ledger = PrivacyLedger.from_json(str(state["ledger"]))
        assert [e.round for e in ledger.events] == [1, 2, 3]
        assert float(state["noise-multiplier"]) == ledger.events[0].noise_multiplier


def test_global_model_learns_and_is_saved(calibrated_run) -> None:
    report, _, init, tmp, _ = calibrated_run
    assert report["final"]["accuracy"] > report["initial"]["accuracy"]
    saved = np.load(tmp / "model.npz")
    assert set(saved.files) == set(init)


def test_budget_stop_is_reported_and_ends_federation(tmp_path) -> None:
    # A fixed noise multiplier whose budget allows exactly one round.
    sigma = 1.0
    sizes = {len(tasks.hospital_loader(TASK, pid).dataset) for pid in range(3)}
    one_round = max(
        epsilon_of([TrainingPlan(1, 1, n, TASK.batch_size).round_event(
            sigma, max_grad_norm=1.0, delta=1e-5)], 1e-5)
        for n in sizes
    )
    policy = PrivacyPolicy(
        target_epsilon=one_round * 1.2, delta=1e-5, rounds=3, noise_multiplier=sigma
    )
    report, grid, _ = _federation(policy, tmp_path, rounds=3)
    assert len(report["rounds"]) == 2  # round 2: everybody refuses; federation ends
    second = report["rounds"][1]
    assert all(not v["trained"] for v in second["per_client"].values())
    assert set(report["final"]["stopped"]) == {"hospital-0", "hospital-1", "hospital-2"}
    assert all("budget" in r for r in report["final"]["stopped"].values())
    # The refusal advanced nothing: epsilon stays at the one trained round.
    first = report["rounds"][0]["per_client"]
    for cid, v in second["per_client"].items():
        assert v["epsilon"] == pytest.approx(first[cid]["epsilon"])
        assert v["epsilon"] <= policy.target_epsilon
    # No train message went out in a third round.
    assert {m.metadata.group_id for m in grid.sent} == {"1", "2"}


def test_failing_and_silent_hospitals_do_not_stop_the_federation(tmp_path) -> None:
    policy = PrivacyPolicy(target_epsilon=3.0, delta=1e-5, rounds=2)
    report, _, _ = _federation(
        policy, tmp_path, rounds=2,
        fail={NODES[0]: lambda r: r == 1}, silent={NODES[1]: lambda r: r == 2},
    )
    assert len(report["rounds"]) == 2
    assert report["rounds"][0]["trained"] == ["hospital-1", "hospital-2"]
    assert report["rounds"][1]["trained"] == ["hospital-0", "hospital-2"]
    # Before its first reply the server knows a hospital only by its node id.
    assert report["rounds"][0]["failed"] == {f"node-{NODES[0]}": "failed: injected failure"}
    assert report["rounds"][1]["failed"] == {"hospital-1": "did not answer"}
    assert math.isfinite(report["final"]["loss"])


def _tamper_nan(reply) -> None:
    from flwr.app import Array, ArrayRecord

    rec = reply.content.array_records[LOCAL_WEIGHTS]
    reply.content.array_records[LOCAL_WEIGHTS] = ArrayRecord(
        {k: Array(np.full_like(v.numpy(), np.nan)) for k, v in rec.items()})


def _tamper_wide(reply) -> None:
    """Finite float64 values beyond float32's range: cast into the float32 global model
    they would be infinite."""
    from flwr.app import Array, ArrayRecord

    rec = reply.content.array_records[LOCAL_WEIGHTS]
    reply.content.array_records[LOCAL_WEIGHTS] = ArrayRecord(
        {k: Array(np.full(v.numpy().shape, 1e39, np.float64)) for k, v in rec.items()})


def _tamper_count(value):
    def tamper(reply) -> None:
        if value is None:
            del reply.content.metric_records[TRAIN_INFO]
        else:
            reply.content.metric_records[TRAIN_INFO]["num-examples"] = value
    return tamper


@pytest.mark.parametrize("tamper,why", [
    (_tamper_nan, "non-finite"), (_tamper_wide, "is float64, the global model's is float32"),
    (_tamper_count(None), "no example count"),
    (_tamper_count(-10**6), "not an integer in"), (_tamper_count(2.5), "not an integer in"),
    (_tamper_count(float("inf")), "not an integer in"), (_tamper_count(0), "not an integer in"),
])
def test_a_faulty_plain_update_is_left_out_and_the_run_goes_on(tmp_path, tamper, why) -> None:
    """Plain FedAvg: hospital-0's reply carries NaN weights or an example count that is
    missing, not positive or not an integer. It is left out with one line naming why;
    the other hospitals' rounds go on and the global model stays finite."""
    def mod(msg, ctx, call_next):
        reply = call_next(msg, ctx)
        if int(ctx.node_config["partition-id"]) == 0 and not reply.has_error():
            tamper(reply)
        return reply

    policy = PrivacyPolicy(target_epsilon=3.0, delta=1e-5, rounds=2)
    apps = {node: make_client_app(_setup, policy, mods=[mod]) for node in NODES}
    ds = tasks.dataset_for(TASK)
    eval_model = tasks.build_model(TASK)

    def evaluate(w):
        load_weights(eval_model, w)
        return tasks.evaluate(eval_model, ds.x_test, ds.y_test)

    cfg = ServerConfig(rounds=2, num_clients=len(NODES), delta=policy.delta,
                       out_dir=tmp_path, node_wait_seconds=1, show_progress=False,
                       save_model=tmp_path / "model.npz")
    report = run_federation(FakeGrid(apps), weights_of(tasks.build_model(TASK)), evaluate,
                            cfg)
    for r in report["rounds"]:
        assert r["trained"] == ["hospital-1", "hospital-2"]
        assert r["failed"]["hospital-0"].startswith("unusable update: ")
        assert why in r["failed"]["hospital-0"]
    saved = np.load(tmp_path / "model.npz")
    assert all(np.isfinite(saved[k]).all() for k in saved.files)
    assert math.isfinite(report["final"]["loss"])


def test_a_run_that_averaged_no_update_reports_no_figure_of_a_model(tmp_path) -> None:
    """Every hospital fails round 1: the global model stays the initial one (the
    checkpoint holds it), the row carries no metric and says it aggregated nothing,
    and the final summary says the model was not trained: no rounds completed, no
    metrics, no model file, no plots."""
    policy = PrivacyPolicy(target_epsilon=3.0, delta=1e-5, rounds=1)
    always = {n: (lambda r: True) for n in NODES}
    report, _, init = _federation(policy, tmp_path, rounds=1, fail=always)
    kept = np.load(next((tmp_path / "checkpoint").glob("global-round-1.npz")))
    for k, v in init.items():
        np.testing.assert_array_equal(kept[k], v)
    (row,) = report["rounds"]
    assert row["trained"] == [] and row["aggregated"] is False
    assert not {"loss", "accuracy"} & set(row)
    final = report["final"]
    assert final["model_trained"] is False and final["rounds_completed"] == 0
    assert not {"loss", "accuracy", "model", "plots", "federated_eval"} & set(final)
    assert not (tmp_path / "model.npz").exists()
    assert not list(tmp_path.glob("*.png"))
    assert json.loads((tmp_path / "report.json").read_text())["final"] == final


def test_only_rounds_that_averaged_an_update_count_and_carry_metrics(tmp_path) -> None:
    """Round 1 trains, round 2 averages nothing: round 2's row has no metric, one
    round completed, and the final figures are round 1's model (the final one)."""
    policy = PrivacyPolicy(target_epsilon=3.0, delta=1e-5, rounds=2)
    second = {n: (lambda r: r == 2) for n in NODES}
    report, _, _ = _federation(policy, tmp_path, rounds=2, fail=second)
    r1, r2 = report["rounds"]
    assert r1["aggregated"] is True and r2["aggregated"] is False
    assert "accuracy" in r1 and "accuracy" not in r2
    final = report["final"]
    assert final["model_trained"] is True and final["rounds_completed"] == 1
    assert final["accuracy"] == r1["accuracy"] and final["loss"] == r1["loss"]
    assert (tmp_path / "model.npz").exists() and len(final["plots"]) == 2


def test_a_run_that_averaged_nothing_before_a_crash_resumes_and_trains(tmp_path) -> None:
    """Round 1 averages nothing, the server dies in round 2; the resumed run trains
    round 2 and only then reports a model."""
    policy = PrivacyPolicy(target_epsilon=3.0, delta=1e-5, rounds=2)
    ds = tasks.dataset_for(TASK)
    eval_model = tasks.build_model(TASK)

    def evaluate(w):
        load_weights(eval_model, w)
        return tasks.evaluate(eval_model, ds.x_test, ds.y_test)

    def run(grid, resume):
        cfg = ServerConfig(rounds=2, num_clients=len(NODES), delta=policy.delta,
                           out_dir=tmp_path, node_wait_seconds=1, show_progress=False,
                           run_config={"test": True}, save_model=tmp_path / "model.npz",
                           resume=resume)
        return run_federation(grid, weights_of(tasks.build_model(TASK)), evaluate, cfg)

    def apps():
        return {node: make_client_app(_setup, policy) for node in NODES}

    first = {n: (lambda r: r == 1) for n in NODES}
    with pytest.raises(RuntimeError, match="injected server crash"):
        run(FakeGrid(apps(), fail=first, crash_at_round=2), resume=False)
    assert not (tmp_path / "model.npz").exists()
    report = run(FakeGrid(apps()), resume=True)
    assert [r["aggregated"] for r in report["rounds"]] == [False, True]
    assert report["final"]["model_trained"] is True
    assert report["final"]["rounds_completed"] == 1
    assert (tmp_path / "model.npz").exists() and "accuracy" in report["final"]


def test_non_private_run_is_flagged(tmp_path) -> None:
    policy = PrivacyPolicy(
        target_epsilon=3.0, delta=1e-5, rounds=1, noise_multiplier=0.0, allow_non_private=True
    )
    report, _, _ = _federation(policy, tmp_path, rounds=1)
    assert report["final"]["non_private"] is True
    assert report["rounds"][0]["epsilon"] == "inf"
    assert all("NON-PRIVATE" in v["reason"] for v in report["rounds"][0]["per_client"].values())


def test_non_private_refused_unless_allowed(tmp_path) -> None:
    policy = PrivacyPolicy(target_epsilon=3.0, delta=1e-5, rounds=1, noise_multiplier=0.0)
    report, _, _ = _federation(policy, tmp_path, rounds=1)
    assert report["rounds"][0]["trained"] == []
    assert all("no differential privacy" in r for r in report["final"]["stopped"].values())


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(
            arrays(np.float32, (3, 2), elements=st.floats(-10, 10, width=32)),
            st.integers(1, 1000),
        ),
        min_size=1, max_size=6,
    )
)
def test_fedavg_is_the_example_weighted_mean(updates) -> None:
    ups = [({"w": w}, n) for w, n in updates]
    avg = fedavg(ups)["w"]
    total = sum(n for _, n in updates)
    expected = sum(w.astype(np.float64) * n for w, n in updates) / total
    np.testing.assert_allclose(avg, expected, rtol=1e-5, atol=1e-5)
    # The average lies within the range of the updates, coordinate-wise.
    stack = np.stack([w for w, _ in updates])
    assert np.all(avg >= stack.min(0) - 1e-5) and np.all(avg <= stack.max(0) + 1e-5)


def test_fedavg_rejects_empty_and_mismatched() -> None:
    with pytest.raises(ValueError):
        fedavg([])
    with pytest.raises(ValueError):
        fedavg([({"a": np.zeros(2)}, 1), ({"b": np.zeros(2)}, 1)])


def test_a_hospital_whose_code_raises_fails_with_one_line_and_the_run_says_so(tmp_path) -> None:
    """A hospital-side exception (here: a Flower Datasets dict reaching code that
    expects tensors) becomes that hospital's error reply with a one-line reason: no
    exception escapes the ClientApp, the round goes on with the others, and the
    report's errors name the hospital, its rounds and the cause's type (its message
    stays in the hospital's log)."""
    from bract.records.report import RunReport

    def broken_setup(ctx):
        if int(ctx.node_config["partition-id"]) == 0:
            "img".to("cpu")  # AttributeError, as a dict batch's key would raise
        return _setup(ctx)

    policy = PrivacyPolicy(target_epsilon=3.0, delta=1e-5, rounds=2)
    apps = {node: make_client_app(broken_setup, policy) for node in NODES}
    grid = FakeGrid(apps)
    ds = tasks.dataset_for(TASK)
    eval_model = tasks.build_model(TASK)

    def evaluate(w):
        load_weights(eval_model, w)
        return tasks.evaluate(eval_model, ds.x_test, ds.y_test)

    cfg = ServerConfig(rounds=2, num_clients=3, delta=1e-5, out_dir=tmp_path,
                       node_wait_seconds=1, show_progress=False, run_config={})
    report = RunReport.from_plain(run_federation(grid, weights_of(tasks.build_model(TASK)),
                                                 evaluate, cfg))
    reason = "failed: AttributeError (details in the hospital's log)"
    assert [dict(r.failed) for r in report.rounds] == [{f"node-{NODES[0]}": reason}] * 2
    assert [r.trained for r in report.rounds] == [("hospital-1", "hospital-2")] * 2
    errors = report.errors()
    assert errors == [f"node-{NODES[0]} failed in rounds 1, 2: AttributeError (details in "
                      "the hospital's log)"]
    assert all("\n" not in r.error.reason for r in grid.replies if r.has_error())


def test_contain_errors_turns_any_exception_into_a_one_line_error_reply() -> None:
    from flwr.app import Context, Message, RecordDict

    from bract.flower.client import contain_errors_mod, failure_reason
    from bract.flower.reasons import public
    from bract.privacy import PrivacyError

    msg = Message(RecordDict(), dst_node_id=1, message_type="train")
    ctx = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})

    def boom(m, c):
        raise KeyError("label")

    reply = contain_errors_mod(msg, ctx, boom)
    assert reply.has_error() and reply.error.reason == "KeyError (details in the hospital's log)"
    # bract's refusals are written for the coordinator: their message is the reason.
    assert failure_reason(PrivacyError("target epsilon 0.01 is\nbelow the floor")) == (
        "target epsilon 0.01 is below the floor")
    assert len(failure_reason(public(ValueError("x" * 1000)))) == 300
    assert contain_errors_mod(msg, ctx, lambda m, c: m) is msg  # a success passes through


def test_report_errors_name_failures_and_empty_rounds_but_not_dropouts_or_budget_stops() -> None:
    from bract.records.report import HospitalRound, RoundRow, RunReport

    def line(trained=True):
        return HospitalRound(epsilon=1.0, trained=trained, reason="ok", steps=1,
                             noise_multiplier=1.0, sample_rate=0.1, ledger_entries=1,
                             ledger_head="", ledger_carried=0)

    clean = RunReport({}, (
        RoundRow(round=1, epsilon=1.0, per_client={"a": line(), "b": line()},
                 trained=("a", "b"), failed={}, metrics={}),
        RoundRow(round=2, epsilon=1.0, per_client={"a": line(False), "b": line(False)},
                 trained=(), failed={}, metrics={}),  # both stopped on their budgets
    ))
    assert clean.errors() == []
    dropout = RunReport({}, (RoundRow(round=1, epsilon=1.0, per_client={"a": line()},
                                      trained=("a",), failed={"b": "did not answer"},
                                      metrics={}),))
    assert dropout.errors() == []
    aborted = RunReport({}, (
        RoundRow(round=1, epsilon=1.0, per_client={"a": line()}, trained=("a",), failed={},
                 metrics={}),
        RoundRow(round=2, epsilon=1.0, per_client={"a": line()}, trained=(),
                 failed={"b": "failed: boom"}, metrics={}),
    ))
    assert aborted.errors() == ["b failed in round 2: boom",
                                "round 2 averaged no hospital's update; the global model was not "
                                "updated"]
    nothing = RunReport({}, (RoundRow(round=1, epsilon=0.0, per_client={}, trained=(),
                                      failed={"a": "failed: boom"}, metrics={}),))
    assert nothing.errors() == ["no hospital's update was averaged in any round, so the "
                                "model was not trained (a: failed: boom)"]
    # Stopped by the abort limit: the one error line says why the federation stopped.
    limited = RunReport({}, nothing.rounds, stopped_early="after round 1: 1 consecutive "
                        "secure rounds aborted")
    assert limited.errors() == ["no hospital's update was averaged in any round, so the model "
                                "was not trained (a: failed: boom); stopped after round 1: 1 "
                                "consecutive secure rounds aborted"]


def test_each_hospital_records_the_epsilon_its_data_carried_into_the_run(tmp_path) -> None:
    """A second run of the same hospitals (same state, as `--new-run`): each line records
    the epsilon their data spent in the first run, and the epsilon plot starts there,
    not at 0."""
    from bract.plots import epsilon_series

    def setup(ctx):
        return hospital_setup(TASK, ctx, tmp_path / "hospitals")

    ds = tasks.dataset_for(TASK)
    eval_model = tasks.build_model(TASK)

    def evaluate(w):
        load_weights(eval_model, w)
        return tasks.evaluate(eval_model, ds.x_test, ds.y_test)

    def run(out, target):
        policy = PrivacyPolicy(target_epsilon=target, delta=1e-5, rounds=1)
        apps = {node: make_client_app(setup, policy) for node in NODES}
        cfg = ServerConfig(rounds=1, num_clients=len(NODES), delta=1e-5, out_dir=out,
                           node_wait_seconds=1, show_progress=False, run_config={})
        return run_federation(FakeGrid(apps), weights_of(tasks.build_model(TASK)),
                              evaluate, cfg)

    first = run(tmp_path / "first", 3.0)["rounds"][0]["per_client"]
    assert all(v["epsilon_carried"] == 0.0 for v in first.values())
    second = run(tmp_path / "second", 6.0)
    lines = second["rounds"][0]["per_client"]
    for cid, v in lines.items():
        assert v["ledger_carried"] == 1
        assert v["epsilon_carried"] == pytest.approx(first[cid]["epsilon"])
        assert v["epsilon"] > v["epsilon_carried"]
    _, series = epsilon_series(second)
    for cid, v in lines.items():
        assert series[cid] == [pytest.approx(first[cid]["epsilon"]), v["epsilon"]]
    assert series["max"][0] == pytest.approx(max(v["epsilon"] for v in first.values()))


def test_a_config_stage_dropout_fails_plain_train_messages(tmp_path) -> None:
    """Without secure aggregation `--drop-rate P --drop-stage config` is not ignored: the
    dropping hospitals fail the round's train message, and the report says so."""
    from bract.flower.faults import dropout_mod

    policy = PrivacyPolicy(target_epsilon=3.0, delta=1e-5, rounds=1)
    apps = {node: make_client_app(_setup, policy, mods=[dropout_mod(1.0, "config", 0)])
            for node in NODES}
    cfg = ServerConfig(rounds=1, num_clients=len(NODES), delta=1e-5, out_dir=tmp_path,
                       node_wait_seconds=1, show_progress=False, run_config={})
    report = run_federation(FakeGrid(apps), weights_of(tasks.build_model(TASK)),
                            lambda w: {}, cfg)
    (row,) = report["rounds"]
    assert row["trained"] == [] and len(row["failed"]) == len(NODES)
    assert all("InjectedDropoutError" in why for why in row["failed"].values())


def test_a_plain_hospital_that_fails_before_naming_itself_is_named_by_its_signature(
        tmp_path) -> None:
    """Without secure aggregation, a hospital whose code fails in its first round is
    still named in the report (not by its node id): the server asks it for its signed
    key advertisement and checks it against the roster, as the secure path does."""
    from bract.flower.apps import Hospitals, client_app
    from bract.flower.secagg_client import make_identities
    from bract.records.ledger import SignerRoster
    from bract.records.report import RunReport
    from bract.records.roster import Roster

    keys, idents = make_identities(len(NODES), "plain-fed")
    roster = SignerRoster.of(Roster("plain-fed", keys,
                                    {i + 1: f"hospital-{i}" for i in range(len(NODES))}))

    def broken_setup(ctx):
        if int(ctx.node_config["partition-id"]) == 0:
            raise RuntimeError("disk unplugged")
        return _setup(ctx)

    policy = PrivacyPolicy(target_epsilon=3.0, delta=1e-5, rounds=1)
    app = client_app(Hospitals(
        setup=broken_setup, policy=policy, release_metrics="none", secagg=None,
        identity=lambda ctx: idents[int(ctx.node_config["partition-id"])]))
    cfg = ServerConfig(rounds=1, num_clients=len(NODES), delta=1e-5, out_dir=tmp_path,
                       node_wait_seconds=1, show_progress=False, run_config={}, roster=roster)
    report = RunReport.from_plain(run_federation(
        FakeGrid(dict.fromkeys(NODES, app)), weights_of(tasks.build_model(TASK)),
        lambda w: {}, cfg))
    (row,) = report.rounds
    # named by its signature; its exception's text stays in the hospital's log
    assert row.failed == {"hospital-0": "failed: RuntimeError (details in the hospital's log)"}
    assert report.errors() == [
        "hospital-0 failed in round 1: RuntimeError (details in the hospital's log)"]


def test_a_node_cannot_take_another_members_name() -> None:
    """advertised_member names a node only from an advertisement of the roster's
    federation, signed by that member's key and naming this node as its origin."""
    from flwr.app import Context, Message, RecordDict

    from bract.flower.secagg_client import advertise_handler, make_identities
    from bract.flower.server import IDENTITY_QUERY, advertised_member
    from bract.records.ledger import SignerRoster
    from bract.records.roster import Roster

    keys, idents = make_identities(2, "fed-a")
    names = {1: "hospital-0", 2: "hospital-1"}
    roster = SignerRoster.of(Roster("fed-a", keys, names))
    ctx = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})
    reply = advertise_handler(idents[0])(
        Message(RecordDict(), dst_node_id=7, message_type=IDENTITY_QUERY), ctx)
    assert advertised_member(reply, 7, roster) == "hospital-0"
    assert advertised_member(reply, 8, roster) is None  # replayed by another node
    other_keys, _ = make_identities(2, "fed-a")
    assert advertised_member(reply, 7, SignerRoster.of(Roster("fed-a", other_keys,
                                                              names))) is None
    assert advertised_member(reply, 7, SignerRoster.of(Roster("fed-b", keys, names))) is None


def _naming_federation(roster=None):
    """A Federation for naming checks only (nothing is run or written)."""
    import tempfile
    from pathlib import Path

    from bract.flower.server import Federation

    cfg = ServerConfig(rounds=1, num_clients=2, delta=1e-5,
                       out_dir=Path(tempfile.gettempdir()) / "bract-naming-unused",
                       show_progress=False, roster=roster)
    return Federation(FakeGrid({}), lambda w: {}, cfg)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=20), st.sampled_from([7, 8]))
def test_with_a_roster_a_reply_is_named_only_by_the_member_its_node_proved(
        claimed, node) -> None:
    """Property: with a roster, a report whose client id is not (empty or) the member
    its node proved it is, is refused naming both and binds nothing; one that is, is
    recorded under the proven member."""
    from bract.flower.secagg_client import make_identities
    from bract.records.ledger import SignerRoster
    from bract.records.roster import Roster

    keys, _ = make_identities(2, "fed-a")
    fed = _naming_federation(SignerRoster.of(Roster("fed-a", keys, {1: "h-0", 2: "h-1"})))
    fed.proven = {7: "h-0", 8: "h-1"}
    proven = fed.proven[node]
    name, problem = fed._bind_name(node, claimed)
    assert name == proven
    if claimed in ("", proven):
        assert problem is None and fed.names == {node: proven}
    else:
        assert f"names it {claimed!r}" in problem and f"proves it is {proven!r}" in problem
        assert fed.names == {}
    # a node that proved nothing is refused whatever it claims
    name, problem = fed._bind_name(9, claimed)
    assert problem is not None and "has not proved" in problem and 9 not in fed.names


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 4), st.sampled_from(["a", "b", "c", ""])),
                max_size=12))
def test_without_a_roster_one_name_is_held_by_one_node_first_binding_wins(claims) -> None:
    """Property: without a roster (names are the hospitals' own word), any sequence of
    claims leaves each name held by at most one node and each node under one name: a
    claim is accepted exactly when neither its name nor its node is bound to another."""
    fed = _naming_federation()
    for node, claimed in claims:
        name = claimed or fed.names.get(node, f"node-{node}")  # empty: keeps its name
        before = dict(fed.names)
        free = all(v != name for n, v in before.items() if n != node) and \
            before.get(node, name) == name
        _, problem = fed._bind_name(node, claimed)
        assert (problem is None) == free
        assert fed.names == ({**before, node: name} if free else before)
        assert len(set(fed.names.values())) == len(fed.names)
