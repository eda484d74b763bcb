"""DP-SGD for one hospital with Opacus, round after round.

:class:`PrivateTrainer` wraps what the hospital already has — a torch model, an
optimizer and a DataLoader — the way ``PrivacyEngine.make_private`` does, and
adds what a federation needs:

* every round starts from the global weights, loaded into the *plain* module
  before Opacus attaches its hooks, and the hooks are removed after the round
  (no double hooks, no ``_module.`` key prefix);
* the privacy ledger survives rounds: Opacus's accountant is rebuilt from the
  ledger each round, so epsilon after round r covers rounds 1..r;
* the budget is checked before training, and a refusal is returned as data;
* DP noise comes from :class:`~bract.privacy.noise.SecureGaussian`;
* Conv2d per-sample gradients come from one grouped convolution instead of
  Opacus's im2col (:mod:`bract.privacy.grad_samplers`: same gradients, less memory).

Guarantee (under the assumptions of DP-SGD: per-example clipping at
``max_grad_norm``, Poisson sampling, Gaussian noise of std
``noise_multiplier * max_grad_norm`` per step, add/remove-one neighbours): the
sequence of weights released after each round is (epsilon, delta)-DP with
respect to each record of this hospital (with ``patient_ids``: each patient, all
its records together), with epsilon as reported by :meth:`PrivateTrainer.epsilon`.
The sensitivity guard (:mod:`bract.privacy.sensitivity`) refuses, before training,
the models for which per-example clipping is known not to hold.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import numbers
import threading
import time
import warnings
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from bract.privacy.accounting import (
    ACCOUNTANTS,
    DEFAULT_ACCOUNTANT,
    MAX_ACCOUNTED_NOISE,
    BudgetDecision,
    DpSgdEvent,
    PrivacyBudget,
    PrivacyError,
    PrivacyLedger,
    TrainingPlan,
    as_python_float,
    check_unit,
    compress,
)
from bract.privacy.batch_parts import BatchParts, check_batch_parts, default_batch_parts
from bract.privacy.batches import check_batch_keys, pairs_of
from bract.privacy.noise import NoisePrefetcher, SecureGaussian, use_secure_noise
from bract.privacy.sampling import (
    PatientPoissonSampler,
    Patients,
    group_grad_samples,
    key_from_seed,
    secure_poisson_loader,
)
from bract.privacy.sensitivity import (
    ProbeFormat,
    check_layers,
    probe,
    public_probe_batch,
    reused_layers,
)

GRAD_SAMPLE_MODES = ("auto", "hooks", "ghost", "bk")
DEFAULT_GRAD_SAMPLE_MODE = "auto"
#: Per-sample gradients of Conv2d and GroupNorm layers: bract's rules (same gradients,
#: less memory and time; :mod:`bract.privacy.grad_samplers`) or Opacus's own.
GRAD_SAMPLER_SOURCES = ("bract", "opacus")


class _EmptyBatchNotice(logging.Filter):
    """Opacus logs a warning for every empty Poisson batch; with a small expected batch
    (or a public size bound) they are a normal part of the sampling, not a problem."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "batch is empty" not in record.getMessage()


logging.getLogger("opacus.data_loader").addFilter(_EmptyBatchNotice())

