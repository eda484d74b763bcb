"""Privacy ledger, epsilon from recorded mechanism events, calibration, budgets.

The ledger records *what was run* (noise multiplier, sampling rate, steps, ...),
never just the resulting epsilon, so that any accountant — this module's or an
auditor's own — can re-derive every reported figure.

Accountants:

* ``"prv"`` (default, the reported figure): Opacus's PRV accountant, run with an
  epsilon error of 0.2% of epsilon (but at least 1e-4 absolute) so the returned
  *upper bound* stays within about 0.3% of the exact value (for epsilon below
  ~0.05 the 1e-4 floor dominates). Where Opacus's PRV cannot represent the loss
  (epsilon in the hundreds: it returns inf), the PLD upper bound is reported.
* ``"pld"``: dp_accounting's privacy-loss-distribution accountant
  (value discretization 1e-4), the independent cross-check.
* ``"rdp"``: Opacus's Rényi accountant; a valid but looser upper bound.

GDP (the central-limit approximation) is deliberately not offered: it is not an
upper bound and so must never be a reported figure.

All three use add-or-remove-one neighbouring datasets and Poisson subsampling,
which is what Opacus's DP-SGD with ``poisson_sampling=True`` implements.
"""

from __future__ import annotations

import functools
import json
import math
import numbers
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ACCOUNTANTS = ("prv", "pld", "rdp")
DEFAULT_ACCOUNTANT = "prv"
SAMPLING_KINDS = ("poisson",)
#: What an event records: a call of local DP-SGD, or one Gaussian release of a
#: hospital's metrics (each privacy unit's metric vector clipped, noise added once).
MECHANISMS = ("dp-sgd", "metrics")
#: What one neighbouring dataset adds or removes: one training record, or one patient
#: with all of their records. Events of different units never compose into one epsilon.
PRIVACY_UNITS = ("record", "patient")
#: The unit of an event read from a ledger written before events recorded theirs: the
#: hospital states it (``check_unit``'s ``legacy``); accountants compose it with either.
LEGACY_UNIT = "unstated"
PLD_DISCRETIZATION = 1e-4
#: Relative epsilon error the PRV accountant is run with (its result is an upper bound).
PRV_RELATIVE_ERROR = 0.002


class PrivacyError(ValueError):
    """A privacy parameter, plan or event is invalid; the message names the fix.

    ``public_reason``, when given, is what may leave a hospital in place of a message
    that quotes a figure of its data (a record or patient count); see
    :mod:`bract.flower.reasons`."""

    def __init__(self, message: str, *, public_reason: str | None = None) -> None:
        super().__init__(message)
        if public_reason is not None:
            self.public_reason = public_reason


