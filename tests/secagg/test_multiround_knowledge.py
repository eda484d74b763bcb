"""Property: over any multi-round schedule, what an honest-but-curious server
accumulates never isolates an individual update.

Random schedules of 2-4 rounds: dropouts and refusals at every stage (a client
that shares and then does not mask is what a DP budget refusal looks like), rounds
pipelined or not, complete and Harary graphs and the graph ``auto`` picks for a
declared dropout tolerance, operators rotating share-channel
keys between rounds. The server keeps everything: every message of every round,
aborted rounds included, and the masked input of every client that dropped after
sharing (as if it arrived late). :func:`bract.audit.secagg_audit.knowledge_across_rounds`
then reconstructs every secret those messages allow, applies each to every round,
and lists the sums the server can isolate. Each must hold at least h = 2 clients,
and each completed round must be the exact weighted sum of its alive clients.
"""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from secagg_helpers import signing_key

from bract.audit.secagg_audit import knowledge_across_rounds
from bract.secagg.driver import SHARED_INPUT_DIGEST
from bract.secagg.encoding import EncodingConfig
from bract.secagg.errors import RoundAborted, SecAggError
from bract.secagg.graph import default_degree
from bract.secagg.messages import MaskRequest
from bract.secagg.protocol import (
    ClientPolicy,
    ClientSession,
    default_colluders,
    dropout_tolerance,
    required_threshold,
    round_parameters,
)
from bract.secagg.recording import RecordingServerSession, ServerView

ENC = EncodingConfig(clip=1.0, frac_bits=16, max_weight=1000)
STAGES = ("config", "mask", "consistency", "unmask")
D = 4


@st.composite
def schedules(draw):
    graph = draw(st.sampled_from(["complete", "harary", "auto"]))
    n = draw(st.integers(3, 9) if graph == "complete" else st.integers(6, 12))
    c = draw(st.integers(0, default_colluders(n))) if graph == "complete" else 1
    size = n if graph == "complete" else min(n, default_degree(n) + 1)
    dropouts = None
    if graph == "auto":  # the operator declares what rounds must survive
        dropouts = draw(st.integers(0, dropout_tolerance(n, c, 2)))
        size = min(n, round_parameters(n, "auto", None, c, 2, dropouts).degree + 1)
    spare = size - required_threshold(size, c)  # dropouts a neighbourhood survives
    rounds = draw(st.integers(2, 4))
    # mostly survivable dropouts, weighted towards dropping after sharing ("mask")
    stage = st.sampled_from(["mask", "mask", "config", "consistency", "unmask"])
    drops = [draw(st.dictionaries(st.integers(0, n - 1), stage,
                                  max_size=draw(st.sampled_from([spare, spare, spare + 1]))))
             for _ in range(rounds)]
    pipelined = [draw(st.booleans()) for _ in range(rounds)]
    rotate = [draw(st.sets(st.integers(0, n - 1), max_size=2)) for _ in range(rounds)]
    return graph, n, c, dropouts, rounds, drops, pipelined, rotate


