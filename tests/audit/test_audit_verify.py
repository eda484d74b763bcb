"""``bract audit verify``: passes on a real federation's record, and fails — exit 1,
the problem named — for a tampered epsilon, an edited event, a deleted line, a wrong
roster key, a missing event, an under-reported epsilon signed by the hospital
itself, a diverging hospital copy, or a passed budget; exit 2 for unusable input."""

from __future__ import annotations

import itertools
import json
import math
import shutil
from pathlib import Path

import pytest
from flwr.supercore.task_identity import TaskIdentity
from hypothesis import example, given, settings
from hypothesis import strategies as st

from bract import tasks
from bract.audit.report import HTML, MARKDOWN, PLOT
from bract.audit.verify import (
    FAIL,
    NOTE,
    disagreement,
    recompute_epsilons,
    verify_federation,
)
from bract.cli import main
from bract.flower.app import dataset_source, hospital_setup
from bract.flower.client import LEDGER_FILE, PrivacyPolicy, make_client_app, privacy_dir
from bract.flower.secagg_client import SecAggIdentity, make_identities
from bract.flower.server import ServerConfig, run_federation
from bract.privacy import DpSgdEvent, epsilon_of, load_weights, weights_of
from bract.records.ledger import (
    LedgerEntry,
    append_entry,
    dumps_jsonl,
    read_ledger,
    write_ledger,
)
from bract.records.roster import Roster, write_roster
from bract.secagg.crypto import SigningKey

from ..flower.conftest import FakeGrid

TASK = tasks.TaskConfig(dataset="breast-cancer", clients=2, batch_size=32, lr=0.2)
POLICY = PrivacyPolicy(target_epsilon=3.0, delta=1e-5, rounds=3)
FED = "fed-audit"
FAST = ["--pld-discretization", "1e-3"]  # 50 ms per epsilon instead of 0.5 s


@pytest.fixture(scope="module")
def federation(tmp_path_factory) -> Path:
    """A real 2-hospital, 3-round DP federation with signed ledgers, on disk."""
    return _federation(tmp_path_factory.mktemp("fed"))


def _federation(root: Path, *, rounds: int = 3, release_metrics: str = "none") -> Path:
    """Run a real 2-hospital DP federation (plain FedAvg, signed ledgers, a roster)
    into ``root``; ``release_metrics`` as both the hospitals and the server take it."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    keys, idents = make_identities(2, FED)
    write_roster(root / "roster.json", Roster(FED, keys, {1: "hospital-0", 2: "hospital-1"}))
    # The hospitals' signing keys, for tests that sign entries as a hospital would.
    (root / "keys.json").write_text(json.dumps(
        {f"hospital-{i}": idents[i].signing_key.hex() for i in range(2)}))

    def setup(ctx):
        return hospital_setup(TASK, ctx, root / "hospitals")

    def identity(ctx) -> SecAggIdentity:
        return idents[int(ctx.node_config["partition-id"])]

    grid = FakeGrid({n: make_client_app(setup, POLICY, identity=identity,
                                        release_metrics=release_metrics) for n in (7, 8)})
    ds = tasks.dataset_for(TASK)
    model = tasks.build_model(TASK)

    def evaluate(w):
        load_weights(model, w)
        return tasks.evaluate(model, ds.x_test, ds.y_test)

    from bract.records.ledger import SignerRoster

    cfg = ServerConfig(
        rounds=rounds, num_clients=2, delta=POLICY.delta, out_dir=root / "out",
        node_wait_seconds=1, show_progress=False,
        run_config={"target_epsilon": 3.0, "delta": POLICY.delta},
        roster=SignerRoster.read(root / "roster.json"), release_metrics=release_metrics,
    )
    run_federation(grid, weights_of(tasks.build_model(TASK)), evaluate, cfg)
    return root


@pytest.fixture()
def run(federation, tmp_path) -> Path:
    """A private copy of the federation's files, free to tamper with."""
    shutil.copytree(federation, tmp_path / "fed")
    return tmp_path / "fed"


def _verify(run: Path, *extra: str, copies: bool = True, report: bool = True) -> int:
    argv = ["audit", "verify", str(run / "out" / "ledger.jsonl"),
            "--roster", str(run / "roster.json"), "--out", str(run / "audit"), *FAST, *extra]
    if report:
        argv += ["--report", str(run / "out" / "report.json")]
    if copies:
        for cid in ("hospital-0", "hospital-1"):
            own = privacy_dir(run / "hospitals" / cid, dataset_source(TASK)) / LEDGER_FILE
            argv += ["--hospital-copy", f"{cid}={own}"]
    return main(argv)


def _md(run: Path) -> str:
    return (run / "audit" / MARKDOWN).read_text()


def _rewrite(path: Path, edit) -> None:
    lines = path.read_text().splitlines()
    lines = edit(lines)
    path.write_text("".join(line + "\n" for line in lines))


def test_verify_passes_on_a_real_federation_and_writes_the_report(run, capsys) -> None:
    assert _verify(run) == 0
    assert "PASS" in capsys.readouterr().out
    md = _md(run)
    assert md.splitlines()[2].startswith("**PASS")  # verdict first
    assert md.index("## Hospitals") < md.index("## Findings") < md.index("## Epsilon per round")
    assert "dp_accounting" in md and "PLDAccountant" in md and "2.0%" in md
    assert "| hospital-0 | 3 | verified |" in md and "identical (3 lines)" in md
    html = (run / "audit" / HTML).read_text()
    assert "<p class='verdict'>PASS" in html and f"src='{PLOT}'" in html
    png = (run / "audit" / PLOT).read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000


def test_a_run_that_releases_metrics_in_clear_passes_the_audit(tmp_path, capsys) -> None:
    """A hospital's metrics release is a ledger event of its own (one Gaussian release,
    ``mechanism: "metrics"``, counted in its ε), not DP-SGD steps: an honest run that
    releases metrics passes, its ε and step counts checked against the ledger."""
    run = _federation(tmp_path, rounds=2, release_metrics="clear")
    chain = read_ledger(run / "out" / "ledger.jsonl")
    assert {e.event.mechanism for e in chain} == {"dp-sgd", "metrics"}
    assert _verify(run) == 0, capsys.readouterr().out
    assert "PASS" in capsys.readouterr().out


def test_recomputed_epsilon_agrees_with_reported_and_with_bracts_pld(run) -> None:
    result = verify_federation(run / "out" / "ledger.jsonl", run / "roster.json",
                               report_path=run / "out" / "report.json")
    assert result.passed, result.failures
    for cid, h in result.hospitals.items():
        chain = [e for e in read_ledger(run / "out" / "ledger.jsonl") if e.client_id == cid]
        for k, entry in enumerate(h.entries, 1):
            events = [e.event for e in chain[:k]]
            assert entry.recomputed == pytest.approx(epsilon_of(events, 1e-5, "pld"), rel=1e-9)
            # bract reports PRV: within its designed band around PLD.
            assert 0.995 <= entry.reported / entry.recomputed <= 1.01
        assert h.final_recomputed <= 3.0 * 1.01


def test_a_tampered_epsilon_in_report_json_fails(run, capsys) -> None:
    path = run / "out" / "report.json"
    report = json.loads(path.read_text())
    report["rounds"][2]["per_client"]["hospital-1"]["epsilon"] *= 0.8
    path.write_text(json.dumps(report))
    assert _verify(run) == 1
    out = " ".join(capsys.readouterr().out.split())
    assert "report.json round 3 gives hospital-1" in out and "under-reported" in out
    assert "**FAIL" in _md(run)


def test_an_edited_event_fails(run, capsys) -> None:
    def edit(lines):
        plain = json.loads(lines[1])
        plain["event"]["noise_multiplier"] *= 1.5  # claims more noise than was added
        lines[1] = json.dumps(plain)
        return lines

    _rewrite(run / "out" / "ledger.jsonl", edit)
    assert _verify(run, copies=False) == 1
    out = " ".join(capsys.readouterr().out.split())
    assert "entry 2 (seq 2, round 2): signature does not verify" in out
    # The edited event also no longer gives the epsilon the hospital signed.
    assert "entry 2 (round 2) reports" in out and "over-reported" in out


def test_an_event_edited_to_almost_no_noise_fails_cleanly_in_bounded_memory(run) -> None:
    """A ledger line edited to claim a noise multiplier of 0.001 (an exact PLD
    recomputation of it needs tens of GB) is audited like any edit: exit 1, the broken
    signature and the passed budget named, no traceback, within 4 GB of address space."""
    import subprocess
    import sys

    def edit(lines):
        plain = json.loads(lines[1])
        plain["event"]["noise_multiplier"] = 0.001
        lines[1] = json.dumps(plain)
        return lines

    _rewrite(run / "out" / "ledger.jsonl", edit)
    argv = ["audit", "verify", str(run / "out" / "ledger.jsonl"), "--roster",
            str(run / "roster.json"), "--report", str(run / "out" / "report.json"),
            "--out", str(run / "audit")]
    script = ("import resource, sys\n"
              "resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))\n"
              "from bract.cli import main\n"
              "sys.exit(main(sys.argv[1:]))\n")
    done = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True,
                          text=True, timeout=300)
    out = " ".join((done.stdout + done.stderr).split())
    assert done.returncode == 1, out[-3000:]
    assert "Traceback" not in out and "MemoryError" not in out
    assert "entry 2 (seq 2, round 2): signature does not verify" in out
    assert "past the budget of 3" in out


