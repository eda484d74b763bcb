"""The graph ``auto`` picks, and the dropout tolerance a round reports.

Guarantees stated as properties:

* ``auto`` never weakens what was declared: the graph it picks honours the
  collusion bound (c, h) that every hospital checks, and survives the declared
  number of dropouts wherever they fall; it is the sparsest Harary graph that does,
  and the complete graph when none does (or when no tolerance is declared).
* ``dropout_tolerance`` is exact: a round survives that many dropouts placed by an
  adversary at any stages, and one more, all inside one alive client's
  neighbourhood and before they send their masked inputs, aborts it.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from secagg_helpers import make_federation, random_inputs, unmask_and_finish

from bract.secagg.driver import SHARED_INPUT_DIGEST
from bract.secagg.encoding import EncodingConfig
from bract.secagg.errors import ConfigurationError, RoundAborted
from bract.secagg.graph import closed_neighbourhoods, default_degree
from bract.secagg.protocol import (
    ClientPolicy,
    check_dropouts,
    default_colluders,
    dropout_tolerance,
    required_threshold,
    round_parameters,
)

ENC = EncodingConfig(clip=1.0, frac_bits=16, max_weight=1000)
STAGES = ("config", "mask", "consistency", "unmask")


def _keeps(k: int, c: int, h: int, dropouts: int) -> bool:
    """Whether a Harary graph of degree k honours (c, h) and survives ``dropouts``."""
    return k >= c + h - 1 and dropout_tolerance(k + 1, c, h) >= dropouts


@settings(max_examples=400, deadline=None)
@given(st.integers(3, 400), st.data())
def test_auto_picks_the_sparsest_graph_that_keeps_every_declared_guarantee(n, data) -> None:
    c = data.draw(st.integers(0, default_colluders(n) + 2), label="colluders")
    h = data.draw(st.integers(2, 4), label="min_honest")
    dropouts = data.draw(st.none() | st.integers(0, n), label="dropouts")
    try:
        shape = round_parameters(n, "auto", None, c, h, dropouts)
    except ConfigurationError as exc:
        # refused only when not even the complete graph honours the collusion bound
        assert n - 1 < c + h - 1, str(exc)
        return
    try:
        check_dropouts(n, "auto", None, c, h, dropouts)
        assert dropouts is None or shape.tolerated >= dropouts
    except ConfigurationError as exc:  # settings refuse what no graph of n survives
        assert dropouts is not None and dropout_tolerance(n, c, h) < dropouts, str(exc)
        assert "survives at most" in str(exc)
    floor = max(2, default_degree(n))
    floor += floor % 2
    size = n if shape.kind == "complete" else shape.degree + 1
    assert shape.colluders == c and shape.threshold == required_threshold(size, c)
    assert shape.tolerated == dropout_tolerance(size, c, h)
    assert size - 1 >= c + h - 1
    if dropouts is None or dropout_tolerance(n, c, h) < dropouts:
        # nothing declared, or a round too small for the declaration: the complete
        # graph, whose tolerance the round reports (the bound itself never relaxes)
        assert shape.kind == "complete" and shape.degree == n - 1
        return
    assert shape.tolerated >= dropouts
    sparser = [k for k in range(floor, n - 1, 2) if _keeps(k, c, h, dropouts)]
    if shape.kind == "complete":
        assert shape.degree == n - 1 and not sparser
    else:
        # what every hospital's default policy checks: an even degree, at least the
        # SecAgg+ default, a proper subgraph; and no sparser one would do
        assert shape.kind == "harary" and shape.degree % 2 == 0
        assert floor <= shape.degree < n - 1
        assert sparser[0] == shape.degree


def _round(f, inputs, drops: dict[int, str], victim_of=None):
    """One round by hand, so that dropouts can be placed after the graph is known:
    ``victim_of(nbhd) -> {node: stage}`` picks them from the round's neighbourhoods."""
    for v in f.server.needs_advertisement(range(len(f.clients))):
        f.server.receive_advertisement(f.clients[v].advertise_keys(), origin=v)
    cfg = f.server.start_round(1, sorted(f.clients), len(inputs[0][0]))
    nbhd = closed_neighbourhoods(cfg.participants, cfg.graph_kind, cfg.degree, cfg.graph_seed)
    if victim_of is not None:
        drops = victim_of(nbhd)
    for v in sorted(f.clients):
        if drops.get(v) != "config":
            f.server.receive_shares(f.clients[v].handle_round_config(cfg))
    reqs = f.server.mask_requests()
    for v, req in reqs.items():
        if drops.get(v) not in ("config", "mask"):
            f.server.receive_masked_input(f.clients[v].handle_mask_request(req, *inputs[v],
                                                                           input_digest=SHARED_INPUT_DIGEST))
    creq = f.server.consistency_request()
    for v in creq.alive:
        if drops.get(v) not in ("consistency", "unmask"):
            f.server.receive_consistency_signature(
                f.clients[v].handle_consistency_request(creq))
    ureq = f.server.unmask_request()
    for v in ureq.signers:
        if drops.get(v) != "unmask":
            f.server.receive_unmask_reply(f.clients[v].handle_unmask_request(ureq))
    return cfg, drops, f.server.finish()


