"""Shared helpers for the bract.privacy tests: an independent PLD reference, small models."""

from __future__ import annotations

import dp_accounting as dpa
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bract.data import synthetic_chest_xray
from bract.models import ChestCNN

#: The warnings Opacus and torch give on every DP-SGD step that are expected here
#: (bract's own CSPRNG noise replaces Opacus's secure_mode; hooks on a model whose input
#: needs no gradient; RDP's largest order); a test module's ``pytestmark``.
DP_WARNINGS = [
    pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning"),
    pytest.mark.filterwarnings("ignore:Secure RNG turned off:UserWarning"),
    pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha:UserWarning"),
]

#: The tight reference discretization named in DESIGN.md.
PLD_REFERENCE_DISCRETIZATION = 1e-4


def pld_reference(
    history: list[tuple[float, float, int]],
    delta: float,
    discretization: float = PLD_REFERENCE_DISCRETIZATION,
) -> float:
    """dp_accounting PLD epsilon of ``(sigma, q, steps)`` runs, written independently of bract."""
    acc = dpa.pld.PLDAccountant(value_discretization_interval=discretization)
    for sigma, q, steps in history:
        acc.compose(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(sigma)), steps)
    return float(acc.get_epsilon(delta))


def small_cnn(seed: int = 0) -> nn.Module:
    """A ChestCNN for 28x28 images, small enough to train with DP in seconds on CPU."""
    torch.manual_seed(seed)
    return ChestCNN(image_size=28, channels=(8, 16), hidden=32)


def chest_tensors(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` synthetic 28x28 chest X-rays and labels as tensors."""
    x, y = synthetic_chest_xray(n, image_size=28, seed=seed)
    return torch.from_numpy(x), torch.from_numpy(y)


def chest_loader(n: int, batch_size: int, seed: int = 0) -> DataLoader:
    """A DataLoader over ``n`` synthetic X-rays (expected Poisson batch size ``batch_size``)."""
    x, y = chest_tensors(n, seed)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)
