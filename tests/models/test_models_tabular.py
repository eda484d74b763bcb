"""TabularMLP and count_parameters."""

from __future__ import annotations

import pytest
import torch
from opacus.grad_sample import GradSampleModule
from opacus.validators import ModuleValidator
from torch import nn

from bract.models import TabularMLP, count_parameters

# Opacus hooks warn when inputs do not require grad; harmless for these checks
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")


def test_logistic_regression_is_a_single_linear_layer() -> None:
    model = TabularMLP(30, 2)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 1
    assert count_parameters(model) == 30 * 2 + 2
    assert model(torch.randn(7, 30)).shape == (7, 2)


def test_hidden_layer_mlp() -> None:
    model = TabularMLP(30, 3, hidden=16)
    assert count_parameters(model) == 30 * 16 + 16 + 16 * 3 + 3
    assert model(torch.randn(7, 30)).shape == (7, 3)


@pytest.mark.parametrize("hidden", [None, 8])
def test_regression_head_outputs_one_column(hidden: int | None) -> None:
    model = TabularMLP(10, 1, hidden=hidden)
    assert model(torch.randn(5, 10)).shape == (5, 1)


@pytest.mark.parametrize("hidden", [None, 8])
def test_opacus_compatible(hidden: int | None) -> None:
    model = TabularMLP(10, 2, hidden=hidden)
    ModuleValidator.validate(model, strict=True)
    gsm = GradSampleModule(model)
    nn.functional.cross_entropy(gsm(torch.randn(4, 10)), torch.tensor([0, 1, 1, 0])).backward()
    for p in gsm.parameters():
        assert p.grad_sample.shape == (4, *p.shape)


@pytest.mark.parametrize(("args", "kwargs"), [((0, 2), {}), ((3, 0), {}), ((3, 2), {"hidden": 0})])
def test_bad_arguments(args: tuple[int, int], kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        TabularMLP(*args, **kwargs)


def test_count_parameters_trainable_only() -> None:
    model = TabularMLP(4, 2, hidden=3)
    total = count_parameters(model)
    model.net[0].weight.requires_grad_(False)
    assert count_parameters(model) == total
    assert count_parameters(model, trainable_only=True) == total - 12
