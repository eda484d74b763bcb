"""DP-SGD cost benchmark: bract's private training path vs non-private training.

What it measures (everything side by side in ONE run, reported as ratios,
because the machine is shared and noisy):

1. **Throughput** (samples/s) of ChestCNN at 28x28 (demo size) and 128x128,
   batch 64, same synthetic data and same initial weights:

   * ``nonprivate``: a plain ``SGD`` step loop over a shuffled DataLoader;
   * ``hooks`` / ``ghost`` / ``bk``: what users get from
     :class:`bract.privacy.PrivateTrainer` (Opacus ``make_private`` with Poisson
     sampling, bract's SecureGaussian noise), one per grad-sample mode bract
     supports (``bk``: bract's one-pass book-keeping clipping); ``auto`` resolves
     to one of them (``bk`` for ChestCNN);
   * ``ghost+opacusconv`` (and ``hooks+opacusconv`` at 28px): the same with
     Opacus's own im2col Conv2d and GroupNorm per-sample samplers instead of
     bract's, i.e. the previous default, the baseline of this issue's work;
   * ``bk+torchnoise``: book-keeping with ``torch.normal`` noise, to size
     the secure sampler's share of a step;
   * ``bk+whole`` / ``bk+parts``: book-keeping with each step's batch in one pass
     (``batch_parts=1``) / cut into two parts, each part's passes on a thread of its
     own with half of torch's threads (``batch_parts=2``,
     :mod:`bract.privacy.batch_parts`); with no free core bract's default cuts the
     128px batch and keeps the 28px one whole; ``nonprivate+parts`` (diagnostic): the
     non-private loop with the same cut (each part's gradient by ``autograd.grad`` on
     its own thread, then summed), to show what the cut alone gives any training loop;
   * ``bk+prefetch`` (``--prefetch-variant``): the noise drawn a step ahead;
     ``bk+serial`` (``--serial-variant``): book-keeping's per-example rules kept inside
     the backward pass where, with a free core (e.g. ``--threads 1``), bract's default
     computes them on a second thread beside it.

   Each measurement is one "round" (``train_round``) of a few steps; the
   ``on_step`` callback timestamps every step and throughput is taken from the
   first step's end to the last step's end, so Opacus wrapping, the budget check
   and the first (warm-up) step are excluded. DP rounds use the *expected* batch
   size of Poisson sampling (64). Variants are interleaved and repeated; the
   table shows medians, and ratios are median(DP) / median(non-private).

2. **Noise** added to the gradients of the CNN at each size, per step:
   SecureGaussian over all parameter tensors in one pass (``add_noise_each_``, as
   the DP optimizer uses it) vs ``torch.normal`` per tensor plus the add (Opacus),
   and its previous versions as baselines: one tensor at a time (``add_noise_``),
   the same float64 Box-Muller over whole-size fresh buffers in torch, and in numpy.
   The variants are timed in turn, one call of each per turn, so a slow stretch of
   the machine falls on all of them.

3. **Peak memory of one step** of the 128x128 ChestCNN at batch 64, each variant
   in a fresh subprocess (with ``--threads``' torch threads): the peak RSS after
   model, data and optimizer exist is the baseline, then one step runs (for DP:
   ``train_round`` on exactly 64 examples, so Poisson sampling with rate 1 takes all
   64), and the figure is
   the growth of the peak resident set (``VmHWM`` in ``/proc/self/status``;
   ``ru_maxrss`` would inherit the parent's peak over fork/exec) over the
   baseline. The DP figure includes Opacus wrapping and bract's noise buffers. The ratio
   is DP growth / non-private growth.

4. **Accountant time**: epsilon of a ledger of r rounds (r = 1, 10, 50) of a
   typical hospital plan (2000 examples, batch 64, 1 epoch per round,
   sigma 1.0, delta 1e-5) with PRV (default), PLD and RDP.

5. **Calibration time**: ``calibrate()`` for epsilon 1, 3, 8 at delta 1e-5,
   plan 20 rounds x 1 epoch, n = 2000, B = 64.

The last line of stdout is one JSON object with the headline figures.

Usage::

    python benchmarks/dp_bench.py            # full run (about 2 minutes on 2 cores)
    python benchmarks/dp_bench.py --quick    # shorter, noisier
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bract.data.synthetic import synthetic_chest_xray
from bract.models.cnn import ChestCNN
from bract.privacy.accounting import (
    ACCOUNTANTS,
    DpSgdEvent,
    PrivacyLedger,
    TrainingPlan,
    _composed_epsilon,
    calibrate,
    epsilon_of,
)
from bract.privacy.noise import SecureGaussian
from bract.privacy.training import PrivateTrainer, choose_grad_sample_mode

BATCH = 64
DP_MODES = ("hooks", "ghost", "bk")
#: Suffixes of a DP variant: "+torchnoise" uses torch.normal instead of SecureGaussian,
#: "+opacusconv" Opacus's own Conv2d (im2col) and GroupNorm per-sample rules instead of
#: bract's; "+prefetch" draws each step's noise during the step before (NoisePrefetcher);
#: "+serial" computes book-keeping's per-example rules inside the backward pass, never on
#: a second thread (``rule_overlap=False``; by default they overlap when a core is free);
#: "+whole" runs each step's batch in one pass (``batch_parts=1``), "+parts" in two parts
#: on two threads (``batch_parts=2``); by default bract cuts large inputs when torch's
#: threads take every core.
VARIANT_FLAGS = ("torchnoise", "opacusconv", "prefetch", "serial", "whole", "parts")
#: Non-private variants: the plain loop, and the same loop with the batch in two parts.
NONPRIVATE = ("nonprivate", "nonprivate+parts")
SIGMA = 1.0
MAX_GRAD_NORM = 1.0
DELTA = 1e-5
LR = 0.05
CPU = torch.device("cpu")


# ----------------------------------------------------------------------------- helpers


def make_data(image_size: int, n: int, seed: int = 0) -> TensorDataset:
    """``n`` synthetic chest X-rays at ``image_size`` as a TensorDataset."""
    x, y = synthetic_chest_xray(n, image_size=image_size, seed=seed)
    return TensorDataset(torch.from_numpy(x), torch.from_numpy(y))


def make_model(image_size: int, init: dict[str, torch.Tensor] | None = None) -> ChestCNN:
    """A ChestCNN; with ``init``, a copy of those exact weights (same init everywhere)."""
    torch.manual_seed(0)
    model = ChestCNN(image_size=image_size)
    if init is not None:
        model.load_state_dict(init)
    return model


def _rate(step_times: list[float], batch: int) -> float:
    """Samples/s from end-of-step timestamps, excluding the first (warm-up) step."""
    if len(step_times) < 2:
        return math.nan
    return (len(step_times) - 1) * batch / (step_times[-1] - step_times[0])


def synced_clock(device: torch.device) -> Callable[[], float]:
    """``time.perf_counter``, after a CUDA ``device`` has finished the work queued so far
    (kernels run asynchronously: a timestamp without it would not include them)."""
    if device.type != "cuda":
        return time.perf_counter

    def clock() -> float:
        torch.cuda.synchronize(device)
        return time.perf_counter()
    return clock


def nonprivate_round(model: nn.Module, data: TensorDataset, steps: int,
                     device: torch.device = CPU) -> float:
    """Samples/s of ``steps`` plain SGD steps on ``device``, each batch copied there
    (first step is warm-up)."""
    clock = synced_clock(device)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    crit = nn.CrossEntropyLoss()
    loader = DataLoader(data, batch_size=BATCH, shuffle=True)
    stamps: list[float] = []
    while len(stamps) < steps:
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            opt.zero_grad()
            crit(model(x), y).backward()
            opt.step()
            stamps.append(clock())
            if len(stamps) >= steps:
                break
    return _rate(stamps, BATCH)


def nonprivate_parts_round(model: nn.Module, data: TensorDataset, steps: int) -> float:
    """Samples/s of ``steps`` plain SGD steps with each batch cut in two parts, each
    part's forward and backward pass (``autograd.grad``, no shared ``.grad``) on a thread
    of its own, torch's threads halved for the round, the gradients summed (first step
    warm-up).
    A diagnostic: what the cut bract's DP steps use gives a non-private loop."""
    from concurrent.futures import ThreadPoolExecutor

    model.train()
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=LR)
    crit = nn.CrossEntropyLoss(reduction="sum")
    loader = DataLoader(data, batch_size=BATCH, shuffle=True)
    stamps: list[float] = []

    def part(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return torch.autograd.grad(crit(model(x), y), params)

    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads // 2))  # for the round, as bract's parts do
    try:
        with ThreadPoolExecutor(max_workers=1) as pool:
            while len(stamps) < steps:
                for x, y in loader:
                    half = len(y) // 2
                    other = pool.submit(part, x[half:], y[half:])
                    grads = part(x[:half], y[:half])
                    for g, h in zip(grads, other.result(), strict=True):
                        g += h
                    for p, g in zip(params, grads, strict=True):
                        p.grad = g.div_(len(y))  # the mean loss's gradient
                    opt.step()
                    stamps.append(time.perf_counter())
                    if len(stamps) >= steps:
                        break
    finally:
        torch.set_num_threads(threads)
    return _rate(stamps, BATCH)


def dp_trainer(
    model: nn.Module, data: TensorDataset, mode: str, secure_noise: bool = True,
    grad_samplers: str = "bract", noise_prefetch: bool | None = False,
    rule_overlap: bool | None = None, device: torch.device = CPU,
    batch_parts: int | None = None,
) -> PrivateTrainer:
    """bract's PrivateTrainer as a user would build it (no budget, default accountant)."""
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    loader = DataLoader(data, batch_size=BATCH)
    return PrivateTrainer(
        model, opt, loader, noise_multiplier=SIGMA, max_grad_norm=MAX_GRAD_NORM, delta=DELTA,
        grad_sample_mode=mode, device=device, secure_noise=secure_noise,
        grad_samplers=grad_samplers, noise_prefetch=noise_prefetch,
        rule_overlap=rule_overlap, batch_parts=batch_parts,
    )


def dp_variant(model: nn.Module, data: TensorDataset, variant: str,
               device: torch.device = CPU) -> PrivateTrainer:
    """The trainer of a variant name ``mode[+flag...]`` (see :data:`VARIANT_FLAGS`)."""
    mode, *flags = variant.split("+")
    unknown = set(flags) - set(VARIANT_FLAGS)
    if mode not in DP_MODES or unknown:
        raise ValueError(f"unknown DP variant {variant!r}")
    return dp_trainer(model, data, mode, secure_noise="torchnoise" not in flags,
                      grad_samplers="opacus" if "opacusconv" in flags else "bract",
                      noise_prefetch="prefetch" in flags,
                      rule_overlap=False if "serial" in flags else None, device=device,
                      batch_parts=1 if "whole" in flags else 2 if "parts" in flags else None)


def dp_round(trainer: PrivateTrainer, rnd: int, device: torch.device = CPU) -> float:
    """Samples/s (expected batch size) of one ``train_round`` on ``device``, first step
    excluded."""
    clock = synced_clock(device)
    stamps: list[float] = []
    trainer.train_round(rnd, on_step=lambda _s, _t: stamps.append(clock()))
    return _rate(stamps, BATCH)


def median(xs: list[float]) -> float:
    """Median ignoring NaNs (NaN if nothing is left)."""
    xs = [x for x in xs if not math.isnan(x)]
    return statistics.median(xs) if xs else math.nan


def timed(fn: Callable[[], Any], repeat: int) -> float:
    """Median wall seconds of ``repeat`` calls of ``fn``, after one warm-up call
    (first-call overheads, allocator)."""
    return timed_interleaved({"fn": fn}, repeat)["fn"]


def timed_interleaved(fns: dict[str, Callable[[], Any]], repeat: int,
                      clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Median wall seconds per call of each of ``fns``, the calls interleaved (one of
    each in turn, ``repeat`` turns after one warm-up turn), so a slow stretch of the
    machine falls on every variant alike rather than on whichever ran then; ``clock``
    reads the time (:func:`synced_clock` for work on a GPU)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for turn in range(repeat + 1):
        for name, fn in fns.items():
            t0 = clock()
            fn()
            if turn:
                times[name].append(clock() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


# --------------------------------------------------------------------------- sections


@dataclass
class ThroughputResult:
    """Median samples/s per variant at one image size."""

    image_size: int
    params: int
    largest_linear: int
    auto_mode: str
    rates: dict[str, list[float]]

    def med(self, variant: str) -> float:
        return median(self.rates[variant])

    def paired(self, variant: str) -> list[float]:
        """``variant`` / non-private within each repeat (the two rounds ran within a
        second or two of each other, so slow drifts of the machine cancel)."""
        return [d / n for d, n in zip(self.rates[variant], self.rates["nonprivate"],
                                      strict=True)
                if not (math.isnan(d) or math.isnan(n))]

    def ratio(self, variant: str) -> float:
        return self.med(variant) / self.med("nonprivate")


def bench_throughput(
    image_size: int, steps: int, repeats: int, variants: list[str], log: Callable[[str], None]
) -> ThroughputResult:
    """Interleave non-private and DP rounds ``repeats`` times; keep every sample/s figure."""
    data = make_data(image_size, steps * BATCH, seed=1)
    base = make_model(image_size)
    init = {k: v.clone() for k, v in base.state_dict().items()}
    largest = max(m.weight.numel() for m in base.modules() if isinstance(m, nn.Linear))
    auto = choose_grad_sample_mode(base, "auto")
    # One model per variant, from the same init; DP trainers are built once and reused
    # across repeats (one train_round per repeat, as a hospital does round after round).
    models = {v: make_model(image_size, init) for v in variants}
    trainers: dict[str, PrivateTrainer] = {}
    for v in variants:
        if v not in NONPRIVATE:
            trainers[v] = dp_variant(models[v], data, v)
    rates: dict[str, list[float]] = {v: [] for v in variants}
    for rep in range(repeats):
        for v in variants:
            if v == "nonprivate":
                r = nonprivate_round(models[v], data, steps)
            elif v == "nonprivate+parts":
                r = nonprivate_parts_round(models[v], data, steps)
            else:
                r = dp_round(trainers[v], rep + 1)
            rates[v].append(r)
        log(
            f"  {image_size}px rep {rep + 1}/{repeats}: "
            + ", ".join(f"{v}={rates[v][-1]:.1f}" for v in variants)
        )
    return ThroughputResult(image_size, sum(p.numel() for p in base.parameters()), largest,
                            auto, rates)


def numpy_float64_noise(source: SecureGaussian, count: int) -> torch.Tensor:
    """BASELINE (bract's previous SecureGaussian, not in src/ any more): the same
    float64 Box-Muller on the same 53-bit uniforms, evaluated in numpy on a fresh
    keystream copy, then rounded to float32 as ``normal_like`` does."""
    pairs = (count + 1) // 2
    bits = source._keystream_int64(2 * pairs).numpy().view(np.uint64)
    u1 = ((bits[:pairs] >> np.uint64(11)).astype(np.float64) + 1.0) * (1.0 / float(1 << 53))
    u2 = (bits[pairs:] >> np.uint64(11)).astype(np.float64) * (1.0 / float(1 << 53))
    radius = np.sqrt(-2.0 * np.log(u1))
    angle = 2.0 * np.pi * u2
    out = np.empty(2 * pairs, dtype=np.float64)
    out[:pairs] = radius * np.cos(angle)
    out[pairs:] = radius * np.sin(angle)
    return torch.from_numpy(out[:count].astype(np.float32))


def previous_torch_noise(source: SecureGaussian, grad: torch.Tensor) -> torch.Tensor:
    """BASELINE (bract's SecureGaussian before block-wise generation): the same float64
    Box-Muller on the same 53-bit uniforms, over whole-size fresh buffers (keystream,
    uniforms, normals, float32 copy), then Opacus's ``summed_grad + noise``."""
    count = grad.numel()
    pairs = (count + 1) // 2
    words = source._keystream_int64(2 * pairs)
    uniform = words.bitwise_right_shift_(11).bitwise_and_((1 << 53) - 1).to(torch.float64)
    radius, angle = uniform[:pairs], uniform[pairs:]
    radius.add_(1.0).mul_(1.0 / float(1 << 53)).log_().mul_(-2.0).sqrt_()
    angle.mul_(1.0 / float(1 << 53)).mul_(2.0 * math.pi)
    out = torch.empty(2 * pairs, dtype=torch.float64)
    torch.cos(angle, out=out[:pairs])
    torch.sin(angle, out=out[pairs:])
    out[:pairs].mul_(radius)
    out[pairs:].mul_(radius)
    return grad + out[:count].to(torch.float32).view(grad.shape)


def bench_noise(sizes: list[int], repeat: int) -> dict[int, dict[str, float]]:
    """Seconds per step to add noise to the gradients of the CNN at each image size:
    secure over all parameter tensors in one pass (``add_noise_each_``, what the DP
    optimizer does), its previous versions (one tensor at a time; whole buffers in
    torch; numpy), torch.normal per tensor plus the add (Opacus's own path)."""
    source = SecureGaussian()
    out: dict[int, dict[str, float]] = {}
    for size in sizes:
        grads = [torch.zeros_like(p) for p in make_model(size).parameters()]
        count = sum(g.numel() for g in grads)
        flat = torch.zeros(count)
        out[size] = timed_interleaved({
            "secure": lambda grads=grads: source.add_noise_each_(grads, 1.0),
            "per_tensor": lambda grads=grads: [source.add_noise_(g, 1.0) for g in grads],
            "previous_torch": lambda flat=flat: previous_torch_noise(source, flat),
            "previous_numpy": lambda count=count: numpy_float64_noise(source, count),
            "torch_normal": lambda grads=grads: [g + torch.normal(0.0, 1.0, size=g.shape)
                                                 for g in grads],
            "aes_keystream": lambda count=count: source._keystream_int64(count),
        }, repeat)
    return out


def peak_rss_kb() -> int:
    """This process's peak resident set in KiB.

    ``VmHWM`` from ``/proc/self/status`` (the high-water mark of this address
    space) where available: ``ru_maxrss`` is unusable in a child process because
    Linux carries the parent's peak RSS over fork/exec. Falls back to ``ru_maxrss``.
    """
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def mem_child(variant: str, image_size: int) -> None:
    """Subprocess body: print ``baseline_kb peak_kb`` of ONE step of ``variant``."""
    warnings.simplefilter("ignore")
    data = make_data(image_size, BATCH, seed=2)
    model = make_model(image_size)
    crit = nn.CrossEntropyLoss()
    if variant == "nonprivate":
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        x, y = data.tensors
        base = peak_rss_kb()
        opt.zero_grad()
        crit(model(x), y).backward()
        opt.step()
    else:
        # 64 examples, batch 64: Poisson rate q = 1, exactly one step of 64 examples.
        trainer = dp_variant(model, data, variant)
        trainer.check_budget(1)  # warm the accountant so its imports are in the baseline
        base = peak_rss_kb()
        out = trainer.train_round(1)
        assert out.trained and out.event is not None and out.event.steps == 1
    peak = peak_rss_kb()
    print(f"{base} {peak}")


def bench_memory(image_size: int, variants: list[str], threads: int = 0
                 ) -> dict[str, tuple[float, float]]:
    """(baseline MB, growth MB) of one step per variant, each in a fresh process with
    ``threads`` torch threads (0: torch's default)."""
    out: dict[str, tuple[float, float]] = {}
    env = dict(os.environ)
    for v in variants:
        proc = subprocess.run(
            [sys.executable, __file__, "--_mem-child", v, "--mem-size", str(image_size),
             "--threads", str(threads)],
            capture_output=True, text=True, check=True, env=env,
        )
        base_kb, peak_kb = (int(t) for t in proc.stdout.strip().splitlines()[-1].split())
        out[v] = (base_kb / 1024, (peak_kb - base_kb) / 1024)  # KiB -> MiB
    return out


def bench_accountants(rounds: list[int], repeat: int) -> dict[str, dict[int, float]]:
    """Seconds to compute epsilon of a ledger of r rounds, per accountant."""
    plan = TrainingPlan(1, 1, 2000, BATCH)
    out: dict[str, dict[int, float]] = {a: {} for a in ACCOUNTANTS}
    for r in rounds:
        ledger = PrivacyLedger("hospital-a")
        for i in range(r):
            ev = plan.round_event(SIGMA, max_grad_norm=MAX_GRAD_NORM, delta=DELTA, round=i + 1)
            ledger = ledger.append(ev)
        events: list[DpSgdEvent] = list(ledger.events)
        for acc in ACCOUNTANTS:
            out[acc][r] = timed(lambda acc=acc, events=events: _uncached_epsilon(events, acc),
                                repeat)
    return out


def _uncached_epsilon(events: list[DpSgdEvent], accountant: str) -> float:
    """A fresh computation: bract memoises composed epsilon per process (a hospital's
    budget check reuses last round's figure), which would time a dictionary look-up."""
    from bract.privacy import accounting

    _composed_epsilon.cache_clear()
    accounting._CARRIED.clear()  # the results a Context carries between processes
    return epsilon_of(events, DELTA, accountant)


def bench_calibration(targets: list[float]) -> dict[float, tuple[float, float]]:
    """(seconds, sigma) of ``calibrate()`` per target epsilon."""
    plan = TrainingPlan(20, 1, 2000, BATCH)
    out: dict[float, tuple[float, float]] = {}
    for eps in targets:
        t0 = time.perf_counter()
        cal = calibrate(eps, DELTA, plan)
        out[eps] = (time.perf_counter() - t0, cal.noise_multiplier)
    return out


# ------------------------------------------------------------------------------ main


def _fmt(x: float, nd: int = 1) -> str:
    return "nan" if math.isnan(x) else f"{x:.{nd}f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps/repeats (~2 min)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch.set_num_threads (0: leave torch's default)")
    parser.add_argument("--no-torchnoise-variant", action="store_true",
                        help="skip the bk+torchnoise diagnostic variant")
    parser.add_argument("--prefetch-variant", action="store_true",
                        help="add bk+prefetch: the noise drawn one step ahead in a thread")
    parser.add_argument("--serial-variant", action="store_true",
                        help="add bk+serial (and bk+prefetch+serial with --prefetch-variant): "
                        "book-keeping's per-example rules inside the backward pass, never on "
                        "a second thread (they overlap it by default when a core is free)")
    parser.add_argument("--skip-memory", action="store_true", help="skip the memory section")
    parser.add_argument("--repeat-factor", type=int, default=1,
                        help="run each size's interleaved repeats this many times over")
    parser.add_argument("--_mem-child", dest="mem_child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--mem-size", type=int, default=128, help="image size for memory")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.mem_child:
        mem_child(args.mem_child, args.mem_size)
        return 0

    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=False, highlight=False)

    def log(msg: str) -> None:
        console.print(f"[dim]{msg}[/dim]")

    t_start = time.perf_counter()
    quick = args.quick
    # (steps per round, repeats): 28px steps are ~30 ms; 128px hooks steps take seconds.
    cfg = {28: (6, 3) if quick else (10, 5), 128: (3, 2) if quick else (4, 3)}
    log(f"torch {torch.__version__}, threads {torch.get_num_threads()}, cpus {os.cpu_count()}, "
        f"load avg {os.getloadavg()[0]:.1f}")

    results: dict[int, ThroughputResult] = {}
    for size in (28, 128):
        # The previous defaults (Opacus's im2col Conv2d sampler) are the baselines; hooks
        # mode at 128px (seconds per step, 9.8x memory) is measured only with bract's.
        variants = ["nonprivate", "nonprivate+parts", *DP_MODES, "bk+whole", "bk+parts",
                    "ghost+opacusconv"]
        if size == 28:
            variants.append("hooks+opacusconv")
        if not args.no_torchnoise_variant:
            variants.append("bk+torchnoise")
        if args.prefetch_variant:
            variants.append("bk+prefetch")
        if args.serial_variant:
            variants += ["bk+serial", *(["bk+prefetch+serial"] if args.prefetch_variant else [])]
        steps, reps = cfg[size]
        reps *= max(1, args.repeat_factor)
        results[size] = bench_throughput(size, steps, reps, variants, log)

    noise = bench_noise(list(results), 3 if quick else 5)

    mem: dict[str, tuple[float, float]] = {}
    if not args.skip_memory:
        log("memory: one step per fresh subprocess at 128px ...")
        mem_variants = ["nonprivate", *DP_MODES, "bk+whole", "ghost+opacusconv"]
        if not args.no_torchnoise_variant:
            mem_variants.append("bk+torchnoise")
        if args.prefetch_variant:
            mem_variants.append("bk+prefetch")
        if args.serial_variant:
            mem_variants.append("bk+serial")
        mem = bench_memory(args.mem_size, mem_variants, args.threads)

    acc_rounds = [1, 10, 50]
    acc = bench_accountants(acc_rounds, 1 if quick else 3)
    cal = bench_calibration([3.0] if quick else [1.0, 3.0, 8.0])

    # ------------------------------------------------------------------ tables
    tp = Table(title="Throughput, samples/s (median over interleaved repeats), batch 64, CPU")
    for col in ("image", "params", "variant", "samples/s", "all runs", "x non-private",
                "step ms", "noise ms/step", "noise share"):
        tp.add_column(col, justify="right")
    for size, res in results.items():
        for v in res.rates:
            rate = res.med(v)
            step_ms = 1e3 * BATCH / rate if rate > 0 else math.nan
            secure = v not in NONPRIVATE and "torchnoise" not in v
            noise_ms = 1e3 * noise[size]["secure"] if secure else math.nan
            label = v + (" (auto)" if v == res.auto_mode else "")
            tp.add_row(
                f"{size}px", f"{res.params / 1e6:.2f}M", label, _fmt(rate),
                " ".join(_fmt(x, 0) for x in res.rates[v]),
                "1.00" if v == "nonprivate" else _fmt(res.ratio(v), 2), _fmt(step_ms, 0),
                _fmt(noise_ms, 0),
                "" if math.isnan(noise_ms) else f"{noise_ms / step_ms:.0%}",
            )
    console.print(tp)

    tr = Table(title="x non-private within each repeat (DP round / the non-private round "
               "run just before it): median and range")
    for col in ("image", "variant", "median", "range", "repeats"):
        tr.add_column(col, justify="right")
    for size, res in results.items():
        for v in res.rates:
            if v.startswith("bk") or v == "nonprivate+parts":
                pr = res.paired(v)
                tr.add_row(f"{size}px", v, _fmt(median(pr), 2),
                           f"{_fmt(min(pr), 2)}-{_fmt(max(pr), 2)}" if pr else "", str(len(pr)))
    console.print(tr)

    tn = Table(title="Noise per step for all parameters, ms (median)")
    for col in ("image", "params", "SecureGaussian (all tensors, one pass)",
                "previous (one tensor at a time)", "previous (torch, whole buffers)",
                "previous (numpy f64)", "torch.normal", "AES keystream", "secure / torch.normal"):
        tn.add_column(col, justify="right")
    for size, d in noise.items():
        tn.add_row(f"{size}px", f"{results[size].params / 1e6:.2f}M",
                   _fmt(1e3 * d["secure"]), _fmt(1e3 * d["per_tensor"]),
                   _fmt(1e3 * d["previous_torch"]),
                   _fmt(1e3 * d["previous_numpy"]),
                   _fmt(1e3 * d["torch_normal"]), _fmt(1e3 * d["aes_keystream"]),
                   _fmt(d["secure"] / d["torch_normal"], 1))
    console.print(tn)

    if mem:
        tm = Table(title=f"Peak memory of ONE step, {args.mem_size}px, batch 64 "
                   "(peak-RSS growth over baseline, fresh process each)")
        for col in ("variant", "baseline RSS MB", "step peak growth MB", "x non-private"):
            tm.add_column(col, justify="right")
        for v, (b, g) in mem.items():
            tm.add_row(v, _fmt(b, 0), _fmt(g, 0), _fmt(g / mem["nonprivate"][1], 2))
        console.print(tm)

    ta = Table(title="Accountant: seconds to compute epsilon of a ledger of r rounds "
               "(n=2000, B=64, 32 steps/round, sigma 1.0, delta 1e-5)")
    ta.add_column("accountant")
    for r in acc_rounds:
        ta.add_column(f"r={r}", justify="right")
    for a, d in acc.items():
        ta.add_row(a + (" (default)" if a == "prv" else ""), *(f"{d[r]:.3f}" for r in acc_rounds))
    console.print(ta)

    tc = Table(title="calibrate(): 20 rounds x 1 epoch, n=2000, B=64, delta 1e-5")
    for col in ("target eps", "seconds", "sigma"):
        tc.add_column(col, justify="right")
    for eps, (sec, sigma) in cal.items():
        tc.add_row(f"{eps:g}", f"{sec:.2f}", f"{sigma:.4f}")
    console.print(tc)

    # ----------------------------------------------------------- recommendation
    picked: dict[str, str] = {}
    for size, res in results.items():
        fastest = max(DP_MODES, key=res.med)
        picked[f"{size}"] = fastest
        if size == args.mem_size and mem and fastest == "hooks":
            ghost_ok = mem["ghost"][1] < mem["hooks"][1]
            if ghost_ok and res.ratio("ghost") >= 0.9 * res.ratio("hooks"):
                picked[f"{size}"] = "ghost"
    mode_picked = ", ".join(f"{s}px: {m}" for s, m in picked.items())
    console.print(f"mode picked (fastest DP mode per size; memory-aware at "
                  f"{args.mem_size}px): {mode_picked}")
    console.print(f"total benchmark time {time.perf_counter() - t_start:.0f} s")

    summary: dict[str, Any] = {"mode_picked": mode_picked, "quick": quick,
                               "threads": torch.get_num_threads()}
    for size, res in results.items():
        default = res.auto_mode
        summary[f"default_mode_{size}"] = default
        summary[f"dp_samples_per_s_{size}"] = round(res.med(default), 2)
        summary[f"nonprivate_samples_per_s_{size}"] = round(res.med("nonprivate"), 2)
        summary[f"throughput_ratio_{size}"] = round(res.ratio(default), 3)
        for v in res.rates:
            if v != "nonprivate":
                summary[f"throughput_ratio_{size}_{v.replace('+', '_')}"] = round(res.ratio(v), 3)
                summary[f"paired_ratio_{size}_{v.replace('+', '_')}"] = round(
                    median(res.paired(v)), 3)
        summary[f"noise_secure_ms_{size}"] = round(1e3 * noise[size]["secure"], 1)
        summary[f"noise_per_tensor_ms_{size}"] = round(1e3 * noise[size]["per_tensor"], 1)
        summary[f"noise_torch_ms_{size}"] = round(1e3 * noise[size]["torch_normal"], 1)
        summary[f"noise_previous_numpy_ms_{size}"] = round(1e3 * noise[size]["previous_numpy"], 1)
        summary[f"noise_previous_torch_ms_{size}"] = round(1e3 * noise[size]["previous_torch"], 1)
    if mem:
        dmode = results[args.mem_size].auto_mode if args.mem_size in results else "ghost"
        np_g = mem["nonprivate"][1]
        summary["peak_mem_dp_mb"] = round(mem[dmode][1], 1)
        summary["peak_mem_nonprivate_mb"] = round(np_g, 1)
        summary["peak_mem_ratio"] = round(mem[dmode][1] / np_g, 3)
        for v in mem:
            if v == "nonprivate":
                continue
            summary[f"peak_mem_{v.replace('+', '_')}_mb"] = round(mem[v][1], 1)
            summary[f"peak_mem_ratio_{v.replace('+', '_')}"] = round(mem[v][1] / np_g, 3)
    summary["accountant_seconds_per_round"] = round(max(acc["prv"].values()), 4)
    summary["accountant_seconds"] = {a: {str(r): round(s, 4) for r, s in d.items()}
                                     for a, d in acc.items()}
    summary["calibration_seconds"] = round(max(s for s, _ in cal.values()), 3)
    summary["calibration_seconds_by_eps"] = {f"{e:g}": round(s, 3) for e, (s, _) in cal.items()}
    summary["total_seconds"] = round(time.perf_counter() - t_start, 1)
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
