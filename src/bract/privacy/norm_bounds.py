"""Guaranteed upper bounds on gradient norms whose formulas cancel in floating point.

Clipping is private when the norm it divides by is at least the norm of the term it
scales: with ``est >= ||v||`` the factor ``min(1, C / est)`` leaves ``||c v|| <= C``,
and an over-estimate only shrinks the term. Some norms are computed without forming
the gradient, as a sum of signed products that can cancel:

* a Linear layer's weight gradient summed over several rows (every position of a
  sequence input, every record of a patient) has squared norm
  ``Q = sum_{r, s} (g_r . g_s)(a_r . a_s)``; inputs that are huge and nearly equal
  and output gradients of opposite signs make ``Q`` tiny beside its terms, and a
  float32 evaluation comes out ``<= 0`` (clamped to 0: factor 1, the term unclipped);
* the same layer's bias gradient ``sum_r g_r`` and an Embedding row's summed
  gradient, sums that can cancel;
* and the clipped sum itself, formed by one matrix product over all rows, carries a
  rounding error proportional to ``sum_r c |g_r| |a_r|``, not to the term's norm.

:func:`linear_norm_bounds` and :func:`embedding_norm_bounds` give, for each example
(or patient), a bound ``est`` with ``est >= ||v|| + e`` where ``v`` is the exact
gradient of the float values ``a, g`` and ``e`` bounds that unit's share of the
rounding error of the clipped sum formed from them in the working precision
(:func:`matmul_unit_roundoff`). Derivation (Higham, "Accuracy and Stability of
Numerical Algorithms", 2nd ed., section 3.1: a dot product or sum of ``n`` terms in
any order errs by at most ``gamma_n = n u / (1 - n u)`` times the sum of the terms'
absolute values; ``(1 + gamma_j)(1 + gamma_k) <= 1 + gamma_{j+k}``): in float64
(``u = 2^-53``) each Gram entry ``g_r . g_s`` errs by at most
``gamma_{d_out} |g_r||g_s|``, ``a_r . a_s`` by ``gamma_{d_in} |a_r||a_s|``, their
product adds one rounding and the sum of the ``n`` products (exact zeros for other
units included) ``gamma_n``, so with ``S = sum_r |g_r||a_r|``::

    |Q_computed - Q| <= gamma_k S^2,   k = d_out + d_in + 1 + n

and ``Q <= max(Q_computed, 0) + 2 gamma_k S_computed^2`` (the factor 2 covers the
rounding of ``S`` itself, at most ``gamma_{d + R + 4}`` relative, far below
``1 - 1/sqrt 2``). The clipped sum ``(c * G)^T A`` over ``N`` rows, evaluated in
precision ``u_mm``, errs by at most ``gamma_{N + 2}(u_mm) sum_r c_r |g_r||a_r|``, a
share of ``gamma_{N+2} c_p S_p`` per unit (doubled, again for the rounding of ``S``).
The bound is then ``sqrt(max(Q_computed, 0) + 2 gamma_k S^2) + 2 gamma_{N+2} S``,
times ``1 + 2^-40`` for its own float64 evaluation, rounded up into the gradients'
dtype. The bias bound is ``||sum_r g_r||`` (float64) plus
``2 (gamma_R(u64) + gamma_{N+2}(u_mm)) sum_r |g_r|``. A NaN or infinity in a unit's
rows makes its bound non-finite (and only its own), so clipping gives it factor 0.

The work done depends on shapes and groups only, never on the values. For ordinary
gradients the bound exceeds the norm by a relative ``~ 2 gamma_{N+2} S / ||v||`` (about
``1e-5`` for 64 float32 rows), which shrinks clipped terms by that much.
"""

from __future__ import annotations

import math
import os

import torch

__all__ = [
    "embedding_norm_bounds",
    "gamma",
    "linear_norm_bounds",
    "matmul_unit_roundoff",
    "round_up_to",
]

#: float64's unit roundoff.
U64 = 2.0 ** -53
#: Rows (records x positions) up to which grouped Gram sums use one Gram matrix of the
#: whole batch (R^2 entries); beyond it, one Gram matrix per group.
GRAM_ROWS = 2048


