"""Secure FedAvg over the Grid: same model as plain FedAvg, dropouts at every stage,
and nothing of a hospital's update in clear on the wire."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from bract import tasks
from bract.flower.app import hospital_setup
from bract.flower.client import PrivacyPolicy, make_client_app
from bract.flower.faults import DROP_STAGES, inject_dropout, message_stage
from bract.flower.records import AGGREGATED_METRICS, LOCAL_METRICS, SECAGG, SECAGG_NEXT
from bract.flower.secagg_client import make_identities
from bract.flower.secagg_server import SecAggSettings
from bract.flower.server import ServerConfig, run_federation
from bract.privacy import load_weights, weights_of
from bract.secagg import ClientPolicy

from .conftest import FakeGrid, assert_no_update_in_clear

TASK = tasks.TaskConfig(dataset="breast-cancer", clients=5, batch_size=32, lr=0.2, seed=3)
NODES = [1001, 1002, 1003, 1004, 1005]
NON_PRIVATE = PrivacyPolicy(
    target_epsilon=1.0, delta=1e-5, rounds=2, noise_multiplier=0.0, allow_non_private=True,
    sampling_seed=7,
)


def _setup(ctx):
    return hospital_setup(TASK, ctx)


def _drop_mod(plan: dict[tuple[int, str], set[int]]):
    """Fail the hospitals ``plan[(round, stage)]`` at that stage."""

    def mod(msg, ctx, call_next):
        rnd = int(msg.metadata.group_id)
        hospital = int(ctx.node_config["partition-id"])
        for stage in DROP_STAGES:
            inject_dropout(msg, stage, rnd, lambda r, s=stage: hospital in plan.get((r, s), ()))
        return call_next(msg, ctx)

    return mod


def _run(tmp_path, policy, *, secure: bool, rounds=2, drop_plan=None, release="none",
         record_dir=None, extra_mods=(), colluders: int | None = 0, setup=_setup,
         nodes=NODES, dropouts: int | None = None,
         hospital_policies: dict[int, ClientPolicy] | None = None,
         abort_limit: int | None = 2, resume=False, crash_at_round=None):
    """A federation of the five NODES (or ``nodes``, with ``setup`` for as many).
    Secure runs declare ``colluders`` (0 by default: t = 3 of 5, so these tests can
    drop two hospitals; the collusion bound itself is exercised in tests/secagg) on
    the server and in every hospital's policy (``hospital_policies``: partition id ->
    a hospital's own policy instead), and ``dropouts`` and ``abort_limit`` on the
    server. ``resume``: continue the run checkpointed in ``tmp_path``;
    ``crash_at_round``: the server crashes when it opens that round."""
    settings = None
    identities = []
    if secure:
        roster, identities = make_identities(len(nodes), "test-federation")
        hospital_policy = ClientPolicy(colluders=colluders, clip_out_of_range=True)
        identities = [dataclasses.replace(i, policy=(hospital_policies or {}).get(
            k, hospital_policy)) for k, i in enumerate(identities)]
        settings = SecAggSettings(
            "test-federation", roster, clip=8.0, colluders=colluders, dropouts=dropouts,
            aggregate_metrics=len(AGGREGATED_METRICS) if release == "aggregate" else 0,
            record_dir=str(record_dir) if record_dir else None, abort_limit=abort_limit,
        )
    mods = ([_drop_mod(drop_plan)] if drop_plan else []) + list(extra_mods)
    apps = {
        node: make_client_app(
            setup, policy,
            secagg=(lambda ctx: identities[int(ctx.node_config["partition-id"])])
            if secure else None,
            release_metrics=release, mods=mods,
        )
        for node in nodes
    }
    grid = FakeGrid(apps, crash_at_round=crash_at_round)
    ds = tasks.dataset_for(TASK)
    model = tasks.build_model(TASK)

    def evaluate(w):
        load_weights(model, w)
        return tasks.evaluate(model, ds.x_test, ds.y_test)

    cfg = ServerConfig(
        rounds=rounds, num_clients=len(nodes), delta=policy.delta, out_dir=tmp_path,
        node_wait_seconds=1, show_progress=False, save_model=tmp_path / "m.npz",
        secagg=settings, resume=resume,
    )
    report = run_federation(grid, weights_of(tasks.build_model(TASK)), evaluate, cfg)
    # no model file when no round averaged an update
    final = dict(np.load(tmp_path / "m.npz")) if (tmp_path / "m.npz").exists() else None
    return report, grid, final


def test_secure_fedavg_equals_plain_fedavg_within_the_encoding_error(tmp_path) -> None:
    plain, _, plain_w = _run(tmp_path / "plain", NON_PRIVATE, secure=False)
    secure, _, secure_w = _run(tmp_path / "secure", NON_PRIVATE, secure=True, colluders=None)
    # the default collusion bound: floor((5 - 1) / 3) = 1 colluder, t = 4 of 5
    assert [(r["secagg"]["colluders"], r["secagg"]["threshold"]) for r in secure["rounds"]] \
        == [(1, 4), (1, 4)]
    assert plain["final"]["non_private"] and secure["final"]["non_private"]
    # Per round the mean update is off by at most error_bound / total weight; two rounds.
    bound = sum(r["secagg"]["error_bound"] for r in secure["rounds"]) / 455 + 1e-6
    for k in plain_w:
        assert np.max(np.abs(plain_w[k] - secure_w[k])) <= bound
    assert any(np.any(plain_w[k] != secure_w[k]) for k in plain_w)  # genuinely masked path
    # Round 1: keys, config+train, mask, check, unmask (+ round 2's config and shares);
    # round 2 is pipelined: train+mask, check, unmask.
    assert [r["secagg"]["stages"] for r in secure["rounds"]] == [5, 3]
    # Round 1's ring is sized for the default weight (64 bits); round 2's for the weight
    # bounds the hospitals reported (5 x 96 x 2^19 < 2^31: 32 bits), and the sums agree.
    assert [r["secagg"]["ring_bits"] for r in secure["rounds"]] == [64, 32]
    assert [r["secagg"]["max_weight"] for r in secure["rounds"]] == [2**20, 96]
    # No dropout tolerance declared: auto keeps the complete graph, which survives
    # 5 - max(t = 4, c + h = 3) = 1 dropout; the report says so.
    assert [(r["secagg"]["graph"], r["secagg"]["degree"], r["secagg"]["dropouts_tolerated"])
            for r in secure["rounds"]] == [("complete", 4, 1)] * 2


def test_a_declared_dropout_tolerance_lets_auto_mask_with_fewer_hospitals(tmp_path) -> None:
    """Ten hospitals, one colluder, one dropout to survive: auto masks over the SecAgg+
    degree-8 graph (8 neighbours, not 9; each neighbourhood of 9 with t = 6 survives 3
    dropouts), every hospital accepts it, the report records the graph and its
    tolerance, and a hospital that drops after sharing in round 2 leaves the round to
    the other nine. The server's recorded view of both rounds passes the secure
    aggregation audit: on the sparse graph too, the only sums it can isolate, with
    every secret it reconstructed (hospital-4's mask key), are the rounds' totals."""
    from bract.audit.secagg_audit import audit_views
    from bract.secagg.recording import read_view

    task = dataclasses.replace(TASK, clients=10)
    nodes = list(range(2001, 2011))
    policy = dataclasses.replace(NON_PRIVATE, rounds=2)
    report, _, _ = _run(
        tmp_path / "run", policy, secure=True, colluders=1, dropouts=1, nodes=nodes,
        setup=lambda ctx: hospital_setup(task, ctx), drop_plan={(2, "mask"): {4}},
        record_dir=tmp_path / "view")
    rounds = report["rounds"]
    assert [(r["secagg"]["graph"], r["secagg"]["degree"], r["secagg"]["dropouts_tolerated"],
             r["secagg"]["aborted"]) for r in rounds] == [("harary", 8, 3, None)] * 2
    assert len(rounds[0]["trained"]) == 10
    assert rounds[1]["secagg"]["dropped"] == ["hospital-4"]
    assert len(rounds[1]["secagg"]["alive"]) == 9
    views = read_view(tmp_path / "view")
    assert [v.config.graph_kind for v in views] == ["harary", "harary"]
    audit = audit_views(views)
    assert not [c for c in audit.checks if not c.passed]
    knowledge = [c for c in audit.checks if c.name == "knowledge-across-rounds"]
    assert [c.statistics[0]["isolable_sums"] for c in knowledge] == [
        [sorted(v.unmask_request.alive)] for v in views]


def _outgrown_from_round_2():
    """A mod that tracks the round, and a setup in which hospital-0 declares a public
    size of 4096 from round 2 on (far above what round 1's reports size the ring for)."""
    now = {"round": 0}

    def track(msg, ctx, call_next):
        now["round"] = int(msg.metadata.group_id)
        return call_next(msg, ctx)

    def setup(ctx):
        s = _setup(ctx)
        if int(ctx.node_config["partition-id"]) == 0 and now["round"] >= 2:
            s = dataclasses.replace(s, public_size=4096)
        return s

    return track, setup


def test_a_hospital_whose_weight_outgrew_the_ring_is_refused_before_training(
        tmp_path) -> None:
    """Round 2's ring is sized from round 1's reports; hospital-0 then declares a far
    larger dataset (a public size of 4096). It refuses round 2 before training, spending
    nothing; round 3 is sized for the default weight again, and it rejoins."""
    track, setup = _outgrown_from_round_2()
    policy = dataclasses.replace(NON_PRIVATE, rounds=4)
    report, _, _ = _run(tmp_path, policy, secure=True, rounds=4, extra_mods=[track],
                        setup=setup)
    r1, r2, r3, r4 = (r["secagg"] for r in report["rounds"])
    assert all(r["aborted"] is None for r in (r1, r2, r3, r4))
    assert [r["ring_bits"] for r in (r1, r2, r3, r4)] == [64, 32, 64, 64]
    assert [r["max_weight"] for r in (r1, r2, r3, r4)] == [2**20, 96, 2**20, 4096]
    assert "hospital-0" not in r2["alive"]
    assert "max weight 96: refused before training" in report["rounds"][1]["failed"][
        "hospital-0"]
    assert "hospital-0" in r3["alive"] and "hospital-0" in r4["alive"]
    # Nothing was spent in the refused round: hospital-0's ledger has 3 entries.
    ledger = report["rounds"][3]["per_client"]["hospital-0"]
    assert ledger["ledger_entries"] == 3
    others = report["rounds"][3]["per_client"]["hospital-1"]
    assert others["ledger_entries"] == 4


def test_a_train_message_without_its_round_config_is_still_held_to_the_ring(
        tmp_path) -> None:
    """The server leaves the round config record out of every train message. The ring
    still bounds the weight before training: hospital-0, whose weight outgrew round 2's
    ring, refuses it before training: nothing spent, and no error after training."""
    from bract.flower.records import ROUND_CONFIG

    track, setup = _outgrown_from_round_2()

    def strip(msg, ctx, call_next):
        msg.content.config_records.pop(ROUND_CONFIG, None)
        return call_next(msg, ctx)

    policy = dataclasses.replace(NON_PRIVATE, rounds=3)
    report, _, _ = _run(tmp_path, policy, secure=True, rounds=3, extra_mods=[track, strip],
                        setup=setup)
    r2 = report["rounds"][1]
    assert r2["secagg"]["aborted"] is None and "hospital-0" not in r2["secagg"]["alive"]
    assert "max weight 96: refused before training" in r2["failed"]["hospital-0"]
    assert report["rounds"][2]["per_client"]["hospital-0"]["ledger_entries"] == 2


def test_a_round_its_policy_refuses_costs_a_hospital_no_budget(tmp_path) -> None:
    """hospital-0 tolerates c = 1 colluder; the server sets rounds up for c = 0. The
    round config comes with the training instruction (non-pipelined rounds: a hospital
    that refuses never signs, so its rounds are never pipelined), and hospital-0
    refuses it before it trains: after three rounds its ledger is empty, and the
    others' rounds go on without it."""
    set_up: list[int] = []

    def setup(ctx):  # the training handler builds the hospital's setup first
        set_up.append(int(ctx.node_config["partition-id"]))
        return _setup(ctx)

    policy = dataclasses.replace(NON_PRIVATE, rounds=3)
    report, _, _ = _run(tmp_path, policy, secure=True, rounds=3, setup=setup,
                        hospital_policies={0: ClientPolicy(colluders=1,
                                                           clip_out_of_range=True)})
    assert 0 not in set_up and set(set_up) == {1, 2, 3, 4}
    for r in report["rounds"]:
        assert r["secagg"]["aborted"] is None
        assert "hospital-0" not in r["secagg"]["alive"] and len(r["secagg"]["alive"]) == 4
        assert "policy is c = 1" in r["failed"]["node-1001"]


def test_a_pipelined_mask_request_it_refuses_costs_a_hospital_no_budget(tmp_path) -> None:
    """Round 2 is pipelined: its mask request travels with the training instruction.
    hospital-0's arrives tampered (a share ciphertext flipped on the way); it refuses
    the request before it trains, so round 2 costs it nothing, and rounds go on."""
    from dataclasses import replace as dc_replace

    from bract.flower.records import secagg_from_record, secagg_to_record
    from bract.secagg.messages import MaskRequest

    set_up: list[tuple[int, int]] = []
    now = {"round": 0}

    def tamper(msg, ctx, call_next):
        now["round"] = int(msg.metadata.group_id)
        rec = msg.content.config_records.get(SECAGG)
        if rec is not None and int(ctx.node_config["partition-id"]) == 0 and now["round"] == 2:
            req = secagg_from_record(rec)
            if isinstance(req, MaskRequest):
                ct = bytearray(req.ciphertexts[0])
                ct[-1] ^= 1
                msg.content.config_records[SECAGG] = secagg_to_record(
                    dc_replace(req, ciphertexts=[bytes(ct), *req.ciphertexts[1:]]))
        return call_next(msg, ctx)

    def setup(ctx):
        set_up.append((int(ctx.node_config["partition-id"]), now["round"]))
        return _setup(ctx)

    policy = dataclasses.replace(NON_PRIVATE, rounds=3)
    report, _, _ = _run(tmp_path, policy, secure=True, rounds=3, extra_mods=[tamper],
                        setup=setup)
    assert report["rounds"][1]["secagg"]["stages"] == 3  # pipelined
    assert (0, 2) not in set_up and (1, 2) in set_up and (0, 1) in set_up
    assert "hospital-0" not in report["rounds"][1]["secagg"]["alive"]


def test_an_update_computed_from_another_global_model_is_in_no_sum(tmp_path) -> None:
    """Each hospital signs the digest of the global model it received with its masked
    update. In round 2, hospital-0 receives a different model (what a server that
    singles a hospital out would send); its update is refused by the server, which
    knows the model it sent, and the round sums the other four."""
    from bract.flower.records import GLOBAL_WEIGHTS, record_to_weights, weights_to_record

    def other_model(msg, ctx, call_next):
        if (int(ctx.node_config["partition-id"]) == 0 and int(msg.metadata.group_id) == 2
                and GLOBAL_WEIGHTS in msg.content.array_records):
            w = record_to_weights(msg.content.array_records[GLOBAL_WEIGHTS])
            msg.content.array_records[GLOBAL_WEIGHTS] = weights_to_record(
                {k: v * 0 for k, v in w.items()})
        return call_next(msg, ctx)

    policy = dataclasses.replace(NON_PRIVATE, rounds=3)
    report, _, _ = _run(tmp_path, policy, secure=True, rounds=3, extra_mods=[other_model])
    r1, r2, r3 = (r["secagg"] for r in report["rounds"])
    assert r1["aborted"] is None and len(r1["alive"]) == 5
    assert r2["aborted"] is None and "hospital-0" not in r2["alive"]
    assert len(r2["alive"]) == 4
    assert r3["aborted"] is None and "hospital-0" in r3["alive"]


def test_updates_trained_under_other_settings_are_in_no_common_sum(tmp_path) -> None:
    """The same global model with a vanishing learning rate gives an update of zeros: a
    coordinator that runs its own SuperLink could give it to every hospital but one.
    Each hospital also signs the digest of the training settings it received (run
    config and round config), so in round 2, where hospital-0 alone is told another
    learning rate, no hospital signs an alive set that mixes them: the round ends with
    nothing unmasked, and round 3 (same settings again) completes."""

    def other_settings(msg, ctx, call_next):
        if int(ctx.node_config["partition-id"]) == 0 and int(msg.metadata.group_id) == 2:
            ctx.run_config["lr"] = 1e-30
        else:
            ctx.run_config.pop("lr", None)
        return call_next(msg, ctx)

    policy = dataclasses.replace(NON_PRIVATE, rounds=3)
    report, _, _ = _run(tmp_path, policy, secure=True, rounds=3,
                        extra_mods=[other_settings])
    r1, r2, r3 = (r["secagg"] for r in report["rounds"])
    assert r1["aborted"] is None and len(r1["alive"]) == 5
    assert r2["aborted"] is not None
    assert r3["aborted"] is None and len(r3["alive"]) == 5


def test_a_report_no_ring_can_carry_does_not_abort_the_rounds(tmp_path) -> None:
    """hospital-0 reports a weight bound of 2^60 (a forged report: no ring carries five
    such weights). The server caps the round's max weight at what the 64-bit ring
    carries, so every round still completes with every hospital; before the cap, this
    one report aborted every round after the first."""
    from bract.flower.records import PRIVACY_REPORT

    def forge(msg, ctx, call_next):
        reply = call_next(msg, ctx)
        report = reply.content.config_records.get(PRIVACY_REPORT)
        if int(ctx.node_config["partition-id"]) == 0 and report is not None:
            report["weight-bound"] = 2**60
        return reply

    policy = dataclasses.replace(NON_PRIVATE, rounds=3)
    report, _, _ = _run(tmp_path, policy, secure=True, rounds=3, extra_mods=[forge])
    cap = SecAggSettings("f", {}, clip=8.0).encoding([None] * 5).largest_weight(5)
    rounds = report["rounds"]
    assert [r["secagg"]["aborted"] for r in rounds] == [None, None, None]
    assert [r["secagg"]["max_weight"] for r in rounds] == [2**20, cap, cap]
    assert [r["secagg"]["ring_bits"] for r in rounds] == [64, 64, 64]
    assert all(len(r["trained"]) == len(NODES) for r in rounds)


@pytest.mark.parametrize("stage", sorted(DROP_STAGES))
def test_rounds_survive_dropouts_at_every_stage_and_abort_cleanly_below_threshold(
    tmp_path, stage
) -> None:
    # Round 1: 2 of 5 drop (3 >= t = 3 remain): completes. Round 2: 3 of 5 drop: aborts.
    # Round 3: nobody drops: the federation goes on.
    plan = {(1, stage): {0, 1}, (2, stage): {0, 1, 2}}
    policy = dataclasses.replace(NON_PRIVATE, rounds=3)
    views = tmp_path / "views"
    report, _, _ = _run(tmp_path, policy, secure=True, rounds=3, drop_plan=plan,
                        record_dir=views)
    r1, r2, r3 = report["rounds"]
    assert r1["secagg"]["aborted"] is None
    everyone = {f"hospital-{i}" for i in range(5)}
    if stage in ("config", "mask"):
        # Dropped before their masked input arrived: not in the sum.
        assert set(r1["secagg"]["alive"]) == everyone - {"hospital-0", "hospital-1"}
    else:
        # Their masked inputs arrived before they dropped: in the sum, masks removed
        # with the survivors' shares.
        assert set(r1["secagg"]["alive"]) == everyone
    assert r1["trained"] == sorted(r1["secagg"]["alive"])
    # Failed after their masked input (check or unmask stage): named as such, in the sum.
    assert r1["secagg"]["failed_after_input"] == (
        ["hospital-0", "hospital-1"] if stage in ("consistency", "unmask") else [])
    assert r2["secagg"]["aborted"]
    assert r2["trained"] == []
    assert r2["secagg"]["failed_after_input"] == []  # an aborted round has no sum
    # Stages counted are those whose messages went out before the abort: train, mask,
    # check, unmask; after round 1's unmask dropouts, which had signed, round 2 is
    # pipelined (train+mask, check, unmask).
    assert r2["secagg"]["stages"] == {"config": 1, "mask": 2, "consistency": 3,
                                      "unmask": 3}[stage]
    assert r2["aggregated"] is False and "loss" not in r2  # the model did not change
    # The aborted round still names who failed (with the stage and reason), whose masked
    # input had arrived, and which key sharers dropped before sending theirs.
    names = {f"hospital-{i}" for i in (0, 1, 2)}
    failed = r2["failed"]
    assert len(failed) == 3
    if stage == "config":  # the config travels with the train message
        assert all(why.startswith("failed: InjectedDropoutError") for why in failed.values())
    elif stage == "unmask":
        # hospital-0 and -1 failed round 1's unmask, which carried round 2's config: they
        # sit round 2 out; hospital-2 drops at round 2's unmask.
        assert failed["hospital-0"] == failed["hospital-1"] == (
            "did not share usable keys for round 2 with round 1's unmask; not asked to train")
        assert "at the unmask stage: InjectedDropoutError" in failed["hospital-2"]
    else:
        at = {"mask": "mask", "consistency": "check"}[stage]
        assert set(failed) == names
        assert all(f"at the {at} stage: InjectedDropoutError" in why for why in failed.values())
    alive = {"config": set(), "mask": everyone - names, "consistency": everyone,
             "unmask": everyone - {"hospital-0", "hospital-1"}}[stage]
    assert set(r2["secagg"]["alive"]) == alive
    assert set(r2["secagg"]["dropped"]) == (names if stage == "mask" else set())
    # Round 1 completed without hospital-0 and hospital-1: each is named with its reason
    # (a hospital that never answered is known by its node here: no roster names it).
    assert len(r1["failed"]) == 2
    assert r3["secagg"]["aborted"] is None and set(r3["secagg"]["alive"]) == everyone
    # Round mask keys serve one round: nobody re-keys after a dropout, whatever its stage.
    assert r2["secagg"]["advertised"] == [] and r3["secagg"]["advertised"] == []
    # The aborted round is recorded too (what the server received before the abort
    # counts towards its knowledge), and the audit across all three rounds passes.
    from bract.audit.secagg_audit import audit_views
    from bract.secagg.recording import read_view

    recorded = read_view(views)
    assert [(v.round, v.aborted) for v in recorded] == [(1, False), (2, True), (3, False)]
    assert audit_views(recorded).passed


@pytest.mark.parametrize("stage", sorted(DROP_STAGES))
def test_a_pipelined_round_survives_dropouts_at_every_stage(tmp_path, stage) -> None:
    # Round 1 is clean, so round 2's config and shares travel with round 1's unmask
    # messages and round 2 takes three stages; 2 of 5 drop in round 2 at ``stage``
    # ("config": they answer round 1's unmask but not round 2's config). Round 2 still
    # completes, and everybody is back by round 4.
    plan = {(2, stage): {0, 1}}
    policy = dataclasses.replace(NON_PRIVATE, rounds=4)
    report, _, _ = _run(tmp_path, policy, secure=True, rounds=4, drop_plan=plan)
    r1, r2, r3, r4 = report["rounds"]
    everyone = {f"hospital-{i}" for i in range(5)}
    assert r1["secagg"]["stages"] == 5 and set(r1["secagg"]["alive"]) == everyone
    assert r2["secagg"]["stages"] == 3 and r2["secagg"]["aborted"] is None
    if stage in ("config", "mask"):
        assert set(r2["secagg"]["alive"]) == everyone - {"hospital-0", "hospital-1"}
    else:
        assert set(r2["secagg"]["alive"]) == everyone
    assert r2["trained"] == sorted(r2["secagg"]["alive"])
    assert r2["loss"] != pytest.approx(r1["loss"])  # round 2's update was applied
    # A dropout after sharing ("mask": shared with round 1's unmask, then failed) has its
    # round-2 mask key reconstructed, which unmasks nothing else: no re-keying after it.
    dropped_after_sharing = {"hospital-0", "hospital-1"} if stage == "mask" else set()
    assert set(r2["secagg"]["dropped"]) == dropped_after_sharing
    assert r3["secagg"]["advertised"] == []
    assert r3["secagg"]["aborted"] is None
    if stage == "unmask":
        # They signed round 2, so round 3 was opened with round 2's unmask messages,
        # which they failed: they sit round 3 out (pipelined, three stages) ...
        assert r3["secagg"]["stages"] == 3
        assert set(r3["secagg"]["alive"]) == everyone - {"hospital-0", "hospital-1"}
        assert {"hospital-0", "hospital-1"} <= set(r3["failed"])
    else:
        # ... otherwise not everybody signed round 2: round 3 takes the four-stage path.
        assert r3["secagg"]["stages"] == 4 and set(r3["secagg"]["alive"]) == everyone
    assert r4["secagg"]["aborted"] is None and set(r4["secagg"]["alive"]) == everyone


def _edit_unmask_reply(hospital: int, fl_round: int, edit):
    """A mod: ``edit(record)`` rewrites ``hospital``'s unmask reply of ``fl_round``."""

    def mod(msg, ctx, call_next):
        reply = call_next(msg, ctx)
        if (int(ctx.node_config["partition-id"]) == hospital
                and int(msg.metadata.group_id) == fl_round
                and message_stage(msg) == "unmask"):
            edit(reply.content.config_records[SECAGG])
        return reply

    return mod


def _corrupt_unmask_reply(hospital: int, fl_round: int):
    """Make ``hospital``'s unmask reply of ``fl_round`` name one share twice (refused)."""

    def edit(rec):
        rec["seed_owners"] = list(rec["seed_owners"]) + list(rec["seed_owners"])[:1]
        rec["seed_shares"] = list(rec["seed_shares"]) + list(rec["seed_shares"])[:1]

    return _edit_unmask_reply(hospital, fl_round, edit)


def test_a_refused_unmask_reply_keeps_its_sender_out_of_the_pipelined_round(
    tmp_path,
) -> None:
    # hospital-0's round-1 unmask reply is refused; its shares for round 2 (in the same
    # reply) are not taken, and round 2 runs pipelined without it instead of being
    # abandoned. It is back in round 3, with the key it has.
    policy = dataclasses.replace(NON_PRIVATE, rounds=3)
    report, _, _ = _run(tmp_path, policy, secure=True, rounds=3,
                        extra_mods=[_corrupt_unmask_reply(0, 1)])
    r1, r2, r3 = report["rounds"]
    everyone = {f"hospital-{i}" for i in range(5)}
    assert r1["secagg"]["aborted"] is None and set(r1["secagg"]["alive"]) == everyone
    assert r2["secagg"]["stages"] == 3
    assert set(r2["secagg"]["alive"]) == everyone - {"hospital-0"}
    assert "hospital-0" in r2["failed"]
    assert r3["secagg"]["advertised"] == []
    assert set(r3["secagg"]["alive"]) == everyone


def _lose_next_shares(hospitals: set[int], fl_round: int):
    """A mod: ``hospitals``' unmask replies of ``fl_round`` arrive without their shares
    for the next round (lost on the way; the reply itself is fine)."""

    def mod(msg, ctx, call_next):
        reply = call_next(msg, ctx)
        if (int(ctx.node_config["partition-id"]) in hospitals
                and int(msg.metadata.group_id) == fl_round
                and message_stage(msg) == "unmask" and not reply.has_error()):
            del reply.content.config_records[SECAGG_NEXT]
        return reply

    return mod


@pytest.mark.parametrize("lost", [{0, 1, 2}, {0, 1, 2, 3, 4}])
def test_a_round_opened_early_with_too_few_shares_opens_again_with_training(
    tmp_path, lost
) -> None:
    # Round 2's shares travel with round 1's unmask replies; those of ``lost`` never
    # arrive, leaving fewer than t = 3 of 5. Round 2 is not thrown away: it opens again
    # with its training instruction (four stages), every hospital answers it, and it
    # averages all five. Its view records the abandoned early opening beside it.
    policy = dataclasses.replace(NON_PRIVATE, rounds=3)
    views = tmp_path / "views"
    report, _, _ = _run(tmp_path, policy, secure=True, rounds=3, record_dir=views,
                        extra_mods=[_lose_next_shares(lost, 1)])
    r1, r2, r3 = report["rounds"]
    everyone = {f"hospital-{i}" for i in range(5)}
    for row in (r1, r2, r3):
        assert row["secagg"]["aborted"] is None and set(row["secagg"]["alive"]) == everyone
        assert row["failed"] == {} and row["aggregated"] is True
    assert r2["secagg"]["stages"] == 4
    assert r2["loss"] != pytest.approx(r1["loss"])
    assert sorted(p.name for p in views.iterdir() if p.name.startswith("round-2")) == [
        "round-2", "round-2-attempt-2"]
    from bract.audit.secagg_audit import audit_views
    from bract.secagg.recording import read_view

    recorded = read_view(views)
    assert [(v.round, v.aborted) for v in recorded] == [(1, False), (2, True), (2, False),
                                                        (3, False)]
    assert audit_views(recorded).passed


def test_nothing_of_an_update_leaves_in_clear(tmp_path) -> None:
    policy = PrivacyPolicy(target_epsilon=4.0, delta=1e-5, rounds=1)
    report, grid, _ = _run(tmp_path, policy, secure=True, rounds=1, release="aggregate")
    assert report["rounds"][0]["secagg"]["aborted"] is None
    assert_no_update_in_clear(grid.replies)
    # Training loss left only in aggregate, inside the masked vector.
    assert np.isfinite(report["rounds"][0]["train_loss"])


def test_plain_mode_keeps_training_metrics_home_unless_released(tmp_path) -> None:
    policy = PrivacyPolicy(target_epsilon=4.0, delta=1e-5, rounds=1)
    _, grid, _ = _run(tmp_path / "a", policy, secure=False, rounds=1)
    assert all(LOCAL_METRICS not in r.content.metric_records for r in grid.replies)
    _, grid, _ = _run(tmp_path / "b", policy, secure=False, rounds=1, release="clear")
    assert all(LOCAL_METRICS in r.content.metric_records for r in grid.replies)


def test_secure_federation_stops_cleanly_when_too_few_hospitals_remain(tmp_path) -> None:
    """Three hospitals; one's budget allows a single round. In round 2 (pipelined) it
    shares, then refuses to train: a dropout after sharing, whose round-2 mask key alone
    is reconstructed; the other two are summed (c = 0, h = 2 for three hospitals). Then
    two hospitals remain: a sum of two would show each the other's update through the
    global model, so the federation ends instead of starting round 3."""
    tight = PrivacyPolicy(target_epsilon=1.0, delta=1e-5, rounds=1)  # calibrated for 1 round
    loose = PrivacyPolicy(target_epsilon=1.0, delta=1e-5, rounds=3)
    nodes = NODES[:3]
    roster, identities = make_identities(3, "two")
    apps = {
        node: make_client_app(
            _setup, (lambda ctx: tight if ctx.node_config["partition-id"] == 0 else loose),
            secagg=lambda ctx: identities[int(ctx.node_config["partition-id"])],
        )
        for node in nodes
    }
    ds = tasks.dataset_for(TASK)
    model = tasks.build_model(TASK)

    def evaluate(w):
        load_weights(model, w)
        return tasks.evaluate(model, ds.x_test, ds.y_test)

    cfg = ServerConfig(
        rounds=3, num_clients=3, delta=1e-5, out_dir=tmp_path, node_wait_seconds=1,
        show_progress=False, secagg=SecAggSettings("two", roster),
    )
    grid = FakeGrid(apps)
    report = run_federation(grid, weights_of(tasks.build_model(TASK)), evaluate, cfg)
    r1, r2 = report["rounds"]
    assert r1["secagg"]["aborted"] is None and len(r1["secagg"]["alive"]) == 3
    assert "budget" in r2["per_client"]["hospital-0"]["reason"]
    assert r2["secagg"]["aborted"] is None and r2["secagg"]["dropped"] == ["hospital-0"]
    assert r2["trained"] == ["hospital-1", "hospital-2"]
    assert "3 hospitals needed" in report["stopped_early"]
    assert {m.metadata.group_id for m in grid.sent} == {"1", "2"}  # no round 3


def test_the_servers_recorded_view_of_real_rounds_passes_the_secagg_audit(tmp_path) -> None:
    """What the server of a real (Flower, DP-SGD) federation received, recorded round by
    round (a pipelined round included), hides every hospital's update: each masked
    input is uniform on the ring, each survivor stays masked after the server strips
    every mask it can (round 1 has two dropouts), and the survivors' remainders add up
    to exactly the server's aggregate (so the audit removed the masks the server
    removed)."""
    from bract.audit.secagg_audit import audit_views
    from bract.cli import main
    from bract.secagg.recording import read_view

    policy = PrivacyPolicy(target_epsilon=8.0, delta=1e-5, rounds=3)
    views_dir = tmp_path / "view"
    report, _, _ = _run(tmp_path / "run", policy, secure=True, rounds=3,
                        drop_plan={(1, "mask"): {0, 1}}, record_dir=views_dir)
    assert [r["secagg"]["aborted"] for r in report["rounds"]] == [None, None, None]
    # Round 3 is pipelined: its config and shares were recorded during round 2's unmask
    # stage and belong to round 3's view, not round 2's.
    assert [r["secagg"]["stages"] for r in report["rounds"]] == [5, 4, 3]
    views = read_view(views_dir)
    assert [v.round for v in views] == [1, 2, 3]
    assert all(v.config.round == v.unmask_request.round for v in views)
    assert len(views[0].masked) == 3 and sorted(views[0].unmask_request.dropped) != []
    audit = audit_views(views)
    failed = [c for c in audit.checks if not c.passed]
    assert not failed, failed
    # across the three rounds, the only sum the server can isolate is each round's total
    knowledge = [c for c in audit.checks if c.name == "knowledge-across-rounds"]
    assert [c.statistics[0]["isolable_sums"] for c in knowledge] == [
        [sorted(v.unmask_request.alive)] for v in views]
    assert main(["audit", "secagg", "--view", str(views_dir), "--out",
                 str(tmp_path / "audit")]) == 0


def test_a_pipelined_round_abandoned_for_a_restart_is_recorded_beside_it(
    tmp_path, monkeypatch,
) -> None:
    """Round 2 opens with round 1's unmask stage (its configuration goes out, its
    shares come in), then loses a hospital before it starts: the server abandons it
    and restarts the round on the four-stage path. The recording keeps what it saw of
    the abandoned attempt (round-2, aborted) and the restart beside it
    (round-2-attempt-2); the audit covers both and passes."""
    from bract.audit.secagg_audit import audit_views
    from bract.flower.server import Federation
    from bract.secagg.messages import ShareKeys
    from bract.secagg.recording import read_view

    secure_round = Federation._secure_round

    def leave_after_round_1(self, rnd, display):
        out = secure_round(self, rnd, display)
        if rnd == 1:
            self.active.remove(self.active[-1])
        return out

    monkeypatch.setattr(Federation, "_secure_round", leave_after_round_1)
    views = tmp_path / "views"
    policy = dataclasses.replace(NON_PRIVATE, rounds=3)
    report, _, _ = _run(tmp_path / "run", policy, secure=True, rounds=3, record_dir=views)
    assert [r["secagg"]["stages"] for r in report["rounds"]] == [5, 4, 3]
    recorded = read_view(views)
    assert [(v.round, v.aborted) for v in recorded] == [
        (1, False), (2, True), (2, False), (3, False)]
    abandoned = recorded[1]
    assert len([m for d, m in abandoned.messages if d == "in" and isinstance(m, ShareKeys)]) == 5
    assert sorted(p.name for p in views.iterdir()) == [
        "round-1", "round-2", "round-2-attempt-2", "round-3"]
    audit = audit_views(recorded)
    assert audit.gap is None and audit.rounds == 3 and audit.verdict == "pass"


def _forget_keys(hospital: int, fl_round: int):
    """``hospital`` loses its ctx.state (its secure-aggregation keys) at ``fl_round``."""
    from bract.flower.secagg_client import STATE_SESSION

    def mod(msg, ctx, call_next):
        if (int(ctx.node_config["partition-id"]) == hospital
                and int(msg.metadata.group_id) == fl_round):
            for name in [n for n in ctx.state.config_records if n.startswith(STATE_SESSION)]:
                del ctx.state.config_records[name]
        return call_next(msg, ctx)

    return mod


def test_a_hospital_that_lost_its_keys_is_asked_to_advertise_and_rejoins(tmp_path) -> None:
    # hospital-0 loses its state in round 2 (it cannot answer round 2's mask request),
    # answers round 3's config with "must advertise its keys first", is asked for a new
    # advertisement before round 4, and is back in the sum.
    policy = dataclasses.replace(NON_PRIVATE, rounds=4)
    report, _, _ = _run(tmp_path, policy, secure=True, rounds=4,
                        extra_mods=[_forget_keys(0, 2)])
    r1, r2, r3, r4 = report["rounds"]
    everyone = {f"hospital-{i}" for i in range(5)}
    assert all(r["secagg"]["aborted"] is None for r in (r1, r2, r3, r4))
    assert "hospital-0" not in r2["secagg"]["alive"]
    assert "hospital-0" not in r3["secagg"]["alive"]
    assert "KeyRotationRequired" in r3["failed"]["hospital-0"]
    assert r4["secagg"]["advertised"] == ["hospital-0"]
    assert set(r4["secagg"]["alive"]) == everyone


def _wrong_share(hospital: int, fl_round: int):
    """``hospital`` returns a share it did not receive (one bit flipped) in ``fl_round``."""

    def edit(rec):
        shares = list(rec["seed_shares"])
        shares[0] = bytes([shares[0][0] ^ 1]) + shares[0][1:]
        rec["seed_shares"] = shares

    return _edit_unmask_reply(hospital, fl_round, edit)


def test_a_hospital_that_returns_a_wrong_share_is_excluded_and_named(tmp_path) -> None:
    # hospital-2 corrupts a share in round 1's unmask reply: the server checks it against
    # its dealer's commitment, excludes hospital-2 from the unmasking, names it in the
    # round's record, and completes the round exactly from the other hospitals' shares.
    policy = dataclasses.replace(NON_PRIVATE, rounds=2)
    report, _, _ = _run(tmp_path, policy, secure=True, rounds=2,
                        extra_mods=[_wrong_share(2, 1)])
    r1, r2 = report["rounds"]
    everyone = {f"hospital-{i}" for i in range(5)}
    assert r1["secagg"]["aborted"] is None and r1["secagg"]["excluded"] == ["hospital-2"]
    assert set(r1["secagg"]["alive"]) == everyone  # its update is in the sum; its shares not
    assert r2["secagg"]["aborted"] is None and r2["secagg"]["excluded"] == []


def _replay_advertisement(thief: int, victim: int):
    """Hospital ``thief`` answers the key query with hospital ``victim``'s signed
    advertisement (seen on the way), hoping to take the victim's secagg id."""
    seen: dict[str, object] = {}

    def mod(msg, ctx, call_next):
        reply = call_next(msg, ctx)
        if msg.metadata.message_type != "query.secagg_advertise" or reply.has_error():
            return reply
        hospital = int(ctx.node_config["partition-id"])
        if hospital == victim:
            seen["adv"] = dict(reply.content.config_records[SECAGG])
        elif hospital == thief and "adv" in seen:
            rec = reply.content.config_records[SECAGG]
            for k, v in seen["adv"].items():
                rec[k] = v
        return reply

    return mod


def test_a_hospital_cannot_answer_with_another_hospitals_advertisement(tmp_path) -> None:
    # NODES are asked in order, so hospital-0's advertisement is seen before hospital-3
    # answers. Its signed origin is hospital-0's Flower node: the server refuses the
    # replay from hospital-3's node (in round 2 too, where it tries again), hospital-0
    # keeps its identity, and the rounds go on with the four honest hospitals.
    policy = dataclasses.replace(NON_PRIVATE, rounds=2)
    report, _, _ = _run(tmp_path, policy, secure=True, rounds=2,
                        extra_mods=[_replay_advertisement(thief=3, victim=0)])
    r1, r2 = report["rounds"]
    honest = [f"hospital-{i}" for i in (0, 1, 2, 4)]
    assert r1["secagg"]["advertised"] == honest and r1["secagg"]["clients"] == 4
    assert r1["secagg"]["aborted"] is None and r1["secagg"]["alive"] == honest
    assert r2["secagg"]["advertised"] == [] and r2["secagg"]["alive"] == honest
    # The refused hospital is out of both rounds before they began, and each row says
    # so, with why (it never proved a name: its node stands for it).
    for row in (r1, r2):
        (who, why), = row["failed"].items()
        assert who not in honest and why.startswith("key advertisement refused: ")


def test_a_metric_count_the_hospitals_do_not_send_is_refused_up_front() -> None:
    """The server's masked vector must be exactly as long as each hospital's: a metric
    count other than 0 or the hospitals' is refused, naming what it must be, before any
    round (rather than every hospital dropping with an encoding error)."""
    with pytest.raises(ValueError, match=r"aggregate_metrics must be 0 .* or 5"):
        SecAggSettings("fed", {}, aggregate_metrics=1)
    assert SecAggSettings("fed", {}, aggregate_metrics=len(AGGREGATED_METRICS))


def test_the_flattened_update_is_the_exact_float64_difference() -> None:
    """`flatten_delta` gives local - global for every array, in the global model's key
    order, computed in float64 from float32 or float64 weights (exactly the
    difference of the widened values), and refuses mismatched names or shapes."""
    from hypothesis import given, settings
    from hypothesis import strategies as st
    from hypothesis.extra import numpy as hnp

    from bract.flower.secagg_client import flatten_delta

    finite = st.floats(-1e6, 1e6, width=32)

    @settings(max_examples=40, deadline=None)
    @given(st.lists(st.tuples(hnp.array_shapes(min_dims=0, max_dims=3, max_side=5),
                              st.sampled_from([np.float32, np.float64])),
                    min_size=1, max_size=4), st.data())
    def check(specs, data) -> None:
        g, loc = {}, {}
        for i, (shape, dtype) in enumerate(specs):
            g[f"w{i}"] = data.draw(hnp.arrays(dtype, shape, elements=finite))
            loc[f"w{i}"] = data.draw(hnp.arrays(dtype, shape, elements=finite))
        want = np.concatenate([(loc[k].astype(np.float64) - g[k].astype(np.float64)).ravel()
                               for k in g])
        got = flatten_delta(dict(reversed(list(loc.items()))), g)
        assert got.dtype == np.float64 and np.array_equal(got, want)

    check()
    with pytest.raises(ValueError, match="different names"):
        flatten_delta({"a": np.zeros(2)}, {"b": np.zeros(2)})
    with pytest.raises(ValueError, match="different shapes"):
        flatten_delta({"a": np.zeros(2)}, {"a": np.zeros(3)})


def test_one_context_keeps_each_federations_session_apart() -> None:
    """Flower hands every run of one run series (which the coordinator names) the same
    ``ctx.state``: a hospital's secure-aggregation session of one federation is never
    restored as its session of another, and each federation's session survives the
    other's being saved beside it."""
    from flwr.app import Context, RecordDict

    from bract.flower.secagg_client import _save, _session

    _, fed_a = make_identities(3, "federation-a")
    _, fed_b = make_identities(3, "federation-b")
    ctx = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    session_a = _session(fed_a[0], ctx)
    _save(ctx, session_a)
    session_b = _session(fed_b[0], ctx)
    assert session_b.federation_id == "federation-b"
    _save(ctx, session_b)
    assert _session(fed_a[0], ctx).export_state() == session_a.export_state()
    assert _session(fed_b[0], ctx).export_state() == session_b.export_state()


def test_one_context_keeps_the_most_recently_used_sessions_only() -> None:
    """However many federations a Context sees, it holds at most ``MAX_SESSIONS``
    secure-aggregation sessions (secrets inside): the most recently saved ones."""
    from flwr.app import Context, RecordDict

    from bract.flower.secagg_client import MAX_SESSIONS, STATE_SESSION, _save, _session

    ctx = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    first = make_identities(3, "federation-0")[1][0]
    _save(ctx, _session(first, ctx))
    for k in range(1, 3 * MAX_SESSIONS):
        _save(ctx, _session(make_identities(3, f"federation-{k}")[1][0], ctx))
        if k % 2 == 0:  # federation-0 keeps being used: it stays
            _save(ctx, _session(first, ctx))
    kept = [n for n in ctx.state.config_records if n.startswith(STATE_SESSION)]
    assert len(kept) == MAX_SESSIONS
    from bract.flower.secagg_client import _session_key

    assert _session_key(first.node, "federation-0") in kept
    assert _session_key(first.node, f"federation-{3 * MAX_SESSIONS - 1}") in kept


def test_a_round_that_never_opened_is_recorded_and_audited_as_not_applicable(
        tmp_path) -> None:
    """Three of five hospitals are unreachable when round 1 asks for key advertisements:
    round 1 has two keyed hospitals and never opens (no configuration sent, nothing
    received); they join in round 2. The server records a marker for round 1 with its
    reason, and ``bract audit secagg`` on the honest recording passes, round 1's checks
    n/a. Without the marker (round 1 simply missing) the audit fails; a marked view that
    holds messages is audited as any other round, never waved through."""
    import shutil

    from bract.audit.secagg_audit import CHECKS, NOT_APPLICABLE, audit_views
    from bract.secagg.recording import ServerView, read_view, write_view

    def late_starters(msg, ctx, call_next):
        if (msg.metadata.message_type.startswith("query") and int(msg.metadata.group_id) == 1
                and int(ctx.node_config["partition-id"]) in (2, 3, 4)):
            raise ConnectionError("hospital not up yet")
        return call_next(msg, ctx)

    views = tmp_path / "views"
    policy = dataclasses.replace(NON_PRIVATE, rounds=3)
    report, _, _ = _run(tmp_path / "run", policy, secure=True, rounds=3, record_dir=views,
                        extra_mods=[late_starters])
    assert "need at least 3" in report["rounds"][0]["secagg"]["aborted"]
    recorded = read_view(views)
    assert [(v.round, bool(v.never_opened)) for v in recorded] == [
        (1, True), (2, False), (3, False)]
    audit = audit_views(recorded)
    assert audit.passed, [c.detail for c in audit.checks if not c.passed]
    first = [c for c in audit.checks if c.round == 1]
    assert [c.name for c in first] == list(CHECKS)
    assert all(c.status == NOT_APPLICABLE and "never opened" in c.detail
               and "need at least 3" in c.detail for c in first)
    # Round 1 simply missing: the audit fails.
    shutil.rmtree(views / "round-1")
    gap = audit_views(read_view(views))
    assert not gap.passed and "round 1 missing from the view" in (gap.gap or "")
    # A marker that holds messages is no marker: round 2's messages marked "never opened"
    # are audited as round 2's view.
    two = recorded[1]
    marked = ServerView(1, two.messages, two.weighted_sum, two.total_weight,
                        never_opened="forged")
    write_view(marked, views / "round-1")
    forged = audit_views(read_view(views))
    assert not any(c.status == NOT_APPLICABLE and "never opened" in c.detail
                   for c in forged.checks)


@pytest.mark.parametrize("plan", [{(1, "unmask"): {0}}, {(1, "consistency"): {0}},
                                  {(2, "config"): {0, 1, 2}}])
def test_honest_dropouts_and_rounds_that_train_nobody_pass_bract_audit_verify(
        tmp_path, monkeypatch, plan) -> None:
    """An honest private secure run where a hospital drops at the check or unmask stage
    after its masked input (in the sum: the round lists it both as averaged and as
    failed, and its record names it in ``failed_after_input``), or where round 2 averages
    nobody (three hospitals fail its configuration, both the one sent early and the one
    it opens again with: their round-2 lines are carried from round 1, marked
    ``of_round``; the two that trained spent budget for nothing), passes ``bract audit
    verify``."""
    import tests.flower.test_secure_federation as me
    from bract.cli import main
    from bract.records.roster import Roster, write_roster

    made = {}
    original = me.make_identities

    def identities(n, fid):
        roster, ids = original(n, fid)
        made["roster"] = Roster(fid, roster, {i: f"hospital-{i - 1}" for i in roster})
        return roster, ids

    monkeypatch.setattr(me, "make_identities", identities)
    policy = PrivacyPolicy(target_epsilon=8.0, delta=1e-5, rounds=3)
    report, _, _ = _run(tmp_path / "run", policy, secure=True, rounds=3, drop_plan=plan)
    r1, r2 = report["rounds"][:2]
    if (2, "config") in plan:
        assert r2["secagg"]["aborted"] and r2["trained"] == []
        assert {name: line["of_round"] for name, line in r2["per_client"].items()} == {
            "hospital-0": 1, "hospital-1": 1, "hospital-2": 1, "hospital-3": 2,
            "hospital-4": 2}
    else:
        assert "hospital-0" in r1["trained"] and "hospital-0" in r1["failed"]
        assert r1["secagg"]["failed_after_input"] == ["hospital-0"]
    write_roster(tmp_path / "roster.json", made["roster"])
    run = tmp_path / "run"
    code = main(["audit", "verify", str(run / "ledger.jsonl"), "--roster",
                 str(tmp_path / "roster.json"), "--report", str(run / "report.json"),
                 "--pld-discretization", "1e-3", "--out", str(tmp_path / "audit")])
    md = " ".join((tmp_path / "audit" / "audit.md").read_text().split())
    assert code == 0, md
    if (2, "config") not in plan:
        assert "hospital-0 failed in round 1 after its masked input reached the server" in md


def _masked_input_mod(hospital: int, rewrite):
    """Hospital ``hospital`` (partition id) sends ``rewrite(masked input, ring)``'s
    result instead of its masked input (a malicious hospital's own vector)."""
    from bract.flower.records import secagg_from_record, secagg_to_record
    from bract.secagg.encoding import RING_DTYPES
    from bract.secagg.messages import MaskedInput

    def mod(msg, ctx, call_next):
        reply = call_next(msg, ctx)
        if (int(ctx.node_config["partition-id"]) != hospital or reply.has_error()
                or SECAGG not in reply.content.config_records):
            return reply
        m = secagg_from_record(reply.content.config_records[SECAGG])
        if isinstance(m, MaskedInput):
            y = np.frombuffer(m.data, dtype=RING_DTYPES[m.ring_bits]).copy()
            if rewrite(m, y):
                reply.content.config_records[SECAGG] = secagg_to_record(
                    dataclasses.replace(m, data=y.tobytes()))
        return reply

    return mod


def test_a_hospital_cannot_frame_another_at_the_unmask_stage(tmp_path) -> None:
    """Regression (review F4): hospital-0 answers its unmask request with an unmask
    reply in hospital-1's secure-aggregation name holding a wrong share. The server
    refuses it because it names another hospital than its sender (hospital-0's failure,
    saying so) before the protocol sees it: nobody is excluded, hospital-1's own reply
    is taken, and with one colluder declared (t = 4 of 5) the round still completes."""
    import os

    from bract.flower.records import secagg_from_record, secagg_to_record
    from bract.secagg.messages import UnmaskReply, UnmaskRequest

    def mod(msg, ctx, call_next):
        reply = call_next(msg, ctx)
        req = msg.content.config_records.get(SECAGG)
        if (int(ctx.node_config["partition-id"]) != 0 or req is None or reply.has_error()
                or secagg_from_record(req).KIND != UnmaskRequest.KIND):
            return reply
        req = secagg_from_record(req)
        owner = next(v for v in req.alive if v != 2)
        forged = UnmaskReply(req.federation_id, req.round, 2, [owner],
                             [os.urandom(1) + bytes(65)], [os.urandom(32)], [], [], [])
        reply.content.config_records[SECAGG] = secagg_to_record(forged)
        return reply

    report, _, _ = _run(tmp_path, NON_PRIVATE, secure=True, rounds=1, colluders=1,
                        extra_mods=[mod])
    (row,) = report["rounds"]
    assert row["secagg"]["aborted"] is None and row["secagg"]["excluded"] == []
    assert row["trained"] == [f"hospital-{i}" for i in range(5)]  # its input was summed
    assert list(row["failed"]) == ["hospital-0"]
    assert "names secure-aggregation id 2, but the node holds id 1" in row["failed"]["hospital-0"]


def test_a_total_weight_of_zero_aborts_the_round_cleanly_and_the_run_goes_on(
        tmp_path, monkeypatch) -> None:
    """Regression (review F5): in round 1 one hospital, knowing the others' weights,
    offsets its weight coordinate so that the unmasked total weight is 0. The round
    aborts (no average; the global model unchanged) instead of the federation crashing,
    and round 2 completes."""
    from bract.secagg import protocol

    weights: dict[tuple[int, int], int] = {}
    honest = protocol.ClientSession.handle_mask_request

    def spy(self, req, vector, weight, **kw):  # the attacker's knowledge of the weights
        weights[(req.round, self.node_id)] = int(weight)
        return honest(self, req, vector, weight, **kw)

    monkeypatch.setattr(protocol.ClientSession, "handle_mask_request", spy)

    def zero_total(m, y):
        if m.round >> 20 != 1:
            return False
        y[-1] -= np.array(sum(w for (r, _), w in weights.items() if r == m.round),
                          dtype=y.dtype)
        return True

    report, _, final = _run(tmp_path, NON_PRIVATE, secure=True, rounds=2,
                            extra_mods=[_masked_input_mod(4, zero_total)])
    r1, r2 = report["rounds"]
    assert "total weight is 0, not positive" in r1["secagg"]["aborted"]
    assert r1["trained"] == [] and r1["aggregated"] is False
    assert r2["secagg"]["aborted"] is None and len(r2["trained"]) == 5
    assert final is not None


def test_consecutive_rounds_aborted_after_training_stop_the_federation(tmp_path) -> None:
    """Regression (review F8): one hospital flips the top bit of its masked weight every
    round, so every round aborts after its hospitals trained (each spent budget for no
    model). After abort_limit (2 by default) such rounds in a row the federation stops,
    report.json's stopped_early says why in one line, and the report counts as failed
    (what makes the CLI exit non-zero)."""
    from bract.records.report import RunReport

    def flip(m, y):
        y[-1] += np.array(1 << (m.ring_bits - 1), dtype=y.dtype)
        return True

    policy = PrivacyPolicy(target_epsilon=3.0, delta=1e-5, rounds=4)
    report, _, final = _run(tmp_path, policy, secure=True, rounds=4,
                            extra_mods=[_masked_input_mod(4, flip)])
    assert [r["round"] for r in report["rounds"]] == [1, 2]  # rounds 3 and 4 never ran
    assert all("does not decode" in r["secagg"]["aborted"] for r in report["rounds"])
    why = report["stopped_early"]
    assert why.startswith("after round 2: 2 consecutive secure rounds aborted after their "
                          "hospitals had trained") and "abort_limit 2" in why
    assert "\n" not in why and final is None
    assert report["final"]["model_trained"] is False
    assert RunReport.from_plain(report).errors()


def _flip_from_round_2(m, y):
    """A malicious hospital's masked weight from round 2 on (any resume): the sum of
    every such round fails to decode, after all hospitals trained."""
    if (m.round >> 20) & (2**20 - 1) < 2:
        return False
    y[-1] += np.array(1 << (m.ring_bits - 1), dtype=y.dtype)
    return True


def test_a_resumed_run_stops_at_the_round_an_uninterrupted_one_stops_at(tmp_path) -> None:
    """Round 1 averages; from round 2 on one hospital makes every round abort after
    training. With abort_limit 3 an uninterrupted run stops after round 4. A run whose
    server crashes when it opens round 4 (after two consecutive aborted rounds) and is
    resumed (fresh hospital processes, same state directories) stops after round 4
    too: the count of consecutive aborts is in the checkpoint, so the resumed run
    spends no more rounds' budget than the limit allows."""
    policy = PrivacyPolicy(target_epsilon=3.0, delta=1e-5, rounds=6)
    mods = [_masked_input_mod(4, _flip_from_round_2)]

    def run(out, **kw):
        def setup(ctx):
            return hospital_setup(TASK, ctx, out / "hospitals")

        return _run(out, policy, secure=True, rounds=6, abort_limit=3, extra_mods=mods,
                    setup=setup, **kw)[0]

    whole = run(tmp_path / "whole")
    assert [r["round"] for r in whole["rounds"]] == [1, 2, 3, 4]
    assert [r["aggregated"] for r in whole["rounds"]] == [True, False, False, False]
    assert whole["stopped_early"].startswith("after round 4: 3 consecutive secure rounds")

    out = tmp_path / "interrupted"
    with pytest.raises(RuntimeError, match="injected server crash"):
        run(out, crash_at_round=4)
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert (state["completed_rounds"], state["spent_aborts"]) == (3, 2)
    resumed = run(out, resume=True)
    assert [r["round"] for r in resumed["rounds"]] == [1, 2, 3, 4]
    assert [r["aggregated"] for r in resumed["rounds"]] == [True, False, False, False]
    assert resumed["rounds"][-1]["trained"] == [] and resumed["rounds"][-1]["resumed"]
    assert resumed["stopped_early"].startswith("after round 4: 3 consecutive secure rounds")


def test_the_abort_limit_is_an_int_of_at_least_one_or_none() -> None:
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="abort_limit"):
            SecAggSettings("f", {}, abort_limit=bad)
    assert SecAggSettings("f", {}).abort_limit == 2
    assert SecAggSettings("f", {}, abort_limit=None).to_plain()["abort_limit"] is None
