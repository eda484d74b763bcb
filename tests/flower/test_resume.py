"""Checkpoint and resume: an interrupted federation continues without losing or
repeating a round, and no hospital forgets the privacy budget it spent."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest

from bract import tasks
from bract.flower.app import dataset_source, hospital_setup
from bract.flower.checkpoint import CheckpointError
from bract.flower.client import PrivacyPolicy, make_client_app, privacy_dir
from bract.flower.secagg_client import make_identities
from bract.flower.secagg_server import SecAggSettings
from bract.flower.server import ServerConfig, run_federation
from bract.privacy import PrivacyLedger, epsilon_of, load_weights, weights_of
from tests.ctrl_c import interrupt_after_rounds

from .conftest import FakeGrid

TASK = tasks.TaskConfig(dataset="breast-cancer", clients=2, batch_size=32, lr=0.2)
POLICY = PrivacyPolicy(target_epsilon=4.0, delta=1e-5, rounds=4)


def _apps(state_root):
    def setup(ctx):
        return hospital_setup(TASK, ctx, state_root)

    return {7: make_client_app(setup, POLICY), 8: make_client_app(setup, POLICY)}


def _run(tmp_path, grid, resume=False, run_config=None, crash_evaluating_round=None,
         secagg=None):
    ds = tasks.dataset_for(TASK)
    model = tasks.build_model(TASK)
    calls = []

    def evaluate(w):
        calls.append(1)
        if len(calls) - 1 == crash_evaluating_round:  # call 0 is the initial model
            raise RuntimeError("injected crash while evaluating")
        load_weights(model, w)
        return tasks.evaluate(model, ds.x_test, ds.y_test)

    cfg = ServerConfig(
        rounds=POLICY.rounds, num_clients=len(grid.apps), delta=POLICY.delta,
        out_dir=tmp_path / "out",
        node_wait_seconds=1, show_progress=False, resume=resume,
        run_config=run_config or {"task": "breast-cancer", "eps": 4.0}, secagg=secagg,
    )
    return run_federation(grid, weights_of(tasks.build_model(TASK)), evaluate, cfg)


def _ledger(tmp_path, cid):
    home = privacy_dir(tmp_path / "hosp" / cid, dataset_source(TASK))
    state = json.loads((home / "privacy-state.json").read_text())
    return PrivacyLedger.from_json(state["ledger"])


def test_interrupted_run_resumes_without_losing_or_repeating_a_round(tmp_path) -> None:
    with pytest.raises(RuntimeError, match="injected server crash"):
        _run(tmp_path, FakeGrid(_apps(tmp_path / "hosp"), crash_at_round=3))
    partial = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [r["round"] for r in partial["rounds"]] == [1, 2]
    ckpt_model = np.load(next((tmp_path / "out" / "checkpoint").glob("global-round-2.npz")))

    # Fresh processes: new contexts (empty ctx.state), same hospital state directories.
    grid = FakeGrid(_apps(tmp_path / "hosp"))
    report = _run(tmp_path, grid, resume=True)
    assert [r["round"] for r in report["rounds"]] == [1, 2, 3, 4]
    assert report["rounds"][:2] == partial["rounds"]
    # Round 3 started from the checkpointed global model.
    first = next(m for m in grid.sent if m.metadata.group_id == "3")
    sent = {k: v.numpy() for k, v in first.content.array_records["bract.global"].items()}
    for k in ckpt_model.files:
        np.testing.assert_array_equal(sent[k], ckpt_model[k])
    for cid in ("hospital-0", "hospital-1"):
        ledger = _ledger(tmp_path, cid)
        assert [e.round for e in ledger.events] == [1, 2, 3, 4]
        eps = report["rounds"][-1]["per_client"][cid]["epsilon"]
        assert eps == pytest.approx(epsilon_of(ledger.events, POLICY.delta), rel=1e-6)
        assert eps <= POLICY.target_epsilon
    lines = (tmp_path / "out" / "ledger.jsonl").read_text().splitlines()
    assert len(lines) == 8


def test_updates_released_before_a_crash_stay_on_the_ledger(tmp_path) -> None:
    """The server dies after the hospitals released their round-3 updates but before
    it checkpointed round 3. On resume round 3 runs again: each hospital's ledger
    (reloaded by fresh processes from its own state directory) keeps both round-3
    events, so its epsilon counts every update it ever released, and the budget
    then refuses round 4."""
    with pytest.raises(RuntimeError, match="injected crash while evaluating"):
        _run(tmp_path, FakeGrid(_apps(tmp_path / "hosp")), crash_evaluating_round=3)
    assert [e.round for e in _ledger(tmp_path, "hospital-0").events] == [1, 2, 3]
    report = _run(tmp_path, FakeGrid(_apps(tmp_path / "hosp")), resume=True)
    assert [r["round"] for r in report["rounds"]] == [1, 2, 3, 4]
    for cid in ("hospital-0", "hospital-1"):
        ledger = _ledger(tmp_path, cid)
        assert [e.round for e in ledger.events] == [1, 2, 3, 3]
        last = report["rounds"][-1]["per_client"][cid]
        assert not last["trained"] and "budget" in last["reason"]
        assert last["epsilon"] == pytest.approx(epsilon_of(ledger.events, POLICY.delta), rel=1e-6)
        assert last["epsilon"] <= POLICY.target_epsilon
        assert last["steps"] == ledger.total_steps


def test_resume_refuses_other_settings_or_missing_checkpoint(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="no checkpoint"):
        _run(tmp_path, FakeGrid(_apps(tmp_path / "hosp")), resume=True)
    with pytest.raises(RuntimeError):
        _run(tmp_path, FakeGrid(_apps(tmp_path / "hosp"), crash_at_round=2))
    with pytest.raises(CheckpointError, match=r"differs in \['eps'\]"):
        _run(tmp_path, FakeGrid(_apps(tmp_path / "hosp")), resume=True,
             run_config={"task": "breast-cancer", "eps": 5.0})




def _secure_apps(state_root: Path, identities) -> dict:
    """Three hospitals' ClientApps with secure-aggregation identities (secure
    aggregation needs 3), on FakeGrid nodes 7, 8 and 9, their state under
    ``state_root``."""
    task3 = dataclasses.replace(TASK, clients=3)

    def setup(ctx):
        return hospital_setup(task3, ctx, state_root)

    def identity(ctx):
        return identities[int(ctx.node_config["partition-id"])]

    return {node: make_client_app(setup, POLICY, secagg=identity) for node in (7, 8, 9)}

def test_a_secure_run_resumes_after_a_crash_with_the_next_round_already_opened(
    tmp_path,
) -> None:
    """With secure aggregation, round 3's config and shares travel with round 2's
    unmask messages (pipelining), so a crash while evaluating round 2 leaves round 3
    opened. The resumed run (a new run: fresh contexts, same hospital identities and
    state directories) repeats round 2 on the four-stage path with fresh keys, then
    pipelines again; the repeated round is on every ledger, and the budget, spent by
    then, refuses round 4 inside a pipelined round (a dropout after sharing), which
    aborts cleanly."""
    roster, identities = make_identities(3, "resume-federation")
    settings = SecAggSettings("resume-federation", roster, clip=8.0)


    with pytest.raises(RuntimeError, match="injected crash while evaluating"):
        _run(tmp_path, FakeGrid(_secure_apps(tmp_path / "hosp", identities)),
             crash_evaluating_round=2, secagg=settings)
    report = _run(tmp_path, FakeGrid(_secure_apps(tmp_path / "hosp", identities)),
                  resume=True, secagg=settings)
    rounds = report["rounds"]
    assert [r["round"] for r in rounds] == [1, 2, 3, 4]
    assert [r["secagg"]["stages"] for r in rounds[:3]] == [5, 5, 3]
    assert [r["secagg"]["aborted"] is None for r in rounds] == [True, True, True, False]
    for cid in ("hospital-0", "hospital-1", "hospital-2"):
        ledger = _ledger(tmp_path, cid)
        assert [e.round for e in ledger.events] == [1, 2, 2, 3]
        last = rounds[-1]["per_client"][cid]
        assert not last["trained"] and "budget" in last["reason"]
        assert last["epsilon"] == pytest.approx(epsilon_of(ledger.events, POLICY.delta), rel=1e-6)
        assert last["epsilon"] <= POLICY.target_epsilon


class _CtrlCGrid(FakeGrid):
    """Ctrl-C when the server first sends a message of round ``at``: with pipelining,
    round ``at``'s configuration went out with round ``at - 1``'s unmask stage and
    the hospitals' shares for it came back. ``freeze``: as ``bract simulate``'s stop
    does, the process freezes its records (:func:`bract.flower.files.freeze_records`)
    before the interrupt reaches the round loop."""

    def __init__(self, apps, at: int, freeze: bool) -> None:
        super().__init__(apps)
        self.at, self.freeze = at, freeze

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        if messages and int(messages[0].metadata.group_id or 0) == self.at:
            if self.freeze:
                from bract.flower import files

                files.freeze_records(0.1)
            raise KeyboardInterrupt
        return super().send_and_receive(messages, timeout=timeout)


@pytest.mark.parametrize("freeze", [False, True], ids=["exception", "stop-handler"])
def test_a_secure_round_open_when_the_run_is_interrupted_is_recorded_and_audited(
    tmp_path, monkeypatch, capsys, freeze,
) -> None:
    """Ctrl-C in round 3, after its configuration went out with round 2's unmask stage
    and the hospitals answered with their round-3 shares: the recorded view holds
    round 3 as the server saw it, marked interrupted (aborted), and the audit covers
    rounds 1 to 3 (it never claims only 1 to 2). The resumed run's re-run of round 3
    is recorded beside it, not over it, and the audit over both passes."""
    import threading

    from bract.audit.secagg_audit import audit_views
    from bract.flower import files
    from bract.secagg.messages import RoundConfig, ShareKeys
    from bract.secagg.recording import read_view

    # A frozen process never writes a record again: a fresh freeze for this test only.
    monkeypatch.setattr(files, "_frozen", threading.Event())
    roster, identities = make_identities(3, "interrupted-view")
    views = tmp_path / "secagg_view"
    settings = SecAggSettings("interrupted-view", roster, clip=8.0, record_dir=str(views))

    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, _CtrlCGrid(_secure_apps(tmp_path / "hosp", identities), 3, freeze),
             secagg=settings)
    monkeypatch.setattr(files, "_frozen", threading.Event())
    recorded = read_view(views)
    assert [v.round for v in recorded] == [1, 2, 3]  # round 3's shares are in the view
    assert [(v.round, bool(v.interrupted)) for v in recorded] == [
        (1, False), (2, False), (3, True)]
    cut = recorded[-1]
    assert cut.aborted and "interrupted" in cut.interrupted
    configs = [m for d, m in cut.messages if d == "out" and isinstance(m, RoundConfig)]
    assert len(configs) == 1 and (configs[0].round >> 20) == 3
    assert sorted(m.node_id for d, m in cut.messages
                  if d == "in" and isinstance(m, ShareKeys)) == [1, 2, 3]
    report = audit_views(recorded, roster=roster)
    assert report.gap is None and report.rounds == 3 and report.interrupted == [3]
    assert report.verdict == "pass", [c.detail for c in report.failed + report.skipped]
    assert all("interrupted attempt" in c.detail for c in report.checks if c.round == 3)
    from bract.cli import main

    capsys.readouterr()
    assert main(["audit", "secagg", "--view", str(views), "--out", str(tmp_path / "a")]) == 0
    said = " ".join(capsys.readouterr().out.split())
    assert "verdict: pass (rounds 1 to 3); interrupted in round 3 (audited as aborted)" in said

    _run(tmp_path, FakeGrid(_secure_apps(tmp_path / "hosp", identities)), resume=True,
         secagg=settings)
    assert sorted(p.name for p in views.iterdir()) == [
        "round-1", "round-2", "round-3", "round-3-attempt-2", "round-4"]
    after = read_view(views)
    assert [(v.round, bool(v.interrupted)) for v in after] == [
        (1, False), (2, False), (3, True), (3, False), (4, False)]
    assert after[2].messages == cut.messages  # the interrupted attempt, untouched
    report = audit_views(after, roster=roster)
    assert report.gap is None and report.rounds == 4 and report.interrupted == [3]
    assert report.verdict == "pass", [c.detail for c in report.failed + report.skipped]


def _group_alive(pgid: int) -> list[str]:
    import subprocess

    rows = subprocess.run(["ps", "-ww", "-eo", "pgid=,stat=,args="], capture_output=True,
                          text=True).stdout.splitlines()
    return [r for r in rows if r.split()[0] == str(pgid) and not r.split()[1].startswith("Z")]


@pytest.mark.slow
def test_ctrl_c_stops_a_simulation_in_seconds_and_the_printed_command_resumes_it(
        tmp_path) -> None:
    """Ctrl-C during `bract simulate`: exit 130 within a few seconds, no traceback, one
    `interrupted:` line with the command that resumes, no process of the run left
    (Ray's raylet, GCS and workers included); that command finishes the run and its
    ledger verifies."""
    import json
    import shlex
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    bract = str(Path(sys.executable).parent / "bract")
    argv = [bract, "simulate", "--dataset", "breast-cancer", "--rounds", "12", "--out",
            str(out), "--no-progress"]
    report = out / "report.json"
    ended, seconds, pid = interrupt_after_rounds(argv, report, 2, start_within=240)
    assert seconds < 10
    assert ended.returncode == 130
    assert "Traceback" not in ended.stdout + ended.stderr
    last = ended.stderr.strip().splitlines()[-1]
    assert last.startswith("interrupted: the run stopped after round ")
    time.sleep(1)
    assert _group_alive(pid) == []
    # The hospitals the stop killed are not a failed round: the record ends at the last
    # round that finished, and --resume redoes the one under way.
    stopped_at = json.loads(report.read_text())["rounds"]
    assert stopped_at and all(r["trained"] for r in stopped_at)
    assert f"after round {len(stopped_at)} " in last
    command = shlex.split(last.split("continue it with: ", 1)[1])
    assert command[-1] == "--resume"
    resumed = subprocess.run([bract, *command[1:]], capture_output=True, text=True,
                             timeout=600)
    said = resumed.stdout[-2000:] + resumed.stderr[-2000:]
    final = json.loads(report.read_text())
    assert [r["round"] for r in final["rounds"]] == list(range(1, 13))
    # No round failed. A hospital that had recorded its training for the interrupted
    # round keeps that spend (the conservative side: its first update may have left),
    # so the budget calibrated for 12 rounds can run out in the last one. Then that
    # round trains no hospital: those out of budget refuse, by their budget, and the
    # others' updates are too few for a secure sum (nothing is revealed). If every
    # hospital refused, the federation ends as budgets end it (exit 0); if some trained
    # for nothing, the run says so with exit 1. Otherwise every round trained (exit 0).
    rows = final["rounds"]
    untrained = [row for row in rows if not row["trained"]]
    assert rows[len(rows) - len(untrained):] == untrained  # only at the end
    for row in rows:
        assert not row["failed"]
    for row in untrained:
        reasons = [v["reason"] for v in row["per_client"].values()]
        assert any("past the budget" in why for why in reasons), reasons
        assert all("past the budget" in why or why.startswith("ok:") for why in reasons)
        if not all("past the budget" in why for why in reasons):
            assert "threshold" in row["secagg"]["aborted"]
    last = rows[-1]["per_client"].values()
    if untrained and not all("past the budget" in v["reason"] for v in last):
        assert resumed.returncode == 1 and "averaged no hospital's update" in said, said
    else:
        assert resumed.returncode == 0, said
        assert not untrained or "every hospital has stopped" in said, said
    from bract.cli import main

    assert main(["audit", "verify", str(out / "ledger.jsonl"), "--roster",
                 str(out / "roster.json"), "--report", str(report), "--out",
                 str(tmp_path / "audit")]) == 0


@pytest.mark.slow
def test_sigterm_stops_a_simulation_under_ray_with_one_line_and_exit_143(tmp_path) -> None:
    """SIGTERM during `bract simulate`, after Ray has started: bract's stop runs, not
    Ray's own handler: exit 143 within seconds, no traceback, one `interrupted:` line
    with the command that resumes, no process of the run left."""
    import signal
    import sys
    import time

    out = tmp_path / "run"
    bract = str(Path(sys.executable).parent / "bract")
    argv = [bract, "simulate", "--dataset", "breast-cancer", "--clients", "2", "--rounds",
            "12", "--no-secagg", "--out", str(out), "--no-progress"]
    ended, seconds, pid = interrupt_after_rounds(argv, out / "report.json", 1,
                                                 start_within=240, sig=signal.SIGTERM)
    assert seconds < 10
    assert ended.returncode == 143, ended.stderr[-3000:]
    assert "Traceback" not in ended.stdout + ended.stderr
    # Ray's C++ failure handler (installed by ray.init) prints nothing either.
    assert "SIGTERM received" not in ended.stdout + ended.stderr, ended.stderr[-3000:]
    last = ended.stderr.strip().splitlines()[-1]
    assert last.startswith("interrupted: the run stopped after round ")
    assert last.endswith("--resume")
    time.sleep(1)
    assert _group_alive(pid) == []


def test_ctrl_c_before_the_run_starts_is_one_line_and_exit_130(capsys, monkeypatch) -> None:
    """Ctrl-C while `bract` still parses or imports (before a run's stop handler is
    installed) ends with one `interrupted:` line and exit 130, not a traceback."""
    from bract import cli

    def pressed(*_a: object, **_k: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_simulate", pressed)
    try:
        code = cli.main(["simulate", "--dataset", "synthetic"])
    except KeyboardInterrupt:
        pytest.fail("KeyboardInterrupt escaped bract's entry point")
    assert code == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("interrupted: ")


def _signed_apps(state_root, identities):
    def setup(ctx):
        return hospital_setup(TASK, ctx, state_root)

    def identity(ctx):
        return identities[int(ctx.node_config["partition-id"])]

    return {node: make_client_app(setup, POLICY, identity=identity) for node in (7, 8)}


def _signed_run(tmp_path, crash_evaluating_round: int) -> tuple[dict, Path]:
    """A signed 2-hospital run that crashes while evaluating ``crash_evaluating_round``
    (after the hospitals released that round's updates), then resumes to its end; the
    roster at ``tmp_path / "roster.json"``."""
    from bract.records.ledger import SignerRoster
    from bract.records.roster import Roster, write_roster

    keys, identities = make_identities(2, "fed-resume-audit")
    roster = tmp_path / "roster.json"
    write_roster(roster, Roster("fed-resume-audit", keys, {1: "hospital-0", 2: "hospital-1"}))
    signed = SignerRoster.read(roster)
    config = {"task": "breast-cancer", "target_epsilon": POLICY.target_epsilon,
              "delta": POLICY.delta}

    def run(resume: bool, crash: int | None) -> dict:
        ds = tasks.dataset_for(TASK)
        model = tasks.build_model(TASK)
        calls = []

        def evaluate(w):
            calls.append(1)
            if len(calls) - 1 == crash:
                raise RuntimeError("injected crash while evaluating")
            load_weights(model, w)
            return tasks.evaluate(model, ds.x_test, ds.y_test)

        cfg = ServerConfig(
            rounds=POLICY.rounds, num_clients=2, delta=POLICY.delta, out_dir=tmp_path / "out",
            node_wait_seconds=1, show_progress=False, resume=resume, run_config=config,
            roster=signed,
        )
        grid = FakeGrid(_signed_apps(tmp_path / "hosp", identities))
        return run_federation(grid, weights_of(tasks.build_model(TASK)), evaluate, cfg)

    with pytest.raises(RuntimeError, match="injected crash while evaluating"):
        run(False, crash_evaluating_round)
    return run(True, None), roster


def _audit(tmp_path, roster) -> tuple[int, str]:
    from bract.cli import main

    out = tmp_path / "out"
    code = main(["audit", "verify", str(out / "ledger.jsonl"), "--roster", str(roster),
                 "--report", str(out / "report.json"), "--pld-discretization", "1e-3",
                 "--out", str(tmp_path / "audit")])
    return code, " ".join((tmp_path / "audit" / "audit.md").read_text().split())


@pytest.mark.parametrize("crash", [3, 4])
def test_entries_of_an_interrupted_attempt_are_recorded_and_audited_as_such(
        tmp_path, crash) -> None:
    """The server dies after the hospitals released round ``crash``'s updates, before it
    recorded the round; the resumed run re-runs it. In the last round (4) the lost
    attempt spent the budget: the re-run is refused, and the hospitals' lines say they
    did not train in a round their ledgers have an entry for. report.json marks the
    round as resumed and records, per hospital, the entries of the interrupted attempt
    (its chain shows them after the server's last record and before the re-run's
    reply), and ``bract audit verify`` passes, noting them. The same report with the
    record removed, or the round not marked resumed, fails."""
    report, roster = _signed_run(tmp_path, crash)
    row = report["rounds"][crash - 1]
    assert row["resumed"] is True
    assert not any(r.get("resumed") for r in report["rounds"] if r["round"] != crash)
    for cid in ("hospital-0", "hospital-1"):
        line = row["per_client"][cid]
        assert line["ledger_interrupted"] == 1 and line["of_round"] == crash
        assert line["trained"] is (crash < POLICY.rounds)
    code, md = _audit(tmp_path, roster)
    assert code == 0, md
    for cid in ("hospital-0", "hospital-1"):
        assert (f"{cid}'s entry {crash} (round {crash}) was spent in the interrupted attempt "
                f"of round {crash}") in md
    data = json.loads((tmp_path / "out" / "report.json").read_text())
    for edit in ("no record", "not resumed"):
        doctored = json.loads(json.dumps(data))
        last = doctored["rounds"][crash - 1]
        if edit == "no record":
            for line in last["per_client"].values():
                line["ledger_interrupted"] = 0
        else:
            del last["resumed"]
        (tmp_path / "out" / "report.json").write_text(json.dumps(doctored))
        code, md = _audit(tmp_path, roster)
        if crash == POLICY.rounds or edit == "not resumed":
            assert code == 1, (edit, md)
        if edit == "not resumed":
            assert f"but round {crash} is not the first round of a resumed run" in md
        elif crash == POLICY.rounds:
            assert f"report.json round {crash} says hospital-0 did not train" in md


def _federation(out: Path, run_config: dict, resume: bool = False):
    from bract.flower.server import Federation

    cfg = ServerConfig(rounds=4, num_clients=3, delta=1e-5, out_dir=out, show_progress=False,
                       resume=resume, run_config=run_config)
    fed = Federation(FakeGrid({}), lambda w: {}, cfg)
    fed.global_weights = {"w": np.zeros(3, dtype=np.float32)}
    return fed


def _state(out: Path) -> dict:
    return json.loads((out / "checkpoint" / "state.json").read_text())


def test_the_checkpoint_carries_the_count_of_consecutive_aborted_rounds(tmp_path) -> None:
    """The count survives a resume; a checkpoint written before it was kept (no
    ``spent_aborts``) resumes with none counted; a damaged count is refused by name."""
    saved = _federation(tmp_path, {"eps": 4.0})
    saved.completed, saved.spent_aborts = 2, 2
    saved.checkpoint()
    assert _state(tmp_path)["spent_aborts"] == 2
    restored = _federation(tmp_path, {"eps": 4.0}, resume=True)
    restored.restore()
    assert (restored.completed, restored.spent_aborts) == (2, 2)

    state = _state(tmp_path)
    del state["spent_aborts"]
    (tmp_path / "checkpoint" / "state.json").write_text(json.dumps(state))
    older = _federation(tmp_path, {"eps": 4.0}, resume=True)
    older.restore()
    assert (older.completed, older.spent_aborts) == (2, 0)

    for bad in (-1, True, 1.5, "2", None):
        (tmp_path / "checkpoint" / "state.json").write_text(
            json.dumps({**state, "spent_aborts": bad}))
        with pytest.raises(CheckpointError, match=f"its spent_aborts {bad!r} is not a round"):
            _federation(tmp_path, {"eps": 4.0}, resume=True).restore()


@pytest.mark.parametrize("key", ["secagg-abort-limit", "secagg_abort_limit"])
def test_a_resume_with_another_abort_limit_is_refused(tmp_path, key) -> None:
    """Like every other setting, the abort limit may not change on resume (run-config
    and report.json spellings alike); a checkpoint made before the setting existed ran
    with the limit 2, so it resumes with 2 and refuses any other."""
    saved = _federation(tmp_path, {"eps": 4.0, key: 3})
    saved.checkpoint()
    _federation(tmp_path, {"eps": 4.0, key: 3}, resume=True).restore()
    for other in (0, 2, 4):
        with pytest.raises(CheckpointError, match=re.escape(f"differs in ['{key}']")):
            _federation(tmp_path, {"eps": 4.0, key: other}, resume=True).restore()

    older = _federation(tmp_path / "older", {"eps": 4.0})
    older.checkpoint()
    _federation(tmp_path / "older", {"eps": 4.0, key: 2}, resume=True).restore()
    with pytest.raises(CheckpointError, match=re.escape(f"differs in ['{key}']")):
        _federation(tmp_path / "older", {"eps": 4.0, key: 0}, resume=True).restore()
