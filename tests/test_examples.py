"""The examples run as documented."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_custom_hospital_app_runs_private_and_secure(tmp_path) -> None:
    env = {**os.environ, "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "custom_hospital_app.py")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "runs" / "custom" / "report.json").read_text())
    assert [r["round"] for r in report["rounds"]] == [1, 2, 3]
    last = report["rounds"][-1]
    assert last["secagg"]["aborted"] is None and len(last["secagg"]["alive"]) == 3
    assert all(0.98 * 3.0 <= v["epsilon"] <= 3.0 for v in last["per_client"].values())
    assert report["final"]["accuracy"] > 0.8
