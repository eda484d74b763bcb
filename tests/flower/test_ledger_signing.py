"""Hospitals sign their ledger entries; the server verifies them on receipt.

A federation driven through the in-process Grid: each hospital signs with its
Ed25519 identity, keeps its own copy next to its privacy state, and the server's
merged ledger.jsonl equals the hospitals' copies line by line. A reply whose
ledger does not verify (wrong key, rewritten history) is treated as failed and
changes nothing; a hospital whose own ledger file was edited refuses to go on."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
from flwr.app import Context, RecordDict

from bract import tasks
from bract.flower.app import dataset_source, hospital_setup
from bract.flower.client import (
    LEDGER_FILE,
    PrivacyPolicy,
    _load_state,
    make_client_app,
    privacy_dir,
)
from bract.flower.secagg_client import SecAggIdentity, make_identities
from bract.flower.secagg_server import SecAggSettings
from bract.flower.server import ServerConfig, run_federation
from bract.privacy import epsilon_of, load_weights, weights_of
from bract.records.ledger import LedgerError, SignerRoster, by_client, check_chain, read_ledger
from bract.records.roster import Roster
from bract.secagg.crypto import SigningKey

from .conftest import FakeGrid

TASK = tasks.TaskConfig(dataset="breast-cancer", clients=2, batch_size=32, lr=0.2)
POLICY = PrivacyPolicy(target_epsilon=4.0, delta=1e-5, rounds=3)
NODES = (7, 8)
FED = "fed-test"


def _identities(forge: int | None = None):
    keys, idents = make_identities(len(NODES), FED)
    roster = Roster(FED, keys, {i + 1: f"hospital-{i}" for i in range(len(NODES))})
    if forge is not None:  # this hospital signs with a key the roster does not list
        idents[forge] = SecAggIdentity(forge + 1, SigningKey.generate().to_bytes(), keys, FED)
    return SignerRoster.from_json(roster.to_json()), idents


def _apps(state_root, idents, policy=POLICY, mods=()):
    def setup(ctx):
        return hospital_setup(TASK, ctx, state_root)

    def identity(ctx):
        return idents[int(ctx.node_config["partition-id"])]

    return {node: make_client_app(setup, policy, identity=identity, mods=mods)
            for node in NODES}


def _run(tmp_path, grid, roster, resume=False, policy=POLICY):
    ds = tasks.dataset_for(TASK)
    model = tasks.build_model(TASK)

    def evaluate(w):
        load_weights(model, w)
        return tasks.evaluate(model, ds.x_test, ds.y_test)

    cfg = ServerConfig(
        rounds=policy.rounds, num_clients=len(NODES), delta=policy.delta,
        out_dir=tmp_path / "out", node_wait_seconds=1, show_progress=False, resume=resume,
        run_config={"test": "signing"}, roster=roster,
    )
    return run_federation(grid, weights_of(tasks.build_model(TASK)), evaluate, cfg)


def test_signed_ledgers_verify_and_match_the_hospitals_copies(tmp_path) -> None:
    roster, idents = _identities()
    hosp = tmp_path / "hosp"
    with pytest.raises(RuntimeError, match="injected server crash"):
        _run(tmp_path, FakeGrid(_apps(hosp, idents), crash_at_round=2), roster)
    # Resumed by fresh processes: each hospital continues its chain from its own files.
    report = _run(tmp_path, FakeGrid(_apps(hosp, idents)), roster, resume=True)
    server_lines = (tmp_path / "out" / "ledger.jsonl").read_text().splitlines()
    chains = by_client(read_ledger(tmp_path / "out" / "ledger.jsonl"))
    assert sorted(chains) == ["hospital-0", "hospital-1"]
    for cid, chain in chains.items():
        result = check_chain(chain, roster.keys[cid], client_id=cid,
                             expected_length=POLICY.rounds)
        assert result.ok, result.problem
        assert [e.round for e in chain] == [1, 2, 3]
        assert chain[-1].epsilon == report["rounds"][-1]["per_client"][cid]["epsilon"]
        own = (privacy_dir(hosp / cid, dataset_source(TASK)) / LEDGER_FILE).read_text().splitlines()
        assert own == [line for line in server_lines if f'"client_id":"{cid}"' in line]
        last = report["rounds"][-1]["per_client"][cid]
        assert last["ledger_entries"] == 3 and last["ledger_head"] == chain[-1].hash()
        home = privacy_dir(hosp / cid, dataset_source(TASK))
        state = json.loads((home / "privacy-state.json").read_text())
        assert state["chain-head"] == chain[-1].hash() and state["chain-length"] == 3


def test_a_hospital_that_joins_a_second_federation_starts_from_its_spent_budget(
        tmp_path) -> None:
    """Federation A, then federation B (another coordinator: its own federation id and
    roster, the same hospitals' keys) on the same data: each hospital's chain in B
    continues its lifetime chain from A, its epsilon starts from what A spent, its
    noise is calibrated so the lifetime epsilon lands on B's target, and B's record
    (the carried entries included) passes the privacy officer's audit."""
    from bract.audit.verify import verify_federation

    keys, idents = make_identities(len(NODES), "fed-A")
    names = {i + 1: f"hospital-{i}" for i in range(len(NODES))}
    hosp = tmp_path / "hosp"
    report_a = _run(tmp_path / "a", FakeGrid(_apps(hosp, idents)),
                    SignerRoster.from_json(Roster("fed-A", keys, names).to_json()))
    policy_b = dataclasses.replace(POLICY, target_epsilon=8.0)
    roster_b = Roster("fed-B", keys, names)
    idents_b = [dataclasses.replace(i, federation_id="fed-B") for i in idents]
    report_b = _run(tmp_path / "b", FakeGrid(_apps(hosp, idents_b, policy_b)),
                    SignerRoster.from_json(roster_b.to_json()), policy=policy_b)
    chains = by_client(read_ledger(tmp_path / "b" / "out" / "ledger.jsonl"))
    for cid in ("hospital-0", "hospital-1"):
        spent_in_a = report_a["rounds"][-1]["per_client"][cid]["epsilon"]
        assert 0.97 * 4.0 <= spent_in_a <= 4.0
        first_b = report_b["rounds"][0]["per_client"][cid]
        assert (first_b["ledger_carried"], first_b["ledger_entries"]) == (3, 4)
        assert first_b["epsilon"] > spent_in_a
        lifetime = report_b["rounds"][-1]["per_client"][cid]["epsilon"]
        assert 0.97 * 8.0 <= lifetime <= 8.0
        chain = chains[cid]
        assert [e.federation_id for e in chain] == ["fed-A"] * 3 + ["fed-B"] * 3
        assert [e.round for e in chain] == [1, 2, 3, 1, 2, 3]
        assert check_chain(chain, keys[names_to_id(names, cid)], client_id=cid,
                           expected_length=6).ok
    (tmp_path / "roster-b.json").write_text(roster_b.to_json())
    audit = verify_federation(tmp_path / "b" / "out" / "ledger.jsonl", tmp_path / "roster-b.json",
                              report_path=tmp_path / "b" / "out" / "report.json", budget=8.0,
                              pld_discretization=1e-3)
    assert audit.failures == [], audit.failures


def names_to_id(names: dict[int, str], cid: str) -> int:
    return next(i for i, n in names.items() if n == cid)


def test_a_reply_whose_ledger_does_not_verify_is_treated_as_failed(tmp_path) -> None:
    """Hospital-0 signs with a key the roster does not list: it cannot prove which
    member it is (its own identity answer says why), so it is recorded failed under
    its node id and never asked to train, and nothing of its ledger is read (a ledger
    signed by the wrong key under a proven name: the secure test below)."""
    roster, idents = _identities(forge=0)
    report = _run(tmp_path, FakeGrid(_apps(tmp_path / "hosp", idents)), roster)
    for row in report["rounds"]:
        assert row["trained"] == ["hospital-1"]
        assert row["failed"][f"node-{NODES[0]}"] == (
            "failed: ConfigurationError: roster key of node 1 is not this client's key")
        assert "hospital-0" not in row["per_client"]
    chains = by_client(read_ledger(tmp_path / "out" / "ledger.jsonl"))
    assert list(chains) == ["hospital-1"] and len(chains["hospital-1"]) == 3


def _hostile_last_entry(path: str, value: float):
    """A ClientApp mod: hospital-0's training reply carries its signed ledger with the
    field at ``path`` of its newest entry set to ``value`` (NaN, Infinity: JSON as
    Python writes it)."""
    from bract.flower.records import PRIVACY_REPORT

    def mod(msg, ctx, call_next):
        reply = call_next(msg, ctx)
        if (int(ctx.node_config["partition-id"]) == 0 and not reply.has_error()
                and msg.metadata.message_type == "train"):
            rec = reply.content.config_records[PRIVACY_REPORT]
            lines = str(rec["signed-ledger"]).splitlines()
            entry = json.loads(lines[-1])
            where = entry
            *parents, last = path.split(".")
            for key in parents:
                where = where[key]
            where[last] = value
            lines[-1] = json.dumps(entry)
            rec["signed-ledger"] = "".join(line + "\n" for line in lines)
        return reply

    return mod


@pytest.mark.parametrize(("path", "value"), [("delta", math.nan), ("delta", math.inf),
                                             ("event.max_grad_norm", math.inf)])
def test_a_reply_whose_ledger_holds_a_non_finite_number_is_a_failed_hospital(
        tmp_path, path, value) -> None:
    """A hostile hospital's reply whose signed ledger carries ``"delta": NaN`` (or an
    infinity): the server names that hospital failed with the field, every round goes
    on with the others, and nothing of the reply reaches the server's ledger."""
    roster, idents = _identities()
    apps = _apps(tmp_path / "hosp", idents, mods=[_hostile_last_entry(path, value)])
    report = _run(tmp_path, FakeGrid(apps), roster)
    assert [row["round"] for row in report["rounds"]] == [1, 2, 3]
    field = path.split(".")[-1]
    for row in report["rounds"]:
        assert row["trained"] == ["hospital-1"]
        (reason,) = row["failed"].values()
        assert "signed ledger" in reason and f"{field}" in reason
    chains = by_client(read_ledger(tmp_path / "out" / "ledger.jsonl"))
    assert list(chains) == ["hospital-1"] and len(chains["hospital-1"]) == 3


def test_a_chain_check_that_raises_a_plain_error_fails_only_that_reply(
        tmp_path, monkeypatch) -> None:
    """Whatever a reply's ledger makes the chain check raise (a ValueError or TypeError
    rather than a LedgerError) fails that hospital's reply, named with the reason;
    the federation goes on."""
    import bract.flower.server as server

    real = server.verify_chain

    def fragile(chain, key, *, client_id, **kw):
        if client_id == "hospital-0":
            raise ValueError("Out of range float values are not JSON compliant")
        return real(chain, key, client_id=client_id, **kw)

    monkeypatch.setattr(server, "verify_chain", fragile)
    roster, idents = _identities()
    report = _run(tmp_path, FakeGrid(_apps(tmp_path / "hosp", idents)), roster)
    assert [row["round"] for row in report["rounds"]] == [1, 2, 3]
    for row in report["rounds"]:
        assert row["trained"] == ["hospital-1"]
        assert row["failed"]["hospital-0"] == ("invalid ledger: Out of range float values "
                                               "are not JSON compliant")


def test_a_hospital_that_rewrites_its_history_is_refused(tmp_path) -> None:
    """A hospital whose state was wiped after round 1 starts a new chain: the server
    holds its round-1 entry, so the new chain does not extend it and is refused."""
    roster, idents = _identities()
    grid = FakeGrid(_apps(None, idents))
    wiped = {"done": False}
    original = grid.send_and_receive

    def send_and_receive(messages, *, timeout=None):
        messages = list(messages)
        if messages and messages[0].metadata.group_id == "2" and not wiped["done"]:
            wiped["done"] = True
            grid.contexts[NODES[0]].state.config_records.clear()
        return original(messages, timeout=timeout)

    grid.send_and_receive = send_and_receive
    report = _run(tmp_path, grid, roster)
    assert report["rounds"][0]["trained"] == ["hospital-0", "hospital-1"]
    for row in report["rounds"][1:]:
        assert "rewrites entries" in row["failed"]["hospital-0"]
    chains = by_client(read_ledger(tmp_path / "out" / "ledger.jsonl"))
    assert [e.round for e in chains["hospital-0"]] == [1]  # the server's copy is intact
    assert [e.round for e in chains["hospital-1"]] == [1, 2, 3]


@pytest.mark.parametrize("tamper", ["truncate", "edit"])
def test_a_hospital_whose_own_ledger_file_was_tampered_with_refuses(tmp_path, tamper) -> None:
    roster, idents = _identities()
    hosp = tmp_path / "hosp"
    with pytest.raises(RuntimeError, match="injected server crash"):
        _run(tmp_path, FakeGrid(_apps(hosp, idents), crash_at_round=3), roster)
    path = privacy_dir(hosp / "hospital-0", dataset_source(TASK)) / LEDGER_FILE
    lines = path.read_text().splitlines()
    if tamper == "truncate":
        lines = lines[:1]
    else:
        lines[0] = lines[0].replace('"steps":', '"steps":1')
    path.write_text("".join(line + "\n" for line in lines))
    grid = FakeGrid(_apps(hosp, idents))
    report = _run(tmp_path, grid, roster, resume=True)
    row = report["rounds"][2]
    assert row["trained"] == ["hospital-1"]
    # named by the member its signed key advertisement proves it is
    assert "does not match the chain head" in row["failed"]["hospital-0"]



def test_a_hospital_whose_privacy_state_file_is_missing_refuses(tmp_path) -> None:
    """A dataset directory whose ledger.jsonl holds entries but whose privacy-state.json
    (the head that commits them) is gone fails closed: the hospital refuses, saying to
    restore both from a backup, instead of starting the budget from nothing and
    overwriting its ledger; the reason that leaves it names no path."""
    from bract.flower.client import STATE_FILE

    roster, idents = _identities()
    hosp = tmp_path / "hosp"
    with pytest.raises(RuntimeError, match="injected server crash"):
        _run(tmp_path, FakeGrid(_apps(hosp, idents), crash_at_round=3), roster)
    home = privacy_dir(hosp / "hospital-0", dataset_source(TASK))
    kept = (home / LEDGER_FILE).read_text()
    (home / STATE_FILE).unlink()
    report = _run(tmp_path, FakeGrid(_apps(hosp, idents)), roster, resume=True)
    row = report["rounds"][2]
    assert row["trained"] == ["hospital-1"]
    assert row["failed"]["hospital-0"].endswith(
        f"this hospital's privacy state is incomplete ({STATE_FILE} is missing); its "
        "operator must restore it from a backup (details in its own log)")
    assert (home / LEDGER_FILE).read_text() == kept and not (home / STATE_FILE).exists()
    setup = hospital_setup(TASK, Context(run_id=1, node_id=7, state=RecordDict(),
                                         run_config={}, node_config={"partition-id": 0}),
                           hosp)
    with pytest.raises(LedgerError, match=f"{home} holds {LEDGER_FILE} but no {STATE_FILE}.*"
                                          "restore both files from a backup"):
        _load_state(Context(run_id=1, node_id=7, state=RecordDict(), run_config={},
                            node_config={}), setup)


def test_a_ledger_at_the_top_of_the_state_directory_is_refused_until_it_is_moved(
        tmp_path) -> None:
    """A state directory with privacy-state.json and ledger.jsonl at its top (the layout
    that kept one ledger per state directory) is refused, naming the dataset's
    directory to move them into, rather than read as no spending; once moved, the
    hospital continues that ledger."""
    from bract.flower.client import STATE_FILE

    roster, idents = _identities()
    hosp = tmp_path / "hosp"
    with pytest.raises(RuntimeError, match="injected server crash"):
        _run(tmp_path, FakeGrid(_apps(hosp, idents), crash_at_round=2), roster)
    top = hosp / "hospital-0"
    home = privacy_dir(top, dataset_source(TASK))
    for name in (STATE_FILE, LEDGER_FILE):
        (home / name).rename(top / name)  # as the old layout kept them
    grid = FakeGrid(_apps(hosp, idents), crash_at_round=3)
    with pytest.raises(RuntimeError, match="injected server crash"):
        _run(tmp_path, grid, roster, resume=True)
    row = json.loads((tmp_path / "out" / "report.json").read_text())["rounds"][1]
    assert row["trained"] == ["hospital-1"]
    assert "holds a privacy ledger in a layout it does not read" in \
        row["failed"]["hospital-0"]
    assert str(tmp_path) not in row["failed"]["hospital-0"]
    setup = hospital_setup(TASK, Context(run_id=1, node_id=7, state=RecordDict(),
                                         run_config={}, node_config={"partition-id": 0}),
                           hosp)
    ctx = Context(run_id=1, node_id=7, state=RecordDict(), run_config={}, node_config={})
    with pytest.raises(LedgerError, match=f"move {STATE_FILE} and {LEDGER_FILE} into "
                                          f"{home} "):
        _load_state(ctx, setup)
    for name in (STATE_FILE, LEDGER_FILE):
        (top / name).rename(home / name)
    report = _run(tmp_path, FakeGrid(_apps(hosp, idents)), roster, resume=True)
    assert report["rounds"][2]["trained"] == ["hospital-0", "hospital-1"]
    assert [e.round for e in read_ledger(home / LEDGER_FILE)] == [1, 3]


def test_secure_rounds_leave_out_a_hospital_whose_ledger_does_not_verify(tmp_path) -> None:
    """Under secure aggregation too: the reply is refused before any masking stage,
    and the other hospitals' round completes without it."""
    task = tasks.TaskConfig(dataset="breast-cancer", clients=3, batch_size=32, lr=0.2)
    keys, secagg_ids = make_identities(3, FED)
    roster = Roster(FED, keys, {i + 1: f"hospital-{i}" for i in range(3)})
    # Hospital 0 takes part in secure aggregation with its genuine identity but signs
    # its ledger with a key the roster does not list.
    signers = [SecAggIdentity(1, SigningKey.generate().to_bytes(), keys, FED), *secagg_ids[1:]]

    def setup(ctx):
        return hospital_setup(task, ctx)

    def pick(ids):
        return lambda ctx: ids[int(ctx.node_config["partition-id"])]

    apps = {node: make_client_app(setup, POLICY, secagg=pick(secagg_ids), identity=pick(signers))
            for node in (11, 12, 13)}
    ds = tasks.dataset_for(task)
    model = tasks.build_model(task)

    def evaluate(w):
        load_weights(model, w)
        return tasks.evaluate(model, ds.x_test, ds.y_test)

    cfg = ServerConfig(
        rounds=1, num_clients=3, delta=POLICY.delta, out_dir=tmp_path, node_wait_seconds=1,
        show_progress=False, secagg=SecAggSettings(FED, keys, clip=8.0),
        roster=SignerRoster.from_json(roster.to_json()),
    )
    report = run_federation(FakeGrid(apps), weights_of(tasks.build_model(task)), evaluate, cfg)
    (row,) = report["rounds"]
    assert row["trained"] == ["hospital-1", "hospital-2"]
    assert "invalid ledger" in row["failed"]["hospital-0"]
    assert sorted(by_client(read_ledger(tmp_path / "ledger.jsonl"))) == ["hospital-1", "hospital-2"]


def test_two_federations_training_the_same_data_at_once_lose_no_spent_round(
        tmp_path, monkeypatch) -> None:
    """Two federations (two servers, one hospital's two ClientApps) train the same data
    at the same time: each round reads and commits the dataset's state under its lock,
    so the lifetime chain holds every round of both, in one verified order."""
    import threading
    import time

    from bract.privacy.training import PrivateTrainer

    slow = PrivateTrainer.train_round

    def train_round(self, *args, **kwargs):  # widen the window two writers could race in
        out = slow(self, *args, **kwargs)
        time.sleep(0.3)
        return out

    monkeypatch.setattr(PrivateTrainer, "train_round", train_round)
    keys, idents = make_identities(len(NODES), "fed-A")
    names = {i + 1: f"hospital-{i}" for i in range(len(NODES))}
    hosp = tmp_path / "hosp"
    reports: dict[str, dict] = {}
    errors: list[BaseException] = []

    def federation(fed: str) -> None:
        try:
            ids = [dataclasses.replace(i, federation_id=fed) for i in idents]
            roster = SignerRoster.from_json(Roster(fed, keys, names).to_json())
            reports[fed] = _run(tmp_path / fed, FakeGrid(_apps(hosp, ids)), roster)
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=federation, args=(f,)) for f in ("fed-A", "fed-B")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i, cid in enumerate(("hospital-0", "hospital-1")):
        own = read_ledger(privacy_dir(hosp / cid, dataset_source(TASK)) / LEDGER_FILE)
        # Every round either server saw this hospital train is on its one chain (the
        # shared budget of 4 runs out before all six rounds: refusals, not losses).
        trained = {fed: sum(cid in r["trained"] for r in reports[fed]["rounds"])
                   for fed in ("fed-A", "fed-B")}
        assert trained["fed-A"] >= 1 and trained["fed-B"] >= 1
        assert check_chain(own, keys[i + 1], client_id=cid,
                           expected_length=sum(trained.values())).ok
        assert [e.federation_id for e in own].count("fed-A") == trained["fed-A"]
        assert epsilon_of([e.event for e in own], POLICY.delta) <= POLICY.target_epsilon


