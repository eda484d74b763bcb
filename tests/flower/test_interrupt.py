"""Stopping a run (Ctrl-C, SIGTERM) never turns the stop itself into a recorded result.

Each case runs in its own interpreter: freezing the records is process-wide and final.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest


def _python(script: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script), *args],
                          capture_output=True, text=True, timeout=timeout)


def _ctrl_c_when_ready(script: str) -> tuple[int, str, str]:
    """Run ``script`` (which prints "ready" inside its interruptible block), press
    Ctrl-C (SIGINT) once it is ready; its exit status, the rest of its stdout, stderr."""
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(script)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    os.kill(proc.pid, signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=30)
    return proc.returncode, stdout, stderr


def test_a_child_killed_by_the_stop_is_not_recorded_as_a_result(tmp_path: Path) -> None:
    """A thread that records a failure whenever a child process dies (what Flower's
    simulation does when Ray's workers go) writes nothing once Ctrl-C is pressed: the
    stop kills the child, and its death must not reach the record. The interrupted
    process exits 130 with the one `interrupted:` line, its record as before."""
    record = tmp_path / "report.json"
    script = f"""
        import subprocess, sys, threading, time
        from pathlib import Path
        from bract.flower.files import atomic_write_text
        from bract.flower.interrupt import interruptible

        record = Path({str(record)!r})
        atomic_write_text(record, "round 1 finished")
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])

        def watch():
            child.wait()
            atomic_write_text(record, "round 2 failed: a hospital died")

        threading.Thread(target=watch, daemon=True).start()
        with interruptible(lambda: "stopped after round 1"):
            print("ready", flush=True)
            time.sleep(60)
    """
    code, _, stderr = _ctrl_c_when_ready(script)
    assert code == 130, stderr
    assert stderr.strip().splitlines()[-1] == "interrupted: stopped after round 1"
    assert record.read_text() == "round 1 finished"
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]  # no temporary left


def test_a_commit_under_way_ends_whole_before_the_freeze_returns(tmp_path: Path) -> None:
    """A round's records written under `committing()` are all written or none: a freeze
    that arrives mid-commit waits for it, and a commit that starts after the freeze
    never writes (its thread waits for the process to exit)."""
    script = f"""
        import json, threading, time
        from pathlib import Path
        from bract.flower.files import atomic_write_text, committing, freeze_records

        out = Path({str(tmp_path)!r})
        inside, go_on = threading.Event(), threading.Event()

        def commit():
            with committing():
                atomic_write_text(out / "report.json", "round 2")
                inside.set()
                go_on.wait()
                atomic_write_text(out / "checkpoint.json", "round 2")

        a = threading.Thread(target=commit, daemon=True)
        a.start()
        inside.wait()
        threading.Timer(0.3, go_on.set).start()
        t0 = time.monotonic()
        freeze_records(10.0)
        waited = time.monotonic() - t0
        whole = sorted(p.name for p in out.iterdir())
        b = threading.Thread(
            target=lambda: atomic_write_text(out / "report.json", "round 3"), daemon=True)
        b.start()
        b.join(0.5)
        print(json.dumps({{"waited": waited, "whole": whole, "b_waits": b.is_alive(),
                           "report": (out / "report.json").read_text()}}))
    """
    done = _python(script)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert seen["waited"] >= 0.25
    assert seen["whole"] == ["checkpoint.json", "report.json"]
    assert seen["b_waits"] and seen["report"] == "round 2"


@pytest.mark.parametrize("wait", [0.2, 0.5])
def test_a_hung_commit_cannot_hold_the_stop(wait: float) -> None:
    """A thread stuck inside a commit delays the freeze by at most its ``wait``: the stop
    always happens."""
    script = """
        import sys, threading, time
        from bract.flower.files import committing, freeze_records

        held = threading.Event()

        def hang():
            with committing():
                held.set()
                time.sleep(60)

        threading.Thread(target=hang, daemon=True).start()
        held.wait()
        t0 = time.monotonic()
        freeze_records(float(sys.argv[1]))
        print(time.monotonic() - t0)
    """
    done = _python(script, str(wait))
    assert done.returncode == 0, done.stderr
    assert wait <= float(done.stdout) < wait + 5


def test_the_hint_names_the_round_resume_continues_after(tmp_path: Path) -> None:
    """The printed command continues after the checkpoint's round, so the hint names that
    round, even when report.json is a round ahead (a deployment's ServerApp stopped
    between writing the two); without a checkpoint it falls back to report.json, and
    with neither it says no round finished and how to start again."""
    from bract.flower.interrupt import resume_hint

    argv = ["simulate", "--rounds", "5", "--out", str(tmp_path)]
    assert "before its first round finished" in resume_hint(tmp_path, argv)
    assert resume_hint(tmp_path, argv).endswith(
        f"bract simulate --rounds 5 --out {tmp_path} --new-run")
    line = {"epsilon": 1.0, "trained": True, "reason": "ok"}
    rows = [{"round": r, "epsilon": 1.0, "per_client": {"hospital-0": line},
             "trained": ["hospital-0"], "failed": {}} for r in (1, 2, 3)]
    (tmp_path / "report.json").write_text(json.dumps({"config": {}, "rounds": rows,
                                                      "final": {}}))
    assert "stopped after round 3 " in resume_hint(tmp_path, argv)
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "checkpoint" / "state.json").write_text(json.dumps({"completed_rounds": 2}))
    hint = resume_hint(tmp_path, [*argv, "--resume"])
    assert "stopped after round 2 " in hint
    assert hint.endswith(f"bract simulate --rounds 5 --out {tmp_path} --resume")
    (tmp_path / "checkpoint" / "state.json").write_text("{not json")
    assert "stopped after round 3 " in resume_hint(tmp_path, argv)


def test_nothing_a_thread_reports_after_the_stop_reaches_the_terminal(tmp_path: Path) -> None:
    """A thread that keeps reporting its child's death (as Flower's simulation engine logs
    a traceback for each lost worker, sometimes late) prints nothing the user sees once
    Ctrl-C is pressed: the only output is the `interrupted:` line."""
    script = """
        import subprocess, sys, threading, time
        from bract.flower.interrupt import interruptible

        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])

        def report():
            child.wait()
            while True:  # late and repeated, as long as the process lives
                print("Traceback (most recent call last): worker lost", file=sys.stderr,
                      flush=True)
                time.sleep(0.001)

        threading.Thread(target=report, daemon=True).start()
        with interruptible(lambda: (time.sleep(0.3), "stopped after round 1")[1]):
            print("ready", flush=True)
            time.sleep(60)
    """
    code, stdout, stderr = _ctrl_c_when_ready(script)
    assert code == 130
    assert "Traceback" not in stdout + stderr
    assert stderr == "interrupted: stopped after round 1\n"