@pytest.mark.parametrize(("line", "needle"), [(1, "entries 2..2 missing"), (2, "truncated")])
def test_a_deleted_line_fails(run, capsys, line, needle) -> None:
    _rewrite(run / "out" / "ledger.jsonl", lambda lines: lines[:line] + lines[line + 1:])
    assert _verify(run) == 1
    out = " ".join(capsys.readouterr().out.split())
    assert needle in out
    # The hospital's own copy still has it.
    assert (f"entry seq {line + 1} (round {line + 1}) is in hospital-0's copy but missing "
            "from the server's: a missing event") in out
    if needle == "truncated":
        assert "missing event: report.json says hospital-0 trained in round 3" in out


def _drop_last_entry_of(run: Path, cid: str) -> None:
    def edit(lines):
        last = max(i for i, x in enumerate(lines) if json.loads(x)["client_id"] == cid)
        return lines[:last] + lines[last + 1:]

    _rewrite(run / "out" / "ledger.jsonl", edit)


def test_without_a_length_reference_completeness_is_not_checked_and_the_audit_fails(
        run, capsys) -> None:
    """Without report.json and without the hospitals' own copies nothing shows whether
    entries were cut from the end of a chain (a prefix is a valid chain): the audit
    fails, the verdict line saying completeness was NOT checked and why, for the
    untouched ledger and the truncated one alike. With the copies, the untouched ledger
    passes, naming what its length was checked against, and the truncated one fails."""
    for truncated in (False, True):
        if truncated:
            _drop_last_entry_of(run, "hospital-0")
        assert _verify(run, copies=False, report=False) == 1
        out = " ".join(capsys.readouterr().out.split())
        assert "PASS" not in out and "authentic, complete" not in out
        assert out.startswith("FAIL — ")
        assert ("completeness NOT checked: no report.json and no own copy given "
                "(hospital-0, hospital-1)") in out
        assert "--hospital-copy hospital-0=PATH" in out
        verdict = _md(run).splitlines()[2]
        assert verdict.startswith("**FAIL") and "completeness NOT checked" in verdict
        if not truncated:
            assert _verify(run, report=False) == 0
            out = " ".join(capsys.readouterr().out.split())
            assert "PASS" in out and "complete (length checked against its own copy)" in out
    assert _verify(run, report=False) == 1
    out = " ".join(capsys.readouterr().out.split())
    assert "entry seq 3 (round 3) is in hospital-0's copy but missing from the server's" in out


def test_an_unfinished_runs_report_is_named_and_vouches_for_no_length(run, capsys) -> None:
    """report.json without its final summary is an interrupted run's: the audit names it
    as an unfinished run, and since a round trained after its last row shows nowhere in
    it, it is no length reference: without the hospitals' copies the audit fails saying
    completeness was NOT checked because the run is unfinished; with them it passes,
    the verdict still naming the unfinished run."""
    path = run / "out" / "report.json"
    report = json.loads(path.read_text())
    report["final"] = {}
    path.write_text(json.dumps(report))
    assert _verify(run, copies=False) == 1
    out = " ".join(capsys.readouterr().out.split())
    assert "PASS" not in out
    assert ("completeness NOT checked: report.json is of an unfinished run (no final summary) "
            "and no own copy given (hospital-0, hospital-1)") in out
    md = _md(run)
    assert "report.json is of an unfinished run: it has no final summary (its last recorded " \
           "round is 3)" in md
    assert _verify(run) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert out.startswith("PASS — ")
    assert "report.json is of an unfinished run (it has no final summary)." in out


def _erase(obj, cid: str):
    """``obj`` (report.json's content) with every mention of ``cid`` taken out."""
    if isinstance(obj, dict):
        return {k: _erase(v, cid) for k, v in obj.items() if k != cid}
    if isinstance(obj, list):
        return [_erase(v, cid) for v in obj if v != cid]
    return obj


def test_a_hospital_left_out_of_ledger_and_report_fails_its_lost_replies_count(
        run, capsys) -> None:
    """The server writes both the ledger and report.json: a hospital it leaves out of
    both would leave the audit's epsilon without it. A roster member with no record
    fails the audit, named; its own copy (with the same server files) shows the
    missing entries: a missing event while the report names it nowhere, and, where
    the report records it as failed in each of their rounds (replies the server never
    received), entries the audit notes and counts: its ε is its own copy's."""
    _rewrite(run / "out" / "ledger.jsonl",
             lambda lines: [x for x in lines if json.loads(x)["client_id"] != "hospital-1"])
    report = run / "out" / "report.json"
    report.write_text(json.dumps(_erase(json.loads(report.read_text()), "hospital-1")))
    assert "hospital-1" not in report.read_text()
    assert _verify(run, copies=False) == 1
    out = " ".join(capsys.readouterr().out.split())
    assert "hospital-1 is in the roster but has no entry in the server's ledger" in out
    # Naming it in the report as a hospital that did not answer covers nothing.
    doc = json.loads(report.read_text())
    for row in doc["rounds"]:
        row.setdefault("failed", {})["hospital-1"] = "did not answer"
    report.write_text(json.dumps(doc))
    assert _verify(run, copies=False) == 1
    out = " ".join(capsys.readouterr().out.split())
    assert "hospital-1 is in the roster but has no entry in the server's ledger" in out
    _verify(run)
    md = " ".join(_md(run).split())
    own = privacy_dir(run / "hospitals" / "hospital-1", dataset_source(TASK)) / LEDGER_FILE
    spent = recompute_epsilons(read_ledger(own), 1e-3)[-1]
    for r in (1, 2, 3):
        assert (f"entry seq {r} (round {r}) is in hospital-1's own copy only: the server "
                "never received it; report.json records hospital-1 as failed in round "
                f"{r} (did not answer): it trained, and its reply did not reach the "
                "server") in md
    row = next(x for x in _md(run).splitlines() if x.startswith("| hospital-1 |"))
    assert f"{spent:.4f} (own copy {spent:.4f}" in row
    report.write_text(json.dumps(_erase(json.loads(report.read_text()), "hospital-1")))
    assert _verify(run) == 1
    out = " ".join(capsys.readouterr().out.split())
    assert "is in hospital-1's copy but missing from the server's" in out


def test_a_wrong_roster_key_fails(run, capsys) -> None:
    doc = json.loads((run / "roster.json").read_text())
    doc["members"][1]["public_key"] = SigningKey.generate().public_bytes().hex()
    (run / "roster.json").write_text(json.dumps(doc))
    assert _verify(run) == 1
    out = " ".join(capsys.readouterr().out.split())
    assert "hospital-1's ledger fails verification: entry 1" in out
    assert "signature does not verify" in out and "hospital-0:" not in out


def _audit(tmp_path, **kwargs):
    """``verify_federation`` of a hand-built ledger, given as the hospital's own copy
    too: that copy is the length reference every audited chain needs."""
    return verify_federation(tmp_path / "ledger.jsonl", tmp_path / "roster.json",
                             hospital_copies={"hospital-0": tmp_path / "ledger.jsonl"},
                             **kwargs)


def test_an_under_reported_epsilon_signed_by_the_hospital_itself_fails(tmp_path) -> None:
    """Signatures prove who wrote an entry, not that it is true: the recomputation
    catches a hospital (or its compromised software) signing a low epsilon."""
    key = SigningKey.generate()
    chain: tuple[LedgerEntry, ...] = ()
    events = []
    for r in (1, 2):
        events.append(DpSgdEvent(1.0, 0.05, 40, 1.0, 1e-5, round=r, client_id="hospital-0"))
        eps = epsilon_of(events, 1e-5, "pld", pld_discretization=1e-3)
        chain = append_entry(chain, events[-1], epsilon=eps * (0.7 if r == 2 else 1.0),
                             delta=1e-5, accountant="pld", federation_id=FED,
                             client_id="hospital-0", signing_key=key)
    write_ledger(tmp_path / "ledger.jsonl", chain)
    write_roster(tmp_path / "roster.json", Roster(FED, {1: key.public_bytes()}, {1: "hospital-0"}))
    result = _audit(tmp_path, pld_discretization=1e-3)
    assert not result.passed and result.hospitals["hospital-0"].chain_ok
    (finding,) = result.failures
    assert finding.topic == "epsilon" and "entry 2 (round 2)" in finding.message
    assert "under-reported by 30.00%" in finding.message


def _hand_built(tmp_path, accountant: str, factor: float, sigma: float = 1.0):
    key = SigningKey.generate()
    event = DpSgdEvent(sigma, 0.05, 40, 1.0, 1e-5, round=1, client_id="hospital-0")
    eps = epsilon_of([event], 1e-5, "pld", pld_discretization=1e-3)
    chain = append_entry((), event, epsilon=eps * factor, delta=1e-5, accountant=accountant,
                         federation_id=FED, client_id="hospital-0", signing_key=key)
    write_ledger(tmp_path / "ledger.jsonl", chain)
    write_roster(tmp_path / "roster.json", Roster(FED, {1: key.public_bytes()}, {1: "hospital-0"}))
    return eps


def test_an_rdp_over_report_is_a_note_but_a_prv_one_fails(tmp_path) -> None:
    _hand_built(tmp_path, "rdp", 1.2)
    result = _audit(tmp_path, pld_discretization=1e-3)
    assert result.passed and [f.severity for f in result.findings] == [NOTE]
    _hand_built(tmp_path, "prv", 1.2)
    result = _audit(tmp_path, pld_discretization=1e-3)
    assert [f.severity for f in result.findings] == [FAIL] and "over-reported" in \
        result.findings[0].message


