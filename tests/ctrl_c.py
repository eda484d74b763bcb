"""Helper for the tests that press Ctrl-C on a running `bract` command."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path


def interrupt_after_rounds(argv: list[str], report: Path, rounds: int, start_within: float,
                           sig: int = signal.SIGINT,
                           ) -> tuple[subprocess.CompletedProcess, float, int]:
    """Run ``argv`` in its own session, wait (up to ``start_within`` s) until ``report``
    lists ``rounds`` finished rounds, send ``sig`` (default SIGINT), and return how the
    command ended, the seconds it took to exit after the signal and its pid (= its process group).
    Fails if the command ended before it could be interrupted."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.monotonic() + start_within
    while time.monotonic() < deadline and proc.poll() is None:
        if report.exists() and len(json.loads(report.read_text()).get("rounds", [])) >= rounds:
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    os.kill(proc.pid, sig)
    t0 = time.monotonic()
    stdout, stderr = proc.communicate(timeout=60)
    seconds = time.monotonic() - t0
    return subprocess.CompletedProcess(argv, proc.returncode, stdout, stderr), seconds, proc.pid
