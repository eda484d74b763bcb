"""``bract deploy``: a real multi-process federation on 127.0.0.1 from the command line
(:class:`bract.flower.deploy.LocalFederation`), playing every operator at once."""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bract.argtypes import positive_float
from bract.flower.certificates import LOOPBACK
from bract.flower.config import FederationConfig
from bract.flower.deploy import DeploymentError, LocalFederation, resume_problem
from bract.flower.hospital_policy import HospitalPolicy
from bract.flower.supernode import DEFAULT_PULL_INTERVAL
from bract.records.report import read_report

__all__ = ["add_deploy_parser", "local_federation", "run_deploy"]

#: The datasets bract ships: what `bract deploy`'s hospitals split between them.
BUNDLED_DATASETS = ("synthetic", "breast-cancer", "diabetes")


def add_deploy_parser(subparsers: Any) -> None:
    """Add the ``deploy`` sub-command to ``bract``'s argparse sub-parsers."""
    p = subparsers.add_parser(
        "deploy",
        help="run a real multi-process federation (Flower SuperLink + SuperNodes) on "
             "127.0.0.1 with TLS and SuperNode authentication",
        description=(
            "Start a SuperLink and one SuperNode per hospital on 127.0.0.1 (dev TLS "
            "certificates, SuperNode authentication), run the bract app with `flwr run`, "
            "write report.json and ledger.jsonl to --out, and stop every process."
        ),
    )
    # The federation's settings (bract.flower.config). Each hospital here is configured
    # by its (simulated) operator and reads only data its operator names: the bundled
    # datasets, split by partition; a hospital's own file is `bract hospital start`'s.
    FederationConfig.add_arguments(
        p, skip=("data_path", "device", "strict_data"),
        defaults={"dataset": "breast-cancer", "round_timeout": 120.0},
        choices={"dataset": BUNDLED_DATASETS},
        helps={"dataset": "a bundled dataset, split among the hospitals: "
                          f"{', '.join(BUNDLED_DATASETS)} (diabetes is regression: MSE, "
                          "R²); a hospital's own data is bract hospital start's"},
    )
    p.add_argument("--out", type=Path, default=Path("runs/deploy"),
                   help="the coordinator's output: report.json, ledger.jsonl, checkpoints "
                        "(default: runs/deploy)")
    p.add_argument("--workdir", type=Path, default=None,
                   help="certificates, keys, Flower home and logs (default: OUT/deployment)")
    p.add_argument("--kill-node-at-round", type=int, default=None, metavar="K",
                   help="demonstration: kill the last hospital's SuperNode during round K")
    p.add_argument("--executor", choices=("warm", "flower"), default="warm",
                   help="how each SuperNode runs a ClientApp: warm (forked from a parent that "
                        "imported Flower, bract and torch once) or flower (Flower's own: a "
                        "fresh process per message) (default: warm)")
    p.add_argument("--pull-interval", type=positive_float, default=DEFAULT_PULL_INTERVAL,
                   help="seconds between an idle SuperNode's pulls (Flower's own: 3) "
                        f"(default: {DEFAULT_PULL_INTERVAL})")
    p.add_argument("--timeout", type=positive_float, default=1800.0,
                   help="seconds the whole run may take before it is stopped (default: 1800)")
    p.add_argument("--no-progress", action="store_true",
                   help="one plain line per round instead of the live table and progress bar")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true",
                       help="continue the run in --out after its last completed round, with "
                            "the same hospitals (--workdir) and settings")
    again.add_argument("--new-run", action="store_true",
                       help="when --out holds a run: move its records aside (nothing is "
                            "deleted) and start a new run of the same hospitals, whose spent "
                            "budgets carry on; without --resume or --new-run such an --out is "
                            "refused")
    p.set_defaults(func=run_deploy)