Weights = dict[str, np.ndarray]


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """The device to train on: ``device`` if given, else CUDA when available, else CPU."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise PrivacyError(f"device {device!r} was requested but CUDA is not available here.")
    return dev


def choose_grad_sample_mode(
    model: nn.Module, mode: str = DEFAULT_GRAD_SAMPLE_MODE, criterion: nn.Module | None = None
) -> str:
    """Resolve ``"auto"``: book-keeping clipping where every trainable layer supports
    it, else hooks. A ``criterion`` without a ``reduction`` attribute (so without a
    known way to give one loss per example, which book-keeping needs) gets hooks.

    Guarantee: ``"auto"`` resolves only to a mode whose every term of the clipped sum
    is its example's (patient's) gradient, exactly as used for its norm, times a
    factor that bounds it by the clipping norm for any weights (book-keeping: the
    norm bound of :mod:`bract.privacy.norm_bounds`; hooks: the norm of the very vector
    it adds). Ghost clipping is never picked: its second backward pass recomputes each
    layer's output gradient, which for crafted weights can differ from the first
    pass's (whose norm set the factor) by more than rounding. Book-keeping needs one
    backward pass and never forms a Linear layer's per-example gradients: measured
    fastest and leanest here (see docs/benchmarks.md); hooks mode materialises one
    gradient per example (memory batch x params).
    """
    if mode not in GRAD_SAMPLE_MODES:
        raise PrivacyError(
            f"grad_sample_mode {mode!r} is not supported; use one of {GRAD_SAMPLE_MODES}."
        )
    if mode != "auto":
        return mode
    if criterion is not None and not hasattr(criterion, "reduction"):
        return "hooks"
    from bract.privacy.bookkeeping import supports_bookkeeping
    from bract.privacy.sensitivity import shared_parameters

    if shared_parameters(model) is not None:
        return "hooks"  # the one mode whose per-example gradient of a shared weight is exact

    return "bk" if supports_bookkeeping(model) else "hooks"


def _check_per_example_loss(loss_per_example: torch.Tensor, batch: int) -> None:
    """Ghost and book-keeping clipping need one loss per example; a criterion that
    ignores ``reduction="none"`` would make them clip the batch, not each example."""
    if tuple(loss_per_example.shape) != (batch,):
        raise PrivacyError(
            f"the criterion returned a loss of shape {tuple(loss_per_example.shape)} with "
            f"reduction='none' for a batch of {batch}: per-example clipping needs one loss "
            "per example. Make the criterion honour its `reduction` attribute (as torch's "
            "losses do), or use grad_sample_mode='hooks'."
        )


def _check_sampling_source(data_loader: DataLoader) -> None:
    """Refuse a loader whose records DP-SGD could not sample as it says (``PrivacyError``
    naming the fix). DP-SGD draws every record of ``data_loader.dataset`` with the
    plan's rate (Poisson sampling); the loader's own sampler is replaced. So a sampler
    that reads only part of the dataset (a validation split held out by indices) would
    silently be trained on in full, and a dataset without a length has no rate."""
    from torch.utils.data import IterableDataset, RandomSampler, SequentialSampler

    dataset = data_loader.dataset
    if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__"):
        raise PrivacyError(
            f"the DataLoader's dataset ({type(dataset).__name__}) has no length: DP-SGD "
            "samples each record with a known rate, so it needs a map-style Dataset "
            "(with __len__ and __getitem__)")
    sampler = data_loader.sampler
    whole = isinstance(sampler, SequentialSampler) or (
        isinstance(sampler, RandomSampler) and not sampler.replacement
        and sampler.num_samples == len(dataset))
    if not whole:
        raise PrivacyError(
            f"the DataLoader's sampler ({type(sampler).__name__}) would be replaced: "
            "DP-SGD samples from the whole dataset (Poisson sampling), so records the "
            "sampler leaves out would be trained on. Pass only the training records "
            "(torch.utils.data.Subset(dataset, indices)) with the default sampler")


def _probe_format(data_loader: DataLoader) -> ProbeFormat:
    """The format (shapes and dtypes, no value) of the hospital's examples, for the
    sensitivity probe's public synthetic batch: read from its first example, collated
    as the DataLoader collates a batch; :class:`PrivacyError` when a batch is not an
    (inputs, labels) pair of tensors. The example's values are not kept."""
    dataset = data_loader.dataset
    collate = data_loader.collate_fn or torch.utils.data.default_collate
    batch = collate([dataset[0]])
    if isinstance(batch, Mapping):
        keys = sorted(map(str, batch))
        raise PrivacyError(
            f"a batch of this DataLoader is a dict with keys {keys}, not an (inputs, labels) "
            "pair: name the two keys, inputs first (PrivateTrainer(batch_keys=...), "
            "HospitalSetup(batch_keys=...), e.g. batch_keys=('img', 'label'))")
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
        raise PrivacyError(
            f"a batch of this DataLoader is a {type(batch).__name__}, not an (inputs, "
            "labels) pair: wrap the dataset so that each item is (x, y), or name a dict's "
            "keys with batch_keys=(inputs, labels)")
    x, y = batch
    if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)):
        raise PrivacyError(
            f"a batch of this DataLoader is a pair of {type(x).__name__} and "
            f"{type(y).__name__}: DP-SGD needs the inputs and the labels each as one "
            "tensor whose first dimension is the batch")
    return ProbeFormat.of(x, y)


def check_finite_weights(weights: Mapping[str, np.ndarray],
                         model: nn.Module | None = None) -> None:
    """Raise :class:`PrivacyError` naming the weights that hold NaN or infinite values,
    as sent or, given the ``model`` they are for, once cast to the dtype of the model's
    entry of that name (a float64 ``1e300`` is finite, and infinite in float32).

    Received global weights are checked before anything is computed on the hospital's
    data: the refusal depends on the coordinator's message alone, so it tells the
    coordinator nothing about the data. (Finite weights can still overflow on some
    records; per-example clipping bounds those, :mod:`bract.privacy.clipping`.)"""
    state = model.state_dict() if model is not None else {}

    def finite(k: str, v: np.ndarray) -> bool:
        arr = np.asarray(v)
        if not np.issubdtype(arr.dtype, np.inexact):
            return True
        if not bool(np.isfinite(arr).all()):
            return False
        target = state.get(k)
        if target is None or not (target.is_floating_point() or target.is_complex()):
            return True
        return bool(torch.isfinite(torch.as_tensor(arr, dtype=target.dtype)).all())

    bad = [k for k, v in weights.items() if not finite(k, v)]
    if bad:
        raise PrivacyError(
            f"the global weights {sorted(bad)[:5]} hold NaN or infinite values: refused "
            "before any computation on this hospital's data")