def _claim_to_be(name: str):
    """A mod: hospital-0's train replies name it ``name`` with an empty chain, saying in
    round 1 that its budget is spent and in round 2 that it trained (review F3)."""
    from bract.flower.records import PRIVACY_REPORT

    def mod(msg, ctx, call_next):
        reply = call_next(msg, ctx)
        if (int(ctx.node_config["partition-id"]) != 0 or msg.metadata.message_type != "train"
                or reply.has_error() or PRIVACY_REPORT not in reply.content.config_records):
            return reply
        rec = reply.content.config_records[PRIVACY_REPORT]
        rec["client-id"] = name
        rec["ledger"] = json.dumps({"client_id": name, "events": []})
        rec["signed-ledger"] = ""
        rec["appended"] = 0
        rec["steps"] = 0  # consistent with the empty chain: only the name is forged
        rec["epsilon"] = 0.0
        if msg.metadata.group_id == "1":
            rec["trained"] = False
            rec["reason"] = "privacy budget exhausted (said by hospital-0)"
        return reply

    return mod


@pytest.mark.parametrize("secure", [False, True], ids=["plain", "secure"])
def test_a_hospital_cannot_report_in_another_members_name(tmp_path, secure) -> None:
    """Regression (review F3): with a roster, hospital-0 sends privacy reports naming it
    hospital-1 (an empty chain, a forged stop in round 1). The server names each node by
    the member its signed key advertisement proves it is, so the reports are refused as
    hospital-0's failure saying why; hospital-1 is never stopped, never failed, and
    trains every round once, and nobody is listed twice."""
    task = tasks.TaskConfig(dataset="breast-cancer", clients=3, batch_size=32, lr=0.2)
    keys, idents = make_identities(3, FED)
    roster = SignerRoster.from_json(
        Roster(FED, keys, {i + 1: f"hospital-{i}" for i in range(3)}).to_json())

    def setup(ctx):
        return hospital_setup(task, ctx)

    def pick(ctx):
        return idents[int(ctx.node_config["partition-id"])]

    policy = dataclasses.replace(POLICY, rounds=2)
    apps = {node: make_client_app(setup, policy, secagg=pick if secure else None,
                                  identity=pick, mods=[_claim_to_be("hospital-1")])
            for node in (11, 12, 13)}
    cfg = ServerConfig(
        rounds=2, num_clients=3, delta=policy.delta, out_dir=tmp_path, node_wait_seconds=1,
        show_progress=False, roster=roster,
        secagg=SecAggSettings(FED, keys, clip=8.0, colluders=0) if secure else None,
    )
    report = run_federation(FakeGrid(apps), weights_of(tasks.build_model(task)),
                            lambda w: {}, cfg)
    for row in report["rounds"]:
        assert row["trained"] == ["hospital-1", "hospital-2"]
        assert list(row["failed"]) == ["hospital-0"]
        assert ("its report names it 'hospital-1', but its signed key advertisement proves "
                "it is 'hospital-0'") in row["failed"]["hospital-0"]
        assert row["per_client"]["hospital-1"]["trained"]
    assert report["final"]["stopped"] == {}
    assert sorted(by_client(read_ledger(tmp_path / "ledger.jsonl"))) == ["hospital-1",
                                                                          "hospital-2"]


