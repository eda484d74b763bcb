"""The sensitivity guard: DP-SGD's bound holds only for the model it was proved for.

DP-SGD's guarantee rests on two facts about each step: every example's gradient
is computed exactly (so clipping it to norm C bounds its contribution), and no
example influences another's loss or gradient (so removing one example changes
the clipped sum by at most C). A model can break either without an error:

* a layer whose configuration the per-example rule ignores (a convolution with a
  reflect, replicate or circular ``padding_mode``; an ``Embedding`` with
  ``padding_idx``, ``scale_grad_by_freq`` or ``max_norm``; ``InstanceNorm``;
  ``EmbeddingBag``), measured here against a ``torch.func`` reference: per-example
  gradients 1-190% off, so one example's contribution is no longer bounded by C;
* a parameter that two layers share, or a layer that runs twice in one forward
  pass, in the modes that compute norms layer by layer (ghost clipping,
  book-keeping);
* a forward pass that mixes examples (batch statistics without a BatchNorm
  module, ``x - x.mean(0)``): one example then moves every other example's loss;
* a buffer that a training forward changes (running statistics of private
  inputs): it leaves the hospital with the weights, unnoised.

:func:`check_layers` refuses the first three from the model's structure, naming
the layer and the fix; :func:`probe` runs the model before training, and again
with the global weights of every round, and refuses the last two, naming the
module or buffer.

The probe runs on **public synthetic inputs** (:func:`public_probe_batch`): values
drawn from a fixed seed in the shape and dtype of the hospital's examples, labels in
the model's own output range, never a patient record or a figure computed from one.
Its verdict, and the refusal that reaches the coordinator, is then a function of
the model and the weights alone: whatever weights the coordinator crafts, the
probe answers nothing about the hospital's data.

Neither check is a proof about arbitrary code. The probe sees what a forward pass
on its synthetic inputs does: a model whose mixing is gated on input values those
inputs do not reach (or that mixes only in eval mode) passes it. The guarantee
assumes the model's layers are per-example except where the probe detects
otherwise: bract's registered models (TabularMLP, ChestCNN, TargetScaled) are built
only from per-example layers (Linear, Conv2d, GroupNorm, ReLU, max pooling), so no
weights make them mix examples; for a hospital's own architecture a mixing path
gated on inputs is the residual. What the checks guarantee is that no
model bract's tests know to break per-example clipping trains silently.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from bract.privacy.accounting import PrivacyError

__all__ = [
    "PROBE_EXAMPLES",
    "ProbeFormat",
    "check_layers",
    "layer_obstacles",
    "probe",
    "public_probe_batch",
    "reused_layers",
    "shared_parameters",
]

#: Relative tolerance of the probe's comparisons (float rounding of batched kernels).
PROBE_RTOL = 1e-4
PROBE_ATOL = 1e-6
#: Examples in the probe's public synthetic batch.
PROBE_EXAMPLES = 4
#: Seed of the probe's synthetic inputs: fixed and public, so that the verdict is the
#: same for every hospital and every dataset, and anyone can recompute it.
PROBE_SEED = 0x6272_6163_74

_PADS = {"reflect": "Reflection", "replicate": "Replication", "circular": "Circular"}
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
          nn.ConvTranspose3d)


def _trainable(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name or "<model>", m) for name, m in model.named_modules()
            if any(p.requires_grad for p in m.parameters(recurse=False))]


def _supported_types() -> set[type]:
    from opacus.grad_sample.grad_sample_module import GradSampleHooks

    return set(GradSampleHooks.GRAD_SAMPLERS)


def _layer_obstacle(name: str, m: nn.Module) -> str | None:
    """Why the per-example rule for layer ``m`` would be wrong, or ``None``."""
    kind = type(m).__name__
    if isinstance(m, _CONVS) and m.padding_mode != "zeros":
        pad = f"nn.{_PADS.get(m.padding_mode, 'Reflection')}Pad{m.weight.dim() - 2}d"
        return (f"layer {name} ({kind}) pads with padding_mode={m.padding_mode!r}, which the "
                "per-example gradient rule ignores (gradients 30-70% off); pad explicitly "
                f"before it ({pad}) and give it padding_mode='zeros', padding=0")
    if isinstance(m, nn.Embedding):
        options = [opt for opt, on in (("padding_idx", m.padding_idx is not None),
                                       ("scale_grad_by_freq", m.scale_grad_by_freq),
                                       ("max_norm", m.max_norm is not None),
                                       ("sparse", m.sparse)) if on]
        if options:
            return (f"layer {name} (Embedding) sets {', '.join(options)}: the per-example "
                    "rule ignores it (padding_idx, scale_grad_by_freq) or it rewrites the "
                    "weights from the batch's tokens outside DP-SGD (max_norm); use a plain "
                    "nn.Embedding and mask padding tokens in forward instead")
    if isinstance(m, nn.EmbeddingBag):
        return (f"layer {name} (EmbeddingBag) has no correct per-example rule here; use "
                "nn.Embedding followed by a sum or mean over the bag")
    if isinstance(m, (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)):
        return (f"layer {name} ({kind}): its per-example rule is wrong (gradients 11% off "
                "against a per-example reference); use nn.GroupNorm(num_groups=channels, "
                "num_channels=channels), the same normalisation")
    return None


def shared_parameters(model: nn.Module) -> tuple[str, str] | None:
    """The names of two trainable layers that hold the same parameter, if any."""
    owner: dict[int, str] = {}
    for name, m in _trainable(model):
        for p in m.parameters(recurse=False):
            if id(p) in owner:
                return owner[id(p)], name
            owner[id(p)] = name
    return None


def layer_obstacles(model: nn.Module, mode: str) -> list[str]:
    """Every reason, one per layer, why per-example clipping in ``mode`` would
    compute a wrong gradient for ``model`` (empty: none known)."""
    supported = _supported_types()
    out: list[str] = []
    for name, m in _trainable(model):
        why = _layer_obstacle(name, m)
        if why is None and type(m) not in supported:
            why = (f"layer {name} ({type(m).__name__}) has trainable parameters but no "
                   "per-example gradient rule; build it from layers DP-SGD supports "
                   "(Linear, Conv, Embedding, GroupNorm, LayerNorm, RMSNorm)")
        if why is not None:
            out.append(why)
    if mode in ("ghost", "bk"):
        shared = shared_parameters(model)
        if shared:
            out.append(f"layers {shared[0]} and {shared[1]} share a parameter (weight tying): "
                       f"{mode} clipping computes norms layer by layer and cannot bound a "
                       "shared parameter's gradient; use grad_sample_mode='hooks'")
    return out


def check_layers(model: nn.Module, mode: str) -> None:
    """Raise :class:`PrivacyError` naming every layer whose per-example rule in ``mode``
    would be wrong, and the fix for each."""
    problems = layer_obstacles(model, mode)
    if problems:
        raise PrivacyError("DP-SGD would not bound each example's contribution: "
                           + "; ".join(problems))


# ------------------------------------------------------------------------ the probe
def _dropouts(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]


def _batch_outputs(model: nn.Module, x: torch.Tensor, batch: int, seed: int
                   ) -> tuple[torch.Tensor, list[tuple[str, torch.Tensor]]]:
    """The model's output and every module's batch-shaped output, in call order."""
    seen: list[tuple[str, torch.Tensor]] = []
    names = {id(m): name or "<model>" for name, m in model.named_modules()}

    def hook(module: nn.Module, _inp: Any, out: Any) -> None:
        if isinstance(out, torch.Tensor) and out.dim() > 0 and out.shape[0] == batch:
            seen.append((names[id(module)], out.detach()))

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(seed)
            out = model(x)
    finally:
        for h in handles:
            h.remove()
    if not isinstance(out, torch.Tensor) or out.shape[:1] != (batch,):
        raise PrivacyError(f"the model's output has shape {tuple(getattr(out, 'shape', ()))} "
                           f"for a batch of {batch}: DP-SGD needs one output per example "
                           "along the first dimension")
    return out.detach(), seen


def _twice(model: nn.Module, calls: Sequence[tuple[str, torch.Tensor]]) -> list[str]:
    trainable = {name for name, _ in _trainable(model)}
    names = [name for name, _ in calls if name in trainable]
    return sorted({name for name in names if names.count(name) > 1})


def reused_layers(model: nn.Module, x: torch.Tensor) -> list[str]:
    """The trainable layers that run more than once in a forward pass on ``x`` (on a
    copy of ``model``, without gradients)."""
    twin = copy.deepcopy(model)
    for m in _dropouts(twin):
        m.eval()
    _, calls = _batch_outputs(twin, x, len(x), 0)
    return _twice(twin, calls)


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal to the probe's tolerance; NaN matches NaN and an infinity matches the
    same infinity, and the absolute tolerance scales with the finite entries only (a
    non-finite entry never makes the comparison itself fail)."""
    if a.shape != b.shape:
        return False
    if not torch.is_floating_point(a):
        return bool(torch.equal(a, b))
    finite = b[torch.isfinite(b)]
    scale = float(finite.abs().max()) if finite.numel() else 0.0
    return bool(torch.allclose(a, b, rtol=PROBE_RTOL, atol=PROBE_ATOL * max(scale, 1.0),
                               equal_nan=True))