def check_privatisable(model: nn.Module) -> None:
    """Raise :class:`PrivacyError` naming the fix if Opacus cannot privatise ``model``.

    DP-SGD needs per-example gradients; layers that mix examples in a batch
    (BatchNorm) break that, and Opacus refuses them.
    """
    from opacus.validators import ModuleValidator

    # Validate the layers, not the mode: a model left in eval mode (e.g. after the
    # global model was evaluated) is fine, training switches it to train mode.
    was_training = model.training
    model.train()
    try:
        errors = ModuleValidator.validate(model, strict=False)
    finally:
        model.train(was_training)
    if errors:
        details = "; ".join(str(e) for e in errors[:5])
        raise PrivacyError(
            f"this model cannot be trained with DP-SGD: {details}. Fix: replace BatchNorm "
            "with GroupNorm (or call opacus.validators.ModuleValidator.fix(model)) before "
            "handing it to bract."
        )
    low = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()
                  if p.requires_grad and p.dtype not in (torch.float32, torch.float64)})
    if low:
        # In float16 or bfloat16 the per-example norms and factors round by up to a
        # percent, so a clipped term could pass the clipping norm the ledger records.
        raise PrivacyError(
            f"this model has trainable parameters in {', '.join(low)}: bract clips each "
            "example's gradient to the recorded norm only in float32 or float64. Fix: "
            "model.float() before handing it to bract."
        )


def _weights_digest(weights: Mapping[str, np.ndarray]) -> bytes:
    """A digest of named arrays: their names, order, dtypes, shapes and bytes."""
    import hashlib

    h = hashlib.blake2b(digest_size=32)
    for k, v in weights.items():
        arr = np.ascontiguousarray(v)
        h.update(f"{k}\0{arr.dtype.str}\0{arr.shape}\0".encode())
        h.update(arr.view(np.uint8).reshape(-1) if arr.size else b"")
    return h.digest()


