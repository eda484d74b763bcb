"""The run report (``report.json``), read once into typed records.

The server writes ``report.json`` after every round (:mod:`bract.flower.server`)
from these records (:meth:`RoundRow.to_plain`, :meth:`RunSummary.to_plain`);
everything that reads it back — the privacy officer's audit, the summary line,
the plots — reads it through :func:`read_report` / :meth:`RunReport.from_plain`,
so each field is named and converted in one place, both ways.

Structure is checked strictly (a report without a ``rounds`` list, a round without
its number or per-hospital table, a per-hospital entry that is not an object:
:class:`ReportError` naming it), and so are counts: a round number, ``steps``,
``ledger_entries``, ``ledger_carried``, ``of_round``, ``ledger_interrupted``,
``rounds_completed`` and a held-out
evaluation's ``model_of_round`` and ``examples`` are absent (or ``null``) or a whole
number from 0 to 2**53 (the ledger's range), anything else is a :class:`ReportError`
naming the field and where it is. Other *values* are read leniently: a number that
is missing or unreadable becomes ``nan`` (``"inf"``, or an integer too large for a
float, becomes ``inf``), so a reader that checks values (the audit) can say which
one is wrong instead of failing to read.

A *strict* reading (``strict=True``; ``bract audit verify`` reads report.json so)
takes nothing on trust and coerces nothing: every other number must be a JSON
number (not a boolean), ``null``/absent, or one of the texts :func:`plain_number`
writes for numbers JSON has not (``"inf"``, ``"-inf"``, ``"nan"``), so ``"2.5"`` is
refused, not read as 2.5; a hospital's ``trained`` must be ``true`` or ``false``;
a round's ``trained`` a list of distinct hospital names and its ``failed`` an object
of reasons; no object may hold a key twice (JSON readers keep one of them silently:
two lines for one hospital in a round), and the rows must run in increasing round
order, each round once; every hospital name must be one line of printable text.
Anything else is a :class:`ReportError` naming the round and the field.

Reasons (a hospital line's ``reason``, a round's ``failed``, ``final.stopped``,
``stopped_early``) are free text
from the server's file, read as one bounded line of printable text
(:func:`~bract.records.text.one_line`) in either reading, so no reader shows a line
break or control character a hostile file put there.
Pure: imports neither flwr nor torch.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bract.records.text import one_line

__all__ = ["MAX_COUNT", "FederatedEval", "HospitalRound", "ReportError", "RoundRow",
           "RunReport", "RunSummary", "is_count", "number", "plain_number", "read_report"]

#: The global model's metrics a round row may carry (central test set).
METRIC_KEYS = ("loss", "accuracy", "mse", "r2")
#: The largest count (round number, steps, ledger length) a report may hold: the
#: range the ledger reads its own counts in (``bract.records.ledger.MAX_COUNT``).
MAX_COUNT = 2**53


class ReportError(ValueError):
    """A file is not a bract report, or its structure is broken; the message says where."""


def number(value: Any) -> float:
    """A report value as a float: ``"inf"`` is ``inf``; missing or unreadable is ``nan``."""
    if isinstance(value, bool):
        return math.nan
    try:
        return float(value)
    except OverflowError:  # an integer beyond any float (JSON allows 10**400)
        return math.inf if value > 0 else -math.inf
    except (TypeError, ValueError):
        return math.nan


#: The texts report.json holds for the numbers JSON has not (:func:`plain_number`).
NON_FINITE_TEXTS: dict[str, float] = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}


def plain_number(x: float) -> float | str:
    """A float as report.json holds it: finite as is, ``"inf"``/``"-inf"``/``"nan"``
    as text (JSON has no such numbers)."""
    x = float(x)
    return x if math.isfinite(x) else str(x)


def _shown(value: Any) -> str:
    """A hostile value, short enough for one line."""
    try:
        text = json.dumps(value, allow_nan=True)
    except (TypeError, ValueError):
        text = type(value).__name__
    return text if len(text) <= 40 else text[:37] + "..."


def is_count(value: Any) -> bool:
    """Whether ``value`` is a count a report may hold: an ``int`` (not a ``bool``) from
    0 to :data:`MAX_COUNT`. The one check the report's reader and the server (reading a
    hospital's reply, ``bract.flower.replies``) share, so that nothing the server
    accepts is refused when its report is read back."""
    return not isinstance(value, bool) and isinstance(value, int) and 0 <= value <= MAX_COUNT


def _count(data: Mapping[str, Any], key: str, where: str) -> int | None:
    """The count ``data[key]``: ``None`` when absent or ``null``, else a whole number
    from 0 to :data:`MAX_COUNT`; anything else (``5.5``, ``"5"``, ``true``, ``-1``,
    ``10**30``) is a :class:`ReportError` naming ``where`` and the field."""
    value = data.get(key)
    if value is None:
        return None
    if not is_count(value):
        raise ReportError(f"{where}: {key!r} is {_shown(value)}, not a whole number from 0 "
                          "to 2**53")
    return value


def _real(data: Mapping[str, Any], key: str, where: str, strict: bool) -> float:
    """The number ``data[key]`` as a float (absent or ``null``: ``nan``).

    Lenient (``strict`` false): :func:`number`, which reads text such as ``"2.5"``.
    Strict: a JSON number (an integer too large for a float is infinite) or one of
    :data:`NON_FINITE_TEXTS`; anything else (other text, a boolean, a list, an
    object) is a :class:`ReportError` naming ``where`` and the field."""
    value = data.get(key)
    if not strict or value is None:
        return number(value)
    if isinstance(value, str) and value in NON_FINITE_TEXTS:
        return NON_FINITE_TEXTS[value]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ReportError(f"{where}: {key!r} is {_shown(value)}, not a number (a JSON "
                          "number, or \"inf\", \"-inf\" or \"nan\")")
    return number(value)


def _flag(data: Mapping[str, Any], key: str, where: str, strict: bool) -> bool:
    """``data[key]`` as a boolean: lenient, true only for JSON ``true``; strict, it
    must be ``true`` or ``false`` (absent, ``1``, ``"yes"``: a :class:`ReportError`)."""
    value = data.get(key)
    if strict and not isinstance(value, bool):
        what = "is missing" if key not in data else f"is {_shown(value)}"
        raise ReportError(f"{where}: {key!r} {what}, not true or false")
    return value is True


@dataclass(frozen=True)
class HospitalRound:
    """One hospital's line in a round row: what it reported after that round."""

    epsilon: float
    trained: bool
    reason: str = ""
    steps: int | None = None
    noise_multiplier: float = math.nan
    sample_rate: float = math.nan
    #: The length of its signed chain the server held, and the hash of its last entry.
    ledger_entries: int | None = None
    ledger_head: str = ""
    #: Entries its data spent before this run (earlier runs or federations).
    ledger_carried: int = 0
    #: The epsilon those carried entries had spent at this run's delta, as the hospital
    #: signed it in its last carried entry (``None``: not known, e.g. carried at
    #: another delta).
    epsilon_carried: float | None = None
    #: The round whose reply this line records. A round row holds every hospital's
    #: latest line, so a hospital that was not asked or did not answer in a round keeps
    #: an earlier round's line there, marked with that round (``None``: a report
    #: written before lines were marked; read as the row's own round).
    of_round: int | None = None
    #: Entries of this line's round that the hospital spent in an earlier attempt of
    #: the round whose reply the server never recorded (a run interrupted in that round
    #: and resumed): they come before this reply's own entries in its chain.
    ledger_interrupted: int = 0

    @classmethod
    def from_plain(cls, data: Any, where: str, *, strict: bool = False) -> HospitalRound:
        """Parse one per-hospital entry; :class:`ReportError` if it is not an object or
        a count in it is not a whole number in range (strict: also a number that is
        not a JSON number, or ``trained`` not a boolean; see the module docstring)."""
        if not isinstance(data, Mapping):
            raise ReportError(f"{where} is not an object")
        carried = _count(data, "ledger_carried", where)
        before = data.get("epsilon_carried")
        return cls(
            epsilon=_real(data, "epsilon", where, strict),
            trained=_flag(data, "trained", where, strict),
            reason=one_line(data.get("reason", "")),
            steps=_count(data, "steps", where),
            noise_multiplier=_real(data, "noise_multiplier", where, strict),
            sample_rate=_real(data, "sample_rate", where, strict),
            ledger_entries=_count(data, "ledger_entries", where),
            ledger_head=str(data.get("ledger_head", "")),
            ledger_carried=carried if carried is not None else 0,
            epsilon_carried=(_real(data, "epsilon_carried", where, strict)
                             if before is not None else None),
            of_round=_count(data, "of_round", where),
            ledger_interrupted=_count(data, "ledger_interrupted", where) or 0,
        )

    def to_plain(self) -> dict[str, Any]:
        """The entry as report.json holds it (:meth:`from_plain` reads it back equal)."""
        return {
            "epsilon": plain_number(self.epsilon),
            "noise_multiplier": plain_number(self.noise_multiplier),
            "sample_rate": plain_number(self.sample_rate),
            "steps": self.steps,
            "trained": self.trained,
            "reason": self.reason,
            "ledger_entries": self.ledger_entries,
            "ledger_head": self.ledger_head,
            "ledger_carried": self.ledger_carried,
            "epsilon_carried": (plain_number(self.epsilon_carried)
                                if self.epsilon_carried is not None else None),
            "of_round": self.of_round,
            "ledger_interrupted": self.ledger_interrupted,
        }

    @property
    def starting_epsilon(self) -> float:
        """The epsilon the hospital's data had spent when this run began: 0 with nothing
        carried, the carried epsilon when known, else ``nan`` (unknown)."""
        if self.epsilon_carried is not None:
            return self.epsilon_carried
        return 0.0 if self.ledger_carried == 0 else math.nan


