"""Bad input gets a clear error and leaves every session consistent."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from secagg_helpers import advertise_all, make_federation, random_inputs, run_to_masked

from bract.secagg.crypto import SigningKey
from bract.secagg.driver import SHARED_INPUT_DIGEST, run_round
from bract.secagg.encoding import EncodingConfig
from bract.secagg.errors import (
    ConfigurationError,
    EncodingError,
    MalformedMessage,
    ProtocolViolation,
    SecAggError,
)
from bract.secagg.protocol import ClientSession, ServerSession

D = 6
ENC = EncodingConfig(clip=1.0, frac_bits=16, max_weight=1000)


@pytest.mark.parametrize(
    "vector,weight,match",
    [
        (np.zeros(D + 1, np.float32), 1, "length 7"),
        (np.zeros(D, np.int32), 1, "dtype"),
        (np.array([0, 0, np.nan, 0, 0, 0], np.float32), 1, "NaN/Inf"),
        (np.array([0, 0, -np.inf, 0, 0, 0], np.float64), 1, "NaN/Inf"),
        (np.array([0, 0, 2.0, 0, 0, 0], np.float32), 1, "beyond the clipping range"),
        (np.zeros(D, np.float32), 1001, "weight 1001"),
    ],
)
def test_bad_vectors_refused_and_state_kept(vector, weight, match) -> None:
    n = 4
    f = make_federation(n, encoding=ENC)
    inputs = random_inputs(n, D, max_weight=1000)
    st = run_to_masked(f, 1, inputs, D, drop_mask={0})
    with pytest.raises(EncodingError, match=match):
        f.clients[0].handle_mask_request(st.mask_requests[0], vector, weight,
                                         input_digest=SHARED_INPUT_DIGEST)
    # the refused call left no partial state: the same request now works
    f.server.receive_masked_input(f.clients[0].handle_mask_request(st.mask_requests[0],
                                                                   *inputs[0],
                                                                   input_digest=SHARED_INPUT_DIGEST))
    creq = f.server.consistency_request()
    assert creq.alive == list(range(n))


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 10**6), st.integers(1, 5), st.floats(1.5, 1e6), st.booleans())
def test_an_encoding_refusal_sends_no_figure_of_the_private_input(
        weight, n_out, peak, by_weight) -> None:
    """What leaves a hospital when its input cannot be encoded (its public reason, the
    text bract's error replies carry) names the round's public bounds only: never the
    weight, how many values are out of range, or how large they are."""
    from bract.flower.client import failure_reason
    from bract.secagg.encoding import encode

    enc = EncodingConfig(clip=1.0, frac_bits=16, max_weight=1)
    x = np.zeros(D, np.float64)
    x[:n_out] = peak
    with pytest.raises(EncodingError) as refused:
        if by_weight:
            encode(np.zeros(D), weight, enc, 64)
        else:
            encode(x, 1, enc, 64)
    sent = failure_reason(refused.value)
    assert sent == refused.value.public_reason
    private = {str(weight)} if by_weight else {f"{n_out} value", f"{peak:.6g}"}
    assert not any(p in sent for p in private), sent
    assert any(p in str(refused.value) for p in private)  # the hospital's log has it


@pytest.mark.parametrize("digest", [b"", bytes(65), "sha256", None])
def test_an_input_without_a_digest_of_its_public_data_is_refused(digest) -> None:
    """The model binding (T37) cannot be switched off by leaving the digest out: every
    client must name the public data its input was computed from, and a refusal
    leaves the round as it was."""
    n = 4
    f = make_federation(n, encoding=ENC)
    inputs = random_inputs(n, D, max_weight=1000)
    st = run_to_masked(f, 1, inputs, D, drop_mask={0})
    req = st.mask_requests[0]
    with pytest.raises(EncodingError, match="input_digest must name the public data"):
        f.clients[0].handle_mask_request(req, *inputs[0], input_digest=digest)
    with pytest.raises(EncodingError, match="needs the input vector and its input_digest"):
        f.clients[0].handle(req, *inputs[0])
    masked = f.clients[0].handle(req, *inputs[0], input_digest=SHARED_INPUT_DIGEST)
    f.server.receive_masked_input(masked)
    assert f.server.consistency_request().alive == list(range(n))


def test_roster_problems() -> None:
    k = {i: SigningKey.generate() for i in range(3)}
    roster = {i: k[i].public_bytes() for i in range(3)}
    with pytest.raises(ConfigurationError, match="missing from its own roster"):
        ClientSession(7, "f", k[0], roster)
    with pytest.raises(ConfigurationError, match="not this client's key"):
        ClientSession(1, "f", k[0], roster)
    with pytest.raises(ConfigurationError, match="same public key for two nodes"):
        ClientSession(0, "f", k[0], {**roster, 5: roster[0]})
    with pytest.raises(ConfigurationError, match="32 raw bytes"):
        ServerSession("f", {0: b"short"})
    with pytest.raises(ConfigurationError, match="not an int"):
        ServerSession("f", {-1: roster[0]})
    with pytest.raises(ConfigurationError):
        ServerSession("f", {})


def test_participant_not_in_client_roster() -> None:
    f = make_federation(5)
    advertise_all(f)
    cfg = f.server.start_round(1, range(5), D)
    # client 0's operator does not list node 4
    short = {v: key for v, key in f.roster.items() if v != 4}
    c0 = ClientSession(0, f.fed, f.keys[0], short)
    c0._keys = f.clients[0]._keys  # same epoch keys as advertised
    with pytest.raises(ProtocolViolation, match="participant 4 is not in this client's roster"):
        c0.handle_round_config(cfg)


def test_duplicate_node_ids() -> None:
    f = make_federation(4)
    advertise_all(f)
    with pytest.raises(ConfigurationError, match="duplicate"):
        f.server.start_round(1, [0, 1, 1, 2], D)
    with pytest.raises(ConfigurationError, match="not in the roster"):
        f.server.start_round(1, [0, 1, 9], D)
    cfg = f.server.start_round(1, range(4), D)
    dup = replace(cfg, participants=[0, 1, 2, 2])
    with pytest.raises(ProtocolViolation, match="duplicate"):
        f.clients[0].handle_round_config(dup)


def test_server_refuses_bad_client_messages() -> None:
    n = 4
    f = make_federation(n, encoding=ENC)
    inputs = random_inputs(n, D, max_weight=1000)
    st = run_to_masked(f, 1, inputs, D, drop_mask={3})
    good = f.clients[3].handle_mask_request(st.mask_requests[3], *inputs[3],
                                            input_digest=SHARED_INPUT_DIGEST)
    with pytest.raises(MalformedMessage, match="bytes, expected"):
        f.server.receive_masked_input(replace(good, data=good.data[:-1]))
    with pytest.raises(ProtocolViolation, match="ring"):
        f.server.receive_masked_input(replace(good, ring_bits=96 - good.ring_bits))
    with pytest.raises(ProtocolViolation, match="already sent"):
        f.server.receive_masked_input(st.masked[0])
    with pytest.raises(ProtocolViolation, match="not a sharer"):
        f.server.receive_masked_input(replace(good, node_id=77))
    with pytest.raises(MalformedMessage, match="expected MaskedInput"):
        f.server.receive_masked_input(st.mask_requests[0])
    f.server.receive_masked_input(good)
    assert f.server.consistency_request().alive == list(range(n))


def test_all_errors_share_a_base() -> None:
    for cls in (ConfigurationError, EncodingError, MalformedMessage, ProtocolViolation):
        assert issubclass(cls, SecAggError)


def test_state_survives_export_between_every_stage() -> None:
    """A client rebuilt from ``export_state`` at every stage (as a Flower ClientApp process
    would be) finishes the round with the same result."""
    n = 5
    f = make_federation(n, encoding=ENC)
    inputs = random_inputs(n, D, max_weight=1000)

    def reload(v: int) -> None:
        f.clients[v] = ClientSession.from_state(f.clients[v].export_state(), f.keys[v], f.roster)

    for rnd in (1, 2):
        for v in range(n):
            reload(v)
        res = run_round(f.server, f.clients, inputs, rnd, dropouts={2: "mask"} if rnd == 1
                        else {})
        ref = sum(inputs[u][1] * inputs[u][0].astype(np.float64) for u in res.alive)
        assert np.all(np.abs(res.weighted_sum - ref) <= res.error_bound)
    advertise_all(f)
    cfg = f.server.start_round(3, range(n), D)
    replies = {}
    for v in range(n):
        replies[v] = f.clients[v].handle_round_config(cfg)
        reload(v)
        f.server.receive_shares(replies[v])
    for v, req in f.server.mask_requests().items():
        f.server.receive_masked_input(f.clients[v].handle_mask_request(req, *inputs[v],
                                                                       input_digest=SHARED_INPUT_DIGEST))
        reload(v)
    creq = f.server.consistency_request()
    for v in creq.alive:
        f.server.receive_consistency_signature(f.clients[v].handle_consistency_request(creq))
        reload(v)
    ureq = f.server.unmask_request()
    for v in ureq.signers:
        f.server.receive_unmask_reply(f.clients[v].handle_unmask_request(ureq))
    res = f.server.finish()
    ref = sum(inputs[u][1] * inputs[u][0].astype(np.float64) for u in res.alive)
    assert np.all(np.abs(res.weighted_sum - ref) <= res.error_bound)
    with pytest.raises(MalformedMessage, match="client state"):
        ClientSession.from_state(b"D\x00\x00\x00\x00", f.keys[0], f.roster)


def test_library_imports_neither_flwr_nor_torch() -> None:
    import subprocess
    import sys

    code = ("import sys, bract.secagg, bract.secagg.driver; "
            "print(any(m.split('.')[0] in ('flwr', 'torch') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
