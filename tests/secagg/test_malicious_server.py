"""A malicious server with up to c colluding hospitals, against the declared bound.

The harness drives the protocol stage by stage as a dishonest server would: it
shows different clients different views, shrinks the alive set, edits the sharer
list, replays keys and signatures, and lets a colluding hospital send a wrong
share. Colluders hand the server everything they hold (their own secrets and
every share they received). After each attack :func:`isolable_honest_sums`
computes, from everything the adversary then holds, which sums of honest updates
it can isolate; the property is that each holds at least ``h`` honest clients
(or the attack was refused outright).

The oracle is independent of the protocol's own checks: it only needs the
masked inputs, the shares and which keys they reconstruct.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from secagg_helpers import (
    advertise_all,
    make_federation,
    random_inputs,
    to_shared,
    unmask_and_finish,
)

from bract.secagg import shamir
from bract.secagg.crypto import SigningKey, sha256, x25519_public
from bract.secagg.driver import SHARED_INPUT_DIGEST
from bract.secagg.errors import (
    AuthenticationError,
    ConfigurationError,
    ConsistencyError,
    MalformedMessage,
    ProtocolViolation,
    RoundAborted,
    SecAggError,
    ThresholdPolicyError,
)
from bract.secagg.messages import ConsistencyRequest, RoundConfig, UnmaskReply, UnmaskRequest
from bract.secagg.protocol import (
    ClientPolicy,
    ClientSession,
    ServerSession,
    _config_digest,
    advertisement_statement,
    consistency_statement,
)

D = 3


# ------------------------------------------------------------------------- the oracle


class Adversary:
    """Everything the server and its colluders hold in one round."""

    def __init__(self, f, cfg, colluders) -> None:
        self.cfg = cfg
        self.colluders = set(colluders)
        self.nbhd = f.server._round.nbhd
        self.publics: dict[int, bytes] = {}
        self.seed_points: dict[int, dict[int, int]] = {}
        self.key_points: dict[int, dict[int, int]] = {}
        self.masked: set[int] = set()
        self.sharers: set[int] = set()
        self.secrets_of: dict[int, tuple[bytes, bytes]] = {}
        #: Each client's own sharer list, from the mask request it answered (a
        #: dishonest server may give clients different ones): the peers whose pair
        #: masks its masked input holds. A client missing here is taken to mask with
        #: every sharer.
        self.partners: dict[int, set[int]] = {}

    def add_shares(self, shares) -> None:
        for v, msg in shares.items():
            self.publics[v] = msg.mask_public
            self.sharers.add(v)

    def add_colluder_state(self, clients) -> None:
        """Colluders give away their round secrets and every share they decrypted."""
        for c in self.colluders:
            rnd = clients[c]._round
            if rnd is None:
                continue
            self.secrets_of[c] = (rnd.seed, rnd.mask_private)
            x = shamir.x_coordinate(c)
            for v, (sb, _, kb, _) in [*rnd.received.items(), (c, rnd.own_shares)]:
                self.seed_points.setdefault(v, {})[x] = shamir.bytes_to_share(sb)
                self.key_points.setdefault(v, {})[x] = shamir.bytes_to_share(kb)

    def add_reply(self, reply: UnmaskReply) -> None:
        x = shamir.x_coordinate(reply.node_id)
        for v, b in zip(reply.seed_owners, reply.seed_shares, strict=True):
            self.seed_points.setdefault(v, {})[x] = shamir.bytes_to_share(b)
        for v, b in zip(reply.key_owners, reply.key_shares, strict=True):
            self.key_points.setdefault(v, {})[x] = shamir.bytes_to_share(b)

    def _known(self, points, check) -> set[int]:
        t = self.cfg.threshold
        out = set()
        for v, pts in points.items():
            if len(pts) >= t:
                secret = shamir.reconstruct(sorted(pts.items()), t)
                if check(v, secret):
                    out.add(v)
        return out | self.colluders

    def isolable_honest_sums(self) -> list[set[int]]:
        """Sums of honest updates the adversary can compute: connected groups of held
        inputs with a known seed, joined by pair masks whose keys it does not know
        (and which both ends applied, so they cancel), with no such mask to anything
        outside. A client's pair masks are those with the neighbours in its own
        sharer list."""
        def key_ok(v, secret):
            return secret < 2**256 and x25519_public(secret.to_bytes(32, "big")) == \
                self.publics.get(v)

        seeds = self._known(self.seed_points, lambda v, s: True)
        keys = self._known(self.key_points, key_ok)
        usable = {u for u in self.masked if u in seeds and u not in self.colluders}
        groups = {u: {u} for u in usable}
        leaky = set()
        def masks_with(u, v):
            return v != u and v in self.partners.get(u, self.sharers)

        for u in usable:
            for v in self.nbhd[u]:
                if not masks_with(u, v) or u in keys or v in keys:
                    continue
                if v in usable and masks_with(v, u):
                    merged = groups[u] | groups[v]
                    for w in merged:
                        groups[w] = merged
                else:
                    leaky.add(u)
        closed = {frozenset(g) for g in groups.values() if not g & leaky}
        return [set(g) for g in closed]


def assert_no_small_sum(adv: Adversary, h: int) -> None:
    for g in adv.isolable_honest_sums():
        assert len(g) >= h, f"the adversary isolates the sum of {sorted(g)} (< h = {h})"


# ------------------------------------------------------------------------- staging


def _to_mask_requests(n, **federation):
    """Round 1 of a federation of ``n`` (``make_federation``'s keyword arguments) up to
    the server's mask requests: ``(federation, config, inputs, shares, requests)``."""
    f = make_federation(n, **federation)
    advertise_all(f)
    inputs = random_inputs(n, D)
    cfg = f.server.start_round(1, range(n), D)
    shares = {v: f.clients[v].handle_round_config(cfg) for v in range(n)}
    for msg in shares.values():
        f.server.receive_shares(msg)
    return f, cfg, inputs, shares, f.server.mask_requests()


def _to_masked(n, colluders, *, policy=None, graph="complete", colluders_bound=None,
               drop_mask=(), digests=None):
    f, cfg, inputs, shares, reqs = _to_mask_requests(
        n, graph=graph, colluders=colluders_bound,
        policy=policy or ClientPolicy(colluders=colluders_bound))
    masked = {}
    for v, req in reqs.items():
        if v in drop_mask:
            continue
        masked[v] = f.clients[v].handle_mask_request(
            req, *inputs[v], input_digest=(digests or {}).get(v, SHARED_INPUT_DIGEST))
        f.server.receive_masked_input(masked[v])
    adv = Adversary(f, cfg, colluders)
    adv.add_shares(shares)
    adv.add_colluder_state(f.clients)
    adv.masked |= set(masked)
    return f, cfg, inputs, reqs, masked, adv


def _creq(server, fed, rnd, sharers, alive) -> ConsistencyRequest:
    """A consistency request for ``alive``, with each alive client's input digest and
    signature from the masked input the server received (what any server holds; a
    client it never received one from gets none that verifies)."""
    alive = sorted(alive)
    got = server._round.inputs if server._round is not None else {}
    return ConsistencyRequest(fed, rnd, list(sharers), alive,
                              [got.get(v, (b"", b""))[0] for v in alive],
                              [got.get(v, (b"", bytes(64)))[1] for v in alive])


def _sign(f, clients, creq):
    sigs = {}
    for v in clients:
        try:
            sigs[v] = f.clients[v].handle_consistency_request(creq).signature
        except SecAggError:
            continue
    return sigs


def _unmask(f, cfg, clients, alive, sharers, sigs, adv):
    """Send each client an unmask request for (alive, sharers) with signatures ``sigs``;
    collect the replies of those that accept."""
    signers = sorted(sigs)
    req = UnmaskRequest(f.fed, cfg.round, sorted(alive), sorted(set(sharers) - set(alive)),
                        signers, [sigs[s] for s in signers])
    got = 0
    for v in clients:
        try:
            adv.add_reply(f.clients[v].handle_unmask_request(req))
            got += 1
        except SecAggError:
            continue
    return got


def _colluder_sig(f, c, cfg, sharers, alive):
    return f.keys[c].sign(consistency_statement(f.fed, cfg.round, _config_digest(cfg),
                                                sharers, alive, SHARED_INPUT_DIGEST))


# ------------------------------------------------------------------------- attacks


def _draw_roles(n, data) -> tuple[set[int], list[int], int, set[int]]:
    """c = floor((n - 1) / 3) colluders, the honest rest, a victim among them, and a
    group of honest clients that includes the victim."""
    c = (n - 1) // 3
    colluders = set(data.draw(st.lists(st.integers(0, n - 1), min_size=c, max_size=c,
                                       unique=True)))
    honest = [v for v in range(n) if v not in colluders]
    victim = data.draw(st.sampled_from(honest))
    group = set(data.draw(st.lists(st.sampled_from(honest), unique=True))) | {victim}
    return colluders, honest, victim, group


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(4, 9), st.data())
def test_split_views_yield_no_sum_smaller_than_h(n, data) -> None:
    """The server shows the victim alive to one group and dropped to another, hoping for
    its seed from the first and its round mask key from the second; up to c colluders
    sign and reveal for both. Whatever the split, the adversary's knowledge isolates no
    sum of fewer than h honest updates."""
    colluders, honest, victim, group_a = _draw_roles(n, data)
    f, cfg, _, _, _, adv = _to_masked(n, colluders)
    everyone = list(range(n))
    without = [v for v in everyone if v != victim]
    sigs_a = _sign(f, group_a, _creq(f.server, f.fed, 1, everyone, everyone))
    sigs_b = _sign(f, set(honest) - group_a, _creq(f.server, f.fed, 1, everyone, without))
    for col in colluders:
        sigs_a[col] = _colluder_sig(f, col, cfg, everyone, everyone)
        sigs_b[col] = _colluder_sig(f, col, cfg, everyone, without)
    _unmask(f, cfg, group_a, everyone, everyone, sigs_a, adv)
    _unmask(f, cfg, set(honest) - group_a, without, everyone, sigs_b, adv)
    assert_no_small_sum(adv, 2)
    # and the victim's own update in particular stays inside a sum with others
    assert all(g != {victim} for g in adv.isolable_honest_sums())


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(4, 10), st.data())
def test_shrinking_the_alive_set_yields_no_sum_smaller_than_h(n, data) -> None:
    """The server 'loses' honest masked inputs so that the alive set is the victim plus
    colluders plus a few honest clients. Honest clients sign and reveal only for alive
    sets that keep h honest updates in every sum, whatever the server drops."""
    colluders, _, _, keep = _draw_roles(n, data)  # keep holds the victim
    alive = sorted(keep | colluders)
    f, cfg, _, _, _, adv = _to_masked(n, colluders)
    adv.masked = set(alive) | adv.masked  # the server keeps every input it received
    everyone = list(range(n))
    sigs = _sign(f, keep, _creq(f.server, f.fed, 1, everyone, alive))
    for col in colluders:
        sigs[col] = _colluder_sig(f, col, cfg, everyone, alive)
    _unmask(f, cfg, keep, alive, everyone, sigs, adv)
    assert_no_small_sum(adv, 2)
    if len(keep) < 2:
        assert not sigs.keys() - colluders  # the lone honest client refused to sign


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(4, 12), st.data())
def test_a_smaller_round_keeps_the_federations_collusion_bound(r, data) -> None:
    """The server writes the participant list. It sets up a round over any part of
    a roster of r hospitals that holds the victim, declares the weakest bound that
    part allows (c = 0), and then keeps any alive set: the default policy holds every
    round to the roster's c = floor((r - 1) / 3), so with that many colluders no sum
    of fewer than h = 2 honest updates can be isolated. (A bound taken from the
    round's size let a round of the victim, one colluder and a third hospital,
    called dropped, isolate the victim's update.)"""
    c = (r - 1) // 3
    colluders = set(data.draw(st.lists(st.integers(0, r - 1), min_size=c, max_size=c,
                                       unique=True), label="colluders"))
    honest = [v for v in range(r) if v not in colluders]
    victim = data.draw(st.sampled_from(honest), label="victim")
    others = data.draw(st.lists(st.sampled_from([v for v in range(r) if v != victim]),
                                min_size=2, unique=True), label="others")
    parts = sorted({victim, *others})
    keep = {victim} | set(data.draw(st.lists(st.sampled_from(
        [v for v in parts if v not in colluders]), unique=True), label="kept honest"))
    f = make_federation(r)  # every honest hospital on the default policy
    for v in colluders:  # colluders accept whatever the server sets up
        f.clients[v] = ClientSession(v, f.fed, f.keys[v], f.roster, ClientPolicy(colluders=0))
    advertise_all(f)
    rogue = ServerSession(f.fed, f.roster, colluders=0)
    rogue._adverts = dict(f.server._adverts)
    cfg = rogue.start_round(1, parts, D)
    inputs = random_inputs(r, D)
    shares = {}
    for v in parts:
        try:
            shares[v] = f.clients[v].handle_round_config(cfg)
        except SecAggError:
            assert v not in colluders
            continue
        rogue.receive_shares(shares[v])
    adv = Adversary(type("View", (), {"server": rogue})(), cfg, colluders & set(parts))
    adv.add_shares(shares)
    try:
        reqs = rogue.mask_requests()
    except SecAggError:
        reqs = {}  # too few shared: the round ends before anyone masks
    for v, req in reqs.items():
        try:
            masked = f.clients[v].handle_mask_request(req, *inputs[v],
                                                      input_digest=SHARED_INPUT_DIGEST)
        except SecAggError:
            continue
        rogue.receive_masked_input(masked)
        adv.masked.add(v)
    adv.add_colluder_state(f.clients)
    alive = sorted((keep | colluders) & adv.masked)
    sharers = sorted(shares)
    sigs = _sign(f, keep & adv.masked, _creq(rogue, f.fed, 1, sharers, alive))
    for col in colluders & adv.masked:
        sigs[col] = _colluder_sig(f, col, cfg, sharers, alive)
    _unmask(f, cfg, [v for v in parts if v not in colluders], alive, sharers, sigs, adv)
    assert_no_small_sum(adv, 2)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(4, 9), st.data())
