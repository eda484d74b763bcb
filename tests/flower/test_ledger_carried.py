"""``ledger_carried``: the entries a hospital's data spent before this run, counted by
the server at the hospital's first read reply.

Every training reply carries the hospital's whole signed chain, so when its first
replies of a run are lost (it trained, the server recorded it as not answering), the
entries of those rounds reach the server with its first read reply. They are this
run's, not carried: report.json counts exactly the entries of earlier runs and
federations as carried (also across a resume, and after a resume that re-runs the
round the run was interrupted in), and ``bract audit verify`` with the hospitals' own
copies passes, noting each lost round's entry."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from bract import tasks
from bract.cli import main
from bract.flower.app import dataset_source, hospital_setup
from bract.flower.client import LEDGER_FILE, PrivacyPolicy, make_client_app, privacy_dir
from bract.flower.secagg_client import make_identities
from bract.flower.server import ServerConfig, run_federation
from bract.privacy import load_weights, weights_of
from bract.records.ledger import SignerRoster, read_ledger
from bract.records.roster import Roster, write_roster

from .conftest import FakeGrid

TASK = tasks.TaskConfig(dataset="breast-cancer", clients=2, batch_size=32, lr=0.2)
EARLIER = PrivacyPolicy(target_epsilon=2.0, delta=1e-5, rounds=1)
POLICY = PrivacyPolicy(target_epsilon=5.0, delta=1e-5, rounds=3)
FED = "fed-carried"
CIDS = ("hospital-0", "hospital-1")
KEYS, IDENTS = make_identities(2, FED)


def _roster(root: Path, fed: str) -> Path:
    path = root / f"roster-{fed}.json"
    write_roster(path, Roster(fed, KEYS, {1: CIDS[0], 2: CIDS[1]}))
    return path


def _grid(hosp: Path, fed: str, policy: PrivacyPolicy, nodes=(7, 8), **kw) -> FakeGrid:
    idents = [dataclasses.replace(i, federation_id=fed) for i in IDENTS]

    def setup(ctx):
        return hospital_setup(TASK, ctx, hosp)

    def identity(ctx):
        return idents[int(ctx.node_config["partition-id"])]

    return FakeGrid({n: make_client_app(setup, policy, identity=identity) for n in nodes}, **kw)


def _run(out: Path, grid: FakeGrid, roster: Path, policy: PrivacyPolicy, *,
         resume: bool = False, crash_evaluating: int | None = None) -> dict:
    ds = tasks.dataset_for(TASK)
    model = tasks.build_model(TASK)
    calls = []

    def evaluate(w):
        calls.append(1)
        if len(calls) - 1 == crash_evaluating:  # call 0 is the initial model's
            raise RuntimeError("injected crash while evaluating")
        load_weights(model, w)
        return tasks.evaluate(model, ds.x_test, ds.y_test)

    cfg = ServerConfig(
        rounds=policy.rounds, num_clients=2, delta=policy.delta, out_dir=out,
        node_wait_seconds=1, show_progress=False, resume=resume,
        run_config={"target_epsilon": policy.target_epsilon, "delta": policy.delta},
        roster=SignerRoster.read(roster),
    )
    return run_federation(grid, weights_of(tasks.build_model(TASK)), evaluate, cfg)


def _earlier(root: Path, earlier: tuple[str, int] | None) -> int:
    """Run the earlier federation (``(federation, rounds)``) on the hospitals' data;
    the number of entries each hospital's chain then holds."""
    if earlier is None:
        return 0
    fed, rounds = earlier
    policy = dataclasses.replace(EARLIER, rounds=rounds)
    _run(root / "earlier", _grid(root / "hosp", fed, policy), _roster(root, fed), policy)
    return rounds


def _audit(root: Path, roster: Path) -> tuple[int, str]:
    argv = ["audit", "verify", str(root / "out" / "ledger.jsonl"), "--roster", str(roster),
            "--report", str(root / "out" / "report.json"), "--pld-discretization", "1e-3",
            "--out", str(root / "audit")]
    for cid in CIDS:
        own = privacy_dir(root / "hosp" / cid, dataset_source(TASK)) / LEDGER_FILE
        argv += ["--hospital-copy", f"{cid}={own}"]
    code = main(argv)
    return code, " ".join((root / "audit" / "audit.md").read_text().split())


