"""`bract deploy` fails loudly: exit 1 and one line when no hospital trained (each
refused, e.g. spent budgets) or the run wrote no report; its flags are checked before
any process starts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bract.cli import main
from bract.flower import deploy_cli
from bract.flower.deploy import RunResult


class FakeFederation:
    """Stands in for LocalFederation: 'runs' by writing the given report."""

    report: dict | None = None

    def __init__(self, workdir: Path, n: int, **kw) -> None:
        self.address, self.log_dir = "127.0.0.1:0", workdir / "logs"

    def __enter__(self) -> FakeFederation:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def run(self, run_config: dict, timeout: float, kill_node_at_round=None) -> RunResult:
        out = Path(run_config["out"])
        if self.report is not None:
            out.mkdir(parents=True, exist_ok=True)
            (out / "report.json").write_text(json.dumps(self.report))
        return RunResult(run_id=7, status="finished:completed", seconds=1.0, out_dir=out,
                         log="")


def _row(trained: bool) -> dict:
    line = {"epsilon": 1.0 if trained else 4.0, "trained": trained,
            "reason": "ok" if trained else "refused: budget spent"}
    return {"round": 1, "epsilon": line["epsilon"], "per_client": {"hospital-0": line},
            "trained": ["hospital-0"] if trained else [],
            "failed": {} if trained else {"hospital-1": "failed: refused: policy"}}


@pytest.mark.parametrize(("report", "code", "needle"), [
    ({"config": {}, "rounds": [_row(False)], "final": {"epsilon": 4.0, "stopped": {
        "hospital-0": "refused: budget spent"}}}, 1,
     "no hospital trained in any round, so the model was not trained (hospital-0: refused"),
    (None, 1, "wrote no"),
    ({"config": {}, "rounds": [_row(True)], "final": {"epsilon": 1.0}}, 0, ""),
])
def test_deploy_exits_1_with_one_line_when_nothing_was_trained(report, code, needle,
                                                               tmp_path, monkeypatch,
                                                               capsys) -> None:
    FakeFederation.report = report
    monkeypatch.setattr(deploy_cli, "LocalFederation", FakeFederation)
    assert main(["deploy", "--out", str(tmp_path / "out")]) == code
    err = capsys.readouterr().err
    assert needle in err
    assert "Traceback" not in err


@pytest.mark.parametrize(("argv", "needle"), [
    (["--dataset", "medmnist"], "argument --dataset: must be one of synthetic, breast-cancer"),
    (["--clients", "2"], "needs at least 3 hospitals"),
    (["--noise-multiplier", "0"], "never allow a non-private run"),
    (["--max-grad-norm", "0"], "argument --max-grad-norm: must be a finite number > 0"),
])
def test_deploy_refuses_bad_flags_before_starting_anything(argv, needle, tmp_path, monkeypatch,
                                                          capsys) -> None:
    def never(*a, **k):
        raise AssertionError("a federation was started")

    monkeypatch.setattr(deploy_cli, "LocalFederation", never)
    try:
        code = main(["deploy", *argv, "--out", str(tmp_path)])
    except SystemExit as exc:  # argparse's own refusal
        code = exc.code
    assert code == 2
    assert needle in capsys.readouterr().err