def test_no_unmasked_sum_mixes_inputs_computed_from_different_models(n, data) -> None:
    """The server sends some hospitals another global model (one whose gradients are
    zero on chosen coordinates, so that a sum over the victim and them shows the
    victim's update there: Pasquini et al. 2022) and then keeps any alive set, with
    up to c colluders signing anything. Honest clients sign only alive sets whose
    members all signed the digest of the model they masked with, so every sum of
    honest updates the adversary can compute holds updates of one model, and at
    least h of them."""
    colluders, honest, victim, _ = _draw_roles(n, data)
    other = set(data.draw(st.lists(st.sampled_from([v for v in honest if v != victim]),
                                   unique=True), label="sent the other model"))
    models = {v: (b"B" * 32 if v in other else b"A" * 32) for v in range(n)}
    f, cfg, _, _, _, adv = _to_masked(n, colluders, digests=models)
    everyone = list(range(n))
    kept = set(data.draw(st.lists(st.sampled_from(honest), unique=True), label="kept"))
    alive = sorted(kept | colluders | {victim})
    sigs = _sign(f, set(honest) & set(alive), _creq(f.server, f.fed, 1, everyone, alive))
    for v in set(honest) & set(alive):
        if v in sigs:  # it signed: every alive member declared its model
            assert {models[u] for u in alive if u not in colluders} == {models[v]}
    for col in colluders:
        sigs[col] = f.keys[col].sign(consistency_statement(
            f.fed, 1, _config_digest(cfg), everyone, alive, b"A" * 32))
    _unmask(f, cfg, honest, alive, everyone, sigs, adv)
    for group in adv.isolable_honest_sums():
        assert len({models[u] for u in group}) == 1, \
            f"the sum of {sorted(group)} mixes inputs computed from different models"
    assert_no_small_sum(adv, 2)