def test_a_passed_budget_fails(tmp_path) -> None:
    eps = _hand_built(tmp_path, "pld", 1.0)
    ok = _audit(tmp_path, budget=eps * 1.05, pld_discretization=1e-3)
    assert ok.passed
    over = _audit(tmp_path, budget=eps * 0.9, pld_discretization=1e-3)
    assert [f.topic for f in over.failures] == ["budget"]


def _signed_chain(tmp_path, events, reported) -> None:
    key = SigningKey.generate()
    chain: tuple[LedgerEntry, ...] = ()
    for event, eps in zip(events, reported, strict=True):
        chain = append_entry(chain, event, epsilon=eps, delta=1e-5, accountant="prv",
                             federation_id=FED, client_id="hospital-0", signing_key=key)
    write_ledger(tmp_path / "ledger.jsonl", chain)
    write_roster(tmp_path / "roster.json", Roster(FED, {1: key.public_bytes()}, {1: "hospital-0"}))


def test_a_report_within_the_gap_agrees_and_the_budget_holds_it_to_the_events(
        tmp_path) -> None:
    """A hospital's accountant reports 0.4% low (within PRV's designed gap to PLD):
    the report agrees, and a budget the recorded events pass by more than that gap
    fails. Reporting 1% low is an under-report itself, whatever the budget, so no
    figure within the tolerance can hide a budget the events pass."""
    event = DpSgdEvent(1.0, 0.05, 40, 1.0, 1e-5, round=1, client_id="hospital-0")
    eps = epsilon_of([event], 1e-5, "pld")
    _signed_chain(tmp_path, [event], [eps * 0.996])
    result = _audit(tmp_path, budget=eps * 0.994)
    assert [f.topic for f in result.failures] == ["budget"]
    assert _audit(tmp_path, budget=eps * 0.999).passed
    _signed_chain(tmp_path, [event], [eps * 0.99])
    assert [f.topic for f in _audit(tmp_path, budget=eps * 1.1).failures] == ["epsilon"]


def test_a_coarse_grid_past_the_budget_is_checked_again_at_the_reference_grid(
        tmp_path, monkeypatch) -> None:
    """A coarser PLD grid is more pessimistic: where it puts a hospital past the budget,
    the audit recomputes at 1e-4 before it fails the budget (here the coarse grid is
    made 2% pessimistic, the reference grid is exact)."""
    import bract.audit.verify as verify

    event = DpSgdEvent(1.0, 0.05, 40, 1.0, 1e-5, round=1, client_id="hospital-0")
    eps = epsilon_of([event], 1e-5, "pld")
    _signed_chain(tmp_path, [event], [eps])
    exact = verify.recompute_epsilons

    def pessimistic(entries, discretization=verify.PLD_DISCRETIZATION, on_entry=None):
        out = exact(entries, verify.PLD_DISCRETIZATION, on_entry)
        return out if discretization == verify.PLD_DISCRETIZATION else [e * 1.02 for e in out]

    monkeypatch.setattr(verify, "recompute_epsilons", pessimistic)
    near = _audit(tmp_path, budget=eps * 1.001, pld_discretization=1e-3)
    assert near.passed, [f.message for f in near.findings]
    past = _audit(tmp_path, budget=eps * 0.99, pld_discretization=1e-3)
    assert "budget" in [f.topic for f in past.failures]
    # The same for an under-report: the coarse grid's 2% gap is confirmed away at 1e-4
    # (above: the honest figure passed), a figure 1% under the exact one still fails.
    _signed_chain(tmp_path, [event], [eps * 0.99])
    low = _audit(tmp_path, budget=eps * 1.1, pld_discretization=1e-3)
    assert [f.topic for f in low.failures] == ["epsilon"]
    assert "under-reported by 1.00%" in low.failures[0].message


def test_a_ledger_that_mixes_privacy_units_fails(tmp_path) -> None:
    """Record-level events then patient-level ones on one hospital's ledger (each entry
    honestly signed): no epsilon holds for both units, so the audit fails naming it."""
    events = [DpSgdEvent(1.0, 0.05, 40, 1.0, 1e-5, round=1, client_id="hospital-0"),
              DpSgdEvent(1.0, 0.05, 40, 1.0, 1e-5, round=2, client_id="hospital-0",
                         unit="patient")]
    reported = [epsilon_of(events[:1], 1e-5, "pld"),
                epsilon_of([events[0], events[0]], 1e-5, "pld")]
    _signed_chain(tmp_path, events, reported)
    result = _audit(tmp_path)
    assert [f.topic for f in result.failures] == ["unit"]
    assert "mixes privacy units (patient, record)" in result.failures[0].message


def test_entries_from_before_units_then_stated_ones_pass_with_a_note(tmp_path) -> None:
    """Entries written before events recorded their unit, then record-level ones: the
    ledger cannot show the earlier ones' unit (the hospital states it), so the audit
    notes it and passes."""
    events = [DpSgdEvent(1.0, 0.05, 40, 1.0, 1e-5, round=1, client_id="hospital-0",
                         unit="unstated"),
              DpSgdEvent(1.0, 0.05, 40, 1.0, 1e-5, round=2, client_id="hospital-0")]
    reported = [epsilon_of(events[:1], 1e-5, "pld"), epsilon_of(events, 1e-5, "pld")]
    _signed_chain(tmp_path, events, reported)
    result = _audit(tmp_path)
    assert result.passed
    assert [(f.severity, f.topic) for f in result.findings] == [(NOTE, "unit")]
    assert "1 of hospital-0's entries were written before" in result.findings[0].message


def test_a_non_private_ledger_fails_with_or_without_a_budget_naming_the_hospital(
        tmp_path, capsys) -> None:
    """Steps without noise (σ = 0) give ε = ∞: the audit fails, naming the hospital and
    the entry, whether a budget was given or not (none was given: the verdict must not
    be PASS for a run that protects nothing)."""
    from bract.audit.report import verdict_line

    _hand_built(tmp_path, "prv", math.inf, sigma=0.0)
    for budget in (8.0, None):
        result = _audit(tmp_path, budget=budget, pld_discretization=1e-3)
        (h,) = result.hospitals.values()
        assert h.final_recomputed == math.inf and h.final_reported == math.inf
        (finding,) = result.failures
        assert finding.topic == "non-private" and finding.hospital == "hospital-0"
        assert "ε=∞ from entry 1 (round 1)" in finding.message
        assert "added no noise (σ = 0): NON-PRIVATE" in finding.message
        assert ("no budget holds (budget 8)" in finding.message) == (budget is not None)
        line = verdict_line(result)
        assert line.startswith("FAIL") and "NON-PRIVATE (ε = ∞): hospital-0" in line
    ledger = str(tmp_path / "ledger.jsonl")
    assert main(["audit", "verify", ledger, "--roster", str(tmp_path / "roster.json"),
                 "--hospital-copy", f"hospital-0={ledger}", "--out", str(tmp_path / "a"),
                 *FAST]) == 1
    out = " ".join(capsys.readouterr().out.split())
    assert "PASS" not in out and "NON-PRIVATE" in out and "hospital-0" in out


@pytest.mark.parametrize(
    ("sigma", "q", "topic", "needle"),
    [(1e-170, 0.05, "non-private", "σ=1e-170 is too small for any finite bound"),
     (1e-300, 0.05, "non-private", "σ=1e-300 is too small for any finite bound"),
     (0.65, 1e-320, "epsilon", "entry 1 (round 1) records an event dp_accounting cannot "
                               "account"),
     (1e-100, 0.05, "epsilon", "dp_accounting's RDP bound")],
)
def test_an_event_no_accountant_can_bound_fails_naming_the_entry(
        tmp_path, sigma, q, topic, needle) -> None:
    """Entries signed by the hospital itself claiming almost no noise (a square that
    underflows: ε = ∞), or a subnormal sample rate dp_accounting refuses (no figure at
    all): the audit fails, naming the entry, and never raises."""
    key = SigningKey.generate()
    event = DpSgdEvent(sigma, q, 20, 1.0, 1e-5, round=1, client_id="hospital-0")
    chain = append_entry((), event, epsilon=1.0, delta=1e-5, accountant="prv",
                         federation_id=FED, client_id="hospital-0", signing_key=key)
    write_ledger(tmp_path / "ledger.jsonl", chain)
    write_roster(tmp_path / "roster.json", Roster(FED, {1: key.public_bytes()}, {1: "hospital-0"}))
    result = _audit(tmp_path, pld_discretization=1e-3)
    assert not result.passed and result.hospitals["hospital-0"].chain_ok
    assert any(f.topic == topic and needle in f.message and f.hospital == "hospital-0"
               for f in result.failures), [f.message for f in result.failures]


