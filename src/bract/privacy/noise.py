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

import contextlib
import math
import os
import queue
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from types import MethodType
from typing import Any

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from bract.privacy.threads import core_is_free

_TWO_PI = 2.0 * math.pi
_INV_2_53 = 1.0 / float(1 << 53)
_MASK_53 = (1 << 53) - 1
#: Samples made per block: keystream, uniforms and normals of one block live in three
#: buffers of 1 MiB each that every call reuses (no fresh allocation, no page faults,
#: cache-resident), whatever the parameter count.
BLOCK = 1 << 17
_ZEROS = bytes(8 * BLOCK)
#: Blocks whose keystream goes to another device (a GPU) in one copy: its words are
#: made here, on the CPU (AES-CTR through ``cryptography``), and the Box-Muller
#: arithmetic runs on that device, a chunk of 32 blocks (4M samples, 32 MiB of
#: keystream) at a time.
DEVICE_CHUNK_BLOCKS = 32
#: Largest model whose noise is drawn a step ahead by default. Measured on the 2-core
#: VM with one torch thread (docs/benchmarks.md): ahead is clearly faster for the
#: 0.34M parameters of the 28px CNN (its float64 buffer, 2.8 MB, stays in cache); for
#: the 7.1M of the 128px CNN (a 57 MB buffer streamed through memory while the step
#: runs) ahead and block by block inside the step trade places from run to run by
#: less than the machine's spread. The threshold is a choice, not a measurement.
PREFETCH_MAX_PARAMS = 1 << 20


#: Up to this many entries a float32 target takes torch's mixed-dtype in-place add
#: directly (one kernel instead of three; above it that kernel is the slow one).
_DIRECT_ADD_MAX = 1 << 12


def _add_scaled_(target: torch.Tensor, samples: torch.Tensor, std: float,
                 work: torch.Tensor) -> None:
    """``target += std * samples`` for a contiguous 1-D CPU ``target`` and float64
    ``samples`` of its length: each entry evaluated in float64 and rounded once to
    ``target``'s dtype. A float32 target goes through the float64 ``work`` buffer a
    piece at a time (same-dtype kernels on cache-resident pieces: the mixed-dtype
    in-place add gives the same bits about ten times slower at 7M entries)."""
    if target.dtype == torch.float64 or target.numel() <= _DIRECT_ADD_MAX:
        target.add_(samples, alpha=std)  # a float32 target: the same bits, one kernel
        return
    n, size = target.numel(), work.numel()
    for i in range(0, n, size):
        k = min(size, n - i)
        piece = work[:k]
        piece.copy_(target[i:i + k])
        piece.add_(samples[i:i + k], alpha=std)
        target[i:i + k].copy_(piece)


