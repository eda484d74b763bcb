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

import math
import os
from types import MethodType
from typing import Any

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

_TWO_PI = 2.0 * math.pi
_INV_2_53 = 1.0 / float(1 << 53)
_MASK_53 = (1 << 53) - 1
#: Keystream is made by encrypting this many zero bytes at a time.
_CHUNK = 1 << 20
_ZEROS = bytes(_CHUNK)


class SecureGaussian:
    """A stream of standard-normal samples from an AES-256-CTR keystream.

    Each instance keys itself from ``os.urandom(32)`` and never repeats keystream
    bytes. Not thread-safe: use one instance per training loop.
    """

    def __init__(self) -> None:
        cipher = Cipher(algorithms.AES(os.urandom(32)), modes.CTR(b"\x00" * 16))
        self._encryptor = cipher.encryptor()

    def _keystream_int64(self, count: int) -> torch.Tensor:
        """``count`` fresh 64-bit words of keystream (as int64: the same bits), in a
        new writable buffer; zeros are encrypted a chunk at a time."""
        nbytes = 8 * count
        buf = bytearray(nbytes + 16)  # update_into needs block_size - 1 spare bytes
        view = memoryview(buf)
        for i in range(0, nbytes, _CHUNK):
            k = min(_CHUNK, nbytes - i)
            self._encryptor.update_into(_ZEROS[:k], view[i:i + k + 15])
        return torch.frombuffer(buf, dtype=torch.int64, count=count) if count else torch.empty(
            0, dtype=torch.int64)

    def standard_normal_tensor(self, count: int) -> torch.Tensor:
        """``count`` independent N(0, 1) samples as a float64 CPU tensor (Box-Muller on
        53-bit uniforms; torch's vectorised float64 log/sqrt/cos/sin, in place)."""
        if count < 0:
            raise ValueError(f"count must be >= 0 (got {count})")
        pairs = (count + 1) // 2
        words = self._keystream_int64(2 * pairs)
        # The top 53 bits of each unsigned word: an arithmetic shift, then a mask.
        uniform = words.bitwise_right_shift_(11).bitwise_and_(_MASK_53).to(torch.float64)
        radius, angle = uniform[:pairs], uniform[pairs:]
        # u1 = (m + 1) / 2^53 in (0, 1]: never 0, so the log is finite; u2 = m / 2^53 in [0, 1).
        radius.add_(1.0).mul_(_INV_2_53).log_().mul_(-2.0).sqrt_()
        angle.mul_(_INV_2_53).mul_(_TWO_PI)
        out = torch.empty(2 * pairs, dtype=torch.float64)
        torch.cos(angle, out=out[:pairs])
        torch.sin(angle, out=out[pairs:])
        out[:pairs].mul_(radius)
        out[pairs:].mul_(radius)
        return out[:count]

    def standard_normal(self, count: int) -> np.ndarray:
        """``count`` independent N(0, 1) samples as float64 (Box-Muller, 53-bit uniforms)."""
        return self.standard_normal_tensor(count).numpy()

    def normal_like(self, reference: torch.Tensor, std: float) -> torch.Tensor:
        """N(0, std^2) noise with ``reference``'s shape, dtype and device."""
        if std == 0:
            return torch.zeros_like(reference)
        samples = self.standard_normal_tensor(reference.numel()).mul_(float(std))
        dtype = torch.float64 if reference.dtype == torch.float64 else torch.float32
        noise = samples.to(dtype)
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
