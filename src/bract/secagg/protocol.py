"""Client and server state machines of bract's hardened secure aggregation (protocol v3).

Protocol: Bonawitz et al. 2017 double masking (active-security variant, with the
consistency check), on a complete graph or the SecAgg+ sparse graph of Bell et
al. 2020, with every maskable secret fresh for each round. docs/secagg.md argues
each property; this docstring lists every message and check, in order.

Threat model: an actively malicious server (it may reorder, drop, forge, replay
and tamper with any message it relays, and choose who is "alive") colluding with
at most ``c`` clients, where ``c`` is the collusion bound each client declares
in its :class:`ClientPolicy` (by default a third of its roster, whatever the
round's size). Clients' roster keys reach them from their operator.

Guarantee, over everything the server and the colluders accumulate across all
rounds: for each round, the server learns sums of the honest clients' encoded
inputs (and weights) over groups of at least ``h`` honest clients (``h`` =
``min_honest``), and nothing about any smaller group; it learns nothing of a round
it aborts beyond what the masked vectors and encrypted shares hide. Each honest
client enforces this itself: ``t > (|N[v]| + c) / 2`` for every neighbourhood it
shares with (so two disjoint quorums of signers cannot both exist, Bonawitz 2017
for an active server), and, before it signs or reveals anything, every alive
client has at least ``c + h - 1`` alive neighbours (on the complete graph:
``|alive| >= c + h``), so that removing any ``c`` colluders leaves every honest
alive client masked together with at least ``h - 1`` honest others. Each honest
client signs only an alive set whose members in its neighbourhood all signed the
input digest it signed (the global model its input was computed from): on the
complete graph no unmaskable sum mixes inputs of different models, and on a sparse
graph a sum holding a client's input holds at least ``t - c - 1`` other honest
inputs of its model (the signers that revealed its seed), so a server that sends
some clients another model (to zero their contributions on chosen coordinates)
cannot read one client's input from a sum of the others'.

Setup, once per share-channel key epoch (first round, or when an operator rotates)::

    advertise   client -> server  KeyAdvertisement: X25519 key c_pk (share
                                  encryption only), Ed25519-signed over
                                  (federation, node, origin, epoch, c_pk)

Per round, four message stages (three with share-stage pipelining)::

    1 config    server -> all     RoundConfig (participants U0, graph, threshold t,
                                  c, h, encoding, everyone's signed advertisement)
                client checks     federation, fresh round, roster membership, no
                                  duplicates, n >= its minimum, graph degree, t and
                                  the collusion bound against its own policy, ring
                                  headroom, every neighbour's advertisement against
                                  the roster (never cached by signature bytes alone)
                client -> server  ShareKeys: a fresh X25519 round mask key s_pk,
                                  a commitment to a fresh seed b, salted commitments
                                  to every holder's Shamir shares of b and s_sk, the
                                  shares AES-GCM-encrypted to each neighbour; signed
                                  over (config digest, s_pk, seed commitment, Merkle
                                  root of the share commitments)
                server checks     signature, a valid (not low-order) s_pk, exact sizes
    2 mask      server -> each    MaskRequest (sharers U1; each sharing neighbour's
                                  signed header with this client's commitments and
                                  their Merkle path, and its ciphertext)
                client checks     U1 consistent with the graph, |U1 & N[u]| >= t,
                                  each header's signature, key and path, each ciphertext
                                  (AD binds federation, round, config, sender,
                                  receiver), each share against its commitment
                client -> server  MaskedInput y_u = enc(x_u, w_u) + PRG(b_u)
                                  + sum_{v in U1&N(u)} +-PRG(KDF(X25519(s_u, s_v))),
                                  the digest D_u of the public data x_u was computed
                                  from (the global model) and an Ed25519 signature
                                  over (config digest, u, D_u)
                server checks     size, ring, the signature (and D_u against the model
                                  it sent, when it says which)
    3 check     server -> U2      ConsistencyRequest (U1, alive set U2, each alive
                                  client's D_v and its signature)
                client checks     U1 is its own, U2 within U1, |U2| >= t, every alive
                                  client keeps c + h - 1 alive neighbours, every
                                  alive neighbour signed D_v = its own D_u
                client -> server  Ed25519 signature over (federation, round, config
                                  digest, U1, U2, D_u); a client signs one view per
                                  round
    4 unmask    server -> U3      UnmaskRequest (alive U2, dropped U1 - U2, signatures)
                client checks     U2 is the set it signed, dropped is exactly U1 - U2,
                                  for every peer v it answers for: >= t valid
                                  signatures from N[v] over the same (U1, U2, D_u)
                client -> server  shares (with salts) of b_v for alive v, of s_v for
                                  dropped v, never both for one peer
                server checks     every share against its dealer's signed commitment:
                                  a wrong one excludes and names its sender; b_v
                                  against v's seed commitment, s_v against its s_pk

Why the secrets are per round: the server may reconstruct a dropped client's
mask key s_v. With a mask key that outlived the round, that key together with
the client's self-mask seed from an earlier round (when it was alive) unmasked
the earlier round exactly. Here s_v serves one round: its reconstruction unmasks
nothing else, in the past or the future. The long-lived keys (Ed25519 identity,
X25519 share channel) only sign and encrypt; no share of them ever exists.

Why four stages and not fewer: stage 1 must finish before masking (a client may
only mask with peers whose secrets are already shared), the alive set exists only
after stage 2, and nobody may reveal a share before a quorum has committed to it
(stage 3). Stage 1 carries no model data, so a deployment sends it with the
training instruction; with share-stage pipelining (:meth:`ServerSession.
start_next_round`) round r + 1's config travels with round r's unmask request,
each client answers round r's request first (wiping round r's secrets) and then
round r + 1's config in the same reply, and round r + 1's mask request travels
with the training instruction: three message stages per round.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import shamir
from .crypto import (
    GCM_TAG_BYTES,
    KEY_BYTES,
    NONCE_BYTES,
    SIGNATURE_BYTES,
    KeystreamAccumulator,
    SigningKey,
    aead_decrypt,
    aead_encrypt,
    check_x25519_public,
    hkdf,
    random_bytes,
    sha256,
    verify_signature,
    x25519_generate,
    x25519_private,
    x25519_public,
    x25519_shared,
)
from .encoding import RING_DTYPES, EncodingConfig, decode_sum, encode
from .errors import (
    AuthenticationError,
    ConfigurationError,
    ConsistencyError,
    EncodingError,
    KeyRotationRequired,
    MalformedMessage,
    ProtocolViolation,
    ReplayError,
    RoundAborted,
    ThresholdPolicyError,
)
from .graph import GRAPH_CHOICES, GRAPH_KINDS, closed_neighbourhoods, default_degree
from .merkle import merkle_root, merkle_verify
from .messages import (
    COMMITMENT_BYTES,
    ConsistencyRequest,
    ConsistencySignature,
    KeyAdvertisement,
    MaskedInput,
    MaskRequest,
    Message,
    RoundConfig,
    ShareHeader,
    ShareKeys,
    UnmaskReply,
    UnmaskRequest,
    canonical_decode,
    canonical_encode,
)

__all__ = [
    "PROTOCOL",
    "AggregateResult",
    "ClientPolicy",
    "ClientSession",
    "RoundShape",
    "ServerSession",
    "alive_shortfall",
    "check_dropouts",
    "default_colluders",
    "dropout_tolerance",
    "required_threshold",
    "round_parameters",
    "validate_roster",
]

PROTOCOL = "bract/secagg/v3"
_MAX_NODE_ID = 2**64 - 1
SALT_BYTES = 32


# --------------------------------------------------------------------------- policy math


def default_colluders(n: int) -> int:
    """The default collusion bound for a federation of ``n`` clients (its roster):
    ``floor((n - 1) / 3)``. Every round of the federation is held to it, however few
    clients the round has."""
    return max(0, (n - 1) // 3)


def required_threshold(size: int, colluders: int) -> int:
    """Smallest Shamir threshold a client accepts for a closed neighbourhood of ``size``
    when it tolerates ``colluders`` colluding clients: ``t > (size + c') / 2`` with
    ``c' = min(c, size - 1)``, and ``t >= 2``.

    Guarantee: with at most ``c`` colluders, two groups of honest signers that
    each reach ``t`` together with the colluders cannot be disjoint, so a server
    cannot collect a seed share quorum and a key share quorum of one client.
    """
    c = min(max(0, colluders), max(0, size - 1))
    return max(2, (size + c) // 2 + 1)


def alive_shortfall(
    nbhd: Mapping[int, Sequence[int]], alive: Iterable[int], colluders: int, min_honest: int
) -> str | None:
    """Why ``alive`` cannot be unmasked under the collusion bound, or ``None`` if it can.

    Every alive client must have at least ``colluders + min_honest - 1`` alive
    neighbours (on the complete graph: ``|alive| >= c + h``). Then, after removing
    any ``c`` colluders, every honest alive client is joined by pair masks that
    nobody but honest clients can remove to at least ``h - 1`` honest alive
    clients, so the smallest sum the server can isolate holds ``h`` honest updates.
    """
    alive_set = set(alive)
    need = colluders + min_honest - 1
    for u in sorted(alive_set):
        have = len(alive_set.intersection(nbhd[u])) - 1
        if have < need:
            return (f"alive client {u} has {have} alive neighbour(s); the collusion bound "
                    f"(c = {colluders} colluders, h = {min_honest} honest per sum) needs {need}")
    return None


# --------------------------------------------------------------------------- helpers


def validate_roster(roster: Mapping[int, bytes]) -> dict[int, bytes]:
    """Check a roster (node id -> 32-byte Ed25519 public key) and return a copy.

    Raises :class:`ConfigurationError` for non-integer or out-of-range ids, keys of
    the wrong size, or one key listed for two nodes (a duplicated identity).
    """
    if not isinstance(roster, Mapping) or not roster:
        raise ConfigurationError("roster must be a non-empty mapping node id -> public key")
    out: dict[int, bytes] = {}
    for node, key in roster.items():
        if isinstance(node, bool) or not isinstance(node, int) or not 0 <= node <= _MAX_NODE_ID:
            raise ConfigurationError(f"roster node id {node!r} is not an int in [0, 2^64)")
        if not isinstance(key, bytes) or len(key) != KEY_BYTES:
            raise ConfigurationError(f"roster key of node {node} must be 32 raw bytes")
        out[node] = key
    if len(set(out.values())) != len(out):
        raise ConfigurationError("roster lists the same public key for two nodes")
    return out


def _info(*parts: Any) -> bytes:
    return canonical_encode([PROTOCOL, *parts])


def advertisement_statement(fed: str, node: int, origin: int, epoch: int,
                            c_pk: bytes) -> bytes:
    """Bytes signed by a key advertisement."""
    return _info("advertise", fed, node, origin, epoch, c_pk)


def share_statement(fed: str, rnd: int, digest: bytes, node: int, holders: Sequence[int],
                    mask_public: bytes, seed_commit: bytes, commitment_root: bytes) -> bytes:
    """Bytes signed by a client's shares of a round: its round mask key, its seed
    commitment and the Merkle root over every holder's share commitments."""
    return _info("shares", fed, rnd, digest, node, mask_public, seed_commit, list(holders),
                 commitment_root)


def consistency_statement(fed: str, rnd: int, digest: bytes, sharers: Iterable[int],
                          alive: Iterable[int], input_digest: bytes) -> bytes:
    """Bytes signed in the consistency check: the config digest, the sharers, the alive
    set and the digest of the public data the signer's input was computed from."""
    return _info("consistency", fed, rnd, digest, sorted(sharers), sorted(alive),
                 input_digest)


def input_statement(fed: str, rnd: int, digest: bytes, node: int, input_digest: bytes) -> bytes:
    """Bytes a client signs with its masked input: the digest of the public data (the
    global model) its input was computed from."""
    return _info("input", fed, rnd, digest, node, input_digest)


#: The most bytes an input digest may have (a SHA-256 or SHA-512 digest); a client's
#: own digest has at least one byte.
MAX_INPUT_DIGEST_BYTES = 64


def share_commitment(fed: str, rnd: int, dealer: int, holder: int, kind: str, share: bytes,
                     salt: bytes) -> bytes:
    """Salted SHA-256 commitment to one Shamir share (``kind`` is ``"seed"`` or ``"key"``)."""
    return sha256(_info("share-commitment", fed, rnd, dealer, holder, kind, share, salt))


def seed_commitment(fed: str, rnd: int, node: int, seed: bytes) -> bytes:
    """SHA-256 commitment to a 256-bit self-mask seed."""
    return sha256(_info("seed-commitment", fed, rnd, node, seed))


def _share_ad(fed: str, rnd: int, digest: bytes, sender: int, receiver: int) -> bytes:
    return _info("share-ciphertext", fed, rnd, digest, sender, receiver)


def _share_plaintext(fed: str, rnd: int, sender: int, receiver: int, seed_share: bytes,
                     seed_salt: bytes, key_share: bytes, key_salt: bytes) -> bytes:
    return canonical_encode([fed, rnd, sender, receiver, seed_share, seed_salt, key_share,
                             key_salt])


def share_ciphertext_bytes(fed: str, rnd: int, sender: int, receiver: int) -> int:
    """The exact length of a share ciphertext from ``sender`` to ``receiver``: the
    canonical encoding of :func:`_share_plaintext` (list header; the federation string;
    three ints; two 66-byte shares and two 32-byte salts) plus the GCM nonce and tag."""

    def field(n: int) -> int:  # one canonical element: tag, 4-byte length, payload
        return 5 + n

    def integer(v: int) -> int:
        return field((v.bit_length() + 8) // 8)

    pt = (5 + field(len(fed.encode("utf-8"))) + integer(rnd) + integer(sender)
          + integer(receiver) + 2 * field(shamir.SHARE_BYTES) + 2 * field(SALT_BYTES))
    return NONCE_BYTES + pt + GCM_TAG_BYTES


def _self_mask_key(seed: bytes, fed: str, rnd: int, node: int) -> bytes:
    return hkdf(seed, _info("self-mask", fed, rnd, node))


def pair_mask_key(shared: bytes, fed: str, rnd: int, a: tuple[int, bytes],
                  b: tuple[int, bytes]) -> bytes:
    """Key of the pair mask of ``a = (node, round mask public key)`` and ``b`` in round ``rnd``."""
    lo, hi = sorted([a, b])
    return hkdf(shared, _info("pair-mask", fed, rnd, lo[0], lo[1], hi[0], hi[1]))


def _share_key(shared: bytes, fed: str, a: tuple[int, int], b: tuple[int, int]) -> bytes:
    lo, hi = sorted([a, b])
    return hkdf(shared, _info("share-key", fed, lo[0], lo[1], hi[0], hi[1]))


def _distinct(nodes: Sequence[int], what: str) -> set[int]:
    s = set(nodes)
    if len(s) != len(nodes):
        raise ProtocolViolation(f"{what} contains duplicate node ids")
    return s


def _advert_key(adv: KeyAdvertisement) -> tuple[Any, ...]:
    """Everything an advertisement's signature covers, plus the signature itself."""
    return (adv.federation_id, adv.node_id, adv.origin, adv.epoch, adv.cipher_public,
            adv.signature)


def _verify_advertisement(adv: KeyAdvertisement, roster: Mapping[int, bytes]) -> None:
    if adv.node_id not in roster:
        raise ProtocolViolation(f"node {adv.node_id} is not in the roster")
    what = f"key advertisement of node {adv.node_id} (epoch {adv.epoch})"
    check_x25519_public(adv.cipher_public, what)
    verify_signature(
        roster[adv.node_id], adv.signature,
        advertisement_statement(adv.federation_id, adv.node_id, adv.origin, adv.epoch,
                                adv.cipher_public),
        what,
    )


def _verify_shares_signature(fed: str, rnd: int, digest: bytes, node: int,
                             holders: Sequence[int], mask_public: bytes, seed_commit: bytes,
                             root: bytes, signature: bytes, roster: Mapping[int, bytes],
                             check_point: bool = True) -> None:
    """Check a sender's signed share statement: sizes, round mask key and signature.

    ``check_point=False`` leaves the low-order check of the round mask key to the
    caller's own X25519 exchange with it (which refuses such points)."""
    what = f"shares of node {node} in round {rnd}"
    if (len(seed_commit) != COMMITMENT_BYTES or len(root) != COMMITMENT_BYTES
            or len(signature) != SIGNATURE_BYTES):
        raise MalformedMessage(f"{what}: commitments and root must be 32 bytes, the "
                               "signature 64")
    if check_point:
        check_x25519_public(mask_public, f"{what}: round mask key")
    verify_signature(roster[node], signature,
                     share_statement(fed, rnd, digest, node, holders, mask_public, seed_commit,
                                     root), what)


def _expect(msg: object, cls: type[Message]) -> None:
    if not isinstance(msg, cls):
        raise MalformedMessage(f"expected {cls.__name__}, got {type(msg).__name__}")


def _config_digest(cfg: RoundConfig) -> bytes:
    return sha256(cfg.to_bytes())


def _check_collusion_bound(nbhd: Mapping[int, Sequence[int]], among: Iterable[int],
                           threshold: int, colluders: int, min_honest: int) -> None:
    """Refuse a round whose threshold or graph cannot honour (c, h) for ``among``."""
    for v in among:
        size = len(nbhd[v])
        need = required_threshold(size, colluders)
        if not need <= threshold <= size:
            raise ThresholdPolicyError(
                f"threshold {threshold} refused: with up to {colluders} colluders a "
                f"neighbourhood of {size} needs {need} <= t <= {size}"
            )
        if size - 1 < colluders + min_honest - 1:
            raise ThresholdPolicyError(
                f"node {v} has {size - 1} neighbours; keeping {min_honest} honest updates in "
                f"every sum with {colluders} colluders needs {colluders + min_honest - 1}"
            )


def dropout_tolerance(size: int, colluders: int, min_honest: int) -> int:
    """How many of a round's participants may drop out, in any stages and wherever an
    adversary places them, while every closed neighbourhood of ``size`` can still
    finish under the collusion bound ``(c, h)``: ``size - max(t, c + h)`` with ``t`` the
    :func:`required_threshold`.

    Guarantee (with a server that follows the protocol): if at most this many drop
    in all, every alive client keeps ``c + h - 1`` alive neighbours and every
    neighbourhood keeps ``t`` holders who answer, so the round completes; one more,
    all inside one alive client's neighbourhood and before they send their masked
    inputs, aborts it. Negative: no
    round with neighbourhoods of ``size`` can honour the bound at all.
    """
    return size - max(required_threshold(size, colluders), colluders + min_honest)


@dataclass(frozen=True)
class RoundShape:
    """The graph and thresholds a round is set up with.

    kind: the graph on the wire (``complete`` or ``harary``); degree: each client's
    number of neighbours; threshold: the Shamir threshold ``t``; colluders: ``c``;
    tolerated: the dropouts the round survives wherever they fall
    (:func:`dropout_tolerance` of the smallest neighbourhood).
    """

    kind: str
    degree: int
    threshold: int
    colluders: int
    tolerated: int


def round_parameters(n: int, graph: str, degree: int | None, colluders: int | None,
                     min_honest: int, dropouts: int | None = None) -> RoundShape:
    """The graph, threshold and collusion bound ``c`` of a round of ``n`` clients
    (``colluders`` None: :func:`default_colluders`). :class:`ConfigurationError` names
    why no such round can honour the bound (e.g. a Harary graph too thin for ``c``).

    ``graph="auto"`` picks the cheapest graph that keeps every declared guarantee:
    the Harary graph of the smallest even degree ``k`` (at least ``degree``, and at
    least the SecAgg+ default that clients accept by default) whose neighbourhoods
    honour ``(c, h)`` and survive ``dropouts`` dropouts, and the complete graph when
    no ``k < n - 1`` does. With ``dropouts`` None, auto keeps the complete graph's own
    tolerance, so it is the complete graph: a sparse graph is chosen only when the
    operator has said how many dropouts a round must survive. The collusion bound
    is a promise and is never relaxed; the dropout tolerance is availability: a round
    too small to survive ``dropouts`` on any graph (hospitals left the federation)
    runs on the complete graph, and its ``tolerated`` says what it survives.
    :func:`check_dropouts` refuses a declaration that the full roster cannot meet.
    """
    if graph not in GRAPH_CHOICES:
        raise ConfigurationError(f"graph must be one of {GRAPH_CHOICES}, got {graph!r}")
    if dropouts is not None and (isinstance(dropouts, bool) or not isinstance(dropouts, int)
                                 or dropouts < 0):
        raise ConfigurationError(f"dropouts must be None or an int >= 0, got {dropouts!r}")
    c = default_colluders(n) if colluders is None else colluders
    kind = graph
    k = default_degree(n) if degree is None else degree
    if graph == "auto":
        kind, k = "complete", n - 1
        if dropouts is not None:
            low = max(2, default_degree(n), 0 if degree is None else degree)
            low += low % 2
            for cand in range(low, n - 1, 2):
                if cand >= c + min_honest - 1 and \
                        dropout_tolerance(cand + 1, c, min_honest) >= dropouts:
                    kind, k = "harary", cand
                    break
    if kind == "complete":
        k = n - 1
    size = n if k >= n - 1 else k + 1
    t = required_threshold(size, c)
    if size - 1 < c + min_honest - 1:
        raise ConfigurationError(
            f"a {kind} graph over {n} participants cannot honour the collusion bound: each "
            f"client has {size - 1} neighbours, and keeping {min_honest} honest updates in "
            f"every sum with {c} colluders needs {c + min_honest - 1}; declare fewer "
            "colluders or use a denser graph"
        )
    return RoundShape(kind, k, t, c, dropout_tolerance(size, c, min_honest))


def check_dropouts(n: int, graph: str, degree: int | None, colluders: int | None,
                   min_honest: int, dropouts: int | None) -> RoundShape:
    """The shape of a round of all ``n`` hospitals, or :class:`ConfigurationError` when
    it cannot honour the collusion bound or survive the ``dropouts`` declared (for
    settings, checked once against the whole roster)."""
    shape = round_parameters(n, graph, degree, colluders, min_honest, dropouts)
    if dropouts is not None and shape.tolerated < dropouts:
        raise ConfigurationError(
            f"a {shape.kind} graph over {n} participants survives at most "
            f"{max(0, shape.tolerated)} dropouts with {shape.colluders} colluders and "
            f"{min_honest} honest updates per sum, fewer than the {dropouts} declared; "
            "declare fewer dropouts or colluders, or a denser graph"
        )
    return shape


@dataclass(frozen=True)
class ClientPolicy:
    """What a client insists on, whatever the server says.

    colluders: the number of colluding clients ``c`` (together with the server) the
        client tolerates; ``None`` means ``floor((R - 1) / 3)`` of the ``R`` clients
        in its roster. The bound is the federation's, never a round's: colluding
        clients stay in the federation whatever participant list the server writes,
        so a smaller round gets no smaller bound (it is refused when it cannot
        honour this one).
    min_honest: ``h``, the fewest honest updates in any sum the client helps to
        unmask (>= 2: no single update).
    min_participants: smallest round the client takes part in (>= 3).
    min_degree: minimum neighbours on a sparse graph (``None``: the SecAgg+
        default ``2 ceil(log2 n)``, capped at ``n - 1``).
    clip_out_of_range: clip values beyond ``[-clip, clip]`` instead of refusing.
    """

    colluders: int | None = None
    min_honest: int = 2
    min_participants: int = 3
    min_degree: int | None = None
    clip_out_of_range: bool = False

    def __post_init__(self) -> None:
        if self.colluders is not None and (isinstance(self.colluders, bool)
                                           or not isinstance(self.colluders, int)
                                           or self.colluders < 0):
            raise ConfigurationError("colluders must be None or an int >= 0")
        if isinstance(self.min_honest, bool) or not isinstance(self.min_honest, int) \
                or self.min_honest < 2:
            raise ConfigurationError("min_honest must be an int >= 2 (no single update)")
        if isinstance(self.min_participants, bool) or not isinstance(self.min_participants, int) \
                or self.min_participants < 3:
            raise ConfigurationError("min_participants must be an int >= 3")
        if self.min_degree is not None and (isinstance(self.min_degree, bool)
                                            or not isinstance(self.min_degree, int)
                                            or self.min_degree < 1):
            raise ConfigurationError("min_degree must be None or an int >= 1")

    def colluders_for(self, roster_size: int) -> int:
        """The collusion bound ``c`` this policy applies to every round of a federation
        whose roster lists ``roster_size`` clients."""
        return default_colluders(roster_size) if self.colluders is None else self.colluders


@dataclass
class _ChannelKeys:
    epoch: int
    origin: int
    cipher_private: bytes
    cipher_public: bytes
    signature: bytes


@dataclass
class _ClientRound:
    config: RoundConfig
    digest: bytes
    nbhd: dict[int, tuple[int, ...]]
    adverts: dict[int, KeyAdvertisement]
    seed: bytes
    mask_private: bytes
    mask_public: bytes
    own_shares: tuple[bytes, bytes, bytes, bytes]  # seed share, salt, key share, salt
    colluders: int
    min_honest: int
    stage: str = "shared"
    sharers: tuple[int, ...] = ()
    # peer -> (seed share, seed salt, key share, key salt), all raw bytes
    received: dict[int, tuple[bytes, bytes, bytes, bytes]] = field(default_factory=dict)
    signed_alive: tuple[int, ...] = ()
    input_digest: bytes = b""


# --------------------------------------------------------------------------- client


class ClientSession:
    """One client's side of the protocol for a whole federation (all rounds).

    Holds the long-term Ed25519 identity, the share-channel X25519 key and at most
    one round in progress; each round's mask key and seed are made for that round
    and wiped when it ends. Every ``handle_*`` method validates the whole message
    before changing any state, so a refused message leaves the session as it was.

    Args:
        node_id: this client's id (an int in [0, 2^64)).
        federation_id: the federation this session belongs to.
        signing_key: the client's long-term Ed25519 key.
        roster: node id -> Ed25519 public key, from the operator (never the server).
        policy: the client's own minimums (collusion bound, honest updates per sum).
    """

    def __init__(
        self,
        node_id: int,
        federation_id: str,
        signing_key: SigningKey,
        roster: Mapping[int, bytes],
        policy: ClientPolicy | None = None,
    ) -> None:
        self.roster = validate_roster(roster)
        if node_id not in self.roster:
            raise ConfigurationError(f"node {node_id} is missing from its own roster")
        if self.roster[node_id] != signing_key.public_bytes():
            raise ConfigurationError(f"roster key of node {node_id} is not this client's key")
        if not isinstance(federation_id, str) or not federation_id:
            raise ConfigurationError("federation_id must be a non-empty string")
        self.node_id = node_id
        self.federation_id = federation_id
        self.policy = policy or ClientPolicy()
        self._signing_key = signing_key
        self._keys: _ChannelKeys | None = None
        self._last_round = -1
        self._known_epoch: dict[int, int] = {}
        self._round: _ClientRound | None = None
        self._verified: set[tuple[Any, ...]] = set()  # full advertisement contents verified
        self._channel: dict[tuple[int, int, bytes, int], bytes] = {}  # share-channel keys

    # ---- setup

    @property
    def rotation_required(self) -> bool:
        """True until the client has a share-channel key to advertise."""
        return self._keys is None

    def max_weight_for(self, msg: RoundConfig | MaskRequest) -> int | None:
        """The largest weight the round of ``msg`` encodes: the config's own, or for a
        mask request that of the round this client shared for (``None`` if it holds no
        such round). A caller checks its weight against it *before* it trains, so that
        no privacy budget is spent on an update the round could not carry."""
        if isinstance(msg, RoundConfig):
            return msg.max_weight
        rnd = self._round
        if rnd is None or rnd.config.round != msg.round:
            return None
        return rnd.config.max_weight

    def advertise_keys(self, origin: int | None = None, *,
                       rotate: bool = False) -> KeyAdvertisement:
        """Setup stage: the signed advertisement of this client's share-channel key.

        ``origin`` is the transport identity the advertisement travels from (a
        Flower node id; default: this client's node id). A new key epoch starts on
        the first call, when ``rotate`` is set, or when ``origin`` changes;
        starting one abandons any round in progress.
        """
        origin = self.node_id if origin is None else origin
        if isinstance(origin, bool) or not isinstance(origin, int) or origin < 0:
            raise ConfigurationError(f"origin must be an int >= 0, got {origin!r}")
        k = self._keys
        if k is None or rotate or k.origin != origin:
            epoch = 0 if k is None else k.epoch + 1
            c_sk, c_pk = x25519_generate()
            sig = self._signing_key.sign(
                advertisement_statement(self.federation_id, self.node_id, origin, epoch, c_pk)
            )
            self._keys = k = _ChannelKeys(epoch, origin, c_sk, c_pk, sig)
            self._round = None
        return KeyAdvertisement(self.federation_id, self.node_id, k.origin, k.epoch,
                                k.cipher_public, k.signature)

    def _channel_key(self, adv: KeyAdvertisement) -> bytes:
        """AES-GCM key of the share channel with ``adv``'s sender (epoch pair bound)."""
        assert self._keys is not None
        slot = (adv.node_id, adv.epoch, adv.cipher_public, self._keys.epoch)
        key = self._channel.get(slot)
        if key is None:
            shared = x25519_shared(self._keys.cipher_private, adv.cipher_public)
            key = _share_key(shared, self.federation_id, (self.node_id, self._keys.epoch),
                             (adv.node_id, adv.epoch))
            if len(self._channel) > 100_000:
                self._channel.clear()
            self._channel[slot] = key
        return key

    def _check_fed(self, msg: Message) -> None:
        fed = getattr(msg, "federation_id")  # noqa: B009
        if fed != self.federation_id:
            raise ReplayError(
                f"message for federation {fed!r} refused by a member of {self.federation_id!r}"
            )

    def _current(self, msg: Message, stage: str) -> _ClientRound:
        self._check_fed(msg)
        rnd = self._round
        r = getattr(msg, "round")  # noqa: B009
        if rnd is None or r != rnd.config.round:
            current = None if rnd is None else rnd.config.round
            raise ReplayError(f"{type(msg).__name__} for round {r}; current round is {current}")
        if rnd.stage != stage:
            raise ProtocolViolation(
                f"{type(msg).__name__} unexpected: round {r} is at stage {rnd.stage!r}"
            )
        return rnd

    # ---- stage 1

    def check_round_config(self, cfg: RoundConfig) -> None:
        """Every check :meth:`handle_round_config` makes, and nothing else: no secret is
        drawn and the session is left as it was. A deployment calls it before the
        hospital trains for the round, so that a round its policy refuses costs no
        privacy budget. Raises what :meth:`handle_round_config` would."""
        self._checked_config(cfg)

    def _checked_config(self, cfg: RoundConfig) -> tuple[
            dict[int, tuple[int, ...]], dict[int, KeyAdvertisement], set[tuple[Any, ...]],
            int, int]:
        """The checks of stage 1: ``(neighbourhoods, neighbours' advertisements,
        advertisements verified now, c, h)``; changes nothing."""
        _expect(cfg, RoundConfig)
        self._check_fed(cfg)
        if cfg.round <= self._last_round:
            raise ReplayError(f"round {cfg.round} is not newer than round {self._last_round}")
        parts = cfg.participants
        _distinct(parts, "participant list")
        for v in parts:
            if v not in self.roster:
                raise ProtocolViolation(f"participant {v} is not in this client's roster")
        if self.node_id not in parts:
            raise ProtocolViolation(
                f"node {self.node_id} is not a participant of round {cfg.round}"
            )
        n = len(parts)
        if n < self.policy.min_participants:
            raise ThresholdPolicyError(
                f"{n} participants < policy minimum {self.policy.min_participants}"
            )
        if cfg.graph_kind not in GRAPH_KINDS:
            raise ProtocolViolation(f"unknown graph kind {cfg.graph_kind!r}")
        if cfg.graph_kind == "harary":
            need = self.policy.min_degree
            need = default_degree(n) if need is None else min(need, n - 1)
            if cfg.degree < need:
                raise ThresholdPolicyError(f"graph degree {cfg.degree} < policy minimum {need}")
        try:
            nbhd = closed_neighbourhoods(parts, cfg.graph_kind, cfg.degree, cfg.graph_seed)
        except ConfigurationError as exc:
            raise ProtocolViolation(f"invalid graph: {exc}") from exc
        c, h = self.policy.colluders_for(len(self.roster)), self.policy.min_honest
        if cfg.colluders < c or cfg.min_honest < h:
            raise ThresholdPolicyError(
                f"round set up for c = {cfg.colluders} colluders and h = {cfg.min_honest}; "
                f"this client's policy is c = {c}, h = {h}"
            )
        mine = nbhd[self.node_id]
        _check_collusion_bound(nbhd, mine, cfg.threshold, c, h)
        enc = EncodingConfig(cfg.clip, cfg.frac_bits, cfg.max_weight, cfg.ring_bits)
        enc.ring_bits_for(n)  # raises EncodingError if the sum could wrap
        if cfg.dim < 1:
            raise EncodingError(f"round dimension must be >= 1, got {cfg.dim}")
        # the share channel: ours must be the current key; neighbours' must verify
        index = {v: i for i, v in enumerate(parts)}
        if self._keys is None:
            raise KeyRotationRequired(
                f"node {self.node_id} must advertise its keys before round {cfg.round}"
            )
        own = cfg.advertisement(index[self.node_id])
        k = self._keys
        if (own.epoch, own.origin, own.cipher_public) != (k.epoch, k.origin, k.cipher_public):
            raise AuthenticationError(
                f"round config lists keys for node {self.node_id} that are not its current keys"
            )
        adverts: dict[int, KeyAdvertisement] = {}
        verified_now: set[tuple[Any, ...]] = set()
        for v in mine:
            if v == self.node_id:
                continue
            adv = cfg.advertisement(index[v])
            key = _advert_key(adv)
            if key not in self._verified:
                _verify_advertisement(adv, self.roster)
                verified_now.add(key)
            if adv.epoch < self._known_epoch.get(v, -1):
                raise ReplayError(f"node {v}'s keys of epoch {adv.epoch} are older than known ones")
            adverts[v] = adv
        return nbhd, adverts, verified_now, c, h

    def handle_round_config(self, cfg: RoundConfig) -> ShareKeys:
        """Stage 1: check the round against this client's policy; return this round's
        mask key, commitments and encrypted shares for the neighbours."""
        nbhd, adverts, verified_now, c, h = self._checked_config(cfg)
        mine = nbhd[self.node_id]
        # this round's secrets: a seed and a mask key that serve this round only
        digest = _config_digest(cfg)
        fed, rnd, me = self.federation_id, cfg.round, self.node_id
        seed = random_bytes(32)
        s_sk, s_pk = x25519_generate()
        xs = [shamir.x_coordinate(v) for v in mine]
        seed_shares = shamir.split(int.from_bytes(seed, "big"), cfg.threshold, xs)
        key_shares = shamir.split(int.from_bytes(s_sk, "big"), cfg.threshold, xs)
        seed_commits: list[bytes] = []
        key_commits: list[bytes] = []
        cts: list[bytes] = []
        own_shares = (b"", b"", b"", b"")
        for v, ys, yk in zip(mine, seed_shares, key_shares, strict=True):
            sb, kb = shamir.share_to_bytes(ys), shamir.share_to_bytes(yk)
            s_salt, k_salt = random_bytes(SALT_BYTES), random_bytes(SALT_BYTES)
            seed_commits.append(share_commitment(fed, rnd, me, v, "seed", sb, s_salt))
            key_commits.append(share_commitment(fed, rnd, me, v, "key", kb, k_salt))
            if v == me:
                own_shares = (sb, s_salt, kb, k_salt)
                cts.append(b"")
                continue
            pt = _share_plaintext(fed, rnd, me, v, sb, s_salt, kb, k_salt)
            cts.append(aead_encrypt(self._channel_key(adverts[v]), pt,
                                    _share_ad(fed, rnd, digest, me, v)))
        seed_commit = seed_commitment(fed, rnd, me, seed)
        root = merkle_root([sc + kc for sc, kc in zip(seed_commits, key_commits, strict=True)])
        sig = self._signing_key.sign(share_statement(fed, rnd, digest, me, mine, s_pk,
                                                     seed_commit, root))
        self._round = _ClientRound(cfg, digest, nbhd, adverts, seed, s_sk, s_pk, own_shares,
                                   c, h)
        self._last_round = cfg.round
        if len(self._verified) > 100_000:
            self._verified.clear()
        self._verified |= verified_now
        for v, adv in adverts.items():
            self._known_epoch[v] = adv.epoch
        return ShareKeys(fed, rnd, me, s_pk, seed_commit, list(mine), b"".join(seed_commits),
                         b"".join(key_commits), cts, sig)

    # ---- stage 2

    def check_mask_request(self, req: MaskRequest) -> None:
        """Every check :meth:`handle_mask_request` makes of the request (round and stage,
        sharers, every header, ciphertext and share against its commitment), and
        nothing else: the session is left as it was. A deployment calls it before the
        hospital trains for a pipelined round, so that a request it would refuse costs
        no privacy budget. Raises what :meth:`handle_mask_request` would."""
        _expect(req, MaskRequest)
        self._checked_mask_request(req)

    def _checked_mask_request(self, req: MaskRequest) -> tuple[
            _ClientRound, set[int], set[int], dict[int, tuple[bytes, bytes, bytes, bytes]],
            dict[int, bytes]]:
        """The checks of stage 2: ``(round, sharers, sharing neighbours, their decrypted
        shares, their round mask keys)``; changes nothing."""
        rnd = self._current(req, "shared")
        cfg = rnd.config
        fed, r, me = self.federation_id, cfg.round, self.node_id
        if req.node_id != me:
            raise ProtocolViolation(f"mask request addressed to node {req.node_id}")
        sharers = _distinct(req.sharers, "sharer list")
        if not sharers <= set(cfg.participants):
            raise ProtocolViolation("sharer list names non-participants")
        if me not in sharers:
            raise ProtocolViolation("sharer list omits this client, which did share")
        mine = rnd.nbhd[me]
        live = [v for v in mine if v in sharers]
        if len(live) < cfg.threshold or len(sharers) < cfg.threshold:
            raise ProtocolViolation(
                f"only {len(live)} of this client's neighbourhood shared; threshold {cfg.threshold}"
            )
        expected = {v for v in live if v != me}
        senders = _distinct(req.senders, "sender list")
        if senders != expected:
            missing, extra = sorted(expected - senders), sorted(senders - expected)
            raise ProtocolViolation(f"share ciphertexts missing from {missing}, unexpected {extra}")
        received: dict[int, tuple[bytes, bytes, bytes, bytes]] = {}
        publics: dict[int, bytes] = {}
        for v, raw, ct in zip(req.senders, req.headers, req.ciphertexts, strict=True):
            try:
                header = ShareHeader.from_bytes(raw)
            except MalformedMessage as exc:
                raise AuthenticationError(f"share header of node {v}: {exc}") from exc
            _verify_shares_signature(fed, r, rnd.digest, v, rnd.nbhd[v], header.mask_public,
                                     header.seed_commitment, header.commitment_root,
                                     header.signature, self.roster,
                                     check_point=False)  # the pair-mask exchange refuses it
            i = rnd.nbhd[v].index(me)
            if not merkle_verify(header.leaf(), i, len(rnd.nbhd[v]), header.path,
                                 header.commitment_root):
                raise AuthenticationError(
                    f"shares of node {v}: this client's commitments are not under the "
                    "signed root"
                )
            if len(ct) != share_ciphertext_bytes(fed, r, v, me):
                raise MalformedMessage(f"share ciphertext from node {v} has the wrong length")
            pt = aead_decrypt(self._channel_key(rnd.adverts[v]), ct,
                              _share_ad(fed, r, rnd.digest, v, me),
                              f"shares from node {v} in round {r}")
            try:
                fields = canonical_decode(pt)
                ok = (isinstance(fields, list) and len(fields) == 8
                      and fields[:4] == [fed, r, v, me])
                sb, s_salt, kb, k_salt = fields[4:8]
                shamir.bytes_to_share(sb)
                shamir.bytes_to_share(kb)
                ok = ok and len(s_salt) == SALT_BYTES and len(k_salt) == SALT_BYTES
            except (MalformedMessage, ProtocolViolation, IndexError, TypeError,
                    ValueError) as exc:
                raise AuthenticationError(f"shares from node {v}: malformed plaintext") from exc
            if not ok:
                raise AuthenticationError(f"shares from node {v}: header does not match")
            if (share_commitment(fed, r, v, me, "seed", sb, s_salt)
                    != header.seed_share_commitment
                    or share_commitment(fed, r, v, me, "key", kb, k_salt)
                    != header.key_share_commitment):
                raise AuthenticationError(
                    f"shares from node {v} do not match its signed commitments"
                )
            received[v] = (sb, s_salt, kb, k_salt)
            publics[v] = header.mask_public
        return rnd, sharers, expected, received, publics

    def handle_mask_request(self, req: MaskRequest, vector: np.ndarray, weight: int, *,
                            input_digest: bytes,
                            totals: np.ndarray | None = None) -> MaskedInput:
        """Stage 2: check every sharing neighbour's signed header and decrypt the shares
        addressed to us (each against its commitment), then return the masked input.

        ``vector`` (float, length ``dim``) and ``weight`` (example count) never
        leave the client except inside the masked vector. ``input_digest`` names the
        public data the input was computed from (in a federation, a digest of the
        global model received with this request); it is signed with the masked input,
        and this client later signs and reveals only for an alive set whose every
        member in its neighbourhood signed the same digest, so no sum it helps unmask
        mixes its input with inputs computed from another model.

        ``totals`` (optional) follow ``vector`` in the masked vector, summed without
        the weight (:func:`bract.secagg.encoding.encode`): the server decodes the
        plain sum of each over the alive clients; one beyond the round's
        ``clip * max_weight`` raises :class:`EncodingError` (never clipped).
        """
        _expect(req, MaskRequest)
        if (not isinstance(input_digest, bytes)
                or not 1 <= len(input_digest) <= MAX_INPUT_DIGEST_BYTES):
            raise EncodingError(
                "input_digest must name the public data the input was computed from "
                f"(1 to {MAX_INPUT_DIGEST_BYTES} bytes, e.g. the SHA-256 of the global model); "
                f"got {type(input_digest).__name__}"
                + (f" of {len(input_digest)} bytes" if isinstance(input_digest, bytes) else ""))
        rnd, sharers, expected, received, publics = self._checked_mask_request(req)
        cfg = rnd.config
        fed, r, me = self.federation_id, cfg.round, self.node_id
        enc = EncodingConfig(cfg.clip, cfg.frac_bits, cfg.max_weight, cfg.ring_bits)
        y = encode(vector, weight, enc, cfg.ring_bits, dim=cfg.dim,
                   clip_out_of_range=self.policy.clip_out_of_range, totals=totals)
        acc = KeystreamAccumulator(y)
        acc.add(_self_mask_key(rnd.seed, fed, r, me))
        sk = x25519_private(rnd.mask_private)
        for v in sorted(expected):
            key = pair_mask_key(x25519_shared(sk, publics[v]), fed, r, (me, rnd.mask_public),
                                (v, publics[v]))
            if me < v:
                acc.add(key)
            else:
                acc.subtract(key)
        rnd.received = received
        rnd.sharers = tuple(sorted(sharers))
        rnd.input_digest = input_digest
        rnd.stage = "masked"
        sig = self._signing_key.sign(input_statement(fed, r, rnd.digest, me, input_digest))
        return MaskedInput(fed, r, me, cfg.ring_bits, y.tobytes(), input_digest, sig)

    # ---- stage 3

    def _check_view(self, rnd: _ClientRound, sharers: Sequence[int], alive: Sequence[int]) -> None:
        if tuple(sorted(_distinct(sharers, "sharer list"))) != rnd.sharers:
            raise ConsistencyError("sharer list differs from the one in this client's mask request")
        alive_set = _distinct(alive, "alive set")
        if not alive_set <= set(rnd.sharers):
            raise ProtocolViolation("alive set names clients that never shared")
        if self.node_id not in alive_set:
            raise ProtocolViolation("alive set omits this client, which sent its masked input")
        if len(alive_set) < rnd.config.threshold:
            raise ProtocolViolation(
                f"alive set of {len(alive_set)} is below the threshold {rnd.config.threshold}"
            )
        why = alive_shortfall(rnd.nbhd, alive_set, rnd.colluders, rnd.min_honest)
        if why:
            raise ThresholdPolicyError(f"alive set refused: {why}")

    def _check_inputs(self, rnd: _ClientRound, req: ConsistencyRequest) -> None:
        """Every alive neighbour signed, with its masked input, the input digest this
        client's input was computed from: a server that gave some clients another global
        model gets no signature for an alive set that mixes them."""
        declared = {v: (d, sig) for v, d, sig in
                    zip(req.alive, req.input_digests, req.input_signatures, strict=True)}
        fed, r = self.federation_id, rnd.config.round
        for v in rnd.nbhd[self.node_id]:
            if v == self.node_id or v not in declared:
                continue
            d, sig = declared[v]
            verify_signature(self.roster[v], sig, input_statement(fed, r, rnd.digest, v, d),
                             f"input signature of node {v}")
            if d != rnd.input_digest:
                raise ConsistencyError(
                    f"alive node {v} computed its input from other public data (another "
                    "global model) than this client: no sum mixing them is signed")

    def handle_consistency_request(self, req: ConsistencyRequest) -> ConsistencySignature:
        """Stage 3: sign (sharers, alive set); a client signs at most one view per round,
        and only one under which no sum of fewer than ``h`` honest updates can be unmasked."""
        _expect(req, ConsistencyRequest)
        self._check_fed(req)
        rnd = self._round
        if rnd is not None and rnd.stage == "signed" and req.round == rnd.config.round:
            if tuple(sorted(req.alive)) != rnd.signed_alive:
                raise ConsistencyError(
                    f"round {req.round}: this client already signed a different alive set"
                )
        else:
            rnd = self._current(req, "masked")
        self._check_view(rnd, req.sharers, req.alive)
        self._check_inputs(rnd, req)
        stmt = consistency_statement(self.federation_id, rnd.config.round, rnd.digest,
                                     rnd.sharers, req.alive, rnd.input_digest)
        sig = self._signing_key.sign(stmt)
        rnd.signed_alive = tuple(sorted(req.alive))
        rnd.stage = "signed"
        return ConsistencySignature(self.federation_id, rnd.config.round, self.node_id, sig)

    # ---- stage 4

    def handle_unmask_request(self, req: UnmaskRequest) -> UnmaskReply:
        """Stage 4: after checking that a quorum signed the same view, reveal one share
        per peer (with the salt that opens its commitment), never both of one peer."""
        _expect(req, UnmaskRequest)
        rnd = self._current(req, "signed")
        cfg = rnd.config
        alive = _distinct(req.alive, "alive set")
        dropped = _distinct(req.dropped, "dropped set")
        both = alive & dropped
        if both:
            raise ProtocolViolation(f"node(s) {sorted(both)} listed as both alive and dropped")
        if tuple(sorted(alive)) != rnd.signed_alive:
            raise ConsistencyError("alive set differs from the one this client signed")
        if dropped != set(rnd.sharers) - alive:
            raise ProtocolViolation("dropped set is not exactly the sharers outside the alive set")
        _distinct(req.signers, "signer list")
        mine = rnd.nbhd[self.node_id]
        peers = [v for v in mine if v == self.node_id or v in rnd.received]
        relevant = set().union(*(rnd.nbhd[v] for v in peers))
        stmt = consistency_statement(self.federation_id, cfg.round, rnd.digest, rnd.sharers,
                                     alive, rnd.input_digest)
        valid: set[int] = set()
        short = {v: cfg.threshold for v in peers}  # signatures still needed per peer
        for s, sig in zip(req.signers, req.signatures, strict=True):
            if s not in alive:
                raise ConsistencyError(f"signature from node {s}, which is not in the alive set")
            if s in relevant and any(short[v] > 0 and s in rnd.nbhd[v] for v in peers):
                verify_signature(self.roster[s], sig, stmt, f"consistency signature of node {s}")
                valid.add(s)
                for v in peers:
                    if s in rnd.nbhd[v]:
                        short[v] -= 1
        for v in peers:
            q = len(valid & set(rnd.nbhd[v]))
            if q < cfg.threshold:
                raise ConsistencyError(
                    f"only {q} of node {v}'s neighbourhood signed this view; need {cfg.threshold}"
                )
        seed_owners: list[int] = []
        seed_shares: list[bytes] = []
        seed_salts: list[bytes] = []
        key_owners: list[int] = []
        key_shares: list[bytes] = []
        key_salts: list[bytes] = []
        for v in peers:
            sb, s_salt, kb, k_salt = (rnd.own_shares if v == self.node_id else rnd.received[v])
            if v in alive:
                seed_owners.append(v)
                seed_shares.append(sb)
                seed_salts.append(s_salt)
            else:  # v in dropped (checked above); never both
                key_owners.append(v)
                key_shares.append(kb)
                key_salts.append(k_salt)
        assert not set(seed_owners) & set(key_owners)
        self._round = None  # wipe the round's secrets
        return UnmaskReply(self.federation_id, cfg.round, self.node_id, seed_owners, seed_shares,
                           seed_salts, key_owners, key_shares, key_salts)

    def abort_round(self) -> None:
        """Forget the round in progress (its secrets are wiped; they served it alone)."""
        self._round = None

    def handle(self, msg: Message, vector: np.ndarray | None = None, weight: int = 0, *,
               input_digest: bytes | None = None) -> Message:
        """Dispatch any server message to its handler (``vector``, ``weight`` and
        ``input_digest`` for stage 2)."""
        if isinstance(msg, RoundConfig):
            return self.handle_round_config(msg)
        if isinstance(msg, MaskRequest):
            if vector is None or input_digest is None:
                raise EncodingError("stage 2 needs the input vector and its input_digest")
            return self.handle_mask_request(msg, vector, weight, input_digest=input_digest)
        if isinstance(msg, ConsistencyRequest):
            return self.handle_consistency_request(msg)
        if isinstance(msg, UnmaskRequest):
            return self.handle_unmask_request(msg)
        raise MalformedMessage(f"a client does not handle {type(msg).__name__}")

    # ---- persistence (e.g. Flower ctx.state between ClientApp processes)

    def export_state(self) -> bytes:
        """Serialise everything but the signing key and roster. Contains secrets: store as such."""
        k = self._keys
        keys = [] if k is None else [k.epoch, k.origin, k.cipher_private, k.cipher_public,
                                     k.signature]
        rnd: list[Any] = []
        if self._round is not None:
            r = self._round
            got = sorted(r.received)
            rnd = [r.config.to_bytes(), r.seed, r.mask_private, list(r.own_shares), r.colluders,
                   r.min_honest, r.stage, list(r.sharers), got,
                   [list(r.received[v]) for v in got], list(r.signed_alive), r.input_digest]
        return canonical_encode({
            "v": 3, "node": self.node_id, "fed": self.federation_id, "keys": keys,
            "last_round": self._last_round + 1,
            "known": [[v, e] for v, e in sorted(self._known_epoch.items())], "round": rnd,
        })

    @classmethod
    def from_state(
        cls,
        state: bytes,
        signing_key: SigningKey,
        roster: Mapping[int, bytes],
        policy: ClientPolicy | None = None,
    ) -> ClientSession:
        """Rebuild a session from :meth:`export_state` (same identity and roster)."""
        from .messages import message_from_bytes

        try:
            d = canonical_decode(state)
            if d["v"] != 3:
                raise ValueError(f"state of protocol version {d['v']}, expected 3")
            self = cls(d["node"], d["fed"], signing_key, roster, policy)
            if d["keys"]:
                self._keys = _ChannelKeys(*d["keys"])
            self._last_round = d["last_round"] - 1
            self._known_epoch = {v: e for v, e in d["known"]}
            if d["round"]:
                (cfg_b, seed, s_sk, own, c, h, stage, sharers, got, shares,
                 signed, input_digest) = d["round"]
                cfg = message_from_bytes(cfg_b)
                assert isinstance(cfg, RoundConfig)
                nbhd = closed_neighbourhoods(cfg.participants, cfg.graph_kind, cfg.degree,
                                             cfg.graph_seed)
                index = {v: i for i, v in enumerate(cfg.participants)}
                adverts = {v: cfg.advertisement(index[v]) for v in nbhd[self.node_id]
                           if v != self.node_id}
                r = _ClientRound(cfg, _config_digest(cfg), nbhd, adverts, seed, s_sk,
                                 x25519_public(s_sk), tuple(own), c, h, stage, tuple(sharers))
                r.received = {v: tuple(s) for v, s in zip(got, shares, strict=True)}
                r.signed_alive = tuple(signed)
                r.input_digest = input_digest
                self._round = r
        except (KeyError, TypeError, ValueError, AssertionError, AuthenticationError) as exc:
            raise MalformedMessage(f"client state is malformed: {exc}") from exc
        return self


# --------------------------------------------------------------------------- server


@dataclass(frozen=True)
class AggregateResult:
    """What the server learns: the weighted sum of the alive clients' clipped inputs and
    the total weight (the coordinates of any totals, see
    :meth:`ClientSession.handle_mask_request`, hold their plain sums). ``error_bound``
    bounds every coordinate of ``weighted_sum``;
    ``excluded`` names clients whose unmask reply held a share that did not open its
    dealer's commitment (their replies were discarded)."""

    round: int
    weighted_sum: np.ndarray
    total_weight: int
    alive: tuple[int, ...]
    dropped: tuple[int, ...]
    error_bound: float
    excluded: tuple[int, ...] = ()

    def mean(self) -> np.ndarray:
        """The weighted average ``sum_u w_u x_u / sum_u w_u``."""
        if self.total_weight <= 0:
            raise EncodingError("total weight is 0: no average")
        return self.weighted_sum / self.total_weight


@dataclass
class _ServerRound:
    config: RoundConfig
    nbhd: dict[int, tuple[int, ...]]
    digest: bytes = b""
    stage: str = "config"
    shares: dict[int, ShareKeys] = field(default_factory=dict)
    sharers: tuple[int, ...] = ()
    acc: np.ndarray | None = None
    alive: set[int] = field(default_factory=set)
    signatures: dict[int, bytes] = field(default_factory=dict)
    # alive node -> (input digest, its signature), from its masked input
    inputs: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)
    expected_input: bytes | None = None
    responders: set[int] = field(default_factory=set)
    excluded: set[int] = field(default_factory=set)
    seed_points: dict[int, list[tuple[int, int]]] = field(default_factory=dict)
    key_points: dict[int, list[tuple[int, int]]] = field(default_factory=dict)


def _usable_sharers(rnd: _ServerRound) -> tuple[set[int], str | None]:
    """The sharers a round's mask stage can use, and why they do not suffice (``None``:
    they do). A sharer is usable while at least ``t`` of its neighbours (itself
    included) are usable and, besides itself, enough of them to honour the collusion
    bound; the round needs ``max(t, c + min_honest)`` usable sharers."""
    cfg = rnd.config
    t = cfg.threshold
    need = cfg.colluders + cfg.min_honest - 1
    u1 = set(rnd.shares)
    changed = True
    while changed:  # drop sharers whose neighbourhood cannot reach t or the bound
        changed = False
        for u in sorted(u1):
            near = len(u1 & set(rnd.nbhd[u]))
            if near < t or near - 1 < need:
                u1.discard(u)
                changed = True
    least = max(t, cfg.colluders + cfg.min_honest)
    if len(u1) >= least:
        return u1, None
    usable = "" if len(u1) == len(rnd.shares) else f" ({len(u1)} with enough sharing neighbours)"
    return u1, (f"{len(rnd.shares)} of {len(rnd.nbhd)} clients shared keys{usable}, "
                f"at least {least} needed (threshold {t})")


class ServerSession:
    """The (honest) server's side: relays, checks and sums masked inputs as they arrive.

    Memory: one ``d + 1`` ring vector plus the round's small metadata; masked
    inputs are added to the running sum on arrival and not kept (O(d), not O(n d)).

    Args:
        federation_id: the federation.
        roster: node id -> Ed25519 public key (to check advertisements and signatures).
        encoding: fixed-point parameters for every round.
        graph: ``"complete"``, ``"harary"`` (SecAgg+ sparse graph) or ``"auto"``
            (each round the cheapest graph that honours the collusion bound and
            survives ``dropouts``: :func:`round_parameters`).
        degree: Harary degree (default :func:`default_degree` of the round size); for
            ``auto``, the smallest degree it may pick.
        colluders: the collusion bound ``c`` every round is set up for (``None``:
            ``floor((R - 1) / 3)`` of the roster's ``R`` clients, whatever the
            round's size); the threshold is the smallest ``t > (|N| + c) / 2``.
            Clients refuse a round below their own bound.
        min_honest: ``h``, the fewest honest updates in any sum that is unmasked.
        dropouts: how many clients every round must survive dropping out, wherever
            they fall (``None``: not declared, and ``auto`` keeps the complete graph);
            refused here when a round of the whole roster cannot; a smaller round
            that cannot runs on the complete graph (:func:`round_parameters`).
    """

    def __init__(
        self,
        federation_id: str,
        roster: Mapping[int, bytes],
        *,
        encoding: EncodingConfig | None = None,
        graph: str = "complete",
        degree: int | None = None,
        colluders: int | None = None,
        min_honest: int = 2,
        dropouts: int | None = None,
    ) -> None:
        if graph not in GRAPH_CHOICES:
            raise ConfigurationError(f"graph must be one of {GRAPH_CHOICES}, got {graph!r}")
        ClientPolicy(colluders=colluders, min_honest=min_honest)  # same validation
        self.federation_id = federation_id
        self.roster = validate_roster(roster)
        if dropouts is not None:  # a bad value, or one the whole roster cannot meet
            check_dropouts(len(self.roster), graph, degree, colluders, min_honest, dropouts)
        self.encoding = encoding or EncodingConfig()
        self.graph = graph
        self.degree = degree
        self.colluders = colluders
        #: the bound every round is set up for: the declared one, else the roster's
        self.collusion_bound = (default_colluders(len(self.roster)) if colluders is None
                                else colluders)
        self.min_honest = min_honest
        self.dropouts = dropouts
        self._adverts: dict[int, KeyAdvertisement] = {}
        self._last_round = -1
        self._round: _ServerRound | None = None
        self._next: _ServerRound | None = None  # opened by start_next_round

    # ---- setup

    def receive_advertisement(self, adv: KeyAdvertisement, origin: int | None = None) -> None:
        """Store a client's signed share-channel key (verified against the roster).

        ``origin`` is the transport identity the advertisement came from (the Flower
        node id); it must be the one the client signed. One transport identity holds
        one roster identity, so no client can take over another's by replaying its
        advertisement.
        """
        _expect(adv, KeyAdvertisement)
        if adv.federation_id != self.federation_id:
            raise ReplayError(f"advertisement for federation {adv.federation_id!r}")
        _verify_advertisement(adv, self.roster)
        if origin is not None and adv.origin != origin:
            raise AuthenticationError(
                f"advertisement of node {adv.node_id} names origin {adv.origin} but came "
                f"from {origin}"
            )
        old = self._adverts.get(adv.node_id)
        if old is not None and adv.epoch < old.epoch:
            raise ReplayError(f"node {adv.node_id}: epoch {adv.epoch} older than {old.epoch}")
        for v, other in self._adverts.items():
            if v != adv.node_id and other.origin == adv.origin:
                raise AuthenticationError(
                    f"origin {adv.origin} already holds node {v}'s keys; node {adv.node_id} "
                    "cannot advertise from it"
                )
        self._adverts[adv.node_id] = adv

    def needs_advertisement(self, participants: Iterable[int]) -> list[int]:
        """Participants that must advertise a share-channel key before the next round."""
        return sorted(v for v in participants if v not in self._adverts)

    # ---- stage 1

    def start_round(self, round_number: int, participants: Sequence[int], dim: int, *,
                    encoding: EncodingConfig | None = None) -> RoundConfig:
        """Open a round; returns the one :class:`RoundConfig` every participant gets.

        ``encoding`` replaces the session's fixed-point encoding for this round (e.g.
        a ring sized for the weights the participants reported); each participant
        checks its headroom. A round still open (e.g. one opened by
        :meth:`start_next_round` and not wanted any more) is abandoned first; its
        secrets served it alone.
        """
        self.abort_round("superseded by a new round")
        self._check_new_round(round_number, participants, dim)
        cfg, self._round = self._new_round(round_number, participants, dim, encoding)
        return cfg

    def start_next_round(
        self, round_number: int, participants: Sequence[int], dim: int, *,
        encoding: EncodingConfig | None = None,
    ) -> RoundConfig:
        """Open the round after the current one while it waits for unmask replies.

        Share-stage pipelining (module docstring): the returned config travels
        with the current round's :class:`UnmaskRequest`; shares for it may arrive
        with the unmask replies (:meth:`receive_shares` sorts them by round). When
        the current round finishes it becomes the current round, still at stage
        ``config``; if the current round aborts, it is abandoned too.
        """
        rnd = self._round
        if rnd is None or rnd.stage != "unmask":
            raise ProtocolViolation("a next round opens only while the current one unmasks")
        if self._next is not None:
            raise ProtocolViolation("the next round is already open")
        self._check_new_round(round_number, participants, dim)
        cfg, self._next = self._new_round(round_number, participants, dim, encoding)
        return cfg

    def _check_new_round(self, round_number: int, participants: Sequence[int], dim: int) -> None:
        if round_number <= self._last_round:
            raise ProtocolViolation(f"round {round_number} is not newer than {self._last_round}")
        parts = sorted(participants)
        if len(set(parts)) != len(parts):
            raise ConfigurationError("duplicate node ids in the participant list")
        missing = [v for v in parts if v not in self.roster]
        if missing:
            raise ConfigurationError(f"participants {missing} are not in the roster")
        if len(parts) < 3:
            raise ConfigurationError("a secure round needs at least 3 participants")
        stale = self.needs_advertisement(parts)
        if stale:
            raise KeyRotationRequired(f"nodes {stale} must advertise their keys first")
        if not isinstance(dim, int) or dim < 1:
            raise EncodingError(f"dim must be a positive int, got {dim!r}")

    def _new_round(
        self, round_number: int, participants: Sequence[int], dim: int,
        encoding: EncodingConfig | None = None,
    ) -> tuple[RoundConfig, _ServerRound]:
        parts = sorted(participants)
        n = len(parts)
        enc = self.encoding if encoding is None else encoding
        ring_bits = enc.ring_bits_for(n)
        shape = round_parameters(n, self.graph, self.degree, self.collusion_bound,
                                 self.min_honest, self.dropouts)
        seed = random_bytes(16)
        nbhd = closed_neighbourhoods(parts, shape.kind, shape.degree, seed)
        ads = [self._adverts[v] for v in parts]
        cfg = RoundConfig(
            self.federation_id, round_number, parts, shape.threshold, shape.colluders,
            self.min_honest, shape.kind, shape.degree, seed, dim,
            float(enc.clip), enc.frac_bits, enc.max_weight, ring_bits,
            [a.epoch for a in ads], [a.origin for a in ads], [a.cipher_public for a in ads],
            [a.signature for a in ads],
        )
        self._last_round = round_number
        return cfg, _ServerRound(cfg, nbhd, _config_digest(cfg))

    def _current(self, msg: Message, stage: str,
                 rnd: _ServerRound | None = None) -> _ServerRound:
        """The round ``msg`` is for (``rnd``, by default the current one), checked."""
        rnd = self._round if rnd is None else rnd
        if getattr(msg, "federation_id") != self.federation_id:  # noqa: B009
            raise ReplayError("message from another federation")
        if rnd is None or getattr(msg, "round") != rnd.config.round:  # noqa: B009
            raise ReplayError(f"{type(msg).__name__} is not for the current round")
        if rnd.stage != stage:
            raise ProtocolViolation(f"{type(msg).__name__} arrived at stage {rnd.stage!r}")
        return rnd

    def _abort(self, why: str, cheaters: Iterable[int] = ()) -> RoundAborted:
        # The next round (if open) goes too; every secret of both served them alone.
        self._round = self._next = None
        return RoundAborted(why, cheaters=tuple(sorted(cheaters)))

    def _check_sender(self, msg: Message, sender: int | None) -> None:
        """Refuse ``msg`` unless it came from the transport identity that holds its
        ``node_id``: the origin of that node's accepted key advertisement.

        ``sender`` is the transport identity the message arrived from (the Flower node
        id; the in-memory driver passes the node id it advertised under). ``None``
        skips the check: only a caller that routes every message itself (a test
        playing each client in turn) may omit it. Raises before any state changes, so
        a refused message leaves the round as it was."""
        if sender is None:
            return
        u = getattr(msg, "node_id", None)
        adv = self._adverts.get(u) if isinstance(u, int) else None
        if adv is None or adv.origin != sender:
            holder = next((v for v, a in sorted(self._adverts.items()) if a.origin == sender),
                          None)
            who = "no node" if holder is None else f"node {holder}"
            raise AuthenticationError(
                f"{type(msg).__name__} names node {u} but came from {sender}, which holds "
                f"{who}'s keys: a client answers only for itself"
            )

    def receive_shares(self, msg: ShareKeys, *, sender: int | None = None) -> None:
        """Stage 1 reply: a client's signed round mask key, commitments and one
        ciphertext per neighbour, each of the exact size the round fixes (for the
        current round, or for the next one opened by :meth:`start_next_round`).
        ``sender``: the transport identity it came from (:meth:`_check_sender`)."""
        _expect(msg, ShareKeys)
        self._check_sender(msg, sender)
        nxt = self._next
        if nxt is not None and getattr(msg, "round", None) == nxt.config.round:
            rnd = self._current(msg, "config", nxt)
        else:
            rnd = self._current(msg, "config")
        u = msg.node_id
        if u not in rnd.nbhd:
            raise ProtocolViolation(f"node {u} is not a participant")
        if u in rnd.shares:
            raise ProtocolViolation(f"node {u} already sent its shares")
        holders = list(rnd.nbhd[u])
        if list(msg.holders) != holders:
            raise ProtocolViolation(f"node {u}'s shares are not addressed to its neighbourhood")
        _verify_shares_signature(self.federation_id, rnd.config.round, rnd.digest, u, holders,
                                 msg.mask_public, msg.seed_commitment, msg.commitment_root(),
                                 msg.signature, self.roster)
        for v, ct in zip(holders, msg.ciphertexts, strict=True):
            want = 0 if v == u else share_ciphertext_bytes(self.federation_id,
                                                           rnd.config.round, u, v)
            if len(ct) != want:
                raise MalformedMessage(f"node {u}'s share ciphertext for node {v} has "
                                       f"{len(ct)} bytes, expected {want}")
        rnd.shares[u] = msg

    def _feasible(self, rnd: _ServerRound, alive: set[int], holders: set[int]) -> str | None:
        t = rnd.config.threshold
        if len(alive) < t:
            return f"{len(alive)} alive clients < threshold {t}"
        why = alive_shortfall(rnd.nbhd, alive, rnd.config.colluders, rnd.config.min_honest)
        if why:
            return why
        for u in sorted(alive):
            if len(holders & set(rnd.nbhd[u])) < t:
                return f"fewer than {t} holders of node {u}'s self-mask shares remain"
        for v in sorted(set(rnd.sharers) - alive):
            if alive & set(rnd.nbhd[v]) and len(holders & set(rnd.nbhd[v])) < t:
                return f"fewer than {t} holders of dropped node {v}'s key shares remain"
        return None

    # ---- stage 2

    def mask_requests(self) -> dict[int, MaskRequest]:
        """Close stage 1: fix the sharers U1 and build each sharer's :class:`MaskRequest`."""
        rnd = self._round
        if rnd is None or rnd.stage != "config":
            raise ProtocolViolation("no round waiting for shares")
        cfg = rnd.config
        u1, shortfall = _usable_sharers(rnd)
        if shortfall is not None:
            raise self._abort(f"round {cfg.round}: {shortfall}")
        rnd.sharers = tuple(sorted(u1))
        headers = {v: rnd.shares[v].holder_headers() for v in rnd.sharers}
        inbox: dict[int, tuple[list[int], list[bytes], list[bytes]]] = {
            u: ([], [], []) for u in u1}
        for v in rnd.sharers:
            for r, ct in zip(rnd.shares[v].holders, rnd.shares[v].ciphertexts, strict=True):
                if r in u1 and r != v:
                    inbox[r][0].append(v)
                    inbox[r][1].append(headers[v][r])
                    inbox[r][2].append(ct)
        rnd.stage = "mask"
        dtype = RING_DTYPES[cfg.ring_bits]
        rnd.acc = np.zeros(cfg.dim + 1, dtype=dtype)
        f, r = self.federation_id, cfg.round
        return {u: MaskRequest(f, r, u, list(rnd.sharers), s, h, c)
                for u, (s, h, c) in inbox.items()}

    def expect_input_digest(self, input_digest: bytes) -> None:
        """From now on in the current round, refuse a masked input whose digest does not
        begin with ``input_digest`` (the digest of the global model this server sent;
        clients may append one of their training settings): that client is then not
        alive, instead of every honest client refusing an alive set that mixes models."""
        if self._round is None:
            raise ProtocolViolation("no round is open")
        self._round.expected_input = bytes(input_digest)

    def receive_masked_input(self, msg: MaskedInput, *, sender: int | None = None) -> None:
        """Stage 2 reply: add ``y_u`` to the running sum at once (nothing per client is kept).
        ``sender``: the transport identity it came from (:meth:`_check_sender`)."""
        _expect(msg, MaskedInput)
        self._check_sender(msg, sender)
        rnd = self._current(msg, "mask")
        u = msg.node_id
        if u not in rnd.sharers:
            raise ProtocolViolation(f"masked input from node {u}, which is not a sharer")
        if u in rnd.alive:
            raise ProtocolViolation(f"node {u} already sent its masked input")
        if msg.ring_bits != rnd.config.ring_bits:
            raise ProtocolViolation(f"node {u}: ring Z_2^{msg.ring_bits}, round uses "
                                    f"Z_2^{rnd.config.ring_bits}")
        assert rnd.acc is not None
        if len(msg.data) != rnd.acc.nbytes:
            raise MalformedMessage(f"masked input of node {u} has {len(msg.data)} bytes, "
                                   f"expected {rnd.acc.nbytes}")
        if len(msg.input_digest) > MAX_INPUT_DIGEST_BYTES:
            raise MalformedMessage(f"node {u}: input digest of {len(msg.input_digest)} bytes")
        verify_signature(self.roster[u], msg.signature,
                         input_statement(self.federation_id, rnd.config.round, rnd.digest, u,
                                         msg.input_digest), f"input signature of node {u}")
        if rnd.expected_input is not None and \
                msg.input_digest[:len(rnd.expected_input)] != rnd.expected_input:
            raise ProtocolViolation(f"node {u} computed its input from other public data "
                                    "than the round's (another global model)")
        np.add(rnd.acc, np.frombuffer(msg.data, dtype=rnd.acc.dtype), out=rnd.acc)
        rnd.alive.add(u)
        rnd.inputs[u] = (msg.input_digest, msg.signature)

    # ---- stage 3

    def consistency_request(self) -> ConsistencyRequest:
        """Close stage 2: the alive set U2 is whoever's masked input arrived."""
        rnd = self._round
        if rnd is None or rnd.stage != "mask":
            raise ProtocolViolation("no round waiting for masked inputs")
        why = self._feasible(rnd, rnd.alive, rnd.alive)
        if why:
            raise self._abort(f"round {rnd.config.round} aborted before unmasking: {why}")
        rnd.stage = "consistency"
        alive = sorted(rnd.alive)
        return ConsistencyRequest(self.federation_id, rnd.config.round, list(rnd.sharers),
                                  alive, [rnd.inputs[v][0] for v in alive],
                                  [rnd.inputs[v][1] for v in alive])

    def receive_consistency_signature(self, msg: ConsistencySignature, *,
                                      sender: int | None = None) -> None:
        """Stage 3 reply: verify and keep an alive client's signature over (U1, U2).
        ``sender``: the transport identity it came from (:meth:`_check_sender`)."""
        _expect(msg, ConsistencySignature)
        self._check_sender(msg, sender)
        rnd = self._current(msg, "consistency")
        u = msg.node_id
        if u not in rnd.alive:
            raise ProtocolViolation(f"signature from node {u}, which is not alive")
        if u in rnd.signatures:
            raise ProtocolViolation(f"node {u} already signed")
        stmt = consistency_statement(self.federation_id, rnd.config.round, rnd.digest,
                                     rnd.sharers, rnd.alive, rnd.inputs[u][0])
        verify_signature(self.roster[u], msg.signature, stmt, f"consistency signature of node {u}")
        rnd.signatures[u] = msg.signature

    # ---- stage 4

    def unmask_request(self) -> UnmaskRequest:
        """Close stage 3: send alive/dropped sets and every collected signature to the signers."""
        rnd = self._round
        if rnd is None or rnd.stage != "consistency":
            raise ProtocolViolation("no round waiting for consistency signatures")
        why = self._feasible(rnd, rnd.alive, set(rnd.signatures))
        if why:
            raise self._abort(f"round {rnd.config.round} aborted at the consistency check: {why}")
        rnd.stage = "unmask"
        signers = sorted(rnd.signatures)
        return UnmaskRequest(self.federation_id, rnd.config.round, sorted(rnd.alive),
                             sorted(set(rnd.sharers) - rnd.alive), signers,
                             [rnd.signatures[s] for s in signers])

    def receive_unmask_reply(self, msg: UnmaskReply, *, sender: int | None = None) -> None:
        """Stage 4 reply: check every share against its dealer's signed commitment and
        collect it (seed shares of alive owners, key shares of dropped ones).

        A reply holding a share that does not open its commitment is discarded whole
        and its sender is excluded from the round and named in the result
        (:class:`AuthenticationError` is raised and the exclusion is kept: the one
        state change a refused message makes). The reply is unsigned, so the
        exclusion binds its sender only through ``sender`` (:meth:`_check_sender`): a
        caller that knows the transport identity must pass it, or any client could
        answer in another's name and have that one excluded; a reply naming another
        node than its sender's is refused before it changes anything.
        """
        _expect(msg, UnmaskReply)
        self._check_sender(msg, sender)
        rnd = self._current(msg, "unmask")
        u = msg.node_id
        if u not in rnd.signatures:
            raise ProtocolViolation(f"unmask reply from node {u}, which did not sign")
        if u in rnd.responders or u in rnd.excluded:
            raise ProtocolViolation(f"node {u} already answered")
        nb = set(rnd.nbhd[u])
        dropped = set(rnd.sharers) - rnd.alive
        so, ko = set(msg.seed_owners), set(msg.key_owners)
        if len(so) != len(msg.seed_owners) or len(ko) != len(msg.key_owners):
            raise ProtocolViolation(f"node {u}: duplicate owners in unmask reply")
        if not so <= rnd.alive & nb or not ko <= dropped & nb or so & ko:
            raise ProtocolViolation(f"node {u}: unmask reply reveals shares it must not")
        fed, r = self.federation_id, rnd.config.round
        x = shamir.x_coordinate(u)
        points: list[tuple[str, int, int]] = []
        for kind, owners, shares, salts in (("seed", msg.seed_owners, msg.seed_shares,
                                             msg.seed_salts),
                                            ("key", msg.key_owners, msg.key_shares,
                                             msg.key_salts)):
            for v, share, salt in zip(owners, shares, salts, strict=True):
                if len(share) != shamir.SHARE_BYTES or len(salt) != SALT_BYTES:
                    raise MalformedMessage(f"node {u}: a share is {shamir.SHARE_BYTES} bytes "
                                           f"and a salt {SALT_BYTES}")
                seed_c, key_c = rnd.shares[v].commitments(rnd.nbhd[v].index(u))
                if share_commitment(fed, r, v, u, kind, share, salt) != (
                        seed_c if kind == "seed" else key_c):
                    rnd.excluded.add(u)
                    raise AuthenticationError(
                        f"node {u} returned a {kind} share of node {v} that does not match "
                        f"node {v}'s signed commitment; node {u} is excluded from round {r}"
                    )
                try:
                    points.append((kind, v, shamir.bytes_to_share(share)))
                except ProtocolViolation as exc:
                    raise MalformedMessage(f"node {u}: {exc}") from exc
        for kind, v, y in points:
            (rnd.seed_points if kind == "seed" else rnd.key_points).setdefault(v, []).append(
                (x, y))
        rnd.responders.add(u)

    def finish(self) -> AggregateResult:
        """Close stage 4: reconstruct seeds and dropped clients' round keys (each checked
        against its dealer's commitment), strip the masks, decode the sum.

        Raises only :class:`RoundAborted` (naming any client caught cheating) when the
        remaining valid shares cannot remove every mask, or when the unmasked sum does
        not decode or its total weight is not positive (a client broke its encoding);
        never returns a wrong sum. A returned result's ``total_weight`` is positive, so
        its :meth:`AggregateResult.mean` never raises.
        """
        rnd = self._round
        if rnd is None or rnd.stage != "unmask":
            raise ProtocolViolation("no round waiting for unmask replies")
        cfg = rnd.config
        t = cfg.threshold
        fed = self.federation_id
        why = self._feasible(rnd, rnd.alive, rnd.responders)
        dropped = sorted(set(rnd.sharers) - rnd.alive)
        for u in sorted(rnd.alive):
            if why is None and len(rnd.seed_points.get(u, ())) < t:
                why = f"only {len(rnd.seed_points.get(u, ()))} valid shares of node {u}'s seed"
        for v in dropped:
            if (why is None and rnd.alive & set(rnd.nbhd[v])
                    and len(rnd.key_points.get(v, ())) < t):
                why = f"only {len(rnd.key_points.get(v, ()))} valid shares of node {v}'s key"
        if why:
            raise self._abort(f"round {cfg.round} aborted at unmasking: {why}", rnd.excluded)
        seeds: dict[int, bytes] = {}
        for u in sorted(rnd.alive):
            value = shamir.reconstruct(rnd.seed_points[u], t)
            seed = value.to_bytes(32, "big") if value < 2**256 else b""
            if seed_commitment(fed, cfg.round, u, seed) != rnd.shares[u].seed_commitment:
                raise self._abort(
                    f"round {cfg.round} aborted at unmasking: node {u} dealt seed shares that "
                    "do not open its seed commitment", rnd.excluded | {u})
            seeds[u] = seed
        keys: dict[int, bytes] = {}
        for v in dropped:
            if not rnd.alive & set(rnd.nbhd[v]):
                continue
            secret = shamir.reconstruct(rnd.key_points[v], t)
            s_sk = secret.to_bytes(32, "big") if secret < 2**256 else bytes(32)
            try:
                ok = x25519_public(s_sk) == rnd.shares[v].mask_public
            except AuthenticationError:
                ok = False
            if not ok:
                raise self._abort(
                    f"round {cfg.round} aborted at unmasking: node {v} dealt key shares that "
                    "do not open its round mask key", rnd.excluded | {v})
            keys[v] = s_sk
        acc = rnd.acc
        assert acc is not None
        ks = KeystreamAccumulator(acc)
        for u, seed in seeds.items():
            ks.subtract(_self_mask_key(seed, fed, cfg.round, u))
        for v, s_sk in keys.items():
            sk = x25519_private(s_sk)
            pk_v = rnd.shares[v].mask_public
            for u in sorted(rnd.alive & set(rnd.nbhd[v])):
                pk_u = rnd.shares[u].mask_public
                key = pair_mask_key(x25519_shared(sk, pk_u), fed, cfg.round, (v, pk_v),
                                    (u, pk_u))
                if u < v:
                    ks.subtract(key)  # u added +PRG(s_uv)
                else:
                    ks.add(key)  # u subtracted it
        try:
            weighted_sum, total_weight = decode_sum(acc, cfg.ring_bits, cfg.frac_bits)
        except EncodingError as exc:  # only a client that broke its encoding gets here
            raise self._abort(f"round {cfg.round} aborted: the unmasked sum does not decode "
                              f"({exc}); a client sent a vector outside its encoding",
                              rnd.excluded) from None
        if total_weight <= 0:  # honest weights are >= 1 each: some client offset its own
            raise self._abort(f"round {cfg.round} aborted: the unmasked total weight is "
                              f"{total_weight}, not positive, so there is no average; a "
                              "client sent a vector outside its encoding", rnd.excluded)
        enc = EncodingConfig(cfg.clip, cfg.frac_bits, cfg.max_weight, cfg.ring_bits)
        self._round, self._next = self._next, None
        return AggregateResult(cfg.round, weighted_sum, total_weight, tuple(sorted(rnd.alive)),
                               tuple(dropped), enc.sum_error_bound(total_weight,
                                                                   len(rnd.alive)),
                               tuple(sorted(rnd.excluded)))

    def shares_shortfall(self) -> str | None:
        """Why the round waiting for shares cannot go on to its mask stage with the
        shares received so far (``None``: it can). Changes nothing: the server may then
        abandon the round and open a fresh one instead of letting it abort."""
        rnd = self._round
        if rnd is None or rnd.stage != "config":
            raise ProtocolViolation("no round waiting for shares")
        return _usable_sharers(rnd)[1]

    def abort_round(self, reason: str = "aborted by the operator") -> None:
        """Abandon the current round and any next round opened with it (nothing more
        is revealed)."""
        if self._round is not None or self._next is not None:
            self._abort(reason)

    @property
    def stage(self) -> str | None:
        """Current stage name, or ``None`` between rounds."""
        return None if self._round is None else self._round.stage

    @property
    def last_round(self) -> int:
        """The newest round number opened so far (-1 before the first); a new round
        must use a larger one."""
        return self._last_round

    def open_config(self) -> RoundConfig | None:
        """The config of the round in progress (e.g. one opened early by
        :meth:`start_next_round` and now current), or ``None`` between rounds."""
        return None if self._round is None else self._round.config
