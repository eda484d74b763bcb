"""Audit of secure aggregation: does the server's view hide every client's update?

The audit records everything the server of :mod:`bract.secagg` receives (and
the requests it sends), in order, round by round, and then plays the *curious
server* that keeps everything: it accumulates every share it received in every
round, reconstructs every secret those shares allow, removes every mask the
secrets let it remove, and checks what is left.

``knowledge-across-rounds`` (the decisive check, algebraic, over all recorded rounds)
    From every round's unmask replies the server reconstructs each secret the
    shares determine: self-mask seeds and X25519 mask private keys. A share is a
    valid point when it opens its dealer's signed share commitment with the salt
    the reply carries (the server's own check); ``t`` valid points reveal the
    secret, whatever else the replies hold. A share that does not open its
    commitment, or is no field element, is named in the round's detail (its sender
    sent a wrong share: the server excludes it, threat model T31) and is never
    interpolated blindly; it still counts when, with the valid points, it
    interpolates to the very secret the dealer committed to (the seed commitment,
    the round mask public key), as a curious server can check. The recording logs a
    message before the server checks it, so a node may have several share messages
    in a round (its own and a forged or refused one): its shares are counted against
    each of them, a secret is known when it opens the commitment or key of any of
    them, and a pair mask is removable when any of its ends' keys is known. An extra
    message can thus only add to what the server is taken to know (a possible false
    EXPOSED, which an officer sees), never hide an isolable sum; each such node is
    named. Given the federation's roster, only share messages whose signature
    verifies count, as on the server. A mask
    key reconstructed in any round removes, in *every* round, each pair mask made
    with it. Then, per round, a masked input helps the server only if its self
    mask is removable; pair masks that no known key removes cancel only between
    two such inputs. A client's pair masks are those with the neighbours in the
    sharer list of *its own* mask request (a dishonest server may send clients
    different lists), so the mask of ``{u, v}`` cancels only when each of the two
    listed the other; one only ``u`` applied masks ``u``'s input for good. The sums
    the server can isolate are therefore the sums over the connected components
    (by unremovable pair masks both ends applied) of the inputs with a known seed
    that hold no unremovable mask without its partner among them. The check fails
    if any such component holds fewer than ``h`` clients (``min_honest`` of the
    round's config; 2 for views of protocol v1, which had no such field): that
    client's (or those few clients') update, weight included, is recoverable.
``masked-inputs-uniform``
    Each masked input ``y_u`` (all ``d + 1`` ring elements) passes
    :func:`~bract.audit.uniformity.uniformity_test`.
``survivors-hidden``
    For each survivor ``u`` the server reconstructs ``u``'s self-mask seed and
    every dropped neighbour's round mask key, and subtracts the self mask and the
    pair masks with dropped clients. The remainder ``enc(x_u) + sum of pair masks
    with other survivors`` must still be uniform and (when the true inputs are
    known) independent of ``x_u`` (:func:`~bract.audit.uniformity.independence_test`).
``dropped-late-hidden``
    A dropped client's masked input may still reach the server late. The server
    then knows *all* of that client's pair masks (it reconstructed its round mask
    key), so only the self mask protects it; the audit asks the dropped client for
    the masked input it would have sent, removes all its pair masks, and tests the
    remainder as above (Bonawitz et al.'s reason for double masking).
``aggregate-exact``
    The non-vacuity check: the survivors' remainders sum (in the ring) to exactly
    the server's aggregate -- so the audit removed the very masks the server
    removes and tested the real remainders -- and the aggregate equals the
    weighted sum of the survivors' true inputs within the encoding's error bound.

Significance of the statistical checks: each vector's test has family-wise
false-alarm probability ``alpha`` (default 1e-6), so a correct protocol fails an
audit of a few hundred vectors with probability below 1e-3.

Every round lists every check with its status: ``pass``, ``FAIL``, ``skipped``
(there was something to check and the audit did not: the reason says why) or
``n/a`` (nothing there to check: no mask was removable, no aggregate exists).
The verdict is ``pass`` only when no check failed and none was skipped;
``INCOMPLETE`` (exit 1, never read as a pass) when none failed but some were
skipped; ``FAIL`` when one failed. Skipped:

* every per-round check of a view recorded with protocol v1 (one mask key per
  key epoch; commit 72e210b and before): for them only ``knowledge-across-rounds``
  runs, the check that fails on them when a client dropped after sharing in a
  later round of the same key epoch;
* ``survivors-hidden``, ``dropped-late-hidden`` and ``aggregate-exact`` of a round
  in which a node has several share messages counted (without a roster, or with
  several that verify): which round key the server used is not determined, so the
  masks it removed are not either; ``knowledge-across-rounds`` still runs;
* ``survivors-hidden``, ``dropped-late-hidden`` and ``aggregate-exact`` of a round
  the server unmasked more than once (several unmask requests: a server that
  showed clients different alive sets). They remove the masks one unmasking
  reveals; the secrets all the replies reveal together are counted by
  ``knowledge-across-rounds``, which still runs;
* the checks of a view without its one round configuration (none or several: the
  ring and the threshold are unknown, so its shares cannot be read);
* ``knowledge-across-rounds`` of *every* round that would pass while some round's
  shares cannot be read (or a secret has more than :data:`SEARCH_LIMIT` share
  combinations to try): a key those shares hold would apply to it. A round that
  fails still fails.

No check run at all is no pass either (``INCOMPLETE``). A view whose content
contradicts itself (an alive node without its masked input or its share message,
a completed round whose valid shares do not reveal a survivor's seed) is refused
with one line naming what is wrong (``bract audit secagg`` exits 2).

A round that aborted is checked for what it holds: its masked inputs, and, when
unmask replies reached the server, each survivor whose seed they reveal and each
dropped client whose key they reveal (there is no aggregate to compare with:
``aggregate-exact`` is ``n/a``).

What the audit cannot show: that masks are *unpredictable* (an AES keystream
under a key the server knows passes every statistical test; that rests on the
key agreement and secret sharing, covered by the protocol's own tests), nor
anything about a malicious server that deviates from the protocol or colludes
with clients (``tests/secagg/test_malicious_server.py`` covers that). It also
leaves aside what a sum itself reveals: DP noise, not secure aggregation,
protects against that.

Pure: imports neither flwr nor torch.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from bract.audit.uniformity import DEFAULT_ALPHA, independence_test, uniformity_test
from bract.secagg import shamir
from bract.secagg.crypto import (
    SigningKey,
    keystream,
    x25519_public,
    x25519_shared,
)
from bract.secagg.driver import SHARED_INPUT_DIGEST, STAGES, run_round
from bract.secagg.encoding import RING_DTYPES, EncodingConfig, decode_sum
from bract.secagg.errors import (
    AuthenticationError,
    EncodingError,
    ProtocolViolation,
    RoundAborted,
    SecAggError,
)
from bract.secagg.graph import GRAPH_KINDS, closed_neighbourhoods
from bract.secagg.messages import (
    MaskedInput,
    MaskRequest,
    Message,
    RoundConfig,
    ShareKeys,
    UnmaskRequest,
)
from bract.secagg.protocol import (
    AggregateResult,
    ClientPolicy,
    ClientSession,
    _config_digest,
    _self_mask_key,
    _verify_shares_signature,
    pair_mask_key,
    seed_commitment,
    share_commitment,
)
from bract.secagg.recording import (
    LegacyMessage,
    RecordingServerSession,
    ServerView,
    own_sharer_lists,
    write_view,
)

CHECKS = ("knowledge-across-rounds", "masked-inputs-uniform", "survivors-hidden",
          "dropped-late-hidden", "aggregate-exact")
ROUND_CHECKS = CHECKS[1:]
#: The check a view fails when its rounds do not run 1, 2, ..., N, each once (only
#: listed when it fails).
ROUNDS_RECORDED = "rounds-recorded"


@dataclass(frozen=True)
class SecAggAuditConfig:
    """Rounds to run and record: ``clients`` per round, ``dropouts`` of them at ``drop_stage``.

    Inputs are seeded test data (uniform in ``[-clip, clip]``, random weights); the
    masks come from the protocol's CSPRNG, never from ``seed``.
    """

    clients: int = 8
    dim: int = 20_000
    dropouts: int = 2
    graph: str = "complete"
    rounds: int = 1
    drop_stage: str = "mask"
    clip: float = 1.0
    frac_bits: int = 16
    max_weight: int = 1000
    alpha: float = DEFAULT_ALPHA
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.clients, int) or self.clients < 3:
            raise ValueError(f"clients must be an integer >= 3 (got {self.clients!r}).")
        if not isinstance(self.dim, int) or self.dim < 100:
            raise ValueError(f"dim must be an integer >= 100 (got {self.dim!r}); the "
                             "statistical tests need long vectors.")
        if not isinstance(self.rounds, int) or self.rounds < 1:
            raise ValueError(f"rounds must be an integer >= 1 (got {self.rounds!r}).")
        if self.graph not in GRAPH_KINDS:
            raise ValueError(f"graph must be one of {GRAPH_KINDS} (got {self.graph!r}).")
        if self.drop_stage not in STAGES:
            raise ValueError(f"drop_stage must be one of {STAGES} (got {self.drop_stage!r}).")
        from bract.secagg.protocol import default_colluders, required_threshold

        t = required_threshold(self.clients, default_colluders(self.clients))
        most = self.clients - t
        if not isinstance(self.dropouts, int) or not 0 <= self.dropouts <= most:
            raise ValueError(
                f"dropouts must be between 0 and {most} for {self.clients} clients (got "
                f"{self.dropouts!r}): a round needs t = {t} of them to survive (t > (n + c)/2 "
                f"with c = {default_colluders(self.clients)} tolerated colluders)."
            )
        if not 0.0 < self.alpha < 1.0:
            raise ValueError(f"alpha must lie in (0, 1) (got {self.alpha!r}).")

    def encoding(self) -> EncodingConfig:
        """The fixed-point encoding of the recorded rounds."""
        return EncodingConfig(clip=self.clip, frac_bits=self.frac_bits,
                              max_weight=self.max_weight)


def record_rounds(config: SecAggAuditConfig) -> list[ServerView]:
    """Run ``config.rounds`` real protocol rounds in process and record the server's views.

    Dropped clients are chosen per round by ``config.seed`` (not secret). For
    each client that dropped before sending its masked input, the audit
    afterwards hands it the mask request the server sent and records its reply
    as a ``"late"`` message.
    """
    rng = np.random.default_rng(config.seed)  # test data and dropout choice only
    fed = "bract-audit-secagg"
    keys = {i: SigningKey.generate() for i in range(config.clients)}
    roster = {i: k.public_bytes() for i, k in keys.items()}
    colluders = 1 if config.graph == "harary" else None  # a sparse graph needs a small c
    server = RecordingServerSession(fed, roster, encoding=config.encoding(), graph=config.graph,
                                    colluders=colluders)
    policy = ClientPolicy(colluders=colluders)
    clients = {i: ClientSession(i, fed, keys[i], roster, policy) for i in range(config.clients)}
    views = []
    for rnd in range(1, config.rounds + 1):
        inputs = {
            i: (rng.uniform(-config.clip, config.clip, config.dim).astype(np.float32),
                int(rng.integers(1, config.max_weight + 1)))
            for i in range(config.clients)
        }
        drops = sorted(int(v) for v in rng.choice(config.clients, config.dropouts,
                                                  replace=False))
        start = len(server.log)
        try:
            result = run_round(server, clients, inputs, rnd,
                               dropouts=dict.fromkeys(drops, config.drop_stage))
        except RoundAborted as exc:
            raise ValueError(
                f"round {rnd} aborted with {config.dropouts} dropouts on a {config.graph} graph "
                f"({exc}); use fewer dropouts or the complete graph."
            ) from exc
        log = list(server.log[start:])
        requests = {m.node_id: m for d, m in log if d == "out" and isinstance(m, MaskRequest)}
        for v in result.dropped:
            if v in requests:
                vec, w = inputs[v]
                log.append(("late", clients[v].handle_mask_request(
                    requests[v], vec, w, input_digest=SHARED_INPUT_DIGEST)))
                clients[v].abort_round()
        views.append(_view_from(rnd, log, result, inputs))
    return views


def _view_from(rnd: int, log: list[tuple[str, Message]], result: AggregateResult,
               inputs: Mapping[int, tuple[np.ndarray, int]]) -> ServerView:
    return ServerView(rnd, log, np.asarray(result.weighted_sum, dtype=np.float64),
                      int(result.total_weight), dict(inputs))


# ----------------------------------------------------------------------- the checks


PASSED, FAILED, SKIPPED, NOT_APPLICABLE = "pass", "FAIL", "skipped", "n/a"
STATUSES = (PASSED, FAILED, SKIPPED, NOT_APPLICABLE)


@dataclass(frozen=True)
class CheckResult:
    """One check of one round: its status, a plain-language detail, and statistics.

    ``status`` is ``pass`` or ``FAIL`` for a check that ran (``passed`` says which),
    ``skipped`` for one the audit could not run on this round although there was
    something to check (``passed`` is false: nothing was shown; ``detail`` says
    why), ``n/a`` for one with nothing to check (``passed`` is true)."""

    round: int
    name: str
    passed: bool
    detail: str
    statistics: list[dict[str, Any]] = field(default_factory=list)
    status: str = ""

    def __post_init__(self) -> None:
        status = self.status or (PASSED if self.passed else FAILED)
        if status not in STATUSES:
            raise ValueError(f"a check's status is one of {STATUSES} (got {status!r})")
        if self.passed != (status in (PASSED, NOT_APPLICABLE)):
            raise ValueError(f"a {status} check cannot have passed={self.passed}")
        object.__setattr__(self, "status", status)

    @classmethod
    def skipped(cls, rnd: int, name: str, why: str) -> CheckResult:
        """``name`` not run on round ``rnd``, for the reason ``why``."""
        return cls(rnd, name, False, f"NOT RUN: {why}", status=SKIPPED)

    @classmethod
    def not_applicable(cls, rnd: int, name: str, why: str) -> CheckResult:
        """``name`` has nothing to check in round ``rnd``: ``why``."""
        return cls(rnd, name, True, f"nothing to check: {why}", status=NOT_APPLICABLE)

    def to_plain(self) -> dict[str, Any]:
        """Plain JSON-able dict."""
        return {"round": self.round, "name": self.name, "status": self.status,
                "passed": self.passed, "detail": self.detail, "statistics": self.statistics}


def _ring(msg: MaskedInput, cfg: RoundConfig) -> np.ndarray:
    dtype = RING_DTYPES[cfg.ring_bits]
    data = np.frombuffer(msg.data, dtype=dtype)
    if data.size != cfg.dim + 1:
        raise ValueError(f"masked input of node {msg.node_id} has {data.size} ring elements; "
                         f"the round's config says {cfg.dim + 1}.")
    return data.copy()


def _stream(key: bytes, cfg: RoundConfig) -> np.ndarray:
    dtype = RING_DTYPES[cfg.ring_bits]
    nbytes = (cfg.dim + 1) * np.dtype(dtype).itemsize
    return np.frombuffer(keystream(key, nbytes), dtype=dtype)


#: The most candidate share combinations the audit tries for one secret (see
#: :func:`_solve`); a secret needing more is reported undecided, never taken as hidden.
SEARCH_LIMIT = 4096


@dataclass(frozen=True)
class WrongShare:
    """A share in an unmask reply that the audit did not count as a valid point: it
    does not open its dealer's signed commitment, is not a field element, or names a
    dealer or holder the round does not have. The server excludes a hospital that
    sends one (threat model T31); the audit names it, and uses the reply's valid
    shares as a curious server would."""

    round: int
    sender: int
    owner: int
    kind: str  # "seed" or "key"
    why: str

    def describe(self) -> str:
        """One line: who sent which wrong share, and why it is wrong."""
        if self.owner < 0:  # the reply's lists do not even pair shares with dealers
            return f"round {self.round}: node {self.sender} sent {self.kind} shares: {self.why}"
        return (f"round {self.round}: node {self.sender} sent a {self.kind} share of node "
                f"{self.owner} that {self.why}")

    def to_plain(self) -> dict[str, Any]:
        """Plain JSON-able dict."""
        return {"round": self.round, "sender": self.sender, "owner": self.owner,
                "kind": self.kind, "why": self.why}


@dataclass
class _ServerSecrets:
    """What the server can reconstruct from one round's unmask replies.

    ``self_keys``/``seeds`` and ``mask_private`` hold exactly the secrets whose
    reconstruction opens their dealer's public commitment (the seed commitment, the
    round mask public key): each from ``t`` points that open their signed share
    commitments, or, failing those, from a combination that adds shares whose
    commitment did not open and still yields the committed secret (a curious server
    can try that too)."""

    seeds: dict[int, int]  # node -> its reconstructed self-mask seed (a field element)
    self_keys: dict[int, bytes]  # node -> its self-mask key (current protocol only)
    mask_private: dict[int, bytes]  # node -> its round's X25519 mask private key
    wrong: list[WrongShare] = field(default_factory=list)
    #: Secrets with too many candidate share combinations to try (:data:`SEARCH_LIMIT`).
    undecided: list[str] = field(default_factory=list)
    #: Every mask private key revealed (a node with several share messages may have
    #: several; ``mask_private`` holds one of them).
    revealed: list[bytes] = field(default_factory=list)


class _UndecidedError(Exception):
    """More than :data:`SEARCH_LIMIT` candidate combinations for one secret."""


def _solve(valid: Sequence[tuple[int, int]], other: Sequence[tuple[int, int]], t: int,
           opens: Any) -> int | None:
    """The secret the points reveal, or None: the interpolation of ``t`` of the
    ``valid`` points (each opened its signed share commitment) when there are ``t``
    and it ``opens`` the dealer's commitment; else the first combination of all the
    valid points and ``other`` ones (well-formed shares whose commitment did not open)
    that interpolates to a value that ``opens`` it. Raises :class:`_UndecidedError` when that
    takes more than :data:`SEARCH_LIMIT` combinations."""
    valid = sorted(set(valid))
    if len(valid) >= t:
        value = shamir.reconstruct(valid, t)
        return value if opens(value) else None
    have = {x for x, _ in valid}
    cands = sorted({p for p in other if p[0] not in have})
    need = t - len(valid)
    if len({x for x, _ in cands}) < need:
        return None
    if math.comb(len(cands), need) > SEARCH_LIMIT:
        raise _UndecidedError
    for combo in itertools.combinations(cands, need):
        if len({x for x, _ in combo}) < need:
            continue
        value = shamir.reconstruct([*valid, *combo], t)
        if opens(value):
            return value
    return None


def _as_secret(value: int) -> bytes | None:
    """``value`` as the 32 bytes of a seed or X25519 private key; None when it is wider."""
    return value.to_bytes(32, "big") if 0 <= value < 2**256 else None


def _key_opens(publics: Collection[bytes]) -> Any:
    """A test of whether a value is the private key of any of ``publics``."""
    def opens(value: int) -> bool:
        secret = _as_secret(value)
        if secret is None or not publics:
            return False
        try:
            return x25519_public(secret) in publics
        except AuthenticationError:  # a low-order or otherwise refused private key
            return False
    return opens


def _secrets(replies: Sequence[Any], label: int, t: int, fed: str, rnd: int,
             dealers: Mapping[int, Sequence[ShareKeys]] | None,
             publics: Mapping[int, Collection[bytes]]) -> _ServerSecrets:
    """Every secret the unmask ``replies`` of one round reveal, and every share the
    audit could not use (:class:`WrongShare`).

    ``dealers`` (the round's share messages, current protocol; a node may have
    several, its own and forged or refused ones the recording kept): a share counts
    as a valid point of a dealing only if it opens that share message's signed share
    commitment with the salt the reply carries, the check
    :meth:`~bract.secagg.protocol.ServerSession.receive_unmask_reply` makes. Each of a
    node's share messages is tried in turn with its own valid points, and a secret is
    known when one of them yields a value that opens the seed commitment (mask public
    key) of *any* of the node's share messages. Guarantee: a secret the shares reveal
    with the node's real share message among ``dealers`` is counted whatever else
    ``dealers`` holds; a wrong extra message can only add secrets, never hide one.
    ``None`` (protocol v1, which committed to no share): every well-formed
    share is a candidate, a mask key is known when candidates reconstruct a key
    ``publics`` lists, a seed when ``t`` of them exist. Never raises on the replies'
    content."""
    points: dict[tuple[str, int], set[tuple[int, int]]] = {}  # every usable point
    # (kind, node, index of the node's share message) -> the points that open it
    valid: dict[tuple[str, int, int], set[tuple[int, int]]] = {}
    wrong: list[WrongShare] = []
    for reply in replies:
        get = reply.fields.get if isinstance(reply, LegacyMessage) else reply.__dict__.get
        sender = get("node_id")
        if not isinstance(sender, int) or isinstance(sender, bool) or sender < 0:
            continue  # no evaluation point: nothing in it can be a share
        x = shamir.x_coordinate(sender)
        for kind in ("seed", "key"):
            owners, shares = get(f"{kind}_owners") or [], get(f"{kind}_shares") or []
            salts = get(f"{kind}_salts") if dealers is not None else [None] * len(owners)
            salts = salts or []
            if not len(owners) == len(shares) == len(salts):
                wrong.append(WrongShare(label, sender, -1, kind,
                                        "their lists of owners, shares and salts differ in "
                                        "length, so none is used"))
                continue
            for v, raw, salt in zip(owners, shares, salts, strict=True):
                if not isinstance(v, int) or v < 0:
                    continue
                try:
                    y = shamir.bytes_to_share(raw)
                except ProtocolViolation as exc:
                    wrong.append(WrongShare(label, sender, v, kind, f"is malformed ({exc})"))
                    continue
                if dealers is None:
                    points.setdefault((kind, v), set()).add((x, y))
                    continue
                deals = dealers.get(v, ())
                if not deals:
                    wrong.append(WrongShare(label, sender, v, kind,
                                            f"did not deal shares in round {rnd}"))
                    continue
                dealt = [i for i, d in enumerate(deals) if sender in d.holders]
                if not dealt:
                    wrong.append(WrongShare(label, sender, v, kind,
                                            f"node {v} never dealt to node {sender}"))
                    continue
                points.setdefault((kind, v), set()).add((x, y))
                opened = [i for i in dealt if isinstance(salt, bytes) and share_commitment(
                    fed, rnd, v, sender, kind, raw, salt) == deals[i].commitments(
                        deals[i].holders.index(sender))[0 if kind == "seed" else 1]]
                for i in opened:
                    valid.setdefault((kind, v, i), set()).add((x, y))
                if not opened:
                    whose = (f"node {v}'s signed commitment" if len(deals) == 1 else
                             f"the signed commitment of any of node {v}'s {len(deals)} "
                             "share messages")
                    wrong.append(WrongShare(label, sender, v, kind, f"does not open {whose}"))

    def seed_opens(v: int) -> Any:
        if dealers is None:
            return lambda value: _as_secret(value) is not None
        commits = {d.seed_commitment for d in dealers.get(v, ())}

        def opens(value: int) -> bool:
            secret = _as_secret(value)
            return secret is not None and seed_commitment(fed, rnd, v, secret) in commits
        return opens

    seeds: dict[int, int] = {}
    self_keys: dict[int, bytes] = {}
    keys: dict[int, bytes] = {}
    revealed: list[bytes] = []
    undecided: list[str] = []
    for kind, v in sorted(points):
        opens = seed_opens(v) if kind == "seed" else _key_opens(set(publics.get(v, ())))
        found: list[int] = []
        stuck = False
        # one attempt per share message of v (protocol v1: one, with no valid point)
        for i in range(len(dealers.get(v, ())) if dealers is not None else 1):
            ok = valid.get((kind, v, i), set())
            try:
                value = _solve(list(ok), list(points[(kind, v)] - ok), t, opens)
            except _UndecidedError:
                stuck = True
                continue
            if value is not None and value not in found:
                found.append(value)
        if stuck and not (kind == "seed" and found):
            undecided.append(f"node {v}'s {kind} in round {label} (more than {SEARCH_LIMIT} "
                             "combinations of its shares to try)")
        if not found:
            continue
        secret = _as_secret(found[0])
        assert secret is not None  # opens() accepted it
        if kind == "seed":
            seeds[v] = found[0]
            if dealers is not None:
                self_keys[v] = _self_mask_key(secret, fed, rnd, v)
        else:
            keys[v] = secret
            revealed += [s for s in map(_as_secret, found) if s is not None]
    return _ServerSecrets(seeds, self_keys, keys, wrong, undecided, revealed)


def _dealings(view: ServerView, roster: Mapping[int, bytes] | None
              ) -> tuple[dict[int, list[ShareKeys]], dict[int, int]]:
    """The round's share messages the audit counts, by node, and how many were set aside
    by node.

    Without a ``roster`` every distinct recorded one counts (:attr:`ServerView.share_messages`).
    With the federation's roster (node -> Ed25519 key) only those whose signature
    verifies for this round's configuration count, by the server's own check
    (:func:`~bract.secagg.protocol._verify_shares_signature`); the rest, which the
    server refuses, are set aside and counted."""
    every = view.share_messages
    if roster is None:
        return every, {}
    cfg = view.config
    digest = _config_digest(cfg)
    kept: dict[int, list[ShareKeys]] = {}
    aside: dict[int, int] = {}
    for u, msgs in every.items():
        for m in msgs:
            try:
                if u not in roster:
                    raise ProtocolViolation(f"node {u} is not in the roster")
                _verify_shares_signature(cfg.federation_id, cfg.round, digest, u, m.holders,
                                         m.mask_public, m.seed_commitment,
                                         m.commitment_root(), m.signature, roster)
            except (SecAggError, ValueError):  # ValueError: no holder, so no Merkle root
                aside[u] = aside.get(u, 0) + 1
                continue
            kept.setdefault(u, []).append(m)
    return kept, aside


def _reconstruct(view: ServerView, roster: Mapping[int, bytes] | None = None
                 ) -> _ServerSecrets:
    """The secrets one round's unmask replies reveal (current protocol), with the shares
    the audit could not use (:func:`_secrets`), counting the share messages
    :func:`_dealings` keeps."""
    cfg = view.config
    dealers, _ = _dealings(view, roster)
    return _secrets(view.unmask_replies, view.round, cfg.threshold, cfg.federation_id,
                    cfg.round, dealers, _publics_of(dealers))


def _publics_of(dealers: Mapping[int, Sequence[ShareKeys]]) -> dict[int, set[bytes]]:
    """Each node's round mask public keys, one per share message counted."""
    return {u: {m.mask_public for m in msgs} for u, msgs in dealers.items()}


