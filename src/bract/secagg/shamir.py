"""Shamir secret sharing over a prime field (our own arithmetic, property-tested).

Guarantee (information-theoretic): with a uniformly random polynomial of degree
``t - 1``, any ``t`` shares determine the secret and any ``t - 1`` shares are
uniformly distributed whatever the secret, so they reveal nothing about it.
The default field is GF(2^521 - 1), large enough for 256-bit secrets (X25519
private keys, 32-byte seeds) in one piece. Coefficients come from ``os.urandom``
by rejection sampling, so they are exactly uniform.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import lru_cache

from .errors import ConfigurationError, ProtocolViolation

PRIME = 2**521 - 1
SHARE_BYTES = 66  # ceil(521 / 8)

__all__ = [
    "PRIME",
    "SHARE_BYTES",
    "bytes_to_share",
    "random_field_element",
    "reconstruct",
    "share_to_bytes",
    "split",
    "split_with_coefficients",
    "x_coordinate",
]


def x_coordinate(node_id: int) -> int:
    """Evaluation point of a node: ``node_id + 1`` (non-zero and distinct for node ids >= 0)."""
    if node_id < 0:
        raise ConfigurationError(f"node id must be >= 0, got {node_id}")
    return node_id + 1


def random_field_element(prime: int = PRIME) -> int:
    """Uniform element of GF(prime) from the OS CSPRNG (rejection sampling, no modulo bias)."""
    nbits = prime.bit_length()
    nbytes = (nbits + 7) // 8
    mask = (1 << nbits) - 1
    while True:
        r = int.from_bytes(os.urandom(nbytes), "big") & mask
        if r < prime:
            return r


def _check_points(xs: Sequence[int], prime: int) -> None:
    if len(set(xs)) != len(xs):
        raise ConfigurationError("Shamir x-coordinates must be distinct")
    for x in xs:
        if not 0 < x < prime:
            raise ConfigurationError(f"Shamir x-coordinate {x} must be in [1, p)")


def split_with_coefficients(
    secret: int, coefficients: Sequence[int], xs: Sequence[int], prime: int = PRIME
) -> list[int]:
    """Evaluate ``secret + c1 x + ... + c_{t-1} x^{t-1}`` at each ``x`` (Horner, mod prime).

    Deterministic building block of :func:`split`; exposed so tests can enumerate
    every polynomial of a tiny field.
    """
    if not 0 <= secret < prime:
        raise ConfigurationError("secret must be in [0, p)")
    _check_points(xs, prime)
    poly = [secret, *coefficients]
    out = []
    for x in xs:
        acc = 0
        for c in reversed(poly):
            acc = (acc * x + c) % prime
        out.append(acc)
    return out


def split(secret: int, threshold: int, xs: Sequence[int], prime: int = PRIME) -> list[int]:
    """Split ``secret`` into ``len(xs)`` shares, any ``threshold`` of which reconstruct it."""
    if not 1 <= threshold <= len(xs):
        raise ConfigurationError(f"threshold {threshold} must be in [1, {len(xs)}]")
    coeffs = [random_field_element(prime) for _ in range(threshold - 1)]
    return split_with_coefficients(secret, coeffs, xs, prime)


@lru_cache(maxsize=4096)
def _lagrange_at_zero(xs: tuple[int, ...], prime: int) -> tuple[int, ...]:
    lams = []
    for i, xi in enumerate(xs):
        num = 1
        den = 1
        for j, xj in enumerate(xs):
            if i != j:
                num = num * xj % prime
                den = den * (xj - xi) % prime
        lams.append(num * pow(den, -1, prime) % prime)
    return tuple(lams)


def reconstruct(points: Sequence[tuple[int, int]], threshold: int, prime: int = PRIME) -> int:
    """Lagrange interpolation at 0 from the first ``threshold`` of ``points`` ``(x, y)``.

    Raises :class:`ProtocolViolation` with fewer than ``threshold`` points.
    """
    if len(points) < threshold:
        raise ProtocolViolation(f"need {threshold} shares to reconstruct, got {len(points)}")
    pts = sorted(points)[:threshold]
    xs = tuple(x for x, _ in pts)
    _check_points(xs, prime)
    lams = _lagrange_at_zero(xs, prime)
    return sum(lam * (y % prime) for lam, (_, y) in zip(lams, pts, strict=True)) % prime


def share_to_bytes(y: int) -> bytes:
    """Fixed-width (66-byte) big-endian encoding of a share of GF(2^521 - 1)."""
    return y.to_bytes(SHARE_BYTES, "big")


def bytes_to_share(raw: bytes) -> int:
    """Inverse of :func:`share_to_bytes`; refuses anything that is not a field element."""
    if not isinstance(raw, bytes) or len(raw) != SHARE_BYTES:
        raise ProtocolViolation(f"a share is {SHARE_BYTES} bytes")
    y = int.from_bytes(raw, "big")
    if y >= PRIME:
        raise ProtocolViolation("share is not a field element")
    return y