def test_a_node_that_proves_no_roster_membership_is_refused(tmp_path) -> None:
    """Plain FedAvg with a roster: a hospital that answers the identity query with a
    key advertisement that proves nothing here (one of another federation) is refused
    under its node id and never asked to train (it would spend its budget on a reply
    the server must refuse), so it is in no round's trained list and the server's
    ledger holds nothing of it."""
    from bract.flower.client import identity_handler

    roster, idents = _identities()
    _, foreign = make_identities(len(NODES), "another-federation")
    asked_to_train: list[int] = []

    def foreign_proof(msg, ctx, call_next):
        if int(ctx.node_config["partition-id"]) == 0:
            if msg.metadata.message_type == "query.secagg_advertise":
                return identity_handler(foreign[0])(msg, ctx)
            if msg.metadata.message_type == "train":
                asked_to_train.append(msg.metadata.dst_node_id)
        return call_next(msg, ctx)

    report = _run(tmp_path, FakeGrid(_apps(tmp_path / "hosp", idents, mods=[foreign_proof])),
                  roster)
    for row in report["rounds"]:
        assert row["trained"] == ["hospital-1"]
        assert "not asked to train: it has not proved which roster member it is" in (
            row["failed"][f"node-{NODES[0]}"])
    assert sorted(by_client(read_ledger(tmp_path / "out" / "ledger.jsonl"))) == ["hospital-1"]
    assert asked_to_train == []


def test_a_node_whose_identity_answer_fails_is_recorded_with_its_own_reason(tmp_path) -> None:
    """Plain FedAvg with a roster: a hospital whose answer to the identity query is an
    error (its SuperNode refused the run, say) is not asked to train, and its row
    records the reason it gave, not only that it proved no membership."""
    roster, idents = _identities()
    asked_to_train: list[int] = []

    def refusing(msg, ctx, call_next):
        if int(ctx.node_config["partition-id"]) == 0:
            if msg.metadata.message_type == "query.secagg_advertise":
                raise RuntimeError("bract-supernode refused the run's FAB")
            if msg.metadata.message_type == "train":
                asked_to_train.append(msg.metadata.dst_node_id)
        return call_next(msg, ctx)

    report = _run(tmp_path, FakeGrid(_apps(tmp_path / "hosp", idents, mods=[refusing])), roster)
    for row in report["rounds"]:
        assert row["trained"] == ["hospital-1"]
        (reason,) = row["failed"].values()
        # The hospital's ClientApp names an unexpected error by its type only.
        assert reason == "failed: RuntimeError (details in the hospital's log)", reason
    assert asked_to_train == []
