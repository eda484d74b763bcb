"""DP noise from a cryptographically secure generator.

Opacus draws DP-SGD noise from torch's Mersenne Twister (or, in ``secure_mode``,
from torchcsprng, which no longer installs). A Mersenne Twister's state can be
recovered from its outputs, and whoever knows the state can subtract the noise
from a released update and undo the privacy guarantee.

:class:`SecureGaussian` draws Gaussian noise from an AES-256-CTR keystream
(pyca ``cryptography``) keyed with 32 bytes from ``os.urandom``:

* **Protects against**: prediction or reconstruction of the noise by anyone who
  sees model updates, the code, the seeds used for data shuffling, or earlier
  noise — under the assumption that AES-256 is a pseudorandom permutation and
  the operating system's entropy source is sound. The key never leaves the
  process and is not derivable from any output.
* **Does not protect against**: floating-point attacks on the *sampler itself*
  (Mironov 2012; Jin et al. 2022): Box-Muller in float64 rounded to float32 does
  not produce an exact Gaussian, and the set of reachable values around a
  gradient can, in principle, leak information. The float64 intermediate makes
  the gaps far finer than float32 gradients, but this is mitigation, not a proof.
  It also does not protect against side channels in the host (timing, memory
  disclosure of the key) or a compromised host.
"""

from __future__ import annotations

import os
from types import MethodType
from typing import Any

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

_TWO_PI = 2.0 * np.pi
_INV_2_53 = 1.0 / float(1 << 53)


class SecureGaussian:
    """A stream of standard-normal samples from an AES-256-CTR keystream.

    Each instance keys itself from ``os.urandom(32)`` and never repeats keystream
    bytes. Not thread-safe: use one instance per training loop.
    """

    def __init__(self) -> None:
        cipher = Cipher(algorithms.AES(os.urandom(32)), modes.CTR(b"\x00" * 16))
        self._encryptor = cipher.encryptor()

    def _uint64(self, count: int) -> np.ndarray:
        raw = self._encryptor.update(bytes(8 * count))
        return np.frombuffer(raw, dtype=np.uint64)

    def standard_normal(self, count: int) -> np.ndarray:
        """``count`` independent N(0, 1) samples as float64 (Box-Muller, 53-bit uniforms)."""
        if count < 0:
            raise ValueError(f"count must be >= 0 (got {count})")
        pairs = (count + 1) // 2
        bits = self._uint64(2 * pairs)
        # u1 in (0, 1] (never 0, so log is finite), u2 in [0, 1).
        u1 = ((bits[:pairs] >> np.uint64(11)).astype(np.float64) + 1.0) * _INV_2_53
        u2 = (bits[pairs:] >> np.uint64(11)).astype(np.float64) * _INV_2_53
        radius = np.sqrt(-2.0 * np.log(u1))
        angle = _TWO_PI * u2
        out = np.empty(2 * pairs, dtype=np.float64)
        out[:pairs] = radius * np.cos(angle)
        out[pairs:] = radius * np.sin(angle)
        return out[:count]

    def normal_like(self, reference: torch.Tensor, std: float) -> torch.Tensor:
        """N(0, std^2) noise with ``reference``'s shape, dtype and device."""
        if std == 0:
            return torch.zeros_like(reference)
        samples = self.standard_normal(reference.numel()) * float(std)
        noise = torch.from_numpy(samples.astype(np.float32 if reference.dtype != torch.float64
                                                else np.float64))
        return noise.view(reference.shape).to(device=reference.device, dtype=reference.dtype)


def use_secure_noise(optimizer: Any, source: SecureGaussian | None = None) -> SecureGaussian:
    """Make an Opacus ``DPOptimizer`` draw its DP noise from ``source``.

    Replaces the optimizer instance's ``add_noise`` with one that is identical to
    Opacus's (same standard deviation ``noise_multiplier * max_grad_norm``, same
    bookkeeping flags) except that the noise comes from :class:`SecureGaussian`.
    Works for the hooks, functorch, ew and ghost (fast gradient clipping) modes.
    """
    from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

    if not hasattr(optimizer, "noise_multiplier") or not hasattr(optimizer, "params"):
        raise TypeError(
            "use_secure_noise expects an Opacus DPOptimizer (returned by make_private), "
            f"got {type(optimizer).__name__}"
        )
    noise_source = source or SecureGaussian()

    def add_noise(self: Any) -> None:
        multiplier = getattr(self, "_adjusted_noise_multiplier", self.noise_multiplier)
        std = multiplier * self.max_grad_norm
        for p in self.params:
            _check_processed_flag(p.summed_grad)
            noise = noise_source.normal_like(p.summed_grad, std)
            p.grad = (p.summed_grad + noise).view_as(p)
            _mark_as_processed(p.summed_grad)

    optimizer.add_noise = MethodType(add_noise, optimizer)
    return noise_source
