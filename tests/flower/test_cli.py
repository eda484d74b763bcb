"""The ``bract`` command: argument errors are clear, and a real simulation runs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bract.audit.ledger import read_ledger
from bract.cli import main
from bract.privacy import epsilon_of


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["simulate", "--clients", "0"], "must be >= 1"),
        (["simulate", "--rounds", "two"], "expected an integer"),
        (["simulate", "--dataset", "mnist"], "invalid choice"),
        (["simulate", "--delta", "nan"], "must be finite"),
    ],
)
def test_argument_errors_name_the_problem(argv, needle, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert needle in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["simulate", "--target-epsilon", "-1"], "epsilon must be a finite number > 0"),
        (["simulate", "--delta", "1.5"], "delta must be a number strictly between 0 and 1"),
        (["simulate", "--noise-multiplier", "-0.5"], "--noise-multiplier must be >= 0"),
        (["simulate", "--save-model", "model.pt"], "must end in .npz"),
        (["simulate", "--dataset", "breast-cancer", "--clients", "1000"], "empty partition"),
        (["simulate", "--image-size", "30"], "multiple of 4"),
        (["simulate", "--dataset", "breast-cancer", "--resume"], "no checkpoint to resume"),
        (["simulate", "--clients", "2"], "needs at least 3 hospitals"),
        (["simulate", "--clients", "40", "--secagg-graph", "harary"],
         "cannot honour the collusion bound"),
    ],
)
def test_bad_values_fail_fast_with_a_clear_message(argv, needle, capsys, tmp_path) -> None:
    code = main([*argv, "--out", str(tmp_path), "--no-progress"])
    out = capsys.readouterr().out
    assert code == 2
    assert needle in " ".join(out.split())
    assert "Traceback" not in out


@pytest.mark.slow
def test_simulate_end_to_end_on_flower(tmp_path, capsys) -> None:
    """A real Flower simulation (Ray backend): report, ledger and model on disk."""
    out = tmp_path / "run"
    code = main([
        "simulate", "--dataset", "breast-cancer", "--clients", "3", "--rounds", "2",
        "--target-epsilon", "2", "--out", str(out), "--save-model", str(out / "m.npz"),
        "--no-progress", "--record-secagg",
    ])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert [r["round"] for r in report["rounds"]] == [1, 2]
    events = [e.event for e in read_ledger(out / "ledger.jsonl")]
    assert len(events) == 6
    for cid, v in report["rounds"][-1]["per_client"].items():
        mine = [e for e in events if e.client_id == cid]
        assert v["epsilon"] == pytest.approx(epsilon_of(mine, 1e-5), rel=1e-6)
        assert 0.98 * 2 <= v["epsilon"] <= 2
    assert report["final"]["accuracy"] > 0.8
    assert set(np.load(out / "m.npz").files)
    assert "NON-PRIVATE" not in capsys.readouterr().out
    # What a privacy officer runs afterwards: the signed ledger and every epsilon check
    # out, and the server's recorded view of both secure rounds hides every update.
    assert main(["audit", "verify", str(out / "ledger.jsonl"), "--roster",
                 str(out / "roster.json"), "--report", str(out / "report.json"),
                 "--pld-discretization", "1e-3", "--out", str(tmp_path / "verify")]) == 0
    assert sorted(p.name for p in (out / "secagg_view").iterdir()) == ["round-1", "round-2"]
    assert main(["audit", "secagg", "--view", str(out / "secagg_view"),
                 "--out", str(tmp_path / "secagg")]) == 0
