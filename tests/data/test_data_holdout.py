"""held_out_mask / split_by_identity: each unit's side is a function of its own id
(and the hospital's key) only, checked with hypothesis."""

from __future__ import annotations

import hashlib
import hmac

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bract.data import DataError, held_out_mask, split_by_identity
from bract.data.holdout import HELD_OUT_DOMAIN

ids = st.text(min_size=1, max_size=12)


def test_the_documented_rule_sha256_prefix_below_the_fraction() -> None:
    """Pinned to the rule in bract.data.holdout's docstring, so a hospital's split
    stays the same from one bract version to the next."""
    units = [f"file:normal/img{k:03d}.png" for k in range(200)]
    for fraction in (0.2, 0.5):
        expected = [int.from_bytes(hashlib.sha256(HELD_OUT_DOMAIN + u.encode()).digest()[:8],
                                   "big") < int(fraction * 2**64) for u in units]
        assert held_out_mask(units, fraction).tolist() == expected
    keyed = [int.from_bytes(hmac.new(b"k", HELD_OUT_DOMAIN + u.encode(), hashlib.sha256)
                            .digest()[:8], "big") < int(0.2 * 2**64) for u in units]
    assert held_out_mask(units, 0.2, key=b"k").tolist() == keyed
    assert held_out_mask(units, 0.2, key="k").tolist() == keyed  # text keys as UTF-8


@settings(max_examples=200, deadline=None)
@given(st.lists(ids, max_size=40), ids, st.integers(0, 40), st.floats(0.05, 0.95),
       st.binary(max_size=8))
def test_adding_one_unit_changes_no_other_units_side(units, extra, at, fraction, key) -> None:
    """Property: inserting a record of any unit (new or existing) anywhere leaves every
    other record's side as it was, and records of one unit share a side."""
    before = held_out_mask(units, fraction, key=key)
    grown = [*units[:at], extra, *units[at:]]
    after = held_out_mask(grown, fraction, key=key)
    at = min(at, len(units))
    assert np.array_equal(np.delete(after, at), before)
    for u in set(grown):
        sides = {bool(s) for s, g in zip(after, grown, strict=True) if g == u}
        assert len(sides) == 1


def test_about_the_fraction_held_out_in_every_class() -> None:
    """Each unit is held out with probability test_fraction, independently of its
    label: overall and per class the share is within 5 standard deviations."""
    rng = np.random.default_rng(0)
    units = [f"file:c/{k}.png" for k in range(20000)]
    labels = rng.integers(0, 3, len(units))
    for fraction in (0.1, 0.2, 0.5):
        held = held_out_mask(units, fraction)
        for mask in (np.ones(len(units), bool), *(labels == c for c in range(3))):
            n = int(mask.sum())
            sd = np.sqrt(n * fraction * (1 - fraction))
            assert abs(held[mask].sum() - fraction * n) <= 5 * sd


def test_a_key_of_the_hospitals_own_redraws_the_split() -> None:
    units = [f"folder:patient{k}" for k in range(400)]
    plain, keyed = held_out_mask(units, 0.3), held_out_mask(units, 0.3, key=b"hospital secret")
    assert (plain != keyed).sum() > 50
    assert np.array_equal(keyed, held_out_mask(units, 0.3, key=b"hospital secret"))


def test_split_indices_and_bad_fractions() -> None:
    units = ["a", "b", "a", "c", "d"]
    train, held = split_by_identity(units, 0.5)
    mask = held_out_mask(units, 0.5)
    assert train.dtype == held.dtype == np.int64
    assert train.tolist() == np.flatnonzero(~mask).tolist()
    assert held.tolist() == np.flatnonzero(mask).tolist()
    for bad in (0, 1, 1.5, -0.1, True, "0.2", float("nan")):
        with pytest.raises(DataError, match=r"test_fraction must be a number in \(0, 1\)"):
            held_out_mask(units, bad)