def _is_number(value: object) -> bool:
    """A real number (Python's or numpy's), never a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def as_python_float(value: float) -> float:
    """``value`` as the Python float it reads as: a numpy float32 ``1e-5`` is ``1e-05``
    (its shortest repr), never the float32's exact binary value ``9.99999974738e-06``,
    so a δ recorded from one compares equal to the δ a run declares."""
    if isinstance(value, np.floating) and not isinstance(value, np.float64):
        return float(str(value))
    return float(value)


def _check_delta(delta: float) -> None:
    if not _is_number(delta):
        raise PrivacyError(f"delta must be a number strictly between 0 and 1 (got {delta!r}, "
                           f"of type {type(delta).__name__}).")
    if not (0.0 < float(delta) < 1.0):
        raise PrivacyError(
            f"delta must be a number strictly between 0 and 1 (got {delta!r}); "
            "a common choice is 1e-5 or less than 1/(number of patients)."
        )


#: The largest target epsilon bract calibrates noise for. Above it DP-SGD protects
#: nothing meaningful, and the accountants' work grows with epsilon (calibrating
#: for 50 takes about 15 s and 0.5 GB on a 2-core machine; for 1000, about a minute
#: and 2 GB per hospital), so a larger target is refused before any work.
MAX_TARGET_EPSILON = 50.0
#: The floor on a target epsilon calibration accepts: below it the search's PLD grid
#: (a fraction of the target) grows without bound, and at 0.05 the calibrated noise
#: multiplier is already 8-100 (a model learns little). Smaller targets are refused.
MIN_TARGET_EPSILON = 0.05
#: Above this epsilon (by RDP's bound) the reported figure is RDP's: PRV and PLD would
#: need GBs, and no budget bract accepts comes near it.
EXACT_EPSILON_CAP = 1000.0
#: A noise multiplier below this is accounted as epsilon = inf (an upper bound, always
#: true): its epsilon exceeds every budget bract accepts at any sample rate (RDP's
#: bound at sigma 0.0099 is about 5500 for one step even at q = 1e-9), and Opacus's
#: RDP series never ends for sigma near 1e-154 (1/sigma^2 overflows).
MIN_ACCOUNTED_NOISE = 0.01
#: A noise multiplier above this is accounted as this one: epsilon only falls as the
#: noise grows, so the result is an upper bound (3e-4 for 10 steps at q = 0.5 and
#: delta 1e-5), and the accountants overflow near 1e300.
MAX_ACCOUNTED_NOISE = 1e4


def _check_epsilon(epsilon: float) -> None:
    if (
        not _is_number(epsilon)
        or not math.isfinite(float(epsilon))
        or float(epsilon) <= 0.0
    ):
        raise PrivacyError(f"epsilon must be a finite number > 0 (got {epsilon!r}).")


@dataclass(frozen=True)
class DpSgdEvent:
    """One call of local DP-SGD: what an accountant needs, and nothing private.

    ``steps`` counts every optimizer step taken under Poisson sampling with rate
    ``sample_rate``, including steps whose sampled batch was empty. Each step adds
    Gaussian noise of standard deviation ``noise_multiplier * max_grad_norm`` to
    the sum of per-example gradients clipped to ``max_grad_norm``.

    ``mechanism="metrics"`` records a Gaussian release of metric sums instead
    (``sample_rate`` 1, ``steps`` 1: every privacy unit's metric vector clipped to
    ``max_grad_norm``, noise of standard deviation ``noise_multiplier *
    max_grad_norm`` added once). Accountants compose both kinds alike.

    ``unit`` is what the sampling and clipping protected: one ``"record"`` or one
    ``"patient"`` (all of a patient's records). An epsilon holds for one unit only:
    events of different units are never composed (:func:`compress` refuses), since a
    per-record event says nothing per patient of several records, and the reverse.
    """

    noise_multiplier: float
    sample_rate: float
    steps: int
    max_grad_norm: float
    delta: float
    sampling: str = "poisson"
    round: int = 0
    client_id: str = ""
    mechanism: str = "dp-sgd"
    unit: str = "record"

    def __post_init__(self) -> None:
        if not (
            isinstance(self.noise_multiplier, (int, float))
            and math.isfinite(self.noise_multiplier)
            and self.noise_multiplier >= 0
        ):
            raise PrivacyError(
                f"noise_multiplier must be a finite number >= 0 (got {self.noise_multiplier!r})."
            )
        if not (isinstance(self.sample_rate, (int, float)) and 0.0 < self.sample_rate <= 1.0):
            raise PrivacyError(f"sample_rate must lie in (0, 1] (got {self.sample_rate!r}).")
        if not isinstance(self.steps, int) or isinstance(self.steps, bool) or self.steps < 0:
            raise PrivacyError(f"steps must be an integer >= 0 (got {self.steps!r}).")
        if not (isinstance(self.max_grad_norm, (int, float))
                and math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0):
            raise PrivacyError(
                f"max_grad_norm must be > 0 and finite (got {self.max_grad_norm!r}): the "
                "noise is scaled to the clip, so only a finite clip bounds a step.")
        _check_delta(self.delta)
        object.__setattr__(self, "delta", as_python_float(self.delta))
        if self.sampling not in SAMPLING_KINDS:
            raise PrivacyError(
                f"sampling {self.sampling!r} is not supported by the accountants; "
                f"use one of {SAMPLING_KINDS} (Opacus poisson_sampling=True)."
            )
        if self.mechanism not in MECHANISMS:
            raise PrivacyError(f"mechanism {self.mechanism!r} is not one of {MECHANISMS}.")
        if self.unit not in (*PRIVACY_UNITS, LEGACY_UNIT):
            raise PrivacyError(f"privacy unit {self.unit!r} is not one of {PRIVACY_UNITS}.")
        if self.mechanism == "metrics" and (self.sample_rate != 1.0 or self.steps != 1):
            raise PrivacyError("a metrics release is one Gaussian release of every unit: "
                               f"sample_rate 1 and steps 1 (got {self.sample_rate!r}, "
                               f"{self.steps!r}).")

    @property
    def is_private(self) -> bool:
        """False when the event added no noise (its epsilon is infinite)."""
        return self.noise_multiplier > 0

    @property
    def is_training(self) -> bool:
        """True for DP-SGD steps, False for a metrics release."""
        return self.mechanism == "dp-sgd"

    def to_plain(self) -> dict[str, Any]:
        """Plain JSON-able dict (for Flower records, JSONL files, auditors).

        A DP-SGD event leaves ``mechanism`` out, and an event read without a unit
        (:data:`LEGACY_UNIT`) leaves ``unit`` out, so that ledgers written before either
        field existed hash and verify exactly as they did."""
        plain = asdict(self)
        if self.mechanism == "dp-sgd":
            del plain["mechanism"]
        if self.unit == LEGACY_UNIT:
            del plain["unit"]
        return plain

    @classmethod
    def from_plain(cls, data: dict[str, Any]) -> DpSgdEvent:
        """Inverse of :meth:`to_plain`; rejects unknown or missing fields by name."""
        if not isinstance(data, dict):
            raise PrivacyError(f"a ledger event must be a mapping, got {type(data).__name__}")
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(data) - known
        if unknown:
            raise PrivacyError(f"unknown ledger event field(s): {sorted(unknown)}")
        required = {"noise_multiplier", "sample_rate", "steps", "max_grad_norm", "delta"}
        missing = required - set(data)
        if missing:
            raise PrivacyError(f"ledger event is missing field(s): {sorted(missing)}")
        values = dict(data)
        values.setdefault("unit", LEGACY_UNIT)  # written before events recorded their unit
        for key in ("steps", "round"):
            if key in values:
                values[key] = _as_int(key, values[key])
        for key in ("noise_multiplier", "sample_rate", "max_grad_norm", "delta"):
            values[key] = _as_float(key, values[key])
        for key in ("sampling", "client_id", "mechanism", "unit"):
            if key in values and not isinstance(values[key], str):
                raise PrivacyError(
                    f"ledger event field {key!r} must be a string (got {values[key]!r})"
                )
        return cls(**values)


def _as_int(key: str, value: Any) -> int:
    """An integral JSON value as int; a PrivacyError naming ``key`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PrivacyError(f"ledger event field {key!r} must be an integer (got {value!r})")
    if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
        raise PrivacyError(f"ledger event field {key!r} must be an integer (got {value!r})")
    return int(value)


def _as_float(key: str, value: Any) -> float:
    """A JSON number as float; a PrivacyError naming ``key`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PrivacyError(f"ledger event field {key!r} must be a number (got {value!r})")
    return float(value)


@dataclass(frozen=True)
class PrivacyLedger:
    """The append-only list of DP events one hospital has run, in order.

    Immutable: :meth:`append` returns a new ledger. The epsilon it reports covers
    every event recorded, so the epsilon after round r covers rounds 1..r.
    """

    client_id: str = ""
    events: tuple[DpSgdEvent, ...] = field(default_factory=tuple)

    def append(self, event: DpSgdEvent) -> PrivacyLedger:
        """A new ledger with ``event`` appended."""
        return PrivacyLedger(self.client_id, (*self.events, event))

    @property
    def total_steps(self) -> int:
        """Cumulative DP-SGD steps across all recorded events (metrics releases are
        not steps)."""
        return sum(e.steps for e in self.events if e.is_training)

    def epsilon(self, delta: float, accountant: str = DEFAULT_ACCOUNTANT) -> float:
        """Epsilon at ``delta`` of all recorded events composed (an upper bound)."""
        return epsilon_of(self.events, delta, accountant)

    def to_plain(self) -> dict[str, Any]:
        """Plain data: ``{"client_id": ..., "events": [event dicts]}``."""
        return {"client_id": self.client_id, "events": [e.to_plain() for e in self.events]}

    @classmethod
    def from_plain(cls, data: dict[str, Any]) -> PrivacyLedger:
        """Inverse of :meth:`to_plain`."""
        if not isinstance(data, dict) or not isinstance(data.get("events"), list):
            raise PrivacyError("a ledger must be a mapping with an 'events' list")
        unknown = set(data) - {"client_id", "events"}
        if unknown:
            raise PrivacyError(f"unknown ledger field(s): {sorted(unknown)}")
        return cls(
            str(data.get("client_id", "")),
            tuple(DpSgdEvent.from_plain(e) for e in data["events"]),
        )

    def to_json(self) -> str:
        """Compact JSON text of :meth:`to_plain` (fits a Flower ConfigRecord string)."""
        return json.dumps(self.to_plain(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> PrivacyLedger:
        """Inverse of :meth:`to_json`.

        Guarantee: whatever ``text`` holds, the only exception is :class:`PrivacyError`
        (malformed JSON, nesting too deep for the parser, an integer too long to read,
        or a ledger :meth:`from_plain` refuses)."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PrivacyError(f"ledger JSON is malformed: {exc}") from None
        except (ValueError, RecursionError) as exc:  # an integer too long, nesting too deep
            raise PrivacyError(f"ledger JSON is not usable ({type(exc).__name__})") from None
        return cls.from_plain(data)


def write_jsonl(events: Iterable[DpSgdEvent], path: str | Path) -> None:
    """Write one JSON object per event (append-friendly format for auditors)."""
    with open(path, "w", encoding="utf-8") as fh:
        for e in events:
            fh.write(json.dumps(e.to_plain(), sort_keys=True) + "\n")


def read_jsonl(path: str | Path) -> list[DpSgdEvent]:
    """Read events written by :func:`write_jsonl`; names the bad line on error."""
    out: list[DpSgdEvent] = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                out.append(DpSgdEvent.from_plain(json.loads(line)))
            except (ValueError, TypeError) as exc:  # JSONDecodeError, PrivacyError
                raise PrivacyError(f"{path}:{lineno}: bad ledger line: {exc}") from None
    return out


def privacy_unit_of(events: Iterable[DpSgdEvent], default: str = "record") -> str:
    """The one privacy unit ``events`` protect (``default`` for no events;
    :data:`LEGACY_UNIT` when none states its unit; events without one count as either).

    Raises :class:`PrivacyError` when they hold more than one: an epsilon composed
    over record-level and patient-level events bounds neither a record nor a patient
    (a patient with k records can cost up to k record-level steps' worth; a record
    removed from a patient's clipped sum can cost a replacement, not an addition)."""
    counts: dict[str, int] = {}
    legacy = False
    for e in events:
        if e.unit == LEGACY_UNIT:
            legacy = True
        else:
            counts[e.unit] = counts.get(e.unit, 0) + 1
    if not counts and legacy:
        return LEGACY_UNIT
    if len(counts) > 1:
        held = ", ".join(f"{n} {u}-level" for u, n in sorted(counts.items()))
        raise PrivacyError(
            f"this data's privacy ledger mixes privacy units ({held} events): an epsilon "
            "per patient does not cover record-level events of a patient with several "
            "records, nor the reverse. Keep training this data under the unit its ledger "
            "started with.")
    return next(iter(counts), default)


def check_unit(prior: Iterable[DpSgdEvent], unit: str, legacy: str | None = None) -> None:
    """Refuse to spend more on data whose ``prior`` events protect another unit than
    ``unit`` (:class:`PrivacyError`, naming both): the two do not compose into one
    epsilon (:func:`privacy_unit_of`). Events written before events recorded their
    unit count as ``legacy``, the unit the hospital states those runs protected; with
    such events and no statement it refuses, saying so (a guess could under-count)."""
    prior = list(prior)
    stated = privacy_unit_of([e for e in prior if e.unit != LEGACY_UNIT], unit)
    unstated = sum(e.unit == LEGACY_UNIT for e in prior)
    if unstated and legacy is None:
        raise PrivacyError(
            f"this data's privacy ledger holds {unstated} event(s) written before bract "
            "recorded each event's privacy unit, so it cannot tell whether they protected "
            "records or patients: state it in the hospital's policy (legacy_ledger_unit: "
            "'record' or 'patient'; every run before patient-level DP existed was 'record')")
    if unstated and legacy not in PRIVACY_UNITS:
        raise PrivacyError(f"legacy_ledger_unit must be one of {PRIVACY_UNITS}, got {legacy!r}")
    for held in (stated, legacy if unstated else stated):
        if held != unit:
            raise PrivacyError(
                f"this data's privacy ledger holds {held}-level events and this run "
                f"protects each {unit}: the two do not compose into one epsilon (an epsilon "
                "per patient does not cover record-level events of a patient with several "
                f"records, nor the reverse). Keep training this data per {held}.")


def compress(events: Iterable[DpSgdEvent]) -> list[tuple[float, float, int]]:
    """Merge events into ``(noise_multiplier, sample_rate, steps)`` runs.

    Composition is commutative, so events with equal (sigma, q) are merged
    wherever they occur; the result is Opacus's accountant-history format.
    Events of more than one privacy unit are refused (:func:`privacy_unit_of`).
    """
    events = list(events)
    privacy_unit_of(events)
    merged: dict[tuple[float, float], int] = {}
    for e in events:
        if e.steps:
            # (capped: an upper bound, see MAX_ACCOUNTED_NOISE)
            key = (min(float(e.noise_multiplier), MAX_ACCOUNTED_NOISE), float(e.sample_rate))
            merged[key] = merged.get(key, 0) + e.steps
    return [(s, q, n) for (s, q), n in merged.items()]


def _clearly_moderate(history: Sequence[tuple[float, float, int]]) -> bool:
    """A cheap screen before the RDP check: the composition's Gaussian-DP parameter by
    the central limit theorem (Bu et al.), ``mu^2 = sum T q^2 (e^(1/sigma^2) - 1)``, is at
    most 10 (epsilon in the tens at most), so PRV and PLD stay small."""
    mu2 = 0.0
    for sigma, q, steps in history:
        if sigma <= 0 or 1.0 / sigma**2 > 700:
            return False
        mu2 += steps * q * q * math.expm1(1.0 / sigma**2)
    return mu2 <= 100.0


def memoise_opacus_rdp() -> None:
    """Memoise Opacus's RDP of the sampled Gaussian mechanism at one order,
    ``opacus.accountants.analysis.rdp._compute_rdp(q, sigma, alpha)``, in this process.

    It is a pure function of three numbers, and one PRV epsilon evaluates it for the
    same (q, sigma) over Opacus's ~150 orders five times (bract's error estimate, then
    PRV's domain bound for its coarse and its fine grid), with half of the orders
    fractional and slow: about 95% of a PRV epsilon's time. A round adds events with
    the same (q, sigma), so later rounds reuse every value. Guarantee: the very same
    function computes every value, so every epsilon is bit-for-bit what Opacus gives
    without the memo (tested); idempotent.
    """
    from opacus.accountants.analysis import rdp
    from opacus.accountants.analysis.prv import prvs

    original = rdp._compute_rdp
    if getattr(original, "bract_memoised", False):
        return
    memo = functools.lru_cache(maxsize=1 << 16)(original)
    memo.bract_memoised = True  # type: ignore[attr-defined]
    rdp._compute_rdp = memo
    if getattr(prvs, "_compute_rdp", None) is original:
        prvs._compute_rdp = memo


def _prv_epsilon(history: list[tuple[float, float, int]], delta: float) -> float:
    from opacus.accountants import PRVAccountant

    memoise_opacus_rdp()
    acc = PRVAccountant()
    acc.history = list(history)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # A coarse error that scales with epsilon: at an absolute 0.01 Opacus's PRV
        # grid grows with epsilon and takes minutes once epsilon is in the hundreds.
        coarse_error = max(0.01, PRV_RELATIVE_ERROR * _rdp_epsilon(history, delta))
        coarse = acc.get_epsilon(delta=delta, eps_error=coarse_error)
        if not math.isfinite(coarse):
            # Opacus's PRV domain overflows for huge epsilons and returns inf; PLD
            # (pessimistic discretization) is still a valid, tight upper bound.
            return _pld_epsilon(history, delta, PLD_DISCRETIZATION)
        eps_error = max(1e-4, PRV_RELATIVE_ERROR * coarse)
        if eps_error >= coarse_error:
            return float(coarse)
        return float(acc.get_epsilon(delta=delta, eps_error=eps_error))


def _pld_epsilon(
    history: list[tuple[float, float, int]], delta: float, discretization: float
) -> float:
    import dp_accounting as dpa

    acc = dpa.pld.PLDAccountant(value_discretization_interval=discretization)
    for sigma, q, steps in history:
        acc.compose(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(sigma)), steps)
    return float(acc.get_epsilon(delta))


def _rdp_epsilon(history: list[tuple[float, float, int]], delta: float) -> float:
    from opacus.accountants import RDPAccountant

    memoise_opacus_rdp()
    acc = RDPAccountant()
    acc.history = list(history)
    return float(acc.get_epsilon(delta=delta))


def epsilon_of(
    events: Sequence[DpSgdEvent] | Iterable[DpSgdEvent],
    delta: float,
    accountant: str = DEFAULT_ACCOUNTANT,
    *,
    pld_discretization: float = PLD_DISCRETIZATION,
) -> float:
    """Epsilon at ``delta`` of the composition of ``events``.

    Guarantee: an upper bound on the (epsilon, delta)-DP of releasing every
    model trained by those events (add/remove-one neighbours, Poisson sampling),
    under the assumption that the noise was Gaussian as recorded. Returns
    ``math.inf`` if any event with steps added no noise or noise below
    :data:`MIN_ACCOUNTED_NOISE` times its clipping norm, ``0.0`` for no steps.
    """
    if accountant not in ACCOUNTANTS:
        raise PrivacyError(
            f"unknown accountant {accountant!r}; choose one of {ACCOUNTANTS} "
            "(GDP is an approximation and never a reported figure)."
        )
    _check_delta(delta)
    events = list(events)
    if any(e.steps > 0 and (not e.is_private or e.noise_multiplier < MIN_ACCOUNTED_NOISE)
           for e in events):
        return math.inf
    history = compress(events)
    if not history:
        return 0.0
    key = _memo_key(tuple(history), float(delta), accountant, pld_discretization)
    if key in _CARRIED:
        return _CARRIED[key]
    eps = _composed_epsilon(tuple(history), float(delta), accountant, pld_discretization)
    _CARRIED[key] = eps
    while len(_CARRIED) > CARRIED_EPSILONS:
        del _CARRIED[next(iter(_CARRIED))]
    return eps


#: How many recent epsilons :func:`carried_epsilons` hands on (a hospital needs two
#: per round: the spent-so-far and the one with the round's event).
CARRIED_EPSILONS = 16
_CARRIED: dict[str, float] = {}


def _memo_key(history: tuple[tuple[float, float, int], ...], delta: float, accountant: str,
              pld_discretization: float) -> str:
    """A digest naming exactly what an epsilon depends on: the compressed history (exact
    float reprs), delta, accountant and PLD discretisation."""
    import hashlib

    text = repr((history, delta, accountant, pld_discretization))
    return hashlib.sha256(text.encode()).hexdigest()


def carried_epsilons() -> dict[str, float]:
    """The most recent epsilons this process computed, by what they depend on (a digest):
    what a hospital keeps in its Flower Context, so that the next message's process,
    where each message has its own, need not recompute the same composition."""
    return dict(_CARRIED)


def carry_epsilons(entries: Mapping[str, float]) -> None:
    """Take on epsilons a previous message's process computed (:func:`carried_epsilons`,
    from the hospital's own Context). Guarantee: :func:`epsilon_of` returns one of them
    only for the exact history, delta, accountant and discretisation it was computed
    for; the Context is the hospital's own state, trusted as its ledger there is."""
    for key, value in entries.items():
        if (isinstance(key, str) and len(key) == 64 and isinstance(value, (int, float))
                and value >= 0):
            _CARRIED[key] = float(value)


@functools.lru_cache(maxsize=256)
def _composed_epsilon(
    history: tuple[tuple[float, float, int], ...], delta: float, accountant: str,
    pld_discretization: float,
) -> float:
    """Epsilon of a compressed history; a pure function, so results are memoised.

    A hospital checks its budget before every round: the epsilon it has spent is
    the previous round's "after", which this cache returns without recomputing.
    Bounded work: PRV's and PLD's grids grow with epsilon (about 1.5 GB at 1500), so
    above :data:`EXACT_EPSILON_CAP` by RDP's bound (constant memory) that bound is
    the figure: still an upper bound, far beyond any budget bract accepts.
    """
    if accountant == "rdp":
        return _rdp_epsilon(list(history), delta)
    if not _clearly_moderate(history):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Opacus: "optimal order is the largest alpha"
            rough = _rdp_epsilon(list(history), delta)
        if rough > EXACT_EPSILON_CAP:
            return rough
    if accountant == "prv":
        return _prv_epsilon(list(history), delta)
    return _pld_epsilon(list(history), delta, pld_discretization)


# --------------------------------------------------------------------------- plans


@dataclass(frozen=True)
class TrainingPlan:
    """What one hospital will run over a whole federation.

    ``rounds`` x ``local_epochs`` passes over ``dataset_size`` examples with
    expected batch size ``batch_size`` under Poisson sampling. Mirrors Opacus:
    a DataLoader of ``ceil(n / B)`` batches gives sample rate ``1 / ceil(n / B)``
    and ``ceil(n / B)`` steps per epoch.
    """

    rounds: int
    local_epochs: int
    dataset_size: int
    batch_size: int
    #: what ``dataset_size`` counts and each step samples: records or patients
    unit: str = "record"

    def __post_init__(self) -> None:
        if self.unit not in PRIVACY_UNITS:
            raise PrivacyError(f"privacy unit {self.unit!r} is not one of {PRIVACY_UNITS}.")
        for name in ("rounds", "local_epochs", "dataset_size", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                hint = (
                    " (an empty partition cannot be trained on: give this hospital data "
                    "or use fewer hospitals)"
                    if name == "dataset_size"
                    else ""
                )
                raise PrivacyError(f"{name} must be an integer >= 1 (got {value!r}){hint}.")

    @property
    def batches_per_epoch(self) -> int:
        """Number of (Poisson) batches per local epoch, as Opacus counts them."""
        return math.ceil(self.dataset_size / self.batch_size)

    @property
    def sample_rate(self) -> float:
        """Poisson sampling probability of each example per step."""
        return 1.0 / self.batches_per_epoch

    @property
    def expected_batch_size(self) -> float:
        """The expected size of a Poisson batch, ``dataset_size * sample_rate``, computed
        as ``dataset_size / batches_per_epoch``: exact in integers up to one rounding,
        so always positive and at most ``batch_size`` (the product in floating point
        can fall just below an integer, and truncating it gave 0 at batch size 1)."""
        return self.dataset_size / self.batches_per_epoch

    @property
    def weight_bound(self) -> int:
        """The largest FedAvg weight (``dataset_size``) this plan's public figures allow:
        ``batch_size * ceil(dataset_size / batch_size)``, i.e. ``batch_size / sample_rate``.

        Guarantee: at least ``dataset_size``, and a function of the batch size and the
        sample rate alone, which the hospital's privacy report and ledger already
        publish: telling it to the server reveals nothing more about the dataset's size
        (the server sizes the secure-aggregation ring from it).
        """
        return self.batch_size * self.batches_per_epoch

    @property
    def steps_per_round(self) -> int:
        """DP-SGD steps one round takes (empty batches included)."""
        return self.local_epochs * self.batches_per_epoch

    @property
    def total_steps(self) -> int:
        """DP-SGD steps over the whole plan."""
        return self.rounds * self.steps_per_round

    def round_event(
        self,
        noise_multiplier: float,
        *,
        max_grad_norm: float,
        delta: float,
        round: int = 0,
        client_id: str = "",
    ) -> DpSgdEvent:
        """The ledger event that one round of this plan records."""
        return DpSgdEvent(
            noise_multiplier=float(noise_multiplier),
            sample_rate=self.sample_rate,
            steps=self.steps_per_round,
            max_grad_norm=float(max_grad_norm),
            delta=float(delta),
            round=round,
            client_id=client_id,
            unit=self.unit,
        )


@dataclass(frozen=True)
class Calibration:
    """Result of :func:`calibrate`: one noise multiplier for the whole plan."""

    noise_multiplier: float
    target_epsilon: float
    delta: float
    epsilon: float  # reported accountant's epsilon of the whole plan
    epsilon_pld: float  # dp_accounting PLD's epsilon of the whole plan
    accountant: str
    plan: TrainingPlan

    def to_plain(self) -> dict[str, Any]:
        """Plain JSON-able dict."""
        d = asdict(self)
        d["plan"] = asdict(self.plan)
        return d


_SIGMA_MAX = 1e4


def calibrate(
    target_epsilon: float,
    delta: float,
    plan: TrainingPlan,
    *,
    accountant: str = DEFAULT_ACCOUNTANT,
    tolerance: float = 0.01,
    prior: Sequence[DpSgdEvent] = (),
    alongside: Sequence[DpSgdEvent] = (),
    legacy_unit: str | None = None,
) -> Calibration:
    """One noise multiplier for the whole plan that lands on the target.

    Guarantee: the plan's final epsilon, composed after the ``prior`` events
    (budget the same data spent before: earlier runs or federations), is at most
    ``target_epsilon`` according to both the reported ``accountant`` and
    dp_accounting's PLD accountant (discretization 1e-4), and the PLD epsilon is
    within ``tolerance`` (relative) of the target, i.e. the noise is not
    needlessly large. ``alongside`` are events the plan runs besides its DP-SGD
    steps (its rounds' metrics releases); they are composed in as well. When the
    prior events, or they and ``alongside``, leave no room for the plan it raises
    :class:`PrivacyError` saying how much they spend. ``prior`` must protect the
    plan's unit (``legacy_unit``: the unit of prior events written without one;
    :func:`check_unit`).

    The search runs on PLD with a coarse discretization (fast, and itself an upper
    bound), then checks the result with the reported accountant and fine PLD.
    """
    _check_epsilon(target_epsilon)
    _check_delta(delta)
    if target_epsilon < MIN_TARGET_EPSILON:
        raise PrivacyError(
            f"target epsilon {target_epsilon:g} is below bract's floor of "
            f"{MIN_TARGET_EPSILON:g}: calibrating for it costs unbounded time and memory, "
            "and the noise it needs leaves nothing to learn. Use a larger target (1-10 is "
            "usual), or a fixed noise multiplier.")
    if target_epsilon > MAX_TARGET_EPSILON:
        raise PrivacyError(
            f"target epsilon {target_epsilon:g} is above bract's ceiling of "
            f"{MAX_TARGET_EPSILON:g}: at such a budget DP gives no meaningful protection, "
            "and calibrating for it costs unbounded time and memory. Use a smaller target "
            "(1-10 is usual), or a fixed noise multiplier.")
    if accountant not in ACCOUNTANTS:
        raise PrivacyError(f"unknown accountant {accountant!r}; choose one of {ACCOUNTANTS}.")
    if not (0.0 < tolerance < 0.5):
        raise PrivacyError(f"tolerance must lie in (0, 0.5) (got {tolerance!r}).")
    q, steps = plan.sample_rate, plan.total_steps
    check_unit(prior, plan.unit, legacy_unit)
    check_unit(alongside, plan.unit)
    # Merged by (noise, rate): a lifetime of runs composes as one group per run.
    before = list(compress(prior))
    if any(e.steps > 0 and not e.is_private for e in prior):
        raise PrivacyError("this data was trained on without noise in an earlier run "
                           "(non-private): no differential-privacy budget is left")
    if any(e.steps > 0 and not e.is_private for e in alongside):
        raise PrivacyError("a planned metrics release adds no noise: it has no "
                           "differential-privacy guarantee")
    if before:
        spent = _pld_epsilon(before, delta, PLD_DISCRETIZATION)
        if not spent < target_epsilon * (1.0 - tolerance):
            raise PrivacyError(
                f"this data already spent epsilon {spent:.4g} of {target_epsilon:g} at delta "
                f"{delta:g} in earlier runs: no budget is left for {plan.rounds} more rounds"
            )
    if alongside:
        before = compress([*prior, *alongside])
        fixed = _pld_epsilon(before, delta, PLD_DISCRETIZATION)
        if not fixed < target_epsilon * (1.0 - tolerance):
            raise PrivacyError(
                f"the plan's metrics releases spend epsilon {fixed:.4g} at delta {delta:g} "
                f"(with what this data spent before), leaving no room for training within "
                f"{target_epsilon:g}: release metrics with more noise, or keep them home"
            )

    # The search's PLD grid: 1e-3, or finer for a small target, so that the grid's
    # pessimism stays a small part of the band the search aims at.
    coarse_step = min(1e-3, target_epsilon * tolerance / 4)

    # Bounded work: PLD's grid grows with epsilon, so a sigma whose RDP epsilon (an
    # upper bound, computed in constant memory) is far above the target is answered
    # with that bound; PLD stays within a factor 3 of RDP there, so the search's
    # direction is the same and no PLD runs on a plan's astronomically large epsilon.
    pld_cap = max(3.0 * target_epsilon, 60.0)

    def coarse(sigma: float) -> float:
        history = [*before, (sigma, q, steps)]
        if not _clearly_moderate(history):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Opacus: "optimal order is the largest alpha"
                rough = _rdp_epsilon(history, delta)
            if rough > pld_cap:
                return rough
        return _pld_epsilon(history, delta, coarse_step)

    # Aim inside the allowed band, leaving room for the accountants' differences.
    aim_lo = target_epsilon * (1.0 - 0.6 * tolerance)
    aim_hi = target_epsilon * (1.0 - 0.25 * tolerance)
    # Where the checked epsilon should land: the middle of the allowed band.
    desired = target_epsilon * (1.0 - 0.425 * tolerance)
    for _attempt in range(8):
        sigma = _solve_decreasing(coarse, aim_lo, aim_hi, target_epsilon, delta, plan)
        eps_pld = _pld_epsilon([*before, (sigma, q, steps)], delta, PLD_DISCRETIZATION)
        eps_rep = eps_pld
        if accountant != "pld":
            eps_rep = epsilon_of([*prior, *alongside,
                                  DpSgdEvent(sigma, q, steps, 1.0, delta, unit=plan.unit)],
                                 delta, accountant)
        worst = max(eps_rep, eps_pld)
        if worst <= target_epsilon and eps_pld >= target_epsilon * (1.0 - tolerance):
            return Calibration(
                float(sigma), float(target_epsilon), float(delta), eps_rep, eps_pld,
                accountant, plan,
            )
        # The coarse grid is pessimistic by a factor that grows with the steps: scale
        # the aim by how far the check landed from the desired point (either way).
        shift = desired / worst
        aim_lo, aim_hi = aim_lo * shift, aim_hi * shift
    hint = "; the 'pld' accountant may calibrate it" if accountant != "pld" else ""
    raise PrivacyError(
        f"could not calibrate to epsilon {target_epsilon} within {tolerance:.0%} for this plan "
        f"({plan.total_steps} steps at sample rate {plan.sample_rate:.4g}) with the "
        f"{accountant!r} accountant{hint}; or choose another target epsilon."
    )


def _solve_decreasing(
    eps_fn: Any, lo_target: float, hi_target: float, target: float, delta: float,
    plan: TrainingPlan,
) -> float:
    """A sigma with ``lo_target <= eps_fn(sigma) <= hi_target`` (eps_fn decreasing)."""
    hi = 1.0
    while eps_fn(hi) > hi_target:
        hi *= 2.0
        if hi > _SIGMA_MAX:
            raise PrivacyError(
                f"target epsilon {target} at delta {delta} is unreachable for this plan "
                f"({plan.total_steps} steps at sample rate {plan.sample_rate:.4g}): raise "
                "epsilon, train fewer rounds or epochs, or use more data per hospital."
            )
    lo = hi / 2.0
    while eps_fn(lo) <= hi_target:
        if lo < 1e-2:
            return lo
        hi, lo = lo, lo / 2.0
    for _ in range(100):
        mid = math.sqrt(lo * hi)
        eps = eps_fn(mid)
        if eps > hi_target:
            lo = mid
        elif eps < lo_target:
            hi = mid
        else:
            return mid
    return hi


# -------------------------------------------------------------------------- budgets


@dataclass(frozen=True)
class BudgetDecision:
    """Whether a hospital may train this round, and why; plain data for the server."""

    allowed: bool
    epsilon_spent: float
    epsilon_after: float
    budget_epsilon: float
    delta: float
    accountant: str
    reason: str

    def to_plain(self) -> dict[str, Any]:
        """Plain JSON-able dict (inf is written as the string 'inf')."""
        d = asdict(self)
        for k in ("epsilon_spent", "epsilon_after", "budget_epsilon"):
            if math.isinf(d[k]):
                d[k] = "inf"
        return d


@dataclass(frozen=True)
class PrivacyBudget:
    """A hospital's (epsilon, delta) budget over the whole federation.

    Guarantee: :meth:`check` refuses any round after which the ledger's epsilon
    (reported accountant) would exceed the budget, *before* the round trains.
    A non-private configuration (noise multiplier 0) is refused unless
    ``allow_non_private`` is set explicitly.
    """

    epsilon: float
    delta: float
    accountant: str = DEFAULT_ACCOUNTANT
    allow_non_private: bool = False

    def __post_init__(self) -> None:
        _check_epsilon(self.epsilon)
        _check_delta(self.delta)
        object.__setattr__(self, "epsilon", as_python_float(self.epsilon))
        object.__setattr__(self, "delta", as_python_float(self.delta))
        if self.accountant not in ACCOUNTANTS:
            raise PrivacyError(
                f"unknown accountant {self.accountant!r}; choose one of {ACCOUNTANTS}."
            )

    def check(
        self, ledger: PrivacyLedger, planned: DpSgdEvent | Sequence[DpSgdEvent]
    ) -> BudgetDecision:
        """Decide whether ``planned`` (one event, or a round's events together) may run
        given what ``ledger`` already spent."""
        events = (planned,) if isinstance(planned, DpSgdEvent) else tuple(planned)
        spent = ledger.epsilon(self.delta, self.accountant)
        after_ledger = ledger
        for event in events:
            after_ledger = after_ledger.append(event)
        after = after_ledger.epsilon(self.delta, self.accountant)
        if not all(e.is_private for e in events):
            if self.allow_non_private:
                return BudgetDecision(
                    True, spent, after, self.epsilon, self.delta, self.accountant,
                    "NON-PRIVATE: noise multiplier 0 was requested explicitly; no DP guarantee.",
                )
            return BudgetDecision(
                False, spent, after, self.epsilon, self.delta, self.accountant,
                "refused: noise multiplier is 0 (no differential privacy); "
                "set a noise multiplier > 0 or allow non-private training explicitly.",
            )
        if after > self.epsilon:
            return BudgetDecision(
                False, spent, after, self.epsilon, self.delta, self.accountant,
                f"refused: this round would raise epsilon from {spent:.4g} to {after:.4g}, "
                f"past the budget of {self.epsilon:.4g} at delta {self.delta:.3g}.",
            )
        return BudgetDecision(
            True, spent, after, self.epsilon, self.delta, self.accountant,
            f"ok: epsilon {spent:.4g} -> {after:.4g} of budget {self.epsilon:.4g}.",
        )
