"""ChestCNN: shapes, size, and Opacus compatibility."""

from __future__ import annotations

import pytest
import torch
from opacus.grad_sample import GradSampleModule
from opacus.validators import ModuleValidator
from torch import nn

from bract.models import ChestCNN, count_parameters

# Opacus hooks warn when inputs do not require grad; harmless for these checks
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")


@pytest.mark.parametrize("image_size", [28, 128])
def test_opacus_validator_accepts_chest_cnn(image_size: int) -> None:
    model = ChestCNN(image_size=image_size)
    assert ModuleValidator.validate(model, strict=False) == []
    ModuleValidator.validate(model, strict=True)  # raises on any error


def test_opacus_validator_rejects_batchnorm_variant() -> None:
    model = ChestCNN(image_size=28)
    model.features[1] = nn.BatchNorm2d(16)  # sanity: the validator does catch BatchNorm
    assert ModuleValidator.validate(model, strict=False)
    with pytest.raises(Exception, match="BatchNorm"):
        ModuleValidator.validate(model, strict=True)


def test_default_parameter_count_is_about_seven_million() -> None:
    n = count_parameters(ChestCNN())
    assert 6_500_000 <= n <= 7_500_000
    # the first dense layer dominates by design (memory benchmark)
    assert ChestCNN().classifier[1].weight.numel() == 32 * 32 * 32 * 216


@pytest.mark.parametrize(
    ("image_size", "in_channels", "num_classes"), [(28, 1, 3), (32, 3, 5), (128, 1, 3), (16, 1, 2)]
)
def test_forward_shape(image_size: int, in_channels: int, num_classes: int) -> None:
    model = ChestCNN(image_size=image_size, in_channels=in_channels, num_classes=num_classes)
    out = model(torch.randn(4, in_channels, image_size, image_size))
    assert out.shape == (4, num_classes)
    assert torch.isfinite(out).all()


def test_group_norm_groups_divide_channels() -> None:
    model = ChestCNN(image_size=28, channels=(6, 12))
    norms = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert len(norms) == 2
    for gn in norms:
        assert gn.num_channels % gn.num_groups == 0
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 3)


@pytest.mark.parametrize("bad", [30, 127, 2, 0, -4])
def test_image_size_not_divisible_by_four_is_rejected(bad: int) -> None:
    with pytest.raises(ValueError, match="multiple of 4"):
        ChestCNN(image_size=bad)


def test_per_sample_gradients_with_opacus() -> None:
    torch.manual_seed(0)
    model = GradSampleModule(ChestCNN(image_size=28))
    x = torch.randn(5, 1, 28, 28)
    y = torch.tensor([0, 1, 2, 0, 1])
    nn.functional.cross_entropy(model(x), y).backward()
    for p in model.parameters():
        assert p.grad_sample is not None
        assert p.grad_sample.shape == (5, *p.shape)
