"""End-to-end properties of the protocol under arbitrary dropout schedules."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from secagg_helpers import make_federation, random_inputs

from bract.secagg.driver import STAGES, run_round
from bract.secagg.encoding import EncodingConfig
from bract.secagg.errors import RoundAborted
from bract.secagg.protocol import ClientPolicy, ClientSession

ENC = EncodingConfig(clip=1.0, frac_bits=16, max_weight=1000)


def _check(res, inputs, enc=ENC) -> None:
    ref = sum(inputs[u][1] * np.clip(inputs[u][0].astype(np.float64), -enc.clip, enc.clip)
              for u in res.alive)
    assert res.total_weight == sum(inputs[u][1] for u in res.alive)
    assert res.error_bound == enc.sum_error_bound(res.total_weight)
    assert np.all(np.abs(res.weighted_sum - ref) <= res.error_bound)


@st.composite
def scenarios(draw, graph: str):
    n = draw(st.integers(2, 60) if graph == "complete" else st.integers(5, 60))
    d = draw(st.integers(1, 4))
    frac = draw(st.sampled_from([0.5, 0.6, 0.75, 0.9]))
    vectors = [draw(hnp.arrays(np.float32, d, elements=st.floats(-1, 1, width=32)))
               for _ in range(n)]
    weights = draw(st.lists(st.integers(0, 1000), min_size=n, max_size=n))
    n_drop = draw(st.integers(0, n))
    dropped = draw(st.lists(st.integers(0, n - 1), min_size=n_drop, max_size=n_drop,
                            unique=True))
    stages = draw(st.lists(st.sampled_from(STAGES), min_size=n_drop, max_size=n_drop))
    return n, frac, dict(enumerate(zip(vectors, weights, strict=True))), \
        dict(zip(dropped, stages, strict=True))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios("complete"))
def test_complete_graph_sum_or_clean_abort(scenario) -> None:
    """Complete graph: the round completes iff at least t clients answer every stage, and
    then the result is the weighted sum of exactly the clients whose input arrived."""
    n, frac, inputs, drops = scenario
    f = make_federation(n, threshold_fraction=frac, encoding=ENC)
    t = int(frac * n) + 1
    survivors = n - len(drops)
    try:
        res = run_round(f.server, f.clients, inputs, 1, dropouts=drops)
    except RoundAborted:
        assert survivors < t
        return
    assert survivors >= t
    assert set(res.alive) == {u for u in range(n) if drops.get(u) not in ("config", "mask")}
    assert set(res.dropped) == {u for u, s in drops.items() if s == "mask"}
    _check(res, inputs)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios("harary"))
def test_sparse_graph_sum_or_clean_abort(scenario) -> None:
    """SecAgg+ graph: every completed round is exact; with no dropouts it always completes."""
    n, frac, inputs, drops = scenario
    f = make_federation(n, graph="harary", threshold_fraction=frac, encoding=ENC)
    try:
        res = run_round(f.server, f.clients, inputs, 1, dropouts=drops)
    except RoundAborted:
        assert drops
        return
    assert set(res.alive) <= {u for u in range(n) if drops.get(u) not in ("config", "mask")}
    _check(res, inputs)


def test_several_rounds_with_dropouts_and_rotation() -> None:
    """Keys of a client whose mask key was reconstructed are rotated before it rejoins."""
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
    assert f.server.needs_advertisement(range(n)) == [3, 4]
    res = run_round(f.server, f.clients, inputs, 3)
    _check(res, inputs)
    after = {u: f.clients[u].advertise_keys().epoch for u in range(n)}
    assert after[3] == epochs[3] + 1 and after[4] == epochs[4] + 1
    assert all(after[u] == epochs[u] for u in range(n) if u not in (3, 4))


def test_sparse_graph_large_n_with_dropouts() -> None:
    n, d = 80, 3
    f = make_federation(n, graph="harary", encoding=ENC)
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
        def handle_mask_request(self, req, vector, weight):
            out = super().handle_mask_request(req, vector, weight)
            seen.append(out.to_bytes())
            return out

    f.clients[0].__class__ = Spy
    res = run_round(f.server, f.clients, inputs, 1)
    _check(res, inputs)
    raw = seen[0]
    assert inputs[0][0].tobytes() not in raw
    assert inputs[0][0].astype(np.float64).tobytes() not in raw


def test_policy_min_threshold_is_enforced_even_when_higher_than_half() -> None:
    from bract.secagg.errors import ThresholdPolicyError

    f = make_federation(6, encoding=ENC, policy=ClientPolicy(min_threshold_fraction=0.7))
    with pytest.raises(ThresholdPolicyError, match="threshold 4 refused"):
        run_round(f.server, f.clients, random_inputs(6, 2), 1)