def weights_of(model: nn.Module) -> Weights:
    """The model's state as named numpy arrays (CPU copies), in state_dict order."""
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def load_weights(model: nn.Module, weights: Mapping[str, np.ndarray]) -> None:
    """Load named arrays into ``model``; names and shapes must match exactly, and a
    floating-point entry must be finite in the model's dtype (:class:`PrivacyError`
    otherwise, before the model changes)."""
    state = model.state_dict()
    missing = set(state) - set(weights)
    unexpected = set(weights) - set(state)
    if missing or unexpected:
        raise PrivacyError(
            f"weights do not match the model: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    new_state = {}
    for k, v in state.items():
        arr = np.asarray(weights[k])
        if tuple(arr.shape) != tuple(v.shape):
            raise PrivacyError(
                f"weight {k!r} has shape {arr.shape}, the model expects {tuple(v.shape)}"
            )
        new_state[k] = torch.as_tensor(arr, dtype=v.dtype)
        if ((v.is_floating_point() or v.is_complex())
                and not bool(torch.isfinite(new_state[k]).all())):
            raise PrivacyError(
                f"weight {k!r} holds values that are NaN or infinite in the model's "
                f"{v.dtype}: refused before any computation on this hospital's data")
    model.load_state_dict(new_state, strict=True)


@dataclass(frozen=True)
class RoundOutcome:
    """What one round of local DP training produced (or why it did not train)."""

    trained: bool
    decision: BudgetDecision
    weights: Weights | None
    num_examples: int
    event: DpSgdEvent | None
    epsilon: float  # ledger epsilon after this round (covers all rounds so far)
    train_loss: float  # mean loss over non-empty batches; stays on the hospital
    seconds: float
    #: Events the round recorded before its DP-SGD event (e.g. its metrics release).
    also: tuple[DpSgdEvent, ...] = ()


class PrivateTrainer:
    """Opacus DP-SGD on one hospital's data, with a ledger that spans rounds.

    Parameters mirror ``PrivacyEngine.make_private``: pass the model, optimizer
    and DataLoader you already have (the DataLoader's ``batch_size`` is the
    expected batch size of Poisson sampling). ``budget`` is checked before
    every round; ``ledger`` carries the history of earlier rounds (e.g. restored
    from Flower's ``ctx.state``). ``grad_samplers`` picks whose rules give the
    per-sample gradients of Conv2d and GroupNorm layers (``"bract"``: a grouped
    convolution and a GroupNorm rule without the product tensor, less memory and
    time; ``"opacus"``: Opacus's im2col and GroupNorm rules); both give the same
    gradients, so the same clipping, noise and guarantee. ``noise_prefetch`` draws
    each step's noise during the step before, and ``rule_overlap`` computes
    book-keeping's per-example rules on a second thread while the backward pass goes
    on (``None``, the default for both: when a core is free of torch's threads; see
    :func:`~bract.privacy.noise.use_secure_noise` and
    :class:`~bract.privacy.bookkeeping.BookKeepingClipper`); neither changes a value.
    ``batch_parts`` cuts each book-keeping step's batch into parts whose passes run on
    threads of their own (``None``: two parts for large inputs when no core is free;
    :mod:`bract.privacy.batch_parts`): the same clipped sum to float rounding, so the
    same sensitivity, noise and epsilon.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        data_loader: DataLoader,
        *,
        noise_multiplier: float,
        max_grad_norm: float,
        delta: float,
        criterion: nn.Module | None = None,
        local_epochs: int = 1,
        budget: PrivacyBudget | None = None,
        ledger: PrivacyLedger | None = None,
        client_id: str = "",
        accountant: str = DEFAULT_ACCOUNTANT,
        grad_sample_mode: str = DEFAULT_GRAD_SAMPLE_MODE,
        device: str | torch.device | None = None,
        secure_noise: bool = True,
        noise_prefetch: bool | None = None,
        rule_overlap: bool | None = None,
        batch_parts: int | None = None,
        sampling_seed: int | None = None,
        grad_samplers: str = "bract",
        public_buffers: Sequence[str] = (),
        public_size: int | None = None,
        patient_ids: Sequence[Hashable] | None = None,
        batch_keys: tuple[str, str] | None = None,
        legacy_ledger_unit: str | None = None,
    ) -> None:
        reduction = getattr(criterion, "reduction", "mean") if criterion is not None else "mean"
        if reduction not in ("mean", "sum"):
            raise PrivacyError(
                f"the criterion's reduction={reduction!r}: DP-SGD differentiates one loss "
                "for the batch; use reduction='mean' (the step applies the noisy clipped sum "
                "/ the expected batch size) or 'sum' (the noisy clipped sum)"
            )
        if not isinstance(data_loader, DataLoader):
            raise PrivacyError(
                f"data_loader must be a torch DataLoader, got {type(data_loader).__name__}"
            )
        _check_sampling_source(data_loader)
        keys = check_batch_keys(batch_keys)
        if keys is not None:  # dict items (Flower Datasets): read as (inputs, labels)
            data_loader = pairs_of(data_loader, *keys)
        n = len(data_loader.dataset)  # type: ignore[arg-type]
        if n == 0:
            raise PrivacyError(
                f"hospital {client_id or '?'} has an empty partition: it has no data to train "
                "on. Give it data, or run the federation with fewer hospitals."
            )
        if grad_samplers not in GRAD_SAMPLER_SOURCES:
            raise PrivacyError(
                f"grad_samplers {grad_samplers!r} is not supported; use one of "
                f"{GRAD_SAMPLER_SOURCES}."
            )
        if accountant not in ACCOUNTANTS:
            raise PrivacyError(
                f"unknown accountant {accountant!r}; choose one of {ACCOUNTANTS}."
            )
        batch_size = data_loader.batch_size
        if batch_size is None or batch_size < 1:
            raise PrivacyError(
                "the DataLoader needs a fixed batch_size >= 1 (the expected batch size "
                f"of Poisson sampling); got {batch_size!r}."
            )
        if data_loader.drop_last:
            raise PrivacyError("use drop_last=False: Poisson sampling decides batch sizes.")
        probe_format = _probe_format(data_loader)
        requested_mode = grad_sample_mode
        self.patients = None if patient_ids is None else Patients.of(patient_ids, n)
        if self.patients is not None and grad_sample_mode == "ghost":
            raise PrivacyError(
                "patient-level DP clips each patient's summed gradient, which is exact in "
                "grad_sample_mode 'bk' (book-keeping, with per-patient Gram sums) and "
                "'hooks' (every record's gradient, summed per patient); Opacus's 'ghost' "
                "computes norms per record. Use 'auto', 'bk' or 'hooks'.")
        grad_sample_mode = choose_grad_sample_mode(model, grad_sample_mode, criterion)
        if self.patients is not None and grad_sample_mode == "ghost":
            grad_sample_mode = "hooks"  # what auto picks when book-keeping cannot clip
        # The sensitivity probe's batch: public synthetic inputs in the data's format, so
        # that nothing decided from it depends on a patient record.
        probe_x, probe_y = public_probe_batch(model, probe_format)
        if requested_mode == "auto" and grad_sample_mode in ("ghost", "bk") and reused_layers(
                model, probe_x):
            grad_sample_mode = "hooks"  # a layer runs twice: only hooks mode is exact
        if grad_sample_mode == "bk":
            from bract.privacy.bookkeeping import bookkeeping_obstacle

            obstacle = bookkeeping_obstacle(model)
            if obstacle:
                raise PrivacyError(obstacle)
        # The privacy unit: a record, or a patient (then the plan counts patients, the
        # batch size is the expected number of patients per step, and epsilon is per
        # patient).
        units = n if self.patients is None else self.patients.count
        unit = "record" if self.patients is None else "patient"
        if public_size is not None and (isinstance(public_size, bool) or not isinstance(
                public_size, int) or public_size < units):
            exc = PrivacyError(
                f"the public size bound ({public_size!r}) must be an integer at least the "
                f"hospital's number of {unit}s ({units}): it replaces that count in "
                "everything released")
            # What leaves the hospital (its reply's error) must not give the count.
            exc.public_reason = (f"the public size bound is not an integer at least the "
                                 f"hospital's number of {unit}s (the count stays in its "
                                 "own log)")
            raise exc
        self.public_size = public_size
        self.privacy_unit = unit
        #: The unit the ledger's events written without one protected (the hospital's
        #: statement; ``None``: such events are refused, see ``check_unit``).
        self.legacy_ledger_unit = legacy_ledger_unit
        # Sample rate, steps (and so the calibrated noise) come from the public bound
        # when there is one: then nothing released is a function of the exact count.
        self.plan_per_round = TrainingPlan(1, local_epochs, public_size or units, batch_size,
                                           unit=unit)
        if not (isinstance(max_grad_norm, numbers.Real) and math.isfinite(max_grad_norm)
                and max_grad_norm > 0):
            raise PrivacyError(f"max_grad_norm must be > 0 and finite (got "
                               f"{max_grad_norm!r}): the noise is scaled to the clip, so only "
                               "a finite clip bounds a step.")
        limit = MAX_ACCOUNTED_NOISE
        if isinstance(noise_multiplier, numbers.Real) and noise_multiplier > limit:
            raise PrivacyError(
                f"noise_multiplier {noise_multiplier!r} is above {limit:g}: noise that large "
                "drowns every update (and overflows the float32 step), and the accountants "
                "credit nothing above it")
        # Validates noise multiplier and delta with clear messages.
        self.plan_per_round.round_event(noise_multiplier, max_grad_norm=max_grad_norm, delta=delta)
        check_privatisable(model)
        check_layers(model, grad_sample_mode)
        self.loss_reduction = reduction
        self.public_buffers = tuple(public_buffers)

        self.device = resolve_device(device)
        self.model = model.to(self.device)
        self.optimizer = optimizer
        self.data_loader = data_loader
        self.criterion = criterion if criterion is not None else nn.CrossEntropyLoss()
        self.noise_multiplier = float(noise_multiplier)
        self.max_grad_norm = float(max_grad_norm)
        self.delta = as_python_float(delta)
        self.local_epochs = int(local_epochs)
        self.budget = budget
        self.accountant = accountant
        self.grad_sample_mode = grad_sample_mode
        self.grad_samplers = grad_samplers
        self.secure_noise = secure_noise
        #: Draw each step's noise during the step before (``None``: when a core is free
        #: of torch's threads and the model is small enough,
        #: :data:`bract.privacy.noise.PREFETCH_MAX_PARAMS`;
        #: :class:`bract.privacy.noise.NoisePrefetcher`).
        self.noise_prefetch = noise_prefetch
        self.rule_overlap = rule_overlap
        try:
            #: Parts each step's batch is cut into, each part's passes on its own thread
            #: (``None``: :func:`bract.privacy.batch_parts.default_batch_parts`).
            self.batch_parts = check_batch_parts(batch_parts)
        except ValueError as exc:
            raise PrivacyError(str(exc)) from None
        if self.batch_parts is not None and self.batch_parts > 1:
            if self.grad_sample_mode != "bk":
                raise PrivacyError(
                    f"batch_parts={self.batch_parts} needs book-keeping clipping "
                    f"(grad_sample_mode='bk'), not {self.grad_sample_mode!r}")
            if rule_overlap:
                raise PrivacyError(
                    "rule_overlap=True and batch_parts > 1 both want the second core: "
                    "a batch in parts keeps each part's rules in its own pass; choose one")
        if sampling_seed is not None and self.noise_multiplier != 0:
            raise PrivacyError(
                "a fixed sampling seed makes every batch predictable, which voids the privacy "
                "amplification of Poisson sampling; it is only accepted for non-private runs "
                "(noise multiplier 0), e.g. to compare aggregation methods exactly."
            )
        self.sampling_seed = sampling_seed
        self.client_id = client_id
        self.ledger = ledger if ledger is not None else PrivacyLedger(client_id)
        self._noise_source = SecureGaussian() if secure_noise else None
        #: Set only by the white-box audit (:mod:`bract.audit.whitebox`): called with the
        #: DP optimizer before each round's first step, to insert gradient canaries.
        self._audit_hook: Callable[[Any], None] | None = None
        x, y = probe_x.to(self.device), probe_y.to(self.device)
        #: input elements of one example (what ``batch_parts=None`` weighs)
        self._example_elements = int(x[0].numel())
        probe(self.model, x, y, self.criterion, mode=self.grad_sample_mode,
              public_buffers=self.public_buffers)
        #: the sensitivity probe's public synthetic batch (never patient records)
        self._probe_batch = (x, y)
        #: digest of the global weights :meth:`load_global_weights` checked and probed
        #: (``None`` once a round used them, or before any)
        self._probed_digest: bytes | None = None

    def load_global_weights(self, global_weights: Mapping[str, np.ndarray]) -> None:
        """Check ``global_weights`` (finite in the model's dtypes), load them into the
        model and probe the model with them (:meth:`_probe_loaded_weights`); a refusal
        raises :class:`PrivacyError` before any record is read.

        Guarantee: a later :meth:`train_round` given the same weights (equal names,
        dtypes, shapes and bytes) loads them again, restoring exactly the state probed
        here, and neither checks nor probes them a second time; any other weights are
        checked and probed there as usual."""
        check_finite_weights(global_weights, self.model)
        load_weights(self.model, global_weights)
        self._probe_loaded_weights()
        self._probed_digest = _weights_digest(global_weights)

    def _probe_loaded_weights(self) -> None:
        """Global weights can switch how a forward pass treats a batch (a buffer flag, a
        gate parameter that starts at zero): the probe's verdict holds for the weights
        it saw, so the model is probed again with the weights a round loads, before any
        step (a refusal raises :class:`PrivacyError`, before the budget check records
        anything). It runs on the public synthetic batch: its verdict depends on the
        model and the weights only, never on the hospital's data."""
        x, y = self._probe_batch
        probe(self.model, x, y, self.criterion, mode=self.grad_sample_mode,
              public_buffers=self.public_buffers)

    # ------------------------------------------------------------------ accounting
    def planned_event(self, round: int) -> DpSgdEvent:
        """The ledger event the next round will record if it trains."""
        return self.plan_per_round.round_event(
            self.noise_multiplier,
            max_grad_norm=self.max_grad_norm,
            delta=self.delta,
            round=round,
            client_id=self.client_id,
        )

    def check_budget(self, round: int, also: Sequence[DpSgdEvent] = ()) -> BudgetDecision:
        """Would the next round (its DP-SGD and the events ``also`` released with it, e.g.
        a metrics release) stay within budget? Never trains, never raises for a refusal;
        raises :class:`PrivacyError` when the ledger protects another privacy unit than
        this trainer (they do not compose into one epsilon)."""
        check_unit(self.ledger.events, self.privacy_unit, self.legacy_ledger_unit)
        check_unit(also, self.privacy_unit)
        planned = self.planned_event(round)
        if self.budget is not None:
            return self.budget.check(self.ledger, (*also, planned))
        spent = self.ledger.epsilon(self.delta, self.accountant)
        after_ledger = self.ledger
        for event in (*also, planned):
            after_ledger = after_ledger.append(event)
        after = after_ledger.epsilon(self.delta, self.accountant)
        reason = (
            "NON-PRIVATE: noise multiplier 0; no differential privacy."
            if not all(e.is_private for e in (*also, planned))
            else f"ok: no budget set; epsilon {spent:.4g} -> {after:.4g}."
        )
        return BudgetDecision(True, spent, after, math.inf, self.delta, self.accountant, reason)

    def epsilon(self, delta: float | None = None) -> float:
        """Epsilon of everything this hospital has trained so far (all rounds)."""
        return self.ledger.epsilon(self.delta if delta is None else delta, self.accountant)

    # -------------------------------------------------------------------- training
    def weights(self) -> Weights:
        """Current model weights as named numpy arrays."""
        return weights_of(self.model)

    def train_round(
        self,
        round: int,
        global_weights: Mapping[str, np.ndarray] | None = None,
        on_step: Callable[[int, int], None] | None = None,
        also: Sequence[DpSgdEvent] = (),
    ) -> RoundOutcome:
        """Load the global weights, check the budget, run DP-SGD, record the event.

        ``also``: events released with this round's update (its metrics release);
        the budget check covers them with the DP-SGD event and they are recorded
        before it. A refusal returns ``trained=False`` with the reason in
        ``decision`` and leaves the ledger and weights untouched.

        Guarantee: the ledger covers every DP-SGD step that changed the model. A round
        that stops part-way (an error, a failing ``on_step``, Ctrl-C) records the steps
        that reached the optimizer (a step that failed inside it counts) as its event,
        and the error propagates: the weights it leaves are then accounted for, and
        ``also`` (released only with a finished round's update) is not recorded.
        """
        start = time.perf_counter()
        if global_weights is not None:
            if _weights_digest(global_weights) == self._probed_digest:
                # load_global_weights checked and probed these very weights this round
                # (the probe runs on a copy, so loading them restores what it saw).
                load_weights(self.model, global_weights)
            else:
                check_finite_weights(global_weights, self.model)
                load_weights(self.model, global_weights)
                self._probe_loaded_weights()
        self._probed_digest = None  # a probe's verdict serves one round
        also = tuple(also)
        if any(e.client_id != self.client_id for e in also):
            raise PrivacyError("an event released with this round belongs to another hospital")
        decision = self.check_budget(round, also)
        # The budget may use another accountant or delta than this trainer reports.
        same_measure = (decision.accountant, decision.delta) == (self.accountant, self.delta)
        if not decision.allowed:
            spent = decision.epsilon_spent if same_measure else self.epsilon()
            return RoundOutcome(
                False, decision, None, 0, None, spent, math.nan,
                time.perf_counter() - start,
            )
        planned = self.planned_event(round)
        self._steps_taken = 0
        try:
            steps, loss = self._run_dp_sgd(on_step)
        except BaseException:
            if self._steps_taken:  # the model moved: what moved it is on the ledger
                self.ledger = self.ledger.append(
                    dataclasses.replace(planned, steps=self._steps_taken))
            raise
        event = dataclasses.replace(planned, steps=steps)
        for extra in also:
            self.ledger = self.ledger.append(extra)
        self.ledger = self.ledger.append(event)
        eps = (
            decision.epsilon_after
            if steps == planned.steps and same_measure
            else self.epsilon()
        )
        return RoundOutcome(
            True, decision, self.weights(), self.plan_per_round.dataset_size, event, eps, loss,
            time.perf_counter() - start, also,
        )

    def _run_dp_sgd(self, on_step: Callable[[int, int], None] | None) -> tuple[int, float]:
        from opacus import PrivacyEngine

        from bract.privacy import grad_samplers

        if self.grad_samplers == "bract":
            grad_samplers.install()
        else:
            grad_samplers.restore_opacus()
        self.model.train()
        self.optimizer.state.clear()  # local optimizer state starts fresh each round (FedAvg)
        opacus_mode = "ghost" if self.grad_sample_mode == "bk" else self.grad_sample_mode
        with warnings.catch_warnings():
            # Opacus warns that its secure_mode is off: bract's own CSPRNG noise replaces it.
            warnings.simplefilter("ignore")
            engine = PrivacyEngine(accountant="prv")
            engine.accountant.history = compress(self.ledger.events)
            made = engine.make_private(
                module=self.model,
                optimizer=self.optimizer,
                data_loader=self.data_loader,
                criterion=self.criterion,
                noise_multiplier=self.noise_multiplier,
                max_grad_norm=self.max_grad_norm,
                loss_reduction=self.loss_reduction,
                poisson_sampling=True,
                # Book-keeping reuses ghost clipping's optimizer, loss and loader: only
                # how the clipped gradient sum reaches .grad differs (one backward pass).
                grad_sample_mode=opacus_mode,
                wrap_model=False,
            )
        from bract.privacy.clipping import GhostClipping, clip_hooks_safely

        clipper = None
        ghost: GhostClipping | None = None
        if self.grad_sample_mode in ("ghost", "bk"):
            hooks, dp_optimizer, criterion, dp_loader = made
        else:
            hooks, dp_optimizer, dp_loader = made
            criterion = self.criterion
            # An example whose gradient is not finite (weights that overflow on it) adds
            # nothing, instead of turning the sum NaN (bract.privacy.clipping).
            clip_hooks_safely(dp_optimizer)
        if self._noise_source is not None:
            use_secure_noise(dp_optimizer, self._noise_source, prefetch=self.noise_prefetch)
        if self._audit_hook is not None:  # bract.audit.whitebox only
            self._audit_hook(dp_optimizer)
        # Which records a step samples must stay secret (amplification by sampling):
        # Opacus's sampler is torch's Mersenne Twister; draw the batches from an
        # AES-CTR keystream keyed from the OS instead (a fixed key only for a
        # non-private run's reproducible batches).
        plan = self.plan_per_round
        key = None if self.sampling_seed is None else key_from_seed(
            self.sampling_seed, self.client_id, len(self.ledger.events))
        if self.patients is None:
            dp_loader = secure_poisson_loader(dp_loader, key, sample_rate=plan.sample_rate,
                                              steps=plan.batches_per_epoch)
        else:  # Poisson over patients; each sampled patient brings all its records
            patient_sampler = PatientPoissonSampler(self.patients, plan.sample_rate,
                                                    plan.batches_per_epoch, key)
            dp_loader = secure_poisson_loader(dp_loader, batch_sampler=patient_sampler)
        # The step divides the noisy clipped sum by the expected batch size; take it
        # from the plan (the public bound, when there is one), never from the exact n.
        dp_optimizer.expected_batch_size = plan.expected_batch_size
        total = self.local_epochs * len(dp_loader)
        noise = getattr(dp_optimizer, "bract_noise", None)
        if isinstance(noise, NoisePrefetcher):
            noise.remaining = total  # no draw for a step that will not happen
        steps, loss_sum, loss_batches = 0, 0.0, 0
        parts: BatchParts | None = None
        with warnings.catch_warnings():
            # torch notes that the input needs no gradient; expected for DP-SGD hooks.
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            try:
                if self.grad_sample_mode == "bk":
                    from bract.privacy.bookkeeping import (
                        BookKeepingClipper,
                        hand_over_clipped_sums,
                    )

                    # Opacus's two-pass hooks come off (they would wrap every layer's
                    # output for nothing); bract's clipper takes their place.
                    hooks.remove_hooks()
                    # Decided after the noise's own choice above, with torch's threads
                    # as the step's other work will find them.
                    count = (self.batch_parts if self.batch_parts is not None
                             else default_batch_parts(
                                 self.device, "bk", self.rule_overlap,
                                 self._example_elements,
                                 plan.dataset_size * plan.sample_rate))
                    clipper = BookKeepingClipper(
                        self.model, self.max_grad_norm,
                        overlap=False if count > 1 else self.rule_overlap)
                    hand_over_clipped_sums(dp_optimizer)
                    if count > 1:
                        parts = BatchParts(clipper, count)
                        if self._noise_source is not None:
                            # The parts' threads also share out the step's noise (the
                            # same samples as one thread's; SecureGaussian.threads).
                            self._noise_source.threads = count

                        # Opacus's loss wrapper switches the criterion's reduction to
                        # "none" and back around each call: one part at a time.
                        criterion_lock = threading.Lock()

                        def per_example_loss(xb: torch.Tensor, yb: torch.Tensor
                                             ) -> torch.Tensor:
                            out = self.model(xb)
                            with criterion_lock:
                                loss = criterion(out, yb)
                            _check_per_example_loss(loss.loss_per_sample, len(yb))
                            return loss.loss_per_sample
                elif self.grad_sample_mode == "ghost":
                    # Opacus's two passes, with each example's contribution bounded
                    # whatever the weights (bract.privacy.clipping).
                    ghost = GhostClipping(self.model, self.max_grad_norm)
                for _epoch in range(self.local_epochs):
                    for x, y in dp_loader:
                        x, y = x.to(self.device), y.to(self.device)
                        # set_to_none: no mode reads the previous .grad (book-keeping
                        # writes it whole), so zero-filling it would be wasted work.
                        dp_optimizer.zero_grad(set_to_none=True)
                        # Each patient's gradient is the sum of its records'; clipping it
                        # then bounds what one patient adds.
                        groups = (None if self.patients is None
                                  else patient_sampler.groups.popleft())
                        if parts is not None:
                            # The forward and backward passes of the batch's parts at once.
                            per_example = parts.step(per_example_loss, x, y, groups)
                            loss_value = (per_example.mean() if self.loss_reduction == "mean"
                                          else per_example.sum())
                        else:
                            loss = criterion(self.model(x), y)
                            if self.grad_sample_mode in ("ghost", "bk"):
                                _check_per_example_loss(loss.loss_per_sample, len(y))
                            if clipper is not None:
                                clipper.backward(loss.loss_per_sample, len(y), groups=groups)
                            elif ghost is not None:
                                ghost.backward(loss)
                            else:
                                loss.backward()
                                if groups is not None:
                                    group_grad_samples(self.model, groups)
                            loss_value = loss.detach()
                        self._steps_taken = steps + 1  # counted even if the step fails
                        dp_optimizer.step()
                        steps += 1
                        if len(y) > 0:
                            loss_sum += float(loss_value)
                            loss_batches += 1
                        if on_step is not None:
                            on_step(steps, total)
            finally:
                if parts is not None:
                    parts.close()  # no part's thread outlives the round
                    if self._noise_source is not None:
                        self._noise_source.threads = 1
                        self._noise_source.close()
                if isinstance(noise, NoisePrefetcher):
                    noise.close()  # no draw left running after the round
                dp_optimizer.zero_grad(set_to_none=True)
                if clipper is not None:
                    clipper.remove()
                if ghost is not None:
                    ghost.remove()
                hooks.cleanup()
        return steps, (loss_sum / loss_batches if loss_batches else math.nan)