def test_the_server_leaves_out_an_input_computed_from_another_model() -> None:
    """An honest server that says which model it sent refuses a masked input declaring
    another (that hospital is then not alive), and a signature that does not cover
    the declared digest is refused outright."""
    from dataclasses import replace

    f, _, inputs = to_shared(5, D)
    f.server.expect_input_digest(b"A" * 32)
    for v, req in f.server.mask_requests().items():
        masked = f.clients[v].handle_mask_request(req, *inputs[v],
                                                  input_digest=b"B" * 32 if v == 4 else b"A" * 32)
        if v == 4:
            with pytest.raises(ProtocolViolation, match="another global model"):
                f.server.receive_masked_input(masked)
            with pytest.raises(AuthenticationError, match="input signature of node 4"):
                f.server.receive_masked_input(replace(masked, input_digest=b"A" * 32))
            continue
        f.server.receive_masked_input(masked)
    res = unmask_and_finish(f)
    assert list(res.alive) == [0, 1, 2, 3]
    assert res.total_weight == sum(inputs[v][1] for v in range(4))


def test_a_round_too_small_for_the_rosters_bound_is_refused_by_server_and_clients() -> None:
    """In a federation of 10 (c = 3, h = 2) a round needs c + h = 5 hospitals: the
    server will not set up a round of 4, and a hospital refuses one set up by a server
    that declares less."""
    f = make_federation(10)
    advertise_all(f)
    with pytest.raises(ConfigurationError, match="cannot honour the collusion bound"):
        f.server.start_round(1, [0, 1, 2, 3], D)
    assert f.server.start_round(1, [0, 1, 2, 3, 4], D).threshold == 5
    rogue = ServerSession(f.fed, f.roster, colluders=0)
    rogue._adverts = dict(f.server._adverts)
    cfg = rogue.start_round(2, [0, 1, 2, 3], D)
    with pytest.raises(ThresholdPolicyError, match="policy is c = 3"):
        f.clients[0].handle_round_config(cfg)


def test_alive_set_of_the_victim_and_colluders_is_refused() -> None:
    n, colluders = 7, {5, 6}
    f, *_ = _to_masked(n, colluders)
    for v in (0, 1):
        with pytest.raises(ProtocolViolation):
            f.clients[v].handle_consistency_request(
                _creq(f.server, f.fed, 1, list(range(n)), [0, 5, 6]))


def test_an_alive_set_that_reaches_t_but_not_c_plus_h_is_refused() -> None:
    """With h = 4 honest per sum and c = 2, an alive set of t = 5 is not enough."""
    n = 7
    f = make_federation(n, colluders=2, min_honest=4,
                        policy=ClientPolicy(colluders=2, min_honest=4))
    advertise_all(f)
    inputs = random_inputs(n, D)
    cfg = f.server.start_round(1, range(n), D)
    assert cfg.threshold == 5
    for v in range(n):
        f.server.receive_shares(f.clients[v].handle_round_config(cfg))
    for v, req in f.server.mask_requests().items():
        f.server.receive_masked_input(f.clients[v].handle_mask_request(req, *inputs[v],
                                                                       input_digest=SHARED_INPUT_DIGEST))
    with pytest.raises(ThresholdPolicyError, match="alive set refused"):
        f.clients[0].handle_consistency_request(
            _creq(f.server, f.fed, 1, list(range(n)), [0, 1, 2, 3, 4]))


