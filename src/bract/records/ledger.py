"""Signed, hash-chained privacy ledgers: one chain of entries per hospital.

Each entry records one DP-SGD event a hospital ran, the epsilon it reported after
it, and two bindings:

* ``prev_hash``: SHA-256 over the previous entry's canonical bytes (signature
  included). The first entry links to a genesis value that binds the hospital's
  id and the federation its chain began in, so a chain cannot be moved to another
  hospital, and no line can be removed, duplicated, reordered or inserted without
  breaking a link.

A chain is the hospital's *lifetime* record for one dataset: it spans runs and
federations (each entry names, signed, the federation that spent it), so a
hospital that joins a second federation on the same data carries its spent
budget along and every verifier sees it.
* ``signature``: Ed25519, by the hospital's identity key (the same key as for
  secure aggregation), over the canonical bytes of every other field. Without
  the key nobody (the server included) can edit an entry or forge one.

What a verifier must know from elsewhere: the hospital's public key (from a
roster it trusts) and, to detect a truncated tail, how many entries to expect
(a valid prefix of a chain is itself a valid chain).

Canonical bytes are compact JSON with sorted keys (floats in Python's shortest
round-trip form, ``inf`` as the string ``"inf"``), prefixed by a domain tag.
SHA-256 and Ed25519 come from ``cryptography`` via :mod:`bract.secagg.crypto`.
Pure: imports neither flwr nor torch.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bract.privacy.accounting import DpSgdEvent, PrivacyError
from bract.records.roster import Roster
from bract.secagg.crypto import SigningKey, sha256, verify_signature
from bract.secagg.errors import SecAggError

LEDGER_FORMAT = "bract.ledger.v1"
_TAG_GENESIS = b"bract.ledger.v1/genesis\x00"
_TAG_SIGN = b"bract.ledger.v1/entry\x00"
_TAG_HASH = b"bract.ledger.v1/hash\x00"
_FIELDS = (
    "format", "federation_id", "client_id", "seq", "round", "event", "epsilon", "delta",
    "accountant", "prev_hash", "signature",
)


#: The largest sequence number, round or step count an entry may hold: JSON's exact
#: integer range. No run comes near it; a larger one is a corrupt or hostile line.
MAX_COUNT = 2**53


class LedgerError(ValueError):
    """A ledger is malformed or its chain does not verify; the message says where."""


def _canonical(data: Any) -> bytes:
    return json.dumps(
        data, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode("ascii")


def _eps_plain(x: float) -> float | str:
    return x if math.isfinite(x) else "inf"


def genesis_hash(federation_id: str, client_id: str) -> str:
    """The ``prev_hash`` of a hospital's first entry: binds the hospital and the
    federation its chain began in."""
    body = _canonical({"federation_id": federation_id, "client_id": client_id})
    return sha256(_TAG_GENESIS + body).hex()


@dataclass(frozen=True)
class LedgerEntry:
    """One signed link of a hospital's privacy ledger (immutable).

    ``seq`` is the entry's 1-based position in the hospital's chain; ``epsilon``
    is what the hospital reported after this entry (covering entries 1..seq) at
    ``delta`` with ``accountant``; ``signature`` is hex, or ``""`` when the
    hospital had no identity key (such an entry is hash-chained but unsigned, and
    a verifier with a public key rejects it).
    """

    federation_id: str
    client_id: str
    seq: int
    round: int
    event: DpSgdEvent
    epsilon: float
    delta: float
    accountant: str
    prev_hash: str
    signature: str = field(default="")

    def signed_plain(self) -> dict[str, Any]:
        """Every field except the signature, as plain data (what is signed)."""
        return {
            "format": LEDGER_FORMAT,
            "federation_id": self.federation_id,
            "client_id": self.client_id,
            "seq": self.seq,
            "round": self.round,
            "event": self.event.to_plain(),
            "epsilon": _eps_plain(self.epsilon),
            "delta": self.delta,
            "accountant": self.accountant,
            "prev_hash": self.prev_hash,
        }

    def signing_bytes(self) -> bytes:
        """The bytes the hospital's Ed25519 key signs (domain-tagged canonical JSON)."""
        return _TAG_SIGN + _canonical(self.signed_plain())

    def to_plain(self) -> dict[str, Any]:
        """Plain JSON-able dict: :meth:`signed_plain` plus ``signature``."""
        return {**self.signed_plain(), "signature": self.signature}

    def to_line(self) -> str:
        """One canonical JSONL line (no newline)."""
        return _canonical(self.to_plain()).decode("ascii")

    def hash(self) -> str:
        """SHA-256 (hex) over the entry's canonical bytes, signature included."""
        return sha256(_TAG_HASH + _canonical(self.to_plain())).hex()

    @classmethod
    def from_plain(cls, data: Any) -> LedgerEntry:
        """Parse one entry; raises :class:`LedgerError` naming the bad or missing field.

        Guarantee: every number of a returned entry is finite and in range (``seq`` in
        [1, 2**53], rounds and steps in [0, 2**53], ``delta`` in (0, 1), ``epsilon`` a
        finite number >= 0 or ``"inf"``, the event's noise multiplier >= 0, its sample
        rate in (0, 1] and its clipping norm > 0), so its canonical bytes, hash and
        signature check can always be computed; anything else, NaN and infinities
        included, is refused here, naming the field."""
        if not isinstance(data, dict):
            raise LedgerError(f"a ledger entry must be a JSON object, got {type(data).__name__}")
        unknown = sorted(set(data) - set(_FIELDS))
        missing = sorted(set(_FIELDS) - set(data))
        if unknown:
            raise LedgerError(f"unknown ledger entry field(s) {unknown}")
        if missing:
            raise LedgerError(f"ledger entry lacks field(s) {missing}")
        if data["format"] != LEDGER_FORMAT:
            raise LedgerError(
                f"ledger entry format {data['format']!r} is not {LEDGER_FORMAT!r}"
            )
        for key in ("federation_id", "client_id", "accountant", "prev_hash", "signature"):
            if not isinstance(data[key], str):
                raise LedgerError(f"ledger entry field {key!r} must be a string")
        for key, low in (("seq", 1), ("round", 0)):
            value = data[key]
            if isinstance(value, bool) or not isinstance(value, int):
                raise LedgerError(f"ledger entry field {key!r} must be an integer")
            if not low <= value <= MAX_COUNT:
                raise LedgerError(f"ledger entry field {key!r} must lie in [{low}, 2**53] "
                                  f"(got {_shown(value)})")
        if not _is_hex(data["prev_hash"], 64):
            raise LedgerError("ledger entry field 'prev_hash' must be 64 hex digits")
        if data["signature"] and not _is_hex(data["signature"], 128):
            raise LedgerError("ledger entry field 'signature' must be 128 hex digits or empty")
        eps = data["epsilon"]
        if eps == "inf":
            eps = math.inf
        elif not (_is_number(eps) and math.isfinite(eps) and eps >= 0):
            raise LedgerError("ledger entry field 'epsilon' must be a finite number >= 0, or "
                              f"the string 'inf' (got {_shown(eps)})")
        delta = data["delta"]
        if not (_is_number(delta) and 0 < delta < 1):
            raise LedgerError("ledger entry field 'delta' must be a number strictly between "
                              f"0 and 1 (got {_shown(delta)})")
        try:
            event = DpSgdEvent.from_plain(data["event"])
        except PrivacyError as exc:
            raise LedgerError(f"ledger entry event: {exc}") from None
        _check_event_ranges(event)
        return cls(
            data["federation_id"], data["client_id"], data["seq"], data["round"], event,
            float(eps), float(delta), data["accountant"], data["prev_hash"], data["signature"],
        )


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _shown(value: Any) -> str:
    """A parsed value as an error message shows it: short, whatever a file held."""
    if isinstance(value, int) and value.bit_length() > 128:
        return f"an integer of {value.bit_length()} bits"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _check_event_ranges(event: DpSgdEvent) -> None:
    """What :class:`DpSgdEvent` leaves open and an accountant or a canonical line
    cannot take: an infinite clipping norm, a count beyond 2**53."""
    if not math.isfinite(event.max_grad_norm):
        raise LedgerError("ledger entry event field 'max_grad_norm' must be a finite number "
                          f"> 0 (got {_shown(event.max_grad_norm)})")
    for key, value in (("steps", event.steps), ("round", event.round)):
        if not 0 <= value <= MAX_COUNT:
            raise LedgerError(f"ledger entry event field {key!r} must lie in [0, 2**53] "
                              f"(got {_shown(value)})")


