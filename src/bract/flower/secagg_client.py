"""Hospital side of secure aggregation in Flower: a mod and three stage handlers.

Message stages of one secure round (server -> hospital message type):

1. ``train`` (carries the secagg round config): the DP training handler runs as
   usual; :func:`secagg_mod` then takes the update *out* of the reply (weights,
   example count, any metrics the policy lets out in aggregate), keeps it in
   ``ctx.state`` and answers with encrypted Shamir shares instead.
2. ``train.secagg_mask``: the masked update ``y = enc(w * delta) + masks``.
3. ``train.secagg_check``: a signature over the alive set (consistency check).
4. ``train.secagg_unmask``: the shares the server may have, never both for a peer.

Pipelined rounds (see :mod:`bract.flower.secagg_server`): the ``unmask`` message
may also carry the next round's config; the hospital answers it after the unmask
request, with its shares for the next round in the same reply. The next round's
``train`` message then carries the hospital's mask request instead of a config,
and :func:`secagg_mod` answers it with the masked update straight away (stages
1 and 2 of that round happened in the previous round's unmask message).

Plus, once, ``query.secagg_advertise``: the hospital's signed share-channel key,
bound to its Flower node id (each round's mask key is made fresh with its shares).

Guarantee (under the protocol's threat model, see docs/secagg.md): no update,
example count or aggregated metric of a hospital leaves it except inside a
masked vector, and the session's secrets never leave ``ctx.state``. The
pending update (stage 1's, kept for stage 2) stays in ``ctx.state`` only until the
hospital's next secure-aggregation message of a train stage, whichever it is and
whatever happens to it: the mask request of its round uses it, and every other
(another round's config or mask request, a consistency or unmask request after a
missed mask stage, a refused or failing one) takes it out unused (one that never
hears from the server again keeps it in its run's context until the run ends). A
protocol error (a forged key, a replay, a lowered threshold, ...) raises, so
Flower answers the server with an error naming it, and the round goes on
without this hospital.
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from bract.flower.files import write_private_bytes
from bract.flower.reasons import failure_reason, public
from bract.flower.records import (
    AGGREGATED_METRICS,
    GLOBAL_WEIGHTS,
    LOCAL_METRICS,
    LOCAL_WEIGHTS,
    ROUND_CONFIG,
    SECAGG,
    SECAGG_MAX_WEIGHT,
    SECAGG_NEXT,
    SECAGG_NEXT_REFUSED,
    TRAIN_INFO,
    record_to_weights,
    secagg_from_record,
    secagg_to_record,
    settings_digest,
    weights_digest,
)
from bract.secagg import (
    ClientPolicy,
    ClientSession,
    ConsistencyRequest,
    MaskRequest,
    RoundConfig,
    SecAggError,
    SigningKey,
    UnmaskRequest,
)

#: ``ctx.state`` keys: the protocol session (holds secrets) and the pending update.
STATE_SESSION = "bract.secagg.session"
STATE_PENDING = "bract.secagg.pending"

#: True only while :func:`secagg_mod` runs the rest of a ``train`` message's chain for a
#: secure-aggregation record it parsed, i.e. while the reply being built will have its
#: update masked. Set by code alone: no message can set it.
_MASKING: ContextVar[bool] = ContextVar("bract_secagg_masking", default=False)


def masks_this_reply() -> bool:
    """Whether the ``train`` reply being built will leave only inside a masked sum:
    :func:`secagg_mod` is handling this message's secure-aggregation round config or
    mask request (and takes the update out of the reply)."""
    return _MASKING.get()


def _call_masking(call_next: Callable[[Message, Context], Message], msg: Message,
                  ctx: Context) -> Message:
    """``call_next(msg, ctx)`` with :func:`masks_this_reply` true inside it. (A module
    function, so the mods that call it pickle by reference: Flower's Ray engine
    pickles the ClientApp, and a ContextVar cannot be pickled.)"""
    token = _MASKING.set(True)
    try:
        return call_next(msg, ctx)
    finally:
        _MASKING.reset(token)

ADVERTISE = "query.secagg_advertise"
MASK = "train.secagg_mask"
CHECK = "train.secagg_check"
UNMASK = "train.secagg_unmask"


@dataclass(frozen=True)
class SecAggIdentity:
    """A hospital's long-term secure-aggregation identity, from its operator.

    ``roster`` maps every hospital's secagg id to its Ed25519 public key; it
    reaches the hospital out of band (never from the server), so the server
    cannot substitute keys.
    """

    node: int
    signing_key: bytes
    roster: dict[int, bytes]
    federation_id: str
    policy: ClientPolicy = field(default_factory=lambda: ClientPolicy(clip_out_of_range=True))


IdentityLike = SecAggIdentity | Callable[[Context], SecAggIdentity]


def make_identities(n: int, federation_id: str) -> tuple[dict[int, bytes], list[SecAggIdentity]]:
    """Fresh Ed25519 identities for ``n`` simulated hospitals and the roster of them.

    In a simulation the operator of every hospital is this process; in a real
    deployment each hospital makes its own key and the roster is exchanged out of
    band (docs/deployment.md).
    """
    keys = [SigningKey.generate() for _ in range(n)]
    roster = {i + 1: k.public_bytes() for i, k in enumerate(keys)}
    return roster, [
        SecAggIdentity(i + 1, k.to_bytes(), roster, federation_id) for i, k in enumerate(keys)
    ]


def write_identity_key(path: Path, signing_key: bytes) -> None:
    """Write a hospital's Ed25519 private key (hex), readable by its owner only."""
    write_private_bytes(Path(path), (signing_key.hex() + "\n").encode("ascii"))