def test_sharer_list_manipulation_breaks_the_quorum() -> None:
    """The server shows clients different sharer lists: the signed views differ, so the
    sets it could unmask with never gather a quorum; a mask request that hides a sharing
    neighbour is refused before masking."""
    n = 7
    f, *_ = _to_masked(n, set())
    everyone = list(range(n))
    without4 = [v for v in everyone if v != 4]
    with pytest.raises(ConsistencyError, match="sharer list differs"):
        f.clients[0].handle_consistency_request(_creq(f.server, f.fed, 1, without4,
                                                                   without4))
    # signatures over (everyone, alive) do not verify as signatures over another list
    sigs = _sign(f, everyone, _creq(f.server, f.fed, 1, everyone, everyone))
    assert len(sigs) == n
    req = UnmaskRequest(f.fed, 1, without4, [], sorted(sigs), [sigs[s] for s in sorted(sigs)])
    for v in everyone:
        with pytest.raises(SecAggError):
            f.clients[v].handle_unmask_request(req)
    g, _, inputs, reqs, _, _ = _to_masked(n, set(), drop_mask=set(range(n)))
    bad = reqs[0]
    with pytest.raises(ProtocolViolation, match="missing"):
        g.clients[0].handle_mask_request(
            replace(bad, senders=bad.senders[1:], headers=bad.headers[1:],
                    ciphertexts=bad.ciphertexts[1:]), *inputs[0],
            input_digest=SHARED_INPUT_DIGEST)
    # state untouched by the refusal:
    g.clients[0].handle_mask_request(bad, *inputs[0], input_digest=SHARED_INPUT_DIGEST)


# ---------------------------------------------------------------- replays of keys


def test_a_signature_seen_before_is_no_pass_for_new_keys() -> None:
    """Finding 3: a client that verified an advertisement once skipped the roster check
    of any later advertisement with the same signature bytes. A server replaying the old
    signature over its own key is refused."""
    from bract.secagg.crypto import x25519_generate

    f = make_federation(4)
    advertise_all(f)
    cfg1 = f.server.start_round(1, range(4), D)
    f.clients[0].handle_round_config(cfg1)  # verifies (and remembers) node 1's advert
    f.clients[0].abort_round()
    cfg2 = f.server.start_round(2, range(4), D)
    _, evil = x25519_generate()
    ciphers = list(cfg2.cipher_publics)
    ciphers[1] = evil  # same signature bytes, the server's own key
    with pytest.raises(AuthenticationError, match="key advertisement of node 1"):
        f.clients[0].handle_round_config(replace(cfg2, cipher_publics=ciphers))
    epochs = list(cfg2.key_epochs)
    epochs[1] = 7
    with pytest.raises(AuthenticationError, match="key advertisement of node 1"):
        f.clients[0].handle_round_config(replace(cfg2, key_epochs=epochs))
    # after a state round trip (the Flower path) too
    c0 = ClientSession.from_state(f.clients[0].export_state(), f.keys[0], f.roster)
    with pytest.raises(AuthenticationError, match="key advertisement of node 1"):
        c0.handle_round_config(replace(cfg2, cipher_publics=ciphers))
    f.clients[0].handle_round_config(cfg2)


def test_a_share_header_of_another_round_or_sender_is_refused() -> None:
    """Round mask keys travel signed over (round, config digest, sender): a header of
    round 1 replayed in round 2, or one sender's header presented as another's, fails."""
    n = 5
    f, _, inputs, reqs1, _, _ = _to_masked(n, set(), drop_mask=set(range(n)))
    for v in range(n):
        f.clients[v].abort_round()
    f.server.abort_round()
    cfg2 = f.server.start_round(2, range(n), D)
    for v in range(n):
        f.server.receive_shares(f.clients[v].handle_round_config(cfg2))
    new, old = f.server.mask_requests()[0], reqs1[0]
    with pytest.raises(AuthenticationError, match="shares of node"):
        f.clients[0].handle_mask_request(replace(new, headers=old.headers), *inputs[0],
                                         input_digest=SHARED_INPUT_DIGEST)
    swapped = [new.headers[1], new.headers[0], *new.headers[2:]]
    with pytest.raises(SecAggError):
        f.clients[0].handle_mask_request(replace(new, headers=swapped), *inputs[0],
                                         input_digest=SHARED_INPUT_DIGEST)
    f.clients[0].handle_mask_request(new, *inputs[0], input_digest=SHARED_INPUT_DIGEST)


def test_the_server_refuses_forged_oversized_or_replayed_share_messages() -> None:
    from bract.secagg.crypto import x25519_generate

    n = 5
    f = make_federation(n)
    advertise_all(f)
    cfg = f.server.start_round(1, range(n), D)
    msg = f.clients[0].handle_round_config(cfg)
    _, other = x25519_generate()
    with pytest.raises(AuthenticationError, match="does not verify"):
        f.server.receive_shares(replace(msg, mask_public=other))
    with pytest.raises(AuthenticationError, match="low-order"):
        f.server.receive_shares(replace(msg, mask_public=bytes(32)))
    big = [*msg.ciphertexts]
    big[1] = big[1] + bytes(32 << 20)  # 32 MiB more
    with pytest.raises(MalformedMessage, match="expected"):
        f.server.receive_shares(replace(msg, ciphertexts=big))
    f.server.receive_shares(msg)
    with pytest.raises(ProtocolViolation, match="already sent"):
        f.server.receive_shares(msg)


# ------------------------------------------------------------ identities and points


def test_one_advertisement_per_identity_bound_to_its_origin() -> None:
    """Finding 6: a hospital answering the key query with another hospital's
    advertisement took that hospital's id. Advertisements name their transport origin
    and one origin holds one identity."""
    f = make_federation(4)
    adv1 = f.clients[1].advertise_keys(origin=101)
    adv2 = f.clients[2].advertise_keys(origin=102)
    f.server.receive_advertisement(adv1, origin=101)
    with pytest.raises(AuthenticationError, match="came from 102"):
        f.server.receive_advertisement(adv1, origin=102)  # node 102 replays node 1's
    with pytest.raises(AuthenticationError, match="does not verify"):
        f.server.receive_advertisement(replace(adv2, origin=101), origin=101)
    adv3 = f.clients[3].advertise_keys(origin=101)  # signs an origin another id holds
    with pytest.raises(AuthenticationError, match="already holds node 1"):
        f.server.receive_advertisement(adv3, origin=101)
    f.server.receive_advertisement(adv2, origin=102)
    assert f.server.needs_advertisement(range(4)) == [0, 3]


