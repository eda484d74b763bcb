"""A hospital's reply as the server reads it: field by field, trusting none of it.

Every value in a reply is the hospital's choice, and a broken or hostile hospital
can put anything there: a list where a count belongs, ``inf``, a text of 200 000
``[``, a weights array that is not a ``.npy`` file, a reason holding terminal
escape sequences or ``rich`` markup. The functions here read those values into what
the server records, each one checked against the range the run's report is read
back with (:func:`bract.records.report.is_count` for counts), so that a value the
server accepts is never one its own report, checkpoint or resume refuses later.

Guarantee: each reader returns checked values or raises :class:`ReplyError` (a
``ValueError``) naming the field; it raises nothing else for any input. The round
loop turns that error, and any other exception while it reads one hospital's reply
(:meth:`bract.flower.server.Federation`), into that hospital being recorded as
failed this round with a one-line reason; the federation goes on.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import numpy as np

from bract.records.ledger import LedgerEntry
from bract.records.report import MAX_COUNT, is_count
from bract.records.text import one_line

__all__ = [
    "MAX_DECISION_TEXT", "MAX_LEDGER_TEXT", "MAX_NAME", "ReplyError", "count_field",
    "json_field", "name_field", "read_clear_metrics", "read_update", "real_field",
    "signed_epsilon", "text_field",
]

#: The longest hospital name (``client-id``) a reply may carry.
MAX_NAME = 128
#: The longest ledger text (``ledger``, ``signed-ledger``) a reply may carry: a
#: hospital's lifetime record, some 300 bytes per mechanism event.
MAX_LEDGER_TEXT = 64 * 2**20
#: The longest budget decision text (``decision``) a reply may carry.
MAX_DECISION_TEXT = 64 * 2**10

_MISSING = object()


class ReplyError(ValueError):
    """A hospital's reply holds a value the server cannot accept; the message names the
    field (one line, bounded: it is recorded as the hospital's failure reason)."""


def _shown(value: Any) -> str:
    """A hostile value in a message: its type for containers, else a short repr."""
    if isinstance(value, list | tuple | dict | bytes):
        return f"a {type(value).__name__}"
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"an integer of {value.bit_length()} bits"
    return one_line(repr(value), 40)


def count_field(record: Mapping[str, Any], key: str, *, low: int = 0,
                bounded: bool = True, default: Any = _MISSING) -> int:
    """``record[key]`` as a count: an ``int`` (not a ``bool``) from ``low`` to 2**53, the
    range report.json's counts are read back in (``bounded`` false: no upper bound, for
    a figure the server caps itself and never records); ``default`` when absent
    (absent without one: :class:`ReplyError`)."""
    if key not in record:
        if default is _MISSING:
            raise ReplyError(f"{key!r} is missing")
        return default
    value = record[key]
    whole = not isinstance(value, bool) and isinstance(value, int)
    if not (whole and value >= low and (is_count(value) or not bounded)):
        span = f"from {low} to 2**53" if bounded else f"of at least {low}"
        raise ReplyError(f"{key!r} is {_shown(value)}, not a whole number {span}")
    return value


def real_field(record: Mapping[str, Any], key: str, *, low: float = 0.0,
               high: float = math.inf, allow_inf: bool = False,
               default: Any = _MISSING) -> float:
    """``record[key]`` as a float in ``[low, high]``: an ``int`` or ``float`` (not a
    ``bool``), finite, or with ``allow_inf`` also ``inf`` (the number or the text
    ``"inf"``, as the hospital writes a non-finite figure); NaN and every other value
    are a :class:`ReplyError`. ``default`` when absent (else absent is an error)."""
    if key not in record:
        if default is _MISSING:
            raise ReplyError(f"{key!r} is missing")
        return default
    value = record[key]
    if allow_inf and value == "inf":
        return math.inf
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if ok and isinstance(value, int) and abs(value) > 2**1000:
        ok = False  # beyond any float
    number = float(value) if ok else math.nan
    if not ok or math.isnan(number) or not (
            math.isfinite(number) or (allow_inf and number == math.inf)) \
            or not low <= number <= high:
        span = f"from {low:g} to {high:g}" + (" or inf" if allow_inf else "")
        raise ReplyError(f"{key!r} is {_shown(value)}, not a number {span}")
    return number


def text_field(record: Mapping[str, Any], key: str, *, max_chars: int,
               default: Any = _MISSING) -> str:
    """``record[key]``: a text of at most ``max_chars`` characters (:class:`ReplyError`
    otherwise; ``default`` when absent)."""
    if key not in record:
        if default is _MISSING:
            raise ReplyError(f"{key!r} is missing")
        return default
    value = record[key]
    if not isinstance(value, str):
        raise ReplyError(f"{key!r} is {_shown(value)}, not a text")
    if len(value) > max_chars:
        raise ReplyError(f"{key!r} holds {len(value)} characters, more than {max_chars}")
    return value


def json_field(record: Mapping[str, Any], key: str, *, max_chars: int,
               default: str) -> Any:
    """``record[key]`` (a text of at most ``max_chars``; ``default`` when absent) parsed
    as JSON; malformed JSON, an integer too long to read and nesting too deep for the
    parser are a :class:`ReplyError`, never the parser's own exception."""
    text = text_field(record, key, max_chars=max_chars, default=default)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ReplyError(f"{key!r} is not JSON ({exc.msg})") from None
    except (ValueError, RecursionError) as exc:  # a 5000-digit integer, "[" * 10**5
        raise ReplyError(f"{key!r} is not usable JSON ({type(exc).__name__})") from None


def name_field(record: Mapping[str, Any], key: str) -> str:
    """``record[key]``: a hospital's name, at most :data:`MAX_NAME` characters of
    printable text without surrounding or repeated whitespace (what
    :func:`bract.records.text.one_line` leaves unchanged); empty when absent. A name
    holding a control character, a line break or an escape sequence is a
    :class:`ReplyError`: the server never records it nor shows it."""
    value = text_field(record, key, max_chars=MAX_NAME, default="")
    if one_line(value, MAX_NAME) != value:
        raise ReplyError(f"{key!r} is {_shown(value)}, not a name of printable characters")
    return value


def read_clear_metrics(record: Mapping[str, Any], names: Collection[str]) -> dict[str, float]:
    """A hospital's metrics released in clear: exactly the keys ``names`` (the released
    sums, :data:`bract.flower.records.AGGREGATED_METRICS`), each an ``int`` or
    ``float`` (not a ``bool``), finite and of magnitude at most 2**53 (noised sums of
    per-record values may be negative; no honest sum comes near the bound).
    Anything else is a :class:`ReplyError` naming the metric."""
    keys = set(record.keys())
    extra, missing = sorted(keys - set(names)), sorted(set(names) - keys)
    if extra or missing:
        what = (f"unknown metric {one_line(extra[0], 40)!r}" if extra
                else f"metric {missing[0]!r} is missing")
        raise ReplyError(f"released metrics: {what}")
    out: dict[str, float] = {}
    for key in names:
        value = record[key]
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        if ok and isinstance(value, int):
            ok = abs(value) <= MAX_COUNT
        if not ok or not (math.isfinite(value) and abs(value) <= MAX_COUNT):
            raise ReplyError(f"released metric {key!r} is {_shown(value)}, not a finite "
                             "number of magnitude at most 2**53")
        out[key] = float(value)
    return out


def _npy(data: bytes) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """The shape, order, dtype and data offset a ``.npy`` header declares."""
    fp = io.BytesIO(data)
    version = np.lib.format.read_magic(fp)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(fp)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(fp)
    else:
        raise ValueError(f".npy version {version}")
    return tuple(shape), bool(fortran), np.dtype(dtype), fp.tell()


def read_update(record: Mapping[str, Any], global_weights: Mapping[str, np.ndarray],
                stype: str = "numpy.ndarray") -> dict[str, np.ndarray]:
    """A hospital's weights (``bract.local``'s arrays) with the global model's names,
    dtypes and shapes.

    Guarantee: each array is read from its own bytes only after its ``.npy`` header
    has been checked to declare the global array's dtype and shape and exactly that
    many bytes follow, so nothing is allocated from a size the hospital chose and no
    ``np.load`` runs on its bytes (no pickle, no ``.npz``); an array of another
    serialisation type (``stype``), a name the global model lacks or lacks a name of
    it, bytes that are not a ``.npy`` file, a header of another dtype or shape and a
    body of another length are a :class:`ReplyError` naming the array."""
    names = list(record.keys())
    if set(names) != set(global_weights):
        odd = sorted(set(names) ^ set(global_weights))
        raise ReplyError(f"weights of the wrong shape (array {one_line(odd[0], 60)!r} is "
                         "in only one of the update and the global model)")
    out: dict[str, np.ndarray] = {}
    for name in global_weights:
        arr = record[name]
        want = np.asarray(global_weights[name])
        if getattr(arr, "stype", None) != stype:
            raise ReplyError(f"weights {name!r} are not a numpy array "
                             f"(type {_shown(getattr(arr, 'stype', None))})")
        data = getattr(arr, "data", None)
        if not isinstance(data, bytes):
            raise ReplyError(f"weights {name!r} carry no bytes")
        try:
            shape, fortran, dtype, offset = _npy(data)
        except Exception:  # numpy's header parser: ValueError, SyntaxError, ...
            raise ReplyError(f"weights {name!r} are not a .npy array") from None
        if shape != want.shape:
            raise ReplyError(f"weights of the wrong shape ({name!r} is "
                             f"{one_line(str(shape), 60)}, the global model's is {want.shape})")
        if dtype != want.dtype:
            raise ReplyError(f"{name!r} is {one_line(str(dtype), 40)}, the global model's is "
                             f"{want.dtype}")
        body = memoryview(data)[offset:]
        if len(body) != want.nbytes:
            raise ReplyError(f"weights {name!r} hold {len(body)} bytes, not {want.nbytes}")
        flat = np.frombuffer(body, dtype=dtype, count=want.size)
        out[name] = flat.reshape(want.shape, order="F" if fortran else "C").copy()
    return out


def signed_epsilon(chain: Sequence[LedgerEntry], trained: bool, reported: float,
                   delta: float) -> float:
    """The epsilon the server records for a hospital: the figure its verified, signed
    chain carries, not the unsigned one its report states.

    * An empty chain: 0 (no mechanism ran on its data, by its own ledger); a reply
      that says it trained has an entry for this round, so a trained reply with an
      empty chain is a :class:`ReplyError`.
    * A reply that trained: its newest entry is this round's, signed with the epsilon
      after it; a report stating another figure is a :class:`ReplyError`.
    * A reply that did not train (a refusal): the newest entry's epsilon when that
      entry is at the run's ``delta``; otherwise (a chain signed at another delta)
      the reported figure, which the reader has checked is a number >= 0 or ``inf``.
    """
    if not chain:
        if trained:
            raise ReplyError("it says it trained, but its signed ledger has no entry")
        return 0.0
    newest = chain[-1]
    if trained:
        if not (reported == newest.epsilon
                or math.isclose(reported, newest.epsilon, rel_tol=1e-12)):
            raise ReplyError(f"its epsilon {one_line(repr(reported), 40)} is not the "
                             f"{newest.epsilon!r} its newest signed entry carries")
        return float(newest.epsilon)
    return float(newest.epsilon) if newest.delta == delta else reported
