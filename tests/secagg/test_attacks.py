"""Each attack that works on Flower 1.41's SecAgg+ is refused here with a clear error.

The server is the adversary: these tests build the messages a malicious server
would send and check that honest clients refuse them, that a refused message
leaves the client's state intact, and that no client ever reveals both shares
(self-mask seed and mask key) of one peer.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
from secagg_helpers import (
    advertise_all,
    make_federation,
    random_inputs,
    run_to_masked,
    run_to_unmask_request,
)

from bract.secagg.crypto import SigningKey, x25519_generate
from bract.secagg.driver import SHARED_INPUT_DIGEST
from bract.secagg.errors import (
    AuthenticationError,
    ConsistencyError,
    MalformedMessage,
    ProtocolViolation,
    ReplayError,
    ThresholdPolicyError,
)
from bract.secagg.messages import UnmaskRequest
from bract.secagg.protocol import ClientPolicy, ServerSession, advertisement_statement

D = 4


# (a) -------------------------------------------------------------- key substitution


def test_a_server_swaps_a_public_key() -> None:
    f = make_federation(5)
    advertise_all(f)
    cfg = f.server.start_round(1, range(5), D)
    _, evil = x25519_generate()
    ciphers = list(cfg.cipher_publics)
    ciphers[3] = evil
    with pytest.raises(AuthenticationError, match="key advertisement of node 3"):
        f.clients[0].handle_round_config(replace(cfg, cipher_publics=ciphers))
    # re-signing the swapped key with a key that is not the roster's does not help
    rogue = SigningKey.generate()
    sig = rogue.sign(advertisement_statement(f.fed, 3, cfg.key_origins[3], cfg.key_epochs[3],
                                             evil))
    sigs = list(cfg.key_signatures)
    sigs[3] = sig
    with pytest.raises(AuthenticationError, match="does not verify"):
        f.clients[0].handle_round_config(replace(cfg, cipher_publics=ciphers,
                                                 key_signatures=sigs))
    # a genuine signature over another origin is no signature over this one
    origins = list(cfg.key_origins)
    origins[3] = 99
    with pytest.raises(AuthenticationError, match="does not verify"):
        f.clients[0].handle_round_config(replace(cfg, key_origins=origins))
    # a client's own keys replaced: refused too
    own = list(cfg.cipher_publics)
    own[0] = evil
    with pytest.raises(AuthenticationError, match="not its current keys"):
        f.clients[0].handle_round_config(replace(cfg, cipher_publics=own))
    # state untouched: the genuine config is still accepted
    f.clients[0].handle_round_config(cfg)


def test_a_server_refuses_unsigned_advertisement() -> None:
    f = make_federation(3)
    adv = f.clients[1].advertise_keys()
    _, evil = x25519_generate()
    with pytest.raises(AuthenticationError, match="node 1"):
        f.server.receive_advertisement(replace(adv, cipher_public=evil))


# (b) -------------------------------------------------------------- alive and dropped


def test_b_node_listed_alive_and_dropped() -> None:
    n = 6
    f = make_federation(n)
    inputs = random_inputs(n, D)
    st = run_to_unmask_request(f, 1, inputs, D, drop_mask={5})
    ureq = st.ureq
    assert ureq.dropped == [5]
    evil = replace(ureq, dropped=[1, 5])
    with pytest.raises(ProtocolViolation, match=r"\[1\] listed as both alive and dropped"):
        f.clients[0].handle_unmask_request(evil)
    # moving 1 from alive to dropped breaks the signed alive set instead
    evil = replace(ureq, alive=[v for v in ureq.alive if v != 1], dropped=[1, 5],
                   signers=[s for s in ureq.signers if s != 1],
                   signatures=[g for s, g in zip(ureq.signers, ureq.signatures, strict=True)
                               if s != 1])
    with pytest.raises(ConsistencyError, match="differs from the one this client signed"):
        f.clients[0].handle_unmask_request(evil)
    # still consistent: the genuine request is answered, one share per peer
    for v in ureq.signers:
        reply = f.clients[v].handle_unmask_request(ureq)
        assert not set(reply.seed_owners) & set(reply.key_owners)
        assert set(reply.key_owners) <= {5}
        f.server.receive_unmask_reply(reply)
    res = f.server.finish()
    assert res.dropped == (5,)
    # and a second (different) unmask request in the same round is refused
    with pytest.raises(ReplayError):
        f.clients[0].handle_unmask_request(replace(ureq, dropped=[1, 5]))


# (c) -------------------------------------------------------------- threshold


def test_c_server_lowers_the_threshold() -> None:
    """Six clients tolerate c = 1 colluder by default: t must satisfy t > (6 + 1) / 2."""
    f = make_federation(6)
    advertise_all(f)
    cfg = f.server.start_round(1, range(6), D)
    assert (cfg.threshold, cfg.colluders) == (4, 1)
    for low in (1, 2, 3):
        with pytest.raises(ThresholdPolicyError, match=f"threshold {low} refused"):
            f.clients[0].handle_round_config(replace(cfg, threshold=low))
    with pytest.raises(ThresholdPolicyError, match="refused"):
        f.clients[0].handle_round_config(replace(cfg, threshold=7))  # above |N[u]|
    # declaring a weaker collusion bound than the client's does not help either
    with pytest.raises(ThresholdPolicyError, match="c = 0 colluders"):
        f.clients[0].handle_round_config(replace(cfg, colluders=0, threshold=4))
    weak = ServerSession(f.fed, f.roster, colluders=0)
    for v, c in f.clients.items():
        weak.receive_advertisement(c.advertise_keys(), origin=v)
    with pytest.raises(ThresholdPolicyError, match="c = 0 colluders"):
        f.clients[0].handle_round_config(weak.start_round(1, range(6), D))
    f.clients[0].handle_round_config(replace(cfg, threshold=5))


def test_c_server_thins_the_sparse_graph() -> None:
    f = make_federation(40, graph="harary", colluders=2, policy=ClientPolicy(colluders=2))
    advertise_all(f)
    cfg = f.server.start_round(1, range(40), D)
    assert cfg.degree == 12
    with pytest.raises(ThresholdPolicyError, match="degree 2 < policy minimum 12"):
        f.clients[0].handle_round_config(replace(cfg, degree=2, threshold=2))


def test_c_a_sparse_graph_too_thin_for_the_collusion_bound_is_refused() -> None:
    """With the default bound (13 colluders of 40) a degree-12 Harary graph cannot keep
    two honest updates in every sum: the server will not build it, and a client refuses
    it even when its own degree minimum is met."""
    from bract.secagg.errors import ConfigurationError

    f = make_federation(40, graph="harary")
    advertise_all(f)
    with pytest.raises(ConfigurationError, match="cannot honour the collusion bound"):
        f.server.start_round(1, range(40), D)
    g = make_federation(40, graph="harary", colluders=2)
    advertise_all(g)
    cfg = g.server.start_round(1, range(40), D)
    with pytest.raises(ThresholdPolicyError, match="c = 2 colluders"):
        g.clients[0].handle_round_config(cfg)
    with pytest.raises(ThresholdPolicyError):
        g.clients[0].handle_round_config(replace(cfg, colluders=13, threshold=13))


# (d) -------------------------------------------------------------- replays


def test_d_replays_from_another_round_or_federation() -> None:
    n = 5
    f = make_federation(n)
    inputs = random_inputs(n, D)
    st1 = run_to_unmask_request(f, 1, inputs, D)
    for v in st1.ureq.signers:
        f.server.receive_unmask_reply(f.clients[v].handle_unmask_request(st1.ureq))
    f.server.finish()
    # round 1's config replayed in round 2
    with pytest.raises(ReplayError, match="not newer"):
        f.clients[0].handle_round_config(st1.cfg)
    # a config of another federation
    with pytest.raises(ReplayError, match="federation"):
        f.clients[0].handle_round_config(replace(st1.cfg, federation_id="other", round=9))
    st2 = run_to_masked(f, 2, inputs, D, drop_mask=set(range(n)))  # stop before masking
    # round 1's share ciphertexts replayed inside round 2's mask request
    old = st1.mask_requests[0]
    new = st2.mask_requests[0]
    assert old.senders == new.senders
    with pytest.raises(AuthenticationError, match="AES-GCM authentication failed"):
        f.clients[0].handle_mask_request(replace(new, ciphertexts=old.ciphertexts), *inputs[0],
                                         input_digest=SHARED_INPUT_DIGEST)
    # a whole message of round 1 is refused as a replay
    with pytest.raises(ReplayError, match="round 1"):
        f.clients[0].handle_mask_request(old, *inputs[0], input_digest=SHARED_INPUT_DIGEST)
    # a message for the wrong stage
    with pytest.raises(ProtocolViolation, match="stage"):
        f.clients[0].handle_consistency_request(replace(st1.creq, round=2))
    for v in range(n):
        f.server.receive_masked_input(f.clients[v].handle_mask_request(st2.mask_requests[v],
                                                                       *inputs[v],
                                                                       input_digest=SHARED_INPUT_DIGEST))
    creq = f.server.consistency_request()
    for v in creq.alive:
        f.server.receive_consistency_signature(f.clients[v].handle_consistency_request(creq))
    ureq = f.server.unmask_request()
    # round 1's consistency signatures replayed into round 2
    with pytest.raises(AuthenticationError, match="consistency signature"):
        f.clients[0].handle_unmask_request(replace(ureq, signatures=st1.ureq.signatures))
    # the server refuses replayed client messages too
    with pytest.raises(ReplayError):
        f.server.receive_consistency_signature(st1.sigs[0])
    f.clients[0].handle_unmask_request(ureq)


# (e) -------------------------------------------------------------- tampering


def test_e_tampered_ciphertexts() -> None:
    n = 5
    f = make_federation(n)
    inputs = random_inputs(n, D)
    st = run_to_masked(f, 1, inputs, D, drop_mask=set(range(n)))
    req = st.mask_requests[0]
    cts = list(req.ciphertexts)
    flipped = bytearray(cts[1])
    flipped[20] ^= 1
    with pytest.raises(AuthenticationError, match=f"shares from node {req.senders[1]}"):
        f.clients[0].handle_mask_request(replace(req, ciphertexts=[*cts[:1], bytes(flipped),
                                                                    *cts[2:]]), *inputs[0],
                                         input_digest=SHARED_INPUT_DIGEST)
    swapped = [cts[1], cts[0], *cts[2:]]
    with pytest.raises(AuthenticationError):
        f.clients[0].handle_mask_request(replace(req, ciphertexts=swapped), *inputs[0],
                                         input_digest=SHARED_INPUT_DIGEST)
    with pytest.raises(MalformedMessage, match="wrong length"):
        f.clients[0].handle_mask_request(replace(req, ciphertexts=[b"x" * 10, *cts[1:]]),
                                         *inputs[0], input_digest=SHARED_INPUT_DIGEST)
    # a ciphertext addressed to another client, forwarded to this one
    other = st.mask_requests[1]
    j = other.senders.index(2)
    k = req.senders.index(2)
    redirected = list(cts)
    redirected[k] = other.ciphertexts[j]
    with pytest.raises(AuthenticationError):
        f.clients[0].handle_mask_request(replace(req, ciphertexts=redirected), *inputs[0],
                                         input_digest=SHARED_INPUT_DIGEST)
    # nothing changed: the genuine request goes through and the round completes
    for v in range(n):
        f.server.receive_masked_input(f.clients[v].handle_mask_request(st.mask_requests[v],
                                                                       *inputs[v],
                                                                       input_digest=SHARED_INPUT_DIGEST))


# (f) -------------------------------------------------------------- inconsistent alive sets


def test_f_inconsistent_alive_sets() -> None:
    """The server tells clients 0-3 that everyone is alive and clients 4-5 that node 6
    dropped, hoping to get b_6 from the first group and s_6 from the second."""
    n = 7
    f = make_federation(n)
    inputs = random_inputs(n, D)
    run_to_masked(f, 1, inputs, D)
    creq = f.server.consistency_request()
    everyone = creq.alive
    without6 = [v for v in everyone if v != 6]
    sig_a = {v: f.clients[v].handle_consistency_request(creq) for v in (0, 1, 2, 3, 6)}
    keep = [everyone.index(v) for v in without6]
    lie = replace(creq, alive=without6, input_digests=[creq.input_digests[i] for i in keep],
                  input_signatures=[creq.input_signatures[i] for i in keep])
    sig_b = {v: f.clients[v].handle_consistency_request(lie) for v in (4, 5)}
    # a client signs one alive set per round
    with pytest.raises(ConsistencyError, match="already signed a different alive set"):
        f.clients[4].handle_consistency_request(creq)

    def request(alive, dropped, sigs) -> UnmaskRequest:
        s = sorted(sigs)
        return UnmaskRequest(f.fed, 1, alive, dropped, s, [sigs[v].signature for v in s])

    replies = []
    # honest quorum for A: clients that signed A reveal b_6 (6 is alive in A)
    req_a = request(everyone, [], sig_a)
    for v in (0, 1, 2, 3):
        replies.append(f.clients[v].handle_unmask_request(req_a))
    # the lie has only 2 signatures (t = 4): refused
    req_b = request(without6, [6], sig_b)
    with pytest.raises(ConsistencyError, match="only 2 of node"):
        f.clients[4].handle_unmask_request(req_b)
    # relabelling A's signatures as B's: they do not verify
    forged = request(without6, [6], {**{v: sig_a[v] for v in (0, 1, 2, 3)}, **sig_b})
    with pytest.raises(AuthenticationError, match="does not verify"):
        f.clients[4].handle_unmask_request(forged)
    # showing a B-signer the set A: not what it signed
    with pytest.raises(ConsistencyError, match="differs"):
        f.clients[5].handle_unmask_request(req_a)
    # no client revealed the mask key of node 6 (so x_6 stays hidden behind s_6)
    assert all(6 not in r.key_owners for r in replies)
    assert all(not set(r.seed_owners) & set(r.key_owners) for r in replies)
