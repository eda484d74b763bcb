"""Helpers for tests that run Flower's own CLI (`flwr run`)."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path


def stop_local_superlink(flwr_home: Path) -> None:
    """`flwr run` leaves the local SuperLink it started (and its SuperExec) running for
    later runs; stop the one that ``flwr_home`` started, so no process outlives a test.
    ``ps -ww``: full arguments, however long."""
    rows = [line.split(None, 1) for line in subprocess.run(
        ["ps", "-ww", "-eo", "pid=,args="], capture_output=True, text=True).stdout.splitlines()]
    links = {int(pid) for pid, args in rows if "flower-superlink" in args
             and str(flwr_home) in args}
    for pid, args in rows:
        if int(pid) in links or any(f"--parent-pid {link}" in args for link in links):
            try:
                os.kill(int(pid), signal.SIGTERM)
            except ProcessLookupError:
                pass


def flwr_run(app: Path, run_config: str, cwd: Path, flwr_home: Path,
             timeout: float) -> subprocess.CompletedProcess:
    """`flwr run APP` in Flower's simulation engine with 3 SuperNodes, this venv's
    Flower and bract (no runtime dependency installation), a private FLWR_HOME; the
    local SuperLink it starts is stopped afterwards."""
    import sys

    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "FLWR_HOME": str(flwr_home)}
    try:
        return subprocess.run(
            ["flwr", "run", str(app), "--federation-config", "num-supernodes=3", "--stream",
             "--run-config", run_config],
            cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    finally:
        stop_local_superlink(flwr_home)
