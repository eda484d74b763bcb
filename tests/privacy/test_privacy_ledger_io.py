"""The ledger as plain data: exact round trips, and malformed input named precisely."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bract.privacy import DpSgdEvent, PrivacyError, PrivacyLedger, read_jsonl, write_jsonl

events = st.builds(
    DpSgdEvent,
    noise_multiplier=st.floats(0.0, 1e3, allow_nan=False, allow_infinity=False),
    sample_rate=st.floats(0.0, 1.0, exclude_min=True),
    steps=st.integers(0, 10**9),
    max_grad_norm=st.floats(1e-9, 1e6, allow_nan=False, allow_infinity=False),
    delta=st.floats(0.0, 1.0, exclude_min=True, exclude_max=True),
    round=st.integers(0, 10**6),
    client_id=st.text(max_size=20),
)
ledgers = st.builds(PrivacyLedger, client_id=st.text(max_size=20),
                    events=st.lists(events, max_size=8).map(tuple))


@settings(max_examples=200)
@given(event=events)
def test_event_round_trips_through_plain_and_json(event: DpSgdEvent) -> None:
    plain = event.to_plain()
    assert DpSgdEvent.from_plain(plain) == event
    assert DpSgdEvent.from_plain(json.loads(json.dumps(plain))) == event


@settings(max_examples=100)
@given(ledger=ledgers)
def test_ledger_round_trips_through_plain_and_json(ledger: PrivacyLedger) -> None:
    assert PrivacyLedger.from_plain(ledger.to_plain()) == ledger
    text = ledger.to_json()
    assert PrivacyLedger.from_json(text) == ledger
    assert PrivacyLedger.from_json(text).to_json() == text  # canonical
    assert PrivacyLedger.from_json(text).total_steps == ledger.total_steps


@settings(max_examples=50)
@given(items=st.lists(events, max_size=10))
def test_events_round_trip_through_jsonl(items: list[DpSgdEvent]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ledger.jsonl"
        write_jsonl(items, path)
        lines = path.read_text(encoding="utf-8").splitlines()
        assert len(lines) == len(items)  # one event per line, even with odd client ids
        assert read_jsonl(path) == items


def _plain() -> dict[str, object]:
    return DpSgdEvent(1.0, 0.1, 10, 1.0, 1e-5, round=1, client_id="h1").to_plain()


def test_unknown_field_is_named() -> None:
    with pytest.raises(PrivacyError, match=r"unknown ledger event field\(s\): \['colour'\]"):
        DpSgdEvent.from_plain({**_plain(), "colour": "red"})
    ledger = PrivacyLedger("h1", (DpSgdEvent.from_plain(_plain()),)).to_plain()
    with pytest.raises(PrivacyError, match=r"unknown ledger field\(s\): \['epsilon'\]"):
        PrivacyLedger.from_plain({**ledger, "epsilon": 1.0})


@pytest.mark.parametrize("field", ["noise_multiplier", "sample_rate", "steps", "max_grad_norm",
                                   "delta"])
def test_missing_field_is_named(field: str) -> None:
    data = _plain()
    del data[field]
    with pytest.raises(PrivacyError, match=rf"missing field\(s\): \['{field}'\]"):
        DpSgdEvent.from_plain(data)


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("steps", "ten", "'steps' must be an integer"),
        ("steps", 2.5, "'steps' must be an integer"),
        ("steps", True, "'steps' must be an integer"),
        ("round", None, "'round' must be an integer"),
        ("noise_multiplier", "1.0", "'noise_multiplier' must be a number"),
        ("delta", None, "'delta' must be a number"),
        ("sample_rate", 2.0, "sample_rate must lie in"),
        ("delta", 0.0, "delta must be a number strictly between 0 and 1"),
        ("client_id", 7, "'client_id' must be a string"),
        ("sampling", "shuffle", "poisson"),
    ],
)
def test_bad_values_raise_privacy_error_naming_the_field(
    field: str, value: object, match: str
) -> None:
    with pytest.raises(PrivacyError, match=match):
        DpSgdEvent.from_plain({**_plain(), field: value})


def test_integral_floats_from_other_writers_are_accepted() -> None:
    event = DpSgdEvent.from_plain({**_plain(), "steps": 10.0, "round": 1.0})
    assert event.steps == 10 and isinstance(event.steps, int)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ([1, 2], "must be a mapping"),
        ({"client_id": "h"}, "'events' list"),
        ({"events": "abc"}, "'events' list"),
        ({"events": [[1, 2]]}, "must be a mapping"),
    ],
)
def test_malformed_ledger_shapes(data: object, match: str) -> None:
    with pytest.raises(PrivacyError, match=match):
        PrivacyLedger.from_plain(data)  # type: ignore[arg-type]


def test_malformed_json_text() -> None:
    with pytest.raises(PrivacyError, match="ledger JSON is malformed"):
        PrivacyLedger.from_json('{"events": [')


@pytest.mark.parametrize(
    ("bad_line", "match"),
    [
        ("{not json", "bad ledger line"),
        (json.dumps({**_plain(), "colour": 1}), "unknown ledger event field"),
        (json.dumps({k: v for k, v in _plain().items() if k != "delta"}), "missing field"),
        (json.dumps({**_plain(), "steps": "ten"}), "'steps' must be an integer"),
        ("[1, 2, 3]", "must be a mapping"),
    ],
)
def test_read_jsonl_names_the_bad_line(tmp_path: Path, bad_line: str, match: str) -> None:
    good = json.dumps(_plain())
    path = tmp_path / "ledger.jsonl"
    path.write_text(f"{good}\n\n{bad_line}\n{good}\n", encoding="utf-8")  # blank line 2 skipped
    with pytest.raises(PrivacyError, match=match) as info:
        read_jsonl(path)
    assert f"{path}:3:" in str(info.value)
