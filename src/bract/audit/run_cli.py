"""``bract audit empirical`` and ``bract audit secagg``: audits that run what they check.

``empirical`` trains once with canaries and bounds epsilon from below
(:mod:`bract.audit.empirical`); ``secagg`` runs (or reads a recording of) secure
aggregation rounds and checks that the server's view hides every update
(:mod:`bract.audit.secagg_audit`). Both exit 0 when every check passes, 1 when
one fails (or, for ``secagg``, when a check could not be run on a round: verdict
INCOMPLETE, never a pass), 2 on unusable input. Heavy imports (torch, scipy) happen only when a
command runs, so ``bract --help`` stays fast.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from bract.argtypes import finite_float, nonnegative_int

DEFAULT_EMPIRICAL_OUT = Path("runs/audit-empirical")
DEFAULT_SECAGG_OUT = Path("runs/audit-secagg")


def add_run_audit_parsers(audit_sub: Any) -> None:
    """Add ``empirical`` and ``secagg`` to the ``bract audit`` subparsers ``audit_sub``."""
    emp = audit_sub.add_parser(
        "empirical",
        help="empirical lower bound on epsilon from one training run with canaries",
        description=(
            "Train once with the DP-SGD configuration under audit and m canaries, each put "
            "in the training set by a secret coin; guess which were trained on and turn the "
            "correct guesses into a lower bound on epsilon (Steinke, Nasr, Jagielski 2023). "
            "A lower bound above the claimed epsilon proves the claim wrong (exit 1); a bound "
            "below it is consistent with the claim, not a proof of it."
        ),
    )
    claim = emp.add_mutually_exclusive_group()
    claim.add_argument("--target-epsilon", type=finite_float, default=None,
                       help="calibrate the noise for this epsilon, as bract simulate does "
                            "(default 8)")
    claim.add_argument("--noise-multiplier", type=finite_float, default=None,
                       help="use this noise multiplier instead (0 = no noise: non-private)")
    emp.add_argument("--dataset", default="breast-cancer",
                     help="tabular classification dataset (breast-cancer)")
    emp.add_argument("--canaries", type=nonnegative_int, default=1000,
                     help="canaries m (default 1000)")
    emp.add_argument("--confidence", type=finite_float, default=0.95,
                     help="confidence of the lower bound (default 0.95)")
    emp.add_argument("--delta", type=finite_float, default=1e-5, help="delta (default 1e-5)")
    emp.add_argument("--epochs", type=nonnegative_int, default=10,
                     help="training epochs (default 10)")
    emp.add_argument("--batch-size", type=nonnegative_int, default=32,
                     help="expected batch size of Poisson sampling (default 32)")
    emp.add_argument("--lr", type=finite_float, default=0.2, help="SGD learning rate (default 0.2)")
    emp.add_argument("--max-grad-norm", type=finite_float, default=1.0,
                     help="per-example clip norm (default 1)")
    emp.add_argument("--seed", type=int, default=0,
                     help="train/test split seed (coins and noise never use it)")
    emp.add_argument("--out", type=Path, default=DEFAULT_EMPIRICAL_OUT,
                     help=f"output directory (default {DEFAULT_EMPIRICAL_OUT})")
    emp.set_defaults(func=run_empirical_command)

    wb = audit_sub.add_parser(
        "whitebox",
        help="white-box audit: gradient canaries in the real DP optimizer, and the noise "
             "measured",
        description=(
            "Train the task's real model once through bract's trainer with m Dirac gradient "
            "canaries (norm C, one coordinate each, members chosen by secret coins) added "
            "before the noise; score each from every step's noisy gradient and bound epsilon "
            "from below (one-run statistics), and measure the noise on absent canaries' "
            "coordinates. Exit 1 when the bound exceeds the claim or the noise is below what "
            "the ledger records (at the stated confidence)."
        ),
    )
    wclaim = wb.add_mutually_exclusive_group()
    wclaim.add_argument("--target-epsilon", type=finite_float, default=None,
                        help="calibrate the noise for this epsilon (default 2)")
    wclaim.add_argument("--noise-multiplier", type=finite_float, default=None,
                        help="use this noise multiplier instead")
    wb.add_argument("--dataset", default="synthetic",
                    help="built-in task whose model and data are audited (default synthetic: "
                         "the ChestCNN)")
    wb.add_argument("--samples", type=nonnegative_int, default=2400,
                    help="examples of the dataset (default 2400)")
    wb.add_argument("--canaries", type=nonnegative_int, default=5000,
                    help="gradient canaries m (default 5000)")
    wb.add_argument("--noise-scale", type=finite_float, default=1.0,
                    help="train with this multiple of the noise the ledger records (default "
                         "1; 0.5 shows the audit catching a halved noise)")
    wb.add_argument("--epochs", type=nonnegative_int, default=1, help="epochs (default 1)")
    wb.add_argument("--batch-size", type=nonnegative_int, default=None,
                    help="expected batch (default: every record, q = 1, the tightest test)")
    wb.add_argument("--confidence", type=finite_float, default=0.95,
                    help="confidence (default 0.95)")
    wb.add_argument("--delta", type=finite_float, default=1e-5, help="delta (default 1e-5)")
    wb.add_argument("--out", type=Path, default=Path("runs/audit-whitebox"),
                    help="output directory (default runs/audit-whitebox)")
    wb.set_defaults(func=run_whitebox_command)

    sec = audit_sub.add_parser(
        "secagg",
        help="check that the server's view of secure-aggregation rounds hides every update",
        description=(
            "Run secure-aggregation rounds with dropouts (or read a recorded server view with "
            "--view), record every message the server received, and check: with every "
            "secret the shares of any round reveal applied to every round, no sum of fewer "
            "than h clients can be isolated (an update recoverable across rounds fails); each "
            "masked input is uniform over the ring; after the server removes every mask it can "
            "(the survivors' self masks and the dropped clients' pair masks), each survivor's "
            "vector is still uniform and uncorrelated with its input; and the aggregate "
            "equals the sum of the survivors' inputs."
        ),
    )
    sec.add_argument("--clients", type=nonnegative_int, default=8,
                     help="clients per round (default 8)")
    sec.add_argument("--dim", type=nonnegative_int, default=20_000,
                     help="vector length (default 20000)")
    sec.add_argument("--dropouts", type=nonnegative_int, default=2,
                     help="clients that drop out after sharing keys, before sending their "
                          "masked input: the server reconstructs their mask keys (default 2)")
    sec.add_argument("--graph", choices=("complete", "harary"), default="complete",
                     help="who shares masks with whom (default complete)")
    sec.add_argument("--rounds", type=nonnegative_int, default=1, help="rounds (default 1)")
    sec.add_argument("--view", type=Path, default=None,
                     help="check a recorded server view instead of running rounds (a "
                          "directory written by this command: OUT/secagg_view)")
    sec.add_argument("--roster", type=Path, default=None,
                     help="with --view: the federation's roster.json (the hospitals' public "
                          "keys; take it from the hospitals, not from the server): share "
                          "messages whose signature does not verify are set aside. Without "
                          "it, a node with several share messages in the view (a forged or "
                          "refused one among them) has its shares counted against any of "
                          "them")
    sec.add_argument("--out", type=Path, default=DEFAULT_SECAGG_OUT,
                     help=f"output directory (default {DEFAULT_SECAGG_OUT})")
    sec.set_defaults(func=run_secagg_command)


def _fmt(value: float) -> str:
    return "∞" if not math.isfinite(value) else f"{value:.3f}"


def run_empirical_command(args: argparse.Namespace) -> int:
    """``bract audit empirical``: run the audit, print a table, write OUT/empirical.*."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from bract.audit.empirical import (
        EmpiricalAuditConfig,
        run_empirical_audit,
        write_empirical_report,
    )
    from bract.privacy import PrivacyError

    console = Console()
    target = args.target_epsilon
    if target is None and args.noise_multiplier is None:
        target = 8.0
    try:
        config = EmpiricalAuditConfig(
            dataset=args.dataset, canaries=args.canaries, target_epsilon=target,
            noise_multiplier=args.noise_multiplier, delta=args.delta,
            max_grad_norm=args.max_grad_norm, epochs=args.epochs, batch_size=args.batch_size,
            lr=args.lr, confidence=args.confidence, seed=args.seed,
        )
    except ValueError as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 2
    if config.noise_multiplier == 0:
        console.print("[bold red]NON-PRIVATE RUN:[/bold red] noise multiplier 0 adds no noise; "
                      "the audit measures how much a run without DP leaks.")
    try:
        with Progress(TextColumn("[bold]training with canaries"), BarColumn(),
                      TextColumn("{task.completed}/{task.total} steps"), TimeRemainingColumn(),
                      console=console, transient=True) as progress:
            task = progress.add_task("train", total=None)

            def on_step(step: int, total: int) -> None:
                progress.update(task, completed=step, total=total)

            report = run_empirical_audit(config, on_step=on_step)
    except (PrivacyError, ValueError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 2
    paths = write_empirical_report(report, args.out)
    table = Table(title="bract audit empirical")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    b = report.best
    for name, value in (
        (f"claimed ε (δ={report.delta:g}, {report.accountant})",
         _fmt(report.claimed_epsilon)),
        (f"empirical lower bound ({report.confidence:.0%} confidence)",
         f"{report.epsilon_lower:.3f}"),
        ("noise multiplier σ", f"{report.noise_multiplier:.4g}"),
        ("sampling rate q / steps", f"{report.sample_rate:.4g} / {report.steps}"),
        ("canaries m (included)", f"{report.canaries} ({report.included})"),
        ("guesses (k+ / k-)", f"{b.guesses} ({b.k_plus} / {b.k_minus})"),
        ("correct guesses", f"{b.correct} ({b.correct / max(1, b.guesses):.1%})"),
        ("test accuracy", f"{report.test_accuracy:.3f}"),
    ):
        table.add_row(name, value)
    console.print(table)
    style = "green" if report.verdict == "consistent" else "bold red"
    console.print(f"verdict: [{style}]{report.verdict}[/{style}] "
                  f"(lower bound {report.epsilon_lower:.3f} vs claimed "
                  f"{_fmt(report.claimed_epsilon)})")
    console.print("wrote " + ", ".join(str(p) for p in paths))
    return 0 if report.verdict == "consistent" else 1


def run_whitebox_command(args: argparse.Namespace) -> int:
    """``bract audit whitebox``: run the gradient-canary audit, print a table, write
    OUT/whitebox.json; exit 1 on a violation, 2 on unusable input."""
    import json

    from bract.audit.whitebox import GradientCanaryAuditConfig, run_gradient_canary_audit
    from bract.privacy import PrivacyError

    console = Console()
    target = args.target_epsilon
    if target is None and args.noise_multiplier is None:
        target = 2.0
    try:
        config = GradientCanaryAuditConfig(
            dataset=args.dataset, samples=args.samples, canaries=args.canaries,
            target_epsilon=target, noise_multiplier=args.noise_multiplier,
            noise_scale=args.noise_scale, delta=args.delta, epochs=args.epochs,
            batch_size=args.batch_size, confidence=args.confidence,
        )
        with console.status("training with gradient canaries"):
            report = run_gradient_canary_audit(config)
    except (PrivacyError, ValueError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "whitebox.json"
    path.write_text(json.dumps(report.to_plain(), indent=2, default=str) + "\n")
    table = Table(title="bract audit whitebox")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    for name, value in (
        (f"claimed ε (δ={report.delta:g}, {report.accountant})", _fmt(report.claimed_epsilon)),
        (f"canary lower bound ({report.confidence:.0%} confidence)",
         f"{report.epsilon_lower:.3f}"),
        ("noise measured / recorded (upper bound)",
         f"{report.noise_ratio:.3f} ({report.noise_ratio_upper:.3f})"),
        (f"Gaussian-fit lower bound ({report.confidence:.0%}; assumes Gaussian noise)",
         "- (needs full-batch steps)" if math.isnan(report.epsilon_gaussian_fit)
         else f"{report.epsilon_gaussian_fit:.3f}"),
        ("noise multiplier σ (recorded)", f"{report.noise_multiplier:.4g}"),
        ("sampling rate q / steps", f"{report.sample_rate:.4g} / {report.steps}"),
        ("canaries m (members)", f"{report.canaries} ({report.members})"),
    ):
        table.add_row(name, value)
    console.print(table)
    verdict = "VIOLATION" if report.violation else "consistent"
    style = "bold red" if report.violation else "green"
    console.print(f"verdict: [{style}]{verdict}[/{style}]; wrote {path}")
    return 1 if report.violation else 0


def run_secagg_command(args: argparse.Namespace) -> int:
    """``bract audit secagg``: record (or read) the server's view, check it, write OUT."""
    from rich.markup import escape

    from bract.audit.secagg_audit import (
        SecAggAuditConfig,
        audit_views,
        record_rounds,
        write_secagg_report,
    )
    from bract.records.roster import read_roster
    from bract.secagg import SecAggError
    from bract.secagg.recording import read_view

    console = Console()
    try:
        roster = None
        if args.roster is not None:
            if args.view is None:
                raise ValueError("--roster checks a recorded view: give --view too (the "
                                 "rounds this command runs itself have no forged messages)")
            members = read_roster(args.roster)
            roster = members.keys
        if args.view is not None:
            views = read_view(args.view)
        else:
            config = SecAggAuditConfig(clients=args.clients, dim=args.dim,
                                       dropouts=args.dropouts, graph=args.graph,
                                       rounds=args.rounds)
            with console.status("running secure-aggregation rounds and recording the "
                                "server's view"):
                views = record_rounds(config)
        if roster is not None:
            _same_federation(views, members.federation_id, args.roster)
        report = audit_views(views, roster=roster)
    except (ValueError, SecAggError, OSError) as exc:
        console.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False)
        return 2
    except (KeyError, IndexError, TypeError, ArithmeticError) as exc:
        if args.view is None:
            raise  # a view this command recorded itself: a bug, not bad input
        console.print(f"[red]error:[/red] the recorded view at {escape(str(args.view))} is "
                      f"inconsistent and cannot be audited ({type(exc).__name__}: "
                      f"{escape(str(exc))})", highlight=False)
        return 2
    paths = write_secagg_report(report, args.out, views if args.view is None else ())
    table = Table(title="bract audit secagg")
    for col in ("round", "check", "result"):
        table.add_column(col)
    table.add_column("detail", overflow="fold")
    marks = {"pass": "[green]pass[/green]", "FAIL": "[bold red]FAIL[/bold red]",
             "skipped": "[bold yellow]skipped[/bold yellow]", "n/a": "n/a"}
    for check in report.checks:
        table.add_row(str(check.round), check.name, marks[check.status], escape(check.detail))
    console.print(table)
    style = {"pass": "green", "INCOMPLETE": "bold yellow"}.get(report.verdict, "bold red")
    gap = f" — {report.gap}" if report.gap else f" (rounds 1 to {report.rounds})"
    if report.interrupted:
        cut = sorted(set(report.interrupted))
        gap += (f"; interrupted in round{'s' if len(cut) > 1 else ''} "
                f"{', '.join(map(str, cut))} (audited as aborted)")
    skipped = report.skipped_summary
    more = (f"; {skipped}: not shown to hide the updates (see the table)" if skipped else "")
    for wrong in report.wrong_shares:
        console.print(f"wrong share: {escape(wrong)} (not counted as a valid point)",
                      highlight=False)
    for line in report.several_share_messages:
        console.print(f"several share messages: {escape(line)}", highlight=False)
    for line in report.set_aside_share_messages:
        console.print(f"set aside: {escape(line)}", highlight=False)
    console.print(f"verdict: [{style}]{report.verdict}[/{style}]{escape(gap + more)}",
                  highlight=False)
    console.print("wrote " + ", ".join(str(p) for p in paths))
    return 0 if report.passed else 1


def _same_federation(views: list, federation_id: str, path: Path) -> None:
    """Refuse a roster of another federation than the view's rounds were run in."""
    from bract.secagg.messages import RoundConfig

    for view in views:
        for d, m in view.messages:
            if d == "out" and isinstance(m, RoundConfig) and m.federation_id != federation_id:
                raise ValueError(f"{path} is the roster of federation {federation_id!r}, but "
                                 f"round {view.round} of the view was run in "
                                 f"{m.federation_id!r}.")