def _is_hex(text: str, length: int) -> bool:
    return len(text) == length and all(c in "0123456789abcdef" for c in text)


def _signing_key(key: SigningKey | bytes) -> SigningKey:
    return key if isinstance(key, SigningKey) else SigningKey.from_bytes(key)


def append_entry(
    chain: Sequence[LedgerEntry],
    event: DpSgdEvent,
    *,
    epsilon: float,
    delta: float,
    accountant: str,
    federation_id: str,
    client_id: str,
    signing_key: SigningKey | bytes | None,
) -> tuple[LedgerEntry, ...]:
    """``chain`` with a new entry for ``event`` appended, linked and signed.

    Guarantee: the new entry links to the chain's last entry (or to the genesis
    value of ``(federation_id, client_id)``) and carries an Ed25519 signature by
    ``signing_key`` over all its fields, ``federation_id`` (the federation that
    spends it) included; with ``signing_key=None`` it is linked but unsigned. The
    chain may continue in another federation, and rounds restart with each run;
    an event of another hospital is refused.
    """
    if event.client_id != client_id:
        raise LedgerError(
            f"event of {event.client_id!r} cannot go on the ledger of {client_id!r}"
        )
    if chain:
        last = chain[-1]
        if last.client_id != client_id:
            raise LedgerError(f"the chain belongs to {last.client_id!r}, not {client_id!r}")
        prev = last.hash()
    else:
        prev = genesis_hash(federation_id, client_id)
    entry = LedgerEntry(
        federation_id, client_id, len(chain) + 1, event.round, event, float(epsilon),
        float(delta), accountant, prev,
    )
    if signing_key is not None:
        signature = _signing_key(signing_key).sign(entry.signing_bytes()).hex()
        entry = dataclasses.replace(entry, signature=signature)
    return (*chain, entry)