def _not_finite(what: str) -> PrivacyError:
    return PrivacyError(
        f"refused before training: the model's {what} on the sensitivity probe's public "
        "synthetic inputs are NaN or infinite with these weights, so it cannot check that "
        "examples do not influence each other (its inputs are fixed and public: this "
        "depends on the model and its weights only)")


def _first_mixing_module(full: Sequence[tuple[str, torch.Tensor]],
                         rest: Sequence[tuple[str, torch.Tensor]], keep: slice) -> str:
    """The first module (in call order) whose output for the kept examples differs."""
    for (name, a), (_, b) in zip(full, rest, strict=False):
        if not _close(a[keep], b):
            return name
    return "<model>"


@dataclass(frozen=True)
class ProbeFormat:
    """What the probe's synthetic batch takes from the hospital's examples: the shape
    and dtype of one example's inputs and of its label (never a value). For data
    whose examples all have one shape (tabular rows, images of one size: the model's
    input format) this is public; for examples of varying shape it is the shape of
    the one example it was read from."""

    x_shape: tuple[int, ...]
    x_dtype: torch.dtype
    y_shape: tuple[int, ...]
    y_dtype: torch.dtype

    @classmethod
    def of(cls, x: torch.Tensor, y: torch.Tensor) -> ProbeFormat:
        """The format of a collated batch ``(x, y)`` (its first dimension the batch)."""
        return cls(tuple(x.shape[1:]), x.dtype, tuple(y.shape[1:]), y.dtype)


