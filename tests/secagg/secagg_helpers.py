"""Shared helpers for the secagg tests: build a federation, run stages by hand."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from bract.secagg.crypto import SigningKey
from bract.secagg.driver import SHARED_INPUT_DIGEST
from bract.secagg.encoding import EncodingConfig
from bract.secagg.messages import Message
from bract.secagg.protocol import ClientPolicy, ClientSession, ServerSession

_KEYS: dict[int, SigningKey] = {}


def signing_key(node: int) -> SigningKey:
    """Cached identity keys (key generation is the slow part of building rosters)."""
    if node not in _KEYS:
        _KEYS[node] = SigningKey.generate()
    return _KEYS[node]


@dataclass
class Federation:
    server: ServerSession
    clients: dict[int, ClientSession]
    roster: dict[int, bytes]
    fed: str
    keys: dict[int, SigningKey] = field(default_factory=dict)


def make_federation(
    n: int,
    fed: str = "fed-test",
    *,
    graph: str = "complete",
    degree: int | None = None,
    colluders: int | None = None,
    min_honest: int = 2,
    encoding: EncodingConfig | None = None,
    policy: ClientPolicy | None = None,
    dropouts: int | None = None,
) -> Federation:
    keys = {i: signing_key(i) for i in range(n)}
    roster = {i: k.public_bytes() for i, k in keys.items()}
    server = ServerSession(fed, roster, encoding=encoding, graph=graph, degree=degree,
                           colluders=colluders, min_honest=min_honest, dropouts=dropouts)
    clients = {i: ClientSession(i, fed, keys[i], roster, policy) for i in range(n)}
    return Federation(server, clients, roster, fed, keys)


def random_inputs(n: int, d: int, seed: int = 0, clip: float = 1.0,
                  max_weight: int = 100) -> dict[int, tuple[np.ndarray, int]]:
    # test data only (not secrets): a seeded numpy generator is fine here
    rng = np.random.default_rng(seed)
    return {i: (rng.uniform(-clip, clip, d).astype(np.float32), int(rng.integers(1, max_weight)))
            for i in range(n)}


def advertise_all(f: Federation) -> None:
    for v in f.server.needs_advertisement(f.clients):
        f.server.receive_advertisement(f.clients[v].advertise_keys(), origin=v)


@dataclass
class Staged:
    """Messages of a round run stage by stage (for attack tests)."""

    cfg: Message | None = None
    shares: dict[int, Message] = field(default_factory=dict)
    mask_requests: dict[int, Message] = field(default_factory=dict)
    masked: dict[int, Message] = field(default_factory=dict)
    creq: Message | None = None
    sigs: dict[int, Message] = field(default_factory=dict)
    ureq: Message | None = None


def run_to_masked(f: Federation, rnd: int, inputs, dim: int, drop_mask=()) -> Staged:
    """Run stages 1 and 2 honestly; return what was exchanged."""
    advertise_all(f)
    st = Staged()
    st.cfg = f.server.start_round(rnd, sorted(f.clients), dim)
    for v, c in f.clients.items():
        st.shares[v] = c.handle_round_config(st.cfg)
        f.server.receive_shares(st.shares[v])
    st.mask_requests = f.server.mask_requests()
    for v, req in st.mask_requests.items():
        if v in drop_mask:
            continue
        vec, w = inputs[v]
        st.masked[v] = f.clients[v].handle_mask_request(req, vec, w,
                                                        input_digest=SHARED_INPUT_DIGEST)
        f.server.receive_masked_input(st.masked[v])
    return st


def run_to_unmask_request(f: Federation, rnd: int, inputs, dim: int, drop_mask=()) -> Staged:
    st = run_to_masked(f, rnd, inputs, dim, drop_mask)
    st.creq = f.server.consistency_request()
    for v in st.creq.alive:
        st.sigs[v] = f.clients[v].handle_consistency_request(st.creq)
        f.server.receive_consistency_signature(st.sigs[v])
    st.ureq = f.server.unmask_request()
    return st


def unmask_and_finish(f: Federation):
    """Stages 3 and 4, every alive client honest and answering: the round's result."""
    creq = f.server.consistency_request()
    for v in creq.alive:
        f.server.receive_consistency_signature(f.clients[v].handle_consistency_request(creq))
    ureq = f.server.unmask_request()
    for v in ureq.signers:
        f.server.receive_unmask_reply(f.clients[v].handle_unmask_request(ureq))
    return f.server.finish()


def to_shared(n: int, dim: int, **kwargs):
    """A federation of ``n`` (``make_federation``'s keyword arguments) whose round 1 is
    past stage 1, every client having shared: ``(federation, config, inputs)``."""
    f = make_federation(n, **kwargs)
    advertise_all(f)
    inputs = random_inputs(n, dim)
    cfg = f.server.start_round(1, range(n), dim)
    for v in range(n):
        f.server.receive_shares(f.clients[v].handle_round_config(cfg))
    return f, cfg, inputs
