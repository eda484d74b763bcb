"""bract data <-> Flower records (``ArrayRecord``, ``ConfigRecord``, ``RecordDict``).

Every record key bract uses is named here, so a reviewer can see in one place
exactly what crosses the wire between a hospital and the server.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from bract.flower.replies import (
    MAX_DECISION_TEXT,
    MAX_LEDGER_TEXT,
    ReplyError,
    count_field,
    json_field,
    name_field,
    real_field,
    text_field,
)
from bract.privacy import BudgetDecision, PrivacyLedger
from bract.privacy.metrics_release import RELEASED_METRICS
from bract.records.ledger import LedgerEntry, LedgerError, dumps_jsonl, loads_jsonl
from bract.records.report import is_count
from bract.records.text import one_line
from bract.secagg import Message as SecAggMessage
from bract.secagg import message_from_dict

#: server -> hospital: the global model.
GLOBAL_WEIGHTS = "bract.global"
#: server -> hospital: round number and plan (round, num-rounds).
ROUND_CONFIG = "bract.round"
#: hospital -> server: the locally trained model (only when it trained).
LOCAL_WEIGHTS = "bract.local"
#: hospital -> server: privacy status (ledger events, epsilon, budget decision, and the
#: hospital's signed, hash-chained ledger: bract.records.ledger).
PRIVACY_REPORT = "bract.privacy"
#: hospital -> server: how much the update weighs in FedAvg.
TRAIN_INFO = "bract.train"
#: Key of ``ROUND_CONFIG`` set on the hospital by its secure-aggregation mod: the largest
#: FedAvg weight the round's masking ring carries. The train handler refuses a larger
#: weight before it trains, so nothing is spent on an update that could not be sent.
SECAGG_MAX_WEIGHT = "secagg-max-weight"
#: produced by the hospital's training: metrics on its private data. The metrics
#: guard removes them before a reply leaves unless the hospital's policy releases
#: them (in clear, or only inside the masked vector under secure aggregation).
LOCAL_METRICS = "bract.local-metrics"
#: The hospital's held-out evaluation of the global model it received, as sums over its
#: held-out examples (0 for a hospital without a held-out split).
EVAL_METRICS = RELEASED_METRICS[2:]
#: The metrics a hospital can release (noised sums, see bract.privacy.metrics_release),
#: in their order inside a masked vector, each divided by the hospital's weight so that
#: the masked weighted sum gives the federation's totals.
AGGREGATED_METRICS = RELEASED_METRICS
#: both ways: one secure-aggregation protocol message (see bract.secagg.messages).
SECAGG = "bract.secagg"
#: both ways, only with the unmask stage when share-stage pipelining applies: the
#: next round's config (server -> hospital) and the hospital's shares for it (back).
SECAGG_NEXT = "bract.secagg.next"
#: hospital -> server, instead of SECAGG_NEXT: why it will not share for the next round.
SECAGG_NEXT_REFUSED = "bract.secagg.next-refused"

#: kept in ctx.state on a hospital without a state directory: ledger and calibration,
#: across rounds (the prefix of one record per dataset, ``client.privacy_state_key``).
STATE_PRIVACY = "bract.privacy.state"
#: kept in ctx.state on the hospital: the accountant's recent results (digest -> epsilon).
STATE_EPSILONS = "bract.privacy.epsilons"


def weights_to_record(weights: Mapping[str, np.ndarray]) -> ArrayRecord:
    """Named numpy arrays -> ArrayRecord (names kept, order kept)."""
    record = ArrayRecord()
    for name, arr in weights.items():
        record[name] = Array.from_numpy_ndarray(np.ascontiguousarray(arr))
    return record


def weights_digest(weights: Mapping[str, np.ndarray]) -> bytes:
    """SHA-256 over the weights' names, dtypes, shapes and bytes, in order: the digest a
    hospital signs with its masked update (the global model it trained from), so that
    no secure sum mixes updates computed from different global models."""
    import hashlib

    h = hashlib.sha256(b"bract/global-model/v1")
    for name, arr in weights.items():
        a = np.ascontiguousarray(arr)
        head = f"{name}\0{a.dtype.str}\0{list(a.shape)}\0".encode()
        h.update(len(head).to_bytes(8, "big") + head)
        h.update(a.nbytes.to_bytes(8, "big"))
        h.update(memoryview(a).cast("B") if a.nbytes else b"")
    return h.digest()


def settings_digest(run_config: Mapping[str, Any], round_config: Mapping[str, Any]) -> bytes:
    """SHA-256 over the training settings a hospital took from the coordinator: the run
    config and the message's round config (canonical JSON, keys sorted). With
    :func:`weights_digest` it is what a hospital signs with its masked update: the same
    model trained under other settings (a vanishing learning rate, say) is another
    update, and no secure sum mixes them."""
    import hashlib

    def plain(value: Any) -> Any:
        return value.hex() if isinstance(value, bytes) else repr(value)

    text = json.dumps({"run": dict(run_config), "round": dict(round_config)},
                      sort_keys=True, separators=(",", ":"), default=plain)
    return hashlib.sha256(b"bract/training-settings/v1" + text.encode()).digest()


def record_to_weights(record: ArrayRecord) -> dict[str, np.ndarray]:
    """ArrayRecord -> named numpy arrays."""
    return {name: arr.numpy() for name, arr in record.items()}


def _finite_or_str(x: float) -> float | str:
    return x if math.isfinite(x) else str(x)


def privacy_report_record(
    ledger: PrivacyLedger,
    decision: BudgetDecision,
    *,
    trained: bool,
    epsilon: float,
    noise_multiplier: float,
    sample_rate: float,
    chain: Sequence[LedgerEntry] = (),
    appended: int | None = None,
    weight_bound: int | None = None,
) -> ConfigRecord:
    """What a hospital tells the server about its privacy after a round.

    Only accounting data: the ledger of mechanism events, the epsilon it
    computed, its budget decision, and its whole signed ledger ``chain`` (so a
    server that missed a reply still gets every entry), ``appended``: how many
    entries this round added (its metrics release and its DP-SGD; default: one if
    it trained); ``weight_bound``: the largest FedAvg weight its plan allows
    (:attr:`bract.privacy.TrainingPlan.weight_bound`, a function of the batch size and
    the sample rate), from which the server sizes the secure-aggregation ring. Nothing
    derived from patient data beyond what the sample rate already says.
    """
    extra: dict[str, int] = {} if weight_bound is None else {"weight-bound": int(weight_bound)}
    return ConfigRecord(
        {
            **extra,
            "client-id": ledger.client_id,
            "trained": trained,
            "ledger": ledger.to_json(),
            "epsilon": _finite_or_str(epsilon),
            "noise-multiplier": noise_multiplier,
            "sample-rate": sample_rate,
            "steps": ledger.total_steps,
            "decision": json.dumps(decision.to_plain(), sort_keys=True),
            "reason": decision.reason,
            "signed-ledger": dumps_jsonl(chain),
            "appended": int(appended if appended is not None else (1 if trained else 0)),
        }
    )


def read_privacy_report(content: RecordDict) -> dict[str, Any]:
    """Parse a hospital's privacy report, field by field (:mod:`bract.flower.replies`).

    Guarantee: the only exception is :class:`~bract.flower.replies.ReplyError` (a
    ``ValueError``) naming the field, whatever the record holds; every value returned
    is in the range the run's report is read back in: ``client_id`` a printable name
    of at most 128 characters (empty: none given); ``trained`` a ``bool``;
    ``epsilon`` a number >= 0 or ``inf`` (never NaN); ``noise_multiplier`` finite and
    >= 0 and ``sample_rate`` in [0, 1] (``nan`` when absent: unknown); ``steps``,
    ``appended`` counts in [0, 2**53] and ``steps`` equal to the reported ledger's
    DP-SGD steps (absent: that total); ``weight_bound`` an ``int`` >= 1 or ``None``;
    ``decision`` a JSON object; ``reason`` one line of printable text of at most
    :data:`~bract.records.text.MAX_TEXT` characters (:func:`~bract.records.text.one_line`);
    the ledger and the signed chain parsed and range-checked by their own readers, their
    texts at most :data:`~bract.flower.replies.MAX_LEDGER_TEXT` characters."""
    if PRIVACY_REPORT not in content.config_records:
        raise ReplyError(f"reply carries no {PRIVACY_REPORT!r} record")
    rec = content.config_records[PRIVACY_REPORT]
    for key in ("client-id", "trained", "ledger", "epsilon", "reason"):
        if key not in rec:
            raise ReplyError(f"privacy report lacks {key!r}")
    trained = rec["trained"]
    if not isinstance(trained, bool):
        raise ReplyError(f"'trained' is {one_line(repr(trained), 40)}, not true or false")
    try:
        ledger = PrivacyLedger.from_json(text_field(rec, "ledger", max_chars=MAX_LEDGER_TEXT))
    except ReplyError:
        raise
    except ValueError as exc:  # PrivacyError
        raise ReplyError(f"'ledger': {one_line(str(exc), 200)}") from None
    try:
        chain = loads_jsonl(text_field(rec, "signed-ledger", max_chars=MAX_LEDGER_TEXT,
                                       default=""), "signed ledger")
    except ReplyError:
        raise
    except LedgerError as exc:
        raise ReplyError(f"'signed-ledger': {one_line(str(exc), 200)}") from None
    total = ledger.total_steps
    steps = count_field(rec, "steps", default=total if is_count(total) else 0)
    if steps != total:
        raise ReplyError(f"'steps' is {steps}, but its ledger records {total} DP-SGD steps")
    decision = json_field(rec, "decision", max_chars=MAX_DECISION_TEXT, default="{}")
    if not isinstance(decision, dict):
        raise ReplyError("'decision' is not a JSON object")
    # Only sizes the secure-aggregation ring, which caps it at what the ring carries.
    bound = count_field(rec, "weight-bound", low=1, bounded=False, default=None)
    return {
        "client_id": name_field(rec, "client-id"),
        "trained": trained,
        "ledger": ledger,
        "epsilon": real_field(rec, "epsilon", allow_inf=True),
        "noise_multiplier": real_field(rec, "noise-multiplier", default=math.nan),
        "sample_rate": real_field(rec, "sample-rate", high=1.0, default=math.nan),
        "steps": steps,
        "decision": decision,
        "reason": one_line(text_field(rec, "reason", max_chars=2**31)),
        "chain": chain,
        "appended": count_field(rec, "appended", default=1 if trained else 0),
        "weight_bound": bound,
    }


def reply_sources(sent: list[Message], replies: list[Message]) -> list[tuple[int, Message]]:
    """Pair each reply with the node the request went to.

    An error reply made by the SuperLink on a node's behalf (e.g. "Node
    Unavailable") does not come from that node; it is matched through the id of
    the message it answers. Replies that match no sent message keep their source.
    """
    to_node = {m.metadata.message_id: m.metadata.dst_node_id for m in sent if m.metadata.message_id}
    return [
        (to_node.get(r.metadata.reply_to_message_id, r.metadata.src_node_id), r) for r in replies
    ]


def secagg_to_record(msg: SecAggMessage) -> ConfigRecord:
    """A secure-aggregation message as a ConfigRecord (its plain-data form)."""
    return ConfigRecord(msg.to_dict())


def secagg_from_record(record: ConfigRecord) -> SecAggMessage:
    """Inverse of :func:`secagg_to_record`; the protocol validates every field."""
    return message_from_dict(dict(record))
