"""The benchmark scripts docs/benchmarks.md quotes still run against the current code.

Benchmarks are not tests: nothing here looks at a time. Each script runs in its
shortest mode, in a fresh interpreter as the docs' commands run it, and must exit 0
with its figures as one JSON object on its last line, so a change to bract that a
benchmark relies on (a renamed method it instruments, a changed signature) fails
here instead of in the next person's measurement.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: (script and its shortest arguments, keys its JSON line must hold)
SMOKE_RUNS = [
    (["dp_step_breakdown.py", "--steps", "2", "--rounds", "1"], {"size", "ms_per_step"}),
    (["secagg_stages_bench.py"], {"n10", "n50"}),
    (["patient_level.py", "--repeats", "1", "--records", "256"],
     {"records_per_s", "patient_over_record_bk"}),
    (["audit_table.py", "--repeats", "1"], None),
    (["secagg_bench.py", "--quick"], None),
    (["dp_cuda_bench.py", "--device", "cpu", "--quick"], None),
    (["deploy_rounds.py", "--rounds", "2", "--setups", "bract"],
     {"bract_plain_s", "bract_secure_s", "bract_per_extra_stage_s"}),
]


def _run(args: list[str]) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / args[0]), *args[1:]],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize(("args", "keys"), SMOKE_RUNS, ids=[a[0] for a, _ in SMOKE_RUNS])
def test_benchmark_script_runs_and_prints_its_figures(args: list[str],
                                                      keys: set[str] | None) -> None:
    proc = _run(args)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    figures = json.loads(proc.stdout.strip().splitlines()[-1])
    assert figures, "the last line holds no figures"
    if keys is not None:
        assert keys <= set(figures), f"missing {keys - set(figures)}"


def test_patient_level_refuses_a_round_too_short_to_time() -> None:
    """A round of one step has no interval to time: refused with a clear line, not a
    ZeroDivisionError."""
    proc = _run(["patient_level.py", "--repeats", "1", "--records", "64"])
    assert proc.returncode == 2
    assert "--records must be at least 128" in proc.stderr
    assert "Traceback" not in proc.stderr