def read_identity_key(path: Path) -> bytes:
    """Read a key written by :func:`write_identity_key`."""
    try:
        return bytes.fromhex(Path(path).read_text(encoding="ascii").strip())
    except ValueError:
        raise ValueError(f"identity key file {path} is not hex") from None


def flatten_delta(local: dict[str, np.ndarray], global_: dict[str, np.ndarray]) -> np.ndarray:
    """``local - global`` as one float64 vector, in the global model's key order."""
    if local.keys() != global_.keys():
        raise ValueError("local and global weights have different names")
    for k in global_:
        if np.shape(local[k]) != np.shape(global_[k]):
            raise ValueError(f"local and global weights {k!r} have different shapes")
    out = np.empty(sum(int(np.size(global_[k])) for k in global_), dtype=np.float64)
    at = 0
    for k in global_:
        n = int(np.size(global_[k]))
        # Both widened to float64 inside the subtraction (exact), written in place.
        np.subtract(np.asarray(local[k]).reshape(-1), np.asarray(global_[k]).reshape(-1),
                    out=out[at:at + n], dtype=np.float64)
        at += n
    return out


class PlainAggregationRefused(ValueError):  # noqa: N818 (a refusal, the reply's error)
    """A hospital that does secure aggregation was asked for its update in clear."""


#: Why a hospital refuses a ``train`` message without secure aggregation.
PLAIN_REFUSED = ("refused: the coordinator asks for this hospital's update without "
                 "secure aggregation; it sends its update only inside a masked sum "
                 "(its policy's allow_plain_aggregation is false)")


def _identity(identity: IdentityLike, ctx: Context) -> SecAggIdentity:
    return identity(ctx) if callable(identity) else identity


def _session_key(node: int, federation_id: str) -> str:
    """The ``ctx.state`` record of one node's session in one federation: Flower hands
    every run of one run series (which the coordinator names) the same Context, so
    several federations' sessions may live in it side by side, none read as another's."""
    import hashlib

    ident = hashlib.sha256(f"{node}\x00{federation_id}".encode()).hexdigest()[:32]
    return f"{STATE_SESSION}.{ident}"


def _session(identity: SecAggIdentity, ctx: Context) -> ClientSession:
    key = SigningKey.from_bytes(identity.signing_key)
    rec = ctx.state.config_records.get(_session_key(identity.node, identity.federation_id))
    if rec is not None and "state" in rec:
        return ClientSession.from_state(
            bytes(rec["state"]), key, identity.roster, identity.policy
        )
    return ClientSession(
        identity.node, identity.federation_id, key, identity.roster, identity.policy
    )


#: The most sessions (federations) one Context keeps: the one just saved and the most
#: recently saved others; an older one is dropped (its hospital re-advertises its keys
#: if that federation comes back, as after a lost state).
MAX_SESSIONS = 8


def _save(ctx: Context, session: ClientSession) -> None:
    records = ctx.state.config_records
    key = _session_key(session.node_id, session.federation_id)
    if key in records:
        del records[key]  # re-inserted last: the most recently used
    records[key] = ConfigRecord({"state": session.export_state()})
    sessions = [name for name in records if name.startswith(f"{STATE_SESSION}.")]
    for name in sessions[:-MAX_SESSIONS]:
        del records[name]


def _reply(msg: Message, payload: RecordDict | None = None) -> Message:
    return Message(payload or RecordDict(), reply_to=msg)


