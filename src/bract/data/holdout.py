"""Training / held-out splits decided by each privacy unit's own identity.

A hospital's records are split into training and held-out by a function of each
unit's stable identity alone (a record's path, or its patient's id), never of the
other records or of anything the coordinator chooses (its seed, its run config).
Adding or removing one record (one patient) therefore changes no other record's
membership, so two neighbouring datasets give training sets that differ by exactly
that record (patient) or not at all, which is what DP-SGD's per-unit epsilon
assumes; the held-out records are covered by the released metrics' own mechanism.

The rule: unit ``u`` is held out when the first 8 bytes of
``SHA-256(HELD_OUT_DOMAIN + u)`` (or of ``HMAC-SHA-256(key, HELD_OUT_DOMAIN + u)``
when the hospital gives a key of its own), read as a big-endian integer, are below
``test_fraction * 2**64``. Each unit is held out with probability ``test_fraction``
over the hash, independently of its label, so every class's held-out share is
``test_fraction`` in expectation (not exactly: an exact per-class quota would make
one record's membership depend on the others').
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence
from fractions import Fraction

import numpy as np

from bract.data.errors import DataError

__all__ = ["HELD_OUT_DOMAIN", "check_test_fraction", "held_out_mask", "split_by_identity"]

#: Prefix of every hashed identity (separates this use of SHA-256 from any other).
HELD_OUT_DOMAIN = b"bract held-out split v1\x00"


def check_test_fraction(test_fraction: float) -> None:
    """Raise :class:`DataError` unless ``test_fraction`` is a number in ``(0, 1)``."""
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)) or not (
            0.0 < test_fraction < 1.0):
        raise DataError(f"test_fraction must be a number in (0, 1), got {test_fraction!r}")


def held_out_mask(
    unit_ids: Sequence[str], test_fraction: float, *, key: bytes | str = b""
) -> np.ndarray:
    """Boolean array: whether each record (given by its unit's id) is held out.

    Guarantee: entry ``i`` is a function of ``unit_ids[i]``, ``test_fraction`` and
    ``key`` only (the rule in this module's docstring), so records of one unit are
    never separated and no record's membership depends on any other record. Ids are
    compared as text (``str(id)``). ``key`` (bytes, or text as UTF-8), when not empty,
    is the hospital's own secret: it turns the hash into HMAC-SHA-256, so nobody
    without it can tell a unit's side from its id. Raises :class:`DataError` unless
    ``0 < test_fraction < 1``.
    """
    check_test_fraction(test_fraction)
    secret = key.encode() if isinstance(key, str) else bytes(key)
    threshold = int(Fraction(test_fraction) * 2**64)
    decided: dict[str, bool] = {}
    out = np.zeros(len(unit_ids), dtype=bool)
    for i, unit in enumerate(unit_ids):
        text = str(unit)
        if text not in decided:
            message = HELD_OUT_DOMAIN + text.encode()
            digest = (hmac.new(secret, message, hashlib.sha256).digest() if secret
                      else hashlib.sha256(message).digest())
            decided[text] = int.from_bytes(digest[:8], "big") < threshold
        out[i] = decided[text]
    return out


def split_by_identity(
    unit_ids: Sequence[str], test_fraction: float, *, key: bytes | str = b""
) -> tuple[np.ndarray, np.ndarray]:
    """Sorted ``int64`` indices of the training and held-out records under
    :func:`held_out_mask` (same guarantee; either may be empty)."""
    held = held_out_mask(unit_ids, test_fraction, key=key)
    return np.flatnonzero(~held).astype(np.int64), np.flatnonzero(held).astype(np.int64)
