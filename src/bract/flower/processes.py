"""The processes of a local federation: ports on loopback, executables from this
venv, and processes that carry a per-federation marker so that none outlives it."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from bract.flower.certificates import LOOPBACK

__all__ = ["MARKER_ENV", "DeploymentError", "ManagedProcess", "executable", "free_port",
           "marked_pids"]

#: Environment variable whose value marks every process of one local federation.
MARKER_ENV = "BRACT_LOCAL_FEDERATION"


class DeploymentError(RuntimeError):
    """A deployment step failed or did not finish in time; the message says which."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picked it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((LOOPBACK, port)) == 0


# --------------------------------------------------------------------------- processes
def executable(name: str) -> str:
    """Path of Flower executable ``name`` in the running interpreter's environment."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    raise DeploymentError(f"{name} not found next to {sys.executable}; is flwr installed?")


def marked_pids(marker: str) -> list[int]:
    """Ids of live processes whose environment carries ``MARKER_ENV=marker`` (Linux /proc).

    Only processes of the current user are readable, which are the only ones a
    federation started here can have spawned.
    """
    needle = f"{MARKER_ENV}={marker}".encode()
    pids = []
    own = os.getpid()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == own:
            continue
        try:
            env = (entry / "environ").read_bytes()
        except OSError:
            continue
        if needle in env.split(b"\0"):
            pids.append(int(entry.name))
    return sorted(pids)


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


@dataclass
class ManagedProcess:
    """A process started by a :class:`LocalFederation`, in a session of its own."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    log_file: IO[bytes]

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill_group(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to the process's whole process group (its session leader's)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, sig)

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")[-chars:]
        except OSError:
            return ""
