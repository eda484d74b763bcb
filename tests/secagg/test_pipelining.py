"""Share-stage pipelining: round r + 1's config and shares travel with round r's unmask
stage. Each round stays exact and self-contained, and an abort abandons both rounds."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from secagg_helpers import advertise_all, make_federation, random_inputs

from bract.secagg.driver import SHARED_INPUT_DIGEST
from bract.secagg.encoding import EncodingConfig
from bract.secagg.errors import ConfigurationError, ProtocolViolation, RoundAborted
from bract.secagg.protocol import default_colluders, required_threshold

ENC = EncodingConfig(clip=1.0, frac_bits=16, max_weight=1000)
LATER = ("mask", "consistency", "unmask")  # stages after sharing a client can drop at


def _pipelined(f, inputs, dim, rounds, drops):
    """Run ``rounds`` rounds, each opened during the previous one's unmask stage.

    ``drops[r][v]`` is the stage of round r from which client v is silent ("config":
    it does not answer round r's config, which came with round r - 1's unmask).
    Returns, per round, ``(participants, sharers, result or None if aborted)``.
    """
    def silent(r, v, stage):
        s = drops.get(r, {}).get(v)
        order = ("config", *LATER)
        return s is not None and order.index(s) <= order.index(stage)

    advertise_all(f)
    out = []
    parts = sorted(f.clients)
    cfg = f.server.start_round(1, parts, dim)
    sharers = []
    for v in parts:
        if not silent(1, v, "config"):
            f.server.receive_shares(f.clients[v].handle_round_config(cfg))
            sharers.append(v)
    for r in range(1, rounds + 1):
        try:
            for v, req in f.server.mask_requests().items():
                if not silent(r, v, "mask"):
                    vec, w = inputs[v]
                    f.server.receive_masked_input(f.clients[v].handle_mask_request(req, vec, w,
                                                                                   input_digest=SHARED_INPUT_DIGEST))
            creq = f.server.consistency_request()
            for v in creq.alive:
                if not silent(r, v, "consistency"):
                    f.server.receive_consistency_signature(
                        f.clients[v].handle_consistency_request(creq))
            ureq = f.server.unmask_request()
            nxt = None
            if r < rounds and len(ureq.signers) >= 3:
                try:
                    nxt = f.server.start_next_round(r + 1, sorted(ureq.signers), dim)
                except ConfigurationError:  # too few left for the roster's bound
                    nxt = None
            next_sharers = []
            for v in ureq.signers:
                if silent(r, v, "unmask"):
                    continue
                f.server.receive_unmask_reply(f.clients[v].handle_unmask_request(ureq))
                if nxt is not None and not silent(r + 1, v, "config"):
                    f.server.receive_shares(f.clients[v].handle_round_config(nxt))
                    next_sharers.append(v)
            res = f.server.finish()
        except RoundAborted:
            out.append((parts, sharers, None))
            break
        out.append((parts, sharers, res))
        if nxt is None:
            break
        parts, sharers = sorted(ureq.signers), next_sharers
    return out


@st.composite
def schedules(draw):
    n = draw(st.integers(3, 12))
    d = draw(st.integers(1, 3))
    rounds = draw(st.integers(2, 4))
    vectors = [draw(hnp.arrays(np.float32, d, elements=st.floats(-1, 1, width=32)))
               for _ in range(n)]
    weights = draw(st.lists(st.integers(0, 1000), min_size=n, max_size=n))
    drops = {
        r: draw(st.dictionaries(st.integers(0, n - 1),
                                st.sampled_from(("config", *LATER)), max_size=n // 2))
        for r in range(1, rounds + 1)
    }
    return n, d, rounds, dict(enumerate(zip(vectors, weights, strict=True))), drops


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(schedules())
def test_pipelined_rounds_are_each_exact_or_abort_cleanly_with_the_next(schedule) -> None:
    """Property: in a run of pipelined rounds under any dropout schedule, every round
    whose sharers stay at least t by the unmask stage, and whose arrived weights sum to
    more than 0, completes with exactly the
    weighted sum of the sharers whose masked input arrived; a round that cannot
    completes nothing, and the next round opened with it is abandoned (the server is
    left with no round open). Every round is held to the roster's collusion bound, so
    a next round too small for it is not opened."""
    n, d, rounds, inputs, drops = schedule
    f = make_federation(n, encoding=ENC)
    history = _pipelined(f, inputs, d, rounds, drops)
    for r, (parts, sharers, res) in enumerate(history, start=1):
        m = len(parts)
        c = default_colluders(n)  # the roster's bound, in every round
        t = required_threshold(m, c)
        here = drops.get(r, {})
        arrived = [v for v in sharers if here.get(v) != "mask"]
        unmaskers = [v for v in arrived if here.get(v) not in ("consistency", "unmask")]
        if res is None:  # too few left, or a sum with no average (total weight 0)
            assert (len(sharers) < t or len(arrived) < max(t, c + 2) or len(unmaskers) < t
                    or sum(inputs[v][1] for v in arrived) == 0)
            assert f.server.stage is None  # neither this round nor the next is open
            assert r == len(history)
            continue
        assert len(unmaskers) >= t
        assert set(res.alive) == set(arrived)
        assert set(res.dropped) == set(sharers) - set(arrived)
        ref = sum(inputs[v][1] * inputs[v][0].astype(np.float64) for v in res.alive)
        assert res.total_weight == sum(inputs[v][1] for v in res.alive)
        assert np.all(np.abs(res.weighted_sum - ref) <= res.error_bound)


def test_the_next_round_opens_only_during_unmasking() -> None:
    f = make_federation(4, encoding=ENC)
    advertise_all(f)
    with pytest.raises(ProtocolViolation, match="unmasks"):
        f.server.start_next_round(2, range(4), 3)
    cfg = f.server.start_round(1, range(4), 3)
    with pytest.raises(ProtocolViolation, match="unmasks"):
        f.server.start_next_round(2, range(4), 3)
    for v in range(4):
        f.server.receive_shares(f.clients[v].handle_round_config(cfg))
    inputs = random_inputs(4, 3)
    for v, req in f.server.mask_requests().items():
        f.server.receive_masked_input(f.clients[v].handle_mask_request(req, *inputs[v],
                                                                       input_digest=SHARED_INPUT_DIGEST))
    creq = f.server.consistency_request()
    for v in range(4):
        f.server.receive_consistency_signature(f.clients[v].handle_consistency_request(creq))
    f.server.unmask_request()
    with pytest.raises(ProtocolViolation, match="not newer"):
        f.server.start_next_round(1, range(4), 3)
    f.server.start_next_round(2, range(4), 3)
    with pytest.raises(ProtocolViolation, match="already open"):
        f.server.start_next_round(3, range(4), 3)


def test_an_abandoned_next_round_leaves_nothing_to_rekey() -> None:
    """Shares of an opened round left the clients, but they are shares of that round's
    own seed and mask key: if the round is abandoned (the current round aborts, or the
    operator starts another round), its sharers take part in the next round with the
    keys they have, and every secret of the new round is fresh."""
    inputs = random_inputs(4, 3)
    # Round 2 aborts at unmasking (only client 0 answers; t = 3). Round 3 was opened
    # with round 2's unmask request and client 0 shared for it: abandoned with round 2.
    f = make_federation(4, encoding=ENC)
    history = _pipelined(f, inputs, 3, 3, {2: {1: "unmask", 2: "unmask", 3: "unmask"}})
    assert [res is not None for _, _, res in history] == [True, False]
    assert history[1][1] == [0, 1, 2, 3]
    assert f.server.stage is None
    assert f.server.needs_advertisement(range(4)) == []
    assert not f.clients[0].rotation_required
    # A round is open with everybody's shares in when the operator starts another
    # round instead: the new round goes ahead with fresh round keys.
    f = make_federation(4, encoding=ENC)
    advertise_all(f)
    f.server.start_round(3, range(4), 3)
    first = {v: f.clients[v].handle_round_config(f.server.open_config()) for v in range(4)}
    for msg in first.values():
        f.server.receive_shares(msg)
    assert f.server.stage == "config"
    cfg = f.server.start_round(4, range(4), 3)
    assert f.server.stage == "config"
    for v in range(4):
        f.clients[v].abort_round()
        again = f.clients[v].handle_round_config(cfg)
        assert again.mask_public != first[v].mask_public
        assert again.seed_commitment != first[v].seed_commitment
        f.server.receive_shares(again)
    for v, req in f.server.mask_requests().items():
        f.server.receive_masked_input(f.clients[v].handle_mask_request(req, *inputs[v],
                                                                       input_digest=SHARED_INPUT_DIGEST))
    creq = f.server.consistency_request()
    for v in range(4):
        f.server.receive_consistency_signature(f.clients[v].handle_consistency_request(creq))
    ureq = f.server.unmask_request()
    for v in range(4):
        f.server.receive_unmask_reply(f.clients[v].handle_unmask_request(ureq))
    res = f.server.finish()
    assert res.total_weight == sum(inputs[v][1] for v in range(4))