def test_a_forged_event_with_a_tiny_sample_rate_and_noise_stays_in_bounded_memory() -> None:
    """σ = 0.01 with q = 1e-300: RDP puts it far below the cap, and its exact PLD grid
    at 1e-4 would hold 5e7 points (hours, gigabytes). The recomputation moves to the
    coarser grid that fits ``MAX_PLD_POINTS`` and gives a finite upper bound, within 2 GB
    of address space."""
    import subprocess
    import sys

    script = ("import resource, math\n"
              "resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))\n"
              "from bract.audit.verify import recompute_epsilons\n"
              "from bract.privacy import DpSgdEvent\n"
              "from bract.records.ledger import LedgerEntry\n"
              "ev = DpSgdEvent(0.01, 1e-300, 1, 1.0, 1e-5, round=1, client_id='h')\n"
              "(eps,) = recompute_epsilons([LedgerEntry('f', 'h', 1, 1, ev, 0.0, 1e-5, 'prv', "
              "'0' * 64)], 1e-4)\n"
              "assert math.isfinite(eps) and eps >= 0, eps\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


HOSTILE_KEY = SigningKey.generate()
NUMERIC_FIELDS = ("seq", "round", "epsilon", "delta", "event.noise_multiplier",
                  "event.sample_rate", "event.steps", "event.max_grad_norm", "event.delta",
                  "event.round")


def _hostile_line(path: str, value) -> str:
    """A one-entry ledger line of hospital-0 with ``value`` at ``path``: signed by the
    hospital's own key where the line still parses (a hostile hospital), as written
    (NaN, Infinity and all) where it does not."""
    import dataclasses

    event = DpSgdEvent(1.0, 0.05, 40, 1.0, 1e-5, round=1, client_id="hospital-0")
    (entry,) = append_entry((), event, epsilon=1.6, delta=1e-5, accountant="prv",
                            federation_id=FED, client_id="hospital-0",
                            signing_key=HOSTILE_KEY)
    plain = entry.to_plain()
    where = plain
    *parents, last = path.split(".")
    for key in parents:
        where = where[key]
    where[last] = value
    try:
        edited = LedgerEntry.from_plain(plain)
    except ValueError:
        return json.dumps(plain)
    signature = HOSTILE_KEY.sign(edited.signing_bytes()).hex()
    return dataclasses.replace(edited, signature=signature).to_line()


@settings(max_examples=80, deadline=None)
@given(path=st.sampled_from(NUMERIC_FIELDS),
       value=st.one_of(st.floats(allow_nan=True, allow_infinity=True, allow_subnormal=True),
                       st.integers(-(2**64), 2**64)))
def test_any_number_in_any_ledger_field_gets_a_verdict_never_a_traceback(path, value) -> None:
    """Whatever float (subnormal, infinite, NaN, negative, huge) or integer a hostile
    hospital puts in any numeric field of its signed entry, ``bract audit verify`` ends
    with exit code 0, 1 or 2 and no exception; exit 2 prints one ``error:`` line, and
    0 only where the recomputation confirmed the entry."""
    import contextlib
    import io
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ledger = root / "ledger.jsonl"
        ledger.write_text(_hostile_line(path, value) + "\n")
        write_roster(root / "roster.json",
                     Roster(FED, {1: HOSTILE_KEY.public_bytes()}, {1: "hospital-0"}))
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            code = main(["audit", "verify", str(ledger), "--roster", str(root / "roster.json"),
                         "--hospital-copy", f"hospital-0={ledger}", "--out",
                         str(root / "audit"), *FAST])
    out = buffer.getvalue()
    assert code in (0, 1, 2), out
    assert "Traceback" not in out
    if code == 2:
        (line,) = [x for x in out.splitlines() if x.strip()][:1]
        assert line.startswith("error: ") and "ledger.jsonl:1:" in out
    if code == 0:
        assert out.lstrip().startswith("PASS — ")


def test_hostile_names_in_a_ledger_are_printed_as_text(tmp_path, capsys) -> None:
    """A client id or field holding console markup (``[/red]``) is printed literally in
    every finding and error line, never interpreted (which would raise)."""
    event = DpSgdEvent(1.0, 0.05, 40, 1.0, 1e-5, round=1, client_id="[/red]h[bold]")
    chain = append_entry((), event, epsilon=1.6, delta=1e-5, accountant="prv",
                         federation_id=FED, client_id="[/red]h[bold]",
                         signing_key=HOSTILE_KEY)
    write_ledger(tmp_path / "ledger.jsonl", chain)
    write_roster(tmp_path / "roster.json",
                 Roster(FED, {1: HOSTILE_KEY.public_bytes()}, {1: "hospital-0"}))
    argv = ["audit", "verify", str(tmp_path / "ledger.jsonl"), "--roster",
            str(tmp_path / "roster.json"), "--out", str(tmp_path / "a"), *FAST]
    assert main(argv) == 1
    out = capsys.readouterr().out
    assert "[/red]h[bold] is not in the roster" in out
    (tmp_path / "ledger.jsonl").write_text(json.dumps({**chain[0].to_plain(),
                                                       "format": "[/bold]"}) + "\n")
    assert main(argv) == 2
    assert "ledger entry format '[/bold]'" in capsys.readouterr().out


def test_an_unusable_out_is_refused_before_any_epsilon_is_recomputed(
        run, tmp_path, capsys, monkeypatch) -> None:
    """``--out`` naming an existing file (or a place that cannot be written) is refused
    in one line, exit 2, before the slow recomputation starts."""
    import bract.audit.verify as verify

    def never(*args, **kwargs):
        raise AssertionError("an epsilon was recomputed before --out was checked")

    monkeypatch.setattr(verify, "recompute_epsilons", never)
    (tmp_path / "afile").write_text("x")
    argv = ["audit", "verify", str(run / "out" / "ledger.jsonl"), "--roster",
            str(run / "roster.json")]
    assert main([*argv, "--out", str(tmp_path / "afile")]) == 2
    out = " ".join(capsys.readouterr().out.split())
    assert out.startswith("error: --out") and "is an existing file" in out
    assert main([*argv, "--out", str(tmp_path / "afile" / "sub")]) == 2
    assert "cannot be written" in " ".join(capsys.readouterr().out.split())


def test_a_hospital_copy_that_differs_is_named_line_by_line(run, capsys) -> None:
    own = privacy_dir(run / "hospitals" / "hospital-1", dataset_source(TASK)) / LEDGER_FILE
    chain = read_ledger(own)
    key_file = SigningKey.generate()  # a copy re-signed by someone else
    forged = ()
    for e in chain:
        forged = append_entry(forged, e.event, epsilon=e.epsilon, delta=e.delta,
                              accountant=e.accountant, federation_id=FED, client_id=e.client_id,
                              signing_key=key_file)
    own.write_text(dumps_jsonl(forged))
    assert _verify(run) == 1
    out = " ".join(capsys.readouterr().out.split())
    assert "hospital-1's own copy fails verification" in out
    assert "hospital-1's own copy and the server's differ: entry seq 1 differs in ['signature']" \
        in out


def test_recompute_handles_no_steps_and_no_noise() -> None:
    def entry(sigma, steps, r):
        ev = DpSgdEvent(sigma, 0.1, steps, 1.0, 1e-5, round=r, client_id="h")
        return LedgerEntry(FED, "h", r, r, ev, 0.0, 1e-5, "prv", "0" * 64)

    eps = recompute_epsilons([entry(1.0, 0, 1), entry(1.0, 10, 2), entry(0.0, 5, 3),
                              entry(1.0, 10, 4)], 1e-3)
    assert eps[0] == 0.0 and 0 < eps[1] < math.inf and eps[2] == eps[3] == math.inf


sigmas = st.one_of(st.floats(0.3, 5.0), st.floats(0.001, 0.3))


def _reference_bounds(entries, discretization: float) -> list[float]:
    """Per prefix, written independently of bract: dp_accounting's RDP bound past the
    cap; below it, dp_accounting's PLD (on the given grid, or the coarser one on which
    each event's own PLD fits MAX_PLD_POINTS points; where the PLD's arithmetic gives
    an infinite epsilon for noised steps, the same at the finer grid of 1e-4 or that
    limit, and the chain going on at that grid); then, from the last entry back, the
    smaller of each bound and the next prefix's (a bound on a longer prefix bounds a
    shorter one)."""
    import dp_accounting as dpa
    from dp_accounting.pld import privacy_loss_mechanism as plm

    from bract.audit.verify import MAX_PLD_POINTS, PLD_EPSILON_CAP

    def sampled(e):
        return dpa.PoissonSampledDpEvent(e.sample_rate, dpa.GaussianDpEvent(e.noise_multiplier))

    def finest_grid(e) -> float:
        widths = []
        for adjacency in (plm.AdjacencyType.REMOVE, plm.AdjacencyType.ADD):
            b = plm.GaussianPrivacyLoss(e.noise_multiplier, sampling_prob=e.sample_rate,
                                        adjacency_type=adjacency).connect_dots_bounds()
            widths.append(b.epsilon_upper - b.epsilon_lower)
        return max(widths) / MAX_PLD_POINTS

    bounds: list[float] = []
    rdp, capped, grid, floor = dpa.rdp.RdpAccountant(), False, discretization, 0.0
    for k, entry in enumerate(entries):
        prefix = [x.event for x in entries[:k + 1] if x.event.steps]
        if not prefix:
            bounds.append(0.0)
            continue
        if entry.event.steps:
            rdp.compose(sampled(entry.event), entry.event.steps)
        capped = capped or rdp.get_epsilon(1e-5) > PLD_EPSILON_CAP
        if capped:
            bounds.append(rdp.get_epsilon(1e-5))
            continue
        if entry.event.steps:
            floor = max(floor, finest_grid(entry.event))
        for attempt in (max(grid, floor), max(min(grid, 1e-4), floor)):
            pld = dpa.pld.PLDAccountant(value_discretization_interval=attempt)
            for e in prefix:
                pld.compose(sampled(e), e.steps)
            value, grid = pld.get_epsilon(1e-5), attempt
            if math.isfinite(value):
                break
        bounds.append(value)
    for i in range(len(bounds) - 2, -1, -1):
        bounds[i] = min(bounds[i], bounds[i + 1])
    return bounds


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(sigmas, st.floats(0.001, 1.0), st.integers(0, 10**6)),
                min_size=1, max_size=4))
