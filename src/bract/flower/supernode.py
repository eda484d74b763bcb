"""``bract-supernode``: the SuperNode a hospital runs. It is Flower's
``flower-supernode`` itself (same flags), with settings Flower 1.42 hard-codes:

* **how often it looks for a finished ClientApp's reply** in its own memory (Flower
  checks every 0.5 s; bract every :data:`LOCAL_WAIT` s: an in-memory lookup);
* **how often it pulls when idle** (Flower sleeps 3 s after an empty pull): right
  after it received or answered a message, when the protocol's next message is due,
  it pulls again after :data:`MIN_PULL_PAUSE` s, then pauses half the time since that
  message, up to ``--pull-interval`` (default :data:`DEFAULT_PULL_INTERVAL` s)
  (:func:`idle_pause`). Each idle pull is one small request to the SuperLink: about
  ten in the first second after a message, then 5 a second; never busy-waiting.
* **how its SuperExec learns of a new message**: with the warm executor the SuperNode
  writes one byte to a pipe the moment it has stored a message, and
  ``bract-superexec`` asks for the task at once instead of at its next task poll
  (:class:`bract.flower.warm_executor.WakeableSleep`); the poll stays as a fallback.
* **which executor runs its ClientApps** (``--executor``): ``warm`` (default) runs
  Flower's SuperExec with bract's :class:`~bract.flower.warm_executor.ForkingExecutor`
  (``bract-superexec``), ``flower`` Flower's own (a fresh ``flwr-clientapp`` per
  message). Both use ``--isolation subprocess``: the SuperNode starts the SuperExec,
  which asks its SuperNode for work every :data:`TASK_POLL_INTERVAL` s (Flower: 1 s).

It also decides **which code runs at the hospital**: every run's FAB is checked the
moment the SuperNode pulls it (:mod:`bract.flower.fab_gate`): one that names another
ClientApp than bract's own or carries any file but configuration is refused, with an
error reply to the coordinator and one line in the hospital's log, before anything of
it is stored, installed or imported, unless the hospital's operator allows that FAB
by its SHA-256 (``--allow-fab HASH``, repeatable, or node config
``allowed-fab-hashes``). ``--allow-runtime-dependency-installation`` (packages a FAB
names, fetched at run time) is refused: the hospital installs what it runs.

The settings are made by rebinding two names inside ``flwr.supernode.start_client_internal``
(its ``time`` and ``subprocess``) before Flower's own ``flower_supernode()`` runs;
the Flower release they were checked on is pinned
(:data:`bract.flower.warm_executor.FLOWER_VERSIONS`) and a test checks the code they
rebind still reads as expected.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

from bract.flower.warm_executor import WAKE_FD_ENV, rebound

__all__ = ["DEFAULT_PULL_INTERVAL", "FLOWER_IDLE_SLEEP", "MIN_PULL_PAUSE", "flower_settings",
           "idle_pause", "main", "patch_supernode"]

#: Seconds between a SuperNode's pulls while it has nothing to do (bract's default).
DEFAULT_PULL_INTERVAL = 0.2
#: The shortest pause between two pulls (just after the SuperNode handled a message).
MIN_PULL_PAUSE = 0.02
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


def idle_pause(since_message: float, pull_interval: float) -> float:
    """The pause before the next pull, ``since_message`` seconds after the SuperNode last
    received or answered a message: half that time, at least :data:`MIN_PULL_PAUSE`
    and at most ``pull_interval`` (so pulls thin out geometrically, and a message due
    shortly after the last one waits about a third of the time it took to come)."""
    return min(pull_interval, max(MIN_PULL_PAUSE, 0.5 * since_message))


def patch_supernode(module: Any, pull_interval: float, executor: str) -> None:
    """Rebind ``module``'s (``flwr.supernode.start_client_internal``'s) ``time`` so its
    idle sleep lasts :func:`idle_pause` seconds and its wait for a ClientApp's reply in
    its own memory :data:`LOCAL_WAIT`; wrap its pull and push to note when it last
    handled a message; and with ``executor="warm"`` rebind its ``subprocess`` so the
    SuperExec it starts is ``bract-superexec``, woken through a pipe whenever a
    message has been stored."""
    if not (0 < pull_interval <= FLOWER_IDLE_SLEEP):
        raise ValueError(f"--pull-interval must be > 0 and <= {FLOWER_IDLE_SLEEP} s")
    if executor not in ("warm", "flower"):
        raise ValueError("--executor must be warm or flower")
    last_message = [-math.inf]
    wake_fds: list[int] = []

    def sleep(seconds: float) -> None:
        if seconds == FLOWER_IDLE_SLEEP:
            seconds = idle_pause(time.monotonic() - last_message[0], pull_interval)
        elif seconds == FLOWER_LOCAL_WAIT:
            seconds = LOCAL_WAIT
        time.sleep(seconds)

    pull = getattr(module, "_pull_and_store_message", None)
    push = getattr(module, "_push_messages", None)
    if pull is not None and push is not None:
        def pull_and_store(*args: Any, **kwargs: Any) -> Any:
            run_id = pull(*args, **kwargs)
            if run_id is not None:
                last_message[0] = time.monotonic()
                for fd in wake_fds:  # a byte per message; a full pipe is awake anyway
                    with contextlib.suppress(BlockingIOError, BrokenPipeError):
                        os.write(fd, b"\0")
            return run_id

        def push_messages(*args: Any, **kwargs: Any) -> Any:
            try:
                return push(*args, **kwargs)
            finally:
                last_message[0] = time.monotonic()

        module._pull_and_store_message = pull_and_store
        module._push_messages = push_messages

    module.time = rebound(time, sleep=sleep)
    if executor == "warm":
        def popen(args: Any, *a: Any, **k: Any) -> subprocess.Popen[Any]:
            if not (isinstance(args, list) and args and args[0] == FLOWER_SUPEREXEC):
                return subprocess.Popen(args, *a, **k)
            args = [*_superexec_command(), *args[1:]]
            read, write = os.pipe()
            os.set_blocking(write, False)
            env = {**(k.pop("env", None) or os.environ), WAKE_FD_ENV: str(read)}
            try:
                proc = subprocess.Popen(args, *a, env=env, pass_fds=(read,), **k)
            except BaseException:
                os.close(write)
                raise
            finally:
                os.close(read)
            wake_fds.append(write)
            return proc

        module.subprocess = rebound(subprocess, Popen=popen)


def flower_settings(flower_argv: Sequence[str]) -> tuple[frozenset[str], bool]:
    """What ``flower-supernode`` will read from ``flower_argv``, parsed by its own
    parser: the FAB hashes its node config allows (:data:`~bract.flower.fab_gate.
    NODE_CONFIG_KEY`) and whether it would install a FAB's dependencies at run time.
    ``ValueError`` for a malformed hash; an argument list Flower itself rejects allows
    nothing (Flower then stops with its own message)."""
    from flwr.common.config import parse_config_args
    from flwr.supernode.cli.flower_supernode import _parse_args_run_supernode

    from bract.flower.fab_gate import node_config_hashes

    try:
        args, _ = _parse_args_run_supernode().parse_known_args(list(flower_argv))
        node_config = parse_config_args([args.node_config] if args.node_config else None)
    except (SystemExit, Exception):  # Flower's own start reports the bad argument
        return frozenset(), False
    return node_config_hashes(node_config), bool(args.runtime_dependency_install)


def main(argv: Sequence[str] | None = None) -> None:
    """``bract-supernode [--pull-interval S] [--executor warm|flower] [--allow-fab HASH]
    FLOWER-SUPERNODE-FLAGS...``: run Flower's SuperNode with these settings, running
    only bract's own ClientApp or a FAB its operator allowed by hash."""
    parser = argparse.ArgumentParser(
        prog="bract-supernode", add_help=False, allow_abbrev=False,
        description="Flower's flower-supernode (every flag of it is passed on) with a short "
                    "idle pull and bract's warm ClientApp executor")
    parser.add_argument("--pull-interval", type=float, default=DEFAULT_PULL_INTERVAL)
    parser.add_argument("--executor", choices=("warm", "flower"), default="warm")
    parser.add_argument("--allow-fab", action="append", default=[], metavar="SHA256")
    argv = list(sys.argv[1:] if argv is None else argv)
    ours, rest = parser.parse_known_args(argv)
    wants_help = "-h" in rest or "--help" in rest
    if wants_help:
        print("bract-supernode [--pull-interval S (default 0.2)] [--executor {warm,flower} "
              "(default warm)] [--allow-fab SHA256 (a FAB this hospital runs whatever it "
              "holds; repeatable)] + every flower-supernode flag:\n")
    from bract.flower.fab_gate import allowed_hashes, check_internals, guard_supernode
    from bract.flower.warm_executor import check_flower_version

    try:
        check_flower_version()
        import flwr.supernode.start_client_internal as internal

        allowed = allowed_hashes(ours.allow_fab)
        if not wants_help:
            from_node_config, installs = flower_settings(rest)
            if installs:
                raise ValueError("--allow-runtime-dependency-installation would install "
                                 "packages a run's FAB names; install what the hospital "
                                 "runs into this environment instead")
            allowed |= from_node_config
        check_internals(internal)
        guard_supernode(internal, allowed)
        patch_supernode(internal, ours.pull_interval, ours.executor)
        from bract.flower.object_pulls import shorten_object_pull_backoff

        shorten_object_pull_backoff()
    except (RuntimeError, ValueError) as exc:
        print(f"bract-supernode: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    os.environ.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", str(TASK_POLL_INTERVAL))
    from flwr.supernode.cli.flower_supernode import flower_supernode

    sys.argv = ["flower-supernode", *rest]
    flower_supernode()