@st.composite
def declarations(draw):
    n = draw(st.integers(5, 36))
    c = draw(st.integers(0, min(3, default_colluders(n))))
    h = draw(st.integers(2, 3))
    dropouts = draw(st.integers(0, max(0, dropout_tolerance(n, c, h))))
    return n, c, h, dropouts


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(declarations(), st.data())
def test_a_round_on_the_chosen_graph_survives_its_tolerance_and_no_more(decl, data) -> None:
    """Dropouts are placed after the graph is drawn, all inside one alive victim's
    neighbourhood (the worst place): ``tolerated`` of them, at any stages, leave the
    round exact; one more, dropping before it sends its masked input, leaves the
    victim's neighbourhood below the threshold, so the round either aborts or goes on
    without the victim (on a sparse graph the others' neighbourhoods may still reach
    it); it never completes with the victim's input in the sum."""
    n, c, h, dropouts = decl
    shape = round_parameters(n, "auto", None, c, h, dropouts)
    inputs = random_inputs(n, 3, max_weight=1000)
    extra = data.draw(st.booleans(), label="one more than tolerated")
    count = shape.tolerated + extra
    # one more is placed where it hurts most: before the masked input is sent
    stage = st.sampled_from(("config", "mask") if extra else STAGES)
    stages = data.draw(st.lists(stage, min_size=count, max_size=count), label="stages")
    pick = data.draw(st.randoms(use_true_random=False), label="placement")

    chosen: list[int] = []

    def worst(nbhd):
        victim = pick.choice(sorted(nbhd))
        chosen.append(victim)
        near = [v for v in nbhd[victim] if v != victim]
        return dict(zip(pick.sample(near, min(count, len(near))), stages, strict=False))

    f = make_federation(n, graph="auto", colluders=c, min_honest=h, encoding=ENC,
                        dropouts=dropouts, policy=ClientPolicy(colluders=c, min_honest=h))
    if extra and count > (n if shape.kind == "complete" else shape.degree + 1) - 1:
        pytest.skip("a neighbourhood too small to hold one more dropout")  # pragma: no cover
    try:
        cfg, drops, res = _round(f, inputs, {}, worst)
    except RoundAborted:
        assert extra, "a round aborted with no more dropouts than it reports tolerating"
        return
    assert (cfg.graph_kind, cfg.degree) == (shape.kind, shape.degree)
    if extra:
        assert chosen[0] not in res.alive, \
            "a round kept the victim with more dropouts in its neighbourhood than tolerated"
        return
    alive = [u for u in range(n) if drops.get(u) not in ("config", "mask")]
    assert sorted(res.alive) == alive
    ref = sum(inputs[u][1] * inputs[u][0].astype(np.float64) for u in alive)
    assert np.all(np.abs(res.weighted_sum - ref) <= res.error_bound)


def test_auto_masks_with_fewer_neighbours_where_the_declaration_allows() -> None:
    """The figures docs/secagg.md quotes: 100 hospitals, 5 colluders, 10 dropouts."""
    shape = round_parameters(100, "auto", None, 5, 2, 10)
    assert (shape.kind, shape.degree, shape.threshold, shape.tolerated) == \
        ("harary", 26, 17, 10)
    assert round_parameters(100, "auto", None, None, 2, None).kind == "complete"
    assert round_parameters(100, "auto", None, None, 2, 10).degree == 54


def test_a_tolerance_the_roster_cannot_give_is_refused_naming_the_limit() -> None:
    """Settings are checked against the whole roster: 10 hospitals with the default
    c = 3 survive at most 3 dropouts on any graph, so 4 is refused where it is
    declared (session, federation config, Flower settings)."""
    with pytest.raises(ConfigurationError, match="survives at most 3 dropouts"):
        make_federation(10, graph="auto", encoding=ENC, dropouts=4)
    with pytest.raises(ConfigurationError, match="dropouts must be None or an int"):
        make_federation(4, dropouts=-1)
    from bract.flower.config import FederationConfig
    from bract.flower.secagg_server import SecAggSettings

    with pytest.raises(ValueError, match=r"survives at most 3 dropouts.*secagg-dropouts"):
        FederationConfig(clients=10, secagg_dropouts=4)
    assert FederationConfig(clients=10, secagg_dropouts=3).secagg_graph == "auto"
    roster = make_federation(10, encoding=ENC).roster
    with pytest.raises(ValueError, match=r"survives at most 3 dropouts.*10 hospitals"):
        SecAggSettings("f", roster, dropouts=4)


def test_a_round_too_small_for_the_declaration_runs_on_the_complete_graph() -> None:
    """Hospitals leave: 10 in the roster declare 3 dropouts (c = 1), but a round of 6
    survives at most 6 - max(t = 4, c + h = 3) = 2 on any graph. The round is not
    refused (the tolerance is availability, not privacy): it runs on the complete
    graph with c = 1 still enforced, and completes."""
    f = make_federation(10, graph="auto", colluders=1, encoding=ENC, dropouts=3,
                        policy=ClientPolicy(colluders=1))
    inputs = random_inputs(10, 3, max_weight=1000)
    for v in range(10):
        f.server.receive_advertisement(f.clients[v].advertise_keys(), origin=v)
    cfg = f.server.start_round(1, range(6), 3)
    assert (cfg.graph_kind, cfg.degree, cfg.colluders, cfg.threshold) == ("complete", 5, 1, 4)
    for v in range(6):
        f.server.receive_shares(f.clients[v].handle_round_config(cfg))
    for v, req in f.server.mask_requests().items():
        f.server.receive_masked_input(f.clients[v].handle_mask_request(req, *inputs[v],
                                                                       input_digest=SHARED_INPUT_DIGEST))
    res = unmask_and_finish(f)
    assert sorted(res.alive) == list(range(6))
    assert round_parameters(6, "auto", None, 1, 2, 3).tolerated == 2