@pytest.mark.parametrize("point", [bytes(32), (1).to_bytes(32, "little"),
                                   bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46a"
                                                 "da098deb9c32b1fd866205165f49b800")])
def test_low_order_points_are_refused_at_the_server(point: bytes) -> None:
    f = make_federation(3)
    sig = f.keys[1].sign(advertisement_statement(f.fed, 1, 1, 0, point))
    adv = replace(f.clients[1].advertise_keys(), cipher_public=point, signature=sig)
    with pytest.raises(AuthenticationError, match="low-order"):
        f.server.receive_advertisement(adv, origin=1)


def test_signing_keys_outside_the_roster_change_nothing() -> None:
    f = make_federation(4)
    adv = f.clients[1].advertise_keys()
    sig = SigningKey.generate().sign(advertisement_statement(f.fed, 1, adv.origin, adv.epoch,
                                                             adv.cipher_public))
    with pytest.raises(AuthenticationError, match="does not verify"):
        f.server.receive_advertisement(replace(adv, signature=sig), origin=1)


# ---------------------------------------------------------------- wrong shares


def _run_until_unmask(n):
    f, *_rest = _to_masked(n, set())
    inputs = _rest[1]
    creq = f.server.consistency_request()
    for v in creq.alive:
        f.server.receive_consistency_signature(f.clients[v].handle_consistency_request(creq))
    return f, f.server.unmask_request(), inputs


def _tamper_share(reply: UnmaskReply, owner: int) -> UnmaskReply:
    i = reply.seed_owners.index(owner)
    shares = list(reply.seed_shares)
    shares[i] = shamir.share_to_bytes((shamir.bytes_to_share(shares[i]) + 1) % shamir.PRIME)
    return replace(reply, seed_shares=shares)


def _exact(res, inputs) -> None:
    ref = sum(inputs[u][1] * inputs[u][0].astype(np.float64) for u in res.alive)
    assert np.all(np.abs(res.weighted_sum - ref) <= res.error_bound)
    assert res.total_weight == sum(inputs[u][1] for u in res.alive)


def test_a_wrong_share_is_caught_attributed_and_the_round_completes() -> None:
    """Finding 4: a colluding hospital returns a crafted share. The server checks it
    against the dealer's signed commitment, excludes and names the sender, and the round
    completes exactly from the remaining valid shares."""
    n = 7  # c = 2, t = 5: two replies may be lost
    f, ureq, inputs = _run_until_unmask(n)
    cheat = 3
    for v in ureq.signers:
        reply = f.clients[v].handle_unmask_request(ureq)
        if v == cheat:
            with pytest.raises(AuthenticationError, match="node 3 returned a seed share"):
                f.server.receive_unmask_reply(_tamper_share(reply, owner=0))
            with pytest.raises(ProtocolViolation, match="already answered"):
                f.server.receive_unmask_reply(reply)  # no second chance in this round
            continue
        f.server.receive_unmask_reply(reply)
    res = f.server.finish()
    assert res.excluded == (cheat,)
    _exact(res, inputs)


def test_too_many_wrong_shares_abort_cleanly_naming_the_cheaters() -> None:
    n = 4  # c = 1, t = 3: two cheaters leave two valid replies
    f, ureq, _ = _run_until_unmask(n)
    for v in ureq.signers:
        reply = f.clients[v].handle_unmask_request(ureq)
        if v in (1, 2):
            with pytest.raises(AuthenticationError):
                f.server.receive_unmask_reply(_tamper_share(reply, owner=0))
        else:
            f.server.receive_unmask_reply(reply)
    with pytest.raises(RoundAborted, match="aborted at unmasking") as err:
        f.server.finish()
    assert err.value.cheaters == (1, 2)
    assert f.server.stage is None


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_any_corrupted_share_or_salt_is_caught(data) -> None:
    """Property: flipping any bit of any returned share or salt gets the reply refused
    and its sender excluded; the sum that comes out is exact or the round aborts."""
    f, ureq, inputs = _run_until_unmask(5)
    cheat = data.draw(st.sampled_from(ureq.signers))
    for v in ureq.signers:
        reply = f.clients[v].handle_unmask_request(ureq)
        if v == cheat:
            name = data.draw(st.sampled_from(["seed_shares", "seed_salts"]))
            values = list(getattr(reply, name))
            i = data.draw(st.integers(0, len(values) - 1))
            bit = data.draw(st.integers(0, 8 * len(values[i]) - 1))
            raw = bytearray(values[i])
            raw[bit // 8] ^= 1 << (bit % 8)
            values[i] = bytes(raw)
            with pytest.raises(SecAggError):
                f.server.receive_unmask_reply(replace(reply, **{name: values}))
            continue
        f.server.receive_unmask_reply(reply)
    try:
        res = f.server.finish()
    except RoundAborted as exc:
        assert cheat in exc.cheaters
        return
    assert cheat in res.excluded
    _exact(res, inputs)


def test_a_dealer_whose_shares_do_not_open_its_commitments_is_named() -> None:
    """A malicious hospital deals a share that does not match its own signed commitment:
    the holder refuses it, naming the dealer, rather than be blamed for it later."""
    from bract.secagg.crypto import aead_encrypt
    from bract.secagg.protocol import _config_digest, _share_ad, _share_plaintext

    n = 5
    f = make_federation(n)
    advertise_all(f)
    cfg = f.server.start_round(1, range(n), D)
    shares = {v: f.clients[v].handle_round_config(cfg) for v in range(n)}
    bad = shares[2]
    key = f.clients[2]._channel_key(cfg.advertisement(0))
    pt = _share_plaintext(f.fed, 1, 2, 0, shamir.share_to_bytes(5), bytes(32),
                          shamir.share_to_bytes(6), bytes(32))
    cts = list(bad.ciphertexts)
    cts[bad.holders.index(0)] = aead_encrypt(key, pt, _share_ad(f.fed, 1, _config_digest(cfg),
                                                                2, 0))
    for v, msg in shares.items():
        f.server.receive_shares(replace(msg, ciphertexts=cts) if v == 2 else msg)
    with pytest.raises(AuthenticationError, match="from node 2 do not match its signed"):
        f.clients[0].handle_mask_request(f.server.mask_requests()[0], *random_inputs(n, D)[0],
                                         input_digest=SHARED_INPUT_DIGEST)


def test_keys_and_seeds_never_repeat_across_rounds() -> None:
    """Per-round secrets: every round's mask key and seed commitment are new."""
    n = 4
    f = make_federation(n)
    advertise_all(f)
    seen_pk, seen_commit = set(), set()
    for r in range(1, 6):
        cfg = f.server.start_round(r, range(n), D)
        for v in range(n):
            msg = f.clients[v].handle_round_config(cfg)
            assert msg.mask_public not in seen_pk and msg.seed_commitment not in seen_commit
            seen_pk.add(msg.mask_public)
            seen_commit.add(msg.seed_commitment)
            f.clients[v].abort_round()
        f.server.abort_round()


def test_policy_needs_three_hospitals_and_two_honest_updates_per_sum() -> None:
    from bract.secagg.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="min_honest"):
        ClientPolicy(min_honest=1)
    with pytest.raises(ConfigurationError, match="min_participants"):
        ClientPolicy(min_participants=2)
    f = make_federation(3)
    advertise_all(f)
    with pytest.raises(SecAggError, match="at least 3"):
        f.server.start_round(1, [0, 1], D)
    server = ServerSession(f.fed, f.roster, colluders=0, min_honest=2)
    for v, c in f.clients.items():
        server.receive_advertisement(c.advertise_keys(), origin=v)
    cfg = server.start_round(1, range(3), D)
    assert (cfg.threshold, cfg.colluders, cfg.min_honest) == (2, 0, 2)
    two = replace(cfg, participants=[0, 1], key_epochs=cfg.key_epochs[:2],
                  key_origins=cfg.key_origins[:2], cipher_publics=cfg.cipher_publics[:2],
                  key_signatures=cfg.key_signatures[:2])
    with pytest.raises(ThresholdPolicyError, match="participants < policy minimum 3"):
        f.clients[0].handle_round_config(two)