def _ctr_encryptor(key: bytes, words: int) -> Any:
    """An AES-256-CTR encryptor under ``key`` positioned at 64-bit word ``words`` (even)
    of the keystream that starts from the all-zero counter block: CTR's counter is the
    whole 16-byte block, incremented as a big-endian integer, so word ``w`` lies in
    block ``w // 2``."""
    if words % 2:
        raise ValueError(f"a keystream position is a whole AES block, got word {words}")
    return Cipher(algorithms.AES(key), modes.CTR((words // 2).to_bytes(16, "big"))).encryptor()


def _pieces(flats: list[torch.Tensor], lo: int, hi: int) -> list[torch.Tensor]:
    """The entries ``lo..hi-1`` of ``flats`` taken end to end, as views of them."""
    out, at = [], 0
    for flat in flats:
        n = flat.numel()
        a, b = max(lo, at), min(hi, at + n)
        if a < b:
            out.append(flat[a - at:b - at])
        at += n
    return out


def _add_on_cpu_scaled_(piece: torch.Tensor, samples: torch.Tensor, std: float,
                        work: torch.Tensor) -> None:
    """``piece += std * samples`` rounded once, for a CPU tensor of any floating dtype."""
    if piece.dtype in (torch.float32, torch.float64):
        _add_scaled_(piece, samples, std, work)
    else:
        _add_in_float64_(piece, samples, std)


def _box_muller_(radius: torch.Tensor, angle: torch.Tensor, cos_out: torch.Tensor,
                 sin_out: torch.Tensor) -> None:
    """Box-Muller in float64, in place: ``radius`` and ``angle`` hold 53-bit integers
    m (as float64, exact) and become ``sqrt(-2 log((m + 1) / 2^53))`` and
    ``2 pi m / 2^53``; ``cos_out`` and ``sin_out`` receive the pair's two normals.
    The same operations on every device (tensors of one shape, on one device)."""
    # u1 = (m + 1) / 2^53 in (0, 1]: never 0, so the log is finite; u2 = m / 2^53 in
    # [0, 1); 2*pi*u2 is m * (2*pi / 2^53), rounded once (scaling by 2^-53 is exact).
    radius.add_(1.0).mul_(_INV_2_53).log_().mul_(-2.0).sqrt_()
    angle.mul_(_TWO_PI * _INV_2_53)
    torch.cos(angle, out=cos_out)
    torch.sin(angle, out=sin_out)
    cos_out.mul_(radius)
    sin_out.mul_(radius)


def _add_in_float64_(target: torch.Tensor, samples: torch.Tensor, std: float) -> None:
    """``target += std * samples`` on ``target``'s device, for a 1-D ``target`` of any
    floating dtype and float64 ``samples`` of its length on that device: each entry
    evaluated in float64 and rounded once to ``target``'s dtype."""
    if target.dtype == torch.float64:
        target.add_(samples, alpha=std)
        return
    work = target.to(torch.float64)
    work.add_(samples, alpha=std)
    target.copy_(work)


class SecureGaussian:
    """A stream of standard-normal samples from an AES-256-CTR keystream.

    Each instance keys itself from ``os.urandom(32)`` and never repeats keystream
    bytes (the CTR counter only moves forward). Samples are made in blocks of
    :data:`BLOCK`: within a block, output ``j`` and ``j + BLOCK/2`` are the cosine and
    sine halves of one Box-Muller pair. The keystream is always made on the CPU; for
    a tensor on another device (a GPU) the Box-Muller arithmetic runs there, on the
    same keystream words in the same pairing. Not thread-safe: use one instance per
    training loop.

    ``threads`` (default 1): how many threads the noise for CPU tensors may use. With
    more, the blocks of one call are shared out in contiguous runs, each run's keystream
    made by its own AES-CTR encryptor under the same key started at the counter where
    that run begins in the stream, so every entry gets the sample the one-thread
    stream would give it, bit for bit (property-tested), and the stream goes on after
    the call where it would have. :meth:`close` ends the extra threads.
    """

    def __init__(self, *, threads: int = 1) -> None:
        self._start(os.urandom(32), 0)
        self.threads = threads

    def _start(self, key: bytes, words: int) -> None:
        """Key the stream and position it at word ``words``; fresh buffers, one thread."""
        self._key = key
        #: 64-bit keystream words drawn so far (always even: whole AES blocks)
        self._words_used = words
        self._encryptor = _ctr_encryptor(key, words)
        # update_into needs block_size - 1 spare bytes after the output.
        self._keystream = bytearray(8 * BLOCK + 16)
        self._words = torch.frombuffer(self._keystream, dtype=torch.int64, count=BLOCK)
        self._uniform = torch.empty(BLOCK, dtype=torch.float64)
        self._normal = torch.empty(BLOCK, dtype=torch.float64)
        self._threads = 1
        self._pool: ThreadPoolExecutor | None = None
        #: one generator per extra thread: the same key, its own buffers and encryptor
        self._lanes: list[SecureGaussian] = []

    @property
    def threads(self) -> int:
        """Threads the noise for CPU tensors may use (at least 1)."""
        return self._threads

    @threads.setter
    def threads(self, count: int) -> None:
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"threads must be an int >= 1, got {count!r}")
        self._threads = count

    def close(self) -> None:
        """End the extra threads, if any were started (idempotent; the stream goes on)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self._lanes = []

    def _fresh_words(self, count: int) -> torch.Tensor:
        """``count`` (<= BLOCK) fresh 64-bit keystream words as int64 (the same bits),
        in the reused keystream buffer (valid until the next call)."""
        self._encryptor.update_into(_ZEROS[:8 * count],
                                    memoryview(self._keystream)[:8 * count + 15])
        self._words_used += count
        return self._words[:count]

    def _keystream_int64(self, count: int) -> torch.Tensor:
        """``count`` fresh 64-bit words of keystream (as int64: the same bits), in a
        new tensor, drawn a block at a time as :meth:`_block` draws them (the words
        :meth:`_device_chunks` sends to another device; CPU sampling uses
        :meth:`_block`'s reused buffer)."""
        out = torch.empty(count, dtype=torch.int64)
        for i in range(0, count, BLOCK):
            k = min(BLOCK, count - i)
            out[i:i + k] = self._fresh_words(k)
        return out

    def _block(self, count: int) -> torch.Tensor:
        """``count`` (even, <= BLOCK) fresh N(0, 1) samples, float64, in the reused
        output buffer (valid until the next call): Box-Muller on 53-bit uniforms."""
        pairs = count // 2
        # The top 53 bits of each unsigned word: an arithmetic shift, then a mask.
        words = self._fresh_words(count).bitwise_right_shift_(11).bitwise_and_(_MASK_53)
        uniform = self._uniform[:count]
        uniform.copy_(words)
        out = self._normal[:count]
        _box_muller_(uniform[:pairs], uniform[pairs:], out[:pairs], out[pairs:])
        return out

    def _blocks(self, count: int):
        """Yield ``(offset, samples)`` covering ``count`` fresh N(0, 1) samples."""
        for i in range(0, count, BLOCK):
            k = min(BLOCK, count - i)
            yield i, self._block(k + (k & 1))[:k]

    def _device_chunks(self, count: int, device: torch.device):
        """Yield ``(offset, samples)`` covering ``count`` fresh N(0, 1) samples as float64
        tensors on ``device``: the keystream words :meth:`_blocks` would use, in the same
        blocks and pairs, made here and copied to ``device`` a chunk of
        :data:`DEVICE_CHUNK_BLOCKS` blocks at a time, where Box-Muller runs on them."""
        chunk = DEVICE_CHUNK_BLOCKS * BLOCK
        for start in range(0, count, chunk):
            k = min(chunk, count - start)
            full, rest = divmod(k, BLOCK)
            tail = rest + (rest & 1)  # a block of odd length draws one word more
            words = self._keystream_int64(full * BLOCK + tail)
            uniform = (words.to(device).bitwise_right_shift_(11).bitwise_and_(_MASK_53)
                       .to(torch.float64))
            out = torch.empty_like(uniform)
            if full:
                u = uniform[:full * BLOCK].view(full, BLOCK)
                o = out[:full * BLOCK].view(full, BLOCK)
                half = BLOCK // 2
                _box_muller_(u[:, :half], u[:, half:], o[:, :half], o[:, half:])
            if tail:
                u, o, half = uniform[full * BLOCK:], out[full * BLOCK:], tail // 2
                _box_muller_(u[:half], u[half:], o[:half], o[half:])
            yield start, out[:k]

    def standard_normal_on(self, count: int, device: torch.device | str) -> torch.Tensor:
        """``count`` independent N(0, 1) samples as a float64 tensor on ``device``: the
        keystream made on the CPU, Box-Muller on ``device`` (the same samples as
        :meth:`standard_normal_tensor` would give, up to the device's float64
        ``log``/``sqrt``/``sin``/``cos``)."""
        if count < 0:
            raise ValueError(f"count must be >= 0 (got {count})")
        device = torch.device(device)
        out = torch.empty(count, dtype=torch.float64, device=device)
        for i, samples in self._device_chunks(count, device):
            out[i:i + len(samples)] = samples
        return out

    def standard_normal_tensor(self, count: int) -> torch.Tensor:
        """``count`` independent N(0, 1) samples as a float64 CPU tensor (Box-Muller on
        53-bit uniforms)."""
        if count < 0:
            raise ValueError(f"count must be >= 0 (got {count})")
        out = torch.empty(count, dtype=torch.float64)
        for i, samples in self._blocks(count):
            out[i:i + len(samples)] = samples
        return out

    def fill_standard_normal_(self, out: torch.Tensor) -> torch.Tensor:
        """Fill the contiguous float64 CPU tensor ``out`` with fresh N(0, 1) samples."""
        flat = out.view(-1)
        for i, samples in self._blocks(flat.numel()):
            flat[i:i + len(samples)] = samples
        return out

    def standard_normal(self, count: int) -> np.ndarray:
        """``count`` independent N(0, 1) samples as float64 (Box-Muller, 53-bit uniforms)."""
        return self.standard_normal_tensor(count).numpy()

    def add_noise_(self, target: torch.Tensor, std: float) -> torch.Tensor:
        """Add independent N(0, std^2) noise to every entry of ``target``, in place, and
        return it. Each entry becomes ``target + std * z`` evaluated in float64 and
        rounded once to ``target``'s dtype, on whatever device ``target`` is; CPU
        tensors are updated a block at a time without any full-size temporary."""
        self.add_noise_each_([target], std)
        return target

    def add_noise_each_(self, targets: Sequence[torch.Tensor], std: float) -> None:
        """:meth:`add_noise_` for several tensors at once (e.g. all of a model's
        gradients): every entry of every tensor gets its own fresh N(0, std^2) sample,
        and the samples are drawn in shared blocks that run across tensor boundaries,
        so many small tensors cost about as much as one of their total size. The CPU
        tensors take the stream's next samples in the order given, then each other
        device's tensors (in the order its first one appears) theirs, in order. Raises
        TypeError for a tensor that is not floating-point."""
        if std == 0:
            return
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        for target in targets:
            if not target.is_floating_point():
                raise TypeError(f"DP noise goes on floating-point tensors, got {target.dtype}")
            if target.numel():
                by_device.setdefault(target.device, []).append(target)
        std = float(std)

        def add_on_cpu(piece: torch.Tensor, samples: torch.Tensor) -> None:
            # The uniforms' buffer is free once the block's normals are made.
            _add_on_cpu_scaled_(piece, samples, std, self._uniform)

        cpu = torch.device("cpu")
        for device in sorted(by_device, key=lambda d: d != cpu):  # the CPU's first
            group = by_device[device]
            # A tensor whose entries are not one contiguous run gets its noise through a
            # contiguous copy, written back once noised.
            flats = [t.view(-1) if t.is_contiguous() else t.reshape(-1).clone() for t in group]
            count = sum(f.numel() for f in flats)
            if device == cpu and self._threads > 1 and count > BLOCK:
                self._add_on_cpu_in_runs_(flats, count, std)
            elif device == cpu:
                self._add_to_flats_(flats, self._blocks(count), add_on_cpu)
            else:
                self._add_to_flats_(flats, self._device_chunks(count, device),
                                    lambda piece, samples: _add_in_float64_(piece, samples, std))
            for target, flat in zip(group, flats, strict=True):
                if not target.is_contiguous():
                    target.copy_(flat.view(target.shape))

    def _add_on_cpu_in_runs_(self, flats: list[torch.Tensor], count: int, std: float) -> None:
        """The CPU noise of ``count`` samples over ``flats`` on up to ``threads`` threads:
        run ``r`` takes whole blocks ``[b_r, b_{r+1})`` of the stream, made by a lane
        whose encryptor starts at the counter of block ``b_r``; this generator makes the
        first run, then continues from the word where one thread's call would have
        ended, also after a run failed (so no keystream word is ever drawn twice)."""
        blocks = -(-count // BLOCK)
        runs = min(self._threads, blocks)
        bounds = [min(count, BLOCK * (blocks * r // runs)) for r in range(runs + 1)]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self._threads - 1,
                                            thread_name_prefix="bract-noise-lane")
        while len(self._lanes) < self._threads - 1:
            lane = SecureGaussian.__new__(SecureGaussian)  # this key, its own buffers
            lane._start(self._key, self._words_used)
            self._lanes.append(lane)
        start = self._words_used
        # One thread's call draws an even number of words per block: the last block,
        # of odd length, one more.
        end = start + count + (count & 1)
        lanes = [self, *self._lanes[:runs - 1]]
        for r, lane in enumerate(lanes[1:], start=1):
            # A whole block is 2^17 words: every run but the last starts at an AES block.
            lane._reposition(start + bounds[r])

        def run(lane: SecureGaussian, lo: int, hi: int) -> None:
            lane._add_to_flats_(_pieces(flats, lo, hi), lane._blocks(hi - lo),
                                lambda piece, samples: _add_on_cpu_scaled_(
                                    piece, samples, std, lane._uniform))

        futures = [self._pool.submit(run, lane, bounds[r], bounds[r + 1])
                   for r, lane in enumerate(lanes) if r > 0]
        try:
            run(self, bounds[0], bounds[1])
        finally:
            for f in futures:  # every run ends before the call returns or fails
                f.exception()
            self._reposition(end)
        for f in futures:
            f.result()

    def _reposition(self, words: int) -> None:
        """Continue the stream from word ``words`` (even) of this key's keystream."""
        self._encryptor = _ctr_encryptor(self._key, words)
        self._words_used = words

    @staticmethod
    def _add_to_flats_(flats: list[torch.Tensor],
                       chunks: Iterable[tuple[int, torch.Tensor]],
                       add: Callable[[torch.Tensor, torch.Tensor], None]) -> None:
        """Hand ``chunks``' samples out to ``flats`` in order, across their boundaries:
        ``add(piece, samples)`` for each run of one tensor within one chunk."""
        pending = iter(flats)
        current, filled = None, 0
        for _, samples in chunks:
            used = 0
            while used < len(samples):
                if current is None or filled == current.numel():
                    current, filled = next(pending), 0
                take = min(len(samples) - used, current.numel() - filled)
                add(current[filled:filled + take], samples[used:used + take])
                filled, used = filled + take, used + take

    def normal_like(self, reference: torch.Tensor, std: float) -> torch.Tensor:
        """N(0, std^2) noise with ``reference``'s shape, dtype (float32 for a tensor that
        is not floating-point) and device, each entry ``std * z`` rounded once."""
        dtype = reference.dtype if reference.is_floating_point() else torch.float32
        noise = torch.zeros(reference.shape, dtype=dtype, device=reference.device)
        self.add_noise_each_([noise], std)
        return noise


class NoisePrefetcher:
    """Draws the next step's noise while the current step computes.

    DP-SGD's noise does not depend on the gradients, so the N(0, 1) samples for step
    t+1 can be drawn (from the same :class:`SecureGaussian`, by one background thread
    that lives while steps remain) while step t's forward and backward passes run,
    and added when its gradients are ready. Guarantee: the same as
    :class:`SecureGaussian`'s: every sample comes from its keystream, is used at most
    once (a draw that fails or is discarded is never handed out, even in part), and
    never leaves the process; only *when* it is drawn changes. One float64 buffer of
    the parameters' size is kept: the next draw starts only after this step's samples
    are added. The source is only touched by one thread at a time (the foreground
    waits for the background draw before it uses the source itself). With
    ``remaining`` set to the number of steps still to come, no draw is made for a step
    that will not happen, and after the last one no thread is left running.
    """

    def __init__(self, source: SecureGaussian, remaining: int | None = None) -> None:
        self.source = source
        #: Steps still to come (``None``: unknown, always draw one step ahead).
        self.remaining = remaining
        self._worker: threading.Thread | None = None
        #: counts to draw (``None`` ends the worker), and each draw's outcome
        self._requests: queue.SimpleQueue[int | None] = queue.SimpleQueue()
        self._outcomes: queue.SimpleQueue[BaseException | None] = queue.SimpleQueue()
        self._pending = False
        self._buffer: torch.Tensor | None = None
        #: fresh samples no step has used yet (``None``: none)
        self._ready: torch.Tensor | None = None
        #: float64 pieces of float32 gradients while the noise is added (1 MiB).
        self._work = torch.empty(BLOCK, dtype=torch.float64)

    def _draw(self, count: int) -> None:
        self._ready = None  # a draw that stops half-way leaves nothing to hand out
        if self._buffer is None or self._buffer.numel() != count:
            self._buffer = torch.empty(count, dtype=torch.float64)
        self._ready = self.source.fill_standard_normal_(self._buffer)

    def _serve(self) -> None:
        """The background thread: one draw per request, until ``None``."""
        while (count := self._requests.get()) is not None:
            try:
                self._draw(count)
            except BaseException as exc:  # reported to the foreground by _settle
                self._outcomes.put(exc)
            else:
                self._outcomes.put(None)

    def _settle(self) -> None:
        """Wait for the draw in flight, if any; raise what made it fail."""
        if not self._pending:
            return
        self._pending = False
        failure = self._outcomes.get()
        if failure is not None:
            raise RuntimeError(f"drawing the next step's DP noise failed: {failure!r}"
                               ) from failure

    def _take(self, count: int) -> torch.Tensor:
        """This step's ``count`` samples (drawn ahead when they were ready)."""
        self._settle()
        if self._ready is None or self._ready.numel() != count:
            self._draw(count)
        ready, self._ready = self._ready, None  # handed out once
        assert ready is not None
        if self.remaining is not None:
            self.remaining -= 1
        return ready

    def _draw_ahead(self, count: int) -> None:
        """Start drawing the next step's samples, unless no step is left."""
        if self.remaining is not None and self.remaining <= 0:
            self._stop_worker()
            return
        if self._worker is None:
            self._worker = threading.Thread(target=self._serve, daemon=True,
                                            name="bract-noise-prefetch")
            self._worker.start()
        self._pending = True
        self._requests.put(count)

    def _stop_worker(self) -> None:
        if self._worker is not None:
            self._requests.put(None)
            self._worker.join()
            self._worker = None

    def add_noise_each_(self, targets: Sequence[torch.Tensor], std: float) -> None:
        """:meth:`SecureGaussian.add_noise_each_` with the samples drawn one step ahead
        (falls back to the source for tensors it cannot add to in place). As there,
        each entry becomes ``target + std * z`` evaluated in float64 and rounded once
        to the target's dtype."""
        if std == 0:
            return
        if not all(t.device.type == "cpu" and t.is_contiguous()
                   and t.dtype in (torch.float32, torch.float64) for t in targets):
            self.close()
            self.source.add_noise_each_(targets, std)
            return
        flats = [t.view(-1) for t in targets if t.numel()]
        count = sum(f.numel() for f in flats)
        samples = self._take(count)
        offset = 0
        for flat in flats:
            _add_scaled_(flat, samples[offset:offset + flat.numel()], float(std), self._work)
            offset += flat.numel()
        # The next draw starts once these samples are used: it never competes with the
        # additions above, and refills the same buffer.
        self._draw_ahead(count)

    def close(self) -> None:
        """Wait for a draw in flight and end the background thread (the source is free
        afterwards). A draw that failed is discarded here, not raised: nothing of it
        is ever used."""
        with contextlib.suppress(RuntimeError):  # a failed draw left nothing ready
            self._settle()
        self._stop_worker()


def use_secure_noise(optimizer: Any, source: SecureGaussian | None = None, *,
                     prefetch: bool | None = None) -> SecureGaussian:
    """Make an Opacus ``DPOptimizer`` draw its DP noise from ``source``.

    Replaces the optimizer instance's ``add_noise`` with one that is identical to
    Opacus's (same standard deviation ``noise_multiplier * max_grad_norm``, same
    bookkeeping flags) except that the noise comes from :class:`SecureGaussian`.
    Works for the hooks, functorch, ew and ghost (fast gradient clipping) modes.
    ``prefetch`` draws each step's noise during the step before
    (:class:`NoisePrefetcher`); ``None``: when a core is free of torch's own threads
    and the model has at most :data:`PREFETCH_MAX_PARAMS` parameters.
    """
    from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

    if not hasattr(optimizer, "noise_multiplier") or not hasattr(optimizer, "params"):
        raise TypeError(
            "use_secure_noise expects an Opacus DPOptimizer (returned by make_private), "
            f"got {type(optimizer).__name__}"
        )
    noise_source = source or SecureGaussian()
    if prefetch is None:
        prefetch = (core_is_free()
                    and sum(p.numel() for p in optimizer.params) <= PREFETCH_MAX_PARAMS)
    adder: SecureGaussian | NoisePrefetcher = (
        NoisePrefetcher(noise_source) if prefetch else noise_source)

    def add_noise(self: Any) -> None:
        multiplier = getattr(self, "_adjusted_noise_multiplier", self.noise_multiplier)
        std = multiplier * self.max_grad_norm
        for p in self.params:
            _check_processed_flag(p.summed_grad)
        # Opacus: p.grad = summed_grad + noise. Here the noise is added to the summed
        # gradients in place (they are dropped at zero_grad, never read again), all
        # parameters in one pass over shared noise blocks.
        adder.add_noise_each_([p.summed_grad for p in self.params], std)
        for p in self.params:
            p.grad = p.summed_grad.view_as(p)
            _mark_as_processed(p.summed_grad)

    optimizer.add_noise = MethodType(add_noise, optimizer)
    #: What draws the noise (the source, or its prefetcher): the trainer tells a
    #: prefetcher how many steps remain and closes it when the round ends.
    optimizer.bract_noise = adder
    return noise_source
