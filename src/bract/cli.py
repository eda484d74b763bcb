"""The ``bract`` command.

``bract simulate`` runs a simulated federation of hospitals (Flower simulation,
Ray backend) with DP-SGD on every hospital and a privacy accountant that spans
rounds, and writes ``OUT/report.json`` and ``OUT/ledger.jsonl``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console

from bract.argtypes import finite_float, nonnegative_int, positive_int

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
    sim.add_argument("--clients", type=positive_int, default=3, help="hospitals (default 3)")
    sim.add_argument("--rounds", type=positive_int, default=3, help="rounds (default 3)")
    sim.add_argument(
        "--dataset", choices=("synthetic", "breast-cancer", "diabetes", "medmnist", "imagefolder"),
        default="synthetic",
        help="diabetes is regression (MSE, R²); medmnist and imagefolder read --data-path",
    )
    sim.add_argument("--data-path", type=Path, default=None,
                     help="MedMNIST .npz file (medmnist) or folder of class sub-folders "
                          "(imagefolder); nothing is downloaded")
    sim.add_argument("--partition", choices=("iid", "dirichlet", "quantity", "column"),
                     default="iid", help="how the training set is split between hospitals")
    sim.add_argument("--alpha", type=finite_float, default=0.5,
                     help="Dirichlet concentration for dirichlet/quantity (small: more skew)")
    sim.add_argument("--partition-column", default=None, metavar="NAME_OR_INDEX",
                     help="column for --partition column: 'label', a feature name or index")
    sim.add_argument("--target-epsilon", type=finite_float, default=8.0,
                     help="each hospital's epsilon budget for the whole run (default 8)")
    sim.add_argument("--delta", type=finite_float, default=1e-5, help="delta (default 1e-5)")
    sim.add_argument(
        "--noise-multiplier", type=finite_float, default=None,
        help="override calibration; 0 means no noise and is flagged NON-PRIVATE everywhere",
    )
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument("--out", type=Path, default=None,
                     help=f"output directory (default {DEFAULT_OUT}; an earlier run there is "
                          "moved aside to runs/latest-<time>, never deleted)")
    sim.add_argument("--save-model", type=Path, default=None,
                     help="write the final global weights to this .npz file")
    sim.add_argument("--local-epochs", type=positive_int, default=1)
    sim.add_argument("--batch-size", type=positive_int, default=None,
                     help="expected batch size of Poisson sampling (default 64 images, 32 tabular)")
    sim.add_argument("--lr", type=finite_float, default=None,
                     help="local SGD learning rate (default 0.3 images, 0.2 breast-cancer, "
                          "0.5 diabetes)")
    sim.add_argument("--momentum", type=finite_float, default=None,
                     help="local SGD momentum (default 0.5 images, 0 tabular)")
    sim.add_argument("--max-grad-norm", type=finite_float, default=1.0,
                     help="per-example clip norm")
    sim.add_argument("--image-size", type=positive_int, default=28,
                     help="image side in pixels, images are resized to it (multiple of 4; "
                          "default 28)")
    sim.add_argument("--samples", type=positive_int, default=None,
                     help="total examples to generate/use (default 4800 images; all tabular)")
    sim.add_argument("--accountant", choices=("prv", "pld", "rdp"), default="prv")
    sim.add_argument("--grad-sample-mode", choices=("auto", "hooks", "ghost", "bk"),
                     default="auto",
                     help="per-example clipping: bk (book-keeping, one backward pass; what "
                          "auto picks when the model allows), ghost or hooks (Opacus)")
    sim.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    sim.add_argument("--secagg", dest="secagg", action=argparse.BooleanOptionalAction,
                     default=True,
                     help="secure aggregation (default on); --no-secagg is plain FedAvg")
    sim.add_argument("--secagg-clip", type=finite_float, default=8.0,
                     help="bound on each update coordinate for the fixed-point encoding")
    sim.add_argument("--secagg-graph", choices=("complete", "harary"), default="complete",
                     help="who shares with whom: complete graph or SecAgg+ sparse graph")
    sim.add_argument("--secagg-colluders", type=nonnegative_int, default=None,
                     help="colluding hospitals (with the server) that secure aggregation must "
                          "withstand; every hospital enforces it (default floor((n-1)/3); a "
                          "sparse --secagg-graph harary needs a small value)")
    sim.add_argument("--drop-rate", type=finite_float, default=0.0,
                     help="share of hospitals that drop out each round (simulated faults)")
    sim.add_argument("--drop-stage", choices=("config", "mask", "consistency", "unmask"),
                     default="mask", help="secure-aggregation stage at which they drop")
    sim.add_argument("--release-metrics", choices=("none", "aggregate", "clear"), default="none",
                     help="hospitals' training loss: stays home (default), leaves only inside "
                          "the masked sum (aggregate), or in clear (--no-secagg only)")
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
    from bract import tasks
    from bract.flower.checkpoint import CheckpointError
    from bract.flower.client import PrivacyPolicy
    from bract.flower.observer import summarize
    from bract.flower.simulation import SimulationConfig, run
    from bract.privacy import PrivacyError

    if args.save_model is not None and args.save_model.suffix != ".npz":
        console.print(f"[red]error:[/red] --save-model must end in .npz (got {args.save_model})")
        return 2
    if args.noise_multiplier is not None and args.noise_multiplier < 0:
        console.print("[red]error:[/red] --noise-multiplier must be >= 0")
        return 2
    if args.resume + args.new_run + args.new_federation > 1:
        console.print("[red]error:[/red] --resume continues a run, --new-run starts another "
                      "of the same hospitals, --new-federation one of new hospitals: choose one")
        return 2
    default_out = args.out is None
    args.out = Path(DEFAULT_OUT) if default_out else args.out
    try:
        task = tasks.TaskConfig.for_dataset(
            args.dataset, clients=args.clients, seed=args.seed,
            image_size=args.image_size, n_samples=args.samples,
            batch_size=args.batch_size, lr=args.lr, momentum=args.momentum,
            data_path=str(args.data_path) if args.data_path is not None else None,
            partition=args.partition, alpha=args.alpha, partition_column=args.partition_column,
        )
        non_private = args.noise_multiplier == 0
        policy = PrivacyPolicy(
            target_epsilon=args.target_epsilon, delta=args.delta, rounds=args.rounds,
            local_epochs=args.local_epochs, max_grad_norm=args.max_grad_norm,
            noise_multiplier=args.noise_multiplier, accountant=args.accountant,
            grad_sample_mode=args.grad_sample_mode, allow_non_private=non_private,
            device=args.device, sampling_seed=args.seed if non_private else None,
        )
        cfg = SimulationConfig(
            task=task, policy=policy, out_dir=args.out, save_model=args.save_model,
            show_progress=not args.no_progress, resume=args.resume,
            secagg=args.secagg, secagg_clip=args.secagg_clip, secagg_graph=args.secagg_graph,
            secagg_colluders=args.secagg_colluders,
            drop_rate=args.drop_rate, drop_stage=args.drop_stage,
            release_metrics=args.release_metrics, record_secagg=args.record_secagg,
            previous_run=(
                "new-run" if args.new_run
                else "archive" if default_out or args.new_federation else "refuse"
            ),
        )
        if non_private:
            console.print(
                "[bold red]NON-PRIVATE RUN:[/bold red] --noise-multiplier 0 adds no noise; "
                "no differential-privacy guarantee holds for this federation."
            )
        console.print(
            f"bract: {args.clients} hospitals, {args.rounds} rounds, dataset {args.dataset}, "
            f"target ε={args.target_epsilon} at δ={args.delta}, output in {args.out}"
        )
        report = run(cfg)
    except (PrivacyError, ValueError, CheckpointError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 2
    if not any(row.get("trained") for row in report.get("rounds", [])):
        # Nothing was aggregated: the model is the initial one; report no figure for it.
        why = "; ".join(f"{cid}: {reason}" for cid, reason in
                        sorted(report.get("final", {}).get("stopped", {}).items()))
        console.print(f"[red]error:[/red] no hospital trained in any round, so the model was "
                      f"not trained ({why or 'see report.json'}); the record is in {args.out}")
        return 1
    console.print(summarize(report))
    console.print(f"wrote {args.out / 'report.json'} and {args.out / 'ledger.jsonl'}")
    _print_plots(report, console)
    return 0


def _print_plots(report: dict, console: Console) -> None:
    """The plot paths the federation wrote (bract.plots), or how to draw them."""
    plots = report.get("final", {}).get("plots")
    if plots:
        console.print("plots: " + ", ".join(str(p) for p in plots))
    else:
        console.print("[yellow]no plots were drawn (see the warning above); redraw them with "
                      "bract plot REPORT.json[/yellow]")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``bract`` console script."""
    args = build_parser().parse_args(argv)
    console = Console()
    if args.command == "simulate":
        return _simulate(args, console)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
