"""The statistics of a one-run privacy audit (Steinke, Nasr and Jagielski, 2023).

Setting: ``m`` canaries, each put into the training set independently with
probability 1/2 by a secret fair coin. After training, an auditor looks at the
output and makes ``r`` guesses ("member" / "non-member") about ``r`` of the
canaries, abstaining on the rest; ``v`` of the guesses are right.

Theorem (Steinke et al. 2023, their main result for (epsilon, delta)-DP, as
computed by the paper's published p-value code): if training is (epsilon,
delta)-DP with respect to each canary, then for every ``v``::

    P[at least v correct] <= P[Binomial(r, q) >= v] + 2 m delta alpha,
    q = e^eps / (1 + e^eps),
    alpha = max_{1 <= i <= v} P[v - i <= Binomial(r, q) < v] / i.

:func:`p_value` is the right-hand side; :func:`epsilon_lower_bound` is the
largest epsilon whose p-value is still below ``1 - confidence`` (found by
bisection, as in the paper's reference code). Guarantee: if the audited
algorithm is (epsilon, delta)-DP with respect to each canary, the probability
(over the coins and the algorithm's randomness) that the returned bound exceeds
epsilon is at most ``1 - confidence`` -- provided the guesses depend only on the
algorithm's output and on randomness independent of the coins.

:func:`audit_scores` turns canary scores into guesses (the ``k`` highest scores
"member", the ``k`` lowest "non-member") for every ``k`` of a small grid and
keeps the best bound. Taking the best of ``G`` guess counts is a multiple test:
each count is tested at significance ``(1 - confidence) / G`` (Bonferroni), so
the best bound keeps the stated confidence.

Pure: numpy and scipy only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import stats

#: Fractions of the canaries guessed (half as members, half as non-members).
DEFAULT_GUESS_FRACTIONS: tuple[float, ...] = (0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0)
#: Bisection steps: the bound is exact to 2^-40 of the bracket (far below what matters).
_BISECTION_STEPS = 40


def _check_counts(m: int, guesses: int, correct: int) -> None:
    for name, value in (("m", m), ("guesses", guesses), ("correct", correct)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
            raise ValueError(f"{name} must be an integer (got {value!r}).")
    if not 0 <= correct <= guesses <= m:
        raise ValueError(
            f"need 0 <= correct <= guesses <= m (got correct={correct}, guesses={guesses}, "
            f"m={m}): an auditor cannot guess more canaries than there are, nor be right "
            "more often than it guessed."
        )


def _check_delta(delta: float) -> None:
    if not (isinstance(delta, (int, float)) and 0.0 <= float(delta) < 1.0):
        raise ValueError(f"delta must be a number in [0, 1) (got {delta!r}).")


def _check_confidence(confidence: float) -> None:
    if not (isinstance(confidence, (int, float)) and 0.0 < float(confidence) < 1.0):
        raise ValueError(
            f"confidence must lie strictly between 0 and 1 (got {confidence!r}); "
            "e.g. 0.95 for a bound that holds with probability 95%."
        )


def p_value(m: int, guesses: int, correct: int, epsilon: float, delta: float) -> float:
    """Probability of ``correct`` or more right guesses if training were (epsilon, delta)-DP.

    The bound of Steinke et al. (2023) on that probability (see the module
    docstring); it is at most 1. Increasing in epsilon and in delta, decreasing in
    ``correct`` for fixed ``guesses``.
    """
    _check_counts(m, guesses, correct)
    _check_delta(delta)
    if not (isinstance(epsilon, (int, float)) and epsilon >= 0 and not math.isnan(epsilon)):
        raise ValueError(f"epsilon must be a number >= 0 (got {epsilon!r}).")
    if correct == 0:
        return 1.0
    q = 1.0 / (1.0 + math.exp(-epsilon)) if epsilon < 700 else 1.0
    tail = float(stats.binom.sf(correct - 1, guesses, q))  # P[B >= v]
    if delta == 0:
        return min(tail, 1.0)
    # P[v - i <= B < v] for i = 1..v, as a running sum of positive terms (no cancellation).
    below = stats.binom.pmf(np.arange(correct - 1, -1, -1), guesses, q)
    window = np.cumsum(below)
    alpha = float(np.max(window / np.arange(1, correct + 1)))
    return min(tail + 2.0 * m * float(delta) * alpha, 1.0)


def epsilon_lower_bound(
    m: int, guesses: int, correct: int, delta: float, confidence: float = 0.95
) -> float:
    """Largest epsilon that ``correct`` of ``guesses`` right guesses rule out at ``confidence``.

    Guarantee: for an algorithm that is (epsilon, delta)-DP with respect to each of
    the ``m`` canaries, the returned value exceeds epsilon with probability at most
    ``1 - confidence``. Returns 0.0 when the guesses are no better than chance
    can explain (in particular for ``correct <= guesses / 2``).
    """
    _check_counts(m, guesses, correct)
    _check_delta(delta)
    _check_confidence(confidence)
    significance = 1.0 - float(confidence)
    if guesses == 0 or p_value(m, guesses, correct, 0.0, delta) >= significance:
        return 0.0
    lo, hi = 0.0, 1.0
    while p_value(m, guesses, correct, hi, delta) < significance:
        lo, hi = hi, 2.0 * hi
        if hi > 1e4:  # only reachable with delta = 0 and absurd m; the bound is then huge
            return lo
    for _ in range(_BISECTION_STEPS):
        mid = 0.5 * (lo + hi)
        if p_value(m, guesses, correct, mid, delta) < significance:
            lo = mid
        else:
            hi = mid
    return lo


@dataclass(frozen=True)
class GuessOutcome:
    """One guess count of an audit: ``k`` top scores guessed in, ``k`` bottom guessed out."""

    k_plus: int
    k_minus: int
    guesses: int
    correct: int
    significance: float  # at which this count was tested (Bonferroni share)
    epsilon_lower: float

    def to_plain(self) -> dict[str, Any]:
        """Plain JSON-able dict."""
        return asdict(self)


def guess_counts(m: int, fractions: Sequence[float] = DEFAULT_GUESS_FRACTIONS) -> list[int]:
    """Distinct ``k`` (guesses per side) for the given fractions of ``m`` guessed in total."""
    if m < 2:
        raise ValueError(f"an audit needs at least 2 canaries (got m={m}).")
    if not fractions or any(not (0.0 < f <= 1.0) for f in fractions):
        raise ValueError(f"guess fractions must lie in (0, 1] (got {list(fractions)!r}).")
    return sorted({max(1, min(m // 2, round(f * m / 2))) for f in fractions})


def make_guesses(scores: np.ndarray, k_plus: int, k_minus: int) -> np.ndarray:
    """+1 for the ``k_plus`` highest scores, -1 for the ``k_minus`` lowest, 0 elsewhere.

    Ties are broken by index (a rule independent of the coins), so the guesses
    are a function of the scores alone, as the theorem requires.
    """
    scores = np.asarray(scores, dtype=np.float64)
    m = scores.size
    if k_plus < 0 or k_minus < 0 or k_plus + k_minus > m:
        raise ValueError(
            f"k_plus={k_plus} and k_minus={k_minus} must be >= 0 and sum to at most "
            f"m={m} (a canary is guessed at most once)."
        )
    order = np.argsort(-scores, kind="stable")  # highest first
    out = np.zeros(m, dtype=np.int8)
    out[order[:k_plus]] = 1
    if k_minus:
        out[order[m - k_minus:]] = -1
    return out


def audit_scores(
    scores: Sequence[float] | np.ndarray,
    members: Sequence[bool] | np.ndarray,
    delta: float,
    confidence: float = 0.95,
    fractions: Sequence[float] = DEFAULT_GUESS_FRACTIONS,
) -> tuple[GuessOutcome, list[GuessOutcome]]:
    """The best lower bound over a grid of guess counts, and every count's outcome.

    ``scores[i]`` is the auditor's score of canary ``i`` (higher: more likely
    trained on); ``members[i]`` is its secret coin. Guarantee: the best outcome's
    ``epsilon_lower`` is a lower bound on epsilon at ``confidence`` for an
    (epsilon, delta)-DP algorithm, because each of the ``G`` counts was tested at
    ``(1 - confidence) / G``.
    """
    s = np.asarray(scores, dtype=np.float64)
    b = np.asarray(members, dtype=bool)
    if s.ndim != 1 or b.shape != s.shape:
        raise ValueError(
            f"scores and members must be 1-D of the same length (got {s.shape} and {b.shape})."
        )
    if not np.all(np.isfinite(s)):
        raise ValueError("canary scores must be finite numbers (a NaN score cannot be ranked).")
    _check_confidence(confidence)
    m = s.size
    ks = guess_counts(m, fractions)
    share = (1.0 - float(confidence)) / len(ks)
    truth = np.where(b, 1, -1)
    outcomes = []
    for k in ks:
        g = make_guesses(s, k, k)
        guessed = g != 0
        correct = int(np.count_nonzero(g[guessed] == truth[guessed]))
        eps = epsilon_lower_bound(m, 2 * k, correct, delta, 1.0 - share)
        outcomes.append(GuessOutcome(k, k, 2 * k, correct, share, eps))
    best = max(outcomes, key=lambda o: (o.epsilon_lower, o.correct / o.guesses))
    return best, outcomes
