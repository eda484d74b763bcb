"""Breast cancer across five hospitals: DP-SGD, secure aggregation, and an independent audit.

Run:  python examples/breast_cancer_hospitals.py

scikit-learn's bundled Wisconsin breast-cancer set (569 patients, 30 features) is
split into a central test set and five hospitals with Dirichlet label skew
(alpha 0.5: some hospitals see mostly benign, some mostly malignant cases). Every
hospital trains a small MLP with DP-SGD calibrated so that its epsilon after the
last round is at most 3 (delta 1e-5); updates and example counts leave a hospital
only inside masked vectors. Then, as a privacy officer would, the example checks
the signed ledger and recomputes every epsilon with an independent accountant
(dp_accounting PLD), and compares the result with a centralized, non-private
scikit-learn logistic regression on the same split.

Outputs in --out: report.json, ledger.jsonl (signed), roster.json, epsilon.png,
metric.png, and audit/ (audit.md, audit.html, epsilon_per_round.png).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

from bract import tasks
from bract.audit.report import verdict_line, write_reports
from bract.audit.verify import verify_federation
from bract.flower.config import FederationConfig
from bract.flower.observer import summarize
from bract.flower.simulation import SimulationConfig, run
from bract.records.report import RunReport


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hospitals", type=int, default=5)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--epsilon", type=float, default=3.0, help="each hospital's budget")
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet label skew")
    p.add_argument("--seed", type=int, default=0, help="split, partition and model seed")
    p.add_argument("--out", type=Path, default=Path("runs/breast_cancer"))
    p.add_argument("--no-progress", action="store_true", help="plain output, no live table")
    return p.parse_args()


def main() -> int:
    args = parse_args()
    console = Console()
    try:
        federation = FederationConfig(
            dataset="breast-cancer", clients=args.hospitals, rounds=args.rounds,
            target_epsilon=args.epsilon, delta=args.delta, seed=args.seed,
            partition="dirichlet", alpha=args.alpha, out=args.out,
        )
        # a re-run moves the earlier run in --out aside (OUT-<time>); nothing is deleted
        report = run(SimulationConfig(federation, show_progress=not args.no_progress,
                                      previous_run="archive"))
    except ValueError as exc:  # bad settings: bract's errors name the fix
        console.print(f"[red]error:[/red] {exc}")
        return 2
    except RuntimeError as exc:  # the federation did not finish: say why, once
        console.print(f"[red]error:[/red] {exc}", highlight=False)
        return 1
    typed = RunReport.from_plain(report, str(args.out / "report.json"))
    errors = typed.errors()
    if errors:  # a run that failed says so, and reports no figure of an untrained model
        console.print(f"[red]error:[/red] {'; '.join(errors)} (the record is in {args.out})")
        return 1
    console.print(summarize(typed))

    # The privacy officer's check: signatures, hash chains, every epsilon recomputed.
    audit = verify_federation(args.out / "ledger.jsonl", args.out / "roster.json",
                              report_path=args.out / "report.json", budget=args.epsilon)
    write_reports(audit, args.out / "audit")
    console.print(verdict_line(audit))

    central = tasks.centralized_baseline(tasks.dataset_for(federation.task()))
    console.print(
        f"global model accuracy {report['final']['accuracy']:.3f} at ε ≤ {args.epsilon:g} "
        f"(δ = {args.delta:g}) vs centralized non-private logistic regression "
        f"{central['accuracy']:.3f}"
    )
    console.print(f"outputs in {args.out}: report.json, ledger.jsonl, epsilon.png, "
                  "metric.png, audit/")
    return 0 if audit.passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
