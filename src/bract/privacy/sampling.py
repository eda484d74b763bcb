"""Poisson sampling of DP-SGD batches from a cryptographically secure generator.

DP-SGD's privacy amplification by sampling holds only if nobody can tell which
records a step used: the batch must be a secret Poisson sample (each record in
independently with probability q). Opacus draws it with ``torch.rand`` from a
``torch.Generator``, a Mersenne Twister seeded with 64 bits (and keeping 32 of
them): its state is recoverable from outputs, and a public or guessable seed
gives the batches away.

:class:`SecurePoissonSampler` draws every inclusion decision from an AES-256-CTR
keystream (pyca ``cryptography``), keyed with 32 bytes from ``os.urandom`` - the
same kind of generator as the noise (:mod:`bract.privacy.noise`). A record is in
a step's batch when the 53-bit uniform made from its 64-bit keystream word is
below q (probability q to within 2^-53).

Protects against prediction of the batches by anyone who knows the code, torch's
seed or earlier batches, assuming AES-256 is a pseudorandom permutation and the
OS entropy source is sound. Only a non-private run (noise multiplier 0) may fix
the key (:func:`key_from_seed`), to make runs reproducible.
"""

from __future__ import annotations

import hashlib
import os
from collections import deque
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from torch import nn
from torch.utils.data import DataLoader, Sampler

from bract.privacy.accounting import PrivacyError

__all__ = ["PatientPoissonSampler", "Patients", "SecurePoissonSampler", "group_grad_samples",
           "key_from_seed", "secure_poisson_loader"]

_INV_2_53 = 1.0 / float(1 << 53)


def key_from_seed(seed: int, *context: object) -> bytes:
    """A fixed 32-byte key for a reproducible (non-private) run's batches."""
    return hashlib.sha256(":".join(str(c) for c in (seed, *context)).encode()).digest()


class SecurePoissonSampler(Sampler[list[int]]):
    """``steps`` batches of indices into ``num_samples`` records, each record in each
    batch independently with probability ``sample_rate``, from an AES-256-CTR
    keystream keyed with ``key`` (default: 32 fresh bytes from ``os.urandom``).

    Batches may be empty (Poisson sampling); the keystream never repeats within
    one sampler, so every step's decisions are fresh.
    """

    def __init__(self, num_samples: int, sample_rate: float, steps: int,
                 key: bytes | None = None) -> None:
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate must lie in (0, 1], got {sample_rate}")
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if key is not None and len(key) != 32:
            raise ValueError("the sampler's key must be 32 bytes")
        self.num_samples = int(num_samples)
        self.sample_rate = float(sample_rate)
        self.steps = int(steps)
        cipher = Cipher(algorithms.AES(key or os.urandom(32)), modes.CTR(b"\x00" * 16))
        self._encryptor = cipher.encryptor()
        self._zeros = bytes(8 * self.num_samples)

    def __len__(self) -> int:
        return self.steps

    def draw(self) -> np.ndarray:
        """One batch: the indices of the records the next step includes."""
        words = np.frombuffer(self._encryptor.update(self._zeros), dtype=np.uint64)
        uniform = (words >> np.uint64(11)).astype(np.float64) * _INV_2_53
        return np.flatnonzero(uniform < self.sample_rate)

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.steps):
            yield self.draw().tolist()


@dataclass(frozen=True)
class Patients:
    """Which records belong to which patient: ``records[p]`` are patient ``p``'s
    record indices (patients numbered in order of first appearance)."""

    records: tuple[np.ndarray, ...]

    @classmethod
    def of(cls, patient_ids: Sequence[Hashable], num_records: int) -> Patients:
        """Group records by patient id (one id per record, in dataset order)."""
        if len(patient_ids) != num_records:
            raise PrivacyError(
                f"{len(patient_ids)} patient ids for {num_records} records: give every "
                "record its patient's id",
                public_reason="the data's patient ids do not match its records: give "
                              "every record its patient's id")
        slot: dict[Hashable, int] = {}
        owner = np.fromiter((slot.setdefault(pid, len(slot)) for pid in patient_ids),
                            dtype=np.int64, count=num_records)
        order = np.argsort(owner, kind="stable")
        bounds = np.searchsorted(owner[order], np.arange(len(slot) + 1))
        return cls(tuple(order[bounds[p]:bounds[p + 1]] for p in range(len(slot))))

    @property
    def count(self) -> int:
        """The number of patients."""
        return len(self.records)


class PatientPoissonSampler(Sampler[list[int]]):
    """Poisson sampling over patients: each step, each patient is in independently
    with probability ``sample_rate`` (from a :class:`SecurePoissonSampler` over
    patients) and brings all its records. For every batch it yields, ``groups``
    receives (in order) each record's position among the step's patients."""

    def __init__(self, patients: Patients, sample_rate: float, steps: int,
                 key: bytes | None = None) -> None:
        self.patients = patients
        self._draw = SecurePoissonSampler(patients.count, sample_rate, steps, key)
        self.sample_rate = float(sample_rate)
        self.steps = int(steps)
        self.groups: deque[torch.Tensor] = deque()

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.steps):
            chosen = self._draw.draw()
            parts = [self.patients.records[p] for p in chosen]
            self.groups.append(torch.as_tensor(np.repeat(np.arange(len(parts)), [
                len(r) for r in parts]) if parts else np.zeros(0, dtype=np.int64)))
            yield np.concatenate(parts).tolist() if parts else []


def group_grad_samples(model: nn.Module, groups: torch.Tensor) -> None:
    """Replace every parameter's per-record gradients (``grad_sample``, Opacus hooks
    mode) by per-patient sums: row ``g`` becomes the sum of the records whose
    ``groups`` entry is ``g``. Opacus's optimizer then clips each patient's gradient."""
    count = int(groups.max()) + 1 if len(groups) else 0
    for p in model.parameters():
        sample = getattr(p, "grad_sample", None)
        if sample is None:
            continue
        if len(sample) != len(groups):
            raise PrivacyError(
                f"a parameter has {len(sample)} per-record gradients for a batch of "
                f"{len(groups)} records",
                public_reason="a parameter's per-record gradients do not match the batch")
        summed = sample.new_zeros((count, *sample.shape[1:]))
        summed.index_add_(0, groups.to(sample.device), sample)
        p.grad_sample = summed


def secure_poisson_loader(loader: DataLoader, key: bytes | None = None, *,
                          sample_rate: float | None = None, steps: int | None = None,
                          batch_sampler: Sampler[list[int]] | None = None) -> DataLoader:
    """``loader`` (Opacus's Poisson ``DPDataLoader``) with its batches drawn by
    ``batch_sampler``, or by a :class:`SecurePoissonSampler` at ``sample_rate`` for
    ``steps`` steps (default: the loader's own); its collate function (which turns an
    empty batch into empty tensors) is kept."""
    old = loader.batch_sampler
    n = len(loader.dataset)  # type: ignore[arg-type]
    rate = float(getattr(old, "sample_rate", 0.0)) if sample_rate is None else sample_rate
    count = len(old) if steps is None else steps  # type: ignore[arg-type]
    return DataLoader(
        loader.dataset,
        batch_sampler=batch_sampler or SecurePoissonSampler(n, rate, count, key),
        collate_fn=loader.collate_fn,
        num_workers=loader.num_workers,
        pin_memory=loader.pin_memory,
        timeout=loader.timeout,
        worker_init_fn=loader.worker_init_fn,
        multiprocessing_context=loader.multiprocessing_context,
        persistent_workers=loader.persistent_workers,
    )
