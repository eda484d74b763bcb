"""Server side: a Flower ``ServerApp`` running FedAvg over the Grid with privacy reporting.

Each round the server sends the global model to every hospital still in the
federation, collects the replies, averages the updates of those that trained
(weighted by their example counts), evaluates the new global model on the
central test set, and records every hospital's epsilon (which covers all rounds
so far) and its ledger of mechanism events.

Robustness: a hospital that errors or does not answer is left out of that
round's average and the round goes on; so is one whose reply holds any value out of
the range report.json is read back in (every field is read strictly,
:mod:`bract.flower.replies`), and reading each reply is contained: whatever it raises
fails that hospital for the round, with a one-line reason, never the run
(:meth:`Federation._contained`). A hospital's own text is recorded and shown only as
one bounded line of printable characters (:func:`bract.records.text.one_line`). A
hospital that refuses because its budget is spent is stopped, with its reason logged;
a round in which nobody trained leaves the global model unchanged. The report and ledger files are
rewritten atomically after every round, so an interrupted run leaves a
consistent record of the rounds it completed.

One job per part: this module is the round loop; the checkpoint after every round
is :mod:`bract.flower.checkpoint`'s, and what the operator sees (live table, plots,
summary) is :mod:`bract.flower.observer`'s. A secure round takes part in the loop
through one :class:`~bract.flower.secagg_server.RoundHooks` object.

Ledger integrity: every reply carries the hospital's signed, hash-chained ledger
(:mod:`bract.records.ledger`). The server checks it against its roster on receipt
(signatures, links, and that it extends what the server already holds); a reply
whose ledger does not verify counts as failed and changes nothing.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from bract.flower.checkpoint import (
    Checkpointer,
)
from bract.flower.exchange import REPLY_POLL_MAX, send_and_receive
from bract.flower.files import atomic_write_text, committing, on_freeze
from bract.flower.observer import RunObserver
from bract.flower.records import (
    AGGREGATED_METRICS,
    GLOBAL_WEIGHTS,
    LOCAL_METRICS,
    LOCAL_WEIGHTS,
    ROUND_CONFIG,
    SECAGG,
    TRAIN_INFO,
    read_privacy_report,
    reply_sources,
    secagg_from_record,
    weights_digest,
    weights_to_record,
)
from bract.flower.replies import ReplyError, read_clear_metrics, read_update, signed_epsilon
from bract.flower.secagg_server import SecAggSettings, SecureAggregator
from bract.records.ledger import (
    LedgerEntry,
    LedgerError,
    SignerRoster,
    dumps_jsonl,
    loads_jsonl,
    verify_chain,
)
from bract.records.report import (
    MAX_COUNT,
    FederatedEval,
    HospitalRound,
    RoundRow,
    RunReport,
    RunSummary,
)
from bract.records.text import one_line
from bract.secagg import KeyAdvertisement, SecAggError
from bract.secagg.crypto import verify_signature
from bract.secagg.protocol import advertisement_statement

Weights = dict[str, np.ndarray]
EvaluateFn = Callable[[Weights], dict[str, float]]

log = logging.getLogger("bract.server")


@dataclass
class ServerConfig:
    """How the server runs the federation and where it writes its record."""

    rounds: int
    num_clients: int
    delta: float
    out_dir: Path
    min_clients: int = 1
    node_wait_seconds: float = 120.0
    round_timeout: float | None = None
    save_model: Path | None = None
    run_config: dict[str, Any] = field(default_factory=dict)
    show_progress: bool = True
    #: Continue from the checkpoint in ``out_dir`` instead of starting afresh.
    resume: bool = False
    #: Secure aggregation settings; ``None`` runs plain FedAvg (updates in clear).
    secagg: SecAggSettings | None = None
    #: Who signs ledgers (hospital name -> Ed25519 key); ``None`` checks only the links.
    roster: SignerRoster | None = None
    #: The longest pause (s) between two pulls while the server waits for replies
    #: (bract.flower.exchange): short, so a quick stage is not charged a fixed poll.
    reply_poll: float = REPLY_POLL_MAX
    #: How the run releases the hospitals' metrics (``"none"``, ``"aggregate"``,
    #: ``"clear"``): a plain reply's metrics in clear are read only under ``"clear"``.
    release_metrics: str = "none"


#: The largest example count a plain FedAvg reply may declare (float64 stays exact).
MAX_DECLARED_EXAMPLES = 2**53


def plain_update_problem(local: Weights, info: Mapping[str, object] | None,
                         global_weights: Weights) -> str | None:
    """Why a plain FedAvg update cannot enter the average, or ``None`` when it can.

    Guarantee: an update that passes has the global model's names and shapes, only
    finite values, and a positive integral example count, so one hospital's faulty
    reply can neither stop the round nor make the global model non-finite (a finite
    weighted mean of arrays of the global model's own dtype stays finite in it; what a
    well-formed update says is the hospital's to answer for: poisoning is not
    covered, docs/secagg.md)."""
    if local.keys() != global_weights.keys() or any(
            np.shape(local[k]) != np.shape(global_weights[k]) for k in local):
        return "weights of the wrong shape"
    for name, values in local.items():
        arr = np.asarray(values)
        if arr.dtype != np.asarray(global_weights[name]).dtype:
            return (f"{name!r} is {arr.dtype}, the global model's is "
                    f"{np.asarray(global_weights[name]).dtype}")
        if not np.isfinite(arr).all():
            return f"non-finite values in {name!r}"
    count = None if info is None else info.get("num-examples")
    if isinstance(count, bool) or not isinstance(count, int | float | np.integer | np.floating):
        return "no example count"
    if not (math.isfinite(float(count)) and float(count) == int(count)
            and 1 <= int(count) <= MAX_DECLARED_EXAMPLES):
        return f"example count {count!r} is not an integer in [1, 2^53]"
    return None


#: The query a hospital answers with its signed key advertisement (its identity).
IDENTITY_QUERY = "query.secagg_advertise"


def error_reason(reply: Message) -> str:
    """The reason an error reply gives, as the hospital wrote it but made safe to show
    and record: one bounded line of printable characters (an empty reason reads
    "(no reason given)")."""
    return one_line(reply.error.reason) or "(no reason given)"


def advertised_member(reply: Message, node: int, roster: SignerRoster) -> str | None:
    """The roster member that ``reply`` proves the Flower node ``node`` to be, or ``None``.

    Guarantee: a name is returned only for a key advertisement of the roster's
    federation that names ``node`` as its origin and carries a valid signature by
    that member's key, so a node can neither claim another member's name nor
    replay another node's advertisement."""
    if reply.has_error() or SECAGG not in reply.content.config_records:
        return None
    try:
        adv = secagg_from_record(reply.content.config_records[SECAGG])
    except (SecAggError, ValueError, TypeError):
        return None
    if (not isinstance(adv, KeyAdvertisement) or adv.federation_id != roster.federation_id
            or adv.origin != node):
        return None
    statement = advertisement_statement(adv.federation_id, adv.node_id, adv.origin,
                                        adv.epoch, adv.cipher_public)
    for name, key in sorted(roster.keys.items()):
        try:
            verify_signature(key, adv.signature, statement, "key advertisement")
        except SecAggError:
            continue
        return name
    return None


