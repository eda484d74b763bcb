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
            "trained": draw(st.booleans()), "reason": draw(st.text(max_size=20)),
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
evals = st.builds(FederatedEval, st.integers(0, 50), st.integers(0, 10_000), finite,
                  st.floats(0, 1))
hospital_rounds = st.builds(
    HospitalRound, epsilon=epsilons, trained=st.booleans(), reason=texts,
    steps=st.one_of(st.none(), st.integers(0, 10_000)), noise_multiplier=finite,
    sample_rate=st.floats(0, 1), ledger_entries=st.one_of(st.none(), st.integers(0, 99)),
    ledger_head=texts, ledger_carried=st.integers(0, 99),
)
metrics = st.dictionaries(st.sampled_from(["loss", "accuracy", "mse", "r2"]), finite)
round_rows = st.builds(
    RoundRow, round=st.integers(1, 1000), epsilon=epsilons,
    per_client=st.dictionaries(names, hospital_rounds, max_size=4),
    trained=st.lists(names, unique=True).map(lambda xs: tuple(sorted(xs))),
    failed=st.dictionaries(names, texts, max_size=3), metrics=metrics,
    train_loss=st.one_of(st.none(), finite), federated_eval=st.one_of(st.none(), evals),
    secagg=st.one_of(st.none(), st.fixed_dictionaries({"aborted": st.one_of(st.none(), texts),
                                                       "dropped": st.lists(names)})),
    delta=st.floats(1e-12, 0.5), seconds=finite,
)
summaries = st.builds(
    RunSummary, rounds_completed=st.integers(0, 1000), epsilon=epsilons,
    delta=st.floats(1e-12, 0.5), non_private=st.booleans(),
    stopped=st.dictionaries(names, texts, max_size=3), metrics=metrics,
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