def gamma(n: int, u: float) -> float:
    """Higham's ``gamma_n = n u / (1 - n u)``: the relative error bound of a sum or dot
    product of ``n`` terms evaluated with unit roundoff ``u`` (infinite when
    ``n u >= 1/2``, where no such bound is claimed)."""
    nu = n * u
    return math.inf if nu >= 0.5 else nu / (1.0 - nu)


#: The unit roundoff of the coarsest float32 matrix product torch may run (bfloat16
#: passes), taken whenever the precision in force cannot be read.
_COARSEST = 2.0 ** -8


def _reduced_float32_matmul(device: torch.device) -> float | None:
    """The unit roundoff of float32 matrix products when torch may run them in reduced
    precision on ``device``, else None; the coarsest when the setting cannot be read."""
    if device.type == "cuda" and os.environ.get(
            "TORCH_ALLOW_TF32_CUBLAS_OVERRIDE", "0").strip() not in ("", "0"):
        return 2.0 ** -11  # TF32 forced in cuBLAS whatever torch's flags say
    try:
        precision = torch.get_float32_matmul_precision()
        backends = [torch.backends.mkldnn.matmul]
        if device.type == "cuda":
            backends.append(torch.backends.cuda.matmul)
        # torch's newer per-backend setting ("ieee", "tf32", "bf16", "none")
        newer = [getattr(b, "fp32_precision", "ieee") for b in backends]
        tf32 = device.type == "cuda" and bool(torch.backends.cuda.matmul.allow_tf32)
    except (RuntimeError, AttributeError):  # legacy and newer settings mixed
        return _COARSEST
    if precision == "medium" or "bf16" in newer:
        return _COARSEST
    if precision == "high" or tf32 or "tf32" in newer:
        return 2.0 ** -11
    if any(v not in ("ieee", "none") for v in newer):
        return _COARSEST
    return None


def matmul_unit_roundoff(dtype: torch.dtype, device: torch.device) -> float:
    """The unit roundoff of a matrix product of ``dtype`` tensors on ``device``: the
    dtype's, or for float32 the reduced precision torch may use (TF32: ``2^-11``;
    bfloat16 passes: ``2^-8``) when ``torch.get_float32_matmul_precision()``, the
    per-backend ``fp32_precision``, ``torch.backends.cuda.matmul.allow_tf32`` or, on a
    GPU, ``TORCH_ALLOW_TF32_CUBLAS_OVERRIDE`` allows it; the coarsest (``2^-8``) when
    those settings cannot be read. Never below what the product can lose."""
    u = torch.finfo(dtype).eps / 2
    if dtype == torch.float32:
        reduced = _reduced_float32_matmul(device)
        if reduced is not None:
            return reduced
    return u


