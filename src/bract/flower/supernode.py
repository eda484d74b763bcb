"""``bract-supernode``: the SuperNode a hospital runs. It is Flower's
``flower-supernode`` itself (same flags), with settings Flower 1.42 hard-codes:

* **how often it looks for a finished ClientApp's reply** in its own memory (Flower
  checks every 0.5 s; bract every :data:`LOCAL_WAIT` s: an in-memory lookup);
* **how often it pulls when idle** (``--pull-interval``, default
  :data:`DEFAULT_PULL_INTERVAL` s; Flower sleeps 3 s after an empty pull). A
  finished ClientApp's reply is pushed on the SuperNode's next pass, so this bounds
  how long a reply waits on the hospital's side. Each idle pull is one small
  request to the SuperLink: 5 a second at the default, no busy-waiting.
* **which executor runs its ClientApps** (``--executor``): ``warm`` (default) runs
  Flower's SuperExec with bract's :class:`~bract.flower.warm_executor.ForkingExecutor`
  (``bract-superexec``), ``flower`` Flower's own (a fresh ``flwr-clientapp`` per
  message). Both use ``--isolation subprocess``: the SuperNode starts the SuperExec,
  which asks its SuperNode for work every :data:`TASK_POLL_INTERVAL` s (Flower: 1 s).

Both are set by rebinding two names inside ``flwr.supernode.start_client_internal``
(its ``time`` and ``subprocess``) before Flower's own ``flower_supernode()`` runs;
the Flower release they were checked on is pinned
(:data:`bract.flower.warm_executor.FLOWER_VERSIONS`) and a test checks the code they
rebind still reads as expected.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import types
from collections.abc import Sequence
from typing import Any

__all__ = ["DEFAULT_PULL_INTERVAL", "FLOWER_IDLE_SLEEP", "main", "patch_supernode"]

#: Seconds between a SuperNode's pulls while it has nothing to do (bract's default).
DEFAULT_PULL_INTERVAL = 0.2
#: Seconds between the SuperExec's asks for a task on its own SuperNode (a loopback
#: request; Flower's default is 1 s). ``FLWR_SUPEREXEC_TASK_POLL_INTERVAL`` overrides it.
TASK_POLL_INTERVAL = 0.2
#: Flower 1.42's idle sleep in ``start_client_internal`` (the value rebound).
FLOWER_IDLE_SLEEP = 3
#: Flower 1.42's wait in ``start_client_internal`` for a ClientApp's reply (and its
#: contents) to appear in the SuperNode's own in-memory state (the value rebound).
FLOWER_LOCAL_WAIT = 0.5
#: bract's wait for the same: an in-memory check, so a short one costs nothing.
LOCAL_WAIT = 0.02
#: The command Flower 1.42's SuperNode starts its SuperExec with.
FLOWER_SUPEREXEC = "flower-superexec"


def _superexec_command() -> list[str]:
    return [sys.executable, "-c",
            "from bract.flower.warm_executor import superexec_main; superexec_main()"]


def patch_supernode(module: Any, pull_interval: float, executor: str) -> None:
    """Rebind ``module``'s (``flwr.supernode.start_client_internal``'s) ``time`` so its
    idle sleep lasts ``pull_interval`` seconds and its wait for a ClientApp's reply in
    its own memory :data:`LOCAL_WAIT`, and with ``executor="warm"`` its
    ``subprocess`` so the SuperExec it starts is ``bract-superexec``."""
    if not (0 < pull_interval <= FLOWER_IDLE_SLEEP):
        raise ValueError(f"--pull-interval must be > 0 and <= {FLOWER_IDLE_SLEEP} s")
    if executor not in ("warm", "flower"):
        raise ValueError("--executor must be warm or flower")

    def sleep(seconds: float) -> None:
        if seconds == FLOWER_IDLE_SLEEP:
            seconds = pull_interval
        elif seconds == FLOWER_LOCAL_WAIT:
            seconds = LOCAL_WAIT
        time.sleep(seconds)

    module.time = types.SimpleNamespace(**{n: getattr(time, n) for n in dir(time)
                                            if not n.startswith("__")})
    module.time.sleep = sleep
    if executor == "warm":
        def popen(args: Any, *a: Any, **k: Any) -> subprocess.Popen[Any]:
            if isinstance(args, list) and args and args[0] == FLOWER_SUPEREXEC:
                args = [*_superexec_command(), *args[1:]]
            return subprocess.Popen(args, *a, **k)

        module.subprocess = types.SimpleNamespace(
            **{n: getattr(subprocess, n) for n in dir(subprocess) if not n.startswith("__")})
        module.subprocess.Popen = popen


def main(argv: Sequence[str] | None = None) -> None:
    """``bract-supernode [--pull-interval S] [--executor warm|flower] FLOWER-SUPERNODE-
    FLAGS...``: run Flower's SuperNode with these two settings."""
    parser = argparse.ArgumentParser(
        prog="bract-supernode", add_help=False,
        description="Flower's flower-supernode (every flag of it is passed on) with a short "
                    "idle pull and bract's warm ClientApp executor")
    parser.add_argument("--pull-interval", type=float, default=DEFAULT_PULL_INTERVAL)
    parser.add_argument("--executor", choices=("warm", "flower"), default="warm")
    argv = list(sys.argv[1:] if argv is None else argv)
    ours, rest = parser.parse_known_args(argv)
    if "-h" in rest or "--help" in rest:
        print("bract-supernode [--pull-interval S (default 0.2)] [--executor {warm,flower} "
              "(default warm)] + every flower-supernode flag:\n")
    from bract.flower.warm_executor import check_flower_version

    try:
        check_flower_version()
        import flwr.supernode.start_client_internal as internal

        patch_supernode(internal, ours.pull_interval, ours.executor)
    except (RuntimeError, ValueError) as exc:
        print(f"bract-supernode: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    os.environ.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", str(TASK_POLL_INTERVAL))
    from flwr.supernode.cli.flower_supernode import flower_supernode

    sys.argv = ["flower-supernode", *rest]
    flower_supernode()
