"""Server side of secure aggregation over Flower's Grid.

Drives one :class:`bract.secagg.ServerSession` through the protocol's stages with
``grid.send_and_receive``; every message and check is the protocol's own (see
:mod:`bract.secagg.protocol`). Per round, in order:

0. ``query.secagg_advertise`` — only to hospitals whose share-channel key the
   server lacks (first round, or a hospital that joins later).
1. ``train`` with the round config: hospitals train, answer with shares.
2. ``train.secagg_mask``: masked updates, summed as they arrive.
3. ``train.secagg_check``: signatures over the alive set.
4. ``train.secagg_unmask``: shares to remove the masks.

Share-stage pipelining (:mod:`bract.secagg.protocol`): when every hospital the
next round will ask is in this round's signed alive set, the ``unmask`` message
also carries the next round's config (record ``bract.secagg.next``) and the
replies bring the next round's shares. The next round then needs only three
stages: ``train`` carrying each hospital's mask request (it trains and masks in
one message), ``check`` and ``unmask``. After a failure or a resume, a round
takes the four-stage path above.

A hospital that errors or does not answer at any stage is a dropout, and the
round loop hears of it with its reason (:meth:`RoundHooks.on_dropped`,
:meth:`RoundHooks.on_missing`); the round completes while at least the threshold
remains, else it aborts and reveals nothing more (the global model is left
unchanged). Either way the round's record names who advertised, whose masked input
arrived (``alive``) and which key sharers dropped before theirs did (``dropped``); a
completed round also names the hospitals whose masked input is in its sum but that
failed at the check or unmask stage after sending it (``failed_after_input``).
A hospital whose unmask reply holds a share that does not open its dealer's
commitment is excluded from the round and named in its record; the round
completes from the valid shares, or aborts. No protocol error leaves this module:
an aborted round is a value.
"""

from __future__ import annotations

import contextlib
import math
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from bract.flower.exchange import REPLY_POLL_MAX, send_and_receive
from bract.flower.records import (
    AGGREGATED_METRICS,
    PRIVACY_REPORT,
    SECAGG,
    SECAGG_NEXT,
    SECAGG_NEXT_REFUSED,
    reply_sources,
    secagg_from_record,
    secagg_to_record,
)
from bract.secagg import (
    AggregateResult,
    AuthenticationError,
    EncodingConfig,
    KeyAdvertisement,
    KeyRotationRequired,
    RoundAborted,
    RoundConfig,
    SecAggError,
    ServerSession,
)
from bract.secagg import Message as SecAggMessage
from bract.secagg.protocol import check_dropouts, dropout_tolerance
from bract.secagg.recording import (
    RecordingServerSession,
    ServerView,
    view_directory,
    write_view,
)

STAGE_TYPES = {
    "mask": "train.secagg_mask",
    "check": "train.secagg_check",
    "unmask": "train.secagg_unmask",
}


@dataclass
class SecureRoundInfo:
    """What report.json records about one secure round."""

    clients: int = 0
    advertised: list[str] = field(default_factory=list)
    alive: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    stages: int = 0
    seconds: float = 0.0
    aborted: str | None = None
    error_bound: float = 0.0
    #: Hospitals caught cheating in the unmask stage (a share that does not open its
    #: dealer's commitment, or shares that do not open their own), excluded this round.
    excluded: list[str] = field(default_factory=list)
    #: Hospitals of a completed round whose masked input is in its sum (they are in
    #: ``alive``) but that failed at the check or unmask stage after sending it (did
    #: not answer, or a reply was refused): the round's sum holds their update, so the
    #: round averaged it although they are among the round's failed.
    failed_after_input: list[str] = field(default_factory=list)
    threshold: int = 0
    colluders: int = 0
    min_honest: int = 0
    #: The masking ring Z_(2^ring_bits) (the smallest with headroom for the round's
    #: hospitals, weights and clip), the largest weight it was sized for, and the graph
    #: each hospital masks with: its kind, each hospital's number of neighbours, and how
    #: many hospitals the round survives dropping out wherever they fall.
    ring_bits: int = 0
    max_weight: int = 0
    graph: str = ""
    degree: int = 0
    dropouts_tolerated: int = 0

    def to_plain(self) -> dict[str, Any]:
        """Plain JSON-able dict."""
        return {
            "clients": self.clients, "advertised": self.advertised,
            "alive": self.alive, "dropped": self.dropped,
            "stages": self.stages, "seconds": self.seconds, "aborted": self.aborted,
            "error_bound": self.error_bound, "excluded": self.excluded,
            "failed_after_input": self.failed_after_input,
            "threshold": self.threshold, "colluders": self.colluders,
            "min_honest": self.min_honest, "ring_bits": self.ring_bits,
            "max_weight": self.max_weight, "graph": self.graph, "degree": self.degree,
            "dropouts_tolerated": self.dropouts_tolerated,
        }