def fedavg(updates: list[tuple[Weights, int]]) -> Weights:
    """Example-weighted average of named weight arrays (FedAvg)."""
    if not updates:
        raise ValueError("fedavg needs at least one update")
    total = float(sum(n for _, n in updates))
    if total <= 0:
        raise ValueError("fedavg needs a positive total number of examples")
    names = list(updates[0][0])
    out: Weights = {}
    for name in names:
        acc = np.zeros_like(updates[0][0][name], dtype=np.float64)
        for weights, n in updates:
            if weights.keys() != updates[0][0].keys():
                raise ValueError("updates do not share the same weight names")
            acc += np.asarray(weights[name], dtype=np.float64) * (n / total)
        out[name] = acc.astype(updates[0][0][name].dtype)
    return out


class FederationRecord:
    """The run's report (``report.json``) and merged ledger (``ledger.jsonl``)."""

    def __init__(self, out_dir: Path, config: dict[str, Any]) -> None:
        self.out_dir = Path(out_dir)
        self.report: dict[str, Any] = {"config": config, "rounds": [], "final": {}}
        #: Each hospital's signed ledger entries, as verified on receipt.
        self.chains: dict[str, tuple[LedgerEntry, ...]] = {}

    def add_round(self, row: RoundRow) -> None:
        """Append one round's row and rewrite both files atomically."""
        self.report["rounds"].append(row.to_plain())
        self.write()

    def finish(self, final: RunSummary) -> None:
        """Record the final summary and rewrite both files."""
        self.report["final"] = final.to_plain()
        self.write()

    def write(self) -> None:
        """Write report.json and ledger.jsonl (every hospital's signed entries, in order)."""
        atomic_write_text(self.out_dir / "report.json", json.dumps(self.report, indent=2) + "\n")
        atomic_write_text(
            self.out_dir / "ledger.jsonl",
            "".join(dumps_jsonl(chain) for _, chain in sorted(self.chains.items())),
        )


