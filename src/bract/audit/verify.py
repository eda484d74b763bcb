"""``bract audit verify``: check a federation's privacy record without trusting its code.

What is checked, per hospital:

1. **Integrity** — the hospital's chain in the server's ``ledger.jsonl`` verifies
   against the roster's Ed25519 key: every entry signed, linked to the one
   before, in order, none missing, duplicated, inserted or from another
   hospital (:func:`bract.records.ledger.check_chain`); with ``report.json``,
   also as long as the server last recorded (a truncated tail). A chain is the
   hospital's lifetime record on its data: entries spent in earlier runs or
   federations (``ledger_carried`` in ``report.json``) count toward its epsilon.
   Its length must be checked against a reference — the hospital's own copy, or
   a finished run's ``report.json`` — or the hospital fails: a chain cut at its
   end is itself a valid chain.
2. **Epsilon** — after every entry, epsilon is recomputed from the recorded
   mechanism events with dp_accounting's PLD accountant, called directly here
   (not through bract's own accounting code), and compared with the epsilon the
   entry reports and with ``report.json``'s per-round figure, within
   :data:`DEFAULT_TOLERANCE`. An infinite recomputed epsilon (steps without
   noise: a non-private run) fails, budget or not; so does an event
   dp_accounting cannot account (the figure is NaN).
3. **Completeness** — ``report.json``'s account of who trained agrees with the
   ledger, round by round, both ways: a hospital whose line says it trained (or
   that the round lists among those it averaged) has an entry for that round, and
   a hospital with an entry for a round is said to have trained in it (or to have
   failed in it after training: a dropout, noted); the steps it reports match the
   ledger.
4. **Copies** — a hospital's own copy of its ledger equals the server's line by
   line.
5. **Budget** — no epsilon passes the budget (``--budget`` or the run's
   ``target_epsilon``): a reported one not at all, a recomputed one not beyond
   :data:`BUDGET_TOLERANCE`. A ``target_epsilon`` that is not a finite number > 0
   is no budget: it fails, naming it.

Also checked: every entry's delta equals the run's declared delta, and each ledger
holds events of one privacy unit (record or patient).

Trusted: the roster's public keys (they must come from the hospitals' operators,
not from the server being audited), dp_accounting, and the ``cryptography``
library. ``report.json`` is *not* trusted: it is compared, never believed, and read
strictly (:func:`bract.records.report.read_report` with ``strict=True``): a number
written as text (``"2.5"``) or as a boolean, a ``trained`` that is not ``true`` or
``false``, a round with two rows, a hospital listed twice in a round, is unusable
input (exit 2, one line naming the round and the field), never coerced.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from bract.records.ledger import (
    LedgerEntry,
    LedgerError,
    SignerRoster,
    by_client,
    check_chain,
    read_ledger,
)
from bract.records.report import HospitalRound, ReportError, RoundRow, RunReport, read_report
from bract.records.text import one_line

#: Relative tolerance between a reported epsilon and the PLD recomputation. bract
#: reports Opacus's PRV upper bound, within [0.995, 1.01] x PLD(1e-4) by design
#: (measured: 1.002); 2% leaves room for that and flags any real misreport.
DEFAULT_TOLERANCE = 0.02
#: How far below the recomputation a reported epsilon may lie (or the tolerance, if
#: smaller). An honest figure is at least 0.995 x PLD(1e-4) by design (measured
#: 1.0015-1.0034 over sample rates 1e-4 to 1, sigma 0.05 to 5 and up to 2e5 steps), so
#: anything lower is an under-report, whatever the (symmetric) tolerance allows above.
UNDER_TOLERANCE = 0.005
#: How far the recomputed epsilon may pass the budget before the audit fails it. A
#: hospital stops on its PRV figure, which is at least 0.995 x PLD(1e-4) (the lower
#: end of the range above), so a recomputation above budget / (1 - 0.005) means the
#: hospital's own accountant passed the budget too; any reported figure past the
#: budget fails outright.
BUDGET_TOLERANCE = 0.005
#: Absolute slack for tiny epsilons, where discretization errors dominate.
ABSOLUTE_TOLERANCE = 1e-3
#: dp_accounting's PLD value discretization: its tight reference setting.
PLD_DISCRETIZATION = 1e-4
#: Above this epsilon (dp_accounting's RDP bound) the figure is that RDP bound, not a PLD
#: recomputation: a PLD grid at such epsilons needs gigabytes (a forged entry with a
#: noise multiplier of 0.01 would exhaust the machine), and no budget bract accepts
#: comes near it. The same cap as the hospitals' accountant
#: (``bract.privacy.accounting.EXACT_EPSILON_CAP``), which reports RDP's figure there.
PLD_EPSILON_CAP = 1000.0
#: The most points one event's privacy-loss distribution may take on the PLD grid.
#: An event that needs more on the grid in use (a noise multiplier below about 0.1
#: that RDP does not put past :data:`PLD_EPSILON_CAP`, e.g. with a tiny sample rate)
#: moves the chain's recomputation to the coarser grid that fits it: still an upper
#: bound (a coarser grid is more pessimistic), in bounded memory and time (a forged
#: entry claiming sigma 0.01 and q 1e-300 would otherwise need 5e7 points and hours).
MAX_PLD_POINTS = 2_000_000
#: At most this many line differences are listed per hospital copy.
MAX_COPY_DIFFERENCES = 5

FAIL = "fail"
NOTE = "note"


class AuditInputError(ValueError):
    """An input file is missing or unusable; the audit cannot run (exit code 2)."""


@dataclass(frozen=True)
class Finding:
    """One thing the audit found, in plain language; ``fail`` findings fail the audit."""

    severity: str
    hospital: str
    topic: str
    message: str


@dataclass
class EntryAudit:
    """One ledger entry: what it reported and what the independent accountant says."""

    seq: int
    round: int
    reported: float
    recomputed: float
    agrees: bool


@dataclass
class HospitalAudit:
    """Everything the audit established about one hospital's ledger."""

    client_id: str
    entries: list[EntryAudit] = field(default_factory=list)
    chain_problem: str | None = None
    verified: int = 0
    in_roster: bool = True
    copy_status: str = "not given"
    #: report.json's per-round epsilon for this hospital (rounds it answered).
    reported_by_round: dict[int, float] = field(default_factory=dict)
    #: recomputed epsilon after the entries up to each round.
    recomputed_by_round: dict[int, float] = field(default_factory=dict)
    #: What the chain's length was checked against ("its own copy", "report.json"),
    #: or None when nothing was: a chain cut at its end is itself a valid chain.
    length_checked_by: str | None = None
    #: Why the length was not checked (None when it was).
    length_unchecked: str | None = None
    #: The final epsilon recomputed from the hospital's own copy, when one was given,
    #: verifies on its own and differs from the server's chain (None otherwise).
    own_copy_recomputed: float | None = None
    #: Whether the server's chain verified (links, signatures, length): only then is
    #: its recomputation a figure of what the hospital signed, entry for entry.
    server_chain_verified: bool = False
    #: How many of its first entries report.json says were spent before this run.
    carried: int = 0
    #: Rounds of the entries at the end of its own copy that the server never received,
    #: each in a round report.json records it as failed (its reply was lost).
    lost_rounds: set[int] = field(default_factory=set)

    @property
    def chain_ok(self) -> bool:
        """Links and signatures of every entry verified (and the length, when known)."""
        return self.in_roster and self.chain_problem is None

    @property
    def final_reported(self) -> float | None:
        return self.entries[-1].reported if self.entries else None

    @property
    def final_recomputed(self) -> float | None:
        """The final epsilon recomputed from the server's chain."""
        return self.entries[-1].recomputed if self.entries else None

    @property
    def final_spent(self) -> float | None:
        """The epsilon the hospital spent as far as the audit can establish it: the
        larger of the final recomputations from the server's chain and from its own
        copy (when that verifies and differs). A chain that lost entries composes fewer
        events, so the longer record's figure is the one that bounds the spending."""
        figures = [x for x in (self.final_recomputed, self.own_copy_recomputed)
                   if x is not None]
        known = [x for x in figures if not math.isnan(x)]
        if known:
            return max(known)
        return figures[0] if figures else None

    @property
    def largest_difference(self) -> float:
        """Largest relative difference between a reported and a recomputed epsilon."""
        diffs = [
            abs(e.reported - e.recomputed) / e.recomputed
            for e in self.entries
            if math.isfinite(e.reported) and math.isfinite(e.recomputed) and e.recomputed > 0
        ]
        return max(diffs, default=0.0)