def test_harary_split_views_with_one_declared_colluder() -> None:
    """Finding 2 on the sparse graph: with c = 1 declared, a colluder in the victim's
    neighbourhood plus any split of the honest clients never isolates the victim."""
    n, victim = 12, 0
    for k in range(0, 8, 2):
        g, cfg, _, _, _, adv = _to_masked(n, set(), graph="harary", colluders_bound=1)
        nb = g.server._round.nbhd
        col = next(v for v in nb[victim] if v != victim)
        adv.colluders = {col}
        adv.add_colluder_state(g.clients)
        honest_nb = [v for v in nb[victim] if v not in (victim, col)]
        everyone = list(range(n))
        without = [v for v in everyone if v != victim]
        a = {victim, *honest_nb[:k]}
        b = set(everyone) - a - {col}
        sigs_a = _sign(g, a, _creq(g.server, g.fed, 1, everyone, everyone))
        sigs_b = _sign(g, b, _creq(g.server, g.fed, 1, everyone, without))
        sigs_a[col] = _colluder_sig(g, col, cfg, everyone, everyone)
        sigs_b[col] = _colluder_sig(g, col, cfg, everyone, without)
        _unmask(g, cfg, a, everyone, everyone, sigs_a, adv)
        _unmask(g, cfg, b, without, everyone, sigs_b, adv)
        assert_no_small_sum(adv, 2)


def test_harary_split_views_of_two_colluders_never_isolate_an_update() -> None:
    """The attack an exhaustive integer-program search finds on H(6, 16) with c = 2 once
    an answering client checks the quorum only of the peers it reveals (not of every
    peer it holds shares of): colluders at ring positions 1 and 3 beside the victim at
    0; the victim's mask request hides positions 13 and 14, so it masks with 1, 2, 3
    and 15 only; view A (2, 10, 12, 13, 14 sign) keeps the victim alive and drops 15,
    view B (4, 5, 6, 15 sign) drops 2. Under that relaxation A reveals the victim's
    seed and 15's mask key, B reveals 2's: the victim's update alone. The real check
    (every held peer needs t signatures on the view) refuses those replies, and no
    sum of fewer than h = 2 honest updates is isolable."""
    n, degree, c = 16, 6, 2
    f = make_federation(n, graph="harary", degree=degree, colluders=c,
                        policy=ClientPolicy(colluders=c, min_degree=degree))
    advertise_all(f)
    inputs = random_inputs(n, D)
    cfg = f.server.start_round(1, range(n), D)
    assert (cfg.graph_kind, cfg.degree, cfg.threshold) == ("harary", degree, 5)
    # The Harary ring's order, from the config's seed (graph.closed_neighbourhoods).
    order = sorted(range(n), key=lambda u: (sha256(cfg.graph_seed + u.to_bytes(8, "big")), u))

    def at(*positions):
        return {order[p % n] for p in positions}

    (victim,), colluders, hidden = at(0), at(1, 3), at(13, 14)
    shares = {v: f.clients[v].handle_round_config(cfg) for v in range(n)}
    for msg in shares.values():
        f.server.receive_shares(msg)
    reqs = f.server.mask_requests()
    req = reqs[victim]
    keep = [i for i, v in enumerate(req.senders) if v not in hidden]
    reqs[victim] = replace(req, sharers=[v for v in req.sharers if v not in hidden],
                           senders=[req.senders[i] for i in keep],
                           headers=[req.headers[i] for i in keep],
                           ciphertexts=[req.ciphertexts[i] for i in keep])
    adv = Adversary(f, cfg, colluders)
    adv.add_shares(shares)
    for v, r in reqs.items():
        f.server.receive_masked_input(
            f.clients[v].handle_mask_request(r, *inputs[v], input_digest=SHARED_INPUT_DIGEST))
        adv.partners[v] = set(r.sharers)
        adv.masked.add(v)
    adv.add_colluder_state(f.clients)
    everyone = list(range(n))
    views = [(set(everyone) - at(8, 15), at(2, 10, 12, 13, 14)),
             (set(everyone) - at(2, 7, 14), at(4, 5, 6, 15))]
    answered = 0
    for alive, signers in views:
        sigs = _sign(f, signers, _creq(f.server, f.fed, 1, everyone, alive))
        assert set(sigs) == signers  # each honest signer signs its one view
        for col in colluders:
            sigs[col] = _colluder_sig(f, col, cfg, everyone, alive)
        answered += _unmask(f, cfg, signers, alive, everyone, sigs, adv)
    assert_no_small_sum(adv, 2)
    assert answered == 0  # every signer holds a share of a peer without a quorum