def _wait_for_nodes(grid: Grid, n: int, seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= n or time.monotonic() > deadline:
            return nodes
        time.sleep(0.1)


#: Released figures are shown only when their noised count is this many noise
#: standard deviations above zero (otherwise they would be mostly noise).
RELEASE_MIN_SIGMAS = 3.0


def federated_evaluation(rnd: int, totals: Mapping[str, float],
                         count_noise: float = 0.0) -> FederatedEval | None:
    """The report row's ``federated_eval``: the global model the hospitals received in
    round ``rnd`` (the result of round ``rnd - 1``) on their pooled held-out splits,
    from the totals of their released (noised) evaluation sums; ``None`` when the
    noised count of held-out examples is below one, or below
    :data:`RELEASE_MIN_SIGMAS` times ``count_noise`` (the std of the noise on it).

    Guarantee: a row it returns reads back from report.json (its count a whole number
    up to 2**53, loss and accuracy finite); totals that could not give one (a count
    beyond 2**53, a non-finite sum) give ``None``."""
    n = float(totals.get("eval-examples", 0.0))
    sums = (float(totals.get("eval-loss-sum", 0.0)), float(totals.get("eval-correct", 0.0)))
    if (not n >= max(1.0, RELEASE_MIN_SIGMAS * count_noise) or n > MAX_COUNT
            or not all(math.isfinite(v) for v in sums)):
        return None
    return FederatedEval(
        model_of_round=rnd - 1,
        examples=round(n),
        loss=max(sums[0] / n, 0.0),
        accuracy=min(max(sums[1] / n, 0.0), 1.0),
    )


def released_train_loss(totals: Mapping[str, float],
                        count_noise: float = 0.0) -> float | None:
    """The hospitals' pooled training loss of the global model they received, from their
    released (noised) sums; ``None`` when the noised count of records is below one, or
    below :data:`RELEASE_MIN_SIGMAS` times ``count_noise``, or a sum is not finite."""
    n = float(totals.get("train-examples", 0.0))
    loss_sum = float(totals.get("train-loss-sum", 0.0))
    if not (n >= max(1.0, RELEASE_MIN_SIGMAS * count_noise) and math.isfinite(n)
            and math.isfinite(loss_sum)):
        return None  # also NaN or infinite sums: no figure
    return max(loss_sum / n, 0.0)


@dataclass(frozen=True)
class RoundExtras:
    """What a round adds to its row besides the hospitals' lines: the secure round's
    record, and the metrics the hospitals released in aggregate."""

    secagg: dict[str, Any] | None = None
    train_loss: float | None = None
    federated_eval: FederatedEval | None = None


class Federation:
    """The server's state across rounds: global model, hospitals, report, checkpoint.

    Guarantee: the global model only ever changes by averaging updates of
    hospitals that trained within their budget this round; errors, timeouts
    and refusals never corrupt it or the recorded ledgers. After every round
    the global model and the server's record are checkpointed atomically, so a
    resumed run continues after the last completed round, neither losing nor
    repeating one.
    """

    def __init__(self, grid: Grid, evaluate: EvaluateFn, cfg: ServerConfig) -> None:
        self.grid = grid
        self.evaluate = evaluate
        self.cfg = cfg
        self.record = FederationRecord(cfg.out_dir, cfg.run_config)
        self.checkpointer = Checkpointer(cfg.out_dir, cfg.run_config)
        #: The name each Flower node's replies are recorded under (bound on its first
        #: read reply; one node per name: :meth:`_bind_name`).
        self.names: dict[int, str] = {}
        #: Plain FedAvg with a roster: the member each node proved it is, by its signed
        #: key advertisement (:meth:`_prove_members`).
        self.proven: dict[int, str] = {}
        #: This round's identity-query replies that were errors, by node: the reason
        #: the hospital gave (e.g. its SuperNode refused the run's FAB).
        self.identity_errors: dict[int, str] = {}
        self.latest: dict[str, HospitalRound] = {}
        self.stopped: dict[str, str] = {}
        self.active: list[int] = []
        self.global_weights: Weights = {}
        self.metrics: dict[str, float] = {}
        self.completed = 0
        self.resumes = 0
        #: Names this run to the hospitals (kept across resumes): each calibrates its
        #: noise once per run, after the budget its data spent in earlier runs.
        self.run_id = os.urandom(8).hex()
        self.secure: SecureAggregator | None = None
        #: This round's hospitals that failed or did not answer, with the reason.
        self.failed: dict[str, str] = {}
        #: This round's per-coordinate noise std of each hospital's metrics release.
        self.release_noise: dict[str, float] = {}
        #: Consecutive secure rounds that aborted after hospitals trained in them: each
        #: spent budget for no model (SecAggSettings.abort_limit). Checkpointed, so a
        #: resumed run stops where an uninterrupted one would.
        self.spent_aborts = 0
        #: The rounds in which this process asked each Flower node to train; and, kept
        #: across resumes by the hospital's label, those of hospitals the server has no
        #: line of yet. A hospital's first read reply sorts its chain by them
        #: (:meth:`_run_start`).
        self.asked: dict[int, list[int]] = {}
        self.asked_earlier: dict[str, list[int]] = {}
        #: The round this process resumed the run at (``None``: not a resumed run).
        self.resumed_round: int | None = None

    # ---------------------------------------------------------------- checkpoints
    @property
    def checkpoint_dir(self) -> Path:
        return self.checkpointer.dir

    def checkpoint(self) -> None:
        """Save the global model and the loop's state after the completed round."""
        state = {
            "report": self.record.report,
            "chains": {cid: dumps_jsonl(chain) for cid, chain in self.record.chains.items()},
            "latest": {cid: v.to_plain() for cid, v in self.latest.items()},
            "stopped": self.stopped,
            "metrics": self.metrics,
            "resumes": self.resumes,
            "run_id": self.run_id,
            "spent_aborts": self.spent_aborts,
            "unanswered": self._unanswered(),
        }
        self.checkpointer.save(self.completed, self.global_weights, state)

    def _unanswered(self) -> dict[str, list[int]]:
        """The rounds this run asked each hospital the server has no line of yet to
        train in, by its label (its name, else ``node-N``)."""
        out = {label: set(rounds) for label, rounds in self.asked_earlier.items()}
        for node, rounds in self.asked.items():
            out.setdefault(self._label(node), set()).update(rounds)
        return {label: sorted(rounds) for label, rounds in sorted(out.items())
                if label not in self.latest}

    def restore(self) -> None:
        """Continue from the checkpoint in ``out_dir``; refuses a different configuration."""
        state, weights = self.checkpointer.restore(self.global_weights.keys())
        self.global_weights = weights
        self.completed = int(state["completed_rounds"])
        self.record.report = state["report"]
        self.record.report["config"] = self.cfg.run_config
        self.record.chains = {
            cid: tuple(loads_jsonl(text, f"checkpointed ledger of {cid}"))
            for cid, text in state["chains"].items()
        }
        self.latest = {cid: HospitalRound.from_plain(v, f"checkpointed line of {cid}")
                       for cid, v in state["latest"].items()}
        self.stopped = dict(state["stopped"])
        self.metrics = dict(state["metrics"])
        self.resumes = int(state.get("resumes", 0)) + 1
        self.run_id = str(state.get("run_id", self.run_id))
        self.spent_aborts = int(state.get("spent_aborts", 0))  # older checkpoints lack it
        if "unanswered" in state:
            self.asked_earlier = {str(label): [int(r) for r in rounds]
                                  for label, rounds in state["unanswered"].items()}
        else:  # a checkpoint that did not keep them: the rounds its rows record it failed
            self.asked_earlier = {}
            for rnd, row in self._rows():
                for label in row.get("failed") or {}:
                    if label not in self.latest:
                        self.asked_earlier.setdefault(str(label), []).append(rnd)

    def _rows(self) -> list[tuple[int, dict[str, Any]]]:
        """The report's rows so far, with their round numbers (as the server wrote them)."""
        rows = self.record.report.get("rounds", [])
        return [(row["round"], row) for row in rows if isinstance(row, dict)
                and isinstance(row.get("round"), int) and not isinstance(row["round"], bool)]

    # ---------------------------------------------------------------------- rounds
    def _round_content(self, rnd: int, arrays: ArrayRecord, content: RecordDict,
                       node: int) -> None:
        """The ``train`` instruction of round ``rnd`` to ``node`` (noted as asked)."""
        self.asked.setdefault(node, []).append(rnd)
        content.array_records[GLOBAL_WEIGHTS] = arrays
        content.config_records[ROUND_CONFIG] = ConfigRecord(
            {"round": rnd, "num-rounds": self.cfg.rounds, "run-id": self.run_id}
        )

    def _label(self, node: int) -> str:
        """The hospital's name: the one its replies are recorded under, else the roster
        member it proved it is (:meth:`_proven_member`), else the node id."""
        if node in self.names:
            return self.names[node]
        return self._proven_member(node) or f"node-{node}"

    def _proven_member(self, node: int) -> str | None:
        """The roster member the Flower node ``node`` proved it is, or ``None``: under
        secure aggregation the member whose key signed the advertisement the node's
        keys came from (origin-bound, :meth:`SecureAggregator.ensure_keys`); in plain
        FedAvg the member its answer to the identity query proved (:func:`advertised_member`).
        Without a roster nothing is proved."""
        if self.cfg.roster is None:
            return None
        if node in self.proven:
            return self.proven[node]
        if self.secure is not None and self.cfg.secagg:
            key = self.cfg.secagg.roster.get(self.secure.sid_of.get(node, -1))
            for name, known in sorted(self.cfg.roster.keys.items()):
                if key is not None and known == key:
                    return name
        return None

    def _prove_members(self, rnd: int, nodes: Sequence[int]) -> None:
        """Plain FedAvg with a roster: ask each node that has not yet proved which member
        it is for its signed key advertisement (:data:`IDENTITY_QUERY`), and keep the
        member each valid one proves (:func:`advertised_member`)."""
        roster = self.cfg.roster
        ask = [n for n in nodes if n not in self.proven]
        for node in ask:
            self.identity_errors.pop(node, None)
        if roster is None or not ask:
            return
        messages = [Message(RecordDict(), dst_node_id=n, message_type=IDENTITY_QUERY,
                            group_id=str(rnd)) for n in ask]
        replies = send_and_receive(self.grid, messages, self.cfg.round_timeout,
                                   max_poll=self.cfg.reply_poll)
        for node, reply in reply_sources(messages, replies):
            if node in ask and reply.has_error():  # the hospital's own reason (its text)
                self.identity_errors[node] = error_reason(reply)
                continue
            name = advertised_member(reply, node, roster) if node in ask else None
            if name is not None:
                self.proven[node] = name

    def _bind_name(self, node: int, claimed: str) -> tuple[str, str | None]:
        """The name ``node``'s reply is recorded under, and why the reply must be refused
        (``None``: it may be read; the node is then bound to that name).

        Guarantee: with a roster, the name is the member the node proved it is
        (:meth:`_proven_member`); a reply whose ``client-id`` names anyone else, or
        that comes from a node that proved nothing, is refused. With or without a
        roster, a name is bound to one node (the first whose reply was read) and a
        node to one name for the whole run, so no reply is ever recorded under a name
        another node holds. Without a roster the names themselves are the
        hospitals' own word: a node may take any name not yet bound."""
        if self.cfg.roster is not None:
            proven = self._proven_member(node)
            if proven is None:
                return self._label(node), ("it has not proved which roster member it is "
                                           "(no valid signed key advertisement from its node)")
            if claimed and claimed != proven:
                return proven, (f"its report names it {claimed!r}, but its signed key "
                                f"advertisement proves it is {proven!r}")
            name = proven
        else:
            name = claimed or self._label(node)
        bound = self.names.get(node)
        if bound is not None and bound != name:
            return bound, f"its report names it {name!r}, but its node reported as {bound!r}"
        holder = next((n for n, v in self.names.items() if v == name and n != node), None)
        if holder is not None:
            return self._label(node), (f"its report names it {name!r}, a name node-{holder} "
                                       "already holds")
        self.names[node] = name
        return name, None

    def _read_train_reply(
        self, rnd: int, node: int, reply: Message, display: RunObserver
    ) -> str | None:
        """Record a training reply's privacy report; the hospital's id if it trained."""
        if reply.has_error():
            why = error_reason(reply)
            self.failed[self._label(node)] = f"failed: {why}"
            display.note(f"round {rnd}: {self._label(node)} failed: {why}")
            return None
        try:
            rep = read_privacy_report(reply.content)
        except ValueError as exc:
            self.failed[self._label(node)] = f"malformed reply: {one_line(str(exc))}"
            display.note(f"round {rnd}: {self._label(node)} sent a malformed reply: {exc}")
            return None
        cid, problem = self._bind_name(node, str(rep["client_id"] or ""))
        if problem is not None:  # a reply in another hospital's name changes nothing
            self.failed[cid] = f"refused: {problem}"
            display.note(f"round {rnd}: {cid}'s reply refused: {problem}")
            return None
        try:
            chain = self._accept_chain(cid, rep)
        except (LedgerError, ValueError, TypeError) as exc:  # a hostile chain: this reply fails
            self.failed[self._label(node)] = f"invalid ledger: {one_line(str(exc))}"
            display.note(f"round {rnd}: {cid}'s ledger does not verify, reply ignored: {exc}")
            return None
        held = self.record.chains.get(cid, ())
        # The epsilon its signed chain carries, not the unsigned figure beside it (a
        # ReplyError when they disagree: _contained records this reply as malformed).
        epsilon = signed_epsilon(chain, rep["trained"], rep["epsilon"], self.cfg.delta)
        self.record.chains[cid] = chain
        # Entries the hospital's data spent before this run (earlier runs, federations),
        # and entries of this round spent before this reply's own, that the server never
        # received: an earlier attempt of the round, lost when the run was interrupted
        # in it (with a line of this run: its entries from the server's last record on).
        prior = self.latest.get(cid)
        appended = max(0, min(int(rep["appended"]), len(chain)))
        if prior is None:
            carried, interrupted = self._run_start(node, cid, rnd, chain, appended)
        else:
            carried = prior.ledger_carried
            interrupted = sum(e.round == rnd for e in chain[len(held):len(chain) - appended])
        # The noise on this round's metrics release, if it made one: the server shows
        # released figures only when they stand out of the noise.
        for entry in chain[len(chain) - appended:]:
            if entry.event.mechanism == "metrics" and rep["trained"]:
                self.release_noise[cid] = (entry.event.noise_multiplier
                                           * entry.event.max_grad_norm)
        self.latest[cid] = HospitalRound(
            epsilon=epsilon,
            trained=bool(rep["trained"]),
            reason=str(rep["reason"]),
            steps=int(rep["steps"]),
            noise_multiplier=float(rep["noise_multiplier"]),
            sample_rate=float(rep["sample_rate"]),
            ledger_entries=len(chain),
            ledger_head=chain[-1].hash() if chain else "",
            ledger_carried=int(carried),
            of_round=rnd,
            ledger_interrupted=interrupted,
        )
        if not rep["trained"]:
            self.stopped[cid] = rep["reason"]
            if node in self.active:
                self.active.remove(node)
            display.note(f"round {rnd}: {cid} stopped — {rep['reason']}")
            return None
        return cid

    def _run_start(self, node: int, cid: str, rnd: int, chain: Sequence[LedgerEntry],
                   appended: int) -> tuple[int, int]:
        """At a hospital's first read reply (round ``rnd``, from ``node``): how many of
        its chain's entries its data spent before this run (``ledger_carried``), and how
        many of this round's it spent in an interrupted attempt of it
        (``ledger_interrupted``).

        The entries before the reply's own (its last ``appended``) end with those this
        run spent whose reply the server never read: in the rounds it asked the hospital
        to train in (:attr:`asked`, kept across resumes), in round order, each round
        asked once (at most one entry of each mechanism; a round a resume re-ran, any
        number), then, when ``rnd`` is the round this process resumed the run at, those
        of its interrupted attempt. Each is an entry of this federation (the roster's;
        without one, that of the reply's own entries). Walking back from the reply's own
        entries over entries that fit, the ones before are carried. An earlier run's
        entries pass for this run's only where they fit all of this (an earlier run of
        this federation that ended in a round this run asked the hospital in and read no
        reply of, and no entry of this run's attempt at that round followed): the chain
        does not say which run an entry came from."""
        roster = self.cfg.roster
        fed = (roster.federation_id if roster is not None
               else chain[-1].federation_id if appended else None)
        i = len(chain) - appended
        interrupted = 0
        if rnd == self.resumed_round:
            while i and chain[i - 1].round == rnd and fed in (None, chain[i - 1].federation_id):
                fed = chain[i - 1].federation_id
                i, interrupted = i - 1, interrupted + 1
        asked = {r for r in (*self.asked.get(node, ()), *self.asked_earlier.get(cid, ()),
                             *self.asked_earlier.get(f"node-{node}", ())) if r < rnd}
        rerun = {r for r, row in self._rows() if row.get("resumed") is True}
        seen: set[tuple[int, str]] = set()
        upto = rnd
        while i:
            entry = chain[i - 1]
            key = (entry.round, entry.event.mechanism)
            if (entry.round not in asked or entry.round > upto
                    or fed not in (None, entry.federation_id)
                    or (key in seen and entry.round not in rerun)):
                break
            fed, upto = entry.federation_id, entry.round
            seen.add(key)
            i -= 1
        return i, interrupted

    def _accept_chain(self, cid: str, rep: dict[str, Any]) -> tuple[LedgerEntry, ...]:
        """The hospital's signed ledger from its report, if it verifies and extends ours."""
        chain = tuple(rep["chain"])
        roster = self.cfg.roster
        if roster is not None:
            if cid not in roster.keys:
                raise LedgerError(f"{cid} is not a member of the federation's roster")
            verify_chain(chain, roster.keys[cid], client_id=cid)
        elif chain:
            verify_chain(chain, None, client_id=cid)
        held = self.record.chains.get(cid, ())
        if chain[: len(held)] != held:
            raise LedgerError(f"it rewrites entries of {cid} the server already holds")
        if [e.event for e in chain] != list(rep["ledger"].events):
            raise LedgerError("its signed entries and its reported events differ")
        return chain

    def _plain_round(self, rnd: int, display: RunObserver) -> tuple[list[str], RoundExtras]:
        """Plain FedAvg: updates and example counts travel in clear (--no-secagg)."""
        arrays = weights_to_record(self.global_weights)
        self._prove_members(rnd, self.active)
        # With a roster, a node that proved no membership would train (spending its
        # hospital's budget) only to have its reply refused: it is not asked.
        asked = [n for n in self.active
                 if self.cfg.roster is None or self._proven_member(n) is not None]
        for node in self.active:
            if node not in asked:
                why = (f"failed: {self.identity_errors[node]}" if node in self.identity_errors
                       else "not asked to train: it has not proved which roster member it "
                            "is (no valid signed key advertisement from its node)")
                self.failed[self._label(node)] = why
                display.note(f"round {rnd}: {self._label(node)} {why}")
        messages = []
        for node in asked:
            content = RecordDict()
            self._round_content(rnd, arrays, content, node)
            messages.append(
                Message(content, dst_node_id=node, message_type="train", group_id=str(rnd))
            )
        replies = reply_sources(
            messages, send_and_receive(self.grid, messages, self.cfg.round_timeout,
                                  max_poll=self.cfg.reply_poll)
        )
        updates: list[tuple[Weights, int]] = []
        trained: list[str] = []
        clear_totals: dict[str, float] = {}
        released_by: list[str] = []
        answered = {node for node, _ in replies}
        for node, reply in replies:
            taken = self._contained(rnd, node, display, self._plain_reply, rnd, node, reply,
                                    display)
            if taken is None:
                continue
            cid, local, count, released = taken
            updates.append((local, count))
            trained.append(cid)
            if released is not None:  # the hospital's policy releases its metrics in clear
                released_by.append(cid)
                for k, v in released.items():
                    clear_totals[k] = clear_totals.get(k, 0.0) + v
        for node in asked:
            if node not in answered:
                self.failed[self._label(node)] = "did not answer"
                display.note(f"round {rnd}: {self._label(node)} did not answer")
        self._name_failed_nodes(rnd, [node for node, _ in replies], display)
        if updates:  # finite updates: their weighted mean is finite too
            self.global_weights = fedavg(updates)
        if not released_by:
            return trained, RoundExtras()
        noise = self._count_noise(released_by)
        return trained, RoundExtras(train_loss=released_train_loss(clear_totals, noise),
                                    federated_eval=federated_evaluation(rnd, clear_totals,
                                                                        noise))

    def _plain_reply(
        self, rnd: int, node: int, reply: Message, display: RunObserver
    ) -> tuple[str, Weights, int, dict[str, float] | None] | None:
        """One plain FedAvg reply: its privacy report recorded (:meth:`_read_train_reply`),
        then its update, example count and (only in a run that releases metrics in clear)
        its released metrics read (:mod:`bract.flower.replies`). ``None`` when it brings
        no update to average; a value it holds that cannot be accepted raises
        :class:`~bract.flower.replies.ReplyError` (:meth:`_contained` records it)."""
        cid = self._read_train_reply(rnd, node, reply, display)
        if cid is None:
            return None
        content = reply.content
        if LOCAL_WEIGHTS not in content.array_records:
            display.note(f"round {rnd}: {cid} trained but sent no weights; ignored")
            return None
        info = content.metric_records.get(TRAIN_INFO)
        try:
            local = read_update(content.array_records[LOCAL_WEIGHTS], self.global_weights)
            problem = plain_update_problem(local, info, self.global_weights)
        except ReplyError as exc:
            problem = str(exc)
        if problem is not None:
            self.failed[self._label(node)] = f"unusable update: {problem}"
            display.note(f"round {rnd}: {cid} sent an unusable update ({problem}); ignored")
            return None
        released = content.metric_records.get(LOCAL_METRICS)
        if released is not None and self.cfg.release_metrics != "clear":
            display.note(f"round {rnd}: {cid} sent metrics in clear, which this run does not "
                         "release; they are not used")
            released = None
        metrics = (read_clear_metrics(released, AGGREGATED_METRICS) if released is not None
                   else None)
        assert info is not None  # plain_update_problem found its example count
        return cid, local, int(info["num-examples"]), metrics

    def _contained(self, rnd: int, node: int, display: RunObserver,
                   read: Callable[..., Any], *args: Any) -> Any:
        """``read(*args)``: the reading of one hospital's reply, behind a boundary.

        Guarantee: no exception (``Exception``) leaves it, so one hospital's reply never
        ends the federation. When ``read`` raises, the hospital is recorded as failed
        this round with a one-line reason: ``malformed reply: ...`` naming the field of a
        :class:`~bract.flower.replies.ReplyError`, else ``unreadable reply (<type>;
        details in the server's log)``, its traceback logged (control characters
        removed) for the operator; it returns ``None`` then, as for a reply without an
        update. What ``read`` recorded before it raised (a verified ledger) stays."""
        try:
            return read(*args)
        except Exception as exc:
            label = self._label(node)
            if isinstance(exc, ReplyError):
                why = f"malformed reply: {one_line(str(exc))}"
            else:
                trace = traceback.format_exception(exc)
                log.error("round %d: reading %s's reply failed:\n%s", rnd, label,
                          "\n".join(one_line(line, 2000) for line in
                                    "".join(trace).splitlines()))
                why = f"unreadable reply ({type(exc).__name__}; details in the server's log)"
            self.failed[label] = why
            display.note(f"round {rnd}: {label}'s reply is not used: {why}")
            return None

    def _name_failed_nodes(self, rnd: int, nodes: Sequence[int], display: RunObserver) -> None:
        """Name the hospitals this round recorded only by node id (they failed before the
        server had their name), from their signed key advertisement checked against the
        roster (:func:`advertised_member`), as the secure path names them; a node that
        cannot prove a name keeps its id. Without a roster nothing can be proved."""
        roster = self.cfg.roster
        unnamed = [n for n in nodes if n not in self.names and f"node-{n}" in self.failed]
        if roster is None or not unnamed:
            return
        messages = [Message(RecordDict(), dst_node_id=n, message_type=IDENTITY_QUERY,
                            group_id=str(rnd)) for n in unnamed]
        replies = send_and_receive(self.grid, messages, self.cfg.round_timeout,
                                   max_poll=self.cfg.reply_poll)
        for node, reply in reply_sources(messages, replies):
            name = advertised_member(reply, node, roster)
            if name is None or node not in unnamed:
                continue
            self.names[node] = name
            self.failed[name] = self.failed.pop(f"node-{node}")
            display.note(f"round {rnd}: node-{node} is {name} (its signed key advertisement)")

    def _secure_round(self, rnd: int, display: RunObserver) -> tuple[list[str], RoundExtras]:
        """Secure FedAvg: the server learns only the example-weighted mean update."""
        assert self.secure is not None
        arrays = weights_to_record(self.global_weights)
        trained: list[str] = []

        hooks = _SecureRoundHooks(self, rnd, arrays, trained, display)
        result, info = self.secure.run_round(rnd, list(self.active), self._secure_dim(), hooks)
        mean = None
        if result is not None:
            try:  # finish() returns a positive total weight; a sum without a mean aborts
                mean = result.mean()
            except SecAggError as exc:
                info.aborted = f"the unmasked sum has no average: {exc}"
        if mean is None:
            display.note(f"round {rnd}: secure aggregation aborted ({info.aborted}); "
                         "nothing was revealed and the global model is unchanged")
            # The hospitals that trained spent budget on this round all the same.
            self.spent_aborts = self.spent_aborts + 1 if trained else self.spent_aborts
            return [], RoundExtras(secagg=info.to_plain())
        assert result is not None
        self.spent_aborts = 0
        offset = 0
        updated: Weights = {}
        for name, value in self.global_weights.items():
            size = value.size
            delta = mean[offset : offset + size].reshape(value.shape)
            updated[name] = (value.astype(np.float64) + delta).astype(value.dtype)
            offset += size
        self.global_weights = updated
        extra = RoundExtras(secagg=info.to_plain())
        if len(mean) > offset:
            # Metrics the hospitals released in aggregate: the totals of their noised sums.
            totals = dict(zip(AGGREGATED_METRICS, (float(v) for v in result.weighted_sum[offset:]),
                              strict=False))
            noise = self._count_noise(sorted(set(trained) & set(info.alive)))
            extra = RoundExtras(secagg=extra.secagg, train_loss=released_train_loss(totals, noise),
                                federated_eval=federated_evaluation(rnd, totals, noise))
        return sorted(set(trained) & set(info.alive)), extra

    def _count_noise(self, hospitals: Sequence[str]) -> float:
        """Std of the noise on a released count summed over ``hospitals``."""
        return math.sqrt(sum(self.release_noise.get(h, 0.0) ** 2 for h in hospitals))

    def _secure_dim(self) -> int:
        assert self.cfg.secagg is not None
        params = sum(v.size for v in self.global_weights.values())
        return int(params + self.cfg.secagg.aggregate_metrics)

    def run_round(self, rnd: int, display: RunObserver) -> RoundRow:
        """One round of private FedAvg (secure or plain); returns the report row."""
        t0 = time.perf_counter()
        self.failed = {}
        self.release_noise = {}
        if self.secure is not None:
            trained, extra = self._secure_round(rnd, display)
        else:
            trained, extra = self._plain_round(rnd, display)
        if trained:
            self.metrics = self.evaluate(self.global_weights)
        else:
            display.note(f"round {rnd}: no update was aggregated; the global model is unchanged")
        self._note_carried_epsilons()
        return RoundRow(
            round=rnd,
            epsilon=max((v.epsilon for v in self.latest.values()), default=0.0),
            per_client=dict(sorted(self.latest.items())),
            trained=tuple(sorted(trained)),
            failed=dict(sorted(self.failed.items())),
            # A round that averaged nothing has no new model, so no figure of one.
            metrics=dict(self.metrics) if trained else {},
            train_loss=extra.train_loss,
            federated_eval=extra.federated_eval,
            secagg=extra.secagg,
            delta=self.cfg.delta,
            seconds=time.perf_counter() - t0,
        )

    def run(self, initial_weights: Weights) -> dict[str, Any]:
        """Run (or, with ``cfg.resume``, resume) the federation; returns the report."""
        resume = self.cfg.resume
        self.global_weights = {k: np.array(v, copy=True) for k, v in initial_weights.items()}
        if resume:
            self.restore()
        else:
            self.metrics = self.evaluate(self.global_weights)
            self.record.report["initial"] = dict(self.metrics)
        nodes = _wait_for_nodes(self.grid, self.cfg.num_clients, self.cfg.node_wait_seconds)
        if len(nodes) < self.cfg.min_clients:
            raise RuntimeError(
                f"only {len(nodes)} hospitals connected, fewer than the minimum "
                f"{self.cfg.min_clients}"
            )
        # On resume every node is asked again: a hospital whose budget is spent keeps
        # its own ledger and refuses again, so nobody is trusted to have stopped.
        self.active = list(nodes)
        if self.cfg.secagg is not None:
            self.secure = SecureAggregator(
                self.grid, self.cfg.secagg, timeout=self.cfg.round_timeout,
                round_offset=self.resumes, poll=self.cfg.reply_poll,
            )
        todo = self.cfg.rounds - self.completed
        secure = self.secure
        # A run that stops with a secure round open (its configuration sent, perhaps
        # with the previous round's unmask stage) records that round as it stands.
        unhook = (on_freeze(lambda: secure.record_interrupted("the run was interrupted"))
                  if secure is not None else lambda: None)
        try:
            return self._rounds(resume, todo)
        except BaseException as exc:
            if secure is not None:
                secure.record_interrupted(
                    "the run was interrupted" if isinstance(exc, KeyboardInterrupt)
                    else f"the run ended with an error ({type(exc).__name__})")
            raise
        finally:
            unhook()

    def _rounds(self, resume: bool, todo: int) -> dict[str, Any]:
        """The round loop of :meth:`run`, then its end (:meth:`_finish`)."""
        with RunObserver(todo, self.cfg.show_progress) as display:
            if resume:
                display.note(f"resuming after round {self.completed} from {self.checkpoint_dir}")
            # Secure aggregation needs at least three hospitals: a sum of one is its
            # input, and each of two learns the other's update from the sum.
            needed = max(self.cfg.min_clients, 3 if self.secure is not None else 1)
            first = self.completed + 1
            self.resumed_round = first if resume else None
            for rnd in range(first, self.cfg.rounds + 1):
                if len(self.active) < needed:
                    display.note(
                        f"stopping before round {rnd}: {len(self.active)} hospitals remain, "
                        f"fewer than the {needed} this federation needs"
                    )
                    self.record.report["stopped_early"] = (
                        f"before round {rnd}: {len(self.active)} of {needed} hospitals needed"
                    )
                    break
                row = self.run_round(rnd, display)
                if resume and rnd == first:  # the round the interrupted run was in
                    row = replace(row, resumed=True)
                with committing():  # an interrupt stops before this or after both
                    self.completed = rnd
                    self.record.add_round(row)
                    self.checkpoint()
                display.row(row)
                if self._abort_limit_reached(rnd, row, display):
                    break
                if not self.active:
                    display.note(f"every hospital has stopped after round {rnd}; federation ends")
                    break
        return self._finish()

    def _abort_limit_reached(self, rnd: int, row: RoundRow, display: RunObserver) -> bool:
        """Whether the federation stops because its last ``abort_limit`` secure rounds
        (:class:`SecAggSettings`) each aborted after hospitals trained in them.

        Guarantee: no run spends the hospitals' budgets on more than ``abort_limit``
        consecutive aborted rounds; when it stops, report.json's ``stopped_early`` says
        so in one line naming the last abort's reason (the rounds themselves are
        recorded as rounds that averaged no update, which the CLI reports as an error
        and exits non-zero for)."""
        limit = self.cfg.secagg.abort_limit if self.cfg.secagg is not None else None
        if limit is None or self.spent_aborts < limit:
            return False
        last = (row.secagg or {}).get("aborted")
        why = (f"after round {rnd}: {self.spent_aborts} consecutive secure rounds aborted after "
               f"their hospitals had trained (each spent privacy budget and produced no "
               f"model; abort_limit {limit}); last: {last}")
        display.note(f"stopping: {why}")
        self.record.report["stopped_early"] = why
        self.record.write()
        return True

    def _note_carried_epsilons(self) -> None:
        """Give each hospital's line the epsilon its data carried into this run: 0 when
        it carried no entry, else the epsilon it signed in its last carried entry when
        that entry is at this run's delta (otherwise it stays unknown)."""
        for cid, line in self.latest.items():
            if line.epsilon_carried is not None:
                continue
            chain = self.record.chains.get(cid, ())
            if line.ledger_carried == 0:
                self.latest[cid] = replace(line, epsilon_carried=0.0)
            elif len(chain) >= line.ledger_carried:
                last = chain[line.ledger_carried - 1]
                if last.delta == self.cfg.delta:
                    self.latest[cid] = replace(line, epsilon_carried=float(last.epsilon))

    def _finish(self) -> dict[str, Any]:
        """Write the run's final summary (report.json's ``final``).

        Guarantee: a figure of the model (metrics, held-out evaluation, the saved
        model file, the plots) is reported only when some round averaged an update;
        ``rounds_completed`` counts those rounds. A run in which none did says so
        (``model_trained`` false) and writes no model file and no plot; its epsilon
        and stopped hospitals are still recorded, and its checkpoint still resumes."""
        final_eps = max((v.epsilon for v in self.latest.values()), default=0.0)
        rows = RunReport.from_plain(self.record.report, "the run's report").rounds
        averaged = [r for r in rows if r.aggregated]
        if not averaged:
            self.record.finish(RunSummary(
                rounds_completed=0,
                epsilon=final_eps,
                delta=self.cfg.delta,
                non_private=not math.isfinite(final_eps),
                stopped=dict(self.stopped),
                model_trained=False,
            ))
            return self.record.report
        held_out = [r.federated_eval for r in rows if r.federated_eval is not None]
        if self.cfg.save_model is not None:
            self.cfg.save_model.parent.mkdir(parents=True, exist_ok=True)
            np.savez(self.cfg.save_model, **self.global_weights)
        self.record.finish(RunSummary(
            rounds_completed=len(averaged),
            epsilon=final_eps,
            delta=self.cfg.delta,
            non_private=not math.isfinite(final_eps),
            stopped=dict(self.stopped),
            metrics=dict(self.metrics),
            # the latest pooled held-out evaluation the hospitals released
            federated_eval=held_out[-1] if held_out else None,
            model=str(self.cfg.save_model) if self.cfg.save_model is not None else None,
        ))
        self._draw_plots()
        return self.record.report

    def _draw_plots(self) -> None:
        """The observer's plots, listed in the report's ``final["plots"]`` (the report
        is already on disk: a plotting failure only warns and never loses it)."""
        paths = RunObserver.draw_plots(self.record.report, self.cfg.out_dir)
        if paths is not None:
            self.record.report["final"]["plots"] = paths
            self.record.write()


class _SecureRoundHooks:
    """The round loop's side of one secure round (:class:`RoundHooks`)."""

    def __init__(self, fed: Federation, rnd: int, arrays: ArrayRecord, trained: list[str],
                 display: RunObserver) -> None:
        self.fed, self.rnd, self.arrays, self.trained = fed, rnd, arrays, trained
        self.note = display.note
        self.display = display

    def train_content(self, node: int, content: RecordDict) -> None:
        self.fed._round_content(self.rnd, self.arrays, content, node)

    def input_digest(self) -> bytes:
        return weights_digest(self.fed.global_weights)

    def on_train_reply(self, node: int, reply: Message) -> bool:
        cid = self.fed._contained(self.rnd, node, self.display, self.fed._read_train_reply,
                                  self.rnd, node, reply, self.display)
        if cid is not None:
            self.trained.append(cid)
        return cid is not None

    def on_missing(self, node: int) -> None:
        self.fed.failed[self.fed._label(node)] = "did not answer"
        self.note(f"round {self.rnd}: {self.fed._label(node)} did not answer")

    def on_dropped(self, node: int, reason: str) -> None:
        # The stage's note has been shown; the row records the reason (it may quote the
        # hospital's own error text: one bounded line).
        self.fed.failed[self.fed._label(node)] = one_line(reason)

    def label(self, node: int) -> str:
        return self.fed._label(node)

    def next_nodes(self) -> list[int] | None:
        # Asked at the unmask stage: the hospitals of the next round, if any, so that
        # its config and shares can travel with this round's unmask messages.
        return list(self.fed.active) if self.rnd < self.fed.cfg.rounds else None


def run_federation(
    grid: Grid,
    initial_weights: Weights,
    evaluate: EvaluateFn,
    cfg: ServerConfig,
) -> dict[str, Any]:
    """Run ``cfg.rounds`` rounds of private FedAvg (see :class:`Federation`)."""
    return Federation(grid, evaluate, cfg).run(initial_weights)


def make_server_app(
    initial_weights: Callable[[], Weights],
    evaluate: EvaluateFn,
    cfg: ServerConfig,
    on_done: Callable[[dict[str, Any]], None] | None = None,
) -> ServerApp:
    """A Flower ``ServerApp`` running :func:`run_federation`."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        report = run_federation(grid, initial_weights(), evaluate, cfg)
        if on_done is not None:
            on_done(report)

    return app
