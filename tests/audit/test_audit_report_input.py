"""report.json as the audit reads it: every count is a whole number in the ledger's
range or the report is refused naming the field; every other number reads as a float
(an unreadable one as nan, an integer too large for a float as inf), never an
exception."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from bract.records.report import MAX_COUNT, ReportError, RunReport, read_report


def _report() -> dict:
    line = {"epsilon": 1.5, "noise_multiplier": 1.1, "sample_rate": 0.05, "steps": 40,
            "trained": True, "reason": "", "ledger_entries": 1, "ledger_head": "ab" * 32,
            "ledger_carried": 0, "epsilon_carried": None}
    held_out = {"model_of_round": 1, "examples": 50, "loss": 0.5, "accuracy": 0.8}
    return {
        "config": {"target_epsilon": 3.0, "delta": 1e-5},
        "rounds": [{"round": 1, "epsilon": 1.5, "delta": 1e-5,
                    "per_client": {"hospital-0": line}, "trained": ["hospital-0"],
                    "failed": {}, "loss": 0.4, "federated_eval": held_out, "seconds": 1.0}],
        "final": {"rounds_completed": 1, "epsilon": 1.5, "delta": 1e-5,
                  "federated_eval": held_out},
    }


#: Every count a report holds, as a path into :func:`_report`.
COUNT_FIELDS = ("rounds.0.round", "rounds.0.per_client.hospital-0.steps",
                "rounds.0.per_client.hospital-0.ledger_entries",
                "rounds.0.per_client.hospital-0.ledger_carried",
                "rounds.0.federated_eval.model_of_round", "rounds.0.federated_eval.examples",
                "final.rounds_completed", "final.federated_eval.model_of_round",
                "final.federated_eval.examples")
#: Every other number it holds.
NUMBER_FIELDS = ("rounds.0.epsilon", "rounds.0.delta", "rounds.0.loss", "rounds.0.seconds",
                 "rounds.0.per_client.hospital-0.epsilon",
                 "rounds.0.per_client.hospital-0.noise_multiplier",
                 "rounds.0.per_client.hospital-0.sample_rate",
                 "rounds.0.per_client.hospital-0.epsilon_carried",
                 "rounds.0.federated_eval.loss", "final.epsilon", "final.delta")

#: Anything JSON can hold in a field: any number (10**400 included), text, a boolean, null.
json_values = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, allow_subnormal=True),
    st.integers(-(2**70), 2**70), st.integers(-(10**400), 10**400),
    st.text(max_size=12), st.booleans(), st.none(),
)


def _with(path: str, value) -> dict:
    data = _report()
    where = data
    *parents, last = path.split(".")
    for key in parents:
        where = where[int(key)] if isinstance(where, list) else where[key]
    where[last] = value
    return data


def _read_back(path: str, value, tmp_path) -> RunReport:
    """The report with ``value`` at ``path``, written as JSON and read back."""
    file = tmp_path / "report.json"
    file.write_text(json.dumps(_with(path, value), allow_nan=True))
    return read_report(file)


@pytest.mark.parametrize(
    ("path", "value"),
    [("rounds.0.round", 10**30), ("rounds.0.round", -5), ("rounds.0.round", 2**53 + 1),
     ("rounds.0.per_client.hospital-0.steps", 5.5),
     ("rounds.0.per_client.hospital-0.steps", "5"),
     ("rounds.0.per_client.hospital-0.steps", True),
     ("rounds.0.per_client.hospital-0.steps", 10**400),
     ("rounds.0.per_client.hospital-0.ledger_entries", -1),
     ("rounds.0.per_client.hospital-0.ledger_entries", "2"),
     ("rounds.0.per_client.hospital-0.ledger_carried", "x"),
     ("rounds.0.per_client.hospital-0.ledger_carried", -3),
     ("rounds.0.federated_eval.examples", 1.5), ("final.rounds_completed", "2"),
     ("final.federated_eval.model_of_round", -1)],
)
def test_a_count_that_is_not_a_whole_number_in_range_is_refused_naming_it(
        path, value, tmp_path) -> None:
    """A count (a round number, cumulative steps, a ledger length) that is a fraction,
    text, a boolean, negative or past 2**53 is refused with one ReportError naming the
    file, where it is and the field; it is never read as "absent" (which would skip the
    audit's check of it) nor passed on to be plotted."""
    with pytest.raises(ReportError) as info:
        _read_back(path, value, tmp_path)
    message = str(info.value)
    field = path.split(".")[-1]
    assert f"'{field}' is " in message and "not a whole number from 0 to 2**53" in message
    assert str(tmp_path / "report.json") in message and "\n" not in message
    if "per_client" in path:
        assert "round 1's entry of hospital-0" in message


@settings(max_examples=300, deadline=None)
@given(path=st.sampled_from(COUNT_FIELDS + NUMBER_FIELDS), value=json_values)
@example(path="rounds.0.per_client.hospital-0.epsilon", value=10**400)
@example(path="final.epsilon", value=-(10**400))
def test_any_value_in_any_report_number_reads_in_range_or_is_refused(path, value) -> None:
    """Property: whatever JSON value a hostile report.json puts in any numeric field,
    reading it either refuses the report with a ReportError, or gives a report whose
    counts are None or whole numbers in [0, 2**53] (the given one when it is in range)
    and whose other numbers are floats; no other exception."""
    try:
        report = RunReport.from_plain(json.loads(json.dumps(_with(path, value),
                                                            allow_nan=True)))
    except ReportError:
        assert path in COUNT_FIELDS
        return
    row = report.rounds[0]
    line = row.per_client["hospital-0"]
    assert report.final is not None and row.federated_eval is not None
    counts = [row.round, line.steps, line.ledger_entries, line.ledger_carried,
              row.federated_eval.model_of_round, row.federated_eval.examples,
              report.final.rounds_completed]
    for n in counts:
        assert n is None or (type(n) is int and 0 <= n <= MAX_COUNT)
    if path in COUNT_FIELDS and value is not None:
        assert type(value) is int and 0 <= value <= MAX_COUNT
    floats = [row.epsilon, row.delta, row.seconds, line.epsilon, line.noise_multiplier,
              line.sample_rate, report.final.epsilon, report.final.delta,
              *row.metrics.values()]
    assert all(isinstance(x, float) for x in floats)
    if path == "rounds.0.per_client.hospital-0.epsilon" and type(value) is int \
            and abs(value) > 2**1100:  # beyond any float: read as an infinite epsilon
        assert line.epsilon == (math.inf if value > 0 else -math.inf)


@pytest.mark.parametrize("text", ['{"rounds": [' + "9" * 5000 + "]}", "[" * 100_000])
def test_a_report_json_cannot_parse_is_refused_naming_it(text, tmp_path) -> None:
    """JSON Python's reader refuses with something other than a decoding error (a
    5000-digit integer, nesting deeper than the recursion limit) is an unreadable
    report, named as such."""
    file = tmp_path / "report.json"
    file.write_text(text)
    with pytest.raises(ReportError, match="is not readable JSON"):
        read_report(file)


def _loads(path: str, value) -> RunReport:
    """The report with ``value`` at ``path``, through JSON, read strictly."""
    return RunReport.from_plain(json.loads(json.dumps(_with(path, value), allow_nan=True)),
                                "report.json", strict=True)


@settings(max_examples=300, deadline=None)
@given(path=st.sampled_from(COUNT_FIELDS + NUMBER_FIELDS + ("rounds.0.per_client.hospital-0"
                                                            ".trained", "rounds.0.trained")),
       value=st.one_of(json_values, st.floats().map(str), st.integers().map(str),
                       st.lists(st.sampled_from(["hospital-0", "hospital-1", 3]), max_size=3)))
@example(path="rounds.0.per_client.hospital-0.epsilon", value="2.5")
@example(path="final.epsilon", value="inf")
@example(path="rounds.0.per_client.hospital-0.trained", value=1)
@example(path="rounds.0.round", value=None)
def test_read_strictly_a_value_of_the_wrong_type_is_refused_naming_its_field(
        path, value) -> None:
    """Property (the audit's reading): a number that is a JSON number, null, or one of
    the texts the writer uses for non-finite numbers reads as that float; any other
    value in a number field (text such as "2.5", a boolean, a list) is refused with one
    ReportError naming the round and the field, never coerced; a hospital's
    ``trained`` must be a boolean and a round's ``trained`` a list of distinct names."""
    field = path.split(".")[-1]
    numeric = isinstance(value, int | float) and not isinstance(value, bool)
    if path.endswith("hospital-0.trained"):
        fits = isinstance(value, bool)
    elif path == "rounds.0.trained":
        fits = (isinstance(value, list) and all(isinstance(c, str) for c in value)
                and len(set(value)) == len(value))
    elif path in COUNT_FIELDS:  # a row's own round number may not be missing
        fits = ((value is None and path != "rounds.0.round")
                or (type(value) is int and 0 <= value <= MAX_COUNT))
    else:
        fits = value is None or numeric or value in ("inf", "-inf", "nan")
    try:
        report = _loads(path, value)
    except ReportError as exc:
        message = str(exc)
        assert not fits, message
        assert f"'{field}' " in message and "\n" not in message
        assert message.startswith("report.json: ")
        if path.startswith("rounds.0."):  # the row's own number is named by its place
            assert ("round row 1" if path == "rounds.0.round" else "round 1") in message
        return
    assert fits, value
    if path in NUMBER_FIELDS and value is not None:
        row = report.rounds[0]
        line = row.per_client["hospital-0"]
        got = {"rounds.0.epsilon": row.epsilon, "rounds.0.delta": row.delta,
               "rounds.0.seconds": row.seconds, "rounds.0.loss": row.metrics.get("loss"),
               "rounds.0.per_client.hospital-0.epsilon": line.epsilon,
               "rounds.0.per_client.hospital-0.noise_multiplier": line.noise_multiplier,
               "rounds.0.per_client.hospital-0.sample_rate": line.sample_rate,
               "rounds.0.per_client.hospital-0.epsilon_carried": line.epsilon_carried,
               "rounds.0.federated_eval.loss": row.federated_eval.loss,
               "final.epsilon": report.final.epsilon, "final.delta": report.final.delta}[path]
        try:
            want = float(value)
        except OverflowError:  # an integer beyond any float: infinite
            want = math.inf if value > 0 else -math.inf
        assert got == want or (math.isnan(got) and math.isnan(want))


@pytest.mark.parametrize(("text", "needle"), [
    ('{"rounds": [ROW, ROW]}', "round 1 has two rows (rows 1 and 2)"),
    ('{"rounds": [ROW2, ROW]}', "round row 2 is round 1, after round 2"),
    ('{"rounds": [{"round": 1, "per_client": {"h": LINE, "h": LINE}}]}',
     "'h' appears twice in round 1's 'per_client'"),
    ('{"rounds": [{"round": 1, "epsilon": 1.0, "epsilon": 2.0, "per_client": {}}]}',
     "'epsilon' appears twice in round 1"),
    ('{"rounds": [{"round": 1, "per_client": {}, "failed": ["h"]}]}',
     "round 1: 'failed' is [\"h\"], not an object"),
])
def test_read_strictly_a_round_or_hospital_given_twice_is_refused_naming_the_round(
        text, needle, tmp_path) -> None:
    """Two rows for one round, rows out of order, one hospital's line twice in a round
    (a key JSON readers silently keep one of), any key twice: refused when read
    strictly, naming the round; read leniently (plots, summaries) as before."""
    line = json.dumps({"epsilon": 1.0, "trained": True})
    text = (text.replace("ROW2", '{"round": 2, "per_client": {}}')
            .replace("ROW", '{"round": 1, "per_client": {}}').replace("LINE", line))
    file = tmp_path / "report.json"
    file.write_text(text)
    with pytest.raises(ReportError) as info:
        read_report(file, strict=True)
    assert needle in str(info.value) and str(file) in str(info.value)
    read_report(file)  # the lenient reading is unchanged
