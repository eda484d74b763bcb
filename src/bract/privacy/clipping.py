"""Per-example clipping that bounds every example's contribution, whatever the weights.

DP-SGD adds, each step, ``sum_i c_i * g_i`` with ``c_i = min(1, C / (||g_i|| + 1e-6))``
and relies on each term having norm at most ``C``. That factor does not bound a
gradient that is not finite: a NaN norm gives a NaN factor, an infinite norm gives
``c_i = 0`` and ``0 * inf`` is NaN, so one such example turns the whole sum NaN. The
global weights are the coordinator's choice, and weights can make the loss overflow
on exactly the records with a property the coordinator picks (a feature above a
threshold): the update is then NaN exactly when such a record was sampled, a
membership test the noise does nothing to hide.

Here an example (or, with patient groups, a patient) whose per-example gradient norm
is not finite gets factor 0, and the rows it holds in every tensor the sum is formed
from are replaced by zeros with ``torch.where`` (multiplying them by 0 would keep the
NaN) before anything is summed. A finite norm implies finite entries (each entry's
square is at most the squared norm, and a product of norms is finite only when both
are), so every other example's rows are finite.

A norm computed as a sum that can cancel (a Linear layer's Gram sum over a patient's
records or a sequence's positions, its bias sum, an Embedding row's sum) is replaced by
a guaranteed upper bound (:mod:`bract.privacy.norm_bounds`); in ghost clipping that
replaces Opacus's own norms for those layers (:meth:`GhostClipping.backward`).

Guarantee: in book-keeping and Opacus's hooks mode (the modes bract trains with in a
federation), for float32 or float64 parameters (``PrivateTrainer`` refuses others) and
any weights and inputs, each example's (patient's) term of the clipped sum is zero or
has norm at most ``C`` (ghost clipping: its factors come from bounded norms, but its
terms from a second backward pass that recomputes them, which this does not bound): in
hooks mode and for per-example gradients that are formed, the norm of the very vector
scaled; where the norm is a bound, the exact gradient's norm plus its share of the float
rounding of the clipped sum formed from it. No example's values reach another's term,
and the sum is finite; so adding or removing one example moves it by at most ``C`` (to
float rounding), as the accountant assumes.
"""

from __future__ import annotations

from types import MethodType
from typing import Any

import torch
from torch import nn

__all__ = [
    "EPS",
    "GhostClipping",
    "clip_factors",
    "clip_hooks_safely",
    "layer_clipped_sum",
    "zero_rows",
]

#: Opacus's ``1e-6`` in its clipping factor ``C / (norm + 1e-6)``.
EPS = 1e-6