@dataclass(frozen=True)
class FederatedEval:
    """The hospitals' pooled held-out evaluation of the global model of ``model_of_round``."""

    model_of_round: int
    examples: int
    loss: float
    accuracy: float

    @classmethod
    def from_plain(cls, data: Any, where: str = "federated_eval", *,
                   strict: bool = False) -> FederatedEval | None:
        """Parse it, or ``None`` when absent or not an object; :class:`ReportError` for a
        count out of range (strict: also for a number that is not a JSON number)."""
        if not isinstance(data, Mapping):
            return None
        return cls(_count(data, "model_of_round", where) or 0,
                   _count(data, "examples", where) or 0,
                   _real(data, "loss", where, strict), _real(data, "accuracy", where, strict))

    def to_plain(self) -> dict[str, Any]:
        """As report.json holds it."""
        return {"model_of_round": self.model_of_round, "examples": self.examples,
                "loss": plain_number(self.loss), "accuracy": plain_number(self.accuracy)}


@dataclass(frozen=True)
class RoundRow:
    """One round as the server recorded it.

    ``trained`` names the hospitals whose update the round averaged into the global
    model; a round that averaged none (:attr:`aggregated` false) left the model
    unchanged, and the server records no central-test metrics for it: there is no
    new model to evaluate."""

    round: int
    epsilon: float
    per_client: dict[str, HospitalRound]
    trained: tuple[str, ...] = ()
    failed: dict[str, str] = field(default_factory=dict)
    #: The global model on the central test set (absent without one, and for a round
    #: that averaged no update).
    metrics: dict[str, float] = field(default_factory=dict)
    train_loss: float | None = None
    federated_eval: FederatedEval | None = None
    #: The secure round's record (its stages, dropouts, exclusions, abort), as the
    #: server's secure aggregator wrote it; absent in a plain-FedAvg round.
    secagg: dict[str, Any] | None = None
    delta: float = math.nan
    seconds: float = math.nan
    #: The first round of a run resumed from its checkpoint: the round the interrupted
    #: run was in, run again.
    resumed: bool = False

    @classmethod
    def from_plain(cls, data: Any, where: str, *, strict: bool = False) -> RoundRow:
        """Parse a round row; :class:`ReportError` naming a broken structure (strict:
        also a value of the wrong type, a ``trained`` list that is not one of distinct
        names, a ``failed`` that is not an object; see the module docstring)."""
        if not isinstance(data, Mapping):
            raise ReportError(f"{where} is not an object")
        rnd = _count(data, "round", where)
        if rnd is None:
            raise ReportError(f"{where} lacks its 'round' (the row's round number)")
        here = f"round {rnd}"
        per_client = data.get("per_client")
        if not isinstance(per_client, Mapping):
            raise ReportError(f"round {rnd} lacks its per-hospital table ('per_client')")
        trained = data.get("trained", [])
        failed = data.get("failed", {})
        if strict:
            _check_names(trained, here)
            if not isinstance(failed, Mapping) or not all(
                    isinstance(v, str) for v in failed.values()):
                raise ReportError(f"{here}: 'failed' is {_shown(failed)}, not an object of "
                                  "reasons (hospital: text)")
            for name in itertools.chain(per_client, failed):
                _check_name(name, here)
        return cls(
            round=rnd,
            epsilon=_real(data, "epsilon", here, strict),
            per_client={str(cid): HospitalRound.from_plain(v, f"round {rnd}'s entry of {cid}",
                                                           strict=strict)
                        for cid, v in per_client.items()},
            trained=tuple(str(c) for c in trained) if isinstance(trained, list) else (),
            failed={str(k): one_line(v) for k, v in failed.items()}
            if isinstance(failed, Mapping) else {},
            metrics={k: _real(data, k, here, strict) for k in METRIC_KEYS if k in data},
            train_loss=_real(data, "train_loss", here, strict) if "train_loss" in data else None,
            federated_eval=FederatedEval.from_plain(data.get("federated_eval"),
                                                    f"round {rnd}'s federated_eval",
                                                    strict=strict),
            secagg=dict(data["secagg"]) if isinstance(data.get("secagg"), Mapping) else None,
            delta=_real(data, "delta", here, strict),
            seconds=_real(data, "seconds", here, strict),
            resumed=(_flag(data, "resumed", here, strict) if "resumed" in data else False),
        )

    @property
    def aggregated(self) -> bool:
        """Whether the round averaged an update into the global model (some hospital's
        update is in ``trained``)."""
        return bool(self.trained)

    def to_plain(self) -> dict[str, Any]:
        """The row as report.json holds it (:meth:`from_plain` reads it back equal):
        the global model's metrics at the top level, optional parts only when present;
        ``aggregated`` states whether the round changed the global model."""
        out: dict[str, Any] = {
            "round": self.round,
            "epsilon": plain_number(self.epsilon),
            "delta": plain_number(self.delta),
            "per_client": {cid: h.to_plain() for cid, h in sorted(self.per_client.items())},
            "trained": sorted(self.trained),
            "aggregated": self.aggregated,
            "failed": dict(sorted(self.failed.items())),
            **{k: plain_number(v) for k, v in self.metrics.items()},
        }
        if self.train_loss is not None:
            out["train_loss"] = plain_number(self.train_loss)
        if self.federated_eval is not None:
            out["federated_eval"] = self.federated_eval.to_plain()
        if self.secagg is not None:
            out["secagg"] = self.secagg
        if self.resumed:
            out["resumed"] = True
        out["seconds"] = plain_number(self.seconds)
        return out


