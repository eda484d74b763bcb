"""Poisson sampling from a CSPRNG (T17): batches an adversary cannot predict from
torch's seed, with sizes that follow Binomial(n, q)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats
from torch.utils.data import DataLoader, TensorDataset

from bract.privacy.sampling import SecurePoissonSampler, key_from_seed, secure_poisson_loader


def test_the_same_public_torch_seed_gives_different_batches() -> None:
    """Opacus's sampler is a function of torch's generator; this one is not."""
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        np.random.seed(0)
        runs.append(list(SecurePoissonSampler(500, 0.1, steps=5)))
    assert runs[0] != runs[1]


def test_a_fixed_key_repeats_and_another_key_does_not() -> None:
    key = key_from_seed(3, "hospital-0", 2)
    assert list(SecurePoissonSampler(300, 0.2, 4, key)) == list(SecurePoissonSampler(
        300, 0.2, 4, key))
    assert list(SecurePoissonSampler(300, 0.2, 4, key)) != list(SecurePoissonSampler(
        300, 0.2, 4, key_from_seed(3, "hospital-1", 2)))


def test_batch_sizes_follow_binomial_n_q() -> None:
    """Over 2000 steps, the batch sizes' distribution matches Binomial(n, q) (chi-square
    over bins of at least 5 expected counts; a fresh key each run, so p < 1e-6 flags a
    real departure, not bad luck, with probability 1 - 1e-6)."""
    n, q, steps = 400, 0.05, 2000
    sizes = np.array([len(b) for b in SecurePoissonSampler(n, q, steps)])
    lo, hi = int(stats.binom.ppf(0.005, n, q)), int(stats.binom.ppf(0.995, n, q))
    edges = [-0.5, *np.arange(lo, hi + 1) + 0.5, n + 0.5]
    observed, _ = np.histogram(sizes, bins=edges)
    cdf = stats.binom.cdf(np.floor(np.array(edges[1:])), n, q)
    expected = np.diff(np.concatenate([[0.0], cdf])) * steps
    assert expected.min() >= 5
    assert stats.chisquare(observed, expected * observed.sum() / expected.sum()).pvalue > 1e-6
    assert abs(sizes.mean() - n * q) < 6 * math.sqrt(n * q * (1 - q) / steps)


def test_every_record_is_sampled_at_rate_q_independently_of_its_index() -> None:
    n, q, steps = 50, 0.3, 3000
    counts = np.zeros(n)
    for batch in SecurePoissonSampler(n, q, steps):
        counts[batch] += 1
    assert stats.chisquare(counts).pvalue > 1e-6
    assert abs(counts.sum() / (n * steps) - q) < 6 * math.sqrt(q * (1 - q) / (n * steps))


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 300), q=st.floats(0.001, 1.0), steps=st.integers(1, 20))
def test_batches_are_sorted_distinct_indices_in_range(n, q, steps) -> None:
    batches = list(SecurePoissonSampler(n, q, steps))
    assert len(batches) == steps
    for b in batches:
        assert b == sorted(set(b)) and all(0 <= i < n for i in b)
    if q == 1.0:
        assert all(b == list(range(n)) for b in batches)


def test_the_loader_keeps_rate_steps_and_empty_batches() -> None:
    from opacus.data_loader import DPDataLoader

    data = TensorDataset(torch.randn(40, 3), torch.zeros(40, dtype=torch.long))
    dp = DPDataLoader.from_data_loader(DataLoader(data, batch_size=2))
    secure = secure_poisson_loader(dp)
    assert isinstance(secure.batch_sampler, SecurePoissonSampler)
    assert secure.batch_sampler.sample_rate == pytest.approx(2 / 40)
    assert len(secure) == len(dp)
    shapes = [tuple(x.shape[1:]) for x, _ in secure]
    assert set(shapes) == {(3,)}  # empty batches keep the feature shape


@pytest.mark.parametrize(("args", "needle"), [
    ((0, 0.1, 1), "num_samples"), ((5, 0.0, 1), "sample_rate"), ((5, 1.5, 1), "sample_rate"),
    ((5, 0.1, 0), "steps"),
])
def test_bad_settings_are_refused(args, needle) -> None:
    with pytest.raises(ValueError, match=needle):
        SecurePoissonSampler(*args)
