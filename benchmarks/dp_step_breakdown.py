"""Where a DP-SGD step's time goes, phase by phase, beside a non-private step.

Diagnostic for the DP-SGD throughput goal (``dp_bench.py`` measures the goal itself):
the same ChestCNN, data, batch and thread count as ``dp_bench.py``; non-private
rounds and rounds of one book-keeping variant (``bk``, ``bk+prefetch``, as
``dp_bench.py`` names them) alternate, and each phase is timed with
``time.perf_counter`` around the call that does it:

* non-private: loading the batch (a shuffled DataLoader), forward, loss and backward,
  ``SGD.step``;
* DP: loading the batch (the secure Poisson loader), forward, book-keeping's backward
  pass, and inside it each layer's per-example rule and the clipped sums, then the DP
  optimizer's step, and inside it adding the noise and ``SGD.step``. Where the rules
  run on a second thread beside the backward pass (by default when a core is free of
  torch's threads, e.g. ``--threads 1`` on 2 cores; the ``+serial`` variants keep
  them inside it), their times overlap the pass's and are not part of its sum.

Figures are milliseconds per step, averaged over the timed rounds (the first round
of each is a warm-up and is not counted): "step" runs from the end of a round's first
step to the end of its last, as ``dp_bench.py`` times it; each phase is its round's
total over its number of steps. The wrappers cost a few microseconds per call; the
phases' sum is close to, not exactly, the step time.

Usage::

    python benchmarks/dp_step_breakdown.py                    # 28px, bk+prefetch
    python benchmarks/dp_step_breakdown.py --size 128 --variant bk --steps 4
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import dp_bench
import torch
from torch import nn
from torch.utils.data import DataLoader

from bract.models.cnn import ChestCNN
from bract.privacy import bookkeeping, noise
from bract.privacy.bookkeeping import BookKeepingClipper

Timings = dict[str, list[float]]


def _timed(timings: Timings, key: str | Callable[..., str], fn: Callable) -> Callable:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            name = key(*args) if callable(key) else key
            timings[name].append(time.perf_counter() - t0)
    return wrapper


def instrument(timings: Timings, names: dict[nn.Module, str]) -> None:
    """Wrap the calls whose time is reported (for this process only); ``names``: the
    DP model's layers and their names."""
    ChestCNN.forward = _timed(timings, "forward", ChestCNN.forward)
    BookKeepingClipper.backward = _timed(timings, "backward (book-keeping)",
                                         BookKeepingClipper.backward)
    BookKeepingClipper._rule = staticmethod(_timed(
        timings, lambda module, *_: f"  per-example rule {names[module]} "
        f"({type(module).__name__})", BookKeepingClipper._rule))
    bookkeeping.layer_clipped_sum = _timed(timings, "  clipped sums",
                                           bookkeeping.layer_clipped_sum)
    from opacus.optimizers.optimizer import DPOptimizer
    DPOptimizer.step = _timed(timings, "optimizer step (DP)", DPOptimizer.step)
    for cls in (noise.NoisePrefetcher, noise.SecureGaussian):
        cls.add_noise_each_ = _timed(timings, "  adding the noise", cls.add_noise_each_)
    torch.optim.SGD.step = _timed(timings, "  SGD.step", torch.optim.SGD.step)
    from torch.utils.data.dataloader import _BaseDataLoaderIter
    _BaseDataLoaderIter.__next__ = _timed(timings, "load batch", _BaseDataLoaderIter.__next__)


def nonprivate_round(model: nn.Module, data: Any, steps: int, timings: Timings,
                     stamps: list[float]) -> None:
    """``steps`` plain SGD steps, each phase timed (dp_bench's loop, unrolled); the end
    of every step is appended to ``stamps``."""
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=dp_bench.LR)
    crit = nn.CrossEntropyLoss()
    batches = iter(DataLoader(data, batch_size=dp_bench.BATCH, shuffle=True))
    for _ in range(steps):
        x, y = next(batches)
        opt.zero_grad()
        out = model(x)
        t2 = time.perf_counter()
        crit(out, y).backward()
        t3 = time.perf_counter()
        opt.step()
        stamps.append(time.perf_counter())
        timings["loss and backward"].append(t3 - t2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=28, help="image size (28 or 128)")
    parser.add_argument("--variant", default="bk+prefetch", help="a bk variant of dp_bench")
    parser.add_argument("--steps", type=int, default=30, help="steps per round")
    parser.add_argument("--rounds", type=int, default=6, help="timed rounds of each")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    args = parser.parse_args(argv)
    if not args.variant.startswith("bk"):
        parser.error("--variant must be book-keeping (bk, bk+prefetch, bk+torchnoise)")
    warnings.simplefilter("ignore")
    torch.set_num_threads(args.threads)

    from rich.console import Console
    from rich.table import Table

    data = dp_bench.make_data(args.size, args.steps * dp_bench.BATCH, seed=1)
    init = {k: v.clone() for k, v in dp_bench.make_model(args.size).state_dict().items()}
    plain_model = dp_bench.make_model(args.size, init)
    trainer = dp_bench.dp_variant(dp_bench.make_model(args.size, init), data, args.variant)
    timings: dict[str, Timings] = {"non-private": defaultdict(list), "dp": defaultdict(list)}
    live: Timings = defaultdict(list)
    instrument(live, {m: name for name, m in trainer.model.named_modules()})
    rounds = {"non-private": 0, "dp": 0}
    for rnd in range(args.rounds + 1):
        for kind in ("non-private", "dp"):
            live.clear()
            stamps: list[float] = []
            if kind == "non-private":
                nonprivate_round(plain_model, data, args.steps, live, stamps)
            else:
                trainer.train_round(rnd + 1, on_step=lambda _s, _t, stamps=stamps: stamps.append(
                    time.perf_counter()))
            if rnd == 0 or len(stamps) < 2:
                continue  # warm-up (or a round too short to time)
            # Phases over every step of the round; the step itself from the end of the
            # first step to the end of the last (dp_bench's rule: no set-up, no warm-up).
            for key, values in live.items():
                timings[kind][key].append(sum(values) / len(stamps))
            timings[kind]["step"].append((stamps[-1] - stamps[0]) / (len(stamps) - 1))
            rounds[kind] += 1

    console = Console(highlight=False)
    table = Table(title=f"ms per step, ChestCNN {args.size}px, batch {dp_bench.BATCH}, "
                  f"{args.threads} torch thread(s), {args.rounds} rounds x {args.steps} steps")
    for col in ("phase", "non-private", args.variant):
        table.add_column(col, justify="right" if col != "phase" else "left")
    keys = ["step", "load batch", "forward", "loss and backward",
            "backward (book-keeping)",
            *sorted(k for k in timings["dp"] if k.startswith("  per-example")),
            "  clipped sums", "optimizer step (DP)", "  adding the noise", "  SGD.step"]
    summary: dict[str, dict[str, float]] = {}
    for key in keys:
        row = []
        for kind in ("non-private", "dp"):
            values = timings[kind].get(key)
            ms = 1e3 * sum(values) / rounds[kind] if values else None
            row.append("" if ms is None else f"{ms:.2f}")
            if ms is not None:
                summary.setdefault(kind, {})[key.strip()] = round(ms, 3)
        table.add_row(key, *row)
    console.print(table)
    print(json.dumps({"size": args.size, "variant": args.variant, "ms_per_step": summary}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
