"""Statistical tests that a ring vector looks uniform, and independent of an input.

Used by the secure-aggregation audit (:mod:`bract.audit.secagg_audit`) and the
secagg tests. A masked vector ``y = enc(x) + mask`` in Z_(2^k) hides ``x`` only
if ``mask`` is uniform; a weak mask (too few bits, repeated values, a block left
unmasked) leaves ``y`` visibly non-uniform. These tests look for that.

:func:`uniformity_test`, at family-wise significance ``alpha`` (split in three
equal parts, Bonferroni inside each):

1. **bit balance**: for each of the ``k`` bit positions, the count of ones is
   Binomial(n, 1/2) under uniformity; ``|z| = |ones - n/2| / sqrt(n/4)`` must stay
   below the normal quantile at ``alpha / (3 * 2k)``;
2. **chi-square** over the top ``b`` bits and over the low ``b`` bits
   (``2^b`` cells, ``b <= 8`` chosen so each cell expects at least 5 values):
   p-value >= ``alpha / 6`` each;
3. **Kolmogorov-Smirnov** of ``value / 2^k`` against U(0, 1): p-value >= ``alpha / 3``.

A truly uniform vector fails with probability at most ``alpha`` (default 1e-6).
What passing cannot show: that the mask is unpredictable -- an AES keystream
under a key the server knows passes every statistical test. Unpredictability
rests on the protocol's key handling, which the protocol tests cover.

:func:`independence_test`: the vector's signed value is uncorrelated with a
reference (the client's true input): Pearson ``|r| sqrt(n)`` below the normal
quantile at ``alpha / 4``, and a chi-square test of independence between the
vector's top 4 bits and 16 quantile bins of the reference, p >= ``alpha / 2``.

Pure: numpy and scipy.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import stats

#: Default family-wise significance of one vector's test.
DEFAULT_ALPHA = 1e-6
RING_BITS = (32, 64)
_MIN_VALUES = 40


def _as_ring(values: np.ndarray, bits: int) -> np.ndarray:
    if bits not in RING_BITS:
        raise ValueError(f"ring bits must be 32 or 64 (got {bits!r}).")
    v = np.asarray(values)
    if v.ndim != 1 or v.dtype.kind not in "ui":
        raise ValueError(f"expected a 1-D integer ring vector (got shape {v.shape}, "
                         f"dtype {v.dtype}).")
    if v.size < _MIN_VALUES:
        raise ValueError(f"a uniformity test needs at least {_MIN_VALUES} values "
                         f"(got {v.size}); test a longer vector.")
    return v.astype(np.uint64) & np.uint64((1 << bits) - 1)


def _check_alpha(alpha: float) -> None:
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"significance alpha must lie in (0, 1) (got {alpha!r}).")


def _to_unit(v: np.ndarray, bits: int) -> np.ndarray:
    """``value / 2^bits`` in [0, 1) as float64 (top 53 bits kept)."""
    shift = max(0, bits - 53)
    return (v >> np.uint64(shift)).astype(np.float64) * 2.0 ** -(bits - shift)


def _signed_unit(v: np.ndarray, bits: int) -> np.ndarray:
    """Two's-complement value / 2^(bits-1), in [-1, 1)."""
    u = _to_unit(v, bits)
    return np.where(u >= 0.5, u - 1.0, u) * 2.0


@dataclass(frozen=True)
class UniformityResult:
    """Outcome of :func:`uniformity_test` with every statistic it used."""

    passed: bool
    n: int
    bits: int
    alpha: float
    worst_bit: int
    worst_bit_z: float
    bit_z_limit: float
    cell_bits: int
    chi2_top_p: float
    chi2_low_p: float
    ks_p: float

    def summary(self) -> str:
        """One line: the statistics against their limits."""
        return (f"max|z| bit {self.worst_bit} = {self.worst_bit_z:.2f} (limit "
                f"{self.bit_z_limit:.2f}); chi² top/low {self.cell_bits} bits p = "
                f"{self.chi2_top_p:.2g}/{self.chi2_low_p:.2g}; KS p = {self.ks_p:.2g} "
                f"(alpha {self.alpha:g})")

    def to_plain(self) -> dict[str, Any]:
        """Plain JSON-able dict."""
        return asdict(self)


