"""``bract deploy``: a real multi-process federation on 127.0.0.1 from the command line
(:class:`bract.flower.deploy.LocalFederation`), playing every operator at once."""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bract.flower.certificates import LOOPBACK
from bract.flower.deploy import DeploymentError, LocalFederation
from bract.flower.hospital_policy import HospitalPolicy

__all__ = ["add_deploy_parser", "local_federation", "run_deploy"]


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
    p.add_argument("--clients", type=int, default=3, help="hospitals (SuperNodes)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--dataset", default="breast-cancer")
    p.add_argument("--target-epsilon", type=float, default=8.0)
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("runs/deploy"))
    p.add_argument("--workdir", type=Path, default=None,
                   help="certificates, keys, Flower home and logs (default: OUT/deployment)")
    p.add_argument("--round-timeout", type=float, default=120.0,
                   help="seconds the server waits for a round's replies (0: no limit)")
    p.add_argument("--kill-node-at-round", type=int, default=None, metavar="K",
                   help="demonstration: kill the last hospital's SuperNode during round K")
    p.add_argument("--secagg", action=argparse.BooleanOptionalAction, default=True,
                   help="secure aggregation (default on); hospitals sign their ledgers either way")
    p.add_argument("--isolation", choices=("subprocess", "process"), default="subprocess")
    p.add_argument("--timeout", type=float, default=1800.0,
                   help="seconds the whole run may take before it is stopped")
    p.set_defaults(func=run_deploy)


def run_deploy(args: argparse.Namespace) -> int:
    """``bract deploy``: run the federation and print where its record is; 0 on success."""
    out = Path(args.out).resolve()
    workdir = Path(args.workdir).resolve() if args.workdir else out / "deployment"
    if args.kill_node_at_round is not None and not 1 <= args.kill_node_at_round <= args.rounds:
        print("--kill-node-at-round must be between 1 and --rounds", file=sys.stderr)
        return 2
    run_config = {
        "clients": args.clients,
        "rounds": args.rounds,
        "dataset": args.dataset,
        "target-epsilon": args.target_epsilon,
        "delta": args.delta,
        "seed": args.seed,
        "out": str(out),
        "round-timeout": float(args.round_timeout) if args.round_timeout > 0 else "none",
    }
    print(f"bract deploy: {args.clients} SuperNodes + 1 SuperLink on {LOOPBACK} "
          f"(TLS, SuperNode auth); work dir {workdir}", flush=True)
    try:
        # This command plays every hospital's operator: their policies allow the budget
        # asked for here (a real hospital's operator writes its own).
        own = HospitalPolicy(target_epsilon=args.target_epsilon, delta=args.delta)
        with LocalFederation(
            workdir, args.clients, isolation=args.isolation, secagg=args.secagg,
            hospital_policy=own,
        ) as fed:
            print(f"SuperLink at {fed.address}; {args.clients} SuperNodes online; "
                  f"logs in {fed.log_dir}", flush=True)
            result = fed.run(run_config, timeout=args.timeout,
                             kill_node_at_round=args.kill_node_at_round)
    except DeploymentError as exc:
        print(f"bract deploy failed: {exc}", file=sys.stderr)
        return 1
    print(result.log[-6000:])
    print(f"run {result.run_id}: {result.status} in {result.seconds:.1f}s; "
          f"record in {out / 'report.json'} and {out / 'ledger.jsonl'}")
    return 0 if result.succeeded else 1


@contextlib.contextmanager
def local_federation(workdir: Path, num_nodes: int, **kwargs: Any) -> Iterator[LocalFederation]:
    """``with local_federation(dir, n) as fed:`` — same as ``with LocalFederation(...)``."""
    with LocalFederation(workdir, num_nodes, **kwargs) as fed:
        yield fed