@dataclass(frozen=True)
class ChainCheck:
    """Outcome of :func:`check_chain`: how many entries verified, and the first problem."""

    verified: int
    problem: str | None = None

    @property
    def ok(self) -> bool:
        """True when every entry verified and the length was as expected."""
        return self.problem is None


def check_chain(
    entries: Sequence[LedgerEntry],
    public_key: bytes | None,
    *,
    client_id: str,
    expected_length: int | None = None,
) -> ChainCheck:
    """Check one hospital's chain; reports the first entry that fails and why.

    Guarantee (with ``public_key`` from a trusted roster, Ed25519 unforgeable,
    SHA-256 collision resistant): a chain that passes is exactly a prefix of the
    sequence of entries that key's holder signed for this hospital's chain,
    unedited, in order, none missing, duplicated or inserted, each naming the
    federation that spent it; with ``expected_length`` it is the whole of it. The
    chain may span federations and runs (its entries in earlier ones are budget
    this hospital spent before). ``public_key=None`` checks links only (anyone can
    build a linked chain: it proves nothing about authorship).
    """
    prev = genesis_hash(entries[0].federation_id, client_id) if entries else ""
    for i, e in enumerate(entries):
        where = f"entry {i + 1} (seq {e.seq}, round {e.round})"
        if e.client_id != client_id:
            return ChainCheck(i, f"{where} belongs to {e.client_id!r}, not {client_id!r}: "
                                 "spliced in from another hospital's ledger")
        if e.seq != i + 1:
            kind = (
                "duplicated or out of order" if e.seq <= i
                else f"entries {i + 1}..{e.seq - 1} missing"
            )
            return ChainCheck(i, f"{where} has seq {e.seq} where {i + 1} was due: {kind}")
        if (e.event.client_id, e.event.round) != (e.client_id, e.round):
            return ChainCheck(i, f"{where} records an event of {e.event.client_id!r} round "
                                 f"{e.event.round}: the entry is inconsistent")
        if e.prev_hash != prev:
            return ChainCheck(i, f"{where} does not link to the entry before it: an entry was "
                                 "edited, removed, inserted or reordered before this point")
        if public_key is not None:
            if not e.signature:
                return ChainCheck(i, f"{where} is unsigned")
            try:
                verify_signature(public_key, bytes.fromhex(e.signature), e.signing_bytes(), where)
            except SecAggError:
                return ChainCheck(i, f"{where}: signature does not verify with {client_id}'s "
                                     "roster key (the entry was edited, or signed by another key)")
        prev = e.hash()
    n = len(entries)
    if expected_length is not None and n != expected_length:
        what = "truncated" if n < expected_length else "longer than recorded"
        return ChainCheck(n, f"{client_id}'s ledger has {n} entries where {expected_length} "
                             f"were recorded: {what}")
    return ChainCheck(n)


