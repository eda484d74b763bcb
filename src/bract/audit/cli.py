"""The ``bract audit`` command group: checks a privacy officer runs on recorded files.

:func:`add_audit_parser` builds the ``audit`` subcommand and its own subparsers;
each audit registers itself there with a function of its own (``verify`` below)
that sets ``func`` on its parser, so ``bract.cli.main`` only calls
``args.func(args)``. Audits read files; none imports flwr.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from bract.argtypes import positive_float
from bract.audit.run_cli import add_run_audit_parsers


def add_audit_parser(sub: Any) -> argparse._SubParsersAction:
    """Add ``bract audit`` to the ``bract`` subparsers ``sub``; returns its subparsers.

    Every audit subcommand is added to the returned object, so ``bract audit
    --help`` lists them all.
    """
    audit = sub.add_parser(
        "audit",
        help="audit what a federation recorded (ledgers, privacy claims)",
        description=(
            "Audits of a federation's record that do not trust the code that made it: "
            "they re-check every claim from the recorded files."
        ),
    )
    audit_sub = audit.add_subparsers(dest="audit_command", required=True)
    add_verify_parser(audit_sub)
    add_run_audit_parsers(audit_sub)  # empirical, secagg
    return audit_sub


def _tolerance(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0.0 < value < 0.5:
        raise argparse.ArgumentTypeError(f"must lie in (0, 0.5), got {text}")
    return value


def _hospital_copy(text: str) -> tuple[str, Path]:
    cid, sep, path = text.partition("=")
    if not sep or not cid or not path:
        raise argparse.ArgumentTypeError(
            f"expected CLIENT=PATH (e.g. hospital-0=hospitals/hospital-0/ledger.jsonl), "
            f"got {text!r}"
        )
    return cid, Path(path)


def add_verify_parser(audit_sub: Any) -> argparse.ArgumentParser:
    """``bract audit verify``: ledger integrity and independent epsilon recomputation."""
    from bract.audit.verify import DEFAULT_TOLERANCE, PLD_DISCRETIZATION

    p = audit_sub.add_parser(
        "verify",
        help="verify signed ledgers and recompute every reported epsilon",
        description=(
            "Check every hospital's signed, hash-chained ledger against the roster's keys, "
            "recompute epsilon after every entry with dp_accounting's PLD accountant, and "
            "compare it with what the entries and report.json claim. Writes audit.md, "
            "audit.html and epsilon_per_round.png. Exit code 0: everything passed; 1: a "
            "check failed (a chain whose length nothing vouches for — no finished run's "
            "report.json, no own copy — fails: its completeness is not checked); 2: an "
            "input is missing or unusable."
        ),
    )
    p.add_argument("ledger", type=Path, metavar="LEDGER",
                   help="the server's ledger.jsonl (or one hospital's own copy)")
    p.add_argument("--roster", type=Path, required=True,
                   help="roster.json with the hospitals' public keys (get it from the "
                        "hospitals, not from the server you audit)")
    p.add_argument("--report", type=Path, default=None,
                   help="the run's report.json: its per-round epsilons, steps and trained "
                        "hospitals are checked against the ledger")
    p.add_argument("--hospital-copy", type=_hospital_copy, action="append", default=[],
                   metavar="CLIENT=PATH",
                   help="a hospital's own ledger copy to compare line by line (repeatable)")
    p.add_argument("--tolerance", type=_tolerance, default=DEFAULT_TOLERANCE,
                   help=f"relative tolerance on epsilon (default {DEFAULT_TOLERANCE})")
    p.add_argument("--budget", type=positive_float, default=None,
                   help="epsilon budget (default: the report's target_epsilon)")
    p.add_argument("--pld-discretization", type=positive_float, default=PLD_DISCRETIZATION,
                   help=f"PLD value discretization (default {PLD_DISCRETIZATION:g}; larger is "
                        "faster and more pessimistic)")
    p.add_argument("--out", type=Path, default=None,
                   help="where to write the report (default: LEDGER's directory/audit)")
    p.set_defaults(func=run_verify)
    return p


def run_verify(args: argparse.Namespace) -> int:
    """Run ``bract audit verify``; returns the exit code (0 pass, 1 fail, 2 bad input)."""
    from rich.console import Console
    from rich.markup import escape
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from bract.argtypes import output_dir_problem
    from bract.audit.report import verdict_line, write_reports
    from bract.audit.verify import AuditInputError, verify_federation

    console = Console()
    copies = dict(args.hospital_copy)
    if len(copies) != len(args.hospital_copy):
        console.print("[red]error:[/red] --hospital-copy names the same hospital twice")
        return 2
    out = args.out if args.out is not None else args.ledger.parent / "audit"
    problem = output_dir_problem(out)  # before any epsilon is recomputed
    if problem is not None:
        console.print(f"[red]error:[/red] {escape(problem)}", highlight=False)
        return 2
    progress = Progress(
        TextColumn("[bold]recomputing ε"), BarColumn(), MofNCompleteColumn(),
        console=console, transient=True,
    )
    task = progress.add_task("entries", total=None)
    try:
        with progress:
            result = verify_federation(
                args.ledger, args.roster, report_path=args.report, hospital_copies=copies,
                tolerance=args.tolerance, budget=args.budget,
                pld_discretization=args.pld_discretization,
                progress=lambda done, total: progress.update(task, completed=done, total=total),
            )
    except AuditInputError as exc:
        console.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False)
        return 2
    try:
        paths, plot_problem = write_reports(result, out)
    except OSError as exc:
        console.print(f"[red]error:[/red] cannot write the report to {escape(str(out))}: "
                      f"{escape(str(exc))}", highlight=False)
        return 2
    colour = "green" if result.passed else "red"
    console.print(f"[bold {colour}]{escape(verdict_line(result))}[/bold {colour}]",
                  highlight=False)
    for f in result.failures:
        who = f"{f.hospital}: " if f.hospital else ""
        console.print(f"  [red]FAIL[/red] ({escape(f.topic)}) {escape(who + f.message)}",
                      highlight=False)
    if plot_problem is None:
        console.print(escape(f"wrote {paths['markdown']}, {paths['html']} and {paths['plot']}"),
                      highlight=False)
    else:
        console.print(escape(f"wrote {paths['markdown']} and {paths['html']}; the plot could "
                             f"not be drawn ({plot_problem})"), highlight=False)
    return 0 if result.passed else 1
