"""Book-keeping per-example clipping: DP-SGD's clipped gradient sum in one backward pass.

DP-SGD needs, every step, ``sum_i c_i * grad_i`` where ``grad_i`` is example i's
gradient and ``c_i = min(1, C / (||grad_i|| + 1e-6))`` clips it to norm ``C`` (``c_i =
0``, with the example's rows zeroed, when that norm is not finite:
:mod:`bract.privacy.clipping`).
Opacus offers two ways: hooks mode materialises every ``grad_i`` (for the 7 M-weight
dense layer of the 128x128 ChestCNN at batch 64: 1.8 GB); ghost clipping computes
the norms in a first backward pass and the clipped sum in a second one, keeping
the whole autograd graph alive between them (1.7x the memory of a non-private step
here, and two backward passes of time).

Book-keeping (Bu, Wang, Zha, Karypis, "Differentially private optimization on
large model at small cost", ICML 2023) needs one backward pass. While autograd
runs, a hook on each trainable layer keeps what that layer's share of the clipped
sum needs:

* ``nn.Linear``: the layer's input ``A`` and output gradient ``G`` (per-example
  norms from them without forming ``grad_i``: Opacus's ghost-norm sampler); its
  clipped sum is ``(c * G)^T A``;
* every other layer Opacus has a per-sample gradient sampler for (``Conv2d``,
  ``GroupNorm``, ``LayerNorm``, ``Embedding``, ...): its per-example gradients,
  small for such layers, from Opacus's registered sampler (for ``Conv2d``, bract's
  :mod:`~bract.privacy.grad_samplers`; for ``GroupNorm``, bract's rule fed with the
  mean and 1/std its forward pass saved, so the input is not normalised twice); its
  clipped sum is ``sum_i c_i grad_i``.

After the pass, ``c_i`` comes from the per-example norms over all layers, and each
parameter's ``.grad`` is set to its clipped sum. Opacus's fast-gradient-clipping
optimizer then adds the Gaussian noise and scales by the expected batch size,
and Opacus's accountant counts the step, exactly as after ghost clipping.

With patient groups (``backward(..., groups=)``, patient-level DP) the unit clipped
is each patient's summed gradient ``G_p = sum_{i in p} grad_i``: for ``nn.Linear``
its squared norm is ``sum_{r, s in p} (g_r . g_s)(a_r . a_s)`` over the patient's
rows (every position of every record), a Gram-matrix sum within the patient, which
crafted weights can make cancel in floating point: the factor divides by a guaranteed
upper bound of it instead (:func:`~bract.privacy.norm_bounds.linear_norm_bounds`, also
used for a Linear over sequence inputs, whose per-example norm is the same sum over
positions). The clipped sum is then ``(c_{p(i)} * G)^T A`` as before, each record
weighted by its patient's factor. For the other layers the per-example gradients are
summed per patient once, and the clipped term is ``c_p`` times that very sum (its norm
is the one the factor came from).

Guarantee: for a batch of finite gradients the ``.grad`` this module leaves equals,
to float rounding, the one Opacus's ghost clipping leaves (tests compare both, and a
per-example autograd reference), except that where a norm is an upper bound (patient
groups, sequence inputs) the factor can be smaller by that bound's relative margin
(about ``1e-5`` for ordinary gradients, more only where the sum cancels); so clipping,
noise, sampling and the epsilon accounted are those of Opacus's DP-SGD. For any
weights and inputs, an example (or patient) whose gradient norm is not finite adds
exactly nothing and no other example's term depends on it, so the sum is finite, and
each term's norm (its exact gradient's, times its factor) is at most ``C``
(:mod:`bract.privacy.clipping`, :mod:`bract.privacy.norm_bounds`). Assumption, as
for every per-example method: examples do not interact in the forward pass (no BatchNorm, which
:func:`~bract.privacy.training.check_privatisable` refuses) and no layer runs
twice in one forward pass (weight tying is refused here with a clear error).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from types import MethodType
from typing import Any

import torch
from torch import nn

from bract.privacy import grad_samplers as bract_samplers
from bract.privacy.clipping import clip_factors, layer_clipped_sum
from bract.privacy.norm_bounds import linear_norm_bounds
from bract.privacy.threads import core_is_free

__all__ = [
    "BookKeepingClipper",
    "bookkeeping_obstacle",
    "hand_over_clipped_sums",
    "supports_bookkeeping",
    "unsupported_layers",
]

def _samplers() -> tuple[dict, dict]:
    from opacus.grad_sample.grad_sample_module import GradSampleHooks
    from opacus.grad_sample.grad_sample_module_fast_gradient_clipping import (
        GradSampleHooksFastGradientClipping,
    )

    return GradSampleHooks.GRAD_SAMPLERS, GradSampleHooksFastGradientClipping.NORM_SAMPLERS


def _trainable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [
        (name, m) for name, m in model.named_modules()
        if any(p.requires_grad for p in m.parameters(recurse=False))
    ]


def unsupported_layers(model: nn.Module) -> list[str]:
    """Names (and types) of trainable layers book-keeping cannot clip."""
    grad_samplers, norm_samplers = _samplers()
    return [
        f"{name or '<model>'} ({type(m).__name__})" for name, m in _trainable_layers(model)
        if not (type(m) is nn.Linear and nn.Linear in norm_samplers)
        and type(m) not in grad_samplers
    ]


def _shared_parameter(model: nn.Module) -> tuple[str, str] | None:
    """The names of two trainable layers that hold the same parameter, if any."""
    owner: dict[int, str] = {}
    for name, m in _trainable_layers(model):
        for p in m.parameters(recurse=False):
            if id(p) in owner:
                return owner[id(p)] or "<model>", name or "<model>"
            owner[id(p)] = name
    return None


def bookkeeping_obstacle(model: nn.Module) -> str | None:
    """Why book-keeping cannot clip ``model`` (naming the layers and the fix), or None."""
    bad = unsupported_layers(model)
    if bad:
        return ("book-keeping clipping has no per-example rule for: " + ", ".join(bad)
                + "; use grad_sample_mode='hooks' or 'ghost'")
    shared = _shared_parameter(model)
    if shared:
        return (f"layers {shared[0]} and {shared[1]} share a parameter (weight tying): "
                "book-keeping clipping cannot attribute its gradient; use "
                "grad_sample_mode='hooks'")
    return None


def supports_bookkeeping(model: nn.Module) -> bool:
    """Whether every trainable layer of ``model`` is one book-keeping can clip and no
    parameter is shared between layers."""
    return bookkeeping_obstacle(model) is None


class BookKeepingClipper:
    """Hooks on ``model`` that turn one backward pass of the per-example losses
    into the clipped gradient sum ``sum_i c_i grad_i`` in every parameter's ``.grad``.

    Use per step: ``clipper.backward(loss_per_example, batch_size)`` in place of
    ``loss.backward()``, then the DP optimizer's ``step()`` (which adds the noise).
    ``remove()`` takes the hooks off. Raises ValueError naming the layer for a
    model it cannot clip (see :func:`unsupported_layers`) or a parameter that two
    layers share (its per-example norm is not the sum of two layers' norms).

    ``overlap``: compute each layer's per-example rule on a second thread while the
    backward pass goes on to the layers below it (``None``: for CPU tensors when a
    core is free of torch's own threads, see
    :func:`~bract.privacy.threads.core_is_free`). The rules run
    on the same tensors in the same order as without it, so ``.grad`` and the
    factors are the same bits either way (tested); only when they are computed
    changes.
    """

    def __init__(self, model: nn.Module, max_grad_norm: float, *,
                 overlap: bool | None = None) -> None:
        obstacle = bookkeeping_obstacle(model)
        if obstacle:
            raise ValueError(obstacle)
        if not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0, got {max_grad_norm!r}")
        layers = _trainable_layers(model)
        self.max_grad_norm = float(max_grad_norm)
        self._layers = [m for _, m in layers]
        self._names = {m: name for name, m in layers}
        self.overlap = overlap
        #: the second thread of ``overlap`` (started at its first use)
        self._worker: ThreadPoolExecutor | None = None
        #: what the forward and backward pass running on each thread collect: the parts
        #: of one batch can run their passes at once, each on its own thread
        self._local = threading.local()
        self._handles = [model.register_forward_pre_hook(self._model_pre_hook, with_kwargs=True)]
        for m in self._layers:
            self._handles.append(m.register_forward_hook(self._forward_hook))

    # ----------------------------------------------------------------------- hooks
    def _state(self) -> _PassState:
        """The pass state of the calling thread (a forward pass and its backward pass
        run on the same thread)."""
        st = getattr(self._local, "state", None)
        if st is None:
            st = self._local.state = _PassState()
        return st

    def _recording(self, module: nn.Module) -> bool:
        return module.training and torch.is_grad_enabled()

    def _model_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        # An input that already requires a gradient (e.g. adversarial training) leads
        # the backward pass past every layer: run the ordinary full pass.
        if self._recording(module) and any(
            isinstance(a, torch.Tensor) and a.requires_grad
            for a in (*args, *kwargs.values())
        ):
            self._state().full_backward = True

    def _forward_hook(self, module: nn.Module, inputs: tuple, output: object) -> None:
        if not self._recording(module):
            return
        st = self._state()
        if module in st.inputs:
            raise ValueError(
                f"layer {self._names[module] or '<model>'} ran twice in one forward pass "
                "(weight tying): book-keeping clipping cannot attribute its gradient; use "
                "grad_sample_mode='hooks'"
            )
        if not (isinstance(output, torch.Tensor) and output.requires_grad):
            raise ValueError(
                f"layer {self._names[module] or '<model>'} returned no tensor that carries "
                "a gradient: book-keeping clipping cannot clip it; use grad_sample_mode='hooks'"
            )
        st.inputs[module] = inputs[0].detach()
        if type(module) is nn.GroupNorm:
            stats = _group_norm_stats(output, module.num_groups)
            if stats is not None:
                st.group_norm_stats[module] = stats
        if not (isinstance(inputs[0], torch.Tensor) and inputs[0].requires_grad):
            st.entries.append((output, output._version))
            st.entry_layers.add(module)
        # A hook on this very output (registered before any in-place change to it)
        # receives d(loss)/d(output): the layer's output gradient, summed over all uses.
        output.register_hook(lambda grad, module=module: self._output_grad(module, grad))

    def _output_grad(self, module: nn.Module, grad: torch.Tensor) -> None:
        st = self._state()
        if module not in st.inputs:
            return
        x = st.inputs.pop(module)
        stats = st.group_norm_stats.pop(module, None)
        args = (module, x, grad.detach(), stats, st.groups, st.group_count)
        # A layer fed by no gradient-carrying input is where the pass ends: nothing is
        # left to overlap its rule with, so it runs here, beside the worker's last ones.
        if st.overlapping and module not in st.entry_layers:
            assert self._worker is not None
            st.rules.append(self._worker.submit(self._rule, *args))
        else:
            st.rules.append(self._rule(*args))

    @staticmethod
    def _rule(module: nn.Module, x: torch.Tensor, g: torch.Tensor,
              stats: tuple[torch.Tensor, torch.Tensor] | None,
              groups: torch.Tensor | None, group_count: int,
              ) -> tuple[nn.Module, list[torch.Tensor], tuple]:
        """One layer's per-example norms (one ``[B]`` tensor per parameter, or per group
        with ``groups``) and what its clipped sum needs: ``("linear", A, G)`` or
        ``("per-example", {param: grads [B, ...]})``."""
        grad_samplers, _ = _samplers()
        params = [p for p in module.parameters(recurse=False) if p.requires_grad]
        with torch.no_grad():  # plain values: nothing here is differentiated
            if type(module) is nn.Linear:
                x = x.to(g.dtype)
                if groups is not None or g.dim() > 2:
                    # A sum over several rows (a patient's records, a sequence's
                    # positions): its norm is a Gram sum that can cancel, so an upper
                    # bound that holds for any values (bract.privacy.norm_bounds).
                    weight, bias = linear_norm_bounds(
                        x, g, groups, group_count if groups is not None else len(g),
                        bias=module.bias is not None)
                    norms = {module.weight: weight, module.bias: bias}
                else:
                    # One example's weight gradient is the outer product g_i a_i^T: its
                    # norm is ||g_i|| * ||a_i||, its bias gradient's ||g_i|| (Opacus's rule).
                    g_norm = torch.linalg.vector_norm(g, dim=1)
                    norms = {module.weight: g_norm * torch.linalg.vector_norm(x, dim=1),
                             module.bias: g_norm}
                return module, [norms[p] for p in params], ("linear", x, g)
            if stats is not None and bract_samplers.installed():
                per_example = bract_samplers.group_norm_grad_sample_from_stats(
                    module, x, g, *stats)
            else:
                per_example = grad_samplers[type(module)](module, [x], g)
            per_example = {p: per_example[p] for p in params}
            if groups is not None:
                # Each group's summed gradient, formed once: its norm is the norm of the
                # very vector its clipped term is made from (c_p times it), so rounding
                # in the sum cannot make the term larger than the norm says.
                per_group = {p: gs.new_zeros((group_count, *gs.shape[1:])).index_add_(
                    0, groups, gs) for p, gs in per_example.items()}
                norms = [gs.reshape(group_count, -1).norm(2, dim=1)
                         for gs in per_group.values()]
                return module, norms, ("per-group", per_group)
            norms = [gs.reshape(len(gs), -1).norm(2, dim=1) for gs in per_example.values()]
            return module, norms, ("per-example", per_example)

    # ------------------------------------------------------------------------ step
    def backward(self, loss_per_example: torch.Tensor, batch_size: int,
                 groups: torch.Tensor | None = None) -> torch.Tensor:
        """Backpropagate ``loss_per_example`` (shape ``[batch_size]``, not reduced) once
        and leave ``sum_i c_i grad_i`` in each trainable parameter's ``.grad``.

        ``groups`` (``[batch_size]`` integers ``0..P-1``, e.g. each record's patient in
        the batch): clip each group's summed gradient instead of each example's, so
        ``c_i`` is the factor of example i's group. Returns the clipping factors ``c``
        (``[B]``; 0 for an example, or group, whose gradient norm is not finite). An
        empty batch (Poisson sampling) leaves zero gradients. Raises ValueError for a
        loss that is not one value per example (clipping it would clip the batch, not
        each example) or groups that do not name one group per example.
        """
        factors, sums = self.clipped_sums(loss_per_example, batch_size, groups)
        for p, total in sums:
            p.grad = total
        return factors

    def clipped_sums(self, loss_per_example: torch.Tensor, batch_size: int,
                     groups: torch.Tensor | None = None,
                     ) -> tuple[torch.Tensor, list[tuple[nn.Parameter, torch.Tensor]]]:
        """What :meth:`backward` leaves, returned instead of written to ``.grad``: the
        clipping factors and each trainable parameter's ``sum_i c_i grad_i`` over this
        batch (zeros for an empty one).

        Each example's factor depends on that example (or its group) alone, so the
        clipped sums of disjoint parts of a batch, each run on its own thread (the
        forward pass and this call on the same thread), add up to the whole batch's
        clipped sum (:class:`~bract.privacy.batch_parts.BatchParts`).
        """
        st = self._state()
        try:
            if tuple(loss_per_example.shape) != (batch_size,):
                raise ValueError(
                    f"expected one loss per example (shape ({batch_size},)), got shape "
                    f"{tuple(loss_per_example.shape)}: the criterion must not reduce"
                )
            if groups is not None:
                if tuple(groups.shape) != (batch_size,) or groups.dtype != torch.long or (
                        batch_size and int(groups.min()) < 0):
                    raise ValueError(f"groups must be {batch_size} integers >= 0, one per "
                                     f"example (got shape {tuple(groups.shape)})")
                st.groups = groups.to(loss_per_example.device)
                st.group_count = int(groups.max()) + 1 if batch_size else 0
            params = [p for m in self._layers for p in m.parameters(recurse=False)
                      if p.requires_grad]
            st.overlapping = self._overlap_for(loss_per_example)
            if loss_per_example.numel() == 0:
                return loss_per_example.detach(), [(p, torch.zeros_like(p)) for p in params]
            total = loss_per_example.sum()
            entries = [out for out, version in st.entries]
            changed = any(out._version != version for out, version in st.entries)
            if st.full_backward or changed or not entries:
                # An entry output changed in place after the layer (e.g. ReLU(inplace))
                # is no longer the layer's output: run the ordinary pass to the leaves.
                total.backward()
            else:
                # Only the layers' output gradients are needed: a pass that stops at
                # the first layers' outputs computes no parameter's own gradient.
                torch.autograd.grad(total, entries, allow_unused=True)
            # Every layer's rule, in the order the pass reached the layers (so the norms
            # are combined in the same order, with or without the worker).
            rules = [r.result() if isinstance(r, Future) else r for r in st.rules]
            if st.inputs:
                missing = ", ".join(self._names[m] or "<model>" for m in st.inputs)
                raise ValueError(f"no gradient reached layer(s) {missing}")
            norms = torch.stack([n for _, layer_norms, _ in rules for n in layer_norms],
                                dim=0).norm(2, dim=0)
            # A norm that is not finite (weights that overflow on this example) gives
            # factor 0 and the example's rows are zeroed, not multiplied by 0.
            factors, kept = clip_factors(norms, self.max_grad_norm)
            unit_factors, unit_kept = factors, kept
            if st.groups is not None:
                # each record takes its group's factor
                factors, kept = factors[st.groups], kept[st.groups]
            sums = []
            for module, _, kept_tensors in rules:
                if kept_tensors[0] == "per-group":  # one row per group: its own factor
                    sums += layer_clipped_sum(module, ("per-example", kept_tensors[1]),
                                              unit_factors, unit_kept)
                else:
                    sums += layer_clipped_sum(module, kept_tensors, factors, kept)
            return factors, sums
        finally:
            # A pass that failed part-way may still have rules on the worker: let them
            # end before their inputs are dropped (what they raise is not the error).
            for r in st.rules:
                if isinstance(r, Future):
                    r.exception()
            st.rules = []
            st.overlapping = False
            st.inputs.clear()
            st.group_norm_stats.clear()
            st.entries = []
            st.entry_layers.clear()
            st.full_backward = False
            st.groups = None
            st.group_count = 0

    def _overlap_for(self, loss: torch.Tensor) -> bool:
        overlap = self.overlap
        if overlap is None:
            overlap = loss.device.type == "cpu" and core_is_free()
        if overlap and self._worker is None:
            self._worker = ThreadPoolExecutor(max_workers=1,
                                              thread_name_prefix="bract-bookkeeping")
        return bool(overlap)

    def remove(self) -> None:
        """Take the hooks off the model and end the second thread, if one was started."""
        for h in self._handles:
            h.remove()
        self._handles = []
        if self._worker is not None:
            self._worker.shutdown(wait=True)
            self._worker = None

    @property
    def layers(self) -> Iterable[nn.Module]:
        """The layers whose gradients are clipped."""
        return tuple(self._layers)


class _PassState:
    """What one forward pass and its backward pass collect, on one thread."""

    def __init__(self) -> None:
        #: whether the rules go to the clipper's worker
        self.overlapping = False
        #: each layer's rule in the order the backward pass reached it: its
        #: (module, norms, kept), or the worker's future of them
        self.rules: list[tuple | Future] = []
        self.inputs: dict[nn.Module, torch.Tensor] = {}
        #: per GroupNorm: the (mean, rstd) its forward pass computed, when available
        self.group_norm_stats: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}
        #: during a backward pass with patient groups: each record's group, and the count
        self.groups: torch.Tensor | None = None
        self.group_count = 0
        #: outputs of the layers fed by no gradient-carrying tensor, with their version
        #: counters: the backward pass stops there (see :meth:`BookKeepingClipper.backward`).
        self.entries: list[tuple[torch.Tensor, int]] = []
        self.entry_layers: set[nn.Module] = set()
        self.full_backward = False


def _group_norm_stats(output: torch.Tensor, groups: int
                      ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The per-example, per-group mean and 1 / std a GroupNorm's forward pass computed,
    as autograd saved them for its backward (``_saved_result1`` and
    ``_saved_result2`` of ``native_group_norm``'s node: the saved-tensor attributes
    PyTorch documents in "Autograd mechanics"), or None where they are not there in
    that form (the layer's per-example rule then normalises the input again)."""
    node = output.grad_fn
    if node is None or type(node).__name__ != "NativeGroupNormBackward0":
        return None
    mean = getattr(node, "_saved_result1", None)
    rstd = getattr(node, "_saved_result2", None)
    expected = (output.shape[0], groups)
    if not (isinstance(mean, torch.Tensor) and isinstance(rstd, torch.Tensor)
            and tuple(mean.shape) == expected and tuple(rstd.shape) == expected):
        return None
    return mean.detach(), rstd.detach()


def hand_over_clipped_sums(optimizer: Any) -> None:
    """Let Opacus's fast-gradient-clipping ``optimizer`` take each parameter's ``.grad``
    as its summed gradient without copying it.

    Opacus copies ``.grad`` into ``summed_grad`` at every step (a deep copy of every
    gradient). After :meth:`BookKeepingClipper.backward` the ``.grad`` is a fresh
    tensor that holds exactly the clipped sum and nothing else reads it before the
    step, so the optimizer may own it: the values it noises, scales and applies are
    the same. A second backward before a step (gradient accumulation) still adds
    into the summed gradient, as Opacus does.
    """
    def accumulate(self: Any) -> None:
        for p in self.params:
            if p.summed_grad is not None:
                p.summed_grad.add_(p.grad)
            else:
                p.summed_grad = p.grad

    optimizer.accumulate = MethodType(accumulate, optimizer)
