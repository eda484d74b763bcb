"""Shamir secret sharing: reconstruction from any t shares, secrecy below t."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bract.secagg import shamir
from bract.secagg.errors import ConfigurationError, ProtocolViolation


@settings(max_examples=40, deadline=None)
@given(
    secret=st.integers(0, 2**256 - 1),
    t=st.integers(1, 8),
    extra=st.integers(0, 6),
    data=st.data(),
)
def test_any_t_shares_reconstruct(secret: int, t: int, extra: int, data) -> None:
    n = t + extra
    xs = data.draw(st.lists(st.integers(1, 2**64), min_size=n, max_size=n, unique=True))
    shares = shamir.split(secret, t, xs)
    points = list(zip(xs, shares, strict=True))
    subset = data.draw(st.permutations(points))[:t]
    assert shamir.reconstruct(subset, t) == secret
    with pytest.raises(ProtocolViolation, match="need"):
        shamir.reconstruct(subset[: t - 1], t)


@pytest.mark.parametrize("prime,n", [(7, 4), (11, 4)])
@pytest.mark.parametrize("t", [1, 2, 3])
def test_exhaustive_tiny_field(prime: int, n: int, t: int) -> None:
    """Over GF(p), enumerate every secret and every polynomial of degree t - 1.

    * every t-subset of shares reconstructs the secret;
    * for every (t-1)-subset of holders, the joint distribution of their shares
      is uniform over GF(p)^(t-1) and identical for every secret (perfect secrecy).
    """
    xs = list(range(1, n + 1))
    views: dict[tuple[int, ...], dict[int, Counter]] = {
        s: {} for s in itertools.combinations(range(n), t - 1)
    }
    for secret in range(prime):
        for coeffs in itertools.product(range(prime), repeat=t - 1):
            ys = shamir.split_with_coefficients(secret, coeffs, xs, prime)
            for sub in itertools.combinations(range(n), t):
                pts = [(xs[i], ys[i]) for i in sub]
                assert shamir.reconstruct(pts, t, prime) == secret
            for sub in views:
                views[sub].setdefault(secret, Counter())[tuple(ys[i] for i in sub)] += 1
    for per_secret in views.values():
        first = per_secret[0]
        # uniform: each of the p^(t-1) share tuples appears exactly once per secret
        assert len(first) == prime ** (t - 1)
        assert set(first.values()) == {1}
        for secret in range(prime):
            assert per_secret[secret] == first


def test_split_uses_fresh_randomness() -> None:
    a = shamir.split(42, 3, [1, 2, 3])
    b = shamir.split(42, 3, [1, 2, 3])
    assert a != b  # probability of equality is 2^-1042


def test_bad_points_and_threshold() -> None:
    with pytest.raises(ConfigurationError, match="distinct"):
        shamir.split(1, 2, [1, 1, 2])
    with pytest.raises(ConfigurationError, match="x-coordinate"):
        shamir.split(1, 2, [0, 1, 2])
    with pytest.raises(ConfigurationError, match="threshold"):
        shamir.split(1, 4, [1, 2, 3])
    with pytest.raises(ConfigurationError, match="node id"):
        shamir.x_coordinate(-1)


def test_share_bytes_roundtrip_and_rejects() -> None:
    y = shamir.PRIME - 1
    assert shamir.bytes_to_share(shamir.share_to_bytes(y)) == y
    with pytest.raises(ProtocolViolation):
        shamir.bytes_to_share(b"\x00" * 65)
    with pytest.raises(ProtocolViolation, match="field element"):
        shamir.bytes_to_share(b"\xff" * shamir.SHARE_BYTES)


def test_random_field_element_in_range() -> None:
    vals = [shamir.random_field_element(11) for _ in range(2000)]
    assert set(vals) == set(range(11))