def verify_chain(
    entries: Sequence[LedgerEntry],
    public_key: bytes | None,
    *,
    client_id: str,
    expected_length: int | None = None,
) -> None:
    """:func:`check_chain`, raising :class:`LedgerError` with its problem on failure."""
    result = check_chain(
        entries, public_key, client_id=client_id, expected_length=expected_length,
    )
    if result.problem is not None:
        raise LedgerError(result.problem)


# --------------------------------------------------------------------------- files


def dumps_jsonl(entries: Iterable[LedgerEntry]) -> str:
    """Entries as JSONL text, one canonical line each."""
    return "".join(e.to_line() + "\n" for e in entries)


def loads_jsonl(text: str, source: str = "ledger") -> list[LedgerEntry]:
    """Parse JSONL text; a malformed line raises :class:`LedgerError` naming it.

    Guarantee: whatever the text holds, the only exception is :class:`LedgerError`,
    and every entry returned meets :meth:`LedgerEntry.from_plain`'s ranges."""
    out: list[LedgerEntry] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append(LedgerEntry.from_plain(json.loads(line)))
        except json.JSONDecodeError as exc:
            raise LedgerError(f"{source}:{lineno}: not JSON ({exc.msg})") from None
        except LedgerError as exc:
            raise LedgerError(f"{source}:{lineno}: {exc}") from None
        except (ValueError, RecursionError) as exc:  # an integer too long, nesting too deep
            raise LedgerError(f"{source}:{lineno}: not a usable JSON line "
                              f"({type(exc).__name__})") from None
    return out


def write_ledger(path: str | Path, entries: Iterable[LedgerEntry]) -> None:
    """Write entries to a JSONL file (not atomic; the Flower side writes atomically)."""
    Path(path).write_text(dumps_jsonl(entries), encoding="utf-8")


def read_ledger(path: str | Path) -> list[LedgerEntry]:
    """Read a JSONL ledger file; names the file and line of any malformed entry."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LedgerError(f"ledger file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise LedgerError(f"ledger file {path} is unreadable: {exc}") from None
    return loads_jsonl(text, str(path))


def by_client(entries: Iterable[LedgerEntry]) -> dict[str, list[LedgerEntry]]:
    """Entries of a merged ledger grouped per hospital, each in file order."""
    out: dict[str, list[LedgerEntry]] = {}
    for e in entries:
        out.setdefault(e.client_id, []).append(e)
    return out


# -------------------------------------------------------------------------- roster


@dataclass(frozen=True)
class SignerRoster:
    """Who may sign ledgers: hospital name -> Ed25519 public key, for one federation.

    Read from the federation's roster file (``{"federation_id", "members": [{id,
    name, public_key}]}``, written by ``bract simulate`` / ``bract deploy``); a
    hospital's ledger ``client_id`` is its member ``name``. A verifier must take
    this file from the hospitals' operators, not from the party it audits.
    """

    federation_id: str
    keys: dict[str, bytes]

    @classmethod
    def of(cls, roster: Roster) -> SignerRoster:
        """The signers of a parsed roster (one name per member, names distinct)."""
        keys = roster.signers()
        if len(keys) != len(roster.keys):
            raise LedgerError("roster: two members share a name; names must be unique")
        return cls(roster.federation_id, keys)

    @classmethod
    def from_json(cls, text: str, source: str = "roster") -> SignerRoster:
        """Parse a roster file's text (:class:`bract.records.roster.Roster`); names what
        is wrong with a malformed one."""
        try:
            roster = Roster.from_json(text)
        except ValueError as exc:
            raise LedgerError(f"{source} is not a roster file: {exc}") from None
        try:
            return cls.of(roster)
        except LedgerError as exc:
            raise LedgerError(f"{source}: {str(exc).removeprefix('roster: ')}") from None

    @classmethod
    def read(cls, path: str | Path) -> SignerRoster:
        """Read a roster file."""
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise LedgerError(f"roster file {path} does not exist") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise LedgerError(f"roster file {path} is unreadable: {exc}") from None
        return cls.from_json(text, str(path))