def _audit_agrees_with_the_oracle(data, n: int, dropped: frozenset[int] | set[int] = frozenset(),
                                  **federation) -> RoundConfig:
    """One round of a federation of ``n`` (``make_federation``'s keyword arguments) in
    which the clients in ``dropped`` never share keys, driven by a dishonest server
    drawn from ``data``: each remaining sharer's own sharer list (itself, at least
    ``t - 1`` of its neighbours that shared, any others), the masked inputs that reach
    the server, and unmask replies from any clients, each revealing, of every peer
    whose shares it holds, the seed share, the key share, both or neither (no quorum
    check). Asserts that the audit's knowledge check on the recorded view finds exactly
    the isolable honest sums the oracle finds, and fails exactly when one holds fewer
    than h clients; returns the round's config. A round the server aborts before its
    mask requests (too few sharers left) is rejected."""
    from hypothesis import event, reject

    import bract.secagg.protocol as protocol
    from bract.audit.secagg_audit import knowledge_across_rounds
    from bract.secagg.recording import ServerView

    f = make_federation(n, **federation)
    advertise_all(f)
    inputs = random_inputs(n, D)
    # The sparse graph comes from the round's random seed; drawn here instead, so that
    # one example is one graph and whether its round aborts (rejected below) is the
    # same every time Hypothesis replays it (else: FlakyStrategyDefinition).
    seed = data.draw(st.binary(min_size=16, max_size=16), label="graph seed")
    real = protocol.random_bytes
    protocol.random_bytes = lambda k: seed if k == len(seed) else real(k)
    try:
        cfg = f.server.start_round(1, range(n), D)
    finally:
        protocol.random_bytes = real
    assert cfg.graph_seed == seed
    shares = {v: f.clients[v].handle_round_config(cfg) for v in range(n) if v not in dropped}
    for msg in shares.values():
        f.server.receive_shares(msg)
    try:
        reqs = f.server.mask_requests()
    except RoundAborted:
        reject()
    t, sharers, nbhd = cfg.threshold, sorted(reqs), f.server._round.nbhd

    # Every draw has a shape independent of the graph (its ordering comes from the
    # server's random seed): fixed-length lists indexed by node.
    def subset(label, p):
        """Each sharer in with probability (p - 1) / p."""
        picks = data.draw(st.lists(st.integers(0, p - 1), min_size=n, max_size=n),
                          label=label)
        return {v for v in sharers if picks[v] < p - 1}

    lists = {}
    for v in sharers:
        rank = data.draw(st.permutations(range(n)), label=f"order of {v}'s peers")
        near = sorted((u for u in nbhd[v] if u != v and u in sharers), key=rank.index)
        k = t - 1 + data.draw(st.integers(0, n), label=f"extra neighbours in {v}'s list") \
            % (len(near) - t + 2)
        far = data.draw(st.lists(st.booleans(), min_size=n, max_size=n),
                        label=f"non-neighbours in {v}'s list")
        others = [u for u in sharers if u not in nbhd[v] and far[u]]
        lists[v] = {v, *near[:k], *others}
        r = reqs[v]
        keep = [i for i, u in enumerate(r.senders) if u in lists[v]]
        reqs[v] = replace(r, sharers=sorted(lists[v]), senders=[r.senders[i] for i in keep],
                          headers=[r.headers[i] for i in keep],
                          ciphertexts=[r.ciphertexts[i] for i in keep])
    masked = {v: f.clients[v].handle_mask_request(reqs[v], *inputs[v],
                                                  input_digest=SHARED_INPUT_DIGEST)
              for v in sharers}
    held = subset("held", p=4)
    revealed = {v: data.draw(st.sampled_from(("seed", "key", "both", "neither")),
                             label=f"shares of {v} revealed") for v in range(n)}
    replies = []
    for v in sorted(subset("replying", p=4)):
        rnd = f.clients[v]._round
        peers = [u for u in rnd.nbhd[v] if u == v or u in rnd.received]
        got = {u: rnd.own_shares if u == v else rnd.received[u] for u in peers}
        seed = [u for u in peers if revealed[u] in ("seed", "both")]
        key = [u for u in peers if revealed[u] in ("key", "both")]
        replies.append(UnmaskReply(f.fed, 1, v, seed, [got[u][0] for u in seed],
                                   [got[u][1] for u in seed], key, [got[u][2] for u in key],
                                   [got[u][3] for u in key]))

    adv = Adversary(f, cfg, set())
    adv.add_shares(shares)
    adv.partners = lists
    adv.masked = held
    for r in replies:
        adv.add_reply(r)
    expected = sorted(sorted(g) for g in adv.isolable_honest_sums())

    log = [("out", cfg), *(("in", shares[v]) for v in sorted(shares)),
           *(("out", reqs[v]) for v in sharers), *(("in", masked[v]) for v in sorted(held)),
           *(("in", r) for r in replies)]
    view = ServerView(1, log, np.zeros(D), 0, aborted=True)
    assert {v: view.sharer_lists[v] for v in sharers} == lists
    (check,) = knowledge_across_rounds([view])
    assert sorted(check.statistics[0]["isolable_sums"]) == expected
    assert check.passed == all(len(g) >= cfg.min_honest for g in expected)
    event("the audit fails (a sum of fewer than h)" if not check.passed
          else "the audit passes")
    return cfg


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(4, 7), st.data())
def test_the_secagg_audit_isolates_exactly_the_sums_the_oracle_does(n, data) -> None:
    """Property: for any sharer list per client (each its own, at least t of them, as a
    dishonest server may send), any set of masked inputs reaching the server and any
    unmask replies from any clients (each revealing, of every peer whose shares it
    holds, the seed share, the key share, both or neither, as drawn per peer: no
    quorum check), ``bract audit secagg``'s knowledge check on the recorded view finds
    exactly the isolable honest sums this oracle finds, and fails exactly when one
    holds fewer than h clients (complete graph)."""
    cfg = _audit_agrees_with_the_oracle(data, n)
    assert cfg.graph_kind == "complete"


#: Sparse Harary rounds: what ``auto`` picks once dropouts are declared (n, declared
#: dropouts), and thinner ones of degree 4 with one tolerated colluder.
SPARSE = st.one_of(
    st.tuples(st.sampled_from([8, 10, 11, 12]), st.just("auto"), st.integers(1, 2)),
    st.tuples(st.integers(6, 10), st.just("harary"), st.just(4)))


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(SPARSE, st.data())
def test_the_secagg_audit_isolates_exactly_the_sums_the_oracle_does_on_sparse_graphs(
        shape, data) -> None:
    """Property: the same agreement on the sparse Harary graphs ``graph.py`` builds —
    the one ``auto`` picks for a federation of 8 to 12 declaring 1 or 2 dropouts (each
    client masks with 6 or 8 neighbours, not all), and degree 4 with one colluder —
    with dropouts at every stage the server sees: up to two clients never share keys
    (the server leaves out, in turn, any sharer whose neighbourhood then falls below t),
    a drawn subset's masked inputs never arrive, and any subset replies. The audit,
    reading each client's own sharer list and its neighbourhood in the round's graph,
    finds exactly the oracle's isolable sums and fails exactly when one holds fewer
    than h clients."""
    n, graph, extra = shape
    dropped = set(data.draw(st.lists(st.integers(0, n - 1), unique=True, max_size=2),
                            label="never share keys"))
    if graph == "auto":
        cfg = _audit_agrees_with_the_oracle(data, n, dropped, graph="auto", dropouts=extra)
    else:
        cfg = _audit_agrees_with_the_oracle(
            data, n, dropped, graph="harary", degree=extra, colluders=1,
            policy=ClientPolicy(colluders=1, min_degree=extra))
    assert cfg.graph_kind == "harary" and cfg.degree < n - 1  # sparse: not everyone