@example(history=[(0.025, 1.0, 1), (1.0, 0.05, 40)])  # its PLD needs a coarser grid
def test_recomputed_epsilons_are_bounded_monotone_and_capped_by_rdp(history) -> None:
    """Whatever the entries claim: epsilon never decreases along the chain; past the
    cap it is dp_accounting's RDP bound of the whole prefix (the exact PLD, which
    would need gigabytes there, is never attempted); below it, dp_accounting's PLD of
    the prefix, or of a longer prefix where that is smaller (it bounds the shorter one
    too), with the PLD computed again on a finer grid where its arithmetic fails."""
    entries = [LedgerEntry(FED, "h", r, r, DpSgdEvent(sigma, q, steps, 1.0, 1e-5, round=r,
                                                      client_id="h"), 0.0, 1e-5, "prv", "0" * 64)
               for r, (sigma, q, steps) in enumerate(history, start=1)]
    eps = recompute_epsilons(entries, 1e-3)
    assert all(0.0 <= a <= b for a, b in itertools.pairwise(eps))
    assert eps == pytest.approx(_reference_bounds(entries, 1e-3), rel=1e-9)


def test_a_pld_that_overflows_is_computed_again_and_the_chain_stays_monotone() -> None:
    """The history hypothesis found: dp_accounting's PLD at a 1e-3 grid gives ε = ∞ after
    822125 steps (its arithmetic overflows near ε = 710) and 725.23 after 18694 more.
    The audit computes that prefix again at 1e-4 and goes on there (709.71, 725.15, as
    the hospital's own accountant gives them), so an honest hospital is not told it
    reported a finite epsilon for no noise."""
    entries = [LedgerEntry(FED, "h", r, r, DpSgdEvent(2.0, 0.0703125, steps, 1.0, 1e-5,
                                                      round=r, client_id="h"),
                           0.0, 1e-5, "prv", "0" * 64)
               for r, steps in ((1, 822125), (2, 18694))]
    eps = recompute_epsilons(entries, 1e-3)
    assert eps == pytest.approx([709.7069669, 725.1485000], rel=1e-9)
    assert disagreement(711.137, eps[0], 0.01) is None  # what bract's PRV reports


@pytest.mark.parametrize(
    ("reported", "recomputed", "expected"),
    [
        (1.0, 1.0, None), (1.015, 1.0, None), (0.996, 1.0, None),
        # Below the recomputation, only PRV's designed 0.5% gap is allowed.
        (9.94, 10.0, "under-reported"), (0.985, 1.0, "under-reported"),
        # Past the cap both are RDP bounds (different implementations): a reported figure
        # past it agrees, one below it does not.
        (1035.9, 1104.2, None), (400.0, 1104.2, "RDP bound"),
        (0.97, 1.0, "under-reported"), (1.03, 1.0, "over-reported"),
        (0.0005, 0.0, None),  # tiny values: the absolute slack
        (math.inf, math.inf, None), (5.0, math.inf, "finite"), (math.inf, 5.0, "∞"),
    ],
)
def test_disagreement_within_the_stated_tolerance(reported, recomputed, expected) -> None:
    why = disagreement(reported, recomputed, 0.02)
    assert (why is None) if expected is None else (expected in why)


def test_unusable_input_exits_2_with_a_clear_error(run, tmp_path, capsys) -> None:
    roster = str(run / "roster.json")
    ledger = str(run / "out" / "ledger.jsonl")
    cases = [
        ([str(tmp_path / "nope.jsonl"), "--roster", roster], "does not exist"),
        ([ledger, "--roster", str(tmp_path / "nope.json")], "roster file"),
        ([ledger, "--roster", roster, "--report", str(tmp_path / "r.json")], "report file"),
    ]
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    cases.append(([str(tmp_path / "bad.jsonl"), "--roster", roster], "bad.jsonl:1: not JSON"))
    for argv, needle in cases:
        assert main(["audit", "verify", *argv, "--out", str(tmp_path / "a")]) == 2
        out = " ".join(capsys.readouterr().out.split())
        assert "error:" in out and needle in out and "Traceback" not in out
    for bad in (["--hospital-copy", "hospital-0"], ["--tolerance", "0.9"]):
        with pytest.raises(SystemExit) as exc:
            main(["audit", "verify", ledger, "--roster", roster, *bad])
        assert exc.value.code == 2
    assert "CLIENT=PATH" in capsys.readouterr().err


#: Numbers of report.json (other than counts and the run's configuration), as paths
#: (``*``: every round, or every hospital of a round).
REPORT_NUMBERS = ("rounds.*.epsilon", "rounds.*.delta", "rounds.*.seconds",
                  "rounds.*.per_client.*.epsilon", "rounds.*.per_client.*.noise_multiplier",
                  "rounds.*.per_client.*.sample_rate", "rounds.*.per_client.*.epsilon_carried",
                  "final.epsilon", "final.delta")
#: Counts of report.json: whole numbers from 0 to 2**53.
REPORT_COUNTS = ("rounds.*.round", "rounds.*.per_client.*.steps",
                 "rounds.*.per_client.*.ledger_entries", "rounds.*.per_client.*.ledger_carried",
                 "final.rounds_completed")
#: Fields of report.json a hostile coordinator can write.
REPORT_FIELDS = ("config.target_epsilon", "config.delta", *REPORT_NUMBERS, *REPORT_COUNTS,
                 "rounds.*.per_client.*.trained", "rounds.*.trained",
                 "rounds.*.per_client.*.ledger_head")
#: The texts report.json writes for numbers JSON has not.
NON_FINITE_TEXTS = ("inf", "-inf", "nan")


def _set_everywhere(obj, path: list[str], value) -> None:
    key, *rest = path
    targets = (list(obj.values()) if isinstance(obj, dict) else obj) if key == "*" else [obj[key]]
    if not rest:
        if key == "*":
            raise ValueError("a path ends in a field name")
        obj[key] = value
        return
    for t in targets:
        _set_everywhere(t, rest, value)


def _verify_text(federation: Path, text: str, *, lost: tuple[str, int] | None = None,
                 ) -> tuple[int, str, str]:
    """``bract audit verify`` of the fixture federation with ``text`` as its report.json
    (and both hospitals' own copies): the exit code, everything printed, and audit.md
    (empty when none was written). ``lost=(cid, r)`` leaves ``cid``'s entry of round
    ``r`` out of the server's ledger (a reply the server never received)."""
    import contextlib
    import io
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        report.write_text(text)
        ledger = federation / "out" / "ledger.jsonl"
        if lost is not None:
            kept = [e for e in read_ledger(ledger)
                    if (e.client_id, e.round) != lost]
            assert len(kept) == len(read_ledger(ledger)) - 1
            ledger = Path(tmp) / "ledger.jsonl"
            ledger.write_text("".join(e.to_line() + "\n" for e in kept))
        argv = ["audit", "verify", str(ledger), "--roster",
                str(federation / "roster.json"), "--report", str(report),
                "--out", str(Path(tmp) / "audit"), *FAST]
        for cid in ("hospital-0", "hospital-1"):
            own = privacy_dir(federation / "hospitals" / cid, dataset_source(TASK))
            argv += ["--hospital-copy", f"{cid}={own / LEDGER_FILE}"]
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            code = main(argv)
        md = Path(tmp) / "audit" / MARKDOWN
        return code, buffer.getvalue(), md.read_text() if md.exists() else ""


def _is_json_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@settings(max_examples=60, deadline=None)
@given(path=st.sampled_from(REPORT_FIELDS),
       value=st.one_of(st.floats(allow_nan=True, allow_infinity=True, allow_subnormal=True),
                       st.integers(-(2**64), 2**64), st.integers(-(10**40), 10**40),
                       st.text(max_size=8), st.booleans(), st.none(),
                       # numbers written as text: what a coercing reader would accept
                       st.floats(allow_nan=True, allow_infinity=True).map(str),
                       st.integers(-(10**6), 10**6).map(str),
                       st.lists(st.sampled_from(["hospital-0", "hospital-1", "x"]),
                                max_size=3)))
