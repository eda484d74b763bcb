"""The typed run report: every field the server writes reads back under its name;
a broken structure is refused naming the place; a broken value reads as nan, so the
audit can say which one is wrong."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bract.records.report import (
    FederatedEval,
    HospitalRound,
    ReportError,
    RoundRow,
    RunReport,
    RunSummary,
    read_report,
)
from bract.records.text import one_line

names = st.sampled_from(["hospital-0", "hospital-1", "site-a", "site-b"])
eps = st.one_of(st.floats(0, 50, allow_nan=False), st.just("inf"))


@st.composite
def reports(draw):
    rows = []
    for r in range(1, draw(st.integers(1, 5)) + 1):
        cids = draw(st.lists(names, unique=True, max_size=4))
        per_client = {cid: {
            "epsilon": draw(eps), "noise_multiplier": draw(st.floats(0.3, 5)),
            "sample_rate": draw(st.floats(0.01, 1)), "steps": draw(st.integers(0, 500)),
            "trained": draw(st.booleans()), "reason": one_line(draw(st.text(max_size=20))),
            "ledger_entries": draw(st.integers(0, 30)), "ledger_head": "ab" * 32,
            "ledger_carried": draw(st.integers(0, 10)),
        } for cid in cids}
        row = {"round": r, "epsilon": draw(eps), "delta": 1e-5, "per_client": per_client,
               "trained": sorted(c for c, v in per_client.items() if v["trained"]),
               "failed": {}, "seconds": 1.0}
        if draw(st.booleans()):
            row.update(loss=draw(st.floats(0, 5)), accuracy=draw(st.floats(0, 1)))
        if draw(st.booleans()):
            row["federated_eval"] = {"model_of_round": r - 1, "examples": draw(
                st.integers(1, 1000)), "loss": 0.5, "accuracy": 0.75}
        rows.append(row)
    return {"config": {"dataset": "synthetic", "target-epsilon": 4.0}, "rounds": rows,
            "final": {"epsilon": draw(eps), "rounds_completed": len(rows)},
            "initial": {"loss": 0.7, "accuracy": 0.5}}


def _f(x) -> float:
    return math.inf if x == "inf" else float(x)


@settings(max_examples=60, deadline=None)
@given(report=reports())
def test_every_field_the_server_writes_reads_back_under_its_name(report) -> None:
    parsed = RunReport.from_plain(json.loads(json.dumps(report)))
    assert [r.round for r in parsed.rounds] == [r["round"] for r in report["rounds"]]
    for row, raw in zip(parsed.rounds, report["rounds"], strict=True):
        assert row.epsilon == _f(raw["epsilon"])
        assert row.trained == tuple(raw["trained"])
        assert row.metrics == {k: raw[k] for k in ("loss", "accuracy") if k in raw}
        assert (row.federated_eval is not None) == ("federated_eval" in raw)
        for cid, v in raw["per_client"].items():
            h = row.per_client[cid]
            assert (h.epsilon, h.steps, h.trained, h.ledger_entries, h.ledger_carried) == (
                _f(v["epsilon"]), v["steps"], v["trained"], v["ledger_entries"],
                v["ledger_carried"])
    last = {}
    for raw in report["rounds"]:
        last.update(raw["per_client"])
    assert {c: h.epsilon for c, h in parsed.last_per_client().items()} == {
        c: _f(v["epsilon"]) for c, v in last.items()}
    assert parsed.config_value("target_epsilon") == 4.0  # either spelling
    assert parsed.final_epsilon == _f(report["final"]["epsilon"])


@pytest.mark.parametrize(("broken", "needle"), [
    ([], "no 'rounds' list"),
    ({"rounds": {}}, "no 'rounds' list"),
    ({"rounds": [3]}, "round row 1 is not an object"),
    ({"rounds": [{"per_client": {}}]}, "round row 1 lacks its 'round'"),
    ({"rounds": [{"round": 2}]}, "round 2 lacks its per-hospital table"),
    ({"rounds": [{"round": 1, "per_client": {"h": "x"}}]}, "round 1's entry of h"),
])
def test_a_broken_structure_is_refused_naming_the_place(broken, needle) -> None:
    with pytest.raises(ReportError, match=needle):
        RunReport.from_plain(broken, "report.json")


def test_a_broken_value_reads_as_nan_a_broken_count_is_refused_and_files_are_checked(
        tmp_path) -> None:
    h = HospitalRound.from_plain({"epsilon": "lots", "steps": 12, "trained": "yes"}, "x")
    assert math.isnan(h.epsilon) and h.steps == 12 and h.trained is False
    with pytest.raises(ReportError, match="x: 'steps' is \"12\", not a whole number"):
        HospitalRound.from_plain({"epsilon": 1.0, "steps": "12"}, "x")
    with pytest.raises(ReportError, match="does not exist"):
        read_report(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ReportError, match="not readable JSON"):
        read_report(tmp_path / "bad.json")


# ------------------------------------------------------------ the writer side
finite = st.floats(0, 1e6, allow_nan=False, allow_infinity=False)
epsilons = st.one_of(finite, st.just(math.inf))
texts = st.text(max_size=20)
#: Reasons as the server writes them: one printable line (bract.records.text.one_line).
reasons = texts.map(one_line)
evals = st.builds(FederatedEval, st.integers(0, 50), st.integers(0, 10_000), finite,
                  st.floats(0, 1))
hospital_rounds = st.builds(
    HospitalRound, epsilon=epsilons, trained=st.booleans(), reason=reasons,
    steps=st.one_of(st.none(), st.integers(0, 10_000)), noise_multiplier=finite,
    sample_rate=st.floats(0, 1), ledger_entries=st.one_of(st.none(), st.integers(0, 99)),
    ledger_head=texts, ledger_carried=st.integers(0, 99),
)
metrics = st.dictionaries(st.sampled_from(["loss", "accuracy", "mse", "r2"]), finite)
round_rows = st.builds(
    RoundRow, round=st.integers(1, 1000), epsilon=epsilons,
    per_client=st.dictionaries(names, hospital_rounds, max_size=4),
    trained=st.lists(names, unique=True).map(lambda xs: tuple(sorted(xs))),
    failed=st.dictionaries(names, reasons, max_size=3), metrics=metrics,
    train_loss=st.one_of(st.none(), finite), federated_eval=st.one_of(st.none(), evals),
    secagg=st.one_of(st.none(), st.fixed_dictionaries({"aborted": st.one_of(st.none(), texts),
                                                       "dropped": st.lists(names)})),
    delta=st.floats(1e-12, 0.5), seconds=finite,
)
summaries = st.builds(
    RunSummary, rounds_completed=st.integers(0, 1000), epsilon=epsilons,
    delta=st.floats(1e-12, 0.5), non_private=st.booleans(),
    stopped=st.dictionaries(names, reasons, max_size=3), metrics=metrics,
    federated_eval=st.one_of(st.none(), evals), model=st.one_of(st.none(), texts.filter(bool)),
    plots=st.lists(texts, max_size=3).map(tuple),
)


@settings(max_examples=150, deadline=None)
@given(rows=st.lists(round_rows, max_size=4), final=st.one_of(st.none(), summaries),
       initial=metrics)
def test_what_the_server_writes_reads_back_equal(rows, final, initial) -> None:
    """The server writes report.json from these records; through JSON, every record
    reads back equal (inf as "inf"; optional parts absent when unset)."""
    report = RunReport(config={"dataset": "synthetic"}, rounds=tuple(rows), final=final,
                       initial=initial)
    text = json.dumps(report.to_plain(), allow_nan=False)  # valid JSON: no NaN/Infinity
    assert RunReport.from_plain(json.loads(text)) == report
    for row in rows:
        plain = row.to_plain()
        assert ("train_loss" in plain) == (row.train_loss is not None)
        assert ("secagg" in plain) == (row.secagg is not None)


# Texts a hostile report.json may hold: line breaks, ESC sequences, bidi overrides.
hostile = st.text(st.sampled_from("ab [/]#|*\n\r\x1b\x00\u2028\u202e<>&"), max_size=40)


@settings(max_examples=60, deadline=None)
@given(reason=hostile, stopped=hostile, early=hostile, line=hostile,
       strict=st.booleans())
def test_every_reason_reads_back_as_one_printable_line(
        reason, stopped, early, line, strict) -> None:
    """Property: whatever text report.json holds as a reason (a round's ``failed``, a
    hospital line's ``reason``, ``final.stopped``, ``stopped_early``), every reader,
    strict or not, gets it as :func:`one_line` makes it: no line break, no control
    character, no bidirectional override."""
    doc = {"rounds": [{"round": 1, "epsilon": 1.0, "trained": [],
                       "per_client": {"hospital-0": {"epsilon": 1.0, "trained": False,
                                                     "reason": line}},
                       "failed": {"hospital-1": reason}}],
           "final": {"epsilon": 1.0, "rounds_completed": 1,
                     "stopped": {"hospital-0": stopped}},
           "stopped_early": early}
    report = RunReport.from_plain(doc, strict=strict)
    assert report.rounds[0].failed == {"hospital-1": one_line(reason)}
    assert report.rounds[0].per_client["hospital-0"].reason == one_line(line)
    assert report.final is not None and report.final.stopped == {
        "hospital-0": one_line(stopped)}
    assert report.stopped_early == one_line(early)


@pytest.mark.parametrize("where", ["per_client", "failed", "trained", "stopped"])
@pytest.mark.parametrize("name", ["hospital-0\nPASS", "hospital-0\x1b[2J", "\u202ehospital",
                                  " hospital-0", "x" * 600])
def test_a_strict_reading_refuses_a_hospital_name_that_is_not_one_printable_line(
        where, name) -> None:
    """A name holding a line break, a control character, a bidirectional override,
    spaces at its ends or more than 500 characters would rewrite what the audit shows:
    the strict reading (the audit's) refuses it, naming the field's round."""
    row = {"round": 1, "epsilon": 1.0, "trained": [], "failed": {},
           "per_client": {"hospital-0": {"epsilon": 1.0, "trained": False}}}
    final = {"epsilon": 1.0, "rounds_completed": 1}
    if where == "per_client":
        row["per_client"][name] = {"epsilon": 1.0, "trained": False}
    elif where == "failed":
        row["failed"][name] = "did not answer"
    elif where == "trained":
        row["per_client"][name] = {"epsilon": 1.0, "trained": True}
        row["trained"] = [name]
    else:
        final["stopped"] = {name: "budget"}
    doc = {"rounds": [row], "final": final}
    RunReport.from_plain(doc)  # the lenient reading takes it
    with pytest.raises(ReportError, match="is not one line of printable text"):
        RunReport.from_plain(doc, strict=True)