@dataclass(frozen=True)
class RunSummary:
    """The end of a run (``report.json``'s ``final``): what the federation produced.

    ``rounds_completed`` counts the rounds that averaged an update. When none did,
    ``model_trained`` is false and the summary holds no figure of the model (no
    metrics, no held-out evaluation, no saved model, no plots): the global model is
    the initial one. The epsilon stays: what the hospitals spent is spent."""

    rounds_completed: int
    #: The largest epsilon any hospital reached (``inf``: a non-private run).
    epsilon: float
    delta: float
    non_private: bool = False
    #: Hospitals that stopped, with their reason (a spent budget, a refusal).
    stopped: dict[str, str] = field(default_factory=dict)
    #: The final global model on the central test set (absent without one).
    metrics: dict[str, float] = field(default_factory=dict)
    #: The latest pooled held-out evaluation the hospitals released.
    federated_eval: FederatedEval | None = None
    #: Where the final global weights were saved (``bract simulate --save-model``).
    model: str | None = None
    plots: tuple[str, ...] = ()
    #: Whether any round averaged an update (false: the model is the initial one).
    model_trained: bool = True

    @classmethod
    def from_plain(cls, data: Any, *, strict: bool = False) -> RunSummary | None:
        """Parse ``final``; ``None`` while the run has not finished (none, or empty);
        :class:`ReportError` for a count out of range (strict: also for a number that
        is not a JSON number)."""
        if not isinstance(data, Mapping) or not data:
            return None
        stopped = data.get("stopped", {})
        if strict and isinstance(stopped, Mapping):
            for name in stopped:
                _check_name(str(name), "final")
        plots = data.get("plots", [])
        return cls(
            rounds_completed=_count(data, "rounds_completed", "final") or 0,
            epsilon=_real(data, "epsilon", "final", strict),
            delta=_real(data, "delta", "final", strict),
            non_private=data.get("non_private") is True,
            stopped={str(k): one_line(v) for k, v in stopped.items()}
            if isinstance(stopped, Mapping) else {},
            metrics={k: _real(data, k, "final", strict) for k in METRIC_KEYS if k in data},
            federated_eval=FederatedEval.from_plain(data.get("federated_eval"),
                                                    "final's federated_eval", strict=strict),
            model=str(data["model"]) if data.get("model") else None,
            plots=tuple(str(p) for p in plots) if isinstance(plots, list) else (),
            model_trained=data.get("model_trained") is not False,
        )

    def to_plain(self) -> dict[str, Any]:
        """As report.json holds it (:meth:`from_plain` reads it back equal)."""
        out: dict[str, Any] = {
            "rounds_completed": self.rounds_completed,
            "model_trained": self.model_trained,
            "epsilon": plain_number(self.epsilon),
            "delta": plain_number(self.delta),
            "non_private": self.non_private,
            "stopped": dict(sorted(self.stopped.items())),
            **{k: plain_number(v) for k, v in self.metrics.items()},
        }
        if self.federated_eval is not None:
            out["federated_eval"] = self.federated_eval.to_plain()
        if self.model is not None:
            out["model"] = self.model
        if self.plots:
            out["plots"] = list(self.plots)
        return out


