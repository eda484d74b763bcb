"""A hospital's pending masked update (its noised update, kept in ``ctx.state``
between the train stage and the mask stage of a secure round) is there only right
after a train stage that produced it: whatever message comes next (the mask request
of its round, another round's config or mask request, a consistency or unmask
request after a missed mask stage, a refusal or a failure at any stage) takes it out."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from hypothesis import given, settings
from hypothesis import strategies as st

from bract.flower import secagg_client
from bract.flower.records import (
    GLOBAL_WEIGHTS,
    LOCAL_WEIGHTS,
    SECAGG,
    TRAIN_INFO,
    weights_to_record,
)
from bract.flower.secagg_client import STATE_PENDING, SecAggIdentity
from bract.secagg import (
    ConsistencyRequest,
    MaskRequest,
    RoundConfig,
    SecAggError,
    UnmaskRequest,
)

KINDS = {"config": RoundConfig, "mask": MaskRequest, "check": ConsistencyRequest,
         "unmask": UnmaskRequest}


def _request(kind: str, rnd: int, fail: bool):
    """A stand-in of a protocol message of ``kind`` (only its class and round matter
    to the hospital's Flower side; the fake session below plays the protocol)."""
    req = object.__new__(KINDS[kind])
    object.__setattr__(req, "round", rnd)
    object.__setattr__(req, "fail", fail)
    return req


class FakeSession:
    """The protocol session: accepts or refuses (SecAggError) as each message says."""

    node_id, federation_id = 1, "fed"

    def check_round_config(self, cfg) -> None:
        if cfg.fail:
            raise SecAggError("refused round config")

    def check_mask_request(self, req) -> None:
        if req.fail:
            raise SecAggError("refused mask request")

    def max_weight_for(self, cfg) -> None:
        return None

    def _answer(self, req, *args, **kwargs) -> str:
        if req.fail:
            raise SecAggError("refused")
        return "answer"

    handle_round_config = handle_mask_request = _answer
    handle_consistency_request = handle_unmask_request = _answer

    def export_state(self) -> bytes:
        return b""


def _hospital(monkeypatch):
    """Drive the secure-aggregation mod and stage handlers with stand-in messages."""
    requests: dict[int, object] = {}

    def decode(record):
        return requests[int(record["id"])]

    monkeypatch.setattr(secagg_client, "secagg_from_record", decode)
    monkeypatch.setattr(secagg_client, "secagg_to_record", lambda out: ConfigRecord({"out": 1}))
    monkeypatch.setattr(secagg_client, "_session", lambda ident, ctx: FakeSession())
    identity = SecAggIdentity(1, b"k" * 32, {}, "fed")
    mod = secagg_client.secagg_mod(identity)
    stages = {kind: secagg_client._stage_handler(identity, KINDS[kind])
              for kind in ("mask", "check", "unmask")}
    ctx = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})
    weights = {"w": np.zeros(3, np.float32)}

    def send(kind: str, rnd: int, fail: bool, train: str) -> bool:
        """One message; True when the hospital answered without an error."""
        requests[len(requests)] = _request(kind, rnd, fail)
        content = RecordDict({SECAGG: ConfigRecord({"id": len(requests) - 1})})
        content.array_records[GLOBAL_WEIGHTS] = weights_to_record(weights)
        on_train_stage = kind == "config" or (kind == "mask" and train != "skip")
        msg = Message(content, dst_node_id=7, group_id=str(rnd),
                      message_type="train" if on_train_stage else f"train.secagg_{kind}")

        def trainer(m: Message, c: Context) -> Message:
            if train == "error":
                raise ValueError("training failed")
            reply = RecordDict()
            if train == "trained":
                reply.array_records[LOCAL_WEIGHTS] = weights_to_record(
                    {"w": np.ones(3, np.float32)})
                reply.metric_records[TRAIN_INFO] = MetricRecord({"num-examples": 10})
            return Message(reply, reply_to=m)

        try:
            if on_train_stage:
                mod(msg, ctx, trainer)
            else:
                stages[kind](msg, ctx)
        except (SecAggError, ValueError):
            return False
        return True

    return ctx, send


# A message: its stage (a round config or a pipelined mask request on the train stage,
# or a mask / consistency / unmask stage message), its round, whether the protocol
# refuses it, and what training does where it runs (trained, refused by the budget:
# nothing to send, or an error; "skip": a mask-stage message, no training).
messages = st.lists(st.tuples(
    st.sampled_from(["config", "mask", "check", "unmask"]),
    st.integers(1, 3), st.booleans(),
    st.sampled_from(["trained", "refused", "error", "skip"])), max_size=12)


@settings(max_examples=150, deadline=None)
@given(sequence=messages)
def test_a_pending_update_outlives_no_message_after_its_train_stage(sequence) -> None:
    with pytest.MonkeyPatch.context() as monkeypatch:
        ctx, send = _hospital(monkeypatch)
        for kind, rnd, fail, train in sequence:
            ok = send(kind, rnd, fail, train)
            pending = ctx.state.config_records.get(STATE_PENDING)
            if kind == "config" and ok and train == "trained":
                assert pending is not None and int(pending["round"]) == rnd
            else:
                assert pending is None, (kind, rnd, fail, train)


def test_the_mask_request_of_its_round_uses_the_pending_update(monkeypatch) -> None:
    """The positive case: config, then the mask request of the same round, answered."""
    ctx, send = _hospital(monkeypatch)
    assert send("config", 1, False, "trained")
    assert ctx.state.config_records[STATE_PENDING]["round"] == 1
    assert send("mask", 1, False, "skip")
    assert STATE_PENDING not in ctx.state.config_records
    assert send("config", 2, False, "trained") and not send("mask", 1, False, "skip")
    assert STATE_PENDING not in ctx.state.config_records  # refused: another round's