def clip_factors(norms: torch.Tensor, max_grad_norm: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each example's clipping factor and whether its norm is finite: ``min(1, C /
    (norm + 1e-6))`` for a finite norm, ``0`` for a NaN or infinite one (``kept``
    False: its rows must be zeroed with :func:`zero_rows`, not multiplied by 0)."""
    kept = torch.isfinite(norms)
    factors = (max_grad_norm / (norms + EPS)).clamp(max=1.0)
    return torch.where(kept, factors, torch.zeros((), dtype=factors.dtype,
                                                  device=factors.device)), kept


def zero_rows(t: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """``t`` (first dimension: one row per example) with the rows of the examples not
    ``kept`` replaced by zeros, whatever they hold (NaN and infinities included)."""
    mask = kept.to(t.device).view(-1, *([1] * (t.dim() - 1)))
    return torch.where(mask, t, torch.zeros((), dtype=t.dtype, device=t.device))


def layer_clipped_sum(module: nn.Module, kept_tensors: tuple, factors: torch.Tensor,
                      kept: torch.Tensor) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """One layer's ``sum_i c_i grad_i`` for each of its trainable parameters, from what
    its per-example rule kept: ``("linear", A, G)`` (an ``nn.Linear``'s input and
    output gradient, ``[B, ..., d]``) or ``("per-example", {param: grads [B, ...]})``.
    The rows of the examples not ``kept`` are zeroed (:func:`zero_rows`) before the
    products, so they add exactly nothing."""
    if kept_tensors[0] == "linear":
        _, a, g = kept_tensors
        g = zero_rows(g, kept)
        # Rows of every example (all its positions, for a sequence input) at once.
        cg = (g * factors.view(-1, *([1] * (g.dim() - 1))).to(g.dtype)).reshape(
            -1, g.shape[-1])
        out = []
        if module.weight.requires_grad:
            a = zero_rows(a, kept)
            out.append((module.weight, torch.mm(
                cg.t(), a.reshape(-1, a.shape[-1])).to(module.weight.dtype)))
        if module.bias is not None and module.bias.requires_grad:
            out.append((module.bias, cg.sum(0).to(module.bias.dtype)))
        return out
    # sum_i c_i grad_i as one vector-matrix product over the flattened gradients.
    return [(p, torch.mv(zero_rows(gs, kept).reshape(len(gs), -1).t(),
                         factors.to(gs.dtype)).view_as(p).to(p.dtype))
            for p, gs in kept_tensors[1].items()]


def clip_hooks_safely(optimizer: Any) -> None:
    """Make Opacus's hooks-mode ``optimizer`` (a ``DPOptimizer``) clip with
    :func:`clip_factors`, the NaN and infinities of an example not kept set to 0 in its
    per-sample gradients (in place, which then hold nothing else): the same clipped sum as Opacus's
    ``clip_and_accumulate`` for finite per-sample gradients, and nothing from an
    example whose gradient is not finite (Opacus's own factor makes the sum NaN)."""
    from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

    def clip_and_accumulate(self: Any) -> None:
        samples = self.grad_samples
        if len(samples[0]) == 0:  # an empty Poisson batch
            factors = torch.zeros((0,), device=samples[0].device)
        else:
            device = samples[0].device
            norms = torch.stack([g.reshape(len(g), -1).norm(2, dim=-1).to(device)
                                 for g in samples], dim=1).norm(2, dim=1)
            factors, _ = clip_factors(norms, self.max_grad_norm)
        for p in self.params:
            _check_processed_flag(p.grad_sample)
            # Gradients in the parameters' dtype (Opacus's rule for mixed precision).
            grad_sample = self._get_flat_grad_sample(p).to(p.dtype)
            # An example not kept has factor 0; its NaN and infinities become 0 in
            # place, so it adds exactly 0, as zero_rows would make it, without a
            # second per-example buffer (kept rows hold only finite values: unchanged).
            grad_sample.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
            grad = torch.einsum("i,i...", factors.to(grad_sample.device).to(p.dtype),
                                grad_sample)
            if p.summed_grad is not None:
                p.summed_grad += grad
            else:
                p.summed_grad = grad
            _mark_as_processed(p.grad_sample)

    optimizer.clip_and_accumulate = MethodType(clip_and_accumulate, optimizer)


class GhostClipping:
    """Opacus's ghost clipping with each example's contribution bounded whatever the
    weights: per-example norms from Opacus's ghost hooks in a first backward pass over
    the retained graph, then a second pass of ``sum_i c_i L_i`` that stops at the
    trainable layers' outputs, and each layer's clipped sum formed from its input and
    that output gradient with :func:`layer_clipped_sum` (the rows of an example whose
    norm is not finite zeroed). Opacus's own second pass lets autograd sum the
    examples inside each layer's backward, where one non-finite example makes the sum
    NaN. For finite gradients the ``.grad`` left is Opacus's, to float rounding.

    Use per step: ``ghost.backward(loss)`` with the ``DPTensorFastGradientClipping``
    Opacus's ghost criterion returns, in place of ``loss.backward()``; ``remove()``
    takes the hooks off.
    """

    def __init__(self, model: nn.Module, max_grad_norm: float) -> None:
        self.max_grad_norm = float(max_grad_norm)
        self._layers = [m for m in model.modules()
                        if any(p.requires_grad for p in m.parameters(recurse=False))]
        self._names = {m: name or "<model>" for name, m in model.named_modules()}
        self._inputs: dict[nn.Module, torch.Tensor] = {}
        self._grads: dict[nn.Module, torch.Tensor] = {}
        #: first-pass output gradients of the layers whose norms are bounded here
        self._first_grads: dict[nn.Module, torch.Tensor] = {}
        #: outputs of the layers fed by no gradient-carrying input, with their version
        #: counters: the second pass stops there unless one changed in place
        self._entries: list[tuple[torch.Tensor, int]] = []
        self._full_pass = False
        self._armed = False
        self._handles = [m.register_forward_hook(self._forward_hook) for m in self._layers]

    def _forward_hook(self, module: nn.Module, inputs: tuple, output: object) -> None:
        if not (module.training and torch.is_grad_enabled()):
            return
        if not (isinstance(output, torch.Tensor) and output.requires_grad):
            raise ValueError(f"layer {self._names[module]} returned no tensor that carries "
                             "a gradient: ghost clipping cannot clip it; use "
                             "grad_sample_mode='hooks'")
        x = inputs[0]
        self._inputs[module] = x.detach()
        if not (isinstance(x, torch.Tensor) and x.requires_grad):
            self._entries.append((output, output._version))
        elif x.grad_fn is None:
            self._full_pass = True  # the model's input needs its own gradient
        # Registered on the layer's own output before any in-place change to it: it
        # receives d(loss)/d(output), summed over every use of the output.
        output.register_hook(lambda grad, module=module: self._output_grad(module, grad))

    def _output_grad(self, module: nn.Module, grad: torch.Tensor) -> None:
        if self._armed:
            self._grads[module] = grad.detach()
        elif type(module) is nn.Embedding or (
                type(module) is nn.Linear and grad.dim() > 2):
            # first pass: what this layer's norm bound needs (Opacus's norm here is a
            # sum that can cancel)
            self._first_grads[module] = grad.detach()

    def _bound_cancelling_norms(self, scale: float) -> None:
        """Replace Opacus's per-example norms of the layers whose norm formula can
        cancel (a Linear over sequence inputs: a Gram sum, clamped at 0; an Embedding:
        a float32 sum per token) by the upper bounds of :mod:`bract.privacy.norm_bounds`,
        from the first pass's output gradients (times ``scale``, Opacus's undoing of a
        mean reduction)."""
        from bract.privacy.norm_bounds import embedding_norm_bounds, linear_norm_bounds

        for module, g in self._first_grads.items():
            x, g = self._inputs[module], g * scale
            if type(module) is nn.Embedding:
                bounds = {module.weight: embedding_norm_bounds(x, g, module.num_embeddings)}
            else:
                weight, bias = linear_norm_bounds(x.to(g.dtype), g, None, len(g),
                                                  bias=module.bias is not None)
                bounds = {module.weight: weight, module.bias: bias}
            for p in module.parameters(recurse=False):
                if p.requires_grad:
                    p._norm_sample = bounds[p].to(p._norm_sample.device)

    def backward(self, loss: Any) -> torch.Tensor:
        """The step's two backward passes; leaves ``sum_i c_i grad_i`` in each trainable
        parameter's ``.grad`` and returns the factors ``c`` (0 for an example whose
        gradient norm is not finite)."""
        from opacus.grad_sample.grad_sample_module import GradSampleHooks

        samplers = GradSampleHooks.GRAD_SAMPLERS
        per_example = loss.loss_per_sample
        hooks = loss.module
        try:
            reduced = (per_example.mean(dim=0) if loss.loss_reduction == "mean"
                       else per_example.sum(dim=0))
            reduced.backward(retain_graph=True)  # Opacus's hooks: per-example norms
            loss.optimizer.zero_grad()
            self._bound_cancelling_norms(
                float(len(per_example)) if loss.loss_reduction == "mean" else 1.0)
            factors, kept = clip_factors(hooks.get_norm_sample(), self.max_grad_norm)
            hooks.disable_hooks()
            self._armed = True
            try:
                # The second pass needs only the layers' output gradients: it stops at
                # the first layers' outputs (unless one changed in place after its
                # layer, or an input needs its gradient: then the whole pass runs).
                second = (factors.to(per_example.device) * per_example).sum()
                entries = [out for out, _ in self._entries]
                if self._full_pass or not entries or any(
                        out._version != version for out, version in self._entries):
                    second.backward()
                else:
                    torch.autograd.grad(second, entries, allow_unused=True)
            finally:
                self._armed = False
                hooks.enable_hooks()
            for module in self._layers:
                if module not in self._inputs:
                    continue
                if module not in self._grads:
                    raise ValueError(f"no gradient reached layer {self._names[module]}")
                x, g = self._inputs[module], self._grads[module]
                params = [p for p in module.parameters(recurse=False) if p.requires_grad]
                ones = torch.ones(len(g), dtype=g.dtype, device=g.device)
                if len(g) == 0:  # an empty Poisson batch
                    sums = [(p, torch.zeros_like(p)) for p in params]
                elif type(module) is nn.Linear:
                    # The second pass's output gradient already carries c_i.
                    sums = layer_clipped_sum(module, ("linear", x.to(g.dtype), g), ones,
                                             kept.to(g.device))
                else:
                    grads = samplers[type(module)](module, [x], g)
                    sums = layer_clipped_sum(
                        module, ("per-example", {p: grads[p] for p in params}), ones,
                        kept.to(g.device))
                for p, total in sums:
                    p.grad = total
            return factors
        finally:
            self._inputs.clear()
            self._grads.clear()
            self._first_grads.clear()
            self._entries = []
            self._full_pass = False

    def remove(self) -> None:
        """Take the hooks off the model."""
        for h in self._handles:
            h.remove()
        self._handles = []