@dataclass(frozen=True)
class RunReport:
    """A whole ``report.json``: the run's configuration, its rounds, its final summary."""

    config: dict[str, Any]
    rounds: tuple[RoundRow, ...]
    #: ``None`` while the run has not finished.
    final: RunSummary | None = None
    #: The initial global model on the central test set (absent without one).
    initial: dict[str, float] = field(default_factory=dict)
    stopped_early: str | None = None

    @classmethod
    def from_plain(cls, data: Any, source: str = "report", *, strict: bool = False) -> RunReport:
        """Parse a report; :class:`ReportError` when it is not one or its structure is
        broken (the message names ``source`` and the place). ``strict``: every value
        must have its type, no key may appear twice in an object, and the rows must
        run in increasing round order, each round once (the module docstring)."""
        if not isinstance(data, Mapping) or not isinstance(data.get("rounds"), list):
            raise ReportError(f"{source} is not a bract report.json (no 'rounds' list)")
        try:
            if strict:
                twice = _key_twice(data)
                if twice is not None:
                    raise ReportError(twice)
            rounds = tuple(RoundRow.from_plain(r, f"round row {i + 1}", strict=strict)
                           for i, r in enumerate(data["rounds"]))
            if strict:
                _check_round_order(rounds)
            final = RunSummary.from_plain(data.get("final"), strict=strict)
        except ReportError as exc:
            raise ReportError(f"{source}: {exc}") from None
        config = data.get("config")
        initial = data.get("initial")
        stopped = data.get("stopped_early")
        return cls(
            config=dict(config) if isinstance(config, Mapping) else {},
            rounds=rounds,
            final=final,
            initial={k: number(v) for k, v in initial.items()}
            if isinstance(initial, Mapping) else {},
            stopped_early=one_line(stopped) if stopped is not None else None,
        )

    def config_value(self, name: str) -> Any:
        """A config value under its Python name or its run-config (hyphenated) name."""
        if name in self.config:
            return self.config[name]
        return self.config.get(name.replace("_", "-"))

    def starting_epsilons(self) -> dict[str, float]:
        """Each hospital's epsilon when this run began (its first line's
        :attr:`HospitalRound.starting_epsilon`): 0 for a hospital that carried nothing,
        its carried epsilon from earlier runs, ``nan`` when unknown."""
        out: dict[str, float] = {}
        for row in self.rounds:
            for cid, line in row.per_client.items():
                out.setdefault(cid, line.starting_epsilon)
        return out

    @property
    def starting_epsilon(self) -> float:
        """The largest of :meth:`starting_epsilons` (0 with no hospital; ``nan`` when
        one of them is unknown): round 0 of the reported maximum."""
        start = self.starting_epsilons().values()
        return math.nan if any(math.isnan(v) for v in start) else max(start, default=0.0)

    def last_per_client(self) -> dict[str, HospitalRound]:
        """Each hospital's latest line (the server's last word on it)."""
        out: dict[str, HospitalRound] = {}
        for row in self.rounds:
            out.update(row.per_client)
        return out

    @property
    def final_epsilon(self) -> float:
        """The final epsilon the report claims (``nan`` if absent or unreadable)."""
        return self.final.epsilon if self.final is not None else math.nan

    @property
    def final_federated_eval(self) -> FederatedEval | None:
        """The latest pooled held-out evaluation, if the hospitals released one."""
        return self.final.federated_eval if self.final is not None else None

    def errors(self) -> list[str]:
        """What went wrong in the run, one sentence per cause, in round order: each
        hospital whose handler failed (its rounds and its reason; a hospital that only
        did not answer is a dropout, not an error), and each round that trained no
        hospital although some were still taking part. Empty for a clean run (a
        hospital stopped by its budget is not an error)."""
        out: list[str] = []
        if not any(row.trained for row in self.rounds):
            stopped = self.final.stopped if self.final is not None else {}
            failed = {cid: why for row in self.rounds for cid, why in row.failed.items()}
            why = "; ".join(f"{cid}: {reason}" for cid, reason in
                            sorted({**failed, **stopped}.items()))
            return ["no hospital's update was averaged in any round, so the model was not "
                    "trained"
                    + (f" ({why})" if why else "")
                    + (f"; stopped {self.stopped_early}" if self.stopped_early else "")]
        by_cause: dict[tuple[str, str], list[int]] = {}
        for row in self.rounds:
            for cid, why in row.failed.items():
                if why != "did not answer":
                    by_cause.setdefault((cid, why), []).append(row.round)
        for (cid, why), rounds in sorted(by_cause.items(), key=lambda kv: (kv[1][0], kv[0])):
            which = (f"round {rounds[0]}" if len(rounds) == 1
                     else f"rounds {', '.join(str(r) for r in rounds)}")
            out.append(f"{cid} failed in {which}: {why.removeprefix('failed: ')}")
        for row in self.rounds:
            # Hospitals failed or trained, and still nothing was aggregated (a round in
            # which every hospital stopped on its budget is the run's normal end).
            if not row.trained and (row.failed or any(
                    v.trained for v in row.per_client.values())):
                out.append(f"round {row.round} averaged no hospital's update; the global "
                           "model was not updated")
        return out

    def to_plain(self) -> dict[str, Any]:
        """The whole report as report.json holds it."""
        out: dict[str, Any] = {"config": self.config,
                               "rounds": [r.to_plain() for r in self.rounds]}
        if self.initial:
            out["initial"] = {k: plain_number(v) for k, v in self.initial.items()}
        if self.stopped_early is not None:
            out["stopped_early"] = self.stopped_early
        out["final"] = self.final.to_plain() if self.final is not None else {}
        return out


