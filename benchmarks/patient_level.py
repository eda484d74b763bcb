"""Patient-level vs record-level DP-SGD throughput, side by side in one run.

The same ChestCNN (28x28, or --size), the same synthetic images, 4 records per
patient (--visits), and the same expected number of *records* per step (64): the
patient-level trainers sample 64/visits patients per step and clip each patient's
summed gradient (bk: book-keeping with per-patient Gram sums, what auto picks; and
hooks); the record-level trainers sample 64 records and clip each record (hooks, and
bk: bract's default for this model).

Throughput is records per second from the first step's end to the last step's end
of one round (Opacus wrapping and the warm-up step excluded). Variants are
interleaved and repeated; the table shows medians and the ratios of each
patient-level mode to the record-level run in the same mode. Benchmarks are not
tests: nothing here asserts a time.

    python benchmarks/patient_level.py [--size 28] [--repeats 5] [--visits 4]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch.utils.data import DataLoader, TensorDataset

from bract.models import ChestCNN
from bract.privacy.training import PrivateTrainer


def one_round(variant: str, x, y, patients, batch_records: int, visits: int) -> float:
    torch.manual_seed(0)
    model = ChestCNN(image_size=x.shape[-1], num_classes=3)
    patient_level = variant.startswith("patient")
    batch = batch_records // visits if patient_level else batch_records
    trainer = PrivateTrainer(
        model, torch.optim.SGD(model.parameters(), lr=0.05),
        DataLoader(TensorDataset(x, y), batch_size=batch), noise_multiplier=1.0,
        max_grad_norm=1.0, delta=1e-5,
        grad_sample_mode=variant.split("-")[1],
        patient_ids=patients if patient_level else None,
    )
    ends: list[float] = []
    records: list[int] = []
    model.register_forward_hook(lambda m, i, o: records.append(len(i[0])))
    trainer.train_round(1, on_step=lambda s, t: ends.append(time.perf_counter()))
    # records seen after the first step, over the time from the first step's end
    # (the probe's forward passes happened before training and are not counted)
    seen = sum(records[-(len(ends) - 1):]) if len(ends) > 1 else 0
    return seen / (ends[-1] - ends[0])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=28)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--visits", type=int, default=4)
    p.add_argument("--records", type=int, default=640)
    args = p.parse_args()
    if args.records < 2 * 64:
        p.error("--records must be at least 128: throughput is timed from the end of a "
                "round's first step of 64 records, so a round needs two steps")
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.records, 1, args.size, args.size, generator=gen)
    y = torch.randint(0, 3, (args.records,), generator=gen)
    patients = [i // args.visits for i in range(args.records)]
    variants = ("record-hooks", "record-bk", "patient-hooks", "patient-bk")
    runs: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(args.repeats):
        for v in variants:
            runs[v].append(one_round(v, x, y, patients, 64, args.visits))
    med = {v: statistics.median(r) for v, r in runs.items()}
    print(f"ChestCNN {args.size}x{args.size}, {args.visits} records per patient, 64 records "
          f"per step expected, {args.repeats} interleaved repeats (records/s, median, range)")
    for v in variants:
        print(f"  {v:14s} {med[v]:8.0f}   ({min(runs[v]):.0f}-{max(runs[v]):.0f})")
    ratios = {"patient_over_record_hooks": med["patient-hooks"] / med["record-hooks"],
              "patient_over_record_bk": med["patient-bk"] / med["record-bk"],
              "patient_bk_over_patient_hooks": med["patient-bk"] / med["patient-hooks"]}
    print(f"patient-level / record-level, hooks: {ratios['patient_over_record_hooks']:.2f}; "
          f"bk: {ratios['patient_over_record_bk']:.2f}; patient-level bk / hooks: "
          f"{ratios['patient_bk_over_patient_hooks']:.2f}")
    print(json.dumps({"size": args.size, "visits": args.visits, "records_per_s": med,
                      **ratios}))


if __name__ == "__main__":
    main()
