"""Deployed round time: plain vs secure rounds on a real SuperLink + SuperNodes (TLS and
SuperNode authentication on 127.0.0.1), Flower's defaults vs bract's warm executor and
short polls, side by side in one run.

Run:  .venv/bin/python benchmarks/deploy_rounds.py                 (~8-10 min, 2 cores)
      .venv/bin/python benchmarks/deploy_rounds.py --rounds 4 --repeats 2

Setups (each one :class:`bract.flower.deploy.LocalFederation` of 3 hospitals, the
breast-cancer task with DP-SGD calibrated to epsilon 4 at delta 1e-5, PRV accountant):

* ``flower``: Flower 1.42's defaults: a fresh ``flwr-clientapp`` process per message
  (``--executor flower``), the SuperNode's 3 s idle pull, the server's 3 s reply poll
  (``reply-poll=3``, the fixed sleep of ``HttpGrid.send_and_receive``), the SuperExec's
  1 s task poll.
* ``bract``: bract's defaults: the warm executor (a child forked from a parent that
  imported Flower, bract, torch and opacus once), 0.2 s idle pull, reply polls growing
  from 10 ms to 0.1 s, 0.2 s task poll, and a FAB that carries only the app's
  configuration (``fab-include``; each message's ClientApp unpacks and checks it).

In each setup a plain run (``secagg=false``: one message stage per round) and a secure
run (secure aggregation: 3 stages per round from round 2 on) each get a new federation
(so every hospital's lifetime budget starts unspent). The
figure is the seconds per round the server records (report.json ``seconds``: from
sending the round's first message to having averaged and evaluated), median over
rounds 2..R of every repeat (round 1 holds the key advertisement and the first
imports). Printed: plain and secure medians, their ratio, and the cost of each extra
stage ((secure - plain) / 2), and the same figures as one JSON object on the last line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from bract.flower.deploy import LocalFederation
from bract.flower.exchange import REPLY_POLL_MAX
from bract.flower.supernode import DEFAULT_PULL_INTERVAL, TASK_POLL_INTERVAL

SETUPS = {
    "flower": {"executor": "flower", "pull_interval": 3.0, "task_poll_interval": 1.0,
               "reply-poll": 3.0},
    "bract": {"executor": "warm", "pull_interval": DEFAULT_PULL_INTERVAL,
              "task_poll_interval": TASK_POLL_INTERVAL, "reply-poll": REPLY_POLL_MAX},
}


def _rounds(federation: LocalFederation, out: Path, rounds: int, secagg: bool,
            reply_poll: float) -> list[float]:
    run_config = {"clients": 3, "rounds": rounds, "dataset": "breast-cancer",
                  "target-epsilon": 4.0, "secagg": secagg, "reply-poll": reply_poll,
                  "out": str(out)}
    result = federation.run(run_config, timeout=1200)
    if not result.succeeded:
        raise SystemExit(f"deploy_rounds: a {'secure' if secagg else 'plain'} run ended "
                         f"{result.status}; logs in {federation.log_dir}")
    report = json.loads((out / "report.json").read_text())
    seconds = [float(r["seconds"]) for r in report["rounds"]]
    if len(seconds) != rounds or not all(r["trained"] for r in report["rounds"]):
        why = [(r["round"], r.get("failed"), (r.get("secagg") or {}).get("aborted"))
               for r in report["rounds"]]
        raise SystemExit(f"deploy_rounds: the {'secure' if secagg else 'plain'} run did not "
                         f"train every round: {why}")
    return seconds[1:]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--setups", default="flower,bract")
    parser.add_argument("--task-poll", type=float, default=None,
                        help="experiment: the bract setup's SuperExec task poll (s)")
    parser.add_argument("--pull", type=float, default=None,
                        help="experiment: the bract setup's SuperNode idle pull (s)")
    args = parser.parse_args()
    if args.rounds < 2:
        raise SystemExit("deploy_rounds: --rounds must be at least 2 (round 1 is excluded)")
    if args.task_poll is not None:
        SETUPS["bract"]["task_poll_interval"] = args.task_poll
    if args.pull is not None:
        SETUPS["bract"]["pull_interval"] = args.pull
    results: dict[str, dict[str, list[float]]] = {}
    for repeat in range(args.repeats):
        for name in args.setups.split(","):
            s = SETUPS[name]
            per = results.setdefault(name, {"plain": [], "secure": []})
            for mode in ("plain", "secure"):
                # A federation per run: the hospitals' lifetime budgets start unspent.
                with tempfile.TemporaryDirectory(prefix=f"deploy-{name}-") as tmp:
                    # A plain run's hospitals allow plain aggregation in their own
                    # policies (they refuse it by default).
                    with LocalFederation(Path(tmp) / "work", 3, executor=s["executor"],
                                         pull_interval=s["pull_interval"],
                                         task_poll_interval=s["task_poll_interval"],
                                         secagg=mode == "secure") as fed:
                        got = _rounds(fed, Path(tmp) / mode, args.rounds, mode == "secure",
                                      s["reply-poll"])
                per[mode].extend(got)
                print(f"repeat {repeat + 1} {name:6s} {mode:6s} rounds 2..: "
                      + " ".join(f"{x:.2f}" for x in got), flush=True)
    print("\nsetup   plain s  secure s  secure/plain  per extra stage s")
    for name, per in results.items():
        plain, secure = statistics.median(per["plain"]), statistics.median(per["secure"])
        print(f"{name:6s}  {plain:7.2f}  {secure:8.2f}  {secure / plain:12.2f}  "
              f"{(secure - plain) / 2:17.2f}")
    figures: dict[str, float] = {}
    for name, per in results.items():
        plain, secure = statistics.median(per["plain"]), statistics.median(per["secure"])
        figures.update({f"{name}_plain_s": plain, f"{name}_secure_s": secure,
                        f"{name}_secure_over_plain": secure / plain,
                        f"{name}_per_extra_stage_s": (secure - plain) / 2})
    if {"flower", "bract"} <= results.keys():
        f = statistics.median(results["flower"]["secure"])
        b = statistics.median(results["bract"]["secure"])
        print(f"\nsecure round, flower defaults / bract: {f / b:.2f}x")
        figures["secure_flower_over_bract"] = f / b
    print(json.dumps({k: round(v, 3) for k, v in figures.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
