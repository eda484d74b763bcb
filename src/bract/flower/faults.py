"""Fault injection for simulations: hospitals that drop out at a chosen stage.

Used by ``bract simulate --drop-rate P --drop-stage STAGE`` to show that rounds
survive dropouts at any stage of secure aggregation. Which hospital drops in
which round is a deterministic function of (seed, round, hospital), so a run can
be repeated; it decides nothing an adversary must not predict.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

from flwr.app import Context, Message

#: Dropout stage -> the Flower message type a hospital fails to answer.
DROP_STAGES = {
    "config": "train",
    "mask": "train.secagg_mask",
    "consistency": "train.secagg_check",
    "unmask": "train.secagg_unmask",
}


class InjectedDropoutError(RuntimeError):
    """A simulated hospital failure (Flower turns it into an error reply)."""


def drops(seed: int, fl_round: int, hospital: int, rate: float) -> bool:
    """Whether ``hospital`` drops in ``fl_round``: true for a ``rate`` share of pairs."""
    digest = hashlib.sha256(f"bract-drop:{seed}:{fl_round}:{hospital}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64 < rate


def dropout_mod(rate: float, stage: str, seed: int) -> Callable:
    """A mod that makes a ``rate`` share of hospitals fail at ``stage`` each round."""
    if stage not in DROP_STAGES:
        raise ValueError(f"drop stage {stage!r} must be one of {sorted(DROP_STAGES)}")
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"drop rate must lie in [0, 1] (got {rate})")

    def mod(msg: Message, ctx: Context, call_next: Callable[[Message, Context], Message]):
        if msg.metadata.message_type == DROP_STAGES[stage]:
            fl_round = int(msg.metadata.group_id or 0)
            hospital = int(ctx.node_config.get("partition-id", ctx.node_id))
            if drops(seed, fl_round, hospital, rate):
                raise InjectedDropoutError(f"injected dropout at stage {stage!r}")
        return call_next(msg, ctx)

    return mod
