"""Fault injection for simulations: hospitals that drop out at a chosen stage.

Used by ``bract simulate --drop-rate P --drop-stage STAGE`` to show that rounds
survive dropouts at any stage of secure aggregation. Without secure aggregation
the only stage is ``config``: the hospital fails the round's plain ``train``
message. Which hospital drops in which round is a deterministic function of
(seed, round, hospital), so a run can be repeated; it decides nothing an adversary
must not predict.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

from flwr.app import Context, Message

from bract.flower.records import SECAGG, SECAGG_NEXT
from bract.secagg import ConsistencyRequest, MaskRequest, RoundConfig, UnmaskRequest

#: Dropout stage -> the secure-aggregation message (its ``kind``) a hospital fails to
#: answer, whichever Flower message carries it: in a pipelined round the mask
#: request comes with ``train`` and the config with the previous round's unmask.
DROP_STAGES = {
    "config": RoundConfig.KIND,
    "mask": MaskRequest.KIND,
    "consistency": ConsistencyRequest.KIND,
    "unmask": UnmaskRequest.KIND,
}


class InjectedDropoutError(RuntimeError):
    """A simulated hospital failure (Flower turns it into an error reply)."""


def drops(seed: int, fl_round: int, hospital: int, rate: float) -> bool:
    """Whether ``hospital`` drops in ``fl_round``: true for a ``rate`` share of pairs."""
    digest = hashlib.sha256(f"bract-drop:{seed}:{fl_round}:{hospital}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64 < rate


def message_stage(msg: Message) -> str | None:
    """The protocol stage (a :data:`DROP_STAGES` key) of the secure-aggregation
    request a Flower message carries, or ``None`` (no such request)."""
    record = msg.content.config_records.get(SECAGG)
    kind = None if record is None else record.get("kind")
    return next((stage for stage, k in DROP_STAGES.items() if k == kind), None)


def inject_dropout(
    msg: Message, stage: str, fl_round: int, should_drop: Callable[[int], bool]
) -> None:
    """Make the hospital fail ``stage`` of the round it is asked for.

    ``should_drop(r)`` says whether it drops at ``stage`` in FL round ``r``. Raises
    :class:`InjectedDropoutError` when ``msg`` carries that stage's request, or, at
    stage ``config``, when it is a plain FedAvg ``train`` message (no secure
    aggregation: the round's instruction is its config); a next round's config
    carried by an unmask message (round ``fl_round + 1``) is removed instead, so the
    hospital finishes this round and does not answer the next round's config.
    """
    plain_train = (msg.metadata.message_type == "train"
                   and SECAGG not in msg.content.config_records)
    if (message_stage(msg) == stage or (stage == "config" and plain_train)) \
            and should_drop(fl_round):
        raise InjectedDropoutError(f"injected dropout at stage {stage!r}")
    if (stage == "config" and SECAGG_NEXT in msg.content.config_records
            and should_drop(fl_round + 1)):
        del msg.content.config_records[SECAGG_NEXT]


def dropout_mod(rate: float, stage: str, seed: int) -> Callable:
    """A mod that makes a ``rate`` share of hospitals fail at ``stage`` each round."""
    if stage not in DROP_STAGES:
        raise ValueError(f"drop stage {stage!r} must be one of {sorted(DROP_STAGES)}")
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"drop rate must lie in [0, 1] (got {rate})")

    def mod(msg: Message, ctx: Context, call_next: Callable[[Message, Context], Message]):
        hospital = int(ctx.node_config.get("partition-id", ctx.node_id))
        inject_dropout(msg, stage, int(msg.metadata.group_id or 0),
                       lambda r: drops(seed, r, hospital, rate))
        return call_next(msg, ctx)

    return mod
