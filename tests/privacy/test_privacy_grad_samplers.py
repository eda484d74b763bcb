"""bract's Conv2d and GroupNorm per-sample gradients equal Opacus's and per-example autograd."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus.grad_sample.conv import compute_conv_grad_sample
from opacus.grad_sample.grad_sample_module import GradSampleHooks
from opacus.grad_sample.group_norm import compute_group_norm_grad_sample
from torch import nn

from bract.privacy import grad_samplers
from bract.privacy.grad_samplers import (
    conv2d_grad_sample,
    folded_conv2d_grad_sample,
    group_norm_grad_sample,
    group_norm_grad_sample_from_stats,
)


def _per_example_autograd(layer: nn.Module, x: torch.Tensor, g: torch.Tensor) -> dict:
    """Example b's gradient alone: d/dtheta <layer(x_b), g_b>."""
    out = {p: [] for p in layer.parameters() if p.requires_grad}
    for b in range(len(x)):
        layer.zero_grad()
        (layer(x[b:b + 1]) * g[b:b + 1]).sum().backward()
        for p in out:
            out[p].append(p.grad.clone())
    return {p: torch.stack(v) for p, v in out.items()}


@st.composite
def conv_cases(draw):
    groups = draw(st.sampled_from([1, 1, 2]))
    c_in = groups * draw(st.integers(1, 3))
    c_out = groups * draw(st.integers(1, 3))
    kernel = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    stride = draw(st.integers(1, 2))
    padding = draw(st.integers(0, 2))
    dilation = draw(st.integers(1, 2))
    side = draw(st.integers(max(kernel) * dilation, 9))
    batch = draw(st.integers(1, 5))
    bias = draw(st.booleans())
    seed = draw(st.integers(0, 2**16))
    return groups, c_in, c_out, kernel, stride, padding, dilation, side, batch, bias, seed


