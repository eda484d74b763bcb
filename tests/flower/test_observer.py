"""What the operator sees: a round that averaged no update shows no figure of a model,
and the summary line counts only rounds that averaged an update."""

from __future__ import annotations

from bract.flower.observer import LiveTable, summarize
from bract.records.report import HospitalRound, RoundRow, RunReport, RunSummary


def _line(eps: float, trained: bool = True) -> HospitalRound:
    return HospitalRound(epsilon=eps, trained=trained, reason="ok", steps=8,
                         noise_multiplier=1.0, sample_rate=0.1, ledger_entries=1)


def _cells(table: LiveTable) -> list[str]:
    return [list(c.cells)[-1] for c in table.table.columns]


def test_a_round_that_averaged_nothing_shows_no_metric(capsys) -> None:
    display = LiveTable(rounds=2, enabled=False)
    people = {f"hospital-{i}": _line(7.98) for i in range(3)}
    failed = {cid: "dropped from secure aggregation at the mask stage: boom" for cid in people}
    display.row(RoundRow(round=1, epsilon=7.98, per_client=people, trained=(),
                         failed=failed, metrics={}, seconds=65.6))
    out = " ".join(capsys.readouterr().out.split())
    assert "round 1: no update was averaged (global model unchanged), max ε 7.980, " \
           "trained 0/3, 65.6 s" in out
    assert "loss" not in out and "accuracy" not in out
    assert _cells(display)[1:3] == ["-", "no update"]


def test_the_summary_counts_rounds_that_averaged_an_update() -> None:
    line = _line(1.0)
    rows = (RoundRow(round=1, epsilon=1.0, per_client={"h": line}, trained=("h",),
                     metrics={"accuracy": 0.9, "loss": 0.3}),
            RoundRow(round=2, epsilon=1.5, per_client={"h": line}, trained=()))
    partial = RunReport({}, rows, RunSummary(1, 1.5, 1e-5, metrics={"accuracy": 0.9}))
    assert summarize(partial).startswith("1 of 2 rounds averaged an update, final accuracy 0.900")
    nothing = RunReport({}, rows[1:], RunSummary(0, 1.5, 1e-5, model_trained=False))
    text = summarize(nothing)
    assert text.startswith("no round averaged an update (1 rounds run): the model was not "
                           "trained") and "accuracy" not in text
