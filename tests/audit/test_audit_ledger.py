"""Signed, hash-chained ledgers: every valid chain verifies (one hospital's lifetime
chain may span runs and federations), and every tampering — an edited field, a
removed, duplicated, reordered or inserted line, a wrong key, a truncated tail, an
entry of another chain of this hospital or of another hospital — is caught at the
entry where it happened (or, for an inserted first entry, at the one after it)."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bract.privacy import DpSgdEvent
from bract.records.ledger import (
    LedgerEntry,
    LedgerError,
    SignerRoster,
    append_entry,
    by_client,
    check_chain,
    dumps_jsonl,
    genesis_hash,
    loads_jsonl,
    read_ledger,
    verify_chain,
    write_ledger,
)
from bract.secagg.crypto import SigningKey

KEY = SigningKey.generate()
OTHER_KEY = SigningKey.generate()
FED, CID = "fed-A", "hospital-0"
SETTINGS = settings(max_examples=60, deadline=None)


def build(n_or_specs, *, key=KEY, fed=FED, cid=CID) -> tuple[LedgerEntry, ...]:
    """A valid chain of ``n`` entries (or of the given (sigma, q, steps) specs)."""
    specs = n_or_specs if isinstance(n_or_specs, list) else [
        (1.0 + i / 10, 0.05, 10 + i) for i in range(n_or_specs)
    ]
    chain: tuple[LedgerEntry, ...] = ()
    for r, (sigma, q, steps) in enumerate(specs, 1):
        event = DpSgdEvent(sigma, q, steps, 1.0, 1e-5, round=r, client_id=cid)
        chain = append_entry(chain, event, epsilon=0.5 * r, delta=1e-5, accountant="prv",
                             federation_id=fed, client_id=cid, signing_key=key)
    return chain


def check(entries, key=KEY, expected_length=None, cid=CID):
    pub = key.public_bytes() if key is not None else None
    return check_chain(entries, pub, client_id=cid, expected_length=expected_length)


specs = st.lists(
    st.tuples(st.floats(0.3, 20.0), st.floats(1e-4, 1.0), st.integers(0, 500)),
    min_size=1, max_size=6,
)


@SETTINGS
@given(specs=specs)
def test_a_signed_chain_verifies_and_round_trips_through_jsonl(specs) -> None:
    chain = build(specs)
    assert check(chain, expected_length=len(chain)).ok
    assert [e.seq for e in chain] == list(range(1, len(chain) + 1))
    assert chain[0].prev_hash == genesis_hash(FED, CID)
    assert all(b.prev_hash == a.hash() for a, b in itertools.pairwise(chain))
    text = dumps_jsonl(chain)
    assert tuple(loads_jsonl(text)) == chain
    assert dumps_jsonl(loads_jsonl(text)) == text  # canonical: byte-identical lines


def _edits() -> st.SearchStrategy:
    """(field path, new-value function) edits that keep a line parseable."""
    return st.sampled_from([
        (("epsilon",), lambda v: v * 0.9 + 0.01),
        (("delta",), lambda v: v * 2),
        (("accountant",), lambda v: "rdp" if v != "rdp" else "prv"),
        (("round",), lambda v: v + 1),
        (("seq",), lambda v: v + 1),
        (("client_id",), lambda v: v + "x"),
        (("federation_id",), lambda v: v + "x"),
        (("prev_hash",), lambda v: ("0" if v[0] != "0" else "1") + v[1:]),
        (("signature",), lambda v: v[:-1] + ("0" if v[-1] != "0" else "1")),
        (("event", "noise_multiplier"), lambda v: v * 0.5),
        (("event", "sample_rate"), lambda v: v / 2),
        (("event", "steps"), lambda v: v + 1),
        (("event", "max_grad_norm"), lambda v: v * 2),
        (("event", "delta"), lambda v: v / 10),
        (("event", "round"), lambda v: v + 1),
    ])


@SETTINGS
@given(specs=specs, data=st.data(), edit=_edits())
def test_any_edited_field_is_caught_at_that_entry(specs, data, edit) -> None:
    chain = list(build(specs))
    i = data.draw(st.integers(0, len(chain) - 1))
    path, change = edit
    plain = chain[i].to_plain()
    node = plain
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = change(node[path[-1]])
    chain[i] = LedgerEntry.from_plain(json.loads(json.dumps(plain)))
    result = check(chain, expected_length=len(chain))
    assert not result.ok and result.verified == i


@SETTINGS
@given(specs=specs, data=st.data())
def test_a_removed_line_is_caught(specs, data) -> None:
    chain = list(build(specs))
    i = data.draw(st.integers(0, len(chain) - 1))
    del chain[i]
    result = check(chain, expected_length=len(chain) + 1)
    assert not result.ok and result.verified == i
    if i < len(chain):  # inside the chain: caught even without the expected length
        assert not check(chain).ok and "missing" in check(chain).problem


@SETTINGS
@given(specs=specs, data=st.data())
def test_a_duplicated_line_is_caught(specs, data) -> None:
    chain = list(build(specs))
    i = data.draw(st.integers(0, len(chain) - 1))
    j = data.draw(st.integers(0, len(chain)))
    chain.insert(j, chain[i])
    result = check(chain)
    # Caught at the copy, or right after it when it sits next to its original.
    assert not result.ok and result.verified == (i + 1 if j == i else j)


@SETTINGS
@given(specs=specs.filter(lambda s: len(s) >= 2), data=st.data())
def test_reordered_lines_are_caught(specs, data) -> None:
    chain = list(build(specs))
    i = data.draw(st.integers(0, len(chain) - 2))
    j = data.draw(st.integers(i + 1, len(chain) - 1))
    chain[i], chain[j] = chain[j], chain[i]
    result = check(chain)
    assert not result.ok and result.verified == i


@SETTINGS
@given(specs=specs, data=st.data(), source=st.sampled_from(["client", "federation"]))
def test_an_entry_of_another_ledger_spliced_in_is_caught(specs, data, source) -> None:
    """Even signed by the same key, an entry of another hospital's chain or of another
    chain of this hospital (begun in another federation) never fits: it is caught where
    it stands, or, when it is a first entry put first, at the entry after it."""
    chain = list(build(specs))
    other = build(specs, cid=CID + "-b") if source == "client" else build(specs, fed=FED + "-b")
    k = data.draw(st.integers(0, len(chain) - 1))
    i = data.draw(st.integers(0, len(chain)))
    replace = data.draw(st.booleans()) and i < len(chain)
    if replace:
        chain[i] = other[k]
    else:
        chain.insert(i, other[k])
    result = check(chain)
    first_put_first = source == "federation" and i == 0 and k == 0
    if first_put_first and replace and len(chain) == 1:
        assert result.ok  # nothing of this chain is left: that is the other chain, whole
        return
    assert not result.ok and result.verified == (i + 1 if first_put_first else i)
    if source == "client":
        assert "another hospital" in result.problem


@SETTINGS
@given(segments=st.lists(st.tuples(st.sampled_from(["fed-A", "fed-B", "fed-C"]),
                                   st.integers(1, 4)), min_size=1, max_size=5))
def test_a_lifetime_chain_across_runs_and_federations_verifies_whole(segments) -> None:
    """One hospital's chain on one dataset continues through any sequence of runs and
    federations (rounds restart with each run): it verifies whole with the hospital's
    key, each entry names (signed) the federation that spent it, and the genesis binds
    the federation it began in."""
    chain: tuple[LedgerEntry, ...] = ()
    spent_in: list[str] = []
    for fed, rounds in segments:
        for r in range(1, rounds + 1):
            event = DpSgdEvent(1.0, 0.05, 10, 1.0, 1e-5, round=r, client_id=CID)
            chain = append_entry(chain, event, epsilon=0.1 * (len(chain) + 1), delta=1e-5,
                                 accountant="prv", federation_id=fed, client_id=CID,
                                 signing_key=KEY)
            spent_in.append(fed)
    assert check(chain, expected_length=len(chain)).ok
    assert [e.federation_id for e in chain] == spent_in
    assert chain[0].prev_hash == genesis_hash(segments[0][0], CID)
    # Relabelling the federation of any entry breaks its signature.
    i = len(chain) // 2
    relabelled = list(chain)
    relabelled[i] = dataclasses.replace(chain[i], federation_id="fed-Z")
    assert check(relabelled).verified == i


@SETTINGS
@given(specs=specs)
def test_a_forged_chain_fails_with_the_roster_key(specs) -> None:
    """Entries signed by another key (e.g. a server forging a ledger) never verify."""
    forged = build(specs, key=OTHER_KEY)
    result = check(forged, key=KEY)
    assert not result.ok and result.verified == 0 and "signature" in result.problem
    assert check(forged, key=OTHER_KEY).ok


@SETTINGS
@given(specs=specs, data=st.data())
def test_a_truncated_tail_is_caught_only_with_the_expected_length(specs, data) -> None:
    chain = build(specs)
    n = data.draw(st.integers(0, len(chain) - 1))
    assert check(chain[:n]).ok  # a prefix of a valid chain is a valid chain...
    result = check(chain[:n], expected_length=len(chain))  # ...unless its length is known
    assert not result.ok and "truncated" in result.problem
    assert "longer" in check(chain, expected_length=n).problem


def test_unsigned_entries_link_but_fail_against_a_key() -> None:
    chain = build(3, key=None)
    assert all(e.signature == "" for e in chain)
    assert check(chain, key=None).ok
    result = check(chain, key=KEY)
    assert not result.ok and result.verified == 0 and "unsigned" in result.problem
    with pytest.raises(LedgerError, match="unsigned"):
        verify_chain(chain, KEY.public_bytes(), client_id=CID)


def test_append_refuses_another_hospitals_event_or_chain() -> None:
    chain = build(2)
    event = DpSgdEvent(1.0, 0.1, 5, 1.0, 1e-5, round=3, client_id="hospital-9")
    with pytest.raises(LedgerError, match="cannot go on the ledger"):
        append_entry(chain, event, epsilon=1.0, delta=1e-5, accountant="prv",
                     federation_id=FED, client_id=CID, signing_key=KEY)
    with pytest.raises(LedgerError, match="belongs to"):
        append_entry(chain, event, epsilon=1.0, delta=1e-5, accountant="prv",
                     federation_id=FED, client_id="hospital-9", signing_key=KEY)


def test_the_same_round_may_repeat_after_a_resumed_round() -> None:
    """A round re-run after a server crash records a second event: both stay."""
    chain = build(2)
    again = DpSgdEvent(1.0, 0.1, 5, 1.0, 1e-5, round=2, client_id=CID)
    chain = append_entry(chain, again, epsilon=2.0, delta=1e-5, accountant="prv",
                         federation_id=FED, client_id=CID, signing_key=KEY)
    assert [e.round for e in chain] == [1, 2, 2] and check(chain).ok


def test_infinite_epsilon_round_trips() -> None:
    event = DpSgdEvent(0.0, 0.1, 5, 1.0, 1e-5, round=1, client_id=CID)
    chain = append_entry((), event, epsilon=math.inf, delta=1e-5, accountant="prv",
                         federation_id=FED, client_id=CID, signing_key=KEY)
    assert '"epsilon":"inf"' in dumps_jsonl(chain)
    assert loads_jsonl(dumps_jsonl(chain))[0].epsilon == math.inf and check(chain).ok


def test_files_round_trip_and_merged_ledgers_split_per_hospital(tmp_path) -> None:
    a, b = build(2), build(3, cid="hospital-1")
    write_ledger(tmp_path / "ledger.jsonl", [*a, *b])
    groups = by_client(read_ledger(tmp_path / "ledger.jsonl"))
    assert groups == {CID: list(a), "hospital-1": list(b)}


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda d: "{not json", r"ledger.jsonl:2: not JSON"),
        (lambda d: json.dumps([1, 2]), "must be a JSON object"),
        (lambda d: json.dumps({**d, "colour": 1}), r"unknown ledger entry field\(s\) \['colour'\]"),
        (lambda d: json.dumps({k: v for k, v in d.items() if k != "seq"}), r"lacks field.*'seq'"),
        (lambda d: json.dumps({**d, "format": "v0"}), "format 'v0'"),
        (lambda d: json.dumps({**d, "seq": "2"}), "'seq' must be an integer"),
        (lambda d: json.dumps({**d, "prev_hash": "xyz"}), "64 hex digits"),
        (lambda d: json.dumps({**d, "signature": "ab"}), "128 hex digits"),
        (lambda d: json.dumps({**d, "epsilon": "lots"}), "'epsilon' must be a finite number"),
        (lambda d: json.dumps({**d, "event": {"steps": 1}}), "event: ledger event is missing"),
    ],
)
def test_malformed_lines_are_named_with_file_and_line(tmp_path, mutate, match) -> None:
    chain = build(2)
    path = tmp_path / "ledger.jsonl"
    path.write_text(chain[0].to_line() + "\n" + mutate(chain[1].to_plain()) + "\n")
    with pytest.raises(LedgerError, match=match) as info:
        read_ledger(path)
    assert f"{path}:2" in str(info.value)


NUMERIC_FIELDS = ("seq", "round", "epsilon", "delta", "event.noise_multiplier",
                  "event.sample_rate", "event.steps", "event.max_grad_norm", "event.delta",
                  "event.round")


def _with(plain: dict, path: str, value) -> dict:
    """``plain`` (an entry's plain form) with the field at ``path`` set to ``value``."""
    out = json.loads(json.dumps(plain))
    where = out
    *parents, last = path.split(".")
    for key in parents:
        where = where[key]
    where[last] = value
    return out


@pytest.mark.parametrize(
    ("path", "value"),
    [("delta", math.nan), ("delta", math.inf), ("delta", -math.inf), ("delta", 0.0),
     ("delta", 2.0), ("delta", -1e-5), ("epsilon", math.nan), ("epsilon", math.inf),
     ("epsilon", -5.0), ("event.max_grad_norm", math.inf), ("event.max_grad_norm", math.nan),
     ("event.noise_multiplier", math.nan), ("event.noise_multiplier", math.inf),
     ("event.sample_rate", math.nan), ("event.delta", math.inf), ("event.steps", 1e300),
     ("seq", 0), ("seq", 2**60), ("round", -1), ("event.round", 2**60)],
)
def test_a_non_finite_or_out_of_range_number_is_refused_naming_its_field(path, value) -> None:
    """NaN, infinities (JSON's ``NaN``/``Infinity``) and numbers outside a field's range
    are refused when the line is read, as a LedgerError naming the field: no entry
    whose canonical bytes cannot be computed, or whose figures no accountant takes,
    gets as far as a chain check or an audit."""
    line = json.dumps(_with(build(1)[0].to_plain(), path, value))  # NaN, Infinity as Python
    field = path.split(".")[-1]
    with pytest.raises(LedgerError, match=rf"\b{field}\b"):
        loads_jsonl(line, "hostile")


@settings(max_examples=200, deadline=None)
@given(path=st.sampled_from(NUMERIC_FIELDS),
       value=st.one_of(st.floats(allow_nan=True, allow_infinity=True, allow_subnormal=True),
                       st.integers(-(2**70), 2**70)))
def test_any_number_in_any_field_parses_in_range_or_is_refused(path, value) -> None:
    """Whatever number a hostile line puts in any numeric field: the line is refused
    with a LedgerError, or it parses into an entry whose canonical line, hash and
    chain check all compute."""
    line = json.dumps(_with(build(1)[0].to_plain(), path, value))
    try:
        (entry,) = loads_jsonl(line, "hostile")
    except LedgerError:
        return
    assert entry.to_line() and entry.hash()
    assert math.isfinite(entry.delta) and 0 < entry.delta < 1
    check_chain([entry], KEY.public_bytes(), client_id=CID)  # a verdict, never a raise


def test_a_missing_ledger_file_is_named(tmp_path) -> None:
    with pytest.raises(LedgerError, match="does not exist"):
        read_ledger(tmp_path / "nope.jsonl")


def test_roster_parsing(tmp_path) -> None:
    doc = {"federation_id": FED, "members": [
        {"id": 1, "name": CID, "public_key": KEY.public_bytes().hex()},
    ]}
    roster = SignerRoster.from_json(json.dumps(doc))
    assert roster.federation_id == FED and roster.keys == {CID: KEY.public_bytes()}
    with pytest.raises(LedgerError, match="not a roster file"):
        SignerRoster.from_json("{}")
    twice = {**doc, "members": doc["members"] * 2}
    with pytest.raises(LedgerError, match="duplicate member ids"):
        SignerRoster.from_json(json.dumps(twice))
    other = SigningKey.generate().public_bytes().hex()
    same_name = {**doc, "members": [*doc["members"],
                                    {"id": 2, "name": CID, "public_key": other}]}
    with pytest.raises(LedgerError, match="share a name"):
        SignerRoster.from_json(json.dumps(same_name))
    short = {**doc, "members": [{"id": 1, "name": CID, "public_key": "ab"}]}
    with pytest.raises(LedgerError, match="not 32 bytes"):
        SignerRoster.from_json(json.dumps(short))
    with pytest.raises(LedgerError, match="does not exist"):
        SignerRoster.read(tmp_path / "roster.json")


def test_the_ledger_and_verifier_import_neither_flwr_nor_torch() -> None:
    """An auditor's tools read files: they must not depend on the federation's runtime."""
    import subprocess
    import sys

    code = ("import sys, bract.records.ledger, bract.audit.verify, bract.audit.report; "
            "print(sorted(m for m in ('flwr', 'torch', 'opacus') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"
