"""Client and server state machines of bract's hardened secure aggregation.

Protocol: Bonawitz et al. 2017 double masking (active-security variant, with the
consistency check), on a complete graph or the SecAgg+ sparse graph of Bell et
al. 2020. Threat model: an actively malicious server (it may reorder, drop,
forge, replay and tamper with any message it relays) colluding with fewer than
``t`` clients of any neighbourhood; clients' roster keys reach them from their
operator. Guarantee: the server learns only the sum of the encoded inputs of a
set of at least ``t`` clients (the alive set every honest client signed), and
the sum of their weights.

Setup, once per federation epoch (and again only after a client's mask key may
have been reconstructed)::

    advertise   client -> server  KeyAdvertisement: X25519 keys (c: share
                                  encryption, s: masks), Ed25519-signed over
                                  (federation, node, epoch, c_pk, s_pk)

Per round, four message stages::

    1 config    server -> all     RoundConfig (participants U0, graph, threshold t,
                                  encoding, everyone's signed advertisements)
                client checks     federation, fresh round, roster membership, no
                                  duplicates, graph degree and t >= its own policy,
                                  ring headroom, every neighbour's key signature
                client -> server  ShareKeys: for each neighbour v, AES-GCM(
                                  Shamir shares of a fresh seed b_u and of s_u)
    2 mask      server -> each    MaskRequest (sharers U1 + ciphertexts for it)
                client checks     U1 consistent with the graph, |U1 & N[u]| >= t,
                                  every ciphertext authenticates (AD binds
                                  federation, round, sender, receiver, stage)
                client -> server  MaskedInput y_u = enc(x_u, w_u) + PRG(b_u)
                                  + sum_{v in U1&N(u)} +-PRG(s_uv)
    3 check     server -> U2      ConsistencyRequest (alive set U2)
                client -> server  Ed25519 signature over (federation, round,
                                  config digest, U2); a client signs one set per round
    4 unmask    server -> U3      UnmaskRequest (alive U2, dropped U1 - U2, signatures)
                client checks     U2 is the set it signed, alive & dropped disjoint,
                                  their union is U1, for every peer v it answers
                                  for: >= t valid signatures from N[v]
                client -> server  shares of b_v for alive v, of s_v for dropped v,
                                  never both for one peer

Why four and not fewer: stage 1 must finish before masking (a client may only
mask with peers whose secrets are already shared, otherwise a peer dropping
between the two would leave an unremovable mask), the alive set exists only
after stage 2, and nobody may reveal a share before a quorum has committed to
that set (stage 3). Stage 1 carries no model data, so a deployment can send it
together with the training instruction. Per-round key exchange (Bonawitz's
round 0) is not needed: s_uv comes from the epoch keys through HKDF with the
round and the pair in ``info``.

Share-stage pipelining (three message stages per round in steady state): while
round r waits for its unmask replies, the server may open round r + 1
(:meth:`ServerSession.start_next_round`) and send its ``RoundConfig`` with round
r's ``UnmaskRequest``; each client answers round r's request first (which wipes
round r's secrets) and then round r + 1's config, in the same reply. When round r
finishes, round r + 1 becomes the current round with its shares already in, so
its ``MaskRequest`` can travel with the training instruction. Nothing about a
round's checks changes: every share of round r + 1 is in before anybody masks,
each round has its own fresh seeds and polynomials and round-bound keys, and a
client holds one round at a time. What moves is *when* a client shares: before
it knows whether it will take part in round r + 1, so a client that then does not
mask (it fails, or refuses to train) is a dropout after sharing, and its mask key
is reconstructed (it re-keys before it rejoins). If round r aborts, round r + 1
is abandoned with it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import shamir
from .crypto import (
    KEY_BYTES,
    KeystreamAccumulator,
    SigningKey,
    aead_decrypt,
    aead_encrypt,
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
from .graph import GRAPH_KINDS, closed_neighbourhoods, default_degree
from .messages import (
    ConsistencyRequest,
    ConsistencySignature,
    KeyAdvertisement,
    MaskedInput,
    MaskRequest,
    Message,
    RoundConfig,
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
    "ServerSession",
    "validate_roster",
]

PROTOCOL = "bract/secagg/v1"
_MAX_NODE_ID = 2**64 - 1


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


def advertisement_statement(fed: str, node: int, epoch: int, c_pk: bytes, s_pk: bytes) -> bytes:
    """Bytes signed by a key advertisement."""
    return _info("advertise", fed, node, epoch, c_pk, s_pk)


def consistency_statement(fed: str, rnd: int, digest: bytes, alive: Sequence[int]) -> bytes:
    """Bytes signed in the consistency check: the round's config digest and alive set."""
    return _info("consistency", fed, rnd, digest, sorted(alive))


def _pair_info(purpose: str, fed: str, a: tuple[int, int], b: tuple[int, int], *rest: Any) -> bytes:
    lo, hi = sorted([a, b])
    return _info(purpose, fed, lo[0], lo[1], hi[0], hi[1], *rest)