@example(path="rounds.*.round", value=10**30)
@example(path="config.target_epsilon", value=math.nan)
@example(path="config.target_epsilon", value=math.inf)
@example(path="config.target_epsilon", value="3.0")
@example(path="config.delta", value="1e-05")
@example(path="rounds.*.per_client.*.steps", value=5.5)
@example(path="rounds.*.per_client.*.steps", value="5")
@example(path="rounds.*.per_client.*.steps", value=True)
@example(path="rounds.*.per_client.*.epsilon", value="2.5")
@example(path="rounds.*.per_client.*.epsilon", value=True)
@example(path="rounds.*.per_client.*.trained", value=1)
@example(path="rounds.*.per_client.*.trained", value="true")
@example(path="rounds.*.per_client.*.trained", value=False)
@example(path="rounds.*.trained", value=["hospital-0", "hospital-0"])
@example(path="rounds.*.trained", value="hospital-0")
def test_any_value_in_any_report_field_gets_a_verdict_never_a_traceback(
        federation, path, value) -> None:
    """Property: whatever JSON value a hostile report.json holds in any field (in every
    round and every hospital's line), ``bract audit verify`` ends with exit code 0, 1
    or 2, never an exception or a traceback; 2 prints one ``error:`` line naming the
    report. Nothing is coerced: a report number (or count) given as text or as a
    boolean, a hospital's ``trained`` that is not a boolean, a round's ``trained`` that
    is not a list of distinct names, is refused with exit 2 naming the field. 0 says
    PASS and happens only when the budget it checked is a finite JSON number > 0, every
    hospital's cumulative steps are the ones the report first held, a report number is
    a JSON number (or null, or a text the writer uses for a non-finite one), and every
    hospital's ``trained`` is still true (every one trained in every round, and its
    ledger shows it)."""
    original = json.loads((federation / "out" / "report.json").read_text())
    data = json.loads(json.dumps(original))
    _set_everywhere(data, path.split("."), value)
    code, out, _ = _verify_text(federation, json.dumps(data, allow_nan=True))
    assert code in (0, 1, 2), out
    assert "Traceback" not in out
    field = path.split(".")[-1]
    flat = " ".join(out.split())  # the console wraps long lines
    if code == 2:
        lines = [x for x in out.splitlines() if x.strip()]
        assert lines[0].startswith("error: ") and "report.json" in lines[0]
    textual = isinstance(value, str) and value not in NON_FINITE_TEXTS
    if path in REPORT_NUMBERS + REPORT_COUNTS and (textual or isinstance(value, bool)):
        assert code == 2 and f"'{field}' is " in flat, out
    if path.endswith("per_client.*.trained") and not isinstance(value, bool):
        assert code == 2 and "'trained' " in flat and "not true or false" in flat, out
    if path == "rounds.*.trained" and not (isinstance(value, list) and
                                           len(set(value)) == len(value)):
        assert code == 2 and "'trained' " in flat, out
    if code == 0:
        assert out.lstrip().startswith("PASS — ")
        if path == "config.target_epsilon":
            assert (_is_json_number(value) and math.isfinite(value) and value > 0) or (
                value is None and "No budget was checked" in out), out
        if path == "config.delta":
            assert value is None or _is_json_number(value), out
        if path in REPORT_NUMBERS:
            assert value is None or _is_json_number(value) or value in NON_FINITE_TEXTS
        if path.endswith(".steps"):
            assert type(value) is int and all(
                line["steps"] == value for row in original["rounds"]
                for line in row["per_client"].values())
        if path.endswith("per_client.*.trained"):
            assert value is True


def _report_text(data: dict, *, twice: tuple[int, str] | None = None) -> str:
    """report.json's text for ``data``; ``twice=(i, cid)`` writes the line of ``cid`` in
    the ``i``-th row's ``per_client`` a second time (JSON allows the text; a reader
    keeps one of the two)."""
    if twice is None:
        return json.dumps(data)
    i, cid = twice
    table = data["rounds"][i]["per_client"]
    data = json.loads(json.dumps(data))
    data["rounds"][i]["per_client"] = "@TABLE@"
    items = [*table.items(), (cid, table[cid])]
    text = "{" + ", ".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in items) + "}"
    return json.dumps(data).replace('"@TABLE@"', text)


MUTATIONS = ("row twice", "hospital twice", "trained lists it twice", "line says not trained",
             "not averaged", "averaged but a stranger", "failed after training",
             "left out of the round")


@settings(max_examples=24, deadline=None)
@given(mutation=st.sampled_from(MUTATIONS), index=st.integers(0, 2),
       cid=st.sampled_from(["hospital-0", "hospital-1"]), where=st.integers(0, 3))
@example(mutation="row twice", index=0, cid="hospital-0", where=0)
@example(mutation="hospital twice", index=1, cid="hospital-1", where=1)
@example(mutation="trained lists it twice", index=2, cid="hospital-0", where=2)
@example(mutation="line says not trained", index=0, cid="hospital-1", where=3)
@example(mutation="not averaged", index=1, cid="hospital-0", where=0)
@example(mutation="averaged but a stranger", index=2, cid="hospital-1", where=1)
@example(mutation="failed after training", index=0, cid="hospital-0", where=2)
@example(mutation="left out of the round", index=1, cid="hospital-1", where=3)
def test_a_reports_account_of_rounds_and_who_trained_is_checked_against_the_ledger(
        federation, mutation, index, cid, where) -> None:
    """Property: report.json's rows and its account of who trained, edited in any round
    for any hospital, get exactly the verdict the ledger calls for, one line or a
    finding naming the round, never a traceback. A round given two rows, a hospital
    given two lines in a round (the same key twice in ``per_client``) or listed twice
    in a round's ``trained`` is unusable input (exit 2). A line saying the hospital did
    not train in a round its ledger has an entry for, a round averaging a hospital it
    has no line for, or one leaving out a hospital its ledger shows training there,
    fail (exit 1). A hospital that trained but was not averaged, or that the round
    records as failed after training (a dropout), is consistent with the ledger: PASS,
    the dropout noted."""
    original = json.loads((federation / "out" / "report.json").read_text())
    data = json.loads(json.dumps(original))
    row = data["rounds"][index]
    r = row["round"]
    twice = None
    if mutation == "row twice":
        data["rounds"].insert(min(where, 3), json.loads(json.dumps(row)))
    elif mutation == "hospital twice":
        twice = (index, cid)
    elif mutation == "trained lists it twice":
        row["trained"].append(cid)
    elif mutation == "line says not trained":
        row["per_client"][cid]["trained"] = False
        row["trained"].remove(cid)
    elif mutation == "not averaged":
        row["trained"].remove(cid)
    elif mutation == "averaged but a stranger":
        row["trained"].append("hospital-9")
    elif mutation == "failed after training":
        row["trained"].remove(cid)
        row["failed"][cid] = "dropped at unmasking"
    elif mutation == "left out of the round":
        del row["per_client"][cid]
        row["trained"].remove(cid)
    code, out, md = _verify_text(federation, _report_text(data, twice=twice))
    assert "Traceback" not in out
    flat = " ".join(out.split())
    if mutation in ("row twice", "hospital twice", "trained lists it twice"):
        assert code == 2 and flat.startswith("error: ") and f"round {r}" in flat, out
        assert "FAIL" not in flat and "PASS" not in flat  # one error, nothing after it
        assert {"row twice": f"round {r} has two rows",
                "hospital twice": f"{cid!r} appears twice in round {r}'s 'per_client'",
                "trained lists it twice": f"round {r}: 'trained' lists \"{cid}\" twice",
                }[mutation] in flat, out
    elif mutation == "line says not trained":
        assert code == 1 and f"report.json round {r} says {cid} did not train" in flat, out
        assert f"but its ledger has 1 entry for round {r}: it trained there" in flat, out
    elif mutation == "averaged but a stranger":
        assert code == 1 and (f"report.json round {r} lists hospital-9 among the hospitals "
                              "it averaged, but has no line for hospital-9") in flat, out
    elif mutation == "left out of the round":
        assert code == 1 and (f"{cid}'s ledger has an entry for round {r}, but report.json's "
                              f"round {r} does not mention {cid}") in flat, out
    else:
        assert code == 0 and out.lstrip().startswith("PASS — "), out
        dropout = (f"{cid}'s ledger has an entry for round {r}, in which report.json records "
                   "it as failed (dropped at unmasking)")
        assert (dropout in " ".join(md.split())) == (mutation == "failed after training")


@pytest.mark.parametrize("target", [math.nan, math.inf, -1.0, 0, "many"])
def test_a_report_target_that_is_no_budget_fails_naming_it(run, capsys, target) -> None:
    """A target_epsilon in report.json that is not a finite number > 0 checks nothing:
    the audit fails naming it (never "within the budget of nan"), and says to give
    --budget; with --budget the report's target is not used and the audit passes."""
    report = run / "out" / "report.json"
    data = json.loads(report.read_text())
    data["config"]["target_epsilon"] = target
    report.write_text(json.dumps(data, allow_nan=True))
    assert _verify(run) == 1
    out = " ".join(capsys.readouterr().out.split())
    assert out.startswith("FAIL — ") and "within the budget" not in out
    assert "report.json's target_epsilon is" in out and "not a finite number > 0" in out
    assert "give --budget" in out
    assert _verify(run, "--budget", "3") == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "within the budget of 3 (given with --budget)" in out


def test_the_verdict_says_where_the_budget_came_from(run, capsys) -> None:
    """A PASS names the budget checked and its source: report.json's target_epsilon is
    the coordinator's claim (the verdict says so and points to --budget), --budget the
    officer's own; the report's method section says the same."""
    assert _verify(run) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert ("Every epsilon is within the budget of 3 (report.json's target_epsilon: the "
            "coordinator's claim, not the hospitals' policies; give --budget to check "
            "against those).") in out
    assert "Budget: 3, report.json's target_epsilon" in _md(run)
    assert _verify(run, "--budget", "4") == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "Every epsilon is within the budget of 4 (given with --budget)." in out
    assert "Budget: 4, given with --budget" in _md(run)


def test_a_budget_that_is_not_finite_and_positive_is_refused_by_the_api(run) -> None:
    from bract.audit.verify import AuditInputError

    for budget in (math.nan, math.inf, 0.0, -2.0):
        with pytest.raises(AuditInputError, match="finite number > 0"):
            verify_federation(run / "out" / "ledger.jsonl", run / "roster.json",
                              budget=budget, pld_discretization=1e-3)