class _Keys(dict[str, Any]):
    """A JSON object as read, remembering the keys it held more than once (a plain
    ``dict`` keeps the last value of a repeated key and forgets the others)."""

    twice: tuple[str, ...] = ()


def _keys_of(pairs: list[tuple[str, Any]]) -> _Keys:
    out = _Keys(pairs)
    if len(out) != len(pairs):
        keys = [k for k, _ in pairs]
        out.twice = tuple(sorted({k for k in keys if keys.count(k) > 1}))
    return out


def _key_twice(data: Any, where: str = "") -> str | None:
    """Where an object read by :func:`read_report` held a key twice, as a message naming
    the round (and the key), or None. A round row is named by its round number."""
    if isinstance(data, _Keys) and data.twice:
        inside = f" in {where}" if where else " at the top level"
        return f"{data.twice[0]!r} appears twice{inside}"
    if isinstance(data, Mapping):
        for key, value in data.items():
            if key == "rounds" and not where and isinstance(value, list):
                for i, row in enumerate(value):
                    rnd = row.get("round") if isinstance(row, Mapping) else None
                    name = (f"round {rnd}" if isinstance(rnd, int) and not isinstance(rnd, bool)
                            else f"round row {i + 1}")
                    found = _key_twice(row, name)
                    if found is not None:
                        return found
                continue
            found = _key_twice(value, f"{where}'s {key!r}" if where else repr(key))
            if found is not None:
                return found
    elif isinstance(data, list):
        for i, value in enumerate(data):
            found = _key_twice(value, f"{where}[{i}]")
            if found is not None:
                return found
    return None


