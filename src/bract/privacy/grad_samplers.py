"""Per-sample gradients of ``nn.Conv2d`` (without im2col) and ``nn.GroupNorm``, for Opacus.

DP-SGD clips every example's gradient, so Opacus needs each example's gradient
(hooks mode) or its norm (ghost clipping, which gets a convolution's norm from
its per-sample gradient, layer by layer). Opacus 1.6 computes a convolution's
per-sample gradient by unfolding the layer's input (im2col): for the second
convolution of the 128x128 ChestCNN at batch 64 that is a 151 MB buffer, the
largest single allocation of a DP-SGD step, and 2-4x slower on the CPU than
needed.

:func:`conv2d_grad_sample` computes the same per-sample gradients as one grouped
convolution backward (``torch.nn.grad.conv2d_weight`` with the batch folded into
the groups): example ``b``'s weight gradient is the correlation of its input with
its output gradient, and nothing larger than the layer's input and output
gradient is allocated. The result equals Opacus's to float rounding (tests
compare both, and autograd per example); clipping, noise and accounting are
unchanged, so the privacy guarantee is the one Opacus gives.

:func:`group_norm_grad_sample` gives a ``GroupNorm``'s per-sample gradients with
one temporary the size of the layer's input (the normalised input, as Opacus
recomputes it) instead of two: the product with the output gradient overwrites
it in place before the sum over positions. Faster than Opacus's on the first
GroupNorm of the ChestCNN; same values to float rounding (tested). Book-keeping
clipping, which sees the layer's forward pass, uses
:func:`group_norm_grad_sample_from_stats` instead: the mean and standard deviation
the forward pass computed, and no second normalisation of the input.

:func:`install` registers both with Opacus for every ``nn.Conv2d`` and
``nn.GroupNorm`` in this process (hooks, ghost and book-keeping modes). Where the
convolution rule does not apply (tensors on a GPU, where it has not been measured;
a string padding such as ``"same"``; a padding mode other than zeros) it hands
the layer to Opacus's own sampler unchanged. It does the same, for speed only, where
the grouped convolution is slow and im2col is cheap: a layer whose kernel window
(input channels per group x kernel area) is at most :data:`IM2COL_MAX_WINDOW` values
and whose unfolded input fits in :data:`IM2COL_MAX_BYTES` (the first convolution of
the 28x28 ChestCNN: a 1.8 MB buffer, about 2.4x faster on this CPU). Both give the same
gradients, so the choice changes time and memory only.
"""

from __future__ import annotations

import torch
from opacus.grad_sample.conv import compute_conv_grad_sample
from opacus.grad_sample.group_norm import compute_group_norm_grad_sample
from opacus.grad_sample.utils import register_grad_sampler
from torch import nn
from torch.nn import functional

__all__ = [
    "GROUP_NORM_CHUNK_ENTRIES", "conv2d_grad_sample", "folded_conv2d_grad_sample",
    "group_norm_grad_sample", "group_norm_grad_sample_from_stats", "install", "installed",
    "restore_opacus",
]

_INSTALLED = False

#: Largest kernel window (input channels per group x kernel height x width) for which
#: im2col is used: with so few values per window the batch-folded grouped
#: convolution runs n*c_in tiny groups and is slower than one unfold and a matmul.
IM2COL_MAX_WINDOW = 16
#: Largest unfolded input (bytes) im2col may allocate; above it the folded
#: convolution, which allocates nothing larger than the layer's input, is used.
IM2COL_MAX_BYTES = 16 * 2**20


def _applies(layer: nn.Conv2d, activations: torch.Tensor) -> bool:
    return (
        type(layer) is nn.Conv2d
        and activations.device.type == "cpu"
        and not isinstance(layer.padding, str)
        and layer.padding_mode == "zeros"
    )


def _im2col_is_cheaper(layer: nn.Conv2d, activations: torch.Tensor,
                       backprops: torch.Tensor) -> bool:
    kernel_area = layer.kernel_size[0] * layer.kernel_size[1]
    window = layer.in_channels // layer.groups * kernel_area
    # im2col's buffer: every example's full input window at every output position.
    unfolded = (activations.shape[0] * layer.in_channels * kernel_area
                * backprops.shape[2] * backprops.shape[3] * backprops.element_size())
    return window <= IM2COL_MAX_WINDOW and unfolded <= IM2COL_MAX_BYTES