def _pair_mask(cfg: RoundConfig, publics: Mapping[int, bytes], private: bytes, owner: int,
               peer: int, applier: int) -> np.ndarray:
    """The pair mask of ``{owner, peer}`` as ``applier`` (one of the two) applied it.

    ``private`` is ``owner``'s round mask key (the server reconstructs it for a
    dropped client); the applier with the smaller id adds the keystream, the
    other subtracts it, so the pair's masks cancel in the sum.
    """
    shared = x25519_shared(private, publics[peer])
    key = pair_mask_key(shared, cfg.federation_id, cfg.round, (owner, publics[owner]),
                        (peer, publics[peer]))
    s = _stream(key, cfg)
    partner = peer if applier == owner else owner
    return s if applier < partner else (np.zeros_like(s) - s)


# ------------------------------------------------------- knowledge across rounds


@dataclass
class _RoundFacts:
    """What one recorded round tells the server, in protocol-neutral terms."""

    label: int
    min_honest: int
    nbhd: dict[int, tuple[int, ...]]
    #: node -> the sharer list of the mask request the server sent it (the
    #: intersection, if it sent it several: the masks it surely applied).
    partners: dict[int, set[int]]
    #: node -> the X25519 mask public key(s) it may have masked with: one per share
    #: message counted (a forged or refused one among them only adds keys)
    mask_public: dict[int, set[bytes]]
    held: set[int]  # nodes whose masked input the server holds (on time or late)
    secrets: _ServerSecrets  # what this round's unmask replies reveal
    #: node -> how many share messages of it the audit counts, when more than one
    several: dict[int, int] = field(default_factory=dict)
    #: node -> how many of its share messages a roster check set aside
    set_aside: dict[int, int] = field(default_factory=dict)