def _share_ad(fed: str, rnd: int, sender: int, receiver: int) -> bytes:
    return _info("share-ciphertext", fed, rnd, sender, receiver, "config")


def _self_mask_key(seed: bytes, fed: str, rnd: int, node: int) -> bytes:
    return hkdf(seed, _info("self-mask", fed, rnd, node))


def _pair_mask_key(
    shared: bytes, fed: str, rnd: int, a: tuple[int, int], b: tuple[int, int]
) -> bytes:
    return hkdf(shared, _pair_info("pair-mask", fed, a, b, rnd))


def _distinct(nodes: Sequence[int], what: str) -> set[int]:
    s = set(nodes)
    if len(s) != len(nodes):
        raise ProtocolViolation(f"{what} contains duplicate node ids")
    return s


def _verify_advertisement(adv: KeyAdvertisement, roster: Mapping[int, bytes]) -> None:
    if adv.node_id not in roster:
        raise ProtocolViolation(f"node {adv.node_id} is not in the roster")
    if len(adv.cipher_public) != KEY_BYTES or len(adv.mask_public) != KEY_BYTES:
        raise AuthenticationError(f"key advertisement of node {adv.node_id}: keys must be 32 bytes")
    verify_signature(
        roster[adv.node_id],
        adv.signature,
        advertisement_statement(adv.federation_id, adv.node_id, adv.epoch, adv.cipher_public,
                                adv.mask_public),
        f"key advertisement of node {adv.node_id} (epoch {adv.epoch})",
    )


def _expect(msg: object, cls: type[Message]) -> None:
    if not isinstance(msg, cls):
        raise MalformedMessage(f"expected {cls.__name__}, got {type(msg).__name__}")


def _min_threshold(size: int, fraction: float) -> int:
    """Smallest integer t with t > fraction * size."""
    t = int(fraction * size) + 1
    while t - 1 > fraction * size:
        t -= 1
    return t


def _config_digest(cfg: RoundConfig) -> bytes:
    return sha256(cfg.to_bytes())


@dataclass(frozen=True)
class ClientPolicy:
    """What a client insists on, whatever the server says.

    min_threshold_fraction: the threshold must exceed this fraction of the
        client's closed neighbourhood (default 0.5: an honest majority is needed
        to reconstruct anything).
    min_degree: minimum neighbours on a sparse graph (``None``: the SecAgg+
        default ``2 ceil(log2 n)``, capped at ``n - 1``).
    min_participants: smallest round the client takes part in.
    clip_out_of_range: clip values beyond ``[-clip, clip]`` instead of refusing.
    """

    min_threshold_fraction: float = 0.5
    min_degree: int | None = None
    min_participants: int = 2
    clip_out_of_range: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_threshold_fraction < 1.0:
            raise ConfigurationError("min_threshold_fraction must be in [0, 1)")
        if self.min_participants < 2:
            raise ConfigurationError("min_participants must be >= 2")


@dataclass
class _EpochKeys:
    epoch: int
    cipher_private: bytes
    cipher_public: bytes
    mask_private: bytes
    mask_public: bytes
    signature: bytes


@dataclass
class _ClientRound:
    config: RoundConfig
    digest: bytes
    nbhd: dict[int, tuple[int, ...]]
    adverts: dict[int, KeyAdvertisement]
    seed: bytes
    own_seed_share: int
    own_key_share: int
    stage: str = "shared"
    sharers: tuple[int, ...] = ()
    received: dict[int, tuple[int, int]] = field(default_factory=dict)
    signed_alive: tuple[int, ...] = ()


# --------------------------------------------------------------------------- client