def conv2d_grad_sample(
    layer: nn.Conv2d, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradients ``{weight: [B, *weight.shape], bias: [B, out]}`` of a
    ``Conv2d`` from its input ``activations[0]`` ``[B, C, H, W]`` and output gradient
    ``backprops`` ``[B, O, H', W']`` (Opacus's grad-sampler signature; Opacus has
    already scaled ``backprops`` for the loss reduction).

    Exactly the per-example gradients autograd would give for each example alone
    (to float rounding); only the parameters that require gradients are returned.
    """
    x = activations[0]
    if not _applies(layer, x) or _im2col_is_cheaper(layer, x, backprops):
        return compute_conv_grad_sample(layer, activations, backprops)
    return folded_conv2d_grad_sample(layer, activations, backprops)


def folded_conv2d_grad_sample(
    layer: nn.Conv2d, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    """:func:`conv2d_grad_sample`'s own rule, whatever the layer's size: the per-example
    gradients as one convolution backward with the batch folded into the groups.
    For a CPU ``Conv2d`` with numeric padding and zero padding mode; equal (to float
    rounding) to autograd's per-example gradients."""
    x = activations[0].to(backprops.dtype)
    n = x.shape[0]
    out: dict[nn.Parameter, torch.Tensor] = {}
    if n == 0:  # an empty Poisson batch: zero gradients, as Opacus returns
        if layer.weight.requires_grad:
            out[layer.weight] = torch.zeros_like(layer.weight).unsqueeze(0)
        if layer.bias is not None and layer.bias.requires_grad:
            out[layer.bias] = torch.zeros_like(layer.bias).unsqueeze(0)
        return out
    if layer.weight.requires_grad:
        c_in, c_out = x.shape[1], backprops.shape[1]
        # Fold the batch into the channels: group (b, g) correlates example b's input
        # channels of layer group g with its output gradient channels of that group.
        weight = torch.nn.grad.conv2d_weight(
            x.reshape(1, n * c_in, *x.shape[2:]),
            (n * c_out, c_in // layer.groups, *layer.kernel_size),
            backprops.reshape(1, n * c_out, *backprops.shape[2:]),
            stride=layer.stride, padding=layer.padding, dilation=layer.dilation,
            groups=n * layer.groups,
        )
        out[layer.weight] = weight.reshape(n, *layer.weight.shape)
    if layer.bias is not None and layer.bias.requires_grad:
        out[layer.bias] = backprops.sum(dim=(2, 3))
    return out


def group_norm_grad_sample(
    layer: nn.GroupNorm, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradients ``{weight: [B, C], bias: [B, C]}`` of a ``GroupNorm`` from
    its input ``activations[0]`` ``[B, C, ...]`` and output gradient ``backprops``
    (Opacus's grad-sampler signature).

    Example b's weight gradient is ``sum over positions of xhat_b * g_b`` per channel
    (``xhat``: the input normalised per example and group, without the affine map),
    its bias gradient ``sum of g_b``: exactly autograd's per-example gradients, to
    float rounding. Only parameters that require gradients are returned.
    """
    x = activations[0]
    n, c = backprops.shape[0], backprops.shape[1]
    out: dict[nn.Parameter, torch.Tensor] = {}
    if n == 0:  # an empty Poisson batch: no examples, as Opacus returns
        return {p: backprops.new_zeros(0, c) for p in (layer.weight, layer.bias)
                if p is not None and p.requires_grad}
    g = backprops.reshape(n, c, -1)
    if layer.weight is not None and layer.weight.requires_grad:
        xhat = functional.group_norm(x.to(backprops.dtype), layer.num_groups, eps=layer.eps)
        # The product overwrites xhat (the one temporary), then sums over positions.
        out[layer.weight] = xhat.mul_(backprops).reshape(n, c, -1).sum(dim=2)
    if layer.bias is not None and layer.bias.requires_grad:
        out[layer.bias] = g.sum(dim=2)
    return out


#: Entries of the temporary that :func:`group_norm_grad_sample_from_stats` works in on
#: the CPU (4 MiB of float32): the examples are taken a few at a time, so the
#: temporary stays cache-sized and no step allocates one the size of the layer's
#: input. For the first GroupNorm of the 128x128 ChestCNN at batch 64 (16.8M entries)
#: the fresh input-sized temporary's page faults cost more than the arithmetic:
#: about 40 ms against 8 ms a few examples at a time, one torch thread, this VM.
GROUP_NORM_CHUNK_ENTRIES = 1 << 20


def group_norm_grad_sample_from_stats(
    layer: nn.GroupNorm, x: torch.Tensor, backprops: torch.Tensor, mean: torch.Tensor,
    rstd: torch.Tensor, *, chunk_entries: int = GROUP_NORM_CHUNK_ENTRIES,
) -> dict[nn.Parameter, torch.Tensor]:
    """:func:`group_norm_grad_sample`'s per-sample gradients from the layer's input
    ``x`` ``[B, C, ...]``, output gradient ``backprops`` and the per-example, per-group
    ``mean`` and ``rstd`` (1 / standard deviation, both ``[B, num_groups]``) that the
    forward pass computed (autograd keeps them for the layer's backward): the input
    is not normalised a second time. Example b's weight gradient per channel is
    ``rstd * sum over positions of (x_b - mean) * g_b``: the same sum as
    :func:`group_norm_grad_sample`'s, with the ``rstd`` factor taken out of it (equal
    to float rounding; tested against it and per-example autograd).

    On the CPU the examples are taken as many at a time as fit in ``chunk_entries``
    entries of one temporary; each example's sums are computed alone either way, so
    the result is bit for bit the same for every ``chunk_entries`` (tested)."""
    n, c = backprops.shape[0], backprops.shape[1]
    groups = layer.num_groups
    out: dict[nn.Parameter, torch.Tensor] = {}
    if n == 0:
        return group_norm_grad_sample(layer, [x], backprops)
    g = backprops.reshape(n, c, -1)
    if layer.weight is not None and layer.weight.requires_grad:
        dtype = backprops.dtype
        per_example = g.shape[1] * g.shape[2]
        step = n if x.device.type != "cpu" else max(1, min(n, chunk_entries // per_example))
        # Plain values (the saved statistics may be autograd outputs, and the sums below
        # write into a reused temporary): nothing here is differentiated.
        inputs = x.detach().reshape(n, groups, -1)
        means = mean.detach().to(dtype).reshape(n, groups, 1)
        grads = g.detach()
        summed = torch.empty(n, c, dtype=dtype, device=backprops.device)
        work = torch.empty(step * per_example, dtype=dtype, device=backprops.device)
        for i in range(0, n, step):
            j = min(n, i + step)
            centred = work[:(j - i) * per_example].view(j - i, groups, -1)
            torch.sub(inputs[i:j].to(dtype), means[i:j], out=centred)
            # The product overwrites the centred input before the sum over positions.
            torch.sum(centred.view(j - i, c, -1).mul_(grads[i:j]), dim=2, out=summed[i:j])
        out[layer.weight] = summed.mul_(
            rstd.detach().to(dtype).reshape(n, groups, 1).expand(n, groups, c // groups)
            .reshape(n, c))
    if layer.bias is not None and layer.bias.requires_grad:
        out[layer.bias] = g.sum(dim=2)
    return out


def install() -> None:
    """Register :func:`conv2d_grad_sample` (``nn.Conv2d``) and
    :func:`group_norm_grad_sample` (``nn.GroupNorm``) with Opacus (idempotent).

    Affects every Opacus ``GradSampleModule`` made afterwards in this process, in
    hooks and ghost modes, and bract's book-keeping clipping; the gradients are the
    same, only time and memory change.
    """
    global _INSTALLED
    register_grad_sampler(nn.Conv2d)(conv2d_grad_sample)
    register_grad_sampler(nn.GroupNorm)(group_norm_grad_sample)
    _INSTALLED = True


def restore_opacus() -> None:
    """Put Opacus's own ``Conv2d`` (im2col) and ``GroupNorm`` samplers back, e.g. to
    measure against them."""
    global _INSTALLED
    register_grad_sampler(nn.Conv2d)(compute_conv_grad_sample)
    register_grad_sampler(nn.GroupNorm)(compute_group_norm_grad_sample)
    _INSTALLED = False


def installed() -> bool:
    """Whether :func:`install` has run in this process."""
    return _INSTALLED