@settings(max_examples=60, deadline=None)
@given(case=conv_cases())
def test_per_example_gradients_equal_autograd_and_opacus(case) -> None:
    groups, c_in, c_out, kernel, stride, padding, dilation, side, batch, bias, seed = case
    torch.manual_seed(seed)
    layer = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding, dilation=dilation,
                      groups=groups, bias=bias)
    x = torch.randn(batch, c_in, side, side + 1)
    g = torch.randn(batch, *layer(x).shape[1:])
    dispatched = conv2d_grad_sample(layer, [x], g)
    folded = folded_conv2d_grad_sample(layer, [x], g)
    theirs = compute_conv_grad_sample(layer, [x], g)
    reference = _per_example_autograd(layer, x, g)
    assert set(dispatched) == set(folded) == set(reference) == set(theirs)
    for p, expected in reference.items():
        for ours in (dispatched, folded):
            assert ours[p].shape == (batch, *p.shape)
            torch.testing.assert_close(ours[p], expected, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(ours[p], theirs[p], rtol=1e-4, atol=1e-5)


@settings(max_examples=60, deadline=None)
@given(groups=st.integers(1, 3), per_group=st.integers(1, 3), batch=st.integers(1, 5),
       spatial=st.lists(st.integers(2, 6), min_size=1, max_size=2),
       scale=st.sampled_from([1e-3, 1.0, 1e3]), seed=st.integers(0, 2**16))
def test_group_norm_per_example_gradients_equal_autograd_and_opacus(
    groups, per_group, batch, spatial, scale, seed
) -> None:
    torch.manual_seed(seed)
    channels = groups * per_group
    layer = nn.GroupNorm(groups, channels)
    nn.init.normal_(layer.weight)  # away from the initial (1, 0), so the weight matters
    nn.init.normal_(layer.bias)
    x = scale * torch.randn(batch, channels, *spatial) + torch.randn(1, channels, *spatial)
    g = torch.randn(batch, channels, *spatial)
    ours = group_norm_grad_sample(layer, [x], g)
    # The rule book-keeping uses: the statistics the forward pass computed and saved.
    node = layer(x.clone().requires_grad_()).grad_fn
    from_stats = group_norm_grad_sample_from_stats(
        layer, x, g, node._saved_result1, node._saved_result2)
    reference = _per_example_autograd(layer, x, g)
    assert set(ours) == set(reference) == set(from_stats)
    theirs = compute_group_norm_grad_sample(layer, [x], g)
    for p, expected in reference.items():
        assert ours[p].shape == from_stats[p].shape == (batch, *p.shape)
        torch.testing.assert_close(ours[p], expected, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ours[p], theirs[p], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(from_stats[p], expected, rtol=1e-4, atol=1e-4)


@settings(max_examples=40, deadline=None)
@given(groups=st.integers(1, 3), per_group=st.integers(1, 3), batch=st.integers(1, 9),
       spatial=st.lists(st.integers(2, 7), min_size=1, max_size=2),
       chunk_entries=st.integers(1, 600), seed=st.integers(0, 2**16))
def test_group_norm_from_stats_is_the_same_bits_whatever_the_chunk(
    groups, per_group, batch, spatial, chunk_entries, seed
) -> None:
    """Taking the examples a few at a time (a cache-sized temporary) changes nothing:
    every chunk size, from one example per chunk to the whole batch, gives exactly
    the same per-example gradients."""
    torch.manual_seed(seed)
    channels = groups * per_group
    layer = nn.GroupNorm(groups, channels)
    x = torch.randn(batch, channels, *spatial) * 3 + 1
    g = torch.randn(batch, channels, *spatial)
    node = layer(x.clone().requires_grad_()).grad_fn
    whole = group_norm_grad_sample_from_stats(
        layer, x, g, node._saved_result1, node._saved_result2, chunk_entries=1 << 30)
    chunked = group_norm_grad_sample_from_stats(
        layer, x, g, node._saved_result1, node._saved_result2, chunk_entries=chunk_entries)
    assert set(whole) == set(chunked) == {layer.weight, layer.bias}
    for p in whole:
        assert torch.equal(whole[p], chunked[p])


def test_group_norm_frozen_weight_and_empty_batch() -> None:
    layer = nn.GroupNorm(2, 4)
    layer.weight.requires_grad_(False)
    x, g = torch.randn(3, 4, 5), torch.randn(3, 4, 5)
    assert list(group_norm_grad_sample(layer, [x], g)) == [layer.bias]
    empty = group_norm_grad_sample(nn.GroupNorm(2, 4), [x[:0]], g[:0])
    assert [v.shape for v in empty.values()] == [(0, 4), (0, 4)]


def test_frozen_parameters_get_no_gradient_and_empty_batches_get_zeros() -> None:
    layer = nn.Conv2d(2, 3, 3, padding=1)
    layer.bias.requires_grad_(False)
    x, g = torch.randn(4, 2, 5, 5), torch.randn(4, 3, 5, 5)
    for sampler in (conv2d_grad_sample, folded_conv2d_grad_sample):
        assert list(sampler(layer, [x], g)) == [layer.weight]
        for empty_layer in (nn.Conv2d(2, 3, 3), nn.Conv2d(1, 3, 3)):  # folded, im2col
            empty = sampler(empty_layer, [x[:0, :empty_layer.in_channels]],
                            torch.randn(0, 3, 3, 3))
            assert set(empty) == set(empty_layer.parameters())
            assert all(v.shape[0] <= 1 and not v.any() for v in empty.values())


@pytest.mark.parametrize(("layer", "shape", "im2col"), [
    # 9-value window, 1.8 MB unfolded: the first conv of the 28x28 ChestCNN
    (nn.Conv2d(1, 16, 3, padding=1), (64, 1, 28, 28), True),
    # 144-value window: the second conv of the ChestCNN
    (nn.Conv2d(16, 32, 3, padding=1), (64, 16, 14, 14), False),
    # 9-value window but 38 MB unfolded: the first conv of the 128x128 ChestCNN
    (nn.Conv2d(1, 16, 3, padding=1), (64, 1, 128, 128), False),
    # grouped: 2 channels per group x 4 = 8 values
    (nn.Conv2d(4, 4, 2, groups=2), (8, 4, 6, 6), True),
])
def test_small_window_convolutions_use_im2col_and_others_the_folded_rule(
    layer, shape, im2col, monkeypatch
) -> None:
    calls = []

    def opacus(*args):
        calls.append("im2col")
        return compute_conv_grad_sample(*args)

    monkeypatch.setattr(grad_samplers, "compute_conv_grad_sample", opacus)
    x = torch.randn(shape)
    g = torch.randn(layer(x[:1]).shape[1:]).expand(shape[0], -1, -1, -1).contiguous()
    conv2d_grad_sample(layer, [x], g)
    assert calls == (["im2col"] if im2col else [])


@pytest.mark.parametrize("layer", [
    nn.Conv2d(2, 3, 3, padding="same"),
    nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"),
])
def test_layers_it_does_not_cover_go_to_opacus(layer, monkeypatch) -> None:
    calls = []

    def opacus(*args):
        calls.append(args[0])
        return compute_conv_grad_sample(*args)

    monkeypatch.setattr(grad_samplers, "compute_conv_grad_sample", opacus)
    x, g = torch.randn(2, 2, 6, 6), torch.randn(2, 3, 6, 6)
    conv2d_grad_sample(layer, [x], g)
    assert calls == [layer]


def test_install_and_restore_switch_what_opacus_calls() -> None:
    was = grad_samplers.installed()
    try:
        grad_samplers.install()
        assert GradSampleHooks.GRAD_SAMPLERS[nn.Conv2d] is conv2d_grad_sample
        assert GradSampleHooks.GRAD_SAMPLERS[nn.GroupNorm] is group_norm_grad_sample
        assert grad_samplers.installed()
        grad_samplers.restore_opacus()
        assert GradSampleHooks.GRAD_SAMPLERS[nn.Conv2d] is compute_conv_grad_sample
        assert GradSampleHooks.GRAD_SAMPLERS[nn.GroupNorm] is compute_group_norm_grad_sample
        assert not grad_samplers.installed()
    finally:
        (grad_samplers.install if was else grad_samplers.restore_opacus)()