def uniformity_test(
    values: np.ndarray, bits: int, alpha: float = DEFAULT_ALPHA
) -> UniformityResult:
    """Do the ``values`` (elements of Z_(2^bits)) look uniform? See the module docstring.

    Guarantee: a vector of independent uniform ring elements fails with
    probability at most ``alpha``.
    """
    _check_alpha(alpha)
    v = _as_ring(values, bits)
    n = v.size
    part = alpha / 3.0
    # 1. bit balance
    ones = np.array([np.count_nonzero((v >> np.uint64(b)) & np.uint64(1)) for b in range(bits)])
    z = np.abs(ones - n / 2.0) / math.sqrt(n / 4.0)
    limit = float(stats.norm.isf(part / (2 * bits)))
    worst = int(np.argmax(z))
    # 2. chi-square on the top and low cell_bits bits
    cell_bits = int(min(8, math.floor(math.log2(n / 5.0))))
    cells = 1 << cell_bits
    mask = np.uint64(cells - 1)
    top = ((v >> np.uint64(bits - cell_bits)) & mask).astype(np.int64)
    low = (v & mask).astype(np.int64)
    p_top = float(stats.chisquare(np.bincount(top, minlength=cells)).pvalue)
    p_low = float(stats.chisquare(np.bincount(low, minlength=cells)).pvalue)
    # 3. KS on value / 2^k
    p_ks = float(stats.kstest(_to_unit(v, bits), "uniform").pvalue)
    passed = bool(z[worst] <= limit and min(p_top, p_low) >= part / 2 and p_ks >= part)
    return UniformityResult(passed, n, bits, alpha, worst, float(z[worst]), limit, cell_bits,
                            p_top, p_low, p_ks)


@dataclass(frozen=True)
class IndependenceResult:
    """Outcome of :func:`independence_test`."""

    passed: bool
    n: int
    alpha: float
    pearson_r: float
    pearson_z: float
    z_limit: float
    chi2_p: float
    note: str = ""

    def summary(self) -> str:
        """One line: the statistics against their limits."""
        text = (f"Pearson r = {self.pearson_r:.2g} (|z| {abs(self.pearson_z):.2f}, limit "
                f"{self.z_limit:.2f}); chi² independence p = {self.chi2_p:.2g}")
        return text + (f"; {self.note}" if self.note else "")

    def to_plain(self) -> dict[str, Any]:
        """Plain JSON-able dict."""
        return asdict(self)


def independence_test(
    values: np.ndarray, bits: int, reference: np.ndarray, alpha: float = DEFAULT_ALPHA
) -> IndependenceResult:
    """Is the ring vector ``values`` unrelated to ``reference`` (same length)?

    Guarantee: if ``values`` is uniform and independent of ``reference``, the
    test fails with probability at most ``alpha``. A constant reference carries
    no information to correlate with; the test then passes with a note (the
    uniformity test is what covers that case).
    """
    _check_alpha(alpha)
    v = _as_ring(values, bits)
    ref = np.asarray(reference, dtype=np.float64).ravel()
    if ref.shape != v.shape:
        raise ValueError(f"reference has {ref.size} values, the vector {v.size}.")
    if not np.all(np.isfinite(ref)):
        raise ValueError("reference values must be finite.")
    z_limit = float(stats.norm.isf(alpha / 4.0))
    if np.ptp(ref) == 0:
        return IndependenceResult(True, v.size, alpha, 0.0, 0.0, z_limit, 1.0,
                                  "reference is constant: nothing to correlate with")
    s = _signed_unit(v, bits)
    r = float(np.corrcoef(s, ref)[0, 1])
    z = r * math.sqrt(v.size)
    # contingency: top 4 bits of the vector x 16 quantile bins of the reference
    edges = np.unique(np.quantile(ref, np.linspace(0, 1, 17)[1:-1]))
    ref_bin = np.searchsorted(edges, ref, side="right")
    top = (v >> np.uint64(bits - 4)).astype(np.int64)
    table = np.zeros((16, edges.size + 1), dtype=np.int64)
    np.add.at(table, (top, ref_bin), 1)
    table = table[table.sum(axis=1) > 0][:, table.sum(axis=0) > 0]
    p_chi = 0.0 if table.shape[0] < 2 else 1.0  # one value everywhere: not uniform at all
    if table.shape[0] >= 2 and table.shape[1] >= 2:
        p_chi = float(stats.chi2_contingency(table, correction=False).pvalue)
    passed = bool(abs(z) <= z_limit and p_chi >= alpha / 2.0)
    return IndependenceResult(passed, v.size, alpha, r, z, z_limit, p_chi)