def _token_bound(model: nn.Module) -> int | None:
    """The number of token ids every ``nn.Embedding`` of ``model`` accepts, if any."""
    sizes = [m.num_embeddings for m in model.modules() if isinstance(m, nn.Embedding)]
    return min(sizes) if sizes else None


def _public_values(shape: tuple[int, ...], dtype: torch.dtype, count: int,
                   generator: torch.Generator, integer_bound: int) -> torch.Tensor:
    """``count`` synthetic values of one example's ``shape`` and ``dtype``: for floating
    dtypes half standard normal, half uniform on [0, 1) (standardised features and
    scaled pixels); integers uniform on ``[0, integer_bound)``; booleans fair coins."""
    size = (count, *shape)
    if dtype == torch.bool:
        return torch.randint(0, 2, size, generator=generator).bool()
    if dtype.is_floating_point or dtype.is_complex:
        normal = torch.randn(size, generator=generator, dtype=torch.float64)
        uniform = torch.rand(size, generator=generator, dtype=torch.float64)
        rows = (torch.arange(count) % 2 == 0).view(-1, *([1] * len(shape)))
        return torch.where(rows, normal, uniform).to(dtype)
    top = min(integer_bound, int(torch.iinfo(dtype).max) + 1)
    return torch.randint(0, max(top, 1), size, generator=generator).to(dtype)