@dataclass
class AuditResult:
    """The audit's outcome: per-hospital results and findings; ``passed`` is the verdict."""

    ledger_path: str
    roster_path: str
    report_path: str | None
    federation_id: str
    tolerance: float
    budget: float | None
    accountant: str
    hospitals: dict[str, HospitalAudit]
    findings: list[Finding]
    rounds: list[int]
    #: report.json was given but has no final summary: the run did not finish.
    unfinished_run: bool = False
    #: Where ``budget`` came from: "--budget" (the officer's), "report.json" (the
    #: run's target_epsilon, written by the coordinator), or None (no budget).
    budget_source: str | None = None

    @property
    def completeness_unchecked(self) -> dict[str, str]:
        """Hospitals of the roster whose ledger length nothing vouched for, with why."""
        return {cid: h.length_unchecked for cid, h in sorted(self.hospitals.items())
                if h.in_roster and h.length_unchecked is not None}

    @property
    def failures(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == FAIL]

    @property
    def passed(self) -> bool:
        """True only when no check failed; a hospital whose completeness could not be
        checked (no length to compare with) is a failed check."""
        return not self.failures


# ---------------------------------------------------------------------- accountant


def accountant_description(discretization: float = PLD_DISCRETIZATION) -> str:
    """Which library computed the audit's epsilons, with its version and settings."""
    try:
        ver = version("dp-accounting")
    except PackageNotFoundError:  # pragma: no cover - dp_accounting is a dependency
        ver = "unknown version"
    return (
        f"dp_accounting {ver} PLDAccountant (value_discretization_interval={discretization:g}, "
        f"coarser from an event whose PLD would exceed {MAX_PLD_POINTS:,} points), "
        "composing PoissonSampledDpEvent(q, GaussianDpEvent(σ)) steps times per event; "
        "add-or-remove-one neighbours"
    )


def recompute_epsilons(
    entries: list[LedgerEntry],
    discretization: float = PLD_DISCRETIZATION,
    on_entry: Callable[[], None] | None = None,
) -> list[float]:
    """Epsilon after each entry (covering it and all before), from the events alone.

    Guarantee: each value is an upper bound on the (epsilon, entry.delta)-DP of the
    Poisson-subsampled Gaussian steps recorded up to that entry (infinite once an
    event with steps added no noise, or a noise multiplier whose square underflows to
    0, below about 1e-162): dp_accounting's PLD bound of that prefix, except
    past :data:`PLD_EPSILON_CAP`, where it is dp_accounting's RDP bound (see
    :func:`beyond_pld_cap`). The PLD grid is ``discretization``, or the coarser grid
    on which every event's distribution fits :data:`MAX_PLD_POINTS` points, from the
    first event that needs it on. Where the PLD's own arithmetic fails (an infinite
    epsilon for noised steps: a privacy loss past its float range, near the cap) it
    is computed again at the finer of the grid and :data:`PLD_DISCRETIZATION` (never
    finer than the point limit allows), and the chain goes on at that grid. The values
    never decrease along the chain: where a prefix's bound comes out above a longer
    prefix's at the same delta (numerical error), the longer prefix's bound is given,
    which bounds the shorter one too (composition never lowers epsilon). Where
    dp_accounting cannot account an event at all (it raises, or gives NaN: e.g. a
    subnormal sample rate) the value is NaN from that entry on: no bound is
    established there, never a number. Whatever the entries claim, forged ones
    included, nothing but a list of floats comes out, in bounded memory. Calls
    dp_accounting directly.
    """
    import dp_accounting as dpa

    finest = min(discretization, PLD_DISCRETIZATION)
    floor = 0.0  # the finest grid on which every event so far fits MAX_PLD_POINTS
    acc = dpa.pld.PLDAccountant(value_discretization_interval=discretization)
    history: list[tuple[float, float, int]] = []
    rdp = None  # dp_accounting's RDP of the history, once the cheap screen fails
    capped = False
    non_private = False
    failed = False  # dp_accounting could not account an event: no bound from there on
    out: list[float] = []

    def rebuilt(grid: float) -> object:
        fresh = dpa.pld.PLDAccountant(value_discretization_interval=grid)
        for sigma, q, steps in history:
            fresh.compose(_sampled_gaussian(sigma, q), steps)
        return fresh

    for entry in entries:
        e = entry.event
        if e.steps > 0 and e.noise_multiplier * e.noise_multiplier == 0:
            non_private = True  # no noise, or so little its square underflows: no bound
        elif e.steps > 0 and not non_private and not failed:
            try:
                history.append((e.noise_multiplier, e.sample_rate, e.steps))
                if rdp is None and not _clearly_moderate(history):
                    rdp = dpa.rdp.RdpAccountant()
                    for sigma, q, steps in history[:-1]:
                        rdp.compose(_sampled_gaussian(sigma, q), steps)
                event = _sampled_gaussian(e.noise_multiplier, e.sample_rate)
                if rdp is not None:
                    rdp.compose(event, e.steps)
                    capped = capped or not float(rdp.get_epsilon(entry.delta)) <= PLD_EPSILON_CAP
                if not capped:
                    need = _pld_points(e.noise_multiplier, e.sample_rate) / MAX_PLD_POINTS
                    floor = max(floor, need)
                    if discretization < floor:  # this event would not fit: a coarser grid
                        discretization = floor
                        acc = rebuilt(discretization)
                    else:
                        acc.compose(event, e.steps)
            except Exception:  # dp_accounting refused the event: no bound from it on
                failed = True
        if non_private:
            out.append(math.inf)
        elif failed:
            out.append(math.nan)
        elif not history:
            out.append(0.0)
        else:
            try:
                if capped:
                    assert rdp is not None
                    eps = float(rdp.get_epsilon(entry.delta))
                else:
                    eps = float(acc.get_epsilon(entry.delta))
                    retry = max(finest, floor)
                    if not math.isfinite(eps) and discretization > retry:
                        discretization = retry
                        acc = rebuilt(discretization)
                        eps = float(acc.get_epsilon(entry.delta))
            except Exception:  # dp_accounting refused the history
                eps = math.nan
            failed = math.isnan(eps)
            out.append(eps)
        if on_entry is not None:
            on_entry()
    for i in range(len(out) - 2, -1, -1):  # a longer prefix's bound bounds a shorter one
        if entries[i].delta == entries[i + 1].delta and not math.isnan(out[i + 1]):
            out[i] = min(out[i], out[i + 1])
    return out