def run_deploy(args: argparse.Namespace) -> int:
    """``bract deploy``: run the federation and print where its record is; 0 on success.

    Guarantee: a refused command (exit 2, one ``bract deploy: error:`` line) creates no
    directory: every flag, the output folders and a previous run there are checked
    before ``--out`` and ``--workdir`` are made.
    """
    out = Path(args.out).resolve()
    workdir = Path(args.workdir).resolve() if args.workdir else out / "deployment"
    from bract.argtypes import output_dir_problem

    for where, flag in ((out, "--out"), (workdir, "--workdir")):
        problem = output_dir_problem(where, flag, create=False)
        if problem:
            print(f"bract deploy: error: {problem}", file=sys.stderr)
            return 2
    from bract.flower.supernode import FLOWER_IDLE_SLEEP

    if args.pull_interval > FLOWER_IDLE_SLEEP:
        print(f"bract deploy: error: --pull-interval must be at most {FLOWER_IDLE_SLEEP} s "
              "(Flower's own idle pull)", file=sys.stderr)
        return 2
    if args.kill_node_at_round is not None and not 1 <= args.kill_node_at_round <= args.rounds:
        print("bract deploy: error: --kill-node-at-round must be between 1 and --rounds",
              file=sys.stderr)
        return 2
    try:
        fed = FederationConfig.from_args(args, out=out)
        fed.task()  # a task no hospital could train is refused before any process starts
    except ValueError as exc:
        print(f"bract deploy: error: {exc}", file=sys.stderr)
        return 2
    if fed.non_private:
        print("bract deploy: error: its hospitals' policies never allow a non-private run "
              "(--noise-multiplier 0); bract simulate can run one, flagged NON-PRIVATE",
              file=sys.stderr)
        return 2
    problem = _previous_run_problem(out, workdir, args)
    for where, flag in ((out, "--out"), (workdir, "--workdir")):
        problem = problem or output_dir_problem(where, flag)
    if problem:
        print(f"bract deploy: error: {problem}", file=sys.stderr)
        return 2
    # The roster is the federation's own (LocalFederation writes it).
    run_config = {k: v for k, v in fed.to_run_config().items() if k != "roster"}
    run_config["resume"] = bool(args.resume)
    run_config["progress"] = not args.no_progress
    print(f"bract deploy: {args.clients} SuperNodes + 1 SuperLink on {LOOPBACK} "
          f"(TLS, SuperNode auth); work dir {workdir}", flush=True)
    try:
        # This command plays every hospital's operator: their policies allow the budget
        # asked for here (a real hospital's operator writes its own).
        own = HospitalPolicy(
            target_epsilon=fed.target_epsilon, delta=fed.delta, accountant=fed.accountant,
            release_metrics=fed.release_metrics, secagg_colluders=fed.secagg_colluders,
            allow_plain_aggregation=not fed.secagg,
        )
        from bract.flower.interrupt import interruptible, resume_hint

        stopped = "the deployment (its SuperLink and SuperNodes are stopped) stopped"
        with interruptible(lambda: resume_hint(out, sys.argv[1:], stopped)), LocalFederation(
            workdir, fed.clients, executor=args.executor,
            pull_interval=args.pull_interval, secagg=fed.secagg,
            hospital_policy=own, resume=args.resume,
        ) as local:
            print(f"SuperLink at {local.address}; {fed.clients} SuperNodes online; "
                  f"logs in {local.log_dir}", flush=True)
            result = local.run(run_config, timeout=args.timeout,
                             kill_node_at_round=args.kill_node_at_round)
    except DeploymentError as exc:
        print(f"bract deploy: error: {exc}", file=sys.stderr)
        return 1
    print(result.log[-6000:])
    report_path = out / "report.json"
    if not result.succeeded or not report_path.exists():
        print(f"bract deploy: error: run {result.run_id} ended {result.status} after "
              f"{result.seconds:.1f}s" + ("" if report_path.exists() else
                                         f" and wrote no {report_path}")
              + f"; logs in {workdir / 'logs'}", file=sys.stderr)
        return 1
    report = read_report(report_path)
    errors = report.errors()
    if not any(row.trained for row in report.rounds):
        print(f"bract deploy: error: {errors[0]}; the record is in {report_path}",
              file=sys.stderr)
        return 1
    print(f"run {result.run_id}: {result.status} in {result.seconds:.1f}s; "
          f"record in {report_path} and {out / 'ledger.jsonl'}")
    if errors:
        print(f"bract deploy: error: {'; '.join(errors)} (report.json records each round's "
              "failures)", file=sys.stderr)
        return 1
    return 0


def _previous_run_problem(out: Path, workdir: Path, args: argparse.Namespace) -> str:
    """Why ``--out`` cannot take this run ("" when it can): ``--resume`` needs a
    checkpoint there and the hospitals' keys and roster in ``--workdir``; otherwise
    an ``--out`` holding a run is refused, or with ``--new-run`` its records are
    moved aside (the hospitals' keys and lifetime budgets under ``--workdir`` stay)."""
    from bract.flower.checkpoint import CHECKPOINT_DIR
    from bract.flower.run_dir import set_aside_previous_run

    if args.resume:
        if not (out / CHECKPOINT_DIR / "state.json").exists():
            return (f"cannot resume: {out} holds no checkpoint (no round of a run there "
                    "finished); run without --resume")
        return resume_problem(workdir, args.clients) or ""
    keep = [workdir.name] if workdir.parent == out else []
    try:
        set_aside_previous_run(out, "new-run" if args.new_run else "refuse", keep=keep,
                               choices="--resume continues it; --new-run starts a new run of "
                                       "the same hospitals (the earlier records are moved "
                                       "aside; nothing is deleted)")
    except (ValueError, OSError) as exc:
        return str(exc)
    return ""


@contextlib.contextmanager
def local_federation(workdir: Path, num_nodes: int, **kwargs: Any) -> Iterator[LocalFederation]:
    """``with local_federation(dir, n) as fed:`` — same as ``with LocalFederation(...)``."""
    with LocalFederation(workdir, num_nodes, **kwargs) as fed:
        yield fed
