"""What the operator sees: a round that averaged no update shows no figure of a model,
a failed hospital's cell is marked, and the summary line counts only rounds that
averaged an update."""

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
           "averaged 0/3, 65.6 s" in out
    assert "loss" not in out and "accuracy" not in out
    assert _cells(display)[1:3] == ["-", "no update"]


def test_a_failed_hospital_keeps_its_last_epsilon_with_a_marker(capsys) -> None:
    """hospital-2 trained in round 1 and failed in round 2: its cell shows the epsilon of
    its last report, marked failed; a silent one is marked no answer."""
    display = LiveTable(rounds=2, enabled=False)
    everyone = {f"hospital-{i}": _line(2.614) for i in range(3)}
    display.row(RoundRow(round=1, epsilon=2.614, per_client=everyone,
                         trained=tuple(everyone), metrics={"loss": 0.3, "accuracy": 0.9},
                         seconds=1.0))
    later = {**everyone, "hospital-0": _line(3.385), "hospital-1": _line(3.385)}
    display.row(RoundRow(round=2, epsilon=3.385, per_client=later,
                         trained=("hospital-0",),
                         failed={"hospital-2": "failed: Node Unavailable",
                                 "hospital-1": "did not answer"},
                         metrics={"loss": 0.25, "accuracy": 0.92}, seconds=1.0))
    assert _cells(display)[-3:] == ["3.385", "3.385 no answer", "2.614 failed"]
    assert "loss 0.250, accuracy 0.920" in capsys.readouterr().out


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