def secagg_mod(
    identity: IdentityLike, release_metrics: str | Callable[[Context], str] = "none",
    allow_plain: bool | Callable[[Context], bool] = False,
) -> Callable:
    """A Flower mod for the ``train`` stage: update out of the reply, shares (or, in a
    pipelined round, the masked update) in.

    Acts on messages that carry a secagg round config or mask request. A plain
    ``train`` message (no secure-aggregation record: the coordinator asks for the
    update in clear) is refused before training unless ``allow_plain`` (or a function
    of the Context returning it) lets the hospital take part in plain FedAvg: leaving
    the record out must not be a way around the masking.
    ``release_metrics="aggregate"`` (or a function of the Context returning it) lets
    the hospital's metrics release (noised sums, already accounted) travel *inside*
    the masked vector as totals, summed without the weight (the server learns only
    the sum of each over the hospitals, exact within the round's encoding error);
    otherwise they are dropped here. A released sum beyond the round's range
    ``clip * max_weight`` is never clipped: the hospital leaves the round (before it
    sends shares, or at the mask stage of a pipelined round), with a reason that
    names no figure. That refusal is a function of the released (noised, accounted)
    sums and the public round config alone, so it releases nothing more.
    """

    def mod(msg: Message, ctx: Context, call_next: Callable[[Message, Context], Message]):
        # A new train stage: an update still pending belongs to a round that ended
        # without this hospital's mask stage (aborted, or it dropped); it goes now.
        _drop_pending(ctx)
        if SECAGG not in msg.content.config_records:
            if not (allow_plain(ctx) if callable(allow_plain) else allow_plain):
                raise PlainAggregationRefused(PLAIN_REFUSED)
            return call_next(msg, ctx)
        cfg = secagg_from_record(msg.content.config_records[SECAGG])
        if not isinstance(cfg, RoundConfig | MaskRequest):
            raise public(ValueError(
                f"train stage expects a secagg round config or mask request, got {cfg.KIND}"
            ))
        # One session for the whole message: the train handler in between never
        # touches the secure-aggregation state.
        session = _session(_identity(identity, ctx), ctx)
        # A round config or mask request this hospital would refuse is refused before
        # it trains, so it spends no privacy budget on an update that could not be sent.
        if isinstance(cfg, RoundConfig):
            session.check_round_config(cfg)
        else:
            session.check_mask_request(cfg)
        limit = session.max_weight_for(cfg)
        if limit is not None:
            # The train handler refuses a weight the ring cannot carry before it trains,
            # whether or not the server sent a round config record.
            if ROUND_CONFIG not in msg.content.config_records:
                msg.content.config_records[ROUND_CONFIG] = ConfigRecord()
            msg.content.config_records[ROUND_CONFIG][SECAGG_MAX_WEIGHT] = int(limit)
        reply = _call_masking(call_next, msg, ctx)
        if reply.has_error():
            return reply
        content = reply.content
        local_rec = content.array_records.get(LOCAL_WEIGHTS)
        info = content.metric_records.get(TRAIN_INFO)
        metrics = content.metric_records.get(LOCAL_METRICS)
        # Whatever happens next, nothing of the update leaves in clear.
        for name in (LOCAL_WEIGHTS,):
            content.array_records.pop(name, None)
        for name in (TRAIN_INFO, LOCAL_METRICS):
            content.metric_records.pop(name, None)
        if local_rec is None or info is None:
            return reply  # refused (budget) or nothing to send: no shares, a clean dropout
        global_ = record_to_weights(msg.content.array_records[GLOBAL_WEIGHTS])
        vector = flatten_delta(record_to_weights(local_rec), global_)
        # The update is bound to the model and the settings it was computed from: no sum
        # this hospital helps unmask mixes it with updates of another global model or
        # trained under other settings (the server checks the model's half).
        model = weights_digest(global_) + settings_digest(
            ctx.run_config, msg.content.config_records.get(ROUND_CONFIG, {}))
        release = release_metrics(ctx) if callable(release_metrics) else release_metrics
        totals: np.ndarray | None = None
        if release == "aggregate":
            if metrics is None or any(k not in metrics for k in AGGREGATED_METRICS):
                raise ValueError(f"the metrics {list(AGGREGATED_METRICS)} to release in "
                                 "aggregate were not produced")
            # The noised sums themselves, as totals (summed without the weight): the
            # server decodes their sum over the hospitals.
            totals = np.asarray([float(metrics[k]) for k in AGGREGATED_METRICS], np.float64)
            if isinstance(cfg, RoundConfig):
                _check_totals(totals, cfg)
        weight = int(info["num-examples"])
        if isinstance(cfg, MaskRequest):  # pipelined: this round's shares are all in
            out = session.handle_mask_request(cfg, vector, weight, input_digest=model,
                                              totals=totals)
        else:
            out = session.handle_round_config(cfg)
            pending = {"round": cfg.round, "vector": vector.astype(np.float32).tobytes(),
                       "weight": weight, "model": model}
            if totals is not None:  # float64: the released sums exactly
                pending["totals"] = totals.tobytes()
            # The update in float32, like the weights it came from: half the bytes.
            ctx.state.config_records[STATE_PENDING] = ConfigRecord(pending)
        _save(ctx, session)
        content.config_records[SECAGG] = secagg_to_record(out)
        return reply

    return mod