def _facts(view: ServerView, roster: Mapping[int, bytes] | None = None) -> _RoundFacts | str:
    """The round's facts, or why the view's shares cannot be read (no single round
    configuration, or one whose graph cannot be built). ``roster``: see
    :func:`_dealings`."""
    try:
        if view.legacy:  # protocol v1: epoch mask keys listed in the config
            msgs = [(d, m) for d, m in view.messages if isinstance(m, LegacyMessage)]
            cfgs = [m.fields for d, m in msgs if d == "out" and m.kind == "secagg.round_config"]
            if len(cfgs) != 1:
                return (f"the view holds {len(cfgs)} round configurations, not one, so the "
                        "shares it received cannot be read")
            cfg = cfgs[0]
            parts = cfg["participants"]
            nbhd = closed_neighbourhoods(parts, cfg["graph_kind"], cfg["degree"],
                                         cfg["graph_seed"])
            partners = own_sharer_lists((m.fields["node_id"], m.fields["sharers"])
                                        for d, m in msgs
                                        if d == "out" and m.kind == "secagg.mask_request")
            held = {m.fields["node_id"] for d, m in msgs if m.kind == "secagg.masked_input"
                    and d in ("in", "late")}
            replies = [m for d, m in msgs if d == "in" and m.kind == "secagg.unmask_reply"]
            publics = {u: {k} for u, k in zip(parts, cfg["mask_publics"], strict=True)}
            secrets_ = _secrets(replies, view.round, cfg["threshold"], cfg["federation_id"],
                                cfg["round"], None, publics)
            return _RoundFacts(view.round, 2, nbhd, partners, publics, held, secrets_)
        cfgs = [m for d, m in view.messages if d == "out" and isinstance(m, RoundConfig)]
        if len(cfgs) != 1:
            return (f"the view holds {len(cfgs)} round configurations, not one, so the "
                    "shares it received cannot be read")
        cfg = cfgs[0]
        nbhd = closed_neighbourhoods(cfg.participants, cfg.graph_kind, cfg.degree,
                                     cfg.graph_seed)
    except (KeyError, TypeError, ValueError, SecAggError) as exc:
        return f"its round configuration is unusable ({exc})"
    dealers, aside = _dealings(view, roster)
    return _RoundFacts(view.round, cfg.min_honest, nbhd, view.sharer_lists,
                       _publics_of(dealers), set(view.masked) | set(view.late),
                       _reconstruct(view, roster),
                       {u: len(m) for u, m in dealers.items() if len(m) > 1}, aside)