def test_a_plot_that_cannot_be_drawn_leaves_the_verdict_and_the_reports(
        run, capsys, monkeypatch) -> None:
    """Whatever the plotting library does with the figures (it raised on a round of
    10**30), the verdict stands: the exit code is the verdict's, audit.md and
    audit.html are written and say the plot could not be drawn and why, no partial
    PNG is left, and nothing prints a traceback."""
    import bract.audit.report as audit_report

    def broken(result, path):
        path.write_bytes(b"partial")
        raise TypeError("loop of ufunc does not support argument 0")

    monkeypatch.setattr(audit_report, "plot_epsilon", broken)
    assert _verify(run) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert out.startswith("PASS — ") and "Traceback" not in out
    assert "the plot could not be drawn (TypeError: loop of ufunc" in out
    md = _md(run)
    assert "The plot could not be drawn: TypeError" in md and f"]({PLOT})" not in md
    html = (run / "audit" / HTML).read_text()
    assert "The plot could not be drawn" in html and f"src='{PLOT}'" not in html
    assert not (run / "audit" / PLOT).exists()


def test_a_hospitals_own_copy_longer_than_the_servers_chain_gives_its_final_epsilon(
        run, capsys) -> None:
    """When the server's ledger lost one of a hospital's entries and the hospital's own
    (verifying) copy is given, the table's final recomputed epsilon is the larger, the
    own copy's (what the hospital spent), with the server chain's beside it; a budget
    the own copy passes fails, though the server's shorter chain is within it."""
    full = verify_federation(run / "out" / "ledger.jsonl", run / "roster.json",
                             pld_discretization=1e-3)
    spent = full.hospitals["hospital-1"].final_recomputed
    assert spent is not None
    lines = (run / "out" / "ledger.jsonl").read_text().splitlines()
    cut = next(i for i, x in enumerate(lines)
               if json.loads(x)["client_id"] == "hospital-1" and json.loads(x)["seq"] == 2)
    _rewrite(run / "out" / "ledger.jsonl", lambda ls: ls[:cut] + ls[cut + 1:])
    assert _verify(run) == 1
    capsys.readouterr()
    row = next(x for x in _md(run).splitlines() if x.startswith("| hospital-1 |"))
    server = recompute_epsilons(
        [e for e in read_ledger(run / "out" / "ledger.jsonl") if e.client_id == "hospital-1"],
        1e-3)[-1]
    assert server < spent * 0.95  # one event fewer
    assert (f"| {spent:.4f} (own copy {spent:.4f}; server's ledger {server:.4f}) |") in row
    budget = (server + spent) / 2
    assert _verify(run, "--budget", f"{budget:.4f}") == 1
    out = " ".join(capsys.readouterr().out.split())
    assert f"hospital-1's own copy reaches ε={spent:.4f}, past the budget of {budget:.4g}" in out


@pytest.mark.parametrize("headline", [0.5, -1.0, 0.0])
def test_a_round_whose_headline_epsilon_understates_its_hospitals_fails(
        run, capsys, headline) -> None:
    """A round's ε in report.json (the largest a hospital had reached) below a figure
    one of its hospitals reported that round fails, naming the round."""
    report = run / "out" / "report.json"
    data = json.loads(report.read_text())
    last = data["rounds"][-1]
    assert max(v["epsilon"] for v in last["per_client"].values()) > 0.5
    last["epsilon"] = headline
    report.write_text(json.dumps(data))
    assert _verify(run) == 1
    out = " ".join(capsys.readouterr().out.split())
    assert f"report.json round {last['round']} gives ε=" in out


REPORT_CASES = ("failed after its masked input", "failed and averaged",
                "failed after input, round aborted", "aborted round, lines carried",
                "carried line says trained", "line of a later round",
                "averaged on a carried line", "carried entry relabelled",
                "unnamed node, one hospital", "unnamed node, two hospitals",
                "unnamed node, roster full", "failed, reply lost")


# Every case, round and hospital (72 audits): the whole finite space, not a sample of it.
@pytest.mark.parametrize("case", REPORT_CASES)
@pytest.mark.parametrize("index", [0, 1, 2])
@pytest.mark.parametrize("cid", ["hospital-0", "hospital-1"])
def test_what_a_round_says_of_late_failures_carried_lines_and_unnamed_nodes_is_checked(
        federation, case, index, cid) -> None:
    """Property: honest accounts of a round PASS and doctored ones FAIL, whichever round
    and hospital. A hospital listed both among the hospitals a secure round averaged and
    among its failed passes, noted, exactly when the completed round's record names it
    in ``failed_after_input`` (its masked input is in the sum); otherwise, or in an
    aborted round, it fails. A round that asked nobody to train, whose lines are all
    carried from the round before (``of_round``), passes; a carried line still cannot
    account for an entry of its row's round, nor stand for a hospital the round
    averaged, and a line of a later round fails. A report that calls a hospital's first
    entry carried from an earlier run (``ledger_carried``) where its chain's rounds go
    on counting fails. One unnamed failed node (``node-N``) can stand for one hospital
    the round does not name (a note saying the server's word is taken), not two, and
    not when the round already names every member of the roster. In the last round the
    server's ledger lacks such a hospital's entry (its reply was lost, and no later
    reply carried it): its own copy's extra entry is noted, and counted."""
    original = json.loads((federation / "out" / "report.json").read_text())
    data = json.loads(json.dumps(original))
    rows = data["rounds"]
    row = rows[index]
    r = row["round"]
    other = "hospital-1" if cid == "hospital-0" else "hospital-0"
    expect_pass = False
    needle = ""
    last = index == len(rows) - 1
    lost = None
    if case == "failed, reply lost":
        # It trained and its reply never arrived; a later reply carries the entry.
        del row["per_client"][cid]
        row["trained"].remove(cid)
        row["failed"][cid] = "did not answer"
        lost = (cid, r) if last else None
        expect_pass = True
        needle = (f"entry seq {r} (round {r}) is in {cid}'s own copy only" if last else
                  f"{cid}'s ledger has an entry for round {r}, in which report.json records "
                  "it as failed")
    elif case == "failed after its masked input":
        row["failed"][cid] = "did not answer"
        row["secagg"] = {"aborted": None, "failed_after_input": [cid]}
        expect_pass, needle = True, f"{cid} failed in round {r} after its masked input"
    elif case == "failed and averaged":
        row["failed"][cid] = "did not answer"
        row["secagg"] = {"aborted": None, "failed_after_input": [other]}
        needle = "among the hospitals it averaged, and also as failed"
    elif case == "failed after input, round aborted":
        row["failed"][cid] = "did not answer"
        row["secagg"] = {"aborted": "too few", "failed_after_input": [cid]}
        needle = "among the hospitals it averaged, and also as failed"
    elif case == "aborted round, lines carried":
        # A round 4 that aborted before anyone trained: every line is round 3's.
        extra = json.loads(json.dumps(rows[-1]))
        extra["round"], extra["trained"], extra["failed"] = 4, [], {}
        extra["secagg"] = {"aborted": "only 2 hospitals with valid keys; need at least 3"}
        for line in extra["per_client"].values():
            line["of_round"] = 3
        rows.append(extra)
        expect_pass = True
    elif case == "carried line says trained":
        row["per_client"][cid]["of_round"] = r - 1 if r > 1 else 0
        row["trained"].remove(cid)
        needle = f"does not mention {cid} (it holds only {cid}'s line of round"
    elif case == "line of a later round":
        row["per_client"][cid]["of_round"] = r + 1
        needle = f"holds a line of {cid} from round {r + 1}, a later round"
    elif case == "averaged on a carried line":
        row["per_client"][cid]["of_round"] = r - 1 if r > 1 else 0
        needle = "hospitals it averaged, but its line there is of round"
    elif case == "carried entry relabelled":
        for line in (x["per_client"][cid] for x in rows):
            line["ledger_carried"] = 1
        rows[0]["per_client"][cid]["trained"] = False
        rows[0]["trained"].remove(cid)
        needle = f"{cid}'s first 1 entry was spent before this run (ledger_carried)"
    elif case.startswith("unnamed node"):
        del row["per_client"][cid]
        row["trained"].remove(cid)
        row["failed"]["node-999"] = "did not answer"
        lost = (cid, r) if last else None
        if case == "unnamed node, one hospital":
            expect_pass, needle = True, ("which hospital that node was is the server's word"
                                         if last else
                                         "Which hospital that node was is the server's word")
        elif case == "unnamed node, two hospitals":
            del row["per_client"][other]
            row["trained"].remove(other)
            needle = "records 1 unnamed failed node(s) (node-999) but does not name 2"
        else:
            row["failed"][cid] = "did not answer"
            needle = "more hospitals than the roster holds"
    code, out, md = _verify_text(federation, _report_text(data), lost=lost)
    assert "Traceback" not in out
    flat = " ".join(md.split())
    assert code == (0 if expect_pass else 1), (case, out)
    assert needle in flat, (case, flat[:3000])


# ---------------------------------------------------------------------------
# Replies the server never received: entries only a hospital's own copy holds.

def _sign(federation: Path, chain: list, cid: str, rnd: int, *,
          epsilon: float | None = None, fed: str = FED, **changes) -> list:
    """``chain`` with one more entry, signed with ``cid``'s key as its hospital would:
    the event of its round-``rnd`` entry in the fixture run (its last for a later
    round), for round ``rnd``, with ``changes``
    (``noise_multiplier``, ``delta``, ``unit``, ``steps``); its ε the recomputation
    unless ``epsilon`` is given."""
    import dataclasses

    key = bytes.fromhex(json.loads((federation / "keys.json").read_text())[cid])
    fixture = _own(federation, cid)
    base = next((e for e in fixture if e.round == rnd), fixture[-1])
    event = dataclasses.replace(base.event, round=rnd, **changes)

    def signed(eps: float) -> list:
        return list(append_entry(chain, event, epsilon=eps, delta=event.delta,
                                 accountant=base.accountant, federation_id=fed,
                                 client_id=cid, signing_key=key))

    if epsilon is None:
        epsilon = recompute_epsilons(signed(0.0), 1e-3)[-1]
    return signed(epsilon)


