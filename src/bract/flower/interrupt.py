"""Ctrl-C for a running federation: stop within seconds, leave every file as the last
finished round wrote it, say how to resume, exit 130.

Every file a run keeps (report, ledger, checkpoint, each hospital's privacy state) is
written whole by an atomic rename after the step that produced it, so stopping at
any instant leaves each either as it was or as it became; a round in progress is
lost and redone on ``--resume`` (a hospital that had already recorded its training
for it keeps that spent budget: the conservative side). The stop freezes the run's
records before it stops a single child, so the hospitals it kills never appear as a
failed round.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from bract.flower.files import freeze_records

__all__ = ["descendants", "interruptible", "resume_hint", "stop_descendants"]

#: Seconds the child processes get to exit on SIGTERM before SIGKILL.
GRACE_SECONDS = 2.0


def descendants(pid: int | None = None) -> list[int]:
    """Every process below ``pid`` (default: this one), children before grandchildren."""
    root = os.getpid() if pid is None else pid
    try:
        table = subprocess.run(["ps", "-A", "-o", "pid=,ppid="], capture_output=True,
                               text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    children: dict[int, list[int]] = {}
    for line in table.splitlines():
        parts = line.split()
        if len(parts) == 2:
            children.setdefault(int(parts[1]), []).append(int(parts[0]))
    out, frontier = [], [root]
    while frontier:
        nxt = [c for p in frontier for c in children.get(p, ())]
        out += nxt
        frontier = nxt
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child is dead for our purposes (its parent reaps it or exits).
    with contextlib.suppress(OSError):
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            if fh.read().split(") ", 1)[-1].startswith("Z"):
                return False
    return True


def stop_descendants(grace: float = GRACE_SECONDS) -> None:
    """SIGTERM every process below this one (Ray's workers, raylet, GCS; a deployment's
    SuperLink and SuperNodes), then SIGKILL whatever is left after ``grace`` seconds."""
    pids = descendants()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.05)
    for pid in pids + descendants():  # and anything started meanwhile
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def interruptible(resume_hint: Callable[[], str]) -> Iterator[None]:
    """Within the block, Ctrl-C (SIGINT) or SIGTERM stops the run at once: every child
    process is stopped (:func:`stop_descendants`), the terminal's cursor is restored,
    one line ``interrupted: <resume_hint()>`` is printed, and the process exits with
    130 (SIGINT) or 143 (SIGTERM) without a traceback."""

    def stop(signum: int, _frame: object) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        # First, before any child is stopped: the round loop's threads would otherwise
        # record the hospitals this stop kills as a failed round, and resume after it.
        freeze_records(GRACE_SECONDS)
        # The run's threads report their children dying: none of that is news. Silence
        # this process's output until it exits (a thread may report late, after the
        # children are gone), and say the one thing that matters on the saved copies.
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        saved: dict[int, int] = {}
        with contextlib.suppress(OSError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            for fd in (1, 2):
                saved[fd] = os.dup(fd)
                os.dup2(devnull, fd)
        stop_descendants()
        try:
            hint = resume_hint()
        except Exception as exc:  # the hint must never hide the stop
            hint = f"(the run's state could not be read: {exc})"

        def say(fd: int, text: str) -> None:
            with contextlib.suppress(Exception):
                if fd in saved:
                    os.write(saved[fd], text.encode("utf-8"))
                else:  # silencing failed: the streams are the terminal's still
                    stream = sys.stdout if fd == 1 else sys.stderr
                    stream.write(text)
                    stream.flush()

        with contextlib.suppress(Exception):
            if os.isatty(saved.get(1, 1)):
                say(1, "\x1b[?25h\n")  # a live table hides the cursor
        say(2, f"interrupted: {hint}\n")
        os._exit(130 if signum == signal.SIGINT else 143)

    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def resume_hint(out: Path, argv: list[str], stopped: str = "the run stopped") -> str:
    """What an interrupted ``bract simulate`` or ``bract deploy`` (run as ``argv``)
    says: where the run stopped, and the exact command that continues it (the same
    arguments with ``--resume``), or, when no round finished, starts it again. The
    round named is the checkpoint's, the one ``--resume`` continues after (the report
    can be a round ahead when a deployment's ServerApp was stopped between the two)."""
    import shlex

    finished = _checkpointed_rounds(out)
    if finished is None:
        from bract.records.report import ReportError, read_report

        try:
            finished = len(read_report(out / "report.json").rounds)
        except ReportError:
            finished = 0
    kept = [a for a in argv if a not in ("--resume", "--new-run", "--new-federation")]
    if finished:
        command = shlex.join(["bract", *kept, "--resume"])
        return (f"{stopped} after round {finished} (its record is in {out}); "
                f"continue it with: {command}")
    command = shlex.join(["bract", *kept, "--new-run"])
    return (f"{stopped} before its first round finished (the hospitals keep their spent "
            f"budgets); start again with: {command}")


def _checkpointed_rounds(out: Path) -> int | None:
    """Rounds the checkpoint in ``out`` holds, or None without a readable one."""
    import json

    from bract.flower.checkpoint import CHECKPOINT_DIR

    try:
        state = json.loads((out / CHECKPOINT_DIR / "state.json").read_text(encoding="utf-8"))
        completed = state["completed_rounds"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return completed if isinstance(completed, int) and completed >= 0 else None