def _isolable_sums(f: _RoundFacts, usable: set[int], known_keys: set[bytes]) -> list[set[int]]:
    """The groups of clients whose summed update the server can compute in round ``f``.

    ``usable``: inputs the server holds with a removable self mask. ``u`` applied the
    pair mask of ``{u, v}`` when ``v`` is a neighbour in ``u``'s own sharer list (a
    held input whose mask request the view lacks is taken to hold none). Two usable
    inputs are joined by a pair mask no known key removes that both applied (it
    cancels only in their sum); a group holding such a mask whose other end did not
    apply it, or is outside ``usable``, stays masked.
    """
    def hidden(u: int, v: int) -> bool:
        # removable when any key u or v may have masked with is known: a wrong guess
        # only isolates more, never hides a sum the server can compute
        return not (f.mask_public.get(u, set()) | f.mask_public.get(v, set())) & known_keys

    def masks_with(u: int, v: int) -> bool:
        return v != u and v in f.nbhd.get(u, ()) and v in f.partners.get(u, ())

    parent = {u: u for u in usable}

    def root(u: int) -> int:
        while parent[u] != u:
            parent[u] = parent[parent[u]]
            u = parent[u]
        return u

    leaky: set[int] = set()
    for u in usable:
        for v in f.nbhd.get(u, ()):
            if not masks_with(u, v) or not hidden(u, v):
                continue
            if v in usable and masks_with(v, u):
                parent[root(u)] = root(v)
            else:
                leaky.add(u)
    groups: dict[int, set[int]] = {}
    for u in usable:
        groups.setdefault(root(u), set()).add(u)
    return [g for g in groups.values() if not g & leaky]


