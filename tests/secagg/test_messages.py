"""Wire format: plain-typed dicts, canonical bytes, strict decoding of bad input."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from secagg_helpers import make_federation, random_inputs, run_to_unmask_request

from bract.secagg.errors import MalformedMessage
from bract.secagg.messages import (
    KeyAdvertisement,
    MaskedInput,
    canonical_decode,
    canonical_encode,
    message_from_bytes,
    message_from_dict,
)

PLAIN = (int, str, bytes, float)


def _all_messages():
    f = make_federation(4)
    inputs = random_inputs(4, 3)
    st_ = run_to_unmask_request(f, 1, inputs, 3)
    reply = f.clients[0].handle_unmask_request(st_.ureq)
    adv = f.clients[0].advertise_keys()
    return [adv, st_.cfg, st_.mask_requests[0], st_.masked[0], st_.creq, st_.sigs[0], st_.ureq,
            reply, st_.shares[1]]


MESSAGES = _all_messages()


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_roundtrip_and_plain_types(msg) -> None:
    d = msg.to_dict()
    for k, v in d.items():
        assert isinstance(k, str)
        if isinstance(v, list):
            assert all(isinstance(x, PLAIN) for x in v)
            assert len({type(x) for x in v}) <= 1
        else:
            assert isinstance(v, PLAIN)
    assert message_from_dict(d) == msg
    raw = msg.to_bytes()
    assert message_from_bytes(raw) == msg
    assert message_from_bytes(raw).to_bytes() == raw  # canonical


@pytest.mark.parametrize("msg", MESSAGES[:6], ids=lambda m: type(m).__name__)
def test_every_truncation_is_refused(msg) -> None:
    raw = msg.to_bytes()
    step = max(1, len(raw) // 300)
    for cut in range(0, len(raw), step):
        with pytest.raises(MalformedMessage):
            message_from_bytes(raw[:cut])
    with pytest.raises(MalformedMessage, match="trailing"):
        message_from_bytes(raw + b"\x00")


def test_malformed_dicts_are_refused() -> None:
    adv = MESSAGES[0]
    d = adv.to_dict()
    with pytest.raises(MalformedMessage, match="missing"):
        message_from_dict({k: v for k, v in d.items() if k != "epoch"})
    with pytest.raises(MalformedMessage, match="unknown field"):
        message_from_dict({**d, "extra": 1})
    with pytest.raises(MalformedMessage, match="unknown message kind"):
        message_from_dict({**d, "kind": "secagg.nope"})
    with pytest.raises(MalformedMessage, match="must be int"):
        message_from_dict({**d, "epoch": "1"})
    with pytest.raises(MalformedMessage, match=">= 0"):
        message_from_dict({**d, "node_id": -1})
    with pytest.raises(MalformedMessage, match="must be int"):
        message_from_dict({**d, "epoch": True})
    with pytest.raises(MalformedMessage, match="differ in length"):
        replace(MESSAGES[1], key_epochs=[0])
    with pytest.raises(MalformedMessage, match="list of bytes"):
        replace(MESSAGES[2], ciphertexts=["x"] * len(MESSAGES[2].ciphertexts))
    with pytest.raises(MalformedMessage, match="expected"):
        MaskedInput.from_dict(d)


def test_non_canonical_bytes_are_refused() -> None:
    with pytest.raises(MalformedMessage, match="non-canonical integer"):
        canonical_decode(b"I\x00\x00\x00\x02\x00\x01")
    unsorted = b"D\x00\x00\x00\x02" + canonical_encode("b") + canonical_encode(1) + \
        canonical_encode("a") + canonical_encode(2)
    with pytest.raises(MalformedMessage, match="not sorted"):
        canonical_decode(unsorted)
    with pytest.raises(MalformedMessage, match="unknown type tag"):
        canonical_decode(b"Z\x00\x00\x00\x00")
    with pytest.raises(MalformedMessage, match="UTF-8"):
        canonical_decode(b"S\x00\x00\x00\x01\xff")
    with pytest.raises(MalformedMessage, match="truncated"):
        canonical_decode(b"L\xff\xff\xff\xff")
    with pytest.raises(MalformedMessage):
        canonical_encode({"a": np.float32(1)})
    with pytest.raises(MalformedMessage):
        canonical_encode([True])


@settings(max_examples=200, deadline=None)
@given(st.recursive(
    st.one_of(st.integers(), st.text(), st.binary(), st.floats(allow_nan=False)),
    lambda kids: st.one_of(st.lists(kids, max_size=4),
                           st.dictionaries(st.text(max_size=5), kids, max_size=4)),
    max_leaves=12))
def test_canonical_roundtrip(obj) -> None:
    assert canonical_decode(canonical_encode(obj)) == obj


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_never_crash_the_decoder(raw: bytes) -> None:
    try:
        message_from_bytes(raw)
    except MalformedMessage:
        pass


def test_key_advertisement_fields() -> None:
    adv = KeyAdvertisement("f", 1, 7, 0, b"a" * 32, b"s" * 64)
    assert adv.to_dict()["kind"] == "secagg.v2.advertise"
    assert adv.origin == 7


def test_share_header_round_trips_and_refuses_bad_shapes() -> None:
    from bract.secagg.merkle import merkle_verify
    from bract.secagg.messages import ShareHeader

    shares = MESSAGES[-1]
    headers = shares.holder_headers()
    assert sorted(headers) == list(shares.holders)
    h = ShareHeader.from_bytes(headers[shares.holders[1]])
    assert (h.mask_public, h.signature) == (shares.mask_public, shares.signature)
    assert (h.seed_share_commitment, h.key_share_commitment) == shares.commitments(1)
    assert h.commitment_root == shares.commitment_root()
    assert merkle_verify(h.leaf(), 1, len(shares.holders), h.path, h.commitment_root)
    for bad in (canonical_encode([b"x"] * 7), canonical_encode([b"", b"", b"", b"", b"", b"",
                                                                [b"short"]]),
                canonical_encode([b"", b"", b"", b"", b"", "s", []]), b"junk"):
        with pytest.raises(MalformedMessage):
            ShareHeader.from_bytes(bad)
    with pytest.raises(MalformedMessage, match="32 bytes per holder"):
        replace(shares, seed_share_commitments=shares.seed_share_commitments[:-1])


@settings(max_examples=200, deadline=None)
@given(st.text(min_size=1, max_size=40), st.integers(0, 2**62), st.integers(0, 2**64 - 1),
       st.integers(0, 2**64 - 1))
def test_share_ciphertext_size_is_the_encrypted_plaintext_size(fed, rnd, sender, receiver) -> None:
    """The server's exact-size check of share ciphertexts computes the size the client's
    encryption of the canonical plaintext really has."""
    import os

    from bract.secagg.crypto import aead_encrypt
    from bract.secagg.protocol import _share_plaintext, share_ciphertext_bytes

    pt = _share_plaintext(fed, rnd, sender, receiver, os.urandom(66), os.urandom(32),
                          os.urandom(66), os.urandom(32))
    assert len(aead_encrypt(os.urandom(32), pt, b"ad")) == share_ciphertext_bytes(
        fed, rnd, sender, receiver)