Notify = Callable[[str], None]

#: The weight a masking ring is sized for when a hospital has not yet reported its
#: weight bound in this run (2^20 examples: with the default clip and resolution, a
#: 64-bit ring for any round of up to 2^23 hospitals).
DEFAULT_MAX_WEIGHT = 2**20

#: The range ``clip * max_weight`` a round whose hospitals release metrics in
#: aggregate carries at least (when ``max_weight`` is sized automatically): each
#: released sum travels unweighted and unclipped within ``[-2^20, 2^20]``. A released
#: sum is at most ``L`` per record of its split (``L``: the loss bound, 4 by default)
#: plus Gaussian noise of std ``sigma_m * sqrt(3) * L`` (69.3 at the defaults), so a
#: hospital of up to 2^17 records in a split leaves the range only when its noise
#: exceeds 7500 standard deviations; one that does leaves the round (never clipped).
METRICS_RANGE = 2.0**20


@dataclass(frozen=True)
class SecAggSettings:
    """How the server runs secure aggregation (hospitals enforce their own minimums).

    ``clip`` bounds each coordinate of a hospital's update (local minus global
    weights) for the fixed-point encoding; ``frac_bits`` sets its resolution
    (2^-frac_bits). ``aggregate_metrics`` is the number of metric coordinates the
    hospitals append to the vector (0 unless their policy releases metrics in
    aggregate): each carries a hospital's released sum unweighted, so the server
    decodes the exact total over the hospitals (within the round's error bound), and
    a sum beyond the round's ``clip * max_weight`` makes its hospital leave the round
    instead of being clipped; with ``max_weight`` sized automatically that range is
    at least :data:`METRICS_RANGE`. ``colluders`` (``None``: ``floor((R - 1) / 3)``
    of the roster's R hospitals, in every round whatever its size) and ``min_honest`` are the
    collusion bound rounds are set up for; each hospital refuses a round weaker than
    its own policy. ``dropouts`` is how many
    hospitals every round must survive dropping out, wherever they fall (``None``: not
    declared); ``graph="auto"`` then picks, each round, the sparsest graph that keeps
    the bound and that tolerance (:func:`bract.secagg.protocol.round_parameters`).

    ``max_weight`` is the largest FedAvg weight (example count) the masking ring must
    carry for one hospital; ``None`` (default) sizes it round by round from the
    hospitals' reported weight bounds (:attr:`bract.privacy.TrainingPlan.weight_bound`,
    a function of the sample rate and batch size their reports already publish), and
    takes :data:`DEFAULT_MAX_WEIGHT` for a hospital that has not reported in this run.
    The ring is then the smallest with headroom (32 bits where it suffices).
    """

    federation_id: str
    roster: dict[int, bytes]
    clip: float = 8.0
    frac_bits: int = 16
    max_weight: int | None = None
    graph: str = "auto"
    colluders: int | None = None
    min_honest: int = 2
    dropouts: int | None = None
    aggregate_metrics: int = 0
    #: When set, the server's view of every completed round (each message it received
    #: and sent, and the aggregate) is written to ``record_dir/round-N`` for
    #: ``bract audit secagg --view`` to check that no single update can be recovered.
    record_dir: str | None = None
    #: Stop the federation after this many consecutive secure rounds that aborted after
    #: their hospitals trained (each spent its privacy budget on a round that produced
    #: no model; one malicious hospital can make every round abort, see
    #: docs/secagg.md); ``None`` never stops for this.
    abort_limit: int | None = 2

    def __post_init__(self) -> None:
        if self.max_weight is not None:
            carried = EncodingConfig(clip=self.clip, frac_bits=self.frac_bits).largest_weight(
                len(self.roster))
            if (not isinstance(self.max_weight, int) or isinstance(self.max_weight, bool)
                    or not 1 <= self.max_weight <= carried):
                raise ValueError(
                    f"max_weight must be an int in [1, {carried}] (what the 64-bit ring "
                    f"carries for {max(1, len(self.roster))} hospitals at clip "
                    f"{self.clip:g}, 2^{self.frac_bits}), got {self.max_weight!r}; every "
                    "secure round would abort. Leave it None to size the ring from the "
                    "hospitals' reports"
                )
        if self.roster and self.dropouts is not None:
            try:
                check_dropouts(len(self.roster), self.graph, None, self.colluders,
                               self.min_honest, self.dropouts)
            except SecAggError as exc:
                raise ValueError(f"{exc} (for the {len(self.roster)} hospitals of the "
                                 "roster)") from None
        if self.abort_limit is not None and (
                not isinstance(self.abort_limit, int) or isinstance(self.abort_limit, bool)
                or self.abort_limit < 1):
            raise ValueError(f"abort_limit must be an int >= 1 or None, got "
                             f"{self.abort_limit!r}")
        if self.aggregate_metrics not in (0, len(AGGREGATED_METRICS)):
            raise ValueError(
                f"aggregate_metrics must be 0 (no metric leaves) or "
                f"{len(AGGREGATED_METRICS)} (the hospitals' {list(AGGREGATED_METRICS)}), "
                f"got {self.aggregate_metrics}: any other count makes every hospital's "
                "masked vector the wrong length"
            )

    def encoding(self, weight_bounds: Sequence[int | None] = ()) -> EncodingConfig:
        """The fixed-point encoding of a round whose hospitals reported
        ``weight_bounds`` (``None``: no report yet): ``max_weight`` when set, else the
        largest bound (:data:`DEFAULT_MAX_WEIGHT` standing in for a missing one, and
        for a round with no hospital named), capped at the largest weight the 64-bit
        ring carries for that many hospitals; with ``aggregate_metrics``, at least
        ``METRICS_RANGE / clip`` (within that cap), so the released sums travel
        unclipped (:data:`METRICS_RANGE`). The cap keeps one report no ring can
        carry (a mistake, or a hospital forging its report) from aborting every round:
        the round goes ahead, and an honest hospital whose bound exceeds it refuses
        before training (:func:`bract.flower.client.ring_refuses`)."""
        if self.max_weight is not None:
            limit = self.max_weight
        else:
            known = [DEFAULT_MAX_WEIGHT if b is None else int(b) for b in weight_bounds]
            carried = EncodingConfig(clip=self.clip, frac_bits=self.frac_bits).largest_weight(
                len(known))
            want = max(known, default=DEFAULT_MAX_WEIGHT)
            if self.aggregate_metrics:
                want = max(want, math.ceil(METRICS_RANGE / self.clip))
            limit = max(1, min(want, carried))
        return EncodingConfig(clip=self.clip, frac_bits=self.frac_bits, max_weight=limit)

    def to_plain(self) -> dict[str, Any]:
        """Plain dict for report.json (public keys as hex)."""
        return {
            "federation_id": self.federation_id,
            "roster": {str(k): v.hex() for k, v in sorted(self.roster.items())},
            "clip": self.clip, "frac_bits": self.frac_bits,
            "max_weight": "auto" if self.max_weight is None else self.max_weight,
            "graph": self.graph, "colluders": self.colluders, "min_honest": self.min_honest,
            "dropouts": self.dropouts, "aggregate_metrics": self.aggregate_metrics,
            "record_dir": self.record_dir, "abort_limit": self.abort_limit,
        }