def several_line(rnd: int, node: int, count: int) -> str:
    """One line: ``node`` has ``count`` share messages counted in round ``rnd``."""
    return (f"round {rnd}: node {node} has {count} share messages in the view; the audit "
            "counts what any of them opens")


def set_aside_line(rnd: int, node: int, count: int) -> str:
    """One line: ``count`` share messages for ``node`` failed the roster check."""
    return (f"round {rnd}: {count} share message{'s' if count > 1 else ''} for node {node} "
            "whose signature does not verify against the roster, set aside (the server "
            "refuses such a message)")


def knowledge_across_rounds(views: Sequence[ServerView],
                            roster: Mapping[int, bytes] | None = None) -> list[CheckResult]:
    """The ``knowledge-across-rounds`` check, one result per view, in order (module
    docstring).

    Secrets reconstructed in any round are applied to every round: a mask private
    key is known from the first reconstruction on, whichever round it came from. A
    secret is known exactly when the shares the server received determine it
    (:func:`_secrets`): shares that do not open their dealer's commitment never hide
    one that the valid shares reveal, and are named in the round's detail. A round
    whose shares cannot be read, or a secret with too many share combinations to
    decide, makes every round that would pass ``skipped`` (the unread shares may hold
    a key that exposes it); a round that fails still fails (more keys only split the
    sums the server can isolate into smaller ones).

    A node with several share messages in a round (the recording keeps forged and
    refused ones too) has its shares counted against every one of them (or, with
    the federation's ``roster``, against those whose signature verifies): a secret is
    known when it opens any of them and a pair mask removable when any of its keys is
    known, so an extra message can only add what the server is taken to know (a
    possible false EXPOSED), never hide an isolable sum. Such nodes are named in
    the detail and the statistics (``share_messages``, ``set_aside``)."""
    facts = [_facts(v, roster) for v in views]
    read = [f for f in facts if isinstance(f, _RoundFacts)]
    unknown = [f"round {v.round}'s shares cannot be read ({f})"
               for v, f in zip(views, facts, strict=True) if isinstance(f, str)]
    unknown += [f"it is undecided whether the server knows {u}"
                for f in read for u in f.secrets.undecided]
    known_keys: set[bytes] = set()  # mask public keys whose private key the server has
    for f in read:
        known_keys.update(x25519_public(secret) for secret in f.secrets.revealed)
    results = []
    for v, f in zip(views, facts, strict=True):
        if isinstance(f, str):
            results.append(CheckResult.skipped(v.round, CHECKS[0], f))
            continue
        usable = {u for u in f.held if u in f.secrets.seeds}
        closed = _isolable_sums(f, usable, known_keys)
        small = sorted((sorted(g) for g in closed if len(g) < f.min_honest), key=len)
        smallest = min((len(g) for g in closed), default=0)
        detail = (f"{len(usable)} masked input(s) with a known self-mask seed, "
                  f"{len(known_keys)} mask key(s) reconstructed over all recorded rounds; ")
        if small:
            detail += ("EXPOSED: the server can isolate the update(s) of "
                       + ", ".join(f"node {g[0]}" if len(g) == 1 else f"nodes {g}"
                                   for g in small)
                       + f" (fewer than h = {f.min_honest} clients per sum)")
        elif closed:
            detail += (f"the smallest sum the server can isolate holds {smallest} client(s) "
                       f"(h = {f.min_honest})")
        else:
            detail += "the server can isolate no sum of this round"
        wrong = f.secrets.wrong
        if wrong:
            detail += ("; WRONG SHARES, not counted as valid points (the server excludes a "
                       "hospital that sends one): "
                       + "; ".join(w.describe() for w in wrong))
        if f.several:
            detail += "; SEVERAL SHARE MESSAGES: " + "; ".join(
                several_line(f.label, u, n) for u, n in sorted(f.several.items()))
        if f.set_aside:
            detail += "; " + "; ".join(
                set_aside_line(f.label, u, n) for u, n in sorted(f.set_aside.items()))
        stats = [{"isolable_sums": [sorted(g) for g in closed], "min_honest": f.min_honest,
                  "keys_reconstructed": len(known_keys),
                  "wrong_shares": [w.to_plain() for w in wrong],
                  "share_messages": [{"node": u, "count": n}
                                     for u, n in sorted(f.several.items())],
                  "set_aside": [{"node": u, "count": n}
                                for u, n in sorted(f.set_aside.items())]}]
        if not small and unknown:
            results.append(CheckResult(
                f.label, CHECKS[0], False,
                "NOT RUN to the end: " + "; ".join(unknown) + ", and what it would reveal "
                "applies here. With the rest: " + detail, stats, status=SKIPPED))
            continue
        results.append(CheckResult(f.label, CHECKS[0], not small, detail, stats))
    return results


def _test_vector(vec: np.ndarray, cfg: RoundConfig, alpha: float,
                 truth: tuple[np.ndarray, int] | None) -> tuple[bool, dict[str, Any]]:
    uni = uniformity_test(vec, cfg.ring_bits, alpha)
    stats: dict[str, Any] = {"uniformity": uni.to_plain(), "summary": uni.summary()}
    ok = uni.passed
    if truth is not None:
        ref = np.append(np.asarray(truth[0], dtype=np.float64), float(truth[1]))
        ind = independence_test(vec, cfg.ring_bits, ref, alpha)
        stats["independence"] = ind.to_plain()
        stats["summary"] += "; " + ind.summary()
        ok = ok and ind.passed
    return ok, stats