def _check(root: Path, report: dict, carried: int, lost: range) -> str:
    """Every line of both hospitals counts exactly the ``carried`` earlier entries, with
    the epsilon the last of them signed; the audit passes, noting each ``lost`` round."""
    chains = {cid: [e for e in read_ledger(root / "out" / "ledger.jsonl") if e.client_id == cid]
              for cid in CIDS}
    for row in report["rounds"]:
        for cid, line in row["per_client"].items():
            assert line["ledger_carried"] == carried, (row["round"], cid, line)
            before = chains[cid][carried - 1].epsilon if carried else 0.0
            assert line["epsilon_carried"] == before
    for r in lost:
        assert report["rounds"][r - 1]["failed"] == {"hospital-1": "did not answer"}
        assert "hospital-1" not in report["rounds"][r - 1]["per_client"]
    code, md = _audit(root, _roster(root, FED))
    assert code == 0, md
    for r in lost:
        assert (f"hospital-1's ledger has an entry for round {r}, in which report.json "
                "records it as failed (did not answer)") in md
    return md


@pytest.mark.parametrize("earlier", [None, (FED, 1), ("fed-other", 2)],
                         ids=["fresh", "same-federation", "other-federation"])
@pytest.mark.parametrize("k", [1, 2])
def test_entries_of_lost_first_replies_are_this_runs_not_carried(
        tmp_path, earlier, k) -> None:
    """Hospital-1 trains in rounds 1..k but its replies are lost: its round k+1 reply
    carries their entries. report.json counts only the earlier run's entries as
    carried, for it as for hospital-0, and the audit passes."""
    carried = _earlier(tmp_path, earlier)
    grid = _grid(tmp_path / "hosp", FED, POLICY, lost={8: lambda r: r <= k})
    report = _run(tmp_path / "out", grid, _roster(tmp_path, FED), POLICY)
    chain = [e for e in read_ledger(tmp_path / "out" / "ledger.jsonl")
             if e.client_id == "hospital-1"]
    assert [e.round for e in chain[carried:]] == [1, 2, 3]
    _check(tmp_path, report, carried, range(1, k + 1))


@pytest.mark.parametrize("kept", [True, False], ids=["checkpoint", "older-checkpoint"])
@pytest.mark.parametrize("crash", ["before-round-2", "evaluating-round-2"])
def test_a_reply_lost_before_a_resume_is_this_runs_not_carried(tmp_path, crash, kept) -> None:
    """After an earlier run of the same federation, hospital-1's round-1 reply is lost
    and the server stops in round 2 (before asking anyone, or after both hospitals
    trained in it); the resumed run, with other Flower node ids, reads hospital-1's
    first reply in round 2. Its round-1 entry (and the interrupted attempt's) are this
    run's, also when the checkpoint did not keep the rounds it asked (an older
    checkpoint: the rounds its rows record the hospital failed in are taken)."""
    carried = _earlier(tmp_path, (FED, 1))
    roster = _roster(tmp_path, FED)
    grid = _grid(tmp_path / "hosp", FED, POLICY, lost={8: lambda r: r == 1},
                 crash_at_round=2 if crash == "before-round-2" else None)
    with pytest.raises(RuntimeError, match="injected"):
        _run(tmp_path / "out", grid, roster, POLICY,
             crash_evaluating=2 if crash == "evaluating-round-2" else None)
    state_path = tmp_path / "out" / "checkpoint" / "state.json"
    state = json.loads(state_path.read_text())
    asked = state.get("unanswered")
    if not kept:
        state.pop("unanswered", None)
        state_path.write_text(json.dumps(state))
    report = _run(tmp_path / "out", _grid(tmp_path / "hosp", FED, POLICY, nodes=(17, 18)),
                  roster, POLICY, resume=True)
    line = report["rounds"][1]["per_client"]["hospital-1"]
    assert line["ledger_interrupted"] == (1 if crash == "evaluating-round-2" else 0)
    md = _check(tmp_path, report, carried, range(1, 2))
    if crash == "evaluating-round-2":
        assert "hospital-1's entry 3 (round 2) was spent in the interrupted attempt" in md
    assert asked == {"hospital-1": [1]}  # by name: the resumed run's node ids differ