def _lose(doc: dict, cid: str, rounds) -> dict:
    """report.json as the honest server writes it when ``cid``'s replies of ``rounds``
    never arrived: its earlier line carried forward, failed ("did not answer"), not
    averaged, and every headline ε the largest of the lines it holds."""
    rows = doc["rounds"]
    for i, row in enumerate(rows):
        if row["round"] not in rounds:
            continue
        earlier = rows[i - 1]["per_client"].get(cid) if i else None
        row["per_client"].pop(cid, None)
        if earlier is not None:
            row["per_client"][cid] = dict(earlier)
        if cid in row["trained"]:
            row["trained"].remove(cid)
        row["failed"][cid] = "did not answer"
        row["epsilon"] = max((v["epsilon"] for v in row["per_client"].values()), default=0.0)
    doc["final"]["epsilon"] = rows[-1]["epsilon"]
    return doc


def _audit_files(federation: Path, tmp: Path, chains: dict, doc: dict, copies: dict):
    """``verify_federation`` over these server chains, report and own copies."""
    (tmp / "ledger.jsonl").write_text("".join(
        e.to_line() + "\n" for cid in sorted(chains) for e in chains[cid]))
    (tmp / "report.json").write_text(json.dumps(doc))
    paths = {}
    for cid, entries in copies.items():
        paths[cid] = tmp / f"{cid}.jsonl"
        paths[cid].write_text("".join(e.to_line() + "\n" for e in entries))
    return verify_federation(tmp / "ledger.jsonl", federation / "roster.json",
                             report_path=tmp / "report.json", hospital_copies=paths,
                             pld_discretization=1e-3)


def _own(federation: Path, cid: str) -> list:
    return read_ledger(privacy_dir(federation / "hospitals" / cid, dataset_source(TASK))
                       / LEDGER_FILE)


HOSTILE_ENTRIES = {
    "no noise": ({"noise_multiplier": 0.0, "epsilon": math.inf}, "non-private"),
    "another delta": ({"delta": 1e-2}, "delta"),
    "patient-level": ({"unit": "patient"}, "unit"),
    "epsilon under-reported": ({"epsilon": 1.0}, "epsilon"),
}


@pytest.mark.parametrize("kind", sorted(HOSTILE_ENTRIES))
@pytest.mark.parametrize("received", [True, False])
def test_an_entry_the_server_never_received_meets_every_check_a_received_one_does(
        federation, tmp_path, kind, received) -> None:
    """Property over what an entry may hide: an entry that fails a check on the
    server's chain (no noise, another δ, another privacy unit, an under-reported ε)
    fails the same check when it is in the hospital's own copy only, the server
    having recorded that reply as lost; the note that counts a lost reply never
    launders it."""
    kw, topic = HOSTILE_ENTRIES[kind]
    chains = {c: _own(federation, c) for c in ("hospital-0", "hospital-1")}
    full = _sign(federation, chains["hospital-1"][:2], "hospital-1", 3, **kw)
    doc = json.loads((federation / "out" / "report.json").read_text())
    if received:
        chains["hospital-1"] = full
    else:
        chains["hospital-1"] = full[:2]
        doc = _lose(doc, "hospital-1", {3})
    result = _audit_files(federation, tmp_path, chains, doc,
                          {"hospital-0": _own(federation, "hospital-0"), "hospital-1": full})
    assert not result.passed
    assert topic in {f.topic for f in result.failures if f.hospital == "hospital-1"}


@pytest.mark.parametrize("lost", [{3}, {2, 3}, {1, 2, 3}])
@pytest.mark.parametrize("carried", [0, 1])
@pytest.mark.parametrize("both", [False, True])
def test_replies_the_server_never_received_pass_noted_and_counted(
        federation, tmp_path, lost, carried, both) -> None:
    """An honest run whose last replies (of one hospital or both) never reached the
    server, however many rounds, with or without an entry carried in from another
    federation: the audit passes; each entry the server lacks is noted; the hospital's
    ε is its own copy's; and the verdict line names the hospitals whose copies go
    beyond the server's record. (A run of which no reply reached the server at all
    leaves an empty ledger, and fails as such.)"""
    doc = json.loads((federation / "out" / "report.json").read_text())
    chains, copies = {}, {}
    names = ("hospital-0", "hospital-1") if both else ("hospital-1",)
    for cid in ("hospital-0", "hospital-1"):
        own = _own(federation, cid)
        if cid in names:
            if carried:
                own = _sign(federation, [], cid, 1, fed="fed-old", noise_multiplier=30.0,
                            steps=1)
                for r in (1, 2, 3):
                    own = _sign(federation, own, cid, r)
            doc = _lose(doc, cid, lost)
            chains[cid] = own[:carried + 3 - len(lost)] if len(lost) < 3 else []
        else:
            chains[cid] = own
        copies[cid] = own
    for row in doc["rounds"]:  # what the server recorded of the entries it held
        for cid in names:
            line = row["per_client"].get(cid)
            if line is not None:
                line["ledger_carried"] = carried
                line["steps"] += carried  # the carried entry's one step
                line["ledger_entries"] = carried + line.get("ledger_entries", 0)
                line["ledger_head"] = chains[cid][line["ledger_entries"] - 1].hash()
    result = _audit_files(federation, tmp_path, chains, doc, copies)
    if both and len(lost) == 3:  # nothing reached the server: no run to vouch for
        assert [f.message for f in result.failures] == ["the ledger holds no entries at all"]
        return
    assert result.passed, [f.message for f in result.failures]
    notes = [f.message for f in result.findings if f.topic == "copy"]
    for cid in names:
        assert sum(m.startswith("entry seq") and f"{cid}'s own copy only" in m
                   for m in notes) == len(lost) + carried * (len(lost) == 3)
        spent = recompute_epsilons(copies[cid], 1e-3)[-1]
        assert result.hospitals[cid].final_spent == pytest.approx(spent)
    from bract.audit.report import verdict_line

    line = verdict_line(result)
    assert f"The server never received the last replies of {', '.join(names)}" in line


def test_a_hospital_the_round_averaged_needs_its_entry_on_the_server(
        federation, tmp_path) -> None:
    """A hospital a round lists among those it averaged (its masked input in the sum:
    ``failed_after_input``) sent its chain with its update: a report that averages it
    while the server's ledger has no entry of that round fails as a missing event, with
    or without its own copy, and the lost-reply note never explains it."""
    chains = {c: _own(federation, c) for c in ("hospital-0", "hospital-1")}
    own = chains["hospital-1"]
    chains["hospital-1"] = own[:2]
    doc = json.loads((federation / "out" / "report.json").read_text())
    row = doc["rounds"][-1]
    row["failed"]["hospital-1"] = "dropped from secure aggregation at the unmask stage"
    row["secagg"] = {"aborted": None, "failed_after_input": ["hospital-1"]}
    line = row["per_client"]["hospital-1"]
    line["ledger_entries"], line["ledger_head"] = 2, own[1].hash()
    for copies in ({"hospital-0": chains["hospital-0"], "hospital-1": own},
                   {"hospital-0": chains["hospital-0"]}):
        result = _audit_files(federation, tmp_path, chains, doc, copies)
        assert not result.passed
        assert any(f.topic == "missing" and "among the hospitals it averaged" in f.message
                   for f in result.failures)
        assert not any("own copy only" in f.message for f in result.findings)


@pytest.mark.parametrize(("rounds", "fed", "set_aside"), [
    ((1, 2), FED, True),          # a later run of this federation: rounds start again
    ((1,), "fed-later", True),    # a later federation
    ((3,), "fed-later", True),
    ((3,), FED, False),           # round 3 again: no visible new run (a missing event)
    ((4,), FED, False),           # a round 4 this run never had: a missing event
])
def test_a_lifetime_copy_audits_an_earlier_run_without_its_later_entries(
        federation, tmp_path, rounds, fed, set_aside) -> None:
    """A hospital's own copy is its lifetime file: auditing an earlier run with it, the
    entries of a later run (past the server's chain, where the rounds go back or the
    federation changes) are noted and left out of that run's ε and budget; an entry
    where the chain shows no new run is still a missing event."""
    chains = {c: _own(federation, c) for c in ("hospital-0", "hospital-1")}
    own = list(chains["hospital-1"])
    for r in rounds:
        own = _sign(federation, own, "hospital-1", r, fed=fed)
    doc = json.loads((federation / "out" / "report.json").read_text())
    result = _audit_files(federation, tmp_path, chains, doc,
                          {"hospital-0": chains["hospital-0"], "hospital-1": own})
    h = result.hospitals["hospital-1"]
    if set_aside:
        assert result.passed, [f.message for f in result.failures]
        assert any(f.topic == "copy" and f"after this run's, from entry seq 4 (round "
                   f"{rounds[0]}" in f.message for f in result.findings)
        assert h.final_spent == pytest.approx(recompute_epsilons(chains["hospital-1"],
                                                                 1e-3)[-1])
    else:
        assert not result.passed
        assert any("missing from the server's" in f.message for f in result.failures)