def _views_by_round(log, labels, results, late):
    views = []
    for number, label in labels.items():
        msgs = [(d, m) for d, m in log if getattr(m, "round", None) == number]
        msgs += [("late", m) for m in late.get(number, [])]
        res = results.get(number)
        if res is None:
            views.append(ServerView(label, msgs, np.zeros(0), 0, aborted=True))
        else:
            views.append(ServerView(label, msgs, res.weighted_sum, res.total_weight))
    return views


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(schedules(), st.integers(0, 2**32 - 1))
def test_accumulated_knowledge_never_isolates_an_update(schedule, seed) -> None:
    graph, n, colluders, dropouts, rounds, drops, pipelined, rotate = schedule
    rng = np.random.default_rng(seed)  # test inputs only
    fed = "fed-multiround"
    roster = {i: signing_key(i).public_bytes() for i in range(n)}
    server = RecordingServerSession(fed, roster, encoding=ENC, graph=graph,
                                    colluders=colluders, dropouts=dropouts)
    policy = ClientPolicy(colluders=colluders)
    clients = {i: ClientSession(i, fed, signing_key(i), roster, policy) for i in range(n)}
    results, labels, late = {}, {}, {}
    inputs_of = {}
    cfg = None  # a round opened during the previous unmask stage
    opened_early = 0
    for r in range(1, rounds + 1):
        drop = drops[r - 1]
        inputs = {i: (rng.uniform(-1, 1, D).astype(np.float32), int(rng.integers(1, 1000)))
                  for i in range(n)}
        for v in sorted(rotate[r - 1]):  # an operator rotates a share-channel key
            if cfg is None:
                clients[v].abort_round()
                server.receive_advertisement(clients[v].advertise_keys(rotate=True), origin=v)
        for v in server.needs_advertisement(range(n)):
            server.receive_advertisement(clients[v].advertise_keys(), origin=v)
        try:
            if cfg is None:
                cfg = server.start_round(r, range(n), D)
                for v in range(n):
                    if drop.get(v) != "config":
                        server.receive_shares(clients[v].handle_round_config(cfg))
            labels[cfg.round] = r
            inputs_of[cfg.round] = inputs
            reqs = server.mask_requests()
            for v, req in reqs.items():
                if drop.get(v) not in ("config", "mask"):
                    server.receive_masked_input(clients[v].handle_mask_request(req, *inputs[v],
                                                                               input_digest=SHARED_INPUT_DIGEST))
            creq = server.consistency_request()
            for v in creq.alive:
                if drop.get(v) not in ("consistency", "unmask"):
                    server.receive_consistency_signature(
                        clients[v].handle_consistency_request(creq))
            ureq = server.unmask_request()
            nxt = None
            if r < rounds and pipelined[r] and len(ureq.signers) >= 3:
                try:
                    nxt = server.start_next_round(r + 1, sorted(ureq.signers), D)
                except SecAggError:
                    nxt = None
            for v in ureq.signers:
                if drop.get(v) == "unmask":
                    continue
                server.receive_unmask_reply(clients[v].handle_unmask_request(ureq))
                if nxt is not None and drops[r].get(v) != "config":
                    server.receive_shares(clients[v].handle_round_config(nxt))
            # dropped after sharing: the curious server gets their masked input late
            late[cfg.round] = [clients[v].handle_mask_request(reqs[v], *inputs[v],
                                                              input_digest=SHARED_INPUT_DIGEST)
                               for v in ureq.dropped if v in reqs]
            results[cfg.round] = server.finish()
            cfg = nxt
            opened_early += nxt is not None
        except RoundAborted:
            cfg = None
        for c in clients.values():
            if c._round is not None and (cfg is None or c._round.config.round != cfg.round):
                c.abort_round()
    views = _views_by_round(server.log, labels, results, late)
    event(f"{len(results)} of {rounds} rounds completed")
    event("a mask key reconstructed" if any(r.dropped for r in results.values())
          else "no mask key reconstructed")
    event("a round opened during the previous unmask" if opened_early
          else "no pipelined round")
    for check in knowledge_across_rounds(views):
        sums = check.statistics[0]["isolable_sums"]
        assert check.passed, check.detail
        assert all(len(s) >= 2 for s in sums)
    for number, res in results.items():
        inputs = inputs_of[number]
        ref = sum(inputs[u][1] * inputs[u][0].astype(np.float64) for u in res.alive)
        assert res.total_weight == sum(inputs[u][1] for u in res.alive)
        assert np.all(np.abs(res.weighted_sum - ref) <= res.error_bound)
        # the only sums the server can isolate in a completed round add up to its total
        view = next(v for v in views if v.round == labels[number])
        assert view.config.round == number
        assert isinstance(view._of("out", MaskRequest)[0], MaskRequest)


def test_negative_control_a_mask_key_reused_across_rounds_is_caught(monkeypatch) -> None:
    """The same schedule as the v1 fixture (everyone alive in round 1, client 2 drops after
    sharing in round 2) with a protocol bug that reuses each client's mask key across
    rounds: the knowledge check then finds client 2's round-1 update isolable."""
    import bract.secagg.protocol as protocol

    keys: dict[int, tuple[bytes, bytes]] = {}
    real = protocol.x25519_generate
    calls = {"n": 0}

    def reused() -> tuple[bytes, bytes]:
        i = calls["n"] % 4  # clients share in order 0..3 every round
        calls["n"] += 1
        if i not in keys:
            keys[i] = real()
        return keys[i]

    fed = "fed-negative"
    roster = {i: signing_key(i).public_bytes() for i in range(4)}
    server = RecordingServerSession(fed, roster, encoding=ENC, colluders=0)
    clients = {i: ClientSession(i, fed, signing_key(i), roster, ClientPolicy(colluders=0))
               for i in range(4)}
    for v in range(4):
        server.receive_advertisement(clients[v].advertise_keys(), origin=v)
    monkeypatch.setattr(protocol, "x25519_generate", reused)
    from bract.secagg.driver import run_round

    inputs = {i: (np.full(D, 0.1 * i, np.float32), 10 + i) for i in range(4)}
    r1 = run_round(server, clients, inputs, 1, wire=False)
    r2 = run_round(server, clients, inputs, 2, dropouts={2: "mask"}, wire=False)
    views = _views_by_round(server.log, {1: 1, 2: 2}, {1: r1, 2: r2}, {})
    checks = knowledge_across_rounds(views)
    assert not checks[0].passed and [2] in checks[0].statistics[0]["isolable_sums"]
