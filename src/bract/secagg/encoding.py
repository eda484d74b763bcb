"""Fixed-point encoding of weighted updates into the ring Z_(2^k), k in {32, 64}.

A client's vector ``x`` (length ``d``) and integer weight ``w`` (its example
count) become ``d + 1`` ring elements::

    [w * q_1, ..., w * q_d, w]      q_i = SR(clip(x_i) * 2^f)

where SR is unbiased stochastic rounding (``E[SR(z)] = z``, ``|SR(z) - z| < 1``)
driven by an AES-CTR keystream under a fresh ``os.urandom`` key. The sum of all
clients' encodings decodes to ``(sum_u w_u * x_u, sum_u w_u)``, so the server
learns only these totals.

A client may append ``t`` *totals* after its vector: values summed without the
weight, each encoded as ``SR(z * 2^f)`` with ``|z| <= clip * W`` (``W`` the round's
``max_weight``). Their levels stay within ``W * Q``, the bound on a weighted level,
so the headroom below covers them; a total beyond ``clip * W`` is refused
(:class:`EncodingError`), never clipped. The server decodes them as plain sums
``sum_u z_u``, each within ``n * 2^-f`` (plus float64 conversion).

Headroom: with ``n`` clients, ``|q| <= Q = ceil(clip * 2^f)`` and ``w <= W``, every
partial sum lies in ``[-n W Q, n W Q]``. The ring is chosen so that
``n W Q < 2^(k-1)``: the signed sum never wraps and decoding is exact.
:meth:`EncodingConfig.ring_bits_for` raises :class:`EncodingError` otherwise.

Error bound (per coordinate): ``|decoded_sum_i - sum_u w_u clip(x_u,i)|
< sum_u w_u * 2^-f`` exactly in integers, plus the float64 rounding of the final
conversion (relative 2^-53); see :meth:`EncodingConfig.sum_error_bound`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .crypto import KeystreamBlocks, random_bytes
from .errors import EncodingError

__all__ = ["RING_DTYPES", "EncodingConfig", "decode_sum", "encode"]

RING_DTYPES = {32: np.uint32, 64: np.uint64}
_SIGNED = {32: np.int32, 64: np.int64}


@dataclass(frozen=True)
class EncodingConfig:
    """Fixed-point parameters shared by the whole round.

    clip: values must lie in ``[-clip, clip]`` (a client may opt to clip instead).
    frac_bits: ``f``, the scale is ``2^f``.
    max_weight: the largest integer weight (example count) a client may carry.
    ring_bits: 32 or 64, or ``None`` to take the smallest that has headroom.
    """

    clip: float = 1.0
    frac_bits: int = 16
    max_weight: int = 2**16
    ring_bits: int | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.clip, (int, float)) and math.isfinite(self.clip) and self.clip > 0):
            raise EncodingError(f"clip must be a finite positive number, got {self.clip!r}")
        if not isinstance(self.frac_bits, int) or not 0 <= self.frac_bits <= 40:
            raise EncodingError(f"frac_bits must be an int in [0, 40], got {self.frac_bits!r}")
        if self.clip * 2.0**self.frac_bits >= 2.0**52:
            raise EncodingError("clip * 2^frac_bits must stay below 2^52 (float64 exactness)")
        if not isinstance(self.max_weight, int) or self.max_weight < 1:
            raise EncodingError(f"max_weight must be an int >= 1, got {self.max_weight!r}")
        if self.ring_bits not in (None, 32, 64):
            raise EncodingError(f"ring_bits must be 32, 64 or None, got {self.ring_bits!r}")

    @property
    def max_level(self) -> int:
        """``Q = ceil(clip * 2^f)``: the largest ``|q|`` stochastic rounding can produce."""
        return math.ceil(self.clip * 2**self.frac_bits)

    def required_bits(self, n_clients: int) -> int:
        """Smallest ``k`` with ``n * W * Q < 2^(k-1)`` (the signed sum cannot wrap)."""
        bound = max(1, n_clients) * self.max_weight * max(1, self.max_level)
        return bound.bit_length() + 1

    def largest_weight(self, n_clients: int, ring_bits: int = 64) -> int:
        """The largest ``max_weight`` whose ``n_clients``-client sum cannot wrap in
        ``Z_(2^ring_bits)`` under this clip and scale (0 when none can)."""
        return (2 ** (ring_bits - 1) - 1) // (max(1, n_clients) * max(1, self.max_level))

    def ring_bits_for(self, n_clients: int) -> int:
        """Ring size for ``n_clients``; raises :class:`EncodingError` if the sum could wrap."""
        need = self.required_bits(n_clients)
        if self.ring_bits is not None:
            if need > self.ring_bits:
                raise EncodingError(
                    f"ring Z_(2^{self.ring_bits}) too small: {n_clients} clients x max_weight "
                    f"{self.max_weight} x clip*2^f {self.max_level} needs {need} bits; the sum "
                    "would wrap (lower frac_bits, clip or max_weight, or use ring_bits=64)"
                )
            return self.ring_bits
        if need <= 32:
            return 32
        if need <= 64:
            return 64
        raise EncodingError(
            f"no ring has headroom: {n_clients} clients x max_weight {self.max_weight} x "
            f"clip*2^f {self.max_level} needs {need} bits > 64; lower frac_bits, clip or max_weight"
        )

    @property
    def totals_range(self) -> float:
        """``clip * max_weight``: how far from 0 a total (a coordinate summed without
        the weight, see :func:`encode`) may lie."""
        return self.clip * self.max_weight

    def sum_error_bound(self, total_weight: int, n_clients: int = 0) -> float:
        """Bound on ``|decoded sum - exact sum|`` per coordinate, for a weighted
        coordinate (``sum_u w_u clip(x_u)``) and for a total of ``n_clients`` clients
        (``sum_u z_u``) alike.

        ``max(W_total, n) * 2^-f`` from stochastic rounding (each client errs by < 1
        level, times its weight on a weighted coordinate), plus float64 conversion
        (relative 2^-52 of the largest possible magnitude).
        """
        rounding = max(total_weight, n_clients) * 2.0**-self.frac_bits
        magnitude = max(total_weight, n_clients * self.max_weight)
        conversion = 2.0**-52 * magnitude * (self.clip + 2.0**-self.frac_bits)
        return rounding + conversion


def _check_vector(vector: object, dim: int) -> np.ndarray:
    if not isinstance(vector, np.ndarray):
        raise EncodingError(f"input must be a numpy array, got {type(vector).__name__}")
    if vector.dtype.kind != "f":
        raise EncodingError(f"input dtype must be floating point, got {vector.dtype}")
    if vector.ndim != 1:
        raise EncodingError(f"input must be 1-D, got shape {vector.shape}")
    if vector.shape[0] != dim:
        raise EncodingError(f"input length {vector.shape[0]} != round dimension {dim}")
    return vector


def _peak(x: np.ndarray) -> float:
    """``max |x|`` without a full-length temporary; EncodingError for NaN or Inf (either
    makes the minimum or the maximum non-finite)."""
    if not x.size:
        return 0.0
    hi, lo = float(x.max()), float(x.min())
    if not (math.isfinite(hi) and math.isfinite(lo)):
        bad = int(np.count_nonzero(~np.isfinite(x)))
        raise EncodingError(f"input has {bad} NaN/Inf value(s)",
                            public_reason="the input holds NaN/Inf values")
    return max(hi, -lo)


def encode(
    vector: np.ndarray,
    weight: int,
    config: EncodingConfig,
    ring_bits: int,
    *,
    dim: int | None = None,
    clip_out_of_range: bool = False,
    totals: np.ndarray | None = None,
) -> np.ndarray:
    """Encode ``vector`` with integer ``weight``, then ``totals`` unweighted, into
    ``d + 1`` elements of Z_(2^ring_bits) (``d``: both lengths together).

    Values of ``vector`` outside ``[-clip, clip]`` raise :class:`EncodingError`
    unless ``clip_out_of_range`` is set; ``totals`` (summed without the weight) must
    lie within ``[-clip * max_weight, clip * max_weight]`` and are never clipped:
    one beyond raises :class:`EncodingError`, so the decoded sum of a total is the
    exact sum of what the clients gave, within the encoding error. ``dim``, when
    given, is the required length. The rounding randomness is an AES-CTR keystream
    under a fresh CSPRNG key, so rounding decisions are unpredictable.
    """
    if ring_bits not in RING_DTYPES:
        raise EncodingError(f"ring_bits must be 32 or 64, got {ring_bits}")
    t = _check_vector(totals, totals.shape[0] if isinstance(totals, np.ndarray) else -1) \
        if totals is not None else np.zeros(0)
    if dim is None:
        dim = vector.shape[0] if isinstance(vector, np.ndarray) and vector.ndim == 1 else -1
    else:
        dim -= t.size
    x = _check_vector(vector, dim)
    if isinstance(weight, bool) or not isinstance(weight, (int, np.integer)):
        raise EncodingError(f"weight must be an int, got {type(weight).__name__}")
    weight = int(weight)
    if not 0 <= weight <= config.max_weight:
        raise EncodingError(f"weight {weight} outside [0, max_weight={config.max_weight}]",
                            public_reason=f"the weight is outside [0, max_weight="
                                          f"{config.max_weight}] of the round")
    peak = _peak(x)
    if peak > config.clip:
        if not clip_out_of_range:
            n_out = int(np.count_nonzero(np.abs(x) > config.clip))
            raise EncodingError(
                f"{n_out} value(s) beyond the clipping range [-{config.clip}, {config.clip}] "
                f"(max |x| = {peak:.6g}); clip the update first or enable clipping",
                public_reason=f"the input has values beyond the clipping range "
                              f"[-{config.clip}, {config.clip}] of the round",
            )
    if _peak(t) > config.totals_range:
        raise EncodingError(
            f"a total lies beyond the round's range [-{config.totals_range:g}, "
            f"{config.totals_range:g}] (clip x max_weight); totals are never clipped",
            public_reason=f"a total lies beyond the round's range "
                          f"[-{config.totals_range:g}, {config.totals_range:g}]")
    out = np.empty(x.size + t.size + 1, dtype=RING_DTYPES[ring_bits])
    out[-1] = weight
    _round_into(out[:x.size], x, weight, config, clip=peak > config.clip)
    if t.size:
        # Weight 1, no clip: |z| <= clip * W gives a level within W * Q (headroom).
        _round_into(out[x.size:-1], t, 1, config, clip=False)
    return out


def _round_into(out: np.ndarray, x: np.ndarray, weight: int, config: EncodingConfig,
                clip: bool) -> None:
    """``out = w * SR(clip(x) * 2^f)`` as ring elements, a block at a time (the float64
    work stays cache-sized; no full-length temporary beyond ``out``). The uniforms of
    the rounding are the top 53 bits of consecutive 64-bit words of one AES-CTR
    keystream under a fresh key."""
    stream = KeystreamBlocks(x.size, np.uint64)
    scaled = np.empty(stream.block, dtype=np.float64)
    low = np.empty_like(scaled)
    uniform = np.empty_like(scaled)
    up = np.empty(stream.block, dtype=bool)
    level = np.empty(stream.block, dtype=np.int64)
    scale = float(2**config.frac_bits)
    for where, bits in stream.under(random_bytes(32)):
        k = where.stop - where.start
        s, lo, u, r, q = scaled[:k], low[:k], uniform[:k], up[:k], level[:k]
        s[:] = x[where]  # exact widening to float64
        if clip:
            np.clip(s, -config.clip, config.clip, out=s)
        s *= scale  # exact: power-of-two scaling
        np.floor(s, out=lo)
        s -= lo  # the fraction, exact, in [0, 1)
        np.right_shift(bits, np.uint64(11), out=bits)
        u[:] = bits
        u *= 2.0**-53
        np.less(u, s, out=r)
        lo += r  # exact: |lo| < 2^52
        q[:] = lo
        q *= np.int64(weight)  # |q * w| <= Q * W < 2^63 by the headroom check
        out[where] = q.view(np.uint64)  # two's complement, reduced mod 2^k on assignment


def decode_sum(total: np.ndarray, ring_bits: int, frac_bits: int) -> tuple[np.ndarray, int]:
    """Decode the ring sum of all encodings into ``(weighted_sum float64[d], total_weight)``.

    Exact as long as the headroom condition held for the clients that were summed.
    """
    if ring_bits not in RING_DTYPES or total.dtype != RING_DTYPES[ring_bits]:
        raise EncodingError(f"sum must be a uint{ring_bits} vector")
    signed = total.view(_SIGNED[ring_bits])
    weight = int(signed[-1])
    if weight < 0:
        raise EncodingError("total weight decoded negative: the sum wrapped")
    return signed[:-1].astype(np.float64) * 2.0**-frac_bits, weight
