"""DP-SGD on a GPU: bract's default private training against non-private training,
side by side in one run (issue #20's GPU figure).

What it measures, on ``--device`` (default ``cuda``):

1. **Throughput** (samples/s) of the ChestCNN at 128x128 (and 28x28), batch 64, the
   same synthetic data and initial weights as ``dp_bench.py``: ``nonprivate`` (a plain
   ``SGD`` loop over a shuffled DataLoader, each batch copied to the device) against
   ``bk`` (what ``PrivateTrainer`` picks for this model: Opacus ``make_private`` with
   Poisson sampling, book-keeping clipping, bract's SecureGaussian noise) and
   ``bk+torchnoise`` (the same with ``torch.normal`` noise on the device: a diagnostic
   that sizes the secure sampler's share, not private). Variants run interleaved, one
   round each per repeat; a round's rate is taken from the end of its first step to
   the end of its last, with the device synchronised before every timestamp. Figures
   are median(DP) / median(non-private) and, per repeat, DP over the non-private round
   run just before it.
2. **Peak device memory of a round** per variant: ``torch.cuda.max_memory_allocated``
   over the round, less what was allocated before it (model, optimizer, Opacus
   wrapping), so the figure is what the steps themselves need.
3. **Noise per step** over the CNN's gradients on the device: bract's SecureGaussian
   (keystream by AES-256-CTR on the CPU, Box-Muller and the float64 addition on the
   device: ``add_noise_each_``), the baseline it replaced for device tensors (float32
   noise made on the CPU, copied over and added: ``normal_like`` then ``add_``), and
   ``torch.normal`` on the device (Opacus's path without ``secure_mode``).

``--device cpu`` runs the same code on the CPU (a smoke run; ``dp_bench.py`` is the CPU
benchmark). The last line of stdout is one JSON object with every figure.

Usage (on a GPU machine; ``benchmarks/device_dp.sh`` is the prepared command)::

    python benchmarks/dp_cuda_bench.py                      # 128 and 28 px, ~1-2 min
    python benchmarks/dp_cuda_bench.py --device cpu --quick # smoke run without a GPU
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import dp_bench
import torch

from bract.privacy.noise import SecureGaussian
from bract.privacy.training import choose_grad_sample_mode

VARIANTS = ("nonprivate", "bk", "bk+torchnoise")


def bench_size(size: int, steps: int, repeats: int, device: torch.device,
               log: Callable[[str], None]) -> dict[str, Any]:
    """Interleaved rounds of every variant at one image size: rates and peak memory."""
    data = dp_bench.make_data(size, steps * dp_bench.BATCH, seed=1)
    base = dp_bench.make_model(size)
    init = {k: v.clone() for k, v in base.state_dict().items()}
    auto = choose_grad_sample_mode(base, "auto")
    models = {v: dp_bench.make_model(size, init).to(device) for v in VARIANTS}
    trainers = {v: dp_bench.dp_variant(models[v], data, v, device) for v in VARIANTS
                if v != "nonprivate"}
    rates: dict[str, list[float]] = {v: [] for v in VARIANTS}
    peak: dict[str, float] = dict.fromkeys(VARIANTS, math.nan)
    cuda = device.type == "cuda"
    for rep in range(repeats + 1):  # repeat 0 warms every variant up and is not kept
        for v in VARIANTS:
            if cuda:
                torch.cuda.synchronize(device)
                before = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
            rate = (dp_bench.nonprivate_round(models[v], data, steps, device)
                    if v == "nonprivate" else dp_bench.dp_round(trainers[v], rep + 1, device))
            if cuda:
                grown = (torch.cuda.max_memory_allocated(device) - before) / 2**20
                peak[v] = grown if math.isnan(peak[v]) else max(peak[v], grown)
            if rep:
                rates[v].append(rate)
        if rep:
            log(f"  {size}px repeat {rep}/{repeats}: "
                + ", ".join(f"{v}={rates[v][-1]:.0f}/s" for v in VARIANTS))
    paired = {v: [d / n for d, n in zip(rates[v], rates["nonprivate"], strict=True)]
              for v in VARIANTS if v != "nonprivate"}
    med = {v: dp_bench.median(rates[v]) for v in VARIANTS}
    return {
        "size": size, "params": sum(p.numel() for p in base.parameters()), "auto_mode": auto,
        "rates": rates, "median": med,
        "ratio": {v: med[v] / med["nonprivate"] for v in VARIANTS if v != "nonprivate"},
        "paired": {v: (dp_bench.median(p), min(p), max(p)) for v, p in paired.items()},
        "peak_mb": peak,
    }


def bench_noise(size: int, device: torch.device, repeat: int) -> dict[str, float]:
    """Seconds per step to noise the CNN's gradients on ``device``, three ways."""
    source = SecureGaussian()
    grads = [torch.zeros_like(p, device=device) for p in dp_bench.make_model(size).parameters()]

    def previous() -> None:  # CPU-made float32 noise, copied over, then added
        for g in grads:
            g.add_(source.normal_like(torch.empty(g.shape), 1.0).to(device))

    return dp_bench.timed_interleaved({
        "secure": lambda: source.add_noise_each_(grads, 1.0),
        "previous_cpu_noise": previous,
        "torch_normal": lambda: [g.add_(torch.normal(0.0, 1.0, size=g.shape, device=device))
                                 for g in grads],
    }, repeat, dp_bench.synced_clock(device))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (smoke run)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 28])
    parser.add_argument("--steps", type=int, default=0,
                        help="steps per round (default: 20 at 128px, 40 at 28px; quick 4)")
    parser.add_argument("--repeats", type=int, default=0, help="default 5 (quick 2)")
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("dp_cuda_bench: error: --device cuda but torch sees no CUDA device "
              f"(torch {torch.__version__}); nothing was measured", file=sys.stderr)
        return 2

    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False, width=150)

    def log(msg: str) -> None:
        console.print(f"[dim]{msg}[/dim]")

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    log(f"torch {torch.__version__}, device {device} ({name}), cpu threads "
        f"{torch.get_num_threads()}")
    t_start = time.perf_counter()
    results = []
    for size in args.sizes:
        steps = args.steps or (4 if args.quick else (20 if size >= 128 else 40))
        repeats = args.repeats or (2 if args.quick else 5)
        results.append(bench_size(size, steps, repeats, device, log))
    noise = {r["size"]: bench_noise(r["size"], device, 3 if args.quick else 10)
             for r in results}

    tp = Table(title=f"DP-SGD on {device} ({name}), batch 64: samples/s (median of "
               "interleaved repeats) and x non-private")
    for col in ("image", "params", "variant", "samples/s", "x non-private",
                "per repeat: median (range)", "peak memory MB", "x non-private memory"):
        tp.add_column(col, justify="right")
    for r in results:
        for v in VARIANTS:
            ratio = "1.00" if v == "nonprivate" else f"{r['ratio'][v]:.3f}"
            pr = r["paired"].get(v)
            paired = f"{pr[0]:.3f} ({pr[1]:.3f}-{pr[2]:.3f})" if pr else ""
            mem = r["peak_mb"][v]
            mem_ratio = mem / r["peak_mb"]["nonprivate"]
            tp.add_row(f"{r['size']}px", f"{r['params'] / 1e6:.2f}M", v,
                       f"{r['median'][v]:.0f}", ratio, paired, dp_bench._fmt(mem, 0),
                       dp_bench._fmt(mem_ratio, 2))
    console.print(tp)
    tn = Table(title=f"Noise for every gradient of the CNN on {device}, ms per step (median)")
    for col in ("image", "SecureGaussian (CPU keystream, device Box-Muller)",
                "previous (CPU float32 noise copied over)", "torch.normal on the device",
                "secure / torch.normal"):
        tn.add_column(col, justify="right")
    for size, d in noise.items():
        tn.add_row(f"{size}px", f"{1e3 * d['secure']:.2f}",
                   f"{1e3 * d['previous_cpu_noise']:.2f}", f"{1e3 * d['torch_normal']:.2f}",
                   f"{d['secure'] / d['torch_normal']:.1f}")
    console.print(tn)
    console.print(f"total {time.perf_counter() - t_start:.0f} s")
    summary: dict[str, Any] = {"device": str(device), "device_name": name,
                               "torch": torch.__version__}
    for r in results:
        s = r["size"]
        summary[f"auto_mode_{s}"] = r["auto_mode"]
        summary[f"nonprivate_samples_per_s_{s}"] = round(r["median"]["nonprivate"], 1)
        for v in VARIANTS[1:]:
            key = v.replace("+", "_")
            summary[f"throughput_ratio_{s}_{key}"] = round(r["ratio"][v], 3)
            summary[f"paired_ratio_{s}_{key}"] = [round(x, 3) for x in r["paired"][v]]
            mem_ratio = r["peak_mb"][v] / r["peak_mb"]["nonprivate"]
            summary[f"peak_mem_ratio_{s}_{key}"] = (None if math.isnan(mem_ratio)
                                                     else round(mem_ratio, 3))
        summary[f"noise_ms_{s}"] = {k: round(1e3 * t, 3) for k, t in noise[s].items()}
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