def round_up_to(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` (float64) in ``dtype``, each value rounded up: never below ``x`` (NaN stays
    NaN; a value beyond the dtype's range becomes infinite)."""
    y = x.to(dtype)
    if dtype == torch.float64:
        return y
    below = y.to(torch.float64) < x
    return torch.where(below, torch.nextafter(y, torch.full_like(y, math.inf)), y)


def _finish(bound: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return round_up_to(bound * (1.0 + 2.0 ** -40), dtype)


def linear_norm_bounds(a: torch.Tensor, g: torch.Tensor, groups: torch.Tensor | None,
                       count: int, *, bias: bool, gram_rows: int | None = None,
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Upper bounds on the norms of each unit's weight and bias gradients of an
    ``nn.Linear``, from its inputs ``a`` and output gradients ``g`` (``[B, ..., d]``):
    the unit is the example (``groups`` None, ``count == B``) or the group
    ``groups[i]`` of example ``i``; a unit's rows are all positions of its examples.

    Guarantee (module docstring): each bound is at least the exact norm of the unit's
    gradient of these float values plus the unit's share of the rounding error of the
    clipped sum :func:`~bract.privacy.clipping.layer_clipped_sum` forms from them, for
    any values; non-finite exactly for the units with a NaN or infinity in their rows.
    Returned in ``g``'s dtype; the bias bound is None without ``bias``."""
    dtype = g.dtype
    d_out, d_in = g.shape[-1], a.shape[-1]
    b = len(g)
    per_unit_rows = g[0].numel() // d_out if b else 1
    g64 = g.reshape(-1, d_out).to(torch.float64)
    a64 = a.reshape(-1, d_in).to(torch.float64)
    rows = len(g64)
    unit = torch.arange(b, device=g.device) if groups is None else groups.to(g.device)
    row_unit = unit.repeat_interleave(per_unit_rows)
    zero = torch.zeros((), dtype=torch.float64, device=g.device)
    g_row = torch.linalg.vector_norm(g64, dim=1)
    s = g64.new_zeros(count).index_add_(
        0, row_unit, g_row * torch.linalg.vector_norm(a64, dim=1))
    gram_rows = GRAM_ROWS if gram_rows is None else gram_rows
    if groups is None:
        # one Gram matrix per example over its positions
        g3 = g64.view(b, per_unit_rows, d_out)
        a3 = a64.view(b, per_unit_rows, d_in)
        q = (torch.bmm(g3, g3.transpose(1, 2)) * torch.bmm(a3, a3.transpose(1, 2))).sum((1, 2))
        summed = per_unit_rows * per_unit_rows
    elif rows <= gram_rows:
        same = row_unit[:, None] == row_unit[None, :]
        # where, not a product with `same`: a non-finite row of another unit must add
        # nothing (0 * NaN is NaN) to this unit's sum.
        per_row = torch.where(same, (g64 @ g64.t()) * (a64 @ a64.t()), zero).sum(1)
        q = g64.new_zeros(count).index_add_(0, row_unit, per_row)
        summed = 2 * rows  # a row's sum, then the additions into its unit
    else:
        q = g64.new_zeros(count)
        for p in range(count):
            idx = (row_unit == p).nonzero().squeeze(1)
            gp, ap = g64[idx], a64[idx]
            q[p] = ((gp @ gp.t()) * (ap @ ap.t())).sum()
        summed = rows * rows
    accumulate = 2.0 * gamma(rows + 2, matmul_unit_roundoff(dtype, g.device))
    gram_margin = 2.0 * gamma(d_out + d_in + 1 + summed, U64)
    weight = torch.sqrt(q.clamp(min=0) + gram_margin * s * s) + accumulate * s
    bias_bound = None
    if bias:
        total = g64.new_zeros((count, d_out)).index_add_(0, row_unit, g64)
        s_b = g64.new_zeros(count).index_add_(0, row_unit, g_row)
        bias_bound = _finish(torch.linalg.vector_norm(total, dim=1)
                             + (2.0 * gamma(rows, U64) + accumulate) * s_b, dtype)
    return _finish(weight, dtype), bias_bound


def embedding_norm_bounds(ids: torch.Tensor, g: torch.Tensor, num_embeddings: int
                          ) -> torch.Tensor:
    """Upper bounds on each example's ``nn.Embedding`` weight-gradient norm, from its
    token ids ``ids`` (``[B, ...]``) and output gradients ``g`` (``[B, ..., dim]``):
    row ``v`` of example ``b``'s gradient is ``sum_{t: ids[b,t] = v} g[b,t]``, summed
    here in float64; the bound adds ``2 (gamma_T(u64) + gamma_{T+2}(u)) sum_t |g_t|``,
    which covers the float64 sums and the rounding of the same sums formed again in
    ``g``'s dtype (per-example gradients, then their clipped sum). Guarantee as
    :func:`linear_norm_bounds`'."""
    b = len(g)
    dim = g.shape[-1]
    flat_ids = ids.reshape(b, -1).to(g.device)
    positions = flat_ids.shape[1]
    g64 = g.reshape(b * positions, dim).to(torch.float64)
    key = (torch.arange(b, device=g.device).repeat_interleave(positions) * num_embeddings
           + flat_ids.reshape(-1))
    unique, inverse = torch.unique(key, return_inverse=True)
    sums = g64.new_zeros((len(unique), dim)).index_add_(0, inverse, g64)
    sq = g64.new_zeros(b).index_add_(0, torch.div(unique, num_embeddings,
                                                   rounding_mode="floor"),
                                     (sums * sums).sum(1))
    s = g64.new_zeros(b).index_add_(
        0, torch.arange(b, device=g.device).repeat_interleave(positions),
        torch.linalg.vector_norm(g64, dim=1))
    margin = 2.0 * (gamma(positions, U64)
                    + gamma(positions + 2 + b, matmul_unit_roundoff(g.dtype, g.device)))
    return _finish(torch.sqrt(sq) + margin * s, g.dtype)
