"""The ``bract`` command.

``bract simulate`` runs a simulated federation of hospitals (Flower simulation,
Ray backend) with DP-SGD on every hospital and a privacy accountant that spans
rounds, and writes ``OUT/report.json`` and ``OUT/ledger.jsonl``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console

from bract.argtypes import finite_float, positive_int

if TYPE_CHECKING:
    from bract.records.report import RunReport

DEFAULT_OUT = "runs/latest"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``bract`` command."""
    parser = argparse.ArgumentParser(
        prog="bract", description="Privacy-hardened federated learning for hospitals."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sim = sub.add_parser(
        "simulate",
        help="run a simulated federation of hospitals with DP-SGD",
        description=(
            "Simulate N hospitals training one model with DP-SGD for R rounds. Each "
            "hospital calibrates its noise so its final epsilon meets --target-epsilon, "
            "and refuses any round that would pass that budget."
        ),
    )
    from bract.flower.config import FederationConfig

    # The federation's settings (bract.flower.config); a simulation has no round timeout.
    FederationConfig.add_arguments(sim, skip=("round_timeout",))
    sim.add_argument("--out", type=Path, default=None,
                     help=f"output directory (default {DEFAULT_OUT}; an earlier run there is "
                          "moved aside to runs/latest-<time>, never deleted)")
    sim.add_argument("--save-model", type=Path, default=None,
                     help="write the final global weights to this .npz file")
    sim.add_argument("--drop-rate", type=finite_float, default=0.0,
                     help="share of hospitals that drop out each round (simulated faults)")
    sim.add_argument("--drop-stage", choices=("config", "mask", "consistency", "unmask"),
                     default="mask", help="secure-aggregation stage at which they drop "
                     "(with --no-secagg only config: they fail the round's train message)")
    sim.add_argument("--public-size", type=positive_int, default=None, metavar="N",
                     help="a number of records every hospital declares public (at least "
                          "its own count): sample rate, steps, noise and FedAvg weight come "
                          "from it, so nothing released reveals a hospital's exact count")
    sim.add_argument("--privacy-unit", choices=("record", "patient"), default="record",
                     help="what each hospital protects: each record (default), or each "
                          "patient with all its records (Poisson sampling over patients, "
                          "per-patient clipping and epsilon; needs patient ids: an image "
                          "folder's patient sub-folders or DICOM PatientID); --batch-size "
                          "is then patients per step")
    sim.add_argument("--record-secagg", action="store_true",
                     help="record the server's view of every secure round in OUT/secagg_view "
                          "(check it with: bract audit secagg --view OUT/secagg_view)")
    sim.add_argument("--resume", action="store_true",
                     help="continue the interrupted run in --out from its last completed round")
    sim.add_argument("--new-run", action="store_true",
                     help="--out holds a run: move its records aside to OUT-<time> and start a "
                          "new run of the same hospitals, whose spent budgets carry on (their "
                          "keys and privacy state stay in OUT/hospitals); without this, "
                          "--new-federation or --resume such an --out is refused")
    sim.add_argument("--new-federation", action="store_true",
                     help="--out holds a run: move all of it aside to OUT-<time> (nothing is "
                          "deleted) and start a new simulated federation of new hospitals "
                          "(what a run without --out does)")
    sim.add_argument("--no-progress", action="store_true", help="plain output, no live table")
    from bract.flower.deploy_cli import add_deploy_parser
    from bract.flower.operator import add_operator_parsers

    add_deploy_parser(sub)
    add_operator_parsers(sub)
    from bract.audit.cli import add_audit_parser

    add_audit_parser(sub)
    from bract.explain import add_explain_parser
    from bract.plots import add_plot_parser

    add_plot_parser(sub)
    add_explain_parser(sub)
    from bract.compare import add_compare_parser

    add_compare_parser(sub)
    return parser


def _simulate(args: argparse.Namespace, console: Console) -> int:
    from bract.flower.checkpoint import CheckpointError
    from bract.flower.config import FederationConfig
    from bract.flower.observer import summarize
    from bract.flower.simulation import SimulationConfig, run
    from bract.privacy import PrivacyError
    from bract.records.report import RunReport

    if args.resume + args.new_run + args.new_federation > 1:
        console.print("[red]error:[/red] --resume continues a run, --new-run starts another "
                      "of the same hospitals, --new-federation one of new hospitals: choose one")
        return 2
    default_out = args.out is None
    args.out = Path(DEFAULT_OUT) if default_out else args.out
    from bract.argtypes import output_dir_problem

    # Reading only: run() creates or moves nothing under --out until every setting passed.
    problem = output_dir_problem(args.out, create=False)
    if problem:
        console.print(f"[red]error:[/red] {problem}", highlight=False)
        return 2
    try:
        fed = FederationConfig.from_args(args, out=args.out)
        cfg = SimulationConfig(
            federation=fed, save_model=args.save_model, show_progress=not args.no_progress,
            resume=args.resume, drop_rate=args.drop_rate, drop_stage=args.drop_stage,
            record_secagg=args.record_secagg, public_size=args.public_size,
            privacy_unit=args.privacy_unit,
            previous_run=(
                "new-run" if args.new_run
                else "archive" if default_out or args.new_federation else "refuse"
            ),
        )
        from bract.flower.simulation import warnings_for

        def announce() -> None:  # once the settings passed: a refused run prints only why
            if fed.non_private:
                console.print(
                    "[bold red]NON-PRIVATE RUN:[/bold red] --noise-multiplier 0 adds no "
                    "noise; no differential-privacy guarantee holds for this federation."
                )
            console.print(
                f"bract: {args.clients} hospitals, {args.rounds} rounds, dataset "
                f"{args.dataset}, target ε={args.target_epsilon} at δ={args.delta}, "
                f"output in {args.out}"
            )
            for warning in warnings_for(cfg):
                console.print(f"[yellow]warning:[/yellow] {warning}", highlight=False)

        from bract.flower.interrupt import interruptible, resume_hint

        with interruptible(lambda: resume_hint(args.out, sys.argv[1:])):
            report = run(cfg, on_checked=announce)
    except (PrivacyError, ValueError, CheckpointError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 2
    except RuntimeError as exc:  # the federation did not finish: one line, no traceback
        console.print(f"[red]error:[/red] {exc}", highlight=False)
        return 1
    typed = RunReport.from_plain(report, str(args.out / "report.json"))
    errors = typed.errors()
    if not any(row.trained for row in typed.rounds):
        # Nothing was aggregated: the model is the initial one; report no figure for it.
        console.print(f"[red]error:[/red] {errors[0]}; the record is in {args.out}")
        return 1
    console.print(summarize(typed))
    console.print(f"wrote {args.out / 'report.json'} and {args.out / 'ledger.jsonl'}")
    _print_plots(typed, console)
    if errors:
        # The run finished, but not as asked: say why, once, and exit non-zero.
        console.print(f"[red]error:[/red] {'; '.join(errors)} (report.json records each "
                      "round's failures)", highlight=False)
        return 1
    return 0


def _print_plots(report: RunReport, console: Console) -> None:
    """The plot paths the federation wrote (bract.plots), or how to draw them."""
    plots = report.final.plots if report.final is not None else ()
    if plots:
        console.print("plots: " + ", ".join(str(p) for p in plots))
    else:
        console.print("[yellow]no plots were drawn (see the warning above); redraw them with "
                      "bract plot REPORT.json[/yellow]")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``bract`` console script.

    Guarantee: Ctrl-C before a run's own stop handler is installed (while the command
    parses its flags or imports its libraries) ends the command with one line
    ``interrupted: ...`` on stderr and exit 130, never a traceback; once a run is under
    way, :func:`bract.flower.interrupt.interruptible` handles Ctrl-C and SIGTERM.
    """
    try:
        args = build_parser().parse_args(argv)
        console = Console()
        if args.command == "simulate":
            return _simulate(args, console)
        return int(args.func(args))
    except KeyboardInterrupt:
        print("interrupted: bract stopped (Ctrl-C) before it finished", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
