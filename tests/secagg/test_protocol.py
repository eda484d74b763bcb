"""End-to-end properties of the protocol under arbitrary dropout schedules."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from secagg_helpers import make_federation, random_inputs

from bract.secagg.driver import SHARED_INPUT_DIGEST, STAGES, run_round
from bract.secagg.encoding import EncodingConfig
from bract.secagg.errors import RoundAborted
from bract.secagg.protocol import ClientPolicy, ClientSession

ENC = EncodingConfig(clip=1.0, frac_bits=16, max_weight=1000)


def _check(res, inputs, enc=ENC) -> None:
    ref = sum(inputs[u][1] * np.clip(inputs[u][0].astype(np.float64), -enc.clip, enc.clip)
              for u in res.alive)
    assert res.total_weight == sum(inputs[u][1] for u in res.alive)
    assert res.error_bound == enc.sum_error_bound(res.total_weight, len(res.alive))
    assert np.all(np.abs(res.weighted_sum - ref) <= res.error_bound)


@st.composite
def scenarios(draw, graph: str):
    n = draw(st.integers(3, 60) if graph == "complete" else st.integers(5, 60))
    d = draw(st.integers(1, 4))
    if graph == "complete":
        h = draw(st.integers(2, 3))
        c = draw(st.integers(0, max(0, n - h)))
    else:
        h, c = 2, draw(st.integers(0, 2))
    vectors = [draw(hnp.arrays(np.float32, d, elements=st.floats(-1, 1, width=32)))
               for _ in range(n)]
    weights = draw(st.lists(st.integers(0, 1000), min_size=n, max_size=n))
    n_drop = draw(st.integers(0, n))
    dropped = draw(st.lists(st.integers(0, n - 1), min_size=n_drop, max_size=n_drop,
                            unique=True))
    stages = draw(st.lists(st.sampled_from(STAGES), min_size=n_drop, max_size=n_drop))
    return n, c, h, dict(enumerate(zip(vectors, weights, strict=True))), \
        dict(zip(dropped, stages, strict=True))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios("complete"))
def test_complete_graph_sum_or_clean_abort(scenario) -> None:
    """Complete graph, any collusion bound c and h: the round completes iff at least
    t = floor((n + c) / 2) + 1 clients answer every stage, at least c + h masked
    inputs arrive and their weights sum to more than 0 (else there is no average), and
    then the result is the weighted sum of exactly the clients whose input arrived."""
    n, c, h, inputs, drops = scenario
    f = make_federation(n, colluders=c, min_honest=h, encoding=ENC,
                        policy=ClientPolicy(colluders=c, min_honest=h))
    t = max(2, (n + c) // 2 + 1)
    survivors = n - len(drops)
    alive = {u for u in range(n) if drops.get(u) not in ("config", "mask")}
    total = sum(inputs[u][1] for u in alive)
    try:
        res = run_round(f.server, f.clients, inputs, 1, dropouts=drops)
    except RoundAborted:
        assert survivors < t or len(alive) < c + h or total == 0
        return
    assert survivors >= t and len(alive) >= c + h and total > 0
    assert set(res.alive) == alive
    assert set(res.dropped) == {u for u, s in drops.items() if s == "mask"}
    _check(res, inputs)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios("harary"))
def test_sparse_graph_sum_or_clean_abort(scenario) -> None:
    """SecAgg+ graph: every completed round is exact; with no dropouts it always completes
    unless every weight is 0 (a sum with no average aborts)."""
    n, c, _, inputs, drops = scenario
    f = make_federation(n, graph="harary", colluders=c, encoding=ENC,
                        policy=ClientPolicy(colluders=c))
    try:
        res = run_round(f.server, f.clients, inputs, 1, dropouts=drops)
    except RoundAborted:
        assert drops or sum(w for _, w in inputs.values()) == 0
        return
    assert set(res.alive) <= {u for u in range(n) if drops.get(u) not in ("config", "mask")}
    _check(res, inputs)


def test_several_rounds_with_dropouts_need_no_rekeying() -> None:
    """A dropout after sharing exposes that round's mask key only: the client rejoins the
    next round with the same share-channel key, and every round is exact."""
    n, d = 12, 5
    f = make_federation(n, encoding=ENC)
    inputs = random_inputs(n, d, max_weight=1000)
    res = run_round(f.server, f.clients, inputs, 1)
    _check(res, inputs)
    epochs = {u: f.clients[u].advertise_keys().epoch for u in range(n)}
    res = run_round(f.server, f.clients, inputs, 2, dropouts={3: "mask", 4: "unmask",
                                                               5: "config"})
    _check(res, inputs)
    assert res.dropped == (3,)
    f.clients[3].abort_round()
    assert f.server.needs_advertisement(range(n)) == []
    res = run_round(f.server, f.clients, inputs, 3)
    _check(res, inputs)
    assert {u: f.clients[u].advertise_keys().epoch for u in range(n)} == epochs


def test_an_operator_rotation_of_the_share_channel_key_is_taken_up() -> None:
    n, d = 5, 3
    f = make_federation(n, encoding=ENC)
    inputs = random_inputs(n, d, max_weight=1000)
    _check(run_round(f.server, f.clients, inputs, 1), inputs)
    adv = f.clients[2].advertise_keys(rotate=True)
    assert adv.epoch == 1
    f.server.receive_advertisement(adv, origin=2)
    _check(run_round(f.server, f.clients, inputs, 2), inputs)


def test_sparse_graph_large_n_with_dropouts() -> None:
    n, d = 80, 3
    f = make_federation(n, graph="harary", colluders=2, encoding=ENC,
                        policy=ClientPolicy(colluders=2))
    inputs = random_inputs(n, d, max_weight=1000)
    drops = {u: STAGES[u % 4] for u in range(0, n, 9)}
    res = run_round(f.server, f.clients, inputs, 1, dropouts=drops)
    _check(res, inputs)
    assert set(res.dropped) == {u for u, s in drops.items() if s == "mask"}


def test_weights_stay_inside_the_mask() -> None:
    """No message from a client carries its weight or vector in clear."""
    n, d = 4, 8
    f = make_federation(n, encoding=ENC)
    inputs = random_inputs(n, d, max_weight=1000)
    seen: list[bytes] = []

    class Spy(ClientSession):
        def handle_mask_request(self, req, vector, weight, *, input_digest):
            out = super().handle_mask_request(req, vector, weight, input_digest=input_digest)
            seen.append(out.to_bytes())
            return out

    f.clients[0].__class__ = Spy
    res = run_round(f.server, f.clients, inputs, 1)
    _check(res, inputs)
    raw = seen[0]
    assert inputs[0][0].tobytes() not in raw
    assert inputs[0][0].astype(np.float64).tobytes() not in raw


def test_policy_collusion_bound_is_enforced_whatever_the_server_declares() -> None:
    """A client tolerating 2 colluders refuses a 6-client round set up for 1 (t = 4; it
    needs t >= 5), however the server states its parameters."""
    from dataclasses import replace

    from bract.secagg.errors import ThresholdPolicyError

    f = make_federation(6, colluders=1, encoding=ENC, policy=ClientPolicy(colluders=2))
    with pytest.raises(ThresholdPolicyError, match="c = 1 colluders"):
        run_round(f.server, f.clients, random_inputs(6, 2), 1)
    cfg = f.server.start_round(2, range(6), 2)
    assert cfg.threshold == 4
    with pytest.raises(ThresholdPolicyError, match="threshold 4 refused"):
        f.clients[0].handle_round_config(replace(cfg, colluders=2))


def _decides_as_handling(client: ClientSession, check, handle) -> type | None:
    """Run ``check`` then ``handle`` on ``client``: the check must leave the session as
    it was and refuse (with the same error type) exactly when the handler does. The
    error type, or None when both accept."""
    from bract.secagg.errors import SecAggError

    def outcome(fn) -> type | None:
        try:
            fn(client)
        except SecAggError as exc:
            return type(exc)
        return None

    before = client.export_state()
    checked = outcome(check)
    assert client.export_state() == before
    assert outcome(handle) is checked
    return checked


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(3, 8), st.sampled_from(["none", "colluders", "threshold", "federation",
                                            "participants", "min_honest"]))
def test_checking_a_round_config_decides_as_handling_it_and_changes_nothing(
        n: int, edit: str) -> None:
    """``check_round_config`` (what a hospital runs before it trains) refuses exactly the
    configs ``handle_round_config`` refuses, with the same error, draws no secret and
    leaves the session as it was."""
    from dataclasses import replace

    from secagg_helpers import advertise_all


    f = make_federation(n, encoding=ENC)
    advertise_all(f)
    cfg = f.server.start_round(3, range(n), 2)
    cfg = {"none": cfg, "colluders": replace(cfg, colluders=max(0, cfg.colluders - 1)),
           "threshold": replace(cfg, threshold=cfg.threshold - 1),
           "federation": replace(cfg, federation_id="another-federation"),
           "participants": replace(cfg, participants=[*cfg.participants[:-1], 99]),
           "min_honest": replace(cfg, min_honest=1)}[edit]
    checked = _decides_as_handling(f.clients[0], lambda c: c.check_round_config(cfg),
                                   lambda c: c.handle_round_config(cfg))
    # (with fewer than 4 clients the default bound is already c = 0)
    refused = edit != "none" and not (edit == "colluders" and (n - 1) // 3 == 0)
    assert (checked is not None) == refused


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(3, 7), st.sampled_from(["none", "round", "node", "sharers", "sender",
                                            "ciphertext", "header"]))
def test_checking_a_mask_request_decides_as_handling_it_and_changes_nothing(
        n: int, edit: str) -> None:
    """``check_mask_request`` (what a hospital runs before it trains for a pipelined
    round) refuses exactly the requests ``handle_mask_request`` refuses, with the same
    error, and leaves the session as it was."""
    from dataclasses import replace

    from secagg_helpers import advertise_all


    f = make_federation(n, encoding=ENC)
    advertise_all(f)
    cfg = f.server.start_round(1, range(n), 2)
    for v in range(n):
        f.server.receive_shares(f.clients[v].handle_round_config(cfg))
    req = f.server.mask_requests()[0]
    ct = bytearray(req.ciphertexts[0])
    ct[-1] ^= 1
    req = {"none": req, "round": replace(req, round=2), "node": replace(req, node_id=1),
           "sharers": replace(req, sharers=[0]),
           "sender": replace(req, senders=[*req.senders[:-1], 99]),
           "ciphertext": replace(req, ciphertexts=[bytes(ct), *req.ciphertexts[1:]]),
           "header": replace(req, headers=[req.headers[1], req.headers[0],
                                           *req.headers[2:]])}[edit]
    checked = _decides_as_handling(
        f.clients[0], lambda c: c.check_mask_request(req),
        lambda c: c.handle_mask_request(req, np.zeros(2, np.float32), 1,
                                        input_digest=SHARED_INPUT_DIGEST))
    assert (checked is not None) == (edit != "none")


def test_a_policy_with_a_malformed_minimum_is_refused() -> None:
    from bract.secagg.errors import ConfigurationError

    for bad in ({"min_participants": 3.5}, {"min_participants": True}, {"min_degree": 0},
                {"min_degree": "4"}, {"min_degree": False}):
        with pytest.raises(ConfigurationError):
            ClientPolicy(**bad)


@pytest.mark.parametrize(("n", "c", "t"), [(3, 0, 2), (4, 1, 3), (5, 1, 4), (7, 2, 5),
                                           (10, 3, 7), (100, 33, 67)])
def test_default_threshold_meets_bonawitz_active_bound(n: int, c: int, t: int) -> None:
    from bract.secagg.protocol import default_colluders, required_threshold

    assert default_colluders(n) == c
    assert required_threshold(n, c) == t
    assert 2 * t > n + c and 2 * (t - 1) <= n + c


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 500), st.integers(0, 600))
def test_required_threshold_is_the_smallest_that_splits_no_view(size: int, c: int) -> None:
    """t > (size + c') / 2 with c' = min(c, size - 1): two honest groups that each reach t
    with the c' colluders must overlap; t - 1 would allow two disjoint ones (when t > 2)."""
    from bract.secagg.protocol import required_threshold

    t = required_threshold(size, c)
    cc = min(c, size - 1)
    honest = size - cc
    # two disjoint honest groups H1, H2 with |Hi| + cc >= t need |H1| + |H2| <= honest
    assert t > cc  # the colluders alone never reach t
    assert 2 * (t - cc) > honest
    if t > 2:
        assert 2 * (t - 1 - cc) <= honest


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(3, 9), graph=st.sampled_from(["complete", "harary"]),
       data=st.data())
def test_the_shares_shortfall_says_exactly_whether_the_mask_stage_can_open(
    n: int, graph: str, data
) -> None:
    # Whatever subset of a round's participants shared keys, shares_shortfall() is None
    # exactly when mask_requests() opens the mask stage, and asking it changes nothing.
    from bract.secagg.errors import SecAggError

    f = make_federation(n, graph=graph, colluders=0, policy=ClientPolicy(colluders=0))
    for v in f.server.needs_advertisement(range(n)):
        f.server.receive_advertisement(f.clients[v].advertise_keys(), origin=v)
    cfg = f.server.start_round(1, list(range(n)), 4)
    sharers = data.draw(st.sets(st.sampled_from(range(n))), label="sharers")
    for v in sorted(sharers):
        f.server.receive_shares(f.clients[v].handle_round_config(cfg))
    short = f.server.shares_shortfall()
    assert f.server.shares_shortfall() == short and f.server.stage == "config"
    if short is None:
        assert set(f.server.mask_requests()) <= sharers
    else:
        assert f"{len(sharers)} of {n} clients shared keys" in short
        with pytest.raises(SecAggError, match="clients shared keys"):
            f.server.mask_requests()