def _drop_pending(ctx: Context) -> ConfigRecord | None:
    """Take the pending update (if any) out of ``ctx.state`` and return it."""
    pending = ctx.state.config_records.get(STATE_PENDING)
    if pending is not None:
        del ctx.state.config_records[STATE_PENDING]
    return pending


def _check_totals(totals: np.ndarray, cfg: RoundConfig) -> None:
    """Refuse the round, before any share leaves, if a released sum lies beyond the
    range its encoding carries unclipped (``clip * max_weight``); the reason names
    the public range only."""
    limit = float(cfg.clip) * int(cfg.max_weight)
    if not np.all(np.isfinite(totals)) or float(np.max(np.abs(totals))) > limit:
        raise public(ValueError(
            f"a released metric sum lies beyond the secure round's range [-{limit:g}, "
            f"{limit:g}] (clip x max_weight): this hospital leaves the round rather than "
            "have the federation's total clipped"))


def _stage_handler(identity: IdentityLike, expected: type) -> Callable[[Message, Context], Message]:
    def handle(msg: Message, ctx: Context) -> Message:
        ident = _identity(identity, ctx)
        req = secagg_from_record(msg.content.config_records[SECAGG])
        if not isinstance(req, expected):
            raise public(ValueError(f"expected a {expected.KIND} message, got {req.KIND}"))
        # The pending update serves only the mask request right after its train stage:
        # taken out of ctx.state by every later stage message, used or not (a request
        # for another round, a refusal, a mask stage this hospital missed).
        pending = _drop_pending(ctx)
        session = _session(ident, ctx)
        if isinstance(req, MaskRequest):
            if pending is None or int(pending["round"]) != req.round:
                raise public(ValueError(f"mask request for round {req.round} without a "
                                        "pending update for that round"))
            # float32 as stored: encode() widens it block by block, exactly.
            vector = np.frombuffer(bytes(pending["vector"]), dtype=np.float32)
            totals = (np.frombuffer(bytes(pending["totals"]), dtype=np.float64)
                      if "totals" in pending else None)
            out = session.handle_mask_request(req, vector, int(pending["weight"]),
                                              input_digest=bytes(pending["model"]),
                                              totals=totals)
        elif isinstance(req, ConsistencyRequest):
            out = session.handle_consistency_request(req)
        else:
            out = session.handle_unmask_request(req)
        content = RecordDict({SECAGG: secagg_to_record(out)})
        if isinstance(req, UnmaskRequest) and SECAGG_NEXT in msg.content.config_records:
            _share_for_next_round(session, msg.content.config_records[SECAGG_NEXT], content)
        _save(ctx, session)
        return _reply(msg, content)

    return handle


def _share_for_next_round(session: ClientSession, record: ConfigRecord,
                          content: RecordDict) -> None:
    """Answer the next round's config (sent with this round's unmask request) with
    shares in ``content``. This round's unmask reply goes out whatever happens: a
    config the hospital refuses only keeps it out of the next round, and the reason
    travels back instead of shares."""
    try:
        cfg = secagg_from_record(record)
        if not isinstance(cfg, RoundConfig):
            raise public(ValueError(f"expected the next round's config, got {cfg.KIND}"))
        content.config_records[SECAGG_NEXT] = secagg_to_record(session.handle_round_config(cfg))
    except (SecAggError, ValueError) as exc:  # the reason leaves: bract's words only
        content.config_records[SECAGG_NEXT_REFUSED] = ConfigRecord(
            {"reason": str(exc) if isinstance(exc, SecAggError) else failure_reason(exc)})


def advertise_handler(identity: IdentityLike) -> Callable[[Message, Context], Message]:
    """``query.secagg_advertise``: the hospital's signed key advertisement, naming this
    Flower node as its origin (the server refuses it from any other node)."""

    def handle(msg: Message, ctx: Context) -> Message:
        ident = _identity(identity, ctx)
        session = _session(ident, ctx)
        adv = session.advertise_keys(origin=int(ctx.node_id))
        _save(ctx, session)
        return _reply(msg, RecordDict({SECAGG: secagg_to_record(adv)}))

    return handle


def register_secagg(
    app: ClientApp, identity: IdentityLike, mods: list[Callable] | None = None
) -> None:
    """Register the advertise, mask, check and unmask handlers on ``app``.

    Flower routes by message type before mods run, so each stage needs a handler.
    """
    app.query("secagg_advertise", mods=mods)(advertise_handler(identity))
    app.train("secagg_mask", mods=mods)(_stage_handler(identity, MaskRequest))
    app.train("secagg_check", mods=mods)(_stage_handler(identity, ConsistencyRequest))
    app.train("secagg_unmask", mods=mods)(_stage_handler(identity, UnmaskRequest))