def audit_view(view: ServerView, alpha: float = DEFAULT_ALPHA,
               roster: Mapping[int, bytes] | None = None) -> list[CheckResult]:
    """The four per-round checks of one round's view (the cross-round check is
    :func:`knowledge_across_rounds`): always one result per name of
    :data:`ROUND_CHECKS`, in that order, each run, ``skipped`` with the reason, or
    ``n/a`` (module docstring). A check reported ``pass`` ran on everything the view
    holds for it; none is left out silently. A node with several share messages
    counted (:func:`_dealings`; ``roster`` narrows them to those that verify) leaves
    the masks the server removed undetermined: the checks that remove them are
    skipped."""
    rnd = view.round
    if view.legacy:
        why = ("a protocol-v1 view (recorded before per-round mask keys): only "
               "knowledge-across-rounds applies to it")
        return [CheckResult.skipped(rnd, name, why) for name in ROUND_CHECKS]
    try:
        cfg = view.config
    except ValueError as exc:
        why = f"{exc} The ring its inputs were masked in is unknown"
        return [CheckResult.skipped(rnd, name, why) for name in ROUND_CHECKS]
    results = [_masked_inputs_uniform(view, cfg, alpha)]
    later = ROUND_CHECKS[1:]
    requests = [m for d, m in view.messages if d == "out" and isinstance(m, UnmaskRequest)]
    replies = view.unmask_replies
    no_aggregate = "the round aborted, so the server holds no aggregate"

    def aggregate_or(why: str) -> CheckResult:
        if view.aborted:
            return CheckResult.not_applicable(rnd, later[2], no_aggregate)
        return CheckResult.skipped(rnd, later[2], why)

    if len(requests) > 1:
        sets = "; ".join(str(sorted(r.alive)) for r in requests)
        why = (f"the server unmasked this round {len(requests)} times (alive sets {sets}); "
               "together its replies may reveal a client's self-mask seed and its mask "
               "key, and this check removes the masks of one unmasking. "
               "knowledge-across-rounds counts every secret the replies reveal")
        return [*results, CheckResult.skipped(rnd, later[0], why),
                CheckResult.skipped(rnd, later[1], why), aggregate_or(why)]
    if not replies:
        none = "no unmask reply reached the server, so it could remove no mask"
        return [*results, CheckResult.not_applicable(rnd, later[0], none),
                CheckResult.not_applicable(rnd, later[1], none),
                aggregate_or("the view records an aggregate but no unmask reply: the masks "
                             "the server removed are not in it")]
    if not requests:
        why = ("the view holds unmask replies but no unmask request: which clients were "
               "alive and which dropped is not recorded")
        return [*results, CheckResult.skipped(rnd, later[0], why),
                CheckResult.skipped(rnd, later[1], why), aggregate_or(why)]
    dealers, _ = _dealings(view, roster)
    several = {u: len(m) for u, m in sorted(dealers.items()) if len(m) > 1}
    if several:
        nodes = ", ".join(f"node {u} ({n})" for u, n in several.items())
        why = (f"the view holds several share messages of {nodes}"
               + (" whose signatures all verify against the roster" if roster is not None
                  else ", and without the federation's roster (--roster) the audit cannot "
                  "tell which one the server accepted")
               + ": the masks the server removed are not determined. "
               "knowledge-across-rounds counts what any of them opens")
        return [*results, CheckResult.skipped(rnd, later[0], why),
                CheckResult.skipped(rnd, later[1], why), aggregate_or(why)]
    return results + _unmasked_checks(view, cfg, alpha, dealers, roster)


def _masked_inputs_uniform(view: ServerView, cfg: RoundConfig, alpha: float) -> CheckResult:
    """``masked-inputs-uniform``: every masked input the server received is uniform
    (``n/a`` when none reached it)."""
    masked = view.masked
    rnd = view.round
    if not masked:
        return CheckResult.not_applicable(rnd, ROUND_CHECKS[0],
                                          "no masked input reached the server")
    stats, bad = [], []
    for u, msg in sorted(masked.items()):
        ok, s = _test_vector(_ring(msg, cfg), cfg, alpha, None)
        stats.append({"node": u, **s})
        if not ok:
            bad.append(u)
    return CheckResult(
        rnd, ROUND_CHECKS[0], not bad,
        f"{len(masked)} masked inputs; " + (f"NOT uniform: nodes {bad}" if bad
                                            else f"all uniform over Z_2^{cfg.ring_bits}"),
        stats)


def _unmasked_checks(view: ServerView, cfg: RoundConfig, alpha: float,
                     dealers: Mapping[int, Sequence[ShareKeys]],
                     roster: Mapping[int, bytes] | None) -> list[CheckResult]:
    """``survivors-hidden``, ``dropped-late-hidden`` and ``aggregate-exact`` of a round
    unmasked once. Only the secrets the replies' valid shares reveal are removed
    (:func:`_secrets`; the others stay hidden from the server too); in an aborted
    round the survivors whose seed they do not reveal are still self-masked, and
    there is no aggregate. Raises ``ValueError`` naming what is missing when the view
    cannot be the record of such a round. ``dealers``: at most one share message per
    node (:func:`audit_view` skips these checks otherwise)."""
    publics = {u: msgs[0].mask_public for u, msgs in dealers.items()}
    ureq = view.unmask_request
    alive, dropped = sorted(ureq.alive), sorted(ureq.dropped)
    masked = view.masked
    missing = [u for u in alive if u not in masked]
    if missing:
        raise ValueError(f"the view lacks the masked inputs of alive nodes {missing}.")
    nbhd = closed_neighbourhoods(cfg.participants, cfg.graph_kind, cfg.degree, cfg.graph_seed)
    listed = sorted({*alive, *dropped, *view.late})
    outside = [u for u in listed if u not in nbhd]
    if outside:
        raise ValueError(f"the view lists nodes {outside} as alive, dropped or late, but the "
                         "round's configuration does not name them as participants.")
    no_key = [u for u in listed if u not in publics]
    if no_key:
        raise ValueError(f"the view lacks the share messages (round mask keys) of nodes "
                         f"{no_key}"
                         + (" that verify against the roster" if roster is not None else "")
                         + ", which it lists as alive, dropped or late.")
    aborted = view.aborted
    secrets_ = _reconstruct(view, roster)
    own = view.sharer_lists  # the pair masks each client applied: its own list's
    truth = view.inputs
    rnd = view.round
    results = []

    # 2. survivors after removing their self masks and the dropped clients' pair masks
    residuals: dict[int, np.ndarray] = {}
    stats, bad = [], []
    still_masked = []  # aborted round: survivors whose seed the replies do not reveal
    for u in alive:
        if u not in secrets_.self_keys:
            if aborted:
                still_masked.append(u)
                continue
            raise ValueError(f"the view's valid shares do not reveal survivor {u}'s "
                             "self-mask seed, yet the round completed.")
        r = _ring(masked[u], cfg) - _stream(secrets_.self_keys[u], cfg)
        for v in dropped:
            if v in nbhd[u] and v in own.get(u, ()) and v in secrets_.mask_private:
                r = r - _pair_mask(cfg, publics, secrets_.mask_private[v], v, u, applier=u)
        residuals[u] = r
        ok, s = _test_vector(r, cfg, alpha, truth.get(u))
        stats.append({"node": u, **s})
        if not ok:
            bad.append(u)
    # Do the remainders add up to what the server aggregated? Only then did the audit
    # remove the masks the server removes (and check 2 tested the real remainders).
    same = False
    if not aborted:
        total = np.zeros(cfg.dim + 1, dtype=RING_DTYPES[cfg.ring_bits])
        for r in residuals.values():
            total = total + r
        try:
            wsum, wtot = decode_sum(total, cfg.ring_bits, cfg.frac_bits)
            same = bool(np.array_equal(wsum, view.weighted_sum) and wtot == view.total_weight)
        except EncodingError:  # the remainders do not even decode (negative total weight)
            same = False
    others = min((len([w for w in nbhd[u] if w in alive and w != u]) for u in alive),
                 default=0)
    verdict = (f"EXPOSED: nodes {bad}" if bad else "all uniform and unrelated to their inputs")
    if aborted:
        verdict += ("; the round aborted: no aggregate shows these are the masks the server "
                    "would have removed" + (f"; the replies reveal no seed of survivors "
                                            f"{still_masked}: still self-masked"
                                            if still_masked else ""))
    elif not same:
        verdict += ("; NOT ASSESSED: the masks the audit removed are not those the server "
                    "removed (see aggregate-exact)")
    results.append(CheckResult(
        rnd, ROUND_CHECKS[1], not bad and (same or aborted),
        f"{len(alive)} survivors, {len(dropped)} dropped; after removing every self mask and "
        f"the dropped clients' pair masks each survivor is still masked by pair masks with "
        f"at least {others} other survivor(s); {verdict}",
        stats))

    # 3. late masked inputs of dropped clients, all pair masks removed
    late = view.late
    stats, bad = [], []
    for v, msg in sorted(late.items()):
        if v not in secrets_.mask_private:
            continue  # its mask key was not reconstructed: even more hidden
        r = _ring(msg, cfg)
        for u in nbhd[v]:
            if u != v and u in own.get(v, ()):
                r = r - _pair_mask(cfg, publics, secrets_.mask_private[v], v, u, applier=v)
        ok, s = _test_vector(r, cfg, alpha, truth.get(v))
        stats.append({"node": v, **s})
        if not ok:
            bad.append(v)
    if stats:
        detail = (f"{len(stats)} dropped clients' late masked inputs with all pair masks "
                  "removed: " + (f"EXPOSED: nodes {bad}" if bad
                                 else "still hidden by their self masks"))
    else:
        detail = "no late masked input of a dropped client in this view (nothing to check)"
    results.append(CheckResult(rnd, ROUND_CHECKS[2], not bad, detail, stats))

    # 4. non-vacuity: the remainders sum to the server's aggregate, which is the true sum
    if aborted:
        results.append(CheckResult.not_applicable(
            rnd, ROUND_CHECKS[3], "the round aborted, so the server holds no aggregate"))
        return results
    detail = ("survivors' remainders sum exactly to the server's aggregate" if same else
              "survivors' remainders do NOT sum to the server's aggregate: the masks the "
              "audit removed are not the ones the server removed")
    stat: dict[str, Any] = {"remainders_sum_to_aggregate": same}
    ok = same
    if truth:
        enc = EncodingConfig(cfg.clip, cfg.frac_bits, cfg.max_weight, cfg.ring_bits)
        expect = sum(w * np.clip(np.asarray(x, np.float64), -cfg.clip, cfg.clip)
                     for u, (x, w) in truth.items() if u in alive)
        expect_w = sum(w for u, (_, w) in truth.items() if u in alive)
        err = float(np.max(np.abs(view.weighted_sum - expect)))
        bound = enc.sum_error_bound(view.total_weight)
        true_ok = err <= bound and expect_w == view.total_weight
        stat.update(max_abs_error=err, error_bound=bound, total_weight=view.total_weight,
                    expected_total_weight=int(expect_w))
        ok = ok and true_ok
        detail += ("; the aggregate equals the survivors' weighted inputs (max error "
                   f"{err:.3g} <= bound {bound:.3g})" if true_ok else
                   f"; the aggregate is NOT the survivors' weighted sum (error {err:.3g}, "
                   f"bound {bound:.3g}, weights {view.total_weight} vs {expect_w})")
    results.append(CheckResult(rnd, ROUND_CHECKS[3], ok, detail, [stat]))
    return results


