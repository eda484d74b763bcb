"""In-memory driver: runs whole rounds between sessions, for tests and benchmarks.

It plays the network and an honest server loop. Every message crosses the
"wire" as canonical bytes by default (``to_bytes`` / ``message_from_bytes``),
so the serialisation is exercised on each run. ``dropouts`` models clients that
stop answering from a given stage on; ``tamper`` lets a test act as a malicious
server or network on server -> client messages.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from .errors import ConfigurationError
from .messages import Message, message_from_bytes
from .protocol import AggregateResult, ClientSession, ServerSession

__all__ = ["SHARED_INPUT_DIGEST", "STAGES", "Tamper", "run_round"]

#: Stages a client can drop out at (it answers none of this stage's or later messages).
STAGES = ("config", "mask", "consistency", "unmask")

#: ``tamper(stage, receiver, message) -> message``: rewrite a server -> client message.
Tamper = Callable[[str, int, Message], Message]

#: The input digest every driven client declares unless told otherwise: the driver
#: plays a federation whose inputs are all computed from the same public data.
SHARED_INPUT_DIGEST = hashlib.sha256(b"bract.secagg.driver: one public model").digest()


def _wire(msg: Message, enabled: bool, raw: bytes | None = None) -> Message:
    if not enabled:
        return msg
    return message_from_bytes(msg.to_bytes() if raw is None else raw)


def run_round(
    server: ServerSession,
    clients: Mapping[int, ClientSession],
    inputs: Mapping[int, tuple[np.ndarray, int]],
    round_number: int,
    *,
    participants: Sequence[int] | None = None,
    dropouts: Mapping[int, str] | None = None,
    tamper: Tamper | None = None,
    wire: bool = True,
    input_digest: bytes = SHARED_INPUT_DIGEST,
) -> AggregateResult:
    """Run one round (plus the key-advertisement setup stage where needed).

    Args:
        server: the server session.
        clients: node id -> client session.
        inputs: node id -> (float vector of length d, integer weight).
        round_number: strictly increasing per federation.
        participants: the round's clients (default: all of ``clients``).
        dropouts: node id -> stage name in :data:`STAGES` from which it is silent.
        tamper: hook to rewrite server -> client messages (attack simulations).
        wire: pass every message through its canonical byte form.
        input_digest: the digest of the public data every input was computed from;
            the server expects it and each client signs it with its masked input.

    Returns the :class:`AggregateResult`; raises :class:`RoundAborted` if too few
    clients remain, or whatever error a client or the server raised on a bad message.
    """
    parts = sorted(clients if participants is None else participants)
    drops = dict(dropouts or {})
    for node, stage in drops.items():
        if stage not in STAGES:
            raise ConfigurationError(f"unknown dropout stage {stage!r} for node {node}")
    missing = [v for v in parts if v not in clients or v not in inputs]
    if missing:
        raise ConfigurationError(f"no client session or input for nodes {missing}")
    dims = {np.shape(inputs[v][0])[0] if np.ndim(inputs[v][0]) else 0 for v in parts}
    dim = max(dims) if dims else 0

    def alive_at(node: int, stage: str) -> bool:
        return node not in drops or STAGES.index(stage) < STAGES.index(drops[node])

    def send(stage: str, node: int, msg: Message, raw: bytes | None = None) -> Message:
        msg = _wire(msg, wire, raw)
        if tamper is not None:
            msg = tamper(stage, node, msg)
        return msg

    # setup (only for clients without current keys): advertise
    for v in server.needs_advertisement(parts):
        server.receive_advertisement(_wire(clients[v].advertise_keys(), wire), origin=v)

    cfg = server.start_round(round_number, parts, dim)
    server.expect_input_digest(input_digest)
    raw = cfg.to_bytes()  # one broadcast: encoded once, parsed by each client
    for v in parts:
        if alive_at(v, "config"):
            reply = clients[v].handle_round_config(send("config", v, cfg, raw))
            server.receive_shares(_wire(reply, wire), sender=v)

    for v, req in server.mask_requests().items():
        if alive_at(v, "mask"):
            vec, w = inputs[v]
            reply = clients[v].handle_mask_request(send("mask", v, req), vec, w,
                                                   input_digest=input_digest)
            server.receive_masked_input(_wire(reply, wire), sender=v)

    creq = server.consistency_request()
    raw = creq.to_bytes()
    for v in creq.alive:
        if alive_at(v, "consistency"):
            reply = clients[v].handle_consistency_request(send("consistency", v, creq, raw))
            server.receive_consistency_signature(_wire(reply, wire), sender=v)

    ureq = server.unmask_request()
    raw = ureq.to_bytes()
    for v in ureq.signers:
        if alive_at(v, "unmask"):
            reply = clients[v].handle_unmask_request(send("unmask", v, ureq, raw))
            server.receive_unmask_reply(_wire(reply, wire), sender=v)
    return server.finish()