class ClientSession:
    """One client's side of the protocol for a whole federation (all rounds).

    Holds the long-term Ed25519 identity, the epoch X25519 keys and at most one
    round in progress. Every ``handle_*`` method validates the whole message
    before changing any state, so a refused message leaves the session as it was.

    Args:
        node_id: this client's id (an int in [0, 2^64)).
        federation_id: the federation this session belongs to.
        signing_key: the client's long-term Ed25519 key.
        roster: node id -> Ed25519 public key, from the operator (never the server).
        policy: the client's own minimums.
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
        self._keys: _EpochKeys | None = None
        self._exposed = False  # mask-key shares left us and no unmask confirmed us alive
        self._last_round = -1
        self._known_epoch: dict[int, int] = {}
        self._burned: dict[int, int] = {}  # node -> last epoch whose mask key we helped reveal
        self._round: _ClientRound | None = None
        self._pair_cache: dict[tuple[str, int, int, int], bytes] = {}
        self._key_objs: tuple[int, Any, Any] | None = None
        self._verified: set[bytes] = set()  # advertisements already verified (by signature)

    # ---- setup

    @property
    def rotation_required(self) -> bool:
        """True if the current mask key may have been reconstructed (or none exists yet)."""
        return self._keys is None or self._exposed

    def advertise_keys(self) -> KeyAdvertisement:
        """Setup stage: return the signed advertisement of this epoch's keys.

        Rotates to fresh keys (next epoch) first if :attr:`rotation_required`;
        rotating abandons any round in progress.
        """
        if self.rotation_required:
            epoch = 0 if self._keys is None else self._keys.epoch + 1
            c_sk, c_pk = x25519_generate()
            s_sk, s_pk = x25519_generate()
            sig = self._signing_key.sign(
                advertisement_statement(self.federation_id, self.node_id, epoch, c_pk, s_pk)
            )
            self._keys = _EpochKeys(epoch, c_sk, c_pk, s_sk, s_pk, sig)
            self._exposed = False
            self._round = None
            self._pair_cache.clear()
        k = self._keys
        assert k is not None
        return KeyAdvertisement(self.federation_id, self.node_id, k.epoch, k.cipher_public,
                                k.mask_public, k.signature)

    def _shared(self, kind: str, adv: KeyAdvertisement) -> bytes:
        """Per-epoch-pair X25519 secret (cached), ``kind`` is 'c' or 's'."""
        assert self._keys is not None
        key = (kind, adv.node_id, adv.epoch, self._keys.epoch)
        got = self._pair_cache.get(key)
        if got is None:
            if self._key_objs is None or self._key_objs[0] != self._keys.epoch:
                self._key_objs = (self._keys.epoch, x25519_private(self._keys.cipher_private),
                                  x25519_private(self._keys.mask_private))
            if kind == "c":
                got = x25519_shared(self._key_objs[1], adv.cipher_public)
            else:
                got = x25519_shared(self._key_objs[2], adv.mask_public)
            self._pair_cache[key] = got
        return got

    def _share_key(self, adv: KeyAdvertisement) -> bytes:
        assert self._keys is not None
        return hkdf(self._shared("c", adv), _pair_info(
            "share-key", self.federation_id, (self.node_id, self._keys.epoch),
            (adv.node_id, adv.epoch)))

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

    def handle_round_config(self, cfg: RoundConfig) -> ShareKeys:
        """Stage 1: check the round's parameters and return encrypted shares for neighbours."""
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
        mine = nbhd[self.node_id]
        for v in mine:
            size = len(nbhd[v])
            floor = _min_threshold(size, self.policy.min_threshold_fraction)
            if not floor <= cfg.threshold <= size:
                raise ThresholdPolicyError(
                    f"threshold {cfg.threshold} refused: this client requires "
                    f"{floor} <= t <= {size} for a neighbourhood of {size}"
                )
        enc = EncodingConfig(cfg.clip, cfg.frac_bits, cfg.max_weight, cfg.ring_bits)
        enc.ring_bits_for(n)  # raises EncodingError if the sum could wrap
        if cfg.dim < 1:
            raise EncodingError(f"round dimension must be >= 1, got {cfg.dim}")
        # keys: ours must be current and unexposed; neighbours' must verify and be fresh
        index = {v: i for i, v in enumerate(parts)}
        own = cfg.advertisement(index[self.node_id])
        if self.rotation_required:
            raise KeyRotationRequired(
                f"node {self.node_id} must advertise fresh keys before round {cfg.round}"
            )
        assert self._keys is not None
        if (own.epoch, own.cipher_public, own.mask_public) != (
            self._keys.epoch, self._keys.cipher_public, self._keys.mask_public
        ):
            raise AuthenticationError(
                f"round config lists keys for node {self.node_id} that are not its current keys"
            )
        adverts: dict[int, KeyAdvertisement] = {}
        verified_now: set[bytes] = set()
        for v in mine:
            if v == self.node_id:
                continue
            adv = cfg.advertisement(index[v])
            if adv.signature not in self._verified:
                _verify_advertisement(adv, self.roster)
                verified_now.add(adv.signature)
            if adv.epoch < self._known_epoch.get(v, -1):
                raise ReplayError(f"node {v}'s keys of epoch {adv.epoch} are older than known ones")
            if adv.epoch <= self._burned.get(v, -1):
                raise KeyRotationRequired(
                    f"node {v}'s mask key of epoch {adv.epoch} was reconstructed; it must rotate"
                )
            adverts[v] = adv
        # compute everything, then commit
        t = cfg.threshold
        seed = random_bytes(32)
        xs = [shamir.x_coordinate(v) for v in mine]
        seed_shares = shamir.split(int.from_bytes(seed, "big"), t, xs)
        key_shares = shamir.split(int.from_bytes(self._keys.mask_private, "big"), t, xs)
        receivers: list[int] = []
        cts: list[bytes] = []
        own_seed = own_key = 0
        for v, ys, yk in zip(mine, seed_shares, key_shares, strict=True):
            if v == self.node_id:
                own_seed, own_key = ys, yk
                continue
            pt = canonical_encode([self.federation_id, cfg.round, self.node_id, v,
                                   shamir.share_to_bytes(ys), shamir.share_to_bytes(yk)])
            ad = _share_ad(self.federation_id, cfg.round, self.node_id, v)
            receivers.append(v)
            cts.append(aead_encrypt(self._share_key(adverts[v]), pt, ad))
        self._round = _ClientRound(cfg, _config_digest(cfg), nbhd, adverts, seed, own_seed,
                                   own_key)
        self._last_round = cfg.round
        if len(self._verified) > 100_000:
            self._verified.clear()
        self._verified |= verified_now
        for v, adv in adverts.items():
            self._known_epoch[v] = adv.epoch
        self._exposed = True
        return ShareKeys(self.federation_id, cfg.round, self.node_id, receivers, cts)

    # ---- stage 2

    def handle_mask_request(self, req: MaskRequest, vector: np.ndarray, weight: int) -> MaskedInput:
        """Stage 2: decrypt the shares addressed to us, then return the masked input.

        ``vector`` (float, length ``dim``) and ``weight`` (example count) never
        leave the client except inside the masked vector.
        """
        _expect(req, MaskRequest)
        rnd = self._current(req, "shared")
        cfg = rnd.config
        if req.node_id != self.node_id:
            raise ProtocolViolation(f"mask request addressed to node {req.node_id}")
        sharers = _distinct(req.sharers, "sharer list")
        if not sharers <= set(cfg.participants):
            raise ProtocolViolation("sharer list names non-participants")
        if self.node_id not in sharers:
            raise ProtocolViolation("sharer list omits this client, which did share")
        mine = rnd.nbhd[self.node_id]
        live = [v for v in mine if v in sharers]
        if len(live) < cfg.threshold or len(sharers) < cfg.threshold:
            raise ProtocolViolation(
                f"only {len(live)} of this client's neighbourhood shared; threshold {cfg.threshold}"
            )
        expected = {v for v in live if v != self.node_id}
        senders = _distinct(req.senders, "sender list")
        if senders != expected:
            missing, extra = sorted(expected - senders), sorted(senders - expected)
            raise ProtocolViolation(f"share ciphertexts missing from {missing}, unexpected {extra}")
        received: dict[int, tuple[int, int]] = {}
        for v, ct in zip(req.senders, req.ciphertexts, strict=True):
            ad = _share_ad(self.federation_id, cfg.round, v, self.node_id)
            pt = aead_decrypt(self._share_key(rnd.adverts[v]), ct, ad,
                              f"shares from node {v} in round {cfg.round}")
            try:
                fields = canonical_decode(pt)
                ok = (isinstance(fields, list) and len(fields) == 6
                      and fields[:4] == [self.federation_id, cfg.round, v, self.node_id])
                ys, yk = shamir.bytes_to_share(fields[4]), shamir.bytes_to_share(fields[5])
            except (MalformedMessage, ProtocolViolation, IndexError, TypeError) as exc:
                raise AuthenticationError(f"shares from node {v}: malformed plaintext") from exc
            if not ok:
                raise AuthenticationError(f"shares from node {v}: header does not match")
            received[v] = (ys, yk)
        enc = EncodingConfig(cfg.clip, cfg.frac_bits, cfg.max_weight, cfg.ring_bits)
        y = encode(vector, weight, enc, cfg.ring_bits, dim=cfg.dim,
                   clip_out_of_range=self.policy.clip_out_of_range)
        acc = KeystreamAccumulator(y)
        acc.add(_self_mask_key(rnd.seed, self.federation_id, cfg.round, self.node_id))
        assert self._keys is not None
        me = (self.node_id, self._keys.epoch)
        for v in sorted(expected):
            adv = rnd.adverts[v]
            key = _pair_mask_key(self._shared("s", adv), self.federation_id, cfg.round, me,
                                 (v, adv.epoch))
            if self.node_id < v:
                acc.add(key)
            else:
                acc.subtract(key)
        rnd.received = received
        rnd.sharers = tuple(sorted(sharers))
        rnd.stage = "masked"
        return MaskedInput(self.federation_id, cfg.round, self.node_id, cfg.ring_bits,
                           y.tobytes())

    # ---- stage 3

    def handle_consistency_request(self, req: ConsistencyRequest) -> ConsistencySignature:
        """Stage 3: sign the alive set; a client signs at most one alive set per round."""
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
        alive = _distinct(req.alive, "alive set")
        if not alive <= set(rnd.sharers):
            raise ProtocolViolation("alive set names clients that never shared")
        if self.node_id not in alive:
            raise ProtocolViolation("alive set omits this client, which sent its masked input")
        if len(alive) < rnd.config.threshold:
            raise ProtocolViolation(
                f"alive set of {len(alive)} is below the threshold {rnd.config.threshold}"
            )
        stmt = consistency_statement(self.federation_id, rnd.config.round, rnd.digest, alive)
        sig = self._signing_key.sign(stmt)
        rnd.signed_alive = tuple(sorted(alive))
        rnd.stage = "signed"
        return ConsistencySignature(self.federation_id, rnd.config.round, self.node_id, sig)

    # ---- stage 4

    def handle_unmask_request(self, req: UnmaskRequest) -> UnmaskReply:
        """Stage 4: after checking the signed alive set, reveal one share per peer."""
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
        if alive | dropped != set(rnd.sharers):
            raise ProtocolViolation("alive and dropped sets do not partition the sharers")
        _distinct(req.signers, "signer list")
        mine = rnd.nbhd[self.node_id]
        peers = [v for v in mine if v == self.node_id or v in rnd.received]
        relevant = set().union(*(rnd.nbhd[v] for v in peers))
        stmt = consistency_statement(self.federation_id, cfg.round, rnd.digest, alive)
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
                    f"only {q} of node {v}'s neighbourhood signed this alive set; "
                    f"need {cfg.threshold}"
                )
        seed_owners: list[int] = []
        seed_shares: list[bytes] = []
        key_owners: list[int] = []
        key_shares: list[bytes] = []
        burned: dict[int, int] = {}
        for v in peers:
            ys, yk = ((rnd.own_seed_share, rnd.own_key_share) if v == self.node_id
                      else rnd.received[v])
            if v in alive:
                seed_owners.append(v)
                seed_shares.append(shamir.share_to_bytes(ys))
            else:  # v in dropped (the partition was checked); never both
                key_owners.append(v)
                key_shares.append(shamir.share_to_bytes(yk))
                burned[v] = rnd.adverts[v].epoch
        assert not set(seed_owners) & set(key_owners)
        self._burned.update(burned)
        self._exposed = False  # we are in the signed alive set: honest peers reveal only b_u
        self._round = None  # wipe the round's secrets
        return UnmaskReply(self.federation_id, cfg.round, self.node_id, seed_owners, seed_shares,
                           key_owners, key_shares)

    def abort_round(self) -> None:
        """Forget the round in progress (its secrets are wiped; keys rotate if exposed)."""
        self._round = None

    def handle(self, msg: Message, vector: np.ndarray | None = None, weight: int = 0) -> Message:
        """Dispatch any server message to its handler (``vector``/``weight`` for stage 2)."""
        if isinstance(msg, RoundConfig):
            return self.handle_round_config(msg)
        if isinstance(msg, MaskRequest):
            if vector is None:
                raise EncodingError("stage 2 needs the input vector")
            return self.handle_mask_request(msg, vector, weight)
        if isinstance(msg, ConsistencyRequest):
            return self.handle_consistency_request(msg)
        if isinstance(msg, UnmaskRequest):
            return self.handle_unmask_request(msg)
        raise MalformedMessage(f"a client does not handle {type(msg).__name__}")

    # ---- persistence (e.g. Flower ctx.state between ClientApp processes)

    def export_state(self) -> bytes:
        """Serialise everything but the signing key and roster. Contains secrets: store as such."""
        k = self._keys
        keys = [] if k is None else [k.epoch, k.cipher_private, k.cipher_public, k.mask_private,
                                     k.mask_public, k.signature]
        rnd: list[Any] = []
        if self._round is not None:
            r = self._round
            rnd = [r.config.to_bytes(), r.seed, shamir.share_to_bytes(r.own_seed_share),
                   shamir.share_to_bytes(r.own_key_share), r.stage, list(r.sharers),
                   sorted(r.received), [shamir.share_to_bytes(r.received[v][0])
                                        for v in sorted(r.received)],
                   [shamir.share_to_bytes(r.received[v][1]) for v in sorted(r.received)],
                   list(r.signed_alive)]
        return canonical_encode({
            "v": 1, "node": self.node_id, "fed": self.federation_id, "keys": keys,
            "exposed": int(self._exposed), "last_round": self._last_round + 1,
            "known": [[v, e] for v, e in sorted(self._known_epoch.items())],
            "burned": [[v, e] for v, e in sorted(self._burned.items())], "round": rnd,
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
            self = cls(d["node"], d["fed"], signing_key, roster, policy)
            if d["keys"]:
                self._keys = _EpochKeys(*d["keys"])
            self._exposed = bool(d["exposed"])
            self._last_round = d["last_round"] - 1
            self._known_epoch = {v: e for v, e in d["known"]}
            self._burned = {v: e for v, e in d["burned"]}
            if d["round"]:
                cfg_b, seed, os_, ok_, stage, sharers, rv, rs, rk, signed = d["round"]
                cfg = message_from_bytes(cfg_b)
                assert isinstance(cfg, RoundConfig)
                nbhd = closed_neighbourhoods(cfg.participants, cfg.graph_kind, cfg.degree,
                                             cfg.graph_seed)
                index = {v: i for i, v in enumerate(cfg.participants)}
                adverts = {v: cfg.advertisement(index[v]) for v in nbhd[self.node_id]
                           if v != self.node_id}
                r = _ClientRound(cfg, _config_digest(cfg), nbhd, adverts, seed,
                                 shamir.bytes_to_share(os_), shamir.bytes_to_share(ok_), stage,
                                 tuple(sharers))
                r.received = {v: (shamir.bytes_to_share(a), shamir.bytes_to_share(b))
                              for v, a, b in zip(rv, rs, rk, strict=True)}
                r.signed_alive = tuple(signed)
                self._round = r
        except (KeyError, TypeError, ValueError, AssertionError) as exc:
            raise MalformedMessage(f"client state is malformed: {exc}") from exc
        return self


# --------------------------------------------------------------------------- server


@dataclass(frozen=True)
class AggregateResult:
    """What the server learns: the weighted sum of the alive clients' clipped inputs and
    the total weight. ``error_bound`` bounds every coordinate of ``weighted_sum``."""

    round: int
    weighted_sum: np.ndarray
    total_weight: int
    alive: tuple[int, ...]
    dropped: tuple[int, ...]
    error_bound: float

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
    responders: set[int] = field(default_factory=set)
    sent_shares: set[int] = field(default_factory=set)
    seed_points: dict[int, list[tuple[int, int]]] = field(default_factory=dict)
    key_points: dict[int, list[tuple[int, int]]] = field(default_factory=dict)


class ServerSession:
    """The (honest) server's side: relays, checks and sums masked inputs as they arrive.

    Memory: one ``d + 1`` ring vector plus the round's small metadata; masked
    inputs are added to the running sum on arrival and not kept (O(d), not O(n d)).

    Args:
        federation_id: the federation.
        roster: node id -> Ed25519 public key (to check advertisements and signatures).
        encoding: fixed-point parameters for every round.
        graph: ``"complete"`` or ``"harary"`` (SecAgg+ sparse graph).
        degree: Harary degree (default :func:`default_degree` of the round size).
        threshold_fraction: t is the smallest integer above this fraction of a
            closed neighbourhood (clients refuse anything below their own policy).
    """

    def __init__(
        self,
        federation_id: str,
        roster: Mapping[int, bytes],
        *,
        encoding: EncodingConfig | None = None,
        graph: str = "complete",
        degree: int | None = None,
        threshold_fraction: float = 0.5,
    ) -> None:
        if graph not in GRAPH_KINDS:
            raise ConfigurationError(f"graph must be one of {GRAPH_KINDS}, got {graph!r}")
        if not 0.0 <= threshold_fraction < 1.0:
            raise ConfigurationError("threshold_fraction must be in [0, 1)")
        self.federation_id = federation_id
        self.roster = validate_roster(roster)
        self.encoding = encoding or EncodingConfig()
        self.graph = graph
        self.degree = degree
        self.threshold_fraction = threshold_fraction
        self._adverts: dict[int, KeyAdvertisement] = {}
        self._burned: dict[int, int] = {}
        self._stale: set[int] = set()  # keys possibly exposed: ask for a new advertisement
        self._last_round = -1
        self._round: _ServerRound | None = None
        self._next: _ServerRound | None = None  # opened by start_next_round

    # ---- setup

    def receive_advertisement(self, adv: KeyAdvertisement) -> None:
        """Store a client's signed keys (verified against the roster)."""
        _expect(adv, KeyAdvertisement)
        if adv.federation_id != self.federation_id:
            raise ReplayError(f"advertisement for federation {adv.federation_id!r}")
        _verify_advertisement(adv, self.roster)
        if adv.epoch <= self._burned.get(adv.node_id, -1):
            raise KeyRotationRequired(
                f"node {adv.node_id} re-advertised epoch {adv.epoch}, whose mask key was "
                "reconstructed; it must rotate to a newer epoch"
            )
        old = self._adverts.get(adv.node_id)
        if old is not None and adv.epoch < old.epoch:
            raise ReplayError(f"node {adv.node_id}: epoch {adv.epoch} older than {old.epoch}")
        self._adverts[adv.node_id] = adv
        self._stale.discard(adv.node_id)

    def needs_advertisement(self, participants: Iterable[int]) -> list[int]:
        """Participants that must (re-)advertise keys before the next round."""
        return sorted(v for v in participants if v not in self._adverts or v in self._stale
                      or self._adverts[v].epoch <= self._burned.get(v, -1))

    # ---- stage 1

    def start_round(self, round_number: int, participants: Sequence[int], dim: int) -> RoundConfig:
        """Open a round; returns the one :class:`RoundConfig` every participant gets.

        A round still open (e.g. one opened by :meth:`start_next_round` and not
        wanted any more) is abandoned first: its sharers must re-key, so a new round
        that lists them is refused until they have advertised fresh keys.
        """
        self.abort_round("superseded by a new round")
        self._check_new_round(round_number, participants, dim)
        cfg, self._round = self._new_round(round_number, participants, dim)
        return cfg

    def start_next_round(
        self, round_number: int, participants: Sequence[int], dim: int
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
        cfg, self._next = self._new_round(round_number, participants, dim)
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
        if len(parts) < 2:
            raise ConfigurationError("a round needs at least 2 participants")
        stale = self.needs_advertisement(parts)
        if stale:
            raise KeyRotationRequired(f"nodes {stale} must advertise (fresh) keys first")
        if not isinstance(dim, int) or dim < 1:
            raise EncodingError(f"dim must be a positive int, got {dim!r}")

    def _new_round(
        self, round_number: int, participants: Sequence[int], dim: int
    ) -> tuple[RoundConfig, _ServerRound]:
        parts = sorted(participants)
        n = len(parts)
        ring_bits = self.encoding.ring_bits_for(n)
        degree = self.degree if self.degree is not None else default_degree(n)
        seed = random_bytes(16)
        nbhd = closed_neighbourhoods(parts, self.graph, degree, seed)
        size = len(nbhd[parts[0]])
        t = _min_threshold(size, self.threshold_fraction)
        ads = [self._adverts[v] for v in parts]
        cfg = RoundConfig(
            self.federation_id, round_number, parts, t, self.graph,
            degree if self.graph == "harary" else n - 1, seed, dim,
            float(self.encoding.clip), self.encoding.frac_bits, self.encoding.max_weight,
            ring_bits, [a.epoch for a in ads], [a.cipher_public for a in ads],
            [a.mask_public for a in ads], [a.signature for a in ads],
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

    def _abort(self, why: str) -> RoundAborted:
        # The next round (if open) goes too: its shares were made for a federation
        # state that no longer holds, and its sharers count as exposed.
        for rnd in (self._round, self._next):
            if rnd is not None:
                self._stale.update(rnd.sent_shares | set(rnd.shares))
        self._round = self._next = None
        return RoundAborted(why)

    def receive_shares(self, msg: ShareKeys) -> None:
        """Stage 1 reply: one ciphertext per neighbour, stored for forwarding (for the
        current round, or for the next one opened by :meth:`start_next_round`)."""
        _expect(msg, ShareKeys)
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
        expected = set(rnd.nbhd[u]) - {u}
        if len(set(msg.receivers)) != len(msg.receivers) or set(msg.receivers) != expected:
            raise ProtocolViolation(f"node {u}'s shares are not addressed to its neighbours")
        rnd.shares[u] = msg

    def _feasible(self, rnd: _ServerRound, alive: set[int], holders: set[int]) -> str | None:
        t = rnd.config.threshold
        if len(alive) < t:
            return f"{len(alive)} alive clients < threshold {t}"
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
        t = rnd.config.threshold
        u1 = set(rnd.shares)
        changed = True
        while changed:  # drop sharers whose neighbourhood cannot reach t
            changed = False
            for u in sorted(u1):
                if len(u1 & set(rnd.nbhd[u])) < t:
                    u1.discard(u)
                    changed = True
        if len(u1) < t:
            raise self._abort(f"round {rnd.config.round}: {len(u1)} clients shared keys, "
                              f"threshold {t}")
        rnd.sharers = tuple(sorted(u1))
        rnd.sent_shares = set(rnd.shares)
        inbox: dict[int, tuple[list[int], list[bytes]]] = {u: ([], []) for u in u1}
        for v in rnd.sharers:
            for r, ct in zip(rnd.shares[v].receivers, rnd.shares[v].ciphertexts, strict=True):
                if r in u1:
                    inbox[r][0].append(v)
                    inbox[r][1].append(ct)
        rnd.shares = {}
        rnd.stage = "mask"
        dtype = RING_DTYPES[rnd.config.ring_bits]
        rnd.acc = np.zeros(rnd.config.dim + 1, dtype=dtype)
        f, r = self.federation_id, rnd.config.round
        return {u: MaskRequest(f, r, u, list(rnd.sharers), s, c) for u, (s, c) in inbox.items()}

    def receive_masked_input(self, msg: MaskedInput) -> None:
        """Stage 2 reply: add ``y_u`` to the running sum at once (nothing per client is kept)."""
        _expect(msg, MaskedInput)
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
        np.add(rnd.acc, np.frombuffer(msg.data, dtype=rnd.acc.dtype), out=rnd.acc)
        rnd.alive.add(u)

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
        return ConsistencyRequest(self.federation_id, rnd.config.round, sorted(rnd.alive))

    def receive_consistency_signature(self, msg: ConsistencySignature) -> None:
        """Stage 3 reply: verify and keep an alive client's signature over U2."""
        _expect(msg, ConsistencySignature)
        rnd = self._current(msg, "consistency")
        u = msg.node_id
        if u not in rnd.alive:
            raise ProtocolViolation(f"signature from node {u}, which is not alive")
        if u in rnd.signatures:
            raise ProtocolViolation(f"node {u} already signed")
        stmt = consistency_statement(self.federation_id, rnd.config.round, rnd.digest, rnd.alive)
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

    def receive_unmask_reply(self, msg: UnmaskReply) -> None:
        """Stage 4 reply: collect shares (seed shares for alive owners, key shares for dropped)."""
        _expect(msg, UnmaskReply)
        rnd = self._current(msg, "unmask")
        u = msg.node_id
        if u not in rnd.signatures:
            raise ProtocolViolation(f"unmask reply from node {u}, which did not sign")
        if u in rnd.responders:
            raise ProtocolViolation(f"node {u} already answered")
        nb = set(rnd.nbhd[u])
        dropped = set(rnd.sharers) - rnd.alive
        so, ko = set(msg.seed_owners), set(msg.key_owners)
        if len(so) != len(msg.seed_owners) or len(ko) != len(msg.key_owners):
            raise ProtocolViolation(f"node {u}: duplicate owners in unmask reply")
        if not so <= rnd.alive & nb or not ko <= dropped & nb or so & ko:
            raise ProtocolViolation(f"node {u}: unmask reply reveals shares it must not")
        x = shamir.x_coordinate(u)
        seeds = [(v, shamir.bytes_to_share(b)) for v, b in zip(msg.seed_owners, msg.seed_shares,
                                                              strict=True)]
        keys = [(v, shamir.bytes_to_share(b)) for v, b in zip(msg.key_owners, msg.key_shares,
                                                             strict=True)]
        for v, y in seeds:
            rnd.seed_points.setdefault(v, []).append((x, y))
        for v, y in keys:
            rnd.key_points.setdefault(v, []).append((x, y))
        rnd.responders.add(u)

    def finish(self) -> AggregateResult:
        """Close stage 4: reconstruct seeds and dropped keys, strip masks, decode the sum."""
        rnd = self._round
        if rnd is None or rnd.stage != "unmask":
            raise ProtocolViolation("no round waiting for unmask replies")
        cfg = rnd.config
        t = cfg.threshold
        why = self._feasible(rnd, rnd.alive, rnd.responders)
        dropped = sorted(set(rnd.sharers) - rnd.alive)
        for u in sorted(rnd.alive):
            if why is None and len(rnd.seed_points.get(u, ())) < t:
                why = f"only {len(rnd.seed_points.get(u, ()))} shares of node {u}'s seed arrived"
        for v in dropped:
            if (why is None and rnd.alive & set(rnd.nbhd[v])
                    and len(rnd.key_points.get(v, ())) < t):
                why = f"only {len(rnd.key_points.get(v, ()))} shares of node {v}'s key arrived"
        if why:
            raise self._abort(f"round {cfg.round} aborted at unmasking: {why}")
        acc = rnd.acc
        assert acc is not None
        ks = KeystreamAccumulator(acc)
        for u in sorted(rnd.alive):
            value = shamir.reconstruct(rnd.seed_points[u], t)
            if value >= 2**256:
                raise AuthenticationError(f"reconstructed seed of node {u} is not 32 bytes")
            seed = value.to_bytes(32, "big")
            ks.subtract(_self_mask_key(seed, self.federation_id, cfg.round, u))
        for v in dropped:
            partners = sorted(rnd.alive & set(rnd.nbhd[v]))
            if not partners:
                continue
            secret = shamir.reconstruct(rnd.key_points[v], t)
            if secret >= 2**256:
                raise AuthenticationError(f"reconstructed mask key of node {v} is not 32 bytes")
            s_sk = secret.to_bytes(32, "big")
            adv_v = self._adverts[v]
            if x25519_public(s_sk) != adv_v.mask_public:
                raise AuthenticationError(
                    f"reconstructed mask key of node {v} does not match its advertised key"
                )
            self._burned[v] = adv_v.epoch
            for u in partners:
                adv_u = self._adverts[u]
                shared = x25519_shared(s_sk, adv_u.mask_public)
                key = _pair_mask_key(shared, self.federation_id, cfg.round, (v, adv_v.epoch),
                                     (u, adv_u.epoch))
                if u < v:
                    ks.subtract(key)  # u added +PRG(s_uv)
                else:
                    ks.add(key)  # u subtracted it
        weighted_sum, total_weight = decode_sum(acc, cfg.ring_bits, cfg.frac_bits)
        enc = EncodingConfig(cfg.clip, cfg.frac_bits, cfg.max_weight, cfg.ring_bits)
        self._stale.update(set(rnd.sharers) - rnd.responders)
        self._round, self._next = self._next, None
        if self._round is not None and self.needs_advertisement(self._round.shares):
            self.abort_round("a sharer of the next round must re-key")
        return AggregateResult(cfg.round, weighted_sum, total_weight, tuple(sorted(rnd.alive)),
                               tuple(dropped), enc.sum_error_bound(total_weight))

    def abort_round(self, reason: str = "aborted by the operator") -> None:
        """Abandon the current round and any next round opened with it (nothing more
        is revealed; their sharers must re-key)."""
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