@dataclass(frozen=True)
class SecAggAuditReport:
    """All checks of all audited rounds."""

    checks: list[CheckResult]
    alpha: float
    #: How many distinct rounds the view holds (attempts of one round count once).
    rounds: int
    #: The rounds of which the view holds an attempt the run stopped in (recorded
    #: when it was interrupted; audited as aborted), in view order.
    interrupted: list[int] = field(default_factory=list)

    @property
    def failed(self) -> list[CheckResult]:
        """The checks that ran and failed."""
        return [c for c in self.checks if c.status == FAILED]

    @property
    def skipped(self) -> list[CheckResult]:
        """The checks the audit could not run on a round that had something to check."""
        return [c for c in self.checks if c.status == SKIPPED]

    @property
    def ran(self) -> int:
        """How many checks ran (``pass`` or ``FAIL``)."""
        return sum(c.status in (PASSED, FAILED) for c in self.checks)

    @property
    def verdict(self) -> str:
        """``FAIL`` when a check failed; else ``INCOMPLETE`` when one was skipped or none
        ran at all (the view was not fully checked: no pass); else ``pass``."""
        if self.failed:
            return FAILED
        return "INCOMPLETE" if self.skipped or not self.ran else PASSED

    @property
    def wrong_shares(self) -> list[str]:
        """Every share in an unmask reply that did not open its dealer's commitment (or
        was malformed), one line each naming round, sender and dealer: the audit did not
        count it as a valid point; the server excludes its sender (T31)."""
        return [WrongShare(**w).describe() for c in self.checks if c.name == CHECKS[0]
                for s in c.statistics for w in s.get("wrong_shares", ())]

    @property
    def several_share_messages(self) -> list[str]:
        """Each node with several share messages counted in a round, one line each
        (:func:`several_line`): the audit counted what any of them opens, so a forged or
        refused one can only make it report more, never less."""
        return [several_line(c.round, s["node"], s["count"]) for c in self.checks
                if c.name == CHECKS[0] for st in c.statistics
                for s in st.get("share_messages", ())]

    @property
    def set_aside_share_messages(self) -> list[str]:
        """Share messages a roster check set aside, per round and node, one line each."""
        return [set_aside_line(c.round, s["node"], s["count"]) for c in self.checks
                if c.name == CHECKS[0] for st in c.statistics for s in st.get("set_aside", ())]

    @property
    def passed(self) -> bool:
        """True only when every check of every round ran (or had nothing to check) and
        passed: a skipped check is no pass."""
        return self.verdict == PASSED

    @property
    def skipped_summary(self) -> str | None:
        """The skipped checks, per round, in one line (None when none was)."""
        by_round: dict[int, list[str]] = {}
        for c in self.skipped:
            by_round.setdefault(c.round, []).append(c.name)
        if not by_round:
            return None
        n = len(self.skipped)
        return (f"{n} check{'s' if n > 1 else ''} NOT RUN: "
                + "; ".join(f"round {r}: {', '.join(names)}"
                            for r, names in sorted(by_round.items())))

    @property
    def gap(self) -> str | None:
        """What is wrong with the set of recorded rounds (missing, repeated), or None."""
        for c in self.checks:
            if c.name == ROUNDS_RECORDED and not c.passed:
                return str(c.statistics[0]["summary"])
        return None

    def to_plain(self) -> dict[str, Any]:
        """Plain JSON-able dict."""
        return {"verdict": self.verdict, "passed": self.passed, "alpha": self.alpha,
                "rounds": self.rounds, "interrupted": self.interrupted,
                "skipped": self.skipped_summary,
                "wrong_shares": self.wrong_shares,
                "several_share_messages": self.several_share_messages,
                "set_aside_share_messages": self.set_aside_share_messages,
                "checks": [c.to_plain() for c in self.checks]}


def audit_views(views: Sequence[ServerView], alpha: float = DEFAULT_ALPHA,
                roster: Mapping[int, bytes] | None = None) -> SecAggAuditReport:
    """Audit every round's view; see the module docstring for what passing means.

    Guarantee: every round's result lists all of :data:`CHECKS`, each ``pass``,
    ``FAIL``, ``skipped`` (with why) or ``n/a``; the report passes only when none
    failed and none was skipped. ``roster`` (the federation's secure-aggregation id
    -> Ed25519 public key) narrows each node's share messages to those whose
    signature verifies, as the server's own check does; without it every recorded
    one counts (:func:`knowledge_across_rounds`). A roster that verifies none of a
    round's share messages is not this federation's: ``ValueError``."""
    if not views:
        raise ValueError("no recorded rounds to audit.")
    if roster is not None:
        _check_roster(views, roster)
    checks = []
    gap = rounds_recorded(views)
    if gap is not None:
        checks.append(gap)
    closed = [v for v in views if _never_opened(v)]
    views_opened = [v for v in views if not _never_opened(v)]
    by_round: list[CheckResult] = [c for v in closed
                                   for c in _interrupted_checks(v, _never_opened_checks(v))]
    for v, knowledge in zip(views_opened, knowledge_across_rounds(views_opened, roster),
                            strict=True):
        by_round += _interrupted_checks(v, [knowledge, *audit_view(v, alpha, roster)])
    checks += sorted(by_round, key=lambda c: c.round)  # stable: each round's checks in order
    return SecAggAuditReport(checks, alpha, len({v.round for v in views}),
                             [v.round for v in views if v.interrupted])