def public_probe_batch(model: nn.Module, fmt: ProbeFormat, count: int = PROBE_EXAMPLES,
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """The probe's public synthetic batch for ``model``: ``count`` examples in the format
    ``fmt`` drawn from :data:`PROBE_SEED` (:func:`_public_values`; token ids below the
    model's smallest ``nn.Embedding``, other integer inputs in [0, 256) for ``uint8``
    pixels and [0, 2) otherwise), and labels from the model's public output range:
    integer labels are classes below the size of the output's second dimension (2 for
    a one-dimensional output), floating labels uniform on [0, 1) (a valid target for a
    regression and for a binary cross-entropy alike).

    Guarantee: a function of ``fmt`` and of the model's output shape only; no patient
    record, and no figure computed from one, goes into it.
    """
    generator = torch.Generator().manual_seed(PROBE_SEED)
    tokens = _token_bound(model)
    bound = tokens if tokens is not None else (256 if fmt.x_dtype == torch.uint8 else 2)
    x = _public_values(fmt.x_shape, fmt.x_dtype, count, generator, bound)
    on = next((p.device for p in model.parameters()), torch.device("cpu"))
    if fmt.y_dtype.is_floating_point:
        y = torch.rand((count, *fmt.y_shape), generator=generator,
                       dtype=torch.float64).to(fmt.y_dtype)
        return x.to(on), y.to(on)
    if fmt.y_dtype == torch.bool or fmt.y_dtype.is_complex:
        return x.to(on), _public_values(fmt.y_shape, fmt.y_dtype, count, generator, 2).to(on)
    twin = copy.deepcopy(model).eval()
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        out = twin(x.to(on))
    classes = int(out.shape[1]) if isinstance(out, torch.Tensor) and out.dim() >= 2 else 2
    y = _public_values(fmt.y_shape, fmt.y_dtype, count, generator, classes)
    return x.to(on), y.to(on)


def _perturbed(x: torch.Tensor) -> torch.Tensor:
    """The batch with its first example changed (other examples untouched)."""
    x2 = x.clone()
    if torch.is_floating_point(x2):
        x2[0] = x2[0] * -1.5 + 0.5
    else:  # token ids: the first example takes the last example's tokens
        x2[0] = x2[-1]
    return x2


def probe(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    criterion: nn.Module | None = None,
    *,
    mode: str = "hooks",
    public_buffers: Iterable[str] = (),
) -> None:
    """Check on the batch ``x`` (with labels ``y``), before the first DP-SGD step,
    that examples do not influence each other and that training leaks no buffer.

    :class:`~bract.privacy.training.PrivateTrainer` passes the public synthetic batch
    of :func:`public_probe_batch`, never patient records: the verdict then depends on
    the model and its weights only, so a refusal that reaches the coordinator tells
    it nothing about the hospital's data, whatever weights it sent.

    Runs a copy of ``model`` (never the model itself) in training mode, with dropout
    off and the same random seed for every pass, on ``x`` and checks that

    * the outputs (and the losses under ``criterion``) on ``x`` are finite: on NaN or
      infinite values no comparison can show independence, so they are refused;

    * no buffer changes in a training forward pass unless named in ``public_buffers``
      (a buffer leaves with the weights, unnoised);
    * removing the first example, or changing it, leaves every other example's
      output, and its loss under ``criterion`` (with ``reduction='none'``), unchanged
      (then each example's gradient depends only on that example);
    * in the modes that compute norms layer by layer (``mode`` ghost or bk), no
      trainable layer runs twice in one forward pass.

    Raises :class:`PrivacyError` naming the buffer, or the first module whose output
    mixes examples, and the fix; or saying that the outputs or losses are not finite.
    """
    batch = len(x)
    twin = copy.deepcopy(model).train()
    for m in _dropouts(twin):
        m.eval()
    public = set(public_buffers)
    before = {k: v.detach().clone() for k, v in twin.named_buffers()}
    seed = 0x6272
    out, full = _batch_outputs(twin, x, batch, seed)
    if torch.is_floating_point(out) and not bool(torch.isfinite(out).all()):
        raise _not_finite("outputs")
    twice = _twice(twin, full)
    if twice and mode in ("ghost", "bk"):
        raise PrivacyError(
            f"layer(s) {twice} run twice in one forward pass (weight sharing): {mode} "
            "clipping computes norms layer by layer and cannot bound a shared parameter's "
            "gradient; use grad_sample_mode='hooks'")
    changed = [k for k, v in twin.named_buffers()
               if k not in public and (k not in before or not torch.equal(before[k], v))]
    if changed:
        raise PrivacyError(
            f"a training forward pass changes the buffer(s) {changed}: they would leave "
            "the hospital with the weights without DP noise (running statistics of "
            "private inputs). Use a module that keeps no running statistics (GroupNorm, "
            "track_running_stats=False), or declare the buffers public if they never "
            "depend on private data (public_buffers=...)")
    if batch < 2:  # one example: nothing to mix
        return
    keep = slice(1, batch)
    pert_out, pert = _batch_outputs(twin, _perturbed(x), batch, seed)
    if not _close(out[keep], pert_out[keep]):
        where = _first_mixing_module(full, [(n, t[keep]) for n, t in pert], keep)
        raise PrivacyError(
            f"examples influence each other in the forward pass (first seen in the output "
            f"of {where}): changing one example changes the others' outputs, so DP-SGD's "
            "per-example clipping does not bound its contribution. Compute every statistic "
            "per example (no batch means, no BatchNorm)")
    rest_out, _ = _batch_outputs(twin, x[1:], batch - 1, seed)
    if not _close(out[keep], rest_out):
        # Randomness drawn per batch (functional dropout) differs between batch shapes;
        # without it (eval mode) the removal must leave the others' outputs unchanged.
        twin.eval()
        plain_out, plain = _batch_outputs(twin, x, batch, seed)
        plain_rest, plain_rest_calls = _batch_outputs(twin, x[1:], batch - 1, seed)
        twin.train()
        for m in _dropouts(twin):
            m.eval()
        if not _close(plain_out[keep], plain_rest):
            where = _first_mixing_module(plain, plain_rest_calls, keep)
            raise PrivacyError(
                f"examples influence each other in the forward pass (first seen in the "
                f"output of {where}): removing one example changes the others' outputs, so "
                "DP-SGD's per-example clipping does not bound its contribution. Compute "
                "every statistic per example (no batch means, no BatchNorm)")
        rest_out = out[keep]  # the difference was the per-batch randomness
    if criterion is not None and hasattr(criterion, "reduction"):
        per_example = copy.copy(criterion)
        per_example.reduction = "none"
        with torch.no_grad():
            losses = per_example(out, y)
            rest_losses = per_example(rest_out, y[1:])
        if losses.shape == (batch,) and torch.is_floating_point(losses) and not bool(
                torch.isfinite(losses).all()):
            raise _not_finite("losses")
        if losses.shape != (batch,) or not _close(losses[keep], rest_losses):
            raise PrivacyError(
                "the loss is not one value per example that depends only on that example "
                f"(shape {tuple(losses.shape)} with reduction='none' for {batch} examples); "
                "DP-SGD clips each example's gradient, which needs such a loss")
