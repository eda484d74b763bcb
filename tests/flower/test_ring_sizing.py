"""The secure-aggregation ring is sized from what the hospitals already publish.

Properties: a hospital's weight bound is at least its FedAvg weight and a function of
its batch size and sample rate alone; the server's encoding for a round carries every
participant's weight at its bound without wrapping; and a hospital's refusal of a ring
depends on its public bound only, so varying the max weight teaches the server nothing.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bract.flower.client import ring_refuses
from bract.flower.records import PRIVACY_REPORT, privacy_report_record, read_privacy_report
from bract.flower.secagg_server import DEFAULT_MAX_WEIGHT, SecAggSettings
from bract.privacy import PrivacyLedger, TrainingPlan
from bract.privacy.accounting import BudgetDecision
from bract.secagg.encoding import decode_sum, encode

SIZES = st.integers(1, 200_000)
BATCHES = st.integers(1, 4096)


@settings(max_examples=300, deadline=None)
@given(SIZES, BATCHES, st.integers(1, 3))
def test_the_weight_bound_covers_the_weight_and_follows_from_public_figures(
        n: int, batch: int, epochs: int) -> None:
    plan = TrainingPlan(1, epochs, n, batch)
    assert plan.weight_bound >= plan.dataset_size
    # batch / sample rate: what the report's sample rate and the batch size give.
    assert plan.weight_bound == round(batch / plan.sample_rate)
    # Any dataset with the same sample rate has the same bound.
    other = TrainingPlan(1, epochs, plan.weight_bound, batch)
    assert other.sample_rate == plan.sample_rate
    assert other.weight_bound == plan.weight_bound


@settings(max_examples=300, deadline=None)
@given(SIZES, SIZES, BATCHES, st.integers(1, 2**21))
def test_a_refusal_depends_on_the_public_bound_only(n1: int, n2: int, batch: int,
                                                    limit: int) -> None:
    a, b = TrainingPlan(1, 1, n1, batch), TrainingPlan(1, 1, n2, batch)
    if a.sample_rate == b.sample_rate:
        assert ring_refuses(a, limit) == ring_refuses(b, limit)
    if not ring_refuses(a, limit):
        assert a.dataset_size <= limit  # the ring carries its weight


@settings(max_examples=150, deadline=None)
@given(st.lists(st.one_of(st.none(), st.tuples(SIZES, BATCHES)), min_size=3, max_size=12),
       st.sampled_from([1.0, 8.0]), st.sampled_from([8, 16]), st.data())
def test_a_round_sized_from_the_reports_carries_every_weight_without_wrapping(
        reports: list, clip: float, frac_bits: int, data: st.DataObject) -> None:
    plans = [None if r is None else TrainingPlan(1, 1, *r) for r in reports]
    bounds = [None if p is None else p.weight_bound for p in plans]
    sec = SecAggSettings("f", {}, clip=clip, frac_bits=frac_bits)
    enc = sec.encoding(bounds)
    assert all(enc.max_weight >= b for b in bounds if b is not None)
    if None in bounds:
        assert enc.max_weight >= DEFAULT_MAX_WEIGHT
    n = len(plans)
    ring = enc.ring_bits_for(n)
    # Smallest: 32 bits whenever the bound fits it.
    if enc.required_bits(n) <= 32:
        assert ring == 32
    # No participant refuses the ring it was sized for.
    assert not any(ring_refuses(p, enc.max_weight) for p in plans if p is not None)
    # Everyone at the extreme (+clip or -clip, weight at its bound): the sum is exact.
    sign = data.draw(st.sampled_from([-1.0, 1.0]))
    weights = [enc.max_weight if b is None else b for b in bounds]
    total = sum(encode(np.full(2, sign * clip), w, enc, ring) for w in weights)
    values, weight = decode_sum(np.asarray(total, dtype=total.dtype), ring, frac_bits)
    assert weight == sum(weights)
    assert np.allclose(values, sign * clip * sum(weights))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.none(), st.integers(1, 2**90)), min_size=1, max_size=40),
       st.sampled_from([0.5, 1.0, 8.0, 100.0]), st.integers(0, 24))
def test_no_report_can_leave_a_round_without_a_ring(bounds: list, clip: float,
                                                     frac_bits: int) -> None:
    """Whatever the hospitals report (a forged bound of 2^90 included), the round gets a
    ring: the max weight is the largest report, capped at what the 64-bit ring carries
    for that many hospitals, so every report under the cap is carried whole and a
    hospital above it refuses before training instead of aborting the round."""
    sec = SecAggSettings("f", {}, clip=clip, frac_bits=frac_bits)
    enc = sec.encoding(bounds)
    n = len(bounds)
    assert enc.ring_bits_for(n) in (32, 64)  # never "no ring has headroom"
    cap = enc.largest_weight(n)
    wanted = max(DEFAULT_MAX_WEIGHT if b is None else b for b in bounds)
    assert enc.max_weight == min(wanted, cap)
    assert enc.required_bits(n) <= 64 < dataclasses.replace(enc, max_weight=cap + 1
                                                            ).required_bits(n)
    for b in bounds:
        if b is not None:
            assert (b <= enc.max_weight) == (b <= min(wanted, cap))


def test_a_fixed_max_weight_is_used_as_given() -> None:
    sec = SecAggSettings("f", {}, max_weight=128)
    assert sec.encoding([None, 10**6]).max_weight == 128
    assert sec.to_plain()["max_weight"] == 128
    assert SecAggSettings("f", {}).to_plain()["max_weight"] == "auto"


@pytest.mark.parametrize("weight", [0, -5, 1.5, True, "100", 2**62])
def test_a_fixed_max_weight_no_ring_carries_is_refused_by_name(weight) -> None:
    """A fixed max weight the 64-bit ring cannot carry for the roster's hospitals (or
    not a positive int) is refused when the settings are made, naming the limit,
    instead of aborting every secure round later."""
    roster = {i: bytes([i]) * 32 for i in range(1, 6)}
    with pytest.raises(ValueError, match=r"max_weight must be an int in \[1, \d+\]"):
        SecAggSettings("f", roster, max_weight=weight)
    cap = SecAggSettings("f", roster).encoding([None] * 5).largest_weight(5)
    assert SecAggSettings("f", roster, max_weight=cap).encoding([None] * 5).ring_bits_for(5)


def test_the_privacy_report_carries_the_weight_bound() -> None:
    from flwr.app import RecordDict

    plan = TrainingPlan(1, 1, 150, 32)
    decision = BudgetDecision(True, 1.0, 1.0, 1.0, 1e-5, "prv", "ok")
    record = privacy_report_record(PrivacyLedger("h"), decision, trained=True, epsilon=1.0,
                                   noise_multiplier=1.0, sample_rate=plan.sample_rate,
                                   weight_bound=plan.weight_bound)
    report = read_privacy_report(RecordDict({PRIVACY_REPORT: record}))
    assert report["weight_bound"] == 160
    legacy = privacy_report_record(PrivacyLedger("h"), decision, trained=True, epsilon=1.0,
                                   noise_multiplier=1.0, sample_rate=plan.sample_rate)
    assert read_privacy_report(RecordDict({PRIVACY_REPORT: legacy}))["weight_bound"] is None