def _interrupted_checks(view: ServerView, checks: list[CheckResult]) -> list[CheckResult]:
    """The checks of a round the run stopped in (``view.interrupted``), each naming
    that: the view holds what the server had seen of that attempt when the run
    stopped, audited as an aborted round (a resumed run's re-run is another view)."""
    if not view.interrupted:
        return checks
    note = (f" [round {view.round}, interrupted attempt: {view.interrupted}; audited as "
            "an aborted round, with what the server had seen of it]")
    return [replace(c, detail=c.detail + note) for c in checks]


def _never_opened(view: ServerView) -> bool:
    """Whether ``view`` is the marker of a round that never opened: marked so, and
    holding no message (a marked view with any message is audited as any other)."""
    return bool(view.never_opened) and not view.messages


def _never_opened_checks(view: ServerView) -> list[CheckResult]:
    """Every check n/a for a round that never opened, with the server's reason."""
    why = (f"the round never opened ({view.never_opened}): the server sent no round "
           "configuration and received no share, masked input or unmask reply in it")
    return [CheckResult.not_applicable(view.round, name, why) for name in CHECKS]


def _check_roster(views: Sequence[ServerView], roster: Mapping[int, bytes]) -> None:
    """Refuse a ``roster`` under which some round's share messages all fail to verify."""
    for v in views:
        if v.legacy:
            continue
        try:
            every = v.share_messages
            kept, _ = _dealings(v, roster)
        except ValueError:
            continue  # no single round configuration: its shares cannot be read (the
            # checks say so)
        if every and not kept:
            n = sum(len(m) for m in every.values())
            raise ValueError(f"none of round {v.round}'s {n} share messages verifies against "
                             "the roster: it is not the roster of the federation this view "
                             "was recorded in.")


def _attempt_key(view: ServerView) -> object:
    """What tells one recorded attempt of a round from another: its protocol round
    number (a resumed run's re-run has its own), or, without a single round
    configuration, the view's content."""
    try:
        return ("protocol round", view.config.round)
    except (ValueError, AttributeError):
        return ("content", view.never_opened, view.interrupted,
                tuple((d, m.to_bytes()) for d, m in view.messages))


def rounds_recorded(views: Sequence[ServerView]) -> CheckResult | None:
    """A failed ``rounds-recorded`` check when the views' rounds are not 1, 2, ..., N,
    each once; None when they are. Several attempts of one round (the attempt a run
    was interrupted in, then a resumed run's re-run; a pipelined attempt abandoned,
    then the restart) are distinct protocol rounds and count as that round once;
    the same protocol round recorded twice is a repeat.

    The server records every round in which it sent a round configuration
    (``round-N``, N counting from 1), so a missing round is one whose shares the
    knowledge check never saw: what the server learned there is not counted, and a
    pass over the rounds shown says nothing about them. (A round that never opened,
    e.g. with fewer than 3 hospitals holding keys, is recorded by a marker holding no
    message: it counts as recorded, and its checks are n/a.) A view cut after its last
    round cannot be told from a shorter run here."""
    numbers = [v.round for v in views]
    top = max(numbers)
    missing = sorted(set(range(1, top + 1)) - set(numbers))
    # Attempts of one round (a run interrupted in it, then resumed) are distinct
    # protocol rounds; the same protocol round recorded twice is a repeat.
    keys = [(v.round, _attempt_key(v)) for v in views]
    repeated = sorted({r for r, k in keys if keys.count((r, k)) > 1})
    invalid = sorted({r for r in numbers if r < 1})
    if not (missing or repeated or invalid):
        return None
    parts = []
    if missing:
        parts.append(f"round{'s' if len(missing) > 1 else ''} "
                     f"{', '.join(map(str, missing))} missing from the view")
    if repeated:
        parts.append(f"round{'s' if len(repeated) > 1 else ''} "
                     f"{', '.join(map(str, repeated))} recorded more than once")
    if invalid:
        parts.append(f"round number{'s' if len(invalid) > 1 else ''} "
                     f"{', '.join(map(str, invalid))} below 1")
    summary = "; ".join(parts)
    detail = (f"the view holds rounds {sorted(numbers)}: {summary}. The shares the server "
              "received in a round not shown are not counted, so no round's result here "
              "rules out what they reveal (a round that never opened is recorded by a "
              "marker, so a missing round is one whose record was lost or removed)")
    return CheckResult(missing[0] if missing else min(numbers), ROUNDS_RECORDED, False,
                       detail, [{"recorded": sorted(numbers), "missing": missing,
                                 "repeated": repeated, "summary": summary}])


def run_secagg_audit(config: SecAggAuditConfig) -> SecAggAuditReport:
    """Record ``config.rounds`` rounds and audit them."""
    return audit_views(record_rounds(config), config.alpha)


def report_markdown(report: SecAggAuditReport) -> str:
    """Verdict first, then one line per check, then what the audit can and cannot show."""
    skipped = report.skipped_summary
    ran = report.ran
    lines = [
        "# Secure-aggregation audit",
        "",
        f"**Verdict: {report.verdict}**"
        + (f" ({report.gap})" if report.gap else "")
        + (" — no check failed, but the view was not fully checked" if
           report.verdict == "INCOMPLETE" else "")
        + (f" — {skipped} (see the table for why)" if skipped else "")
        + f" — {report.rounds} round(s), {ran} checks run, per-vector significance "
        f"{report.alpha:g}.",
        "",
        "| round | check | result | detail |",
        "| --- | --- | --- | --- |",
    ]
    shown = {PASSED: "pass", FAILED: "**FAIL**", SKIPPED: "**skipped**",
             NOT_APPLICABLE: "n/a"}
    lines += [f"| {c.round} | {c.name} | {shown[c.status]} | {c.detail} |"
              for c in report.checks]
    if report.wrong_shares:
        lines += ["", "Wrong shares (not counted as valid points; the server excludes a "
                  "hospital that sends one, threat model T31):", ""]
        lines += [f"- {w}" for w in report.wrong_shares]
    if report.several_share_messages:
        lines += ["", "Several share messages for one node (the recording keeps forged and "
                  "refused ones too; the audit counts what any of them opens, so it can only "
                  "over-count what the server knows):", ""]
        lines += [f"- {w}" for w in report.several_share_messages]
    if report.set_aside_share_messages:
        lines += ["", "Share messages set aside by the roster check:", ""]
        lines += [f"- {w}" for w in report.set_aside_share_messages]
    lines += [
        "",
        "What passing shows: with every secret the recorded shares reveal, from any round, "
        "applied to every round, the server can isolate no sum of fewer than h clients; in "
        "the recorded view no masked vector — nor what remains after the server removes every "
        "mask it can — is distinguishable from uniform or related to the client's input by "
        "these tests, and the aggregate is the survivors' true sum. What it cannot show: that "
        "masks are unpredictable (that rests on the protocol's keys), anything about a server "
        "that deviates from the protocol or colludes with hospitals, or what a sum itself "
        "reveals.",
    ]
    return "\n".join(lines) + "\n"


def write_secagg_report(report: SecAggAuditReport, out_dir: Path,
                        views: Sequence[ServerView] = ()) -> list[Path]:
    """Write ``secagg_audit.json`` and ``secagg_audit.md`` (and the views, if given)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    js = out_dir / "secagg_audit.json"
    js.write_text(json.dumps(report.to_plain(), indent=2) + "\n")
    md = out_dir / "secagg_audit.md"
    md.write_text(report_markdown(report))
    paths = [js, md]
    for view in views:
        paths.append(write_view(view, out_dir / "secagg_view" / f"round-{view.round}"))
    return paths