class RoundHooks(Protocol):
    """How the round loop takes part in a secure round (:meth:`SecureAggregator.run_round`)."""

    def train_content(self, node: int, content: RecordDict) -> None:
        """Add the training instruction (global model, round config) to a ``train`` message."""

    def on_train_reply(self, node: int, reply: Message) -> bool:
        """Read a ``train`` reply's privacy report; whether the hospital trained."""

    def on_missing(self, node: int) -> None:
        """A hospital that did not answer a message of the round (any stage)."""

    def on_dropped(self, node: int, reason: str) -> None:
        """A hospital whose reply at a protocol stage failed or was refused, and why
        (it is out of the round from that stage on)."""

    def label(self, node: int) -> str:
        """The hospital's name for the report."""

    def note(self, text: str) -> None:
        """Tell the operator (live table or log)."""

    def next_nodes(self) -> Sequence[int] | None:
        """The hospitals the next round will ask (``None``: no next round)."""

    def input_digest(self) -> bytes:
        """The digest of the global model this round sends
        (:func:`bract.flower.records.weights_digest`)."""


class SecureAggregator:
    """Runs bract's secure aggregation for the server over a Flower Grid.

    ``roster`` maps each hospital's secagg id to its Ed25519 public key. The
    mapping from Flower node ids to secagg ids is learnt from the hospitals'
    signed advertisements.
    """

    def __init__(
        self,
        grid: Grid,
        settings: SecAggSettings,
        *,
        timeout: float | None = None,
        round_offset: int = 0,
        poll: float = REPLY_POLL_MAX,
    ) -> None:
        self.grid = grid
        self.settings = settings
        #: Longest pause between pulls while waiting for a stage's replies.
        self.poll = poll
        #: Each hospital's weight bound from its last train reply in this run (Flower
        #: node id -> bound); a hospital that failed or did not answer is forgotten, so
        #: its next round is sized for the default until it reports again.
        self.weight_bounds: dict[int, int] = {}
        self.record_dir = Path(settings.record_dir) if settings.record_dir else None
        session_type = RecordingServerSession if self.record_dir is not None else ServerSession
        self.session = session_type(
            settings.federation_id, dict(settings.roster), encoding=settings.encoding(),
            graph=settings.graph, colluders=settings.colluders, min_honest=settings.min_honest,
            dropouts=settings.dropouts,
        )
        self.timeout = timeout
        self.node_of: dict[int, int] = {}  # secagg id -> Flower node id
        self.sid_of: dict[int, int] = {}  # Flower node id -> secagg id
        #: The run's number among resumed runs (0 for a fresh run): the high part of
        #: every protocol round number, so that a resumed run never reuses a
        #: protocol round a hospital has already seen, including a next round that
        #: was opened (pipelined) just before an interruption.
        if not 0 <= round_offset < 2**22:
            raise ValueError(f"round_offset must lie in [0, 2^22), got {round_offset}")
        self.round_offset = round_offset
        self._last_config: RoundConfig | None = None  # of the round in progress
        #: Hospitals that answered a round config with "no key to use" (e.g. a hospital
        #: whose ctx.state was lost): asked for an advertisement before the next round.
        self._readvertise: set[int] = set()
        #: The round in progress: its key sharers (secagg ids, once fixed) and the
        #: senders of the masked inputs accepted so far.
        self._round_sharers: list[int] = []
        self._round_alive: set[int] = set()
        #: Flower nodes that did not answer, or whose reply was refused, at the check or
        #: unmask stage of the round in progress.
        self._round_failed_late: set[int] = set()
        #: Recording: one view written at a time; once the run has stopped
        #: (:meth:`record_interrupted`), nothing more is written.
        self._record_lock = threading.RLock()
        self._stopped = False

    def protocol_round(self, fl_round: int, attempt: int = 0) -> int:
        """The protocol's (strictly increasing) round number for an FL round;
        ``attempt`` 1 is a round restarted after a pipelined one was abandoned."""
        if not 0 <= fl_round < 2**20 or attempt not in (0, 1):
            raise ValueError(f"FL round {fl_round} / attempt {attempt} out of range")
        return (self.round_offset << 40) | (fl_round << 20) | attempt

    def round_encoding(self, nodes: Sequence[int]) -> EncodingConfig:
        """The encoding of a round over ``nodes``: its ring sized for their weight bounds."""
        return self.settings.encoding([self.weight_bounds.get(n) for n in nodes])

    # ------------------------------------------------------------------ helpers
    def _exchange(
        self, rnd: int, message_type: str, payloads: Mapping[int, SecAggMessage],
        extra: Callable[[int, RecordDict], None] | None = None,
    ) -> dict[int, Message]:
        """Send one stage to the given Flower nodes; returns the replies by node."""
        messages = []
        for node, payload in payloads.items():
            content = RecordDict({SECAGG: secagg_to_record(payload)})
            if extra is not None:
                extra(node, content)
            messages.append(
                Message(content, dst_node_id=node, message_type=message_type, group_id=str(rnd))
            )
        replies = send_and_receive(self.grid, messages, self.timeout, max_poll=self.poll)
        return dict(reply_sources(messages, replies))

    @staticmethod
    def _payload(reply: Message) -> SecAggMessage:
        if reply.has_error():
            raise SecAggError(reply.error.reason)
        if SECAGG not in reply.content.config_records:
            raise SecAggError("reply carries no secure-aggregation record")
        return secagg_from_record(reply.content.config_records[SECAGG])

    def ensure_keys(self, rnd: int, nodes: Sequence[int], note: Notify,
                    refused: dict[int, str] | None = None) -> list[int] | None:
        """Stage 0: collect advertisements from nodes the server cannot use yet.

        Each advertisement must name the Flower node it comes from (its signed
        origin), so a hospital cannot answer with another's and take its identity.
        Returns the nodes whose keys were accepted, or ``None`` when the stage was
        skipped (every key known); ``refused`` receives each node whose answer was
        refused (an error reply, an invalid advertisement) with why.
        """
        ask = [n for n in nodes if n not in self.sid_of or n in self._readvertise]
        if not ask:
            return None
        accepted: list[int] = []
        messages = [
            Message(RecordDict(), dst_node_id=n, message_type="query.secagg_advertise",
                    group_id=str(rnd))
            for n in ask
        ]
        replies = send_and_receive(self.grid, messages, self.timeout, max_poll=self.poll)
        for node, reply in reply_sources(messages, replies):
            try:
                adv = self._payload(reply)
                if not isinstance(adv, KeyAdvertisement):
                    raise SecAggError(f"expected an advertisement, got {adv.KIND}")
                self.session.receive_advertisement(adv, origin=node)
            except SecAggError as exc:
                note(f"round {rnd}: node {node} key advertisement refused: {exc}")
                if refused is not None:
                    refused[node] = f"key advertisement refused: {exc}"
                continue
            self.node_of[adv.node_id] = node
            self.sid_of[node] = adv.node_id
            self._readvertise.discard(node)
            accepted.append(node)
        return accepted

    # -------------------------------------------------------------------- round
    def run_round(
        self, rnd: int, nodes: Sequence[int], dim: int, hooks: RoundHooks,
    ) -> tuple[AggregateResult | None, SecureRoundInfo]:
        """One secure round over ``nodes``; ``None`` if it aborted (nothing revealed).

        The round loop takes part through ``hooks`` (:class:`RoundHooks`): it adds the
        training instruction to each ``train`` message, reads each ``train`` reply's
        privacy report, hears of hospitals that did not answer, names them, and says
        at the unmask stage which hospitals the next round will ask; when all of them
        are in this round's signed alive set, the next round is opened with this
        one's unmask messages (pipelining).
        """
        note, label = hooks.note, hooks.label
        t0 = time.perf_counter()
        info = SecureRoundInfo()
        advertised: list[int] | None = None
        # What the round's record names even when it aborts.
        self._round_sharers, self._round_alive = [], set()
        self._round_failed_late = set()
        prepared = self._prepared(rnd, nodes, note)
        if prepared is None:
            refused: dict[int, str] = {}
            advertised = self.ensure_keys(rnd, nodes, note, refused)
            if advertised is not None:
                info.stages += 1
            ready = [n for n in nodes if n in self.sid_of]
            for node in set(nodes) - set(ready):  # out before the round began: named
                if node in refused:
                    hooks.on_dropped(node, refused[node])
                else:
                    hooks.on_missing(node)
        else:
            ready = prepared
        info.clients = len(ready)
        if len(ready) < 3:
            info.aborted = f"only {len(ready)} hospitals with valid keys; need at least 3"
            if self.record_dir is not None:
                self._record_never_opened(rnd, info.aborted, note)
            info.seconds = time.perf_counter() - t0
            return None, info
        log_start = len(getattr(self.session, "log", ()))
        self._last_config: RoundConfig | None = None
        try:
            # A stage counts once its messages go out (not when it aborts before).
            if prepared is None:
                self._config_and_train(rnd, ready, dim, hooks, info)
                stages = ("mask", "check", "unmask")
            else:
                self._last_config = self.session.open_config()
                self._mask_and_train(rnd, ready, hooks, info)
                stages = ("check", "unmask")
            for stage in stages:
                if stage == "unmask":
                    self._unmask_stage(rnd, dim, hooks, info)
                    continue
                request_fn, receive = {
                    "mask": (self.session.mask_requests, self._receive_masked_input),
                    "check": (self._check_requests, self.session.receive_consistency_signature),
                }[stage]
                by_sid = request_fn()
                if stage == "mask":
                    self._round_sharers = sorted(by_sid)
                requests = {self.node_of[sid]: req for sid, req in by_sid.items()}
                info.stages += 1
                replies = self._exchange(rnd, STAGE_TYPES[stage], requests)
                for node in requests:
                    if node not in replies:
                        hooks.on_missing(node)
                        self._late_failure(stage, node)
                for node, reply in replies.items():
                    if not self._receive(rnd, node, reply, receive, hooks, stage):
                        self._late_failure(stage, node)
            result = self.session.finish()
        except SecAggError as exc:
            # RoundAborted, or a round the server itself cannot set up (e.g. a graph
            # that cannot honour the collusion bound): the round ends, the run goes on.
            self.session.abort_round(str(exc))
            info.advertised = sorted(label(n) for n in advertised or [])
            info.alive = sorted(label(self.node_of[s]) for s in self._round_alive)
            info.dropped = sorted(label(self.node_of[s])
                                  for s in set(self._round_sharers) - self._round_alive)
            info.excluded = sorted(label(self.node_of[s])
                                   for s in getattr(exc, "cheaters", ()) if s in self.node_of)
            info.aborted = self._public_reason(str(exc))
            self._describe(info)
            if self.record_dir is not None:
                self._record_aborted(rnd, log_start, note, info.aborted)
            info.seconds = time.perf_counter() - t0
            return None, info
        # Labels after the train stage: the hospitals' names are known from their reports.
        info.advertised = sorted(label(n) for n in advertised or [])
        info.alive = sorted(label(self.node_of[s]) for s in result.alive)
        info.dropped = sorted(label(self.node_of[s]) for s in result.dropped)
        info.error_bound = float(result.error_bound)
        info.excluded = sorted(label(self.node_of[s]) for s in result.excluded)
        info.failed_after_input = sorted(label(self.node_of[s]) for s in result.alive
                                         if self.node_of[s] in self._round_failed_late)
        self._describe(info)
        if self.record_dir is not None:
            self._record(rnd, log_start, result, note)
        info.seconds = time.perf_counter() - t0
        return result, info

    def _prepared(self, rnd: int, nodes: Sequence[int], note: Notify) -> list[int] | None:
        """The hospitals of FL round ``rnd`` if it was opened with the previous round's
        unmask stage for exactly ``nodes`` and enough of them shared keys for it to go
        on; otherwise abandon any open round (nothing of it was revealed; its sharers
        re-key at the advertise stage) and return ``None``: the round then opens afresh
        with its training instruction, and asks every hospital again."""
        open_config = self.session.open_config()
        if open_config is None:
            return None
        wanted = sorted(self.sid_of.get(n, -1) for n in nodes)
        if (self.session.stage == "config" and open_config.round == self.protocol_round(rnd)
                and list(open_config.participants) == wanted):
            short = self.session.shares_shortfall()
            if short is None:
                return [self.node_of[sid] for sid in open_config.participants]
            why = f"too few hospitals shared keys with round {rnd - 1}'s unmask ({short})"
            note(f"round {rnd}: the round opened early is abandoned, {why}; it opens "
                 "again with the training instruction")
        else:
            why = "the pipelined round's hospitals are not this round's"
        self.session.abort_round(why)
        if self.record_dir is not None:
            self._record_abandoned(open_config.round)
        return None

    def _config_and_train(
        self, rnd: int, ready: list[int], dim: int, hooks: RoundHooks, info: SecureRoundInfo,
    ) -> None:
        """Four-stage path, stage 1: the round config travels with the training
        instruction; hospitals train and answer with their shares."""
        # attempt 1 if a pipelined round with this FL round's number was abandoned
        number = self.protocol_round(rnd)
        if number <= self.session.last_round:
            number = self.protocol_round(rnd, attempt=1)
        cfg = self.session.start_round(number, [self.sid_of[n] for n in ready], dim,
                                       encoding=self.round_encoding(ready))
        # A hospital whose update comes from another model is not alive (instead of
        # every honest hospital refusing the round's alive set).
        self.session.expect_input_digest(hooks.input_digest())
        self._last_config = cfg
        info.stages += 1
        self._train_exchange(rnd, dict.fromkeys(ready, cfg), self.session.receive_shares,
                             hooks)

    def _mask_and_train(
        self, rnd: int, ready: list[int], hooks: RoundHooks, info: SecureRoundInfo,
    ) -> None:
        """Pipelined path: every share of the round is in, so each sharer's mask
        request travels with its training instruction; hospitals train and answer
        with their masked update."""
        self.session.expect_input_digest(hooks.input_digest())
        by_sid = self.session.mask_requests()
        self._round_sharers = sorted(by_sid)
        requests = {self.node_of[sid]: req for sid, req in by_sid.items()}
        info.stages += 1
        for node in ready:
            if node not in requests:  # no usable shares with last round's unmask
                hooks.on_dropped(node, f"did not share usable keys for round {rnd} with "
                                       f"round {rnd - 1}'s unmask; not asked to train")
        self._train_exchange(rnd, requests, self._receive_masked_input, hooks)

    def _train_exchange(
        self, rnd: int, requests: Mapping[int, SecAggMessage], receive: Callable[..., None],
        hooks: RoundHooks,
    ) -> None:
        """The ``train`` stage: each request with the training instruction; the protocol
        reply of every hospital that trained goes to ``receive``."""
        replies = self._exchange(rnd, "train", requests, hooks.train_content)
        for node in requests:
            if node not in replies:
                self.weight_bounds.pop(node, None)
                hooks.on_missing(node)
        for node, reply in replies.items():
            self._note_weight_bound(node, reply)
            if reply.has_error() and KeyRotationRequired.__name__ in reply.error.reason:
                self._readvertise.add(node)
            if hooks.on_train_reply(node, reply):
                self._receive(rnd, node, reply, receive, hooks, "train")

    def _note_weight_bound(self, node: int, reply: Message) -> None:
        """Keep the weight bound a hospital's privacy report states; forget it when
        the reply has none (an error, or a hospital of an older version)."""
        bound = None
        if not reply.has_error():
            bound = reply.content.config_records.get(PRIVACY_REPORT, {}).get("weight-bound")
        if isinstance(bound, int) and not isinstance(bound, bool) and bound >= 1:
            self.weight_bounds[node] = bound
        else:
            self.weight_bounds.pop(node, None)

    def _unmask_stage(
        self, rnd: int, dim: int, hooks: RoundHooks, info: SecureRoundInfo,
    ) -> None:
        """Stage 4, plus the next round's config and shares when pipelining applies."""
        note, label = hooks.note, hooks.label
        req = self.session.unmask_request()
        info.stages += 1
        signers = {self.node_of[s] for s in req.signers}
        upcoming = hooks.next_nodes()
        next_cfg: RoundConfig | None = None
        if upcoming is not None and len(upcoming) >= 2 and set(upcoming) <= signers:
            try:
                next_cfg = self.session.start_next_round(
                    self.protocol_round(rnd + 1), [self.sid_of[n] for n in upcoming], dim,
                    encoding=self.round_encoding(upcoming),
                )
            except (SecAggError, ValueError) as exc:
                note(f"round {rnd}: next round not opened early: {exc}")

        def with_next(node: int, content: RecordDict) -> None:
            if next_cfg is not None and node in upcoming:
                content.config_records[SECAGG_NEXT] = secagg_to_record(next_cfg)

        requests = {self.node_of[s]: req for s in req.signers}
        replies = self._exchange(rnd, STAGE_TYPES["unmask"], requests, with_next)
        for node in requests:
            if node not in replies:
                hooks.on_missing(node)
                self._late_failure("unmask", node)
        for node, reply in replies.items():
            unmasked = self._receive(rnd, node, reply, self.session.receive_unmask_reply,
                                     hooks, "unmask")
            if not unmasked:
                self._late_failure("unmask", node)
            # A hospital whose unmask reply was refused must re-key: it sits the next
            # round out rather than have its shares abandon that round for everyone.
            if next_cfg is None or not unmasked:
                continue
            shares = reply.content.config_records.get(SECAGG_NEXT)
            if shares is None:
                refused = reply.content.config_records.get(SECAGG_NEXT_REFUSED, {})
                why = f": {refused['reason']}" if "reason" in refused else ""
                note(f"round {rnd}: {label(node)} did not share keys for round {rnd + 1}{why}")
                continue
            try:
                self.session.receive_shares(self._own(node, secagg_from_record(shares)),
                                            sender=node)
            except SecAggError as exc:
                note(f"round {rnd}: {label(node)}'s shares for round {rnd + 1} refused: {exc}")

    def _record(self, rnd: int, log_start: int, result: Any, note: Notify) -> None:
        """Write what the server saw in this round (``record_dir/round-N``) and forget it.

        The view holds every message of this protocol round (its config and shares
        may have come with the previous round's unmask stage) and the key
        advertisements received since the round began; messages of a next round
        already opened stay in the log for that round's view.
        """
        assert isinstance(self.session, RecordingServerSession) and self.record_dir is not None
        log = self.session.log
        number = result.round
        mine = [e for i, e in enumerate(log)
                if getattr(e[1], "round", None) == number
                or (i >= log_start and not hasattr(e[1], "round"))]
        view = ServerView(rnd, mine, np.asarray(result.weighted_sum, dtype=np.float64),
                          int(result.total_weight))
        try:
            self._write_view(view)
        except OSError as exc:  # the round itself succeeded; only the recording is lost
            note(f"round {rnd}: could not record the server's view: {exc}")
        log[:] = [e for e in log if getattr(e[1], "round", -1) > number]

    def _record_aborted(self, rnd: int, log_start: int, note: Notify, why: str) -> None:
        """Write what the server saw of an aborted round: shares it received before the
        abort count towards what it knows (``bract audit secagg`` accumulates them). A
        round that aborted before its configuration went out never opened: its marker."""
        assert isinstance(self.session, RecordingServerSession) and self.record_dir is not None
        if self._last_config is None:
            self._record_never_opened(rnd, why, note)
            return
        number = self._last_config.round
        log = self.session.log
        mine = [e for i, e in enumerate(log)
                if getattr(e[1], "round", None) == number
                or (i >= log_start and not hasattr(e[1], "round"))]
        view = ServerView(rnd, mine, np.zeros(0), 0, aborted=True)
        try:
            self._write_view(view)
        except OSError as exc:
            note(f"round {rnd}: could not record the server's view: {exc}")
        log[:] = [e for e in log if getattr(e[1], "round", -1) > number]

    def _record_abandoned(self, number: int) -> None:
        """Write what the server saw of protocol round ``number``, opened with the
        previous round's unmask stage and abandoned before its own (its configuration
        went out and shares came in): an aborted view of its FL round, which the
        round's restart (attempt 1) is then recorded beside."""
        assert isinstance(self.session, RecordingServerSession) and self.record_dir is not None
        log = self.session.log
        mine = [e for e in log if getattr(e[1], "round", None) == number]
        view = ServerView((number >> 20) & (2**20 - 1), mine, np.zeros(0), 0, aborted=True)
        with contextlib.suppress(OSError):
            self._write_view(view)
        log[:] = [e for e in log if getattr(e[1], "round", None) != number]

    def _write_view(self, view: ServerView) -> None:
        """Write ``view`` beside any earlier attempt of its round (never over it), unless
        the run has stopped: its open rounds were then written as they stood."""
        assert self.record_dir is not None
        with self._record_lock:
            if not self._stopped:
                write_view(view, view_directory(self.record_dir, view.round))

    def record_interrupted(self, why: str) -> list[int]:
        """The run stops (an interrupt, or an error that ends it): write every round
        whose configuration was sent and whose view is not written yet, as the server
        saw it so far, marked aborted and ``interrupted`` with ``why``; then write
        nothing more. Returns the FL rounds written.

        A round's configuration may have gone out with the previous round's unmask
        stage (pipelining): the round the run was about to start is then written too.
        Messages of no round (key advertisements received since the round in progress
        began) go with the earliest open round. A no-op without ``record_dir``, or when
        the run already stopped."""
        if self.record_dir is None or not isinstance(self.session, RecordingServerSession):
            return []
        got = self._record_lock.acquire(timeout=2.0)
        try:
            if self._stopped:
                return []
            self._stopped = True
            log = list(self.session.log)
            opened = sorted({m.round for d, m in log
                             if d == "out" and isinstance(m, RoundConfig)})
            written = []
            for i, number in enumerate(opened):
                mine = [e for e in log if getattr(e[1], "round", None) == number
                        or (i == 0 and not hasattr(e[1], "round"))]
                fl = (number >> 20) & (2**20 - 1)
                view = ServerView(fl, mine, np.zeros(0), 0, aborted=True, interrupted=why)
                with contextlib.suppress(OSError):
                    write_view(view, view_directory(self.record_dir, fl))
                    written.append(fl)
            return written
        finally:
            if got:
                self._record_lock.release()

    def _record_never_opened(self, rnd: int, why: str, note: Notify) -> None:
        """Write the marker of a round that never opened (no configuration sent, nothing
        received): ``bract audit secagg`` shows the round as n/a, with ``why``, where a
        round missing from the view fails."""
        assert self.record_dir is not None
        view = ServerView(rnd, [], np.zeros(0), 0, aborted=True, never_opened=why)
        try:
            self._write_view(view)
        except OSError as exc:
            note(f"round {rnd}: could not record the server's view: {exc}")

    def _describe(self, info: SecureRoundInfo) -> None:
        """The threshold and collusion bound the round was set up with."""
        cfg = self._last_config
        if cfg is not None:
            info.threshold, info.colluders, info.min_honest = (
                cfg.threshold, cfg.colluders, cfg.min_honest)
            info.ring_bits, info.graph, info.degree = cfg.ring_bits, cfg.graph_kind, cfg.degree
            info.max_weight = cfg.max_weight
            size = min(len(cfg.participants), cfg.degree + 1)
            info.dropouts_tolerated = max(0, dropout_tolerance(size, cfg.colluders,
                                                               cfg.min_honest))

    def _public_reason(self, why: str) -> str:
        """A protocol error as an operator reads it: protocol round numbers (which
        encode the run and the attempt) are shown as the federation's round."""

        def fl(match: re.Match[str]) -> str:
            number = int(match.group(1))
            return f"round {(number >> 20) & (2**20 - 1)}" if number >= 2**20 else match[0]

        return re.sub(r"round (\d+)", fl, why)

    def _check_requests(self) -> dict[int, Any]:
        req = self.session.consistency_request()
        return dict.fromkeys(req.alive, req)

    def _late_failure(self, stage: str, node: int) -> None:
        """Note a hospital that failed at the check or unmask stage (its masked input,
        if the server accepted one, stays in the round's sum)."""
        if stage in ("check", "unmask"):
            self._round_failed_late.add(node)

    def _receive_masked_input(self, msg: Any, *, sender: int) -> None:
        """Hand a masked input to the session; once accepted, its sender is alive."""
        self.session.receive_masked_input(msg, sender=sender)
        self._round_alive.add(msg.node_id)

    def _own(self, node: int, msg: SecAggMessage) -> SecAggMessage:
        """``msg`` if it speaks for the Flower node ``node`` it came from: its
        ``node_id`` is the secure-aggregation id ``node`` proved with its signed
        advertisement (:meth:`ensure_keys`); else :class:`AuthenticationError`.

        Guarantee: every protocol message a hospital sends reaches the session (and
        the server's recorded view) only through this check, so no hospital can
        answer, sign, share or be excluded in another's name; the session checks
        the same binding again (its ``sender`` argument)."""
        sid = self.sid_of.get(node)
        claimed = getattr(msg, "node_id", None)
        if sid is None or claimed != sid:
            held = "no secure-aggregation id" if sid is None else f"id {sid}"
            raise AuthenticationError(
                f"its {type(msg).__name__} names secure-aggregation id {claimed}, but the "
                f"node holds {held}: a hospital answers only for itself"
            )
        return msg

    def _receive(
        self, rnd: int, node: int, reply: Message, receive: Callable[..., None],
        hooks: RoundHooks, stage: str,
    ) -> bool:
        """Hand a reply's protocol message to the session; False if it was refused (the
        hospital then dropped out at ``stage``, and the round loop hears why). A message
        that names another hospital than the node it came from is refused here, before
        the session sees it (:meth:`_own`), and counts as its sender's failure."""
        try:
            receive(self._own(node, self._payload(reply)), sender=node)
        except RoundAborted:
            raise
        except SecAggError as exc:
            hooks.note(f"round {rnd}: {hooks.label(node)} dropped from secure aggregation "
                       f"at the {stage} stage: {exc}")
            hooks.on_dropped(node, f"dropped from secure aggregation at the {stage} stage: "
                                   f"{exc}")
            return False
        return True