def _sampled_gaussian(sigma: float, q: float) -> object:
    import dp_accounting as dpa

    return dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(sigma))


def _pld_points(sigma: float, q: float) -> float:
    """The width, in privacy-loss units, of the grid dp_accounting's PLD lays out for one
    Poisson-subsampled Gaussian step (its connect-the-dots bounds, both adjacencies);
    divided by the discretization interval, the number of points it takes."""
    from dp_accounting.pld import privacy_loss_mechanism as plm

    width = 0.0
    for adjacency in (plm.AdjacencyType.REMOVE, plm.AdjacencyType.ADD):
        bounds = plm.GaussianPrivacyLoss(
            sigma, sensitivity=1, pessimistic_estimate=True, sampling_prob=q,
            adjacency_type=adjacency,
        ).connect_dots_bounds()
        width = max(width, bounds.epsilon_upper - bounds.epsilon_lower)
    if not math.isfinite(width):
        raise ValueError(f"no finite privacy-loss range for sigma={sigma!r}, q={q!r}")
    return width


def _clearly_moderate(history: list[tuple[float, float, int]]) -> bool:
    # The composition's Gaussian-DP parameter by the central limit theorem (Bu et al.),
    # mu^2 = sum T q^2 (e^(1/sigma^2) - 1), at most 10: epsilon in the tens at most, so
    # the PLD grid stays small and no RDP screen is needed. 700 * sigma^2 < 1 rather
    # than 1 / sigma^2 > 700: a sigma whose square underflows is not moderate.
    mu2 = 0.0
    for sigma, q, steps in history:
        if 700.0 * sigma * sigma < 1.0:
            return False
        mu2 += steps * q * q * math.expm1(1.0 / sigma**2)
    return mu2 <= 100.0


def beyond_pld_cap(epsilon: float) -> bool:
    """Whether ``epsilon`` (as :func:`recompute_epsilons` gives it) is dp_accounting's RDP
    bound rather than a PLD recomputation: past :data:`PLD_EPSILON_CAP`."""
    return math.isfinite(epsilon) and epsilon > PLD_EPSILON_CAP


def disagreement(reported: float, recomputed: float, tolerance: float) -> str | None:
    """How ``reported`` disagrees with ``recomputed`` beyond the tolerance, or None: an
    under-report beyond :data:`UNDER_TOLERANCE` (or ``tolerance``, if smaller), an
    over-report beyond ``tolerance``.

    Past :data:`PLD_EPSILON_CAP` both figures are upper bounds by different RDP
    implementations, not exact ones: a reported figure past the cap agrees, one below
    it disagrees (bract's accountant reports the RDP bound there too). A NaN on either
    side (no computable or no readable figure) always disagrees."""
    if math.isnan(recomputed):
        return "the recorded events give no epsilon dp_accounting can compute"
    if math.isnan(reported):
        return "no readable epsilon is reported"
    if beyond_pld_cap(recomputed) and not math.isinf(reported):
        if reported > PLD_EPSILON_CAP:
            return None
        return (f"the events give more than {PLD_EPSILON_CAP:g} by dp_accounting's RDP bound, "
                "where the audit computes no exact figure and bract reports that bound")
    if math.isinf(reported) or math.isinf(recomputed):
        if reported == recomputed:
            return None
        return "reports ∞" if math.isinf(reported) else (
            "reports a finite epsilon where the events give ∞ (no noise, or a privacy loss "
            "beyond what the recomputation can represent)")
    if reported < recomputed * (1 - min(tolerance, UNDER_TOLERANCE)) - ABSOLUTE_TOLERANCE:
        return f"under-reported by {100 * (1 - reported / recomputed):.2f}%"
    if reported > recomputed * (1 + tolerance) + ABSOLUTE_TOLERANCE:
        return f"over-reported by {100 * (reported / max(recomputed, 1e-12) - 1):.2f}%"
    return None


# --------------------------------------------------------------------------- inputs


def _read_report(path: Path) -> RunReport:
    """report.json read strictly (nothing coerced); :class:`AuditInputError` naming
    what is wrong and where."""
    try:
        return read_report(path, strict=True)
    except ReportError as exc:
        raise AuditInputError(str(exc)) from None


