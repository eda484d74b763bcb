"""Diabetes regression, federated with DP and secure aggregation, against a centralized model.

Run:  python examples/diabetes_vs_centralized.py

scikit-learn's bundled diabetes set (442 patients, 10 features, a disease-progression
score one year on) is split into a central test set and hospitals. The study
trains, on the same split and partition:

* a centralized, non-private scikit-learn LinearRegression on the pooled records
  (what pooling every patient in one place would give);
* FedAvg without noise (flagged NON-PRIVATE: epsilon is infinite);
* FedAvg with DP-SGD at each budget of --epsilons (plain aggregation);
* FedAvg with DP-SGD and bract's secure aggregation at the first budget;

and reports R² and MSE on the central test set, the final epsilon and the time per
round, as a table (compare.md) and plots. This is ``bract compare --dataset diabetes``
with the example's defaults; the library call is shown so you can change the arms.

Outputs in --out: compare.json, compare.md, metric_vs_round.png,
epsilon_vs_round.png, utility_vs_epsilon.png, and every federated run in its own
sub-folder (report.json, signed ledger.jsonl, roster.json, plots).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

from bract.compare import ComparisonError, run_comparison
from bract.flower.config import FederationConfig


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hospitals", type=int, default=3)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--epsilons", type=float, nargs="+", default=[8.0, 3.0],
                   help="DP budgets; the first is also the secure-aggregation arm's")
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--partition", choices=("iid", "quantity"), default="iid",
                   help="iid, or quantity skew (hospitals of very different sizes)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("runs/diabetes"))
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args()


def main() -> int:
    args = parse_args()
    console = Console()
    try:
        federation = FederationConfig(
            dataset="diabetes", clients=args.hospitals, rounds=args.rounds,
            partition=args.partition, seed=args.seed, delta=args.delta, out=args.out,
            secagg=False,  # each variant sets its own; the DP + SecAgg one turns it on
        )
        study = run_comparison(federation, args.epsilons, show_progress=not args.no_progress,
                               console=console)
    except ValueError as exc:  # bad settings: bract's errors name the fix
        console.print(f"[red]error:[/red] {exc}")
        return 2
    except ComparisonError as exc:  # an arm failed: the study's files mark it, no figure
        study, failure = exc.result, exc
    else:
        failure = None
    central = study["centralized"]["r2"]
    for arm in study["variants"]:
        if arm.get("failed"):  # a failed arm has no R² to compare
            continue
        console.print(f"{arm['label']}: R² {arm['r2']:.3f}; centralized {central:.3f} "
                      f"(gap, centralized − federated: {central - arm['r2']:+.3f})")
    if failure is not None:
        console.print(f"[red]error:[/red] {failure}", highlight=False)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
