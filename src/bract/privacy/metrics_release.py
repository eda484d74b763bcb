"""A hospital's metrics, released with differential privacy and accounted.

What it releases, per round: five noised sums over the hospital's data, in
:data:`RELEASED_METRICS` order — the training loss summed over its training
records, their count, and on its held-out split the summed loss, the correct
predictions and the count — all of the global model it received that round.

The guarantee: each privacy unit (a record, or under patient-level privacy a
patient, whose records may lie in both splits) contributes one vector, scaled
(losses divided by ``loss_bound`` after clipping each to ``[0, loss_bound]``) and
clipped as a whole to L2 norm :data:`UNIT_CLIP`; Gaussian noise of standard
deviation ``noise_multiplier * UNIT_CLIP`` is added to each scaled sum, from
bract's CSPRNG. That is a Gaussian mechanism of noise multiplier
``noise_multiplier`` under add/remove of one unit; :meth:`MetricsRelease.event`
describes it as a ledger event (``mechanism="metrics"``, sample rate 1, one
step), which the hospital's budget check, calibration and ledger compose with its
DP-SGD. Like DP-SGD's, the guarantee holds for neighbouring datasets whose other
units keep their side of the training / held-out split: bract's loaders decide each
unit's side by its own identity (:mod:`bract.data.holdout`), and a hospital's own
loader must do the same.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from bract.privacy.accounting import DpSgdEvent, PrivacyError

__all__ = [
    "DEFAULT_LOSS_BOUND",
    "DEFAULT_METRICS_NOISE",
    "RELEASED_METRICS",
    "UNIT_CLIP",
    "MetricsRelease",
    "per_record_metrics",
    "unit_sums",
]

#: The released sums, in order (a secure sum of them gives the federation's totals).
RELEASED_METRICS = ("train-loss-sum", "train-examples", "eval-loss-sum", "eval-correct",
                    "eval-examples")
#: L2 bound of one unit's scaled metric vector: a held-out record's (loss/L, correct, 1)
#: reaches it; a training record's (loss/L, 1) stays within sqrt(2).
UNIT_CLIP = math.sqrt(3.0)
#: Default noise multiplier of the release: 3 rounds cost epsilon 0.62 alone at delta 1e-5.
DEFAULT_METRICS_NOISE = 10.0
#: Default bound a record's loss is clipped to before it is summed.
DEFAULT_LOSS_BOUND = 4.0
#: Records per forward pass when the metrics are computed.
_BATCH = 256


@dataclass(frozen=True)
class MetricsRelease:
    """How a hospital releases its metrics: the noise multiplier of the Gaussian
    release and the bound each record's loss is clipped to.

    Guarantee: :meth:`release` is a Gaussian mechanism with noise multiplier
    ``noise_multiplier`` per privacy unit (see the module's docstring), recorded
    exactly by :meth:`event`.
    """

    noise_multiplier: float = DEFAULT_METRICS_NOISE
    loss_bound: float = DEFAULT_LOSS_BOUND

    def __post_init__(self) -> None:
        for name in ("noise_multiplier", "loss_bound"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                    math.isfinite(value) and value > 0):
                raise PrivacyError(f"metrics release: {name} must be a finite number > 0 "
                                   f"(got {value!r}); to release nothing, keep metrics home")

    def event(self, round: int, delta: float, client_id: str, unit: str) -> DpSgdEvent:
        """The ledger event one release spends (``unit``: what each clipped metric
        vector belongs to, a record or a patient)."""
        return DpSgdEvent(float(self.noise_multiplier), 1.0, 1, UNIT_CLIP, delta, round=round,
                          client_id=client_id, mechanism="metrics", unit=unit)

    def release(
        self, model: Any, criterion: Any, train: Any, held_out: Any = None, *,
        train_units: Sequence[Hashable] | None = None,
        held_out_units: Sequence[Hashable] | None = None,
        collate: Callable | None = None, noise: Any = None,
    ) -> dict[str, float]:
        """The noised sums of :data:`RELEASED_METRICS` for ``model`` on the training
        dataset ``train`` and the optional ``held_out`` dataset (items ``(x, y)``).

        ``train_units``/``held_out_units``: the privacy unit (patient) of each record;
        ``None`` makes each record its own unit. ``noise``: a
        :class:`bract.privacy.noise.SecureGaussian` (a fresh one by default).
        """
        from bract.privacy.noise import SecureGaussian

        train_loss, _ = per_record_metrics(model, criterion, train, collate)
        if held_out is not None and len(held_out):
            held_loss, held_correct = per_record_metrics(model, criterion, held_out, collate)
        else:
            held_loss, held_correct = np.zeros(0), np.zeros(0)
        if train_units is not None and held_out_units is None and len(held_loss):
            raise PrivacyError(
                "metrics release: the privacy unit is the patient, but the held-out records "
                "name no patient; give held-out patient ids (FederatedDataset test_columns "
                "'patient_id'), or keep metrics home")
        scaled = unit_sums(train_loss, held_loss, held_correct, self.loss_bound,
                           train_units, held_out_units)
        source = noise if noise is not None else SecureGaussian()
        scaled = scaled + source.standard_normal(len(scaled)) * (
            self.noise_multiplier * UNIT_CLIP)
        scale = np.array([self.loss_bound, 1.0, self.loss_bound, 1.0, 1.0])
        return dict(zip(RELEASED_METRICS, (float(v) for v in scaled * scale), strict=True))


def per_record_metrics(model: Any, criterion: Any, dataset: Any,
                       collate: Callable | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Each record's loss under ``criterion`` (``reduction='none'``, averaged over any
    non-batch dimensions) and whether ``model`` classified it correctly (0 for a model
    whose output is not one score per class), for ``model`` in eval mode."""
    import torch

    if criterion is None:
        criterion = torch.nn.CrossEntropyLoss()
    if not hasattr(criterion, "reduction"):
        raise PrivacyError(
            f"metrics release: the criterion {type(criterion).__name__} has no `reduction` "
            "attribute, so no loss per record can be computed; use a torch.nn loss or keep "
            "metrics home")
    per_record = copy.copy(criterion)
    per_record.reduction = "none"
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=_BATCH, shuffle=False,
        collate_fn=collate or torch.utils.data.default_collate)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    losses, correct = [], []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in loader:
                if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
                    raise PrivacyError(
                        f"metrics release: a batch is a {type(batch).__name__}, not an "
                        "(inputs, labels) pair")
                x, y = (t.to(device) if isinstance(t, torch.Tensor) else t for t in batch)
                out = model(x)
                loss = per_record(out, y)
                n = len(out)
                if loss.numel() % max(n, 1) or (loss.ndim and loss.shape[0] != n):
                    raise PrivacyError(
                        f"metrics release: the criterion gave a loss of shape "
                        f"{tuple(loss.shape)} with reduction='none' for {n} records; it must "
                        "give one loss per record")
                losses.append(loss.reshape(n, -1).double().mean(1).cpu().numpy())
                if (out.ndim == 2 and out.shape[1] > 1 and isinstance(y, torch.Tensor)
                        and y.ndim == 1 and not y.is_floating_point()):
                    correct.append((out.argmax(1) == y).double().cpu().numpy())
                else:
                    correct.append(np.zeros(n))
    finally:
        model.train(was_training)
    if not losses:
        return np.zeros(0), np.zeros(0)
    return np.concatenate(losses), np.concatenate(correct)