def _config_number(value: object) -> float | None:
    """A configuration value of report.json as a float when it is a JSON number (a
    boolean or a text such as ``"2.5"`` is not: None, never coerced)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        return float(value)
    except OverflowError:  # an integer beyond any float
        return math.inf if value > 0 else -math.inf


def _ledger(path: Path, what: str) -> list[LedgerEntry]:
    try:
        return read_ledger(path)
    except LedgerError as exc:
        raise AuditInputError(f"{what}: {exc}") from None


def _fmt(x: float) -> str:
    return "∞" if math.isinf(x) else f"{x:.4f}"


# ---------------------------------------------------------------------------- audit


def verify_federation(
    ledger_path: str | Path,
    roster_path: str | Path,
    *,
    report_path: str | Path | None = None,
    hospital_copies: Mapping[str, str | Path] | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    budget: float | None = None,
    pld_discretization: float = PLD_DISCRETIZATION,
    progress: Callable[[int, int], None] | None = None,
) -> AuditResult:
    """Audit a federation's ledger (and optionally its report and hospitals' copies).

    Guarantee: the result passes only if every hospital of the roster is accounted
    for (an entry in the server's ledger, or its own copy), every
    hospital's chain verifies against the roster, every hospital's chain length was
    checked against a reference (its own copy, or a finished run's report.json), every
    recomputed epsilon is finite (an infinite one is a non-private run, a NaN one an
    event dp_accounting cannot account: each fails, naming the hospital), every
    reported epsilon (ledger and report.json) is within ``tolerance`` of
    dp_accounting's PLD recomputation from the recorded events, no round a hospital
    trained in lacks its entry, every given hospital copy equals the server's, and no
    epsilon passes the budget. Whatever numbers the files hold, the outcome is a
    result or :class:`AuditInputError` (an input missing, unreadable or unparseable),
    never another exception.
    """
    if not (0.0 < tolerance < 0.5):
        raise AuditInputError(f"tolerance must lie in (0, 0.5) (got {tolerance})")
    if budget is not None and not (math.isfinite(budget) and budget > 0):
        raise AuditInputError(f"the budget must be a finite number > 0 (got {budget})")
    try:
        roster = SignerRoster.read(roster_path)
    except LedgerError as exc:
        raise AuditInputError(str(exc)) from None
    chains = by_client(_ledger(Path(ledger_path), "server's ledger"))
    report = _read_report(Path(report_path)) if report_path is not None else None
    copies = {
        cid: _ledger(Path(p), f"{cid}'s own copy") for cid, p in (hospital_copies or {}).items()
    }
    config = report.config if report is not None else {}
    findings: list[Finding] = []
    hospitals: dict[str, HospitalAudit] = {}

    def fail(cid: str, topic: str, message: str) -> None:
        findings.append(Finding(FAIL, cid, topic, message))

    budget_source = "--budget" if budget is not None else None
    if budget is None and report is not None:
        raw = report.config_value("target_epsilon")
        target = _config_number(raw)
        if target is not None and math.isfinite(target) and target > 0:
            budget, budget_source = target, "report.json"
        elif raw is not None:
            fail("", "budget", (
                f"report.json's target_epsilon is {_shown(raw)}, not a finite number > 0: "
                "no budget could be checked (give --budget from the hospitals' policies)"))

    declared_delta = None
    if config.get("delta") is not None:
        declared_delta = _config_number(config["delta"])
        if declared_delta is None:
            fail("", "delta", (f"report.json's delta is {_shown(config['delta'])}, not a "
                               "number: the entries' δ cannot be checked against the run's"))
    last_seen = report.last_per_client() if report is not None else {}
    names = sorted(set(chains) | set(copies) | set(last_seen))
    # 0. coverage: the server writes the ledger and the report, so a hospital it leaves
    # out of the ledger (whatever the report says of it: "did not answer", "never
    # trained") would leave the audit's largest epsilon without it. Only the hospital's
    # own copy vouches for a hospital with no entry.
    for cid in sorted(set(roster.keys) - set(chains) - set(copies)):
        fail(cid, "coverage", f"{cid} is in the roster but has no entry in the server's "
                              "ledger and no copy of its own was given: what it spent cannot "
                              "be audited (give its own copy with --hospital-copy, which is "
                              "empty if it never trained)")
    total = sum(len(c) for c in chains.values())
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total)

    for cid in names:
        chain = chains.get(cid, [])
        h = HospitalAudit(cid)
        hospitals[cid] = h
        report_budget = budget_source == "report.json"
        # 1. integrity
        key = roster.keys.get(cid)
        if key is None:
            h.in_roster = False
            fail(cid, "roster", f"{cid} is not in the roster, so its entries cannot be "
                                "authenticated")
        seen = last_seen.get(cid)
        check = check_chain(
            chain, key, client_id=cid,
            expected_length=seen.ledger_entries if seen is not None else None,
        ) if key is not None else None
        if check is not None:
            h.verified = check.verified
            h.chain_problem = check.problem
            h.server_chain_verified = check.ok
            if check.problem:
                fail(cid, "integrity", f"{cid}'s ledger fails verification: {check.problem}")
            head = seen.ledger_head if seen is not None else ""
            if check.ok and head and chain and chain[-1].hash() != head:
                h.chain_problem = "last entry differs from the one report.json recorded"
                fail(cid, "integrity", f"{cid}'s last entry is not the one report.json "
                                       "recorded (its hash differs)")
        # One privacy unit per chain: an epsilon composed over record- and patient-level
        # events bounds neither (docs/privacy.md, "The privacy unit").
        units = sorted({entry.event.unit for entry in chain} - {"unstated"})
        unstated = sum(entry.event.unit == "unstated" for entry in chain)
        if len(units) > 1:
            fail(cid, "unit", f"{cid}'s ledger mixes privacy units ({', '.join(units)}): "
                              "its epsilon holds for neither a record nor a patient")
        elif units and unstated:
            findings.append(Finding(NOTE, cid, "unit", (
                f"{unstated} of {cid}'s entries were written before events recorded their "
                f"privacy unit; the later ones are {units[0]}-level, and the hospital "
                "states the earlier ones' unit (policy legacy_ledger_unit): the ledger "
                "cannot show it")))
        # 1b. completeness: the chain's length against a reference
        _check_length(h, cid in copies, seen, report, fail)
        # 2. epsilon after every entry
        recomputed = recompute_epsilons(chain, pld_discretization, tick)
        _check_finite(h, chain, recomputed, budget, fail)
        carried = min(seen.ledger_carried, len(chain)) if seen is not None else 0
        h.carried = carried
        _check_carried(cid, chain, carried, fail)
        for entry, eps in zip(chain[carried:], recomputed[carried:], strict=True):
            h.recomputed_by_round[entry.round] = eps  # report.json's rounds refine this
        reference = _AtReference(chain, pld_discretization)
        for i, (entry, eps) in enumerate(zip(chain, recomputed, strict=True)):
            agrees = _check_entry(cid, entry, eps, "", declared_delta, tolerance, fail,
                                  findings.append, reference.confirm(i))
            h.entries.append(EntryAudit(entry.seq, entry.round, entry.epsilon, eps, agrees))
        # 5. budget (an infinite recomputation is named by _check_finite, budget included)
        if budget is not None:
            _check_budget(cid, chain, recomputed, budget, pld_discretization, fail,
                          f"{cid} reached", report_budget)
        # 4. the hospital's own copy
        if cid in copies:
            own = _this_runs_part(h, chain, copies[cid], findings.append)
            if _compare_copy(h, chain, own, roster, fail, findings.append,
                             lambda e, cid=cid: _lost_reply(report, roster.federation_id, cid, e)):
                # It verifies and differs from the server's: what it composes counts too.
                own_eps = recompute_epsilons(own, pld_discretization)
                h.own_copy_recomputed = own_eps[-1] if own_eps else None
                _check_own_entries(h, chain, own, own_eps, declared_delta, tolerance,
                                   budget, fail, findings.append, pld_discretization)
                if budget is not None:
                    _check_budget(cid, own, own_eps, budget, pld_discretization, fail,
                                  f"{cid}'s own copy reaches", report_budget)
        if report is not None:
            _check_report_rows(h, chain, recomputed, report, carried, tolerance, fail,
                               findings.append)
    if report is not None:
        _check_averaged(report, fail, findings.append)
        _check_unnamed(report, chains, hospitals, roster, fail)
        _check_final(report, hospitals, tolerance, fail, findings.append)
    rounds = sorted({r.round for r in report.rounds}) if report is not None else sorted(
        {e.round for c in chains.values() for e in c}
    )
    if not chains:
        fail("", "integrity", "the ledger holds no entries at all")
    unfinished = report is not None and report.final is None
    if unfinished:
        assert report is not None
        last = max((r.round for r in report.rounds), default=0)
        findings.append(Finding(NOTE, "", "report", (
            f"report.json is of an unfinished run: it has no final summary (its last "
            f"recorded round is {last}), so there is no final ε to check, and the ledger "
            "lengths it records are as of that round: a round the hospitals trained in "
            "after it is in their own copies only")))
    return AuditResult(
        str(ledger_path), str(roster_path), str(report_path) if report_path else None,
        roster.federation_id, tolerance, budget, accountant_description(pld_discretization),
        hospitals, findings, rounds, unfinished, budget_source,
    )


def _check_budget(
    cid: str, chain: list[LedgerEntry], recomputed: list[float], budget: float,
    pld_discretization: float, fail: Callable[[str, str, str], None], who: str,
    report_budget: bool,
) -> None:
    """No reported epsilon of ``chain`` past ``budget``, no recomputed one past it by more
    than :data:`BUDGET_TOLERANCE` (an infinite or NaN recomputation is named by
    :func:`_check_finite`)."""
    known = [x for x in recomputed if not math.isnan(x)]
    if not (known and math.isfinite(max(known))):
        return
    top = max(known)
    limit = budget / (1 - BUDGET_TOLERANCE)  # PRV >= 0.995 PLD: PRV > budget
    if top > limit and pld_discretization > PLD_DISCRETIZATION:
        # A coarser grid is more pessimistic: confirm at the reference grid.
        top = max((x for x in recompute_epsilons(chain, PLD_DISCRETIZATION)
                   if not math.isnan(x)), default=top)
    if top > limit or max(e.epsilon for e in chain) > budget:
        source = " (report.json's target_epsilon)" if report_budget else ""
        fail(cid, "budget", f"{who} ε={_fmt(top)}, past the budget of {budget:g}{source}")


def _shown(value: object) -> str:
    """A value from a hostile file, short enough for one line."""
    text = repr(value) if not isinstance(value, int) or abs(value) < 10**30 else "a huge integer"
    return text if len(text) <= 40 else text[:37] + "..."


def _check_length(
    h: HospitalAudit, has_copy: bool, seen: HospitalRound | None, report: RunReport | None,
    fail: Callable[[str, str, str], None],
) -> None:
    """Whether anything vouches for the chain's length; a FAIL naming why not.

    A prefix of a valid chain is itself valid, so only a reference shows that no entry
    was cut from the end: the hospital's own copy (compared entry by entry) or a
    finished run's report.json (the length and head the server last recorded). An
    unfinished run's report is no reference: a round trained after its last row shows
    nowhere in it."""
    cid = h.client_id
    refs = (["its own copy"] if has_copy else []) + (
        ["report.json"] if report is not None and report.final is not None
        and seen is not None and seen.ledger_entries is not None else [])
    if refs:
        h.length_checked_by = " and ".join(refs)
        return
    if report is None:
        h.length_unchecked = "no report.json and no own copy given"
    elif report.final is None:
        h.length_unchecked = ("report.json is of an unfinished run (no final summary) and "
                              "no own copy given")
    else:
        h.length_unchecked = "report.json records no ledger length for it and no own copy given"
    if h.in_roster:
        fail(cid, "completeness", (
            f"completeness of {cid}'s ledger NOT checked: {h.length_unchecked}. Entries cut "
            "from the end of a chain leave a valid chain, so without a length to compare "
            "with a truncated ledger looks whole: give --report with a finished run's "
            f"report.json, or --hospital-copy {cid}=PATH"))


def _check_finite(
    h: HospitalAudit, chain: list[LedgerEntry], recomputed: list[float], budget: float | None,
    fail: Callable[[str, str, str], None],
) -> None:
    """An infinite recomputed epsilon (no noise: a non-private run) or a NaN one (an
    event dp_accounting cannot account) fails, naming the hospital and the entry,
    whatever the budget and whatever was reported."""
    cid = h.client_id
    nan_at = next((i for i, x in enumerate(recomputed) if math.isnan(x)), None)
    inf_at = next((i for i, x in enumerate(recomputed) if math.isinf(x)), None)
    if nan_at is not None:
        e = chain[nan_at]
        ev = e.event
        fail(cid, "epsilon", (
            f"entry {e.seq} (round {e.round}) records an event dp_accounting cannot account "
            f"(σ={ev.noise_multiplier:g}, q={ev.sample_rate:g}, {ev.steps} steps, "
            f"δ={e.delta:g}): no epsilon can be recomputed for {cid} from this entry on, so "
            "none of its figures from there is confirmed"))
    if inf_at is not None and (nan_at is None or inf_at < nan_at):
        e = chain[inf_at]
        sigma = e.event.noise_multiplier
        why = ("its DP-SGD steps added no noise (σ = 0)" if e.event.steps and sigma == 0
               else f"its noise multiplier σ={sigma:g} is too small for any finite bound"
               if e.event.steps and sigma * sigma == 0
               else "a privacy loss beyond what dp_accounting can represent")
        past = f"; no budget holds (budget {budget:g})" if budget is not None else ""
        fail(cid, "non-private", (
            f"{cid}'s recorded events give ε=∞ from entry {e.seq} (round {e.round}) on: "
            f"{why}: NON-PRIVATE{past}"))


def _check_report_rows(
    h: HospitalAudit, chain: list[LedgerEntry], recomputed: list[float],
    report: RunReport, carried: int, tolerance: float, fail: Callable[[str, str, str], None],
    note: Callable[[Finding], None],
) -> None:
    """report.json's per-round epsilon and steps against the ledger, and its account of
    who trained against the ledger's entries, both ways. The first ``carried`` entries
    were spent before this run and count from round 1; the others are this run's.

    Per round, for a hospital that answered it (a line of that round, not among
    ``failed``): its line says it trained, or the round lists it among those it
    averaged, exactly when its ledger has an entry for that round; else a FAIL naming
    the round. The one exception: entries the line records as spent in the interrupted
    attempt of a resumed round (``ledger_interrupted``), a note, checked against the
    chain (:func:`_interrupted_entries`). A line carried from an earlier round (its
    ``of_round`` is another round: the hospital was not asked or did not answer) says
    nothing of this round. A hospital with an entry for a round in which report.json
    records it as failed trained and then dropped (its reply, or a later stage, did not
    reach the server): a note, since its epsilon counts the entry (so is one for a
    round whose failed hospitals include one the server could not name, ``node-N``:
    which hospital that node was is the server's word). An entry for a round
    report.json does not mention the hospital in (no line of that round, not among its
    failed), or for a round report.json has no row for, fails (but for rounds past the
    last row of an unfinished run, which the audit notes as such)."""
    cid = h.client_id
    this_run = chain[carried:]
    rows = {row.round for row in report.rounds}
    last = max(rows, default=0)
    for r in sorted({e.round for e in this_run} - rows):
        if report.final is None and r > last:
            continue  # after the unfinished run's last row: noted once for the run
        fail(cid, "report", f"{cid}'s ledger has an entry for round {r}, but report.json has "
                            f"no row for round {r}: a round it trained in is not reported")
    before: HospitalRound | None = None  # its latest line of an earlier round
    for row in report.rounds:
        r = row.round
        # Entries spent before this run (earlier runs or federations) count from round 1.
        upto = [i for i, e in enumerate(chain) if i < carried or e.round <= r]
        eps = recomputed[upto[-1]] if upto else 0.0
        h.recomputed_by_round[r] = eps
        entries = sum(e.round == r for e in this_run)
        v = row.per_client.get(cid)
        of = v.of_round if v is not None and v.of_round is not None else r
        if v is not None and of > r:
            fail(cid, "report", f"report.json round {r} holds a line of {cid} from round "
                                f"{of}, a later round")
            continue
        if v is None or of != r or cid in row.failed:
            # The hospital did not answer this round: nothing was reported (a line here
            # is its earlier one, carried forward). One the round averaged (its masked
            # input in the sum: failed_after_input) sent its chain first.
            if cid in row.trained and not entries:
                fail(cid, "missing", f"missing event: report.json round {r} lists {cid} "
                                     "among the hospitals it averaged, but its ledger has no "
                                     f"entry for round {r}")
            unnamed = _unnamed(row)
            if entries and cid in row.failed:
                note(Finding(NOTE, cid, "report", (
                    f"{cid}'s ledger has an entry for round {r}, in which report.json records "
                    f"it as failed ({row.failed[cid]}): it trained, and its update did not "
                    "reach the average; its ε counts the entry")))
            elif entries and unnamed:
                note(Finding(NOTE, cid, "report", (
                    f"{cid}'s ledger has an entry for round {r}; report.json's round {r} "
                    f"does not name {cid} but records {', '.join(unnamed)} as failed before "
                    "the server learned its name: it trained, and its update did not reach "
                    "the average; its ε counts the entry. Which hospital that node was is "
                    "the server's word: the ledger cannot show it")))
            elif entries:
                held = ("" if v is None else
                        f" (it holds only {cid}'s line of round {of}, carried forward)")
                fail(cid, "report", f"{cid}'s ledger has an entry for round {r}, but "
                                    f"report.json's round {r} does not mention {cid}{held}: "
                                    "a round it trained in is not reported")
            before = v if v is not None else before
            continue
        reported = v.epsilon
        h.reported_by_round[r] = reported
        why = disagreement(reported, eps, tolerance) if not math.isnan(reported) else "unreadable"
        if why is not None and not math.isnan(eps):  # a NaN recomputation is named once
            fail(cid, "report", f"report.json round {r} gives {cid} ε={_fmt(reported)} but its "
                                f"ledger up to round {r} gives ε={_fmt(eps)}: {why}")
        steps = v.steps
        ledger_steps = sum(chain[i].event.steps for i in upto if chain[i].event.is_training)
        if steps is None:
            fail(cid, "report", f"report.json round {r} gives {cid} no step count, so the "
                                "DP-SGD steps it reports cannot be checked against its ledger")
        elif steps != ledger_steps:
            fail(cid, "report", f"report.json round {r} says {cid} ran {steps} DP-SGD steps in "
                                f"all, its ledger records {ledger_steps}")
        lost = _interrupted_entries(h, chain, carried, row, v, before, fail, note)
        before = v
        averaged = cid in row.trained
        if (v.trained or averaged) and not entries - lost:
            fail(cid, "missing", f"missing event: report.json says {cid} trained in round {r}, "
                                 f"but its ledger has no entry for round {r}"
                                 + (" besides those of its interrupted attempt" if lost else ""))
        if entries - lost and not v.trained:
            fail(cid, "report", (
                f"report.json round {r} says {cid} did not train"
                + (f" ({v.reason})" if v.reason else "")
                + f", but its ledger has {entries} entr{'y' if entries == 1 else 'ies'} for "
                f"round {r}: it trained there"))
        if averaged and not v.trained:
            fail(cid, "report", f"report.json round {r} lists {cid} among the hospitals it "
                                "averaged, but its line says it did not train")


def _interrupted_entries(
    h: HospitalAudit, chain: list[LedgerEntry], carried: int, row: RoundRow,
    line: HospitalRound, before: HospitalRound | None, fail: Callable[[str, str, str], None],
    note: Callable[[Finding], None],
) -> int:
    """How many of the hospital's entries for ``row``'s round its ``line`` shows spent in
    the interrupted attempt of that round (``ledger_interrupted``), once checked; a FAIL
    and 0 when the claim does not hold.

    Which attempt an entry came from is not in the signed chain: it is the server's
    word. The claim is held to what the chain shows: the round is the first of a
    resumed run (``resumed``), the entries are that many of this run's entries for the
    round, the first ones, each after the chain the server held at the hospital's
    previous line (``before``) and within the chain it held at this line: spent between
    the server's last record before the interruption and the re-run's reply."""
    k = line.ledger_interrupted
    if not k:
        return 0
    cid, r = h.client_id, row.round
    mine = [e for e in chain[carried:] if e.round == r][:k]
    low = before.ledger_entries if before is not None and before.ledger_entries else 0
    high = line.ledger_entries if line.ledger_entries is not None else len(chain)
    claim = (f"report.json round {r} says {k} of {cid}'s entries were spent in an "
             f"interrupted attempt of round {r}")
    if not row.resumed:
        fail(cid, "report", f"{claim}, but round {r} is not the first round of a resumed run")
    elif len(mine) < k:
        fail(cid, "report", f"{claim}; its ledger has {len(mine)} entr"
                            f"{'y' if len(mine) == 1 else 'ies'} of this run for round {r}")
    elif not all(low < e.seq <= high for e in mine):
        fail(cid, "report", f"{claim}, but they are not between the entries the server held "
                            f"before the run was resumed ({low}) and at the re-run's reply "
                            f"({high})")
    else:
        seqs = ", ".join(str(e.seq) for e in mine)
        note(Finding(NOTE, cid, "report", (
            f"{cid}'s entr{'y' if k == 1 else 'ies'} {seqs} (round {r}) "
            f"{'was' if k == 1 else 'were'} spent in the "
            f"interrupted attempt of round {r}, before the run was resumed; its ε counts "
            f"{'it' if k == 1 else 'them'}. That they came from the lost attempt, not from an "
            "update of the re-run, is the server's word (report.json's ledger_interrupted): "
            "the chain shows only that they come after the server's last record before "
            "the resume and before the re-run's reply")))
        return k
    return 0


def _unnamed(row: RoundRow) -> list[str]:
    """The round's failed nodes the server could not name (``node-N``, N a number)."""
    return sorted(k for k in row.failed if re.fullmatch(r"node-[0-9]+", k)
                  and k not in row.per_client)


def _check_carried(cid: str, chain: list[LedgerEntry], carried: int,
                   fail: Callable[[str, str, str], None]) -> None:
    """report.json's ``ledger_carried`` (entries spent before this run) held to the chain:
    a run numbers its rounds from 1, so where a new run begins the chain's round numbers
    start again (or its federation changes). Carried entries followed by this run's
    whose round goes on counting, in the same federation, may be this run's own: FAIL.
    (Which run an entry came from is not signed; this is what the chain can show.)"""
    if not 0 < carried < len(chain):
        return
    a, b = chain[carried - 1], chain[carried]
    if b.round <= a.round or a.federation_id != b.federation_id:
        return
    fail(cid, "report", (
        f"report.json says {cid}'s first {carried} entr{'y was' if carried == 1 else 'ies were'}"
        f" spent before this run (ledger_carried), but its chain shows no new run beginning "
        f"after entry {a.seq}: entry {a.seq} is round {a.round}, entry {b.seq} round {b.round} "
        "of the same federation, and a run's rounds start again from 1; the entries it calls "
        "carried may be this run's, and this run's account of who trained cannot be checked "
        "for them"))


def _check_unnamed(
    report: RunReport, chains: Mapping[str, list[LedgerEntry]],
    hospitals: Mapping[str, HospitalAudit], roster: SignerRoster,
    fail: Callable[[str, str, str], None],
) -> None:
    """Each failed node a round could not name (``node-N``) stands for at most one
    hospital of the roster that the round does not otherwise name: per round, no more
    hospitals with an entry for it go unnamed than it has such nodes, and its named
    hospitals and unnamed nodes together are no more than the roster's members."""
    for row in report.rounds:
        unnamed = _unnamed(row)
        if not unnamed:
            continue
        r = row.round
        named = ({c for c, v in row.per_client.items() if v.of_round in (None, r)}
                 | (set(row.failed) - set(unnamed))) & set(roster.keys)
        if len(named) + len(unnamed) > len(roster.keys):
            fail("", "report", (
                f"report.json round {r} names {len(named)} of the roster's "
                f"{len(roster.keys)} hospitals and records {len(unnamed)} unnamed failed "
                f"node(s) ({', '.join(unnamed)}): more hospitals than the roster holds"))
            continue
        silent = sorted(
            c for c in roster.keys if c not in named and c in hospitals
            and (r in hospitals[c].lost_rounds
                 or any(e.round == r for e in chains.get(c, [])[hospitals[c].carried:])))
        if len(silent) > len(unnamed):
            fail("", "report", (
                f"report.json round {r} records {len(unnamed)} unnamed failed node(s) "
                f"({', '.join(unnamed)}) but does not name {len(silent)} hospitals with an "
                f"entry for round {r} ({', '.join(silent)}): each node is one hospital"))


def _check_averaged(report: RunReport, fail: Callable[[str, str, str], None],
                    note: Callable[[Finding], None]) -> None:
    """Every hospital a round lists among those it averaged answered that round: it has
    a line of that round in it, and is not among its failed (whose updates were not
    averaged), except a hospital the round's secure-aggregation record names in
    ``failed_after_input`` (its masked input is in the completed round's sum, and it
    failed at the check or unmask stage after sending it): a note."""
    for row in report.rounds:
        after_input = _failed_after_input(row)
        for cid in row.trained:
            line = row.per_client.get(cid)
            if line is None:
                fail(cid, "report", f"report.json round {row.round} lists {cid} among the "
                                    f"hospitals it averaged, but has no line for {cid}")
            elif line.of_round is not None and line.of_round != row.round:
                fail(cid, "report", f"report.json round {row.round} lists {cid} among the "
                                    f"hospitals it averaged, but its line there is of round "
                                    f"{line.of_round}: it did not answer round {row.round}")
            elif cid in row.failed and cid in after_input:
                note(Finding(NOTE, cid, "report", (
                    f"{cid} failed in round {row.round} after its masked input reached the "
                    f"server ({row.failed[cid]}): the round's sum holds its update, so it "
                    "is among the hospitals the round averaged; its ε counts the entry")))
            elif cid in row.failed:
                fail(cid, "report", f"report.json round {row.round} lists {cid} among the "
                                    "hospitals it averaged, and also as failed "
                                    f"({row.failed[cid]})")


def _failed_after_input(row: RoundRow) -> set[str]:
    """The hospitals a completed secure round's record names as failed after their
    masked input reached the server (empty for a plain round, an aborted one, or a
    record without the list)."""
    record = row.secagg or {}
    names = record.get("failed_after_input")
    if record.get("aborted") is not None or not isinstance(names, list):
        return set()
    return {n for n in names if isinstance(n, str)}


def _check_final(
    report: RunReport, hospitals: dict[str, HospitalAudit], tolerance: float,
    fail: Callable[[str, str, str], None], note: Callable[[Finding], None],
) -> None:
    # A round's headline ε (the largest any hospital had reached) must not be below any
    # figure a hospital reported in that round, each of which is checked against the
    # ledger above.
    for row in report.rounds:
        answered = [v.epsilon for cid, v in row.per_client.items()
                    if cid not in row.failed and not math.isnan(v.epsilon)]
        if not answered or row.epsilon >= max(answered):
            continue
        why = disagreement(row.epsilon, max(answered), tolerance)
        if why is not None:
            fail("", "report", f"report.json round {row.round} gives ε={_fmt(row.epsilon)}, "
                               f"below the ε={_fmt(max(answered))} one of its hospitals "
                               f"reported that round: {why}")
    if report.final is None:  # an unfinished run: verify_federation notes it
        return
    # The final ε is the server's: entries it never received (noted) cannot be in it.
    known = {cid: h.final_recomputed if h.lost_rounds else h.final_spent
             for cid, h in hospitals.items()}
    finals = [x for x in known.values() if x is not None and not math.isnan(x)]
    if not finals:
        return
    claimed = report.final_epsilon
    why = disagreement(claimed, max(finals), tolerance) if not math.isnan(claimed) else "unreadable"
    if why is not None:
        fail("", "report", f"report.json's final ε={_fmt(claimed)} disagrees with the largest "
                           f"recomputed final ε={_fmt(max(finals))}: {why}")
        return
    for cid, h in sorted(hospitals.items()):
        own = h.own_copy_recomputed
        if h.lost_rounds and own is not None and not math.isnan(own) and own > claimed \
                and disagreement(claimed, own, tolerance) is not None:
            note(Finding(NOTE, cid, "report", (
                f"{cid}'s own copy reaches ε={_fmt(own)}, above report.json's final "
                f"ε={_fmt(claimed)}: the entries the server never received are in the "
                "former only; the hospital spent them")))


def _extends(server: list[LedgerEntry], own: list[LedgerEntry]) -> bool:
    """Whether ``own`` is the server's chain, line for line, with entries after it."""
    n = len(server)
    return len(own) > n and [e.to_line() for e in own[:n]] == [e.to_line() for e in server]


def _this_runs_part(h: HospitalAudit, server: list[LedgerEntry], own: list[LedgerEntry],
                    note: Callable[[Finding], None]) -> list[LedgerEntry]:
    """The part of a hospital's own copy this run can account for: its whole lifetime
    file, less the entries of later runs (a note names them).

    A later run shows in the chain where, past everything the server holds (the
    server's chain being exactly the copy's beginning), an entry's round is lower than
    the one before it or its federation differs: within one run rounds never go back
    (a resumed run re-runs the same round), so no entry of the audited run is ever
    set aside. Such entries are spent after this run; the audit of that run counts
    them."""
    cid = h.client_id
    n = len(server)
    if not n or not _extends(server, own):
        return own
    for k in range(n, len(own)):
        a, b = own[k - 1], own[k]
        if b.round < a.round or b.federation_id != a.federation_id:
            later = len(own) - k
            how = (f"its rounds start again after round {a.round}"
                   if b.federation_id == a.federation_id else "in another federation")
            note(Finding(NOTE, cid, "copy", (
                f"{cid}'s own copy holds {later} entr{'y' if later == 1 else 'ies'} after this "
                f"run's, from entry seq {b.seq} (round {b.round}, federation "
                f"{one_line(b.federation_id, 80)!r}) on: a later run ({how}); they are not "
                "this run's, and are left out of its ε and budget")))
            return own[:k]
    return own


def _check_own_entries(
    h: HospitalAudit, server: list[LedgerEntry], own: list[LedgerEntry],
    own_eps: list[float], declared_delta: float | None, tolerance: float,
    budget: float | None, fail: Callable[[str, str, str], None],
    note: Callable[[Finding], None], pld_discretization: float = PLD_DISCRETIZATION,
) -> None:
    """The entries of a hospital's own copy that the server's chain lacks, held to every
    check the server's entries meet: an infinite or unaccountable recomputation
    (NON-PRIVATE), the run's δ, one privacy unit over the whole copy, and each entry's
    reported ε against the recomputation. A figure the audit counts is never one these
    checks skipped."""
    cid = h.client_id
    held = {e.seq for e in server}
    bad = next((i for i, x in enumerate(own_eps) if math.isnan(x) or math.isinf(x)), None)
    if bad is not None and own[bad].seq not in held:
        _check_finite(h, own, own_eps, budget, fail)
    units = {e.event.unit for e in own} - {"unstated"}
    if len(units) > 1 and len({e.event.unit for e in server} - {"unstated"}) <= 1:
        fail(cid, "unit", f"{cid}'s own copy mixes privacy units ({', '.join(sorted(units))}):"
                          " its epsilon holds for neither a record nor a patient")
    reference = _AtReference(own, pld_discretization)
    for i, (entry, eps) in enumerate(zip(own, own_eps, strict=True)):
        if entry.seq not in held:
            _check_entry(cid, entry, eps, f" of {cid}'s own copy", declared_delta, tolerance,
                         fail, note, reference.confirm(i))


class _AtReference:
    """A chain's recomputation at the reference grid (:data:`PLD_DISCRETIZATION`),
    computed once and only if asked: a coarser grid is more pessimistic, so a figure it
    finds under-reported is confirmed there before it fails."""

    def __init__(self, chain: list[LedgerEntry], discretization: float) -> None:
        self.chain, self.coarser = chain, discretization > PLD_DISCRETIZATION
        self._values: list[float] | None = None

    def confirm(self, i: int) -> Callable[[], float] | None:
        """The ``i``-th entry's ε at the reference grid (``None``: already at it)."""
        if not self.coarser:
            return None

        def value() -> float:
            if self._values is None:
                self._values = recompute_epsilons(self.chain, PLD_DISCRETIZATION)
            return self._values[i]

        return value


def _check_entry(
    cid: str, entry: LedgerEntry, eps: float, where: str, declared_delta: float | None,
    tolerance: float, fail: Callable[[str, str, str], None],
    note: Callable[[Finding], None], confirm: Callable[[], float] | None = None,
) -> bool:
    """One ledger entry against the run: its δ is the run's declared δ, and the ε it
    reports agrees with ``eps``, the ε its chain's events give (an RDP figure over the
    recomputation is a looser bound, noted; any other disagreement fails; an under-report
    found on a coarse grid is confirmed by ``confirm``, the reference grid's ε). Returns
    whether the reported ε stands (agrees, or is conservative); a NaN recomputation is
    named by ``_check_finite`` and does not stand."""
    if declared_delta is not None and entry.delta != declared_delta:
        fail(cid, "delta", f"entry {entry.seq}{where} uses δ={entry.delta:g}, the run "
                           f"declared δ={declared_delta:g}")
    if math.isnan(eps):
        return False
    why = disagreement(entry.epsilon, eps, tolerance)
    if why is not None and why.startswith("under") and confirm is not None:
        eps = confirm()
        why = disagreement(entry.epsilon, eps, tolerance)
    if why is None:
        return True
    message = (f"entry {entry.seq} (round {entry.round}){where} reports "
               f"ε={_fmt(entry.epsilon)} ({entry.accountant}) but the recorded events give "
               f"ε={_fmt(eps)}: {why}")
    if why.startswith("over") and entry.accountant == "rdp":
        note(Finding(NOTE, cid, "epsilon", message + " (RDP is a looser upper bound: "
                                            "conservative, not a misreport)"))
        return True
    fail(cid, "epsilon", message)
    return False


def _lost_reply(report: RunReport | None, federation_id: str, cid: str,
                entry: LedgerEntry) -> str | None:
    """Why ``entry``, in ``cid``'s own copy but not in the server's ledger, can be one the
    server never received (``None``: nothing in report.json explains it). Its round's row
    records the hospital as failed (it trained, and its reply was lost or refused), or
    does not name it but records a failed node the server could not name; or the round
    is past the last row of an unfinished run. An entry of another federation is never
    explained by this one's report."""
    if report is None or entry.federation_id != federation_id:
        return None
    r = entry.round
    row = next((x for x in report.rounds if x.round == r), None)
    if row is None:
        last = max((x.round for x in report.rounds), default=0)
        return (f"round {r} is after the unfinished run's last row" if report.final is None
                and r > last else None)
    line = row.per_client.get(cid)
    answered = line is not None and line.of_round in (None, r)
    if cid in row.trained or (answered and line is not None and line.trained):
        return None  # its update (or its line) reached the server: so did its chain
    lost = "it trained, and its reply did not reach the server"
    if cid in row.failed:
        return (f"report.json records {cid} as failed in round {r} ({row.failed[cid]}): "
                f"{lost}")
    if not answered and _unnamed(row):
        return (f"report.json's round {r} does not name {cid} but records "
                f"{', '.join(_unnamed(row))} as failed before the server learned its name "
                f"(which hospital that node was is the server's word): {lost}")
    return None


def _compare_copy(
    h: HospitalAudit, server: list[LedgerEntry], own: list[LedgerEntry],
    roster: SignerRoster, fail: Callable[[str, str, str], None],
    note: Callable[[Finding], None], lost: Callable[[LedgerEntry], str | None],
) -> bool:
    """The hospital's own copy against the server's, line by line; returns whether the
    copy verifies on its own and differs from the server's chain (then its epsilon is a
    figure of its own).

    Entries at the end of the own copy that the server never received are noted, not
    failed, when the server's chain is exactly the copy's beginning and ``lost`` explains
    each of them from report.json (a reply lost in a round the server records the
    hospital as failed in): the hospital spent them, and its epsilon counts them."""
    cid = h.client_id
    key = roster.keys.get(cid)
    own_ok = False
    if key is not None:
        own_check = check_chain(own, key, client_id=cid)
        own_ok = own_check.ok
        if not own_check.ok:
            fail(cid, "copy", f"{cid}'s own copy fails verification: {own_check.problem}")
    differences: list[str] = []
    # Aligned by sequence number, so one missing line is reported once, not as a shift.
    for name, entries in (("the server's copy", server), (f"{cid}'s copy", own)):
        seqs = [e.seq for e in entries]
        differences += [f"entry seq {q} appears {seqs.count(q)} times in {name}"
                        for q in sorted(set(seqs)) if seqs.count(q) > 1]
    on_server = {e.seq: e for e in reversed(server)}
    at_home = {e.seq: e for e in reversed(own)}
    for q in sorted(on_server.keys() | at_home.keys()):
        a, b = on_server.get(q), at_home.get(q)
        if a is None:
            differences.append(f"entry seq {q} (round {b.round}) is in {cid}'s copy but missing "
                               "from the server's: a missing event")
        elif b is None:
            differences.append(f"entry seq {q} (round {a.round}) is in the server's copy but "
                               f"not in {cid}'s")
        elif a.to_line() != b.to_line():
            pa, pb = a.to_plain(), b.to_plain()
            fields = sorted(k for k in pa if pa[k] != pb[k])
            differences.append(f"entry seq {q} differs in {fields}")
    # A verified copy that extends the server's chain differs only by its tail.
    is_prefix = own_ok and _extends(server, own)
    tail = own[len(server):] if is_prefix else []
    reasons: list[str | None] = [lost(e) for e in tail]
    # Entries of another federation before them: spent before this run (carried in).
    here = {e.federation_id for e, why in zip(tail, reasons, strict=True) if why is not None}
    for k, e in enumerate(tail):
        if reasons[k] is not None or e.federation_id in here or not any(reasons[k + 1:]):
            break
        reasons[k] = (f"it was spent in federation {one_line(e.federation_id, 80)!r} before "
                      "this run (the hospital's data carried it in)")
    if tail and all(reasons):
        for e, why in zip(tail, reasons, strict=True):
            if e.federation_id in here:
                h.lost_rounds.add(e.round)
            note(Finding(NOTE, cid, "copy", (
                f"entry seq {e.seq} (round {e.round}) is in {cid}'s own copy only: the "
                f"server never received it; {why}; the audit counts the entry (ε from its "
                "own copy)")))
        n = len(tail)
        h.copy_status = f"{n} more entr{'y' if n == 1 else 'ies'} (replies the server lost)"
        return own_ok
    if differences:
        n = len(differences)
        h.copy_status = f"differs ({n} entr{'y' if n == 1 else 'ies'})"
        for d in differences[:MAX_COPY_DIFFERENCES]:
            fail(cid, "copy", f"{cid}'s own copy and the server's differ: {d}")
        if len(differences) > MAX_COPY_DIFFERENCES:
            fail(cid, "copy", f"... and {len(differences) - MAX_COPY_DIFFERENCES} more lines")
        return own_ok
    h.copy_status = f"identical ({len(own)} lines)"
    return False
