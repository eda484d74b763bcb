"""Fixed-point encoding: exact ring sums within the stated bound, headroom, bad input."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from bract.secagg.crypto import STREAM_BLOCK, keystream
from bract.secagg.encoding import RING_DTYPES, EncodingConfig, decode_sum, encode
from bract.secagg.errors import EncodingError


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 30),
    d=st.integers(1, 16),
    frac_bits=st.integers(0, 30),
    clip=st.sampled_from([0.5, 1.0, 3.0, 100.0]),
    data=st.data(),
)
def test_sum_decodes_within_bound(n: int, d: int, frac_bits: int, clip: float, data) -> None:
    cfg = EncodingConfig(clip=clip, frac_bits=frac_bits, max_weight=1000)
    ring = cfg.ring_bits_for(n)
    total = np.zeros(d + 1, dtype=RING_DTYPES[ring])
    ref = np.zeros(d)
    weights = 0
    for _ in range(n):
        x = data.draw(hnp.arrays(np.float64, d, elements=st.floats(-clip, clip)))
        w = data.draw(st.integers(0, 1000))
        total += encode(x, w, cfg, ring)
        ref += w * x
        weights += w
    s, wt = decode_sum(total, ring, frac_bits)
    assert wt == weights
    assert np.all(np.abs(s - ref) <= cfg.sum_error_bound(weights) + 1e-9 * clip * weights)


def test_extreme_values_do_not_wrap() -> None:
    """All clients at +clip / -clip with the maximum weight: the worst case of the headroom."""
    cfg = EncodingConfig(clip=1.0, frac_bits=12, max_weight=2**10)
    n = 7
    ring = cfg.ring_bits_for(n)
    assert ring == 32
    for sign in (1.0, -1.0):
        total = np.zeros(3, dtype=RING_DTYPES[ring])
        for _ in range(n):
            total += encode(np.full(2, sign), cfg.max_weight, cfg, ring)
        s, w = decode_sum(total, ring, cfg.frac_bits)
        assert w == n * cfg.max_weight
        assert np.allclose(s, sign * n * cfg.max_weight)


def test_headroom_checked_with_clear_error() -> None:
    cfg = EncodingConfig(clip=1.0, frac_bits=16, max_weight=2**16, ring_bits=32)
    with pytest.raises(EncodingError, match="would wrap"):
        cfg.ring_bits_for(10)
    big = EncodingConfig(clip=2.0**10, frac_bits=40, max_weight=2**20)
    with pytest.raises(EncodingError, match=r"needs \d+ bits > 64"):
        big.ring_bits_for(100)
    # the chosen ring is the smallest with room, and its bound is exact
    cfg = EncodingConfig(clip=1.0, frac_bits=8, max_weight=255)
    n = (2**31 - 1) // (255 * 256)
    assert cfg.ring_bits_for(n) == 32
    assert cfg.ring_bits_for(n + 1) == 64


def test_stochastic_rounding_is_unbiased() -> None:
    cfg = EncodingConfig(clip=1.0, frac_bits=0, max_weight=1, ring_bits=32)
    x = np.full(200_000, 0.3)
    q = encode(x, 1, cfg, 32)[:-1].view(np.int32)
    assert set(np.unique(q)) == {0, 1}
    # mean 0.3, std of the mean sqrt(0.21 / 2e5) ~ 1e-3: allow 6 sigma
    assert abs(q.mean() - 0.3) < 6e-3
    neg = encode(-x, 1, cfg, 32)[:-1].view(np.int32)
    assert abs(neg.mean() + 0.3) < 6e-3


@pytest.mark.parametrize(
    "vector,match",
    [
        (np.zeros(3, dtype=np.float32), "length 3"),
        (np.zeros(4, dtype=np.int64), "dtype"),
        (np.zeros((2, 2)), "1-D"),
        (np.array([0.0, np.nan, 0.0, 0.0]), "NaN/Inf"),
        (np.array([0.0, np.inf, 0.0, 0.0]), "NaN/Inf"),
        (np.array([0.0, 1.5, 0.0, 0.0]), "beyond the clipping range"),
        ([0.0, 0.0, 0.0, 0.0], "numpy array"),
    ],
)
def test_bad_vectors_refused(vector, match: str) -> None:
    cfg = EncodingConfig()
    with pytest.raises(EncodingError, match=match):
        encode(vector, 1, cfg, 64, dim=4)


@pytest.mark.parametrize("weight", [-1, 2**16 + 1, 1.5, True])
def test_bad_weights_refused(weight) -> None:
    with pytest.raises(EncodingError, match="weight"):
        encode(np.zeros(4), weight, EncodingConfig(), 64)


def test_opt_in_clipping() -> None:
    cfg = EncodingConfig(clip=1.0, frac_bits=20)
    y = encode(np.array([5.0, -5.0]), 1, cfg, 64, clip_out_of_range=True)
    s, _ = decode_sum(y, 64, 20)
    assert np.allclose(s, [1.0, -1.0])


@pytest.mark.parametrize(
    "kwargs", [{"clip": 0.0}, {"clip": float("nan")}, {"frac_bits": -1}, {"frac_bits": 41},
               {"max_weight": 0}, {"ring_bits": 48}, {"clip": 2.0**20, "frac_bits": 40}]
)
def test_bad_config(kwargs) -> None:
    with pytest.raises(EncodingError):
        EncodingConfig(**kwargs)


def _whole_vector_reference(x: np.ndarray, weight: int, cfg: EncodingConfig, bits: int,
                            key: bytes) -> np.ndarray:
    """The encoding formula on the whole vector at once, with the rounding uniforms
    from ``keystream(key)``: w * (floor(clip(x) 2^f) + [u < frac]), then the weight."""
    xs = np.clip(x.astype(np.float64), -cfg.clip, cfg.clip) * 2.0**cfg.frac_bits
    low = np.floor(xs)
    words = np.frombuffer(keystream(key, 8 * x.size), dtype=np.uint64)
    u = (words >> np.uint64(11)).astype(np.float64) * 2.0**-53
    q = (low.astype(np.int64) + (u < xs - low)) * np.int64(weight)
    return np.append(q.astype(np.uint64).astype(RING_DTYPES[bits]), RING_DTYPES[bits](weight))


@settings(max_examples=30, deadline=None)
@given(d=st.sampled_from([0, 1, 7, STREAM_BLOCK - 1, STREAM_BLOCK, STREAM_BLOCK + 5]),
       bits=st.sampled_from([32, 64]), dtype=st.sampled_from([np.float32, np.float64]),
       weight=st.integers(0, 200), seed=st.integers(0, 2**16))
def test_block_wise_encoding_is_the_formula_on_the_whole_vector(d, bits, dtype, weight,
                                                                 seed) -> None:
    # Property: for the same rounding key, encode() (block by block) gives exactly
    # the whole-vector formula, element for element, including past block borders
    # and for values that had to be clipped.
    cfg = EncodingConfig(clip=2.0, frac_bits=12, max_weight=256)
    x = np.random.default_rng(seed).uniform(-3, 3, d).astype(dtype)
    key = bytes([seed % 256]) * 32
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr("bract.secagg.encoding.random_bytes", lambda n: key[:n])
        ours = encode(x, weight, cfg, bits, clip_out_of_range=True)
    expected = _whole_vector_reference(x, weight, cfg, bits, key)
    assert ours.dtype == expected.dtype and np.array_equal(ours, expected)


@settings(max_examples=60, deadline=None)
@given(size=st.integers(1, 300), at=st.integers(0, 299),
       bad=st.sampled_from([np.nan, np.inf, -np.inf]),
       dtype=st.sampled_from([np.float32, np.float64]), clip=st.booleans())
def test_any_nan_or_inf_anywhere_is_refused(size, at, bad, dtype, clip) -> None:
    """One NaN or infinity at any position (even with clipping of out-of-range values
    on, and whatever the other values) is refused by name: it is never clipped or
    rounded into the sum."""
    x = np.linspace(-0.5, 0.5, size).astype(dtype)
    x[at % size] = bad
    with pytest.raises(EncodingError, match="1 NaN/Inf"):
        encode(x, 1, EncodingConfig(), 32, clip_out_of_range=clip)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 20), t=st.integers(1, 5), data=st.data())
def test_totals_decode_as_plain_sums_within_the_stated_bound(n: int, t: int, data) -> None:
    """Totals (summed without the weight) anywhere in [-clip * W, clip * W], the ends
    included, from clients of any weight: the decoded sum is their plain sum within
    ``sum_error_bound(W_total, n)``, in the smallest ring with headroom (no wrap)."""
    cfg = EncodingConfig(clip=2.0, frac_bits=12, max_weight=50)
    ring = cfg.ring_bits_for(n)
    edge = cfg.totals_range
    total = np.zeros(2 + t + 1, dtype=RING_DTYPES[ring])
    ref = np.zeros(t)
    weights = 0
    for _ in range(n):
        z = data.draw(hnp.arrays(np.float64, t, elements=st.one_of(
            st.sampled_from([edge, -edge]), st.floats(-edge, edge))))
        w = data.draw(st.integers(0, 50))
        total += encode(np.full(2, 1.5), w, cfg, ring, dim=2 + t, totals=z)
        ref += z
        weights += w
    s, wt = decode_sum(total, ring, cfg.frac_bits)
    assert wt == weights
    assert np.allclose(s[:2], 1.5 * weights, rtol=0, atol=cfg.sum_error_bound(weights))
    assert np.all(np.abs(s[2:] - ref) <= cfg.sum_error_bound(weights, n))


def test_a_total_beyond_the_range_is_refused_even_when_clipping_is_allowed() -> None:
    cfg = EncodingConfig(clip=2.0, frac_bits=12, max_weight=50)
    beyond = np.array([0.0, np.nextafter(100.0, 200.0)])
    with pytest.raises(EncodingError, match="never clipped") as err:
        encode(np.zeros(1), 3, cfg, 64, totals=beyond, clip_out_of_range=True)
    assert "range [-100, 100]" in err.value.public_reason
    encode(np.zeros(1), 3, cfg, 64, totals=np.array([100.0, -100.0]))  # the ends are in