def unit_sums(
    train_loss: np.ndarray, held_loss: np.ndarray, held_correct: np.ndarray,
    loss_bound: float, train_units: Sequence[Hashable] | None = None,
    held_out_units: Sequence[Hashable] | None = None,
) -> np.ndarray:
    """The scaled sums of :data:`RELEASED_METRICS`, before noise.

    Guarantee (the mechanism's sensitivity): every privacy unit contributes one vector
    of L2 norm at most :data:`UNIT_CLIP`, so adding or removing a unit with all its
    records moves the result by at most :data:`UNIT_CLIP`. Records are their own units
    when ``train_units``/``held_out_units`` are ``None``; ids equal across the two
    splits are one unit. A non-finite loss counts as ``loss_bound``.
    """
    def scaled_loss(loss: np.ndarray) -> np.ndarray:
        loss = np.nan_to_num(np.asarray(loss, np.float64), nan=loss_bound, posinf=loss_bound,
                             neginf=0.0)
        return np.clip(loss, 0.0, loss_bound) / loss_bound

    n_train, n_held = len(train_loss), len(held_loss)
    if len(held_correct) != n_held:
        raise PrivacyError("metrics release: one correctness value per held-out record")
    rows = np.zeros((n_train + n_held, len(RELEASED_METRICS)))
    rows[:n_train, 0] = scaled_loss(train_loss)
    rows[:n_train, 1] = 1.0
    rows[n_train:, 2] = scaled_loss(held_loss)
    rows[n_train:, 3] = np.clip(np.asarray(held_correct, np.float64), 0.0, 1.0)
    rows[n_train:, 4] = 1.0
    if train_units is None and held_out_units is None:
        units = np.arange(n_train + n_held)
    else:
        if train_units is None or held_out_units is None:
            raise PrivacyError("metrics release: give the unit of every record in both "
                               "splits, or of none")
        if (len(train_units), len(held_out_units)) != (n_train, n_held):
            raise PrivacyError("metrics release: one unit id per record")
        index: dict[Hashable, int] = {}
        units = np.asarray([index.setdefault(u, len(index))
                            for u in (*train_units, *held_out_units)], dtype=np.int64)
    per_unit = np.zeros((int(units.max()) + 1 if len(units) else 0, rows.shape[1]))
    np.add.at(per_unit, units, rows)
    norms = np.linalg.norm(per_unit, axis=1)
    factor = np.minimum(1.0, UNIT_CLIP / np.maximum(norms, 1e-300))
    return (per_unit * factor[:, None]).sum(axis=0)