def test_a_client_whose_input_breaks_the_encoding_makes_the_round_abort_cleanly() -> None:
    """A malicious client masks a vector whose weight field is 'negative' in the ring:
    the unmasked sum does not decode, and finish() aborts the round (RoundAborted),
    never an exception of another kind, never a wrong sum."""
    f, _, inputs = to_shared(4, D)
    for v, req in f.server.mask_requests().items():
        msg = f.clients[v].handle_mask_request(req, *inputs[v], input_digest=SHARED_INPUT_DIGEST)
        if v == 0:  # add 2^63 to its weight coordinate (the last ring element)
            y = np.frombuffer(msg.data, dtype=np.uint64).copy()
            y[-1:] += np.uint64(1 << 63)  # array arithmetic wraps silently
            msg = replace(msg, data=y.tobytes())
        f.server.receive_masked_input(msg)
    with pytest.raises(RoundAborted, match="does not decode"):
        unmask_and_finish(f)
    assert f.server.stage is None


def test_commitments_of_another_holder_are_not_under_this_holders_path() -> None:
    """The server forwards holder 0 the signed header (commitments and Merkle path) a
    sender made for holder 1: the signature is genuine, but the commitments are not at
    holder 0's place under the signed root, so holder 0 refuses before masking."""
    n = 5
    f, _, inputs, reqs, _, _ = _to_masked(n, set(), drop_mask=set(range(n)))
    req = reqs[0]
    sender = req.senders[0]
    other_holder = next(h for h in f.server._round.shares[sender].holders if h not in (0,))
    foreign = f.server._round.shares[sender].holder_headers()[other_holder]
    headers = [foreign, *req.headers[1:]]
    with pytest.raises(AuthenticationError, match="not under the signed root"):
        f.clients[0].handle_mask_request(replace(req, headers=headers), *inputs[0],
                                         input_digest=SHARED_INPUT_DIGEST)
    f.clients[0].handle_mask_request(req, *inputs[0], input_digest=SHARED_INPUT_DIGEST)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(("shares", "masked", "signature", "unmask")), st.data())
def test_a_message_naming_another_node_than_its_sender_is_refused_and_changes_nothing(
        stage, data) -> None:
    """Property: at every stage, a message whose node_id is not the node its sender
    advertised from (a genuine message relayed by another client, or at the unmask
    stage a forged reply with a wrong share, which would get its named node excluded)
    is refused with AuthenticationError before it changes anything: the round then
    completes exactly, with every client's own messages, and excludes nobody."""
    n = 5
    f = make_federation(n)
    advertise_all(f)
    inputs = random_inputs(n, D)
    owner = data.draw(st.integers(0, n - 1), label="owner")
    sender = data.draw(st.integers(0, n - 1).filter(lambda s: s != owner), label="sender")

    def forged(msg):
        with pytest.raises(AuthenticationError, match=f"names node {owner} but came from"):
            deliver(msg, sender)

    def deliver(msg, frm):
        receive = {"shares": f.server.receive_shares, "masked": f.server.receive_masked_input,
                   "signature": f.server.receive_consistency_signature,
                   "unmask": f.server.receive_unmask_reply}[kind[type(msg).__name__]]
        receive(msg, sender=frm)

    kind = {"ShareKeys": "shares", "MaskedInput": "masked",
            "ConsistencySignature": "signature", "UnmaskReply": "unmask"}
    cfg = f.server.start_round(1, range(n), D)
    shares = {v: f.clients[v].handle_round_config(cfg) for v in range(n)}
    if stage == "shares":
        forged(shares[owner])
    for v in range(n):
        deliver(shares[v], v)
    masked = {v: f.clients[v].handle_mask_request(req, *inputs[v],
                                                  input_digest=SHARED_INPUT_DIGEST)
              for v, req in f.server.mask_requests().items()}
    if stage == "masked":
        forged(masked[owner])
    for v in range(n):
        deliver(masked[v], v)
    creq = f.server.consistency_request()
    sigs = {v: f.clients[v].handle_consistency_request(creq) for v in creq.alive}
    if stage == "signature":
        forged(sigs[owner])
    for v in creq.alive:
        deliver(sigs[v], v)
    ureq = f.server.unmask_request()
    replies = {v: f.clients[v].handle_unmask_request(ureq) for v in ureq.signers}
    if stage == "unmask":
        other = next(v for v in replies[owner].seed_owners if v != owner)
        forged(_tamper_share(replies[owner], owner=other))
        forged(replies[owner])
    for v in ureq.signers:
        deliver(replies[v], v)
    res = f.server.finish()
    assert res.excluded == ()
    assert res.alive == tuple(range(n))
    _exact(res, inputs)


def test_a_sum_whose_total_weight_is_zero_aborts_cleanly() -> None:
    """A malicious client that knows the others' weights offsets its own weight
    coordinate so that the unmasked total weight is 0 (its data is not covered by its
    signature): the sum has no average, and finish() aborts the round (RoundAborted)
    instead of returning a result whose mean() raises."""
    f, _, inputs = to_shared(4, D)
    total = sum(w for _, w in inputs.values())
    for v, req in f.server.mask_requests().items():
        msg = f.clients[v].handle_mask_request(req, *inputs[v], input_digest=SHARED_INPUT_DIGEST)
        if v == 0:
            y = np.frombuffer(msg.data, dtype=np.uint64).copy()
            y[-1:] -= np.uint64(total)  # ring arithmetic: the total weight becomes 0
            msg = replace(msg, data=y.tobytes())
        f.server.receive_masked_input(msg)
    with pytest.raises(RoundAborted, match="total weight is 0, not positive"):
        unmask_and_finish(f)
    assert f.server.stage is None