def _check_names(trained: Any, where: str) -> None:
    """A round's ``trained``: a list of distinct hospital names, else a
    :class:`ReportError` naming ``where``."""
    if not isinstance(trained, list) or not all(isinstance(c, str) for c in trained):
        raise ReportError(f"{where}: 'trained' is {_shown(trained)}, not a list of hospital "
                          "names")
    twice = sorted({c for c in trained if trained.count(c) > 1})
    if twice:
        raise ReportError(f"{where}: 'trained' lists {_shown(twice[0])} twice")
    for name in trained:
        _check_name(name, where)


def _check_name(name: str, where: str) -> None:
    """A hospital name as the server writes it (one printable line,
    :func:`~bract.records.text.one_line`), else a :class:`ReportError`: a name holding
    a line break or a control character would rewrite what the audit shows."""
    if name != one_line(name):
        raise ReportError(f"{where}: the hospital name {_shown(name)} is not one line of "
                          "printable text")


def _check_round_order(rounds: tuple[RoundRow, ...]) -> None:
    """Rows in increasing round order, each round once, else a :class:`ReportError`
    naming the round."""
    first: dict[int, int] = {}
    for i, row in enumerate(rounds, start=1):
        if row.round in first:
            raise ReportError(f"round {row.round} has two rows (rows {first[row.round]} and "
                              f"{i})")
        first[row.round] = i
    for i, (before, row) in enumerate(itertools.pairwise(rounds), start=2):
        if row.round < before.round:
            raise ReportError(f"round row {i} is round {row.round}, after round "
                              f"{before.round}: rows must run in increasing round order")


def read_report(path: str | Path, *, strict: bool = False) -> RunReport:
    """Read ``report.json``; :class:`ReportError` naming a missing, unreadable or
    broken file (``strict``: see :meth:`RunReport.from_plain`)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"),
                          object_pairs_hook=_keys_of if strict else None)
    except FileNotFoundError:
        raise ReportError(f"report file {path} does not exist") from None
    except (OSError, ValueError, RecursionError) as exc:  # bad JSON, 5000-digit ints, deep nesting
        raise ReportError(f"report file {path} is not readable JSON: {exc}") from None
    return RunReport.from_plain(data, str(path), strict=strict)
