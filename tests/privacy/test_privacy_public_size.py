"""A public size bound (docs/privacy.md, "What leaves a hospital"): what a hospital
releases (sample rate, steps, noise, FedAvg weight) is a function of the bound it
declares, not of its exact number of records; the bound is never below the count."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bract.privacy.accounting import PrivacyError
from bract.privacy.training import PrivateTrainer


def _trainer(n: int, bound: int | None, batch: int = 8) -> PrivateTrainer:
    model = nn.Linear(3, 2)
    data = TensorDataset(torch.randn(n, 3), torch.arange(n) % 2)
    return PrivateTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1),
                          DataLoader(data, batch_size=batch), noise_multiplier=1.0,
                          max_grad_norm=1.0, delta=1e-5, public_size=bound)


@settings(max_examples=20, deadline=None)
@given(a=st.integers(2, 120), b=st.integers(2, 120), extra=st.integers(0, 50))
def test_hospitals_with_the_same_bound_release_the_same_round(a, b, extra) -> None:
    bound = max(a, b) + extra
    first, second = _trainer(a, bound), _trainer(b, bound)
    assert first.planned_event(1) == second.planned_event(1)
    outcome = first.train_round(1)
    assert outcome.num_examples == bound  # the FedAvg weight is the bound too
    assert outcome.event == second.planned_event(1)


def test_the_sampler_keeps_the_bound_s_rate_so_the_accounting_holds() -> None:
    """Each record is sampled at q = 1 / ceil(N / B) from the bound N: the rate the
    ledger records (the expected batch, q * n, is smaller than B)."""
    trainer = _trainer(40, 400)
    q = 1 / math.ceil(400 / 8)
    assert trainer.planned_event(1).sample_rate == pytest.approx(q)
    assert trainer.planned_event(1).steps == math.ceil(400 / 8)
    seen: list[int] = []
    trainer.model.register_forward_hook(lambda m, i, o: seen.append(len(i[0])))
    trainer.train_round(1)
    assert len(seen) == 50 and sum(seen) < 40 * q * 50 + 6 * math.sqrt(40 * q * 50)


@pytest.mark.parametrize("bound", [39, 0, True, 40.5])
def test_a_bound_below_the_count_or_not_an_integer_is_refused(bound) -> None:
    with pytest.raises(PrivacyError, match="public size bound"):
        _trainer(40, bound)
