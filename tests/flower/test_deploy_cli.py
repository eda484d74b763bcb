"""`bract deploy` fails loudly: exit 1 and one line when no hospital trained (each
refused, e.g. spent budgets) or the run wrote no report; its flags are checked before
any process starts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

import pytest

from bract.cli import main
from bract.flower import deploy_cli
from bract.flower.deploy import RunResult
from tests.ctrl_c import interrupt_after_rounds
from tests.tree import tree_snapshot


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
     "no hospital's update was averaged in any round, so the model was not trained "
     "(hospital-0: refused"),
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
    (["--kill-node-at-round", "0"], "--kill-node-at-round must be between 1 and --rounds"),
    (["--pull-interval", "5"], "--pull-interval must be at most 3"),
    (["--resume"], "holds no checkpoint"),
    (["--workdir", "afile/w"], "afile is a file, not a directory"),
])
def test_deploy_refuses_bad_flags_before_starting_anything(argv, needle, tmp_path, monkeypatch,
                                                          capsys) -> None:
    def never(*a, **k):
        raise AssertionError("a federation was started")

    monkeypatch.setattr(deploy_cli, "LocalFederation", never)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("x")
    try:
        code = main(["deploy", *argv])
    except SystemExit as exc:  # argparse's own refusal
        code = exc.code
    assert code == 2
    assert needle in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["afile"]  # no runs/deploy left behind


class RecordingFederation(FakeFederation):
    """A FakeFederation that remembers how it was made and what it was asked to run."""

    made: ClassVar[list[dict]] = []

    def __init__(self, workdir: Path, n: int, **kw) -> None:
        super().__init__(workdir, n, **kw)
        RecordingFederation.made.append({"workdir": workdir, **kw})

    def run(self, run_config: dict, timeout: float, kill_node_at_round=None) -> RunResult:
        RecordingFederation.made[-1]["run_config"] = dict(run_config)
        return super().run(run_config, timeout, kill_node_at_round)


def _earlier_run(out: Path) -> dict[str, bytes]:
    """An --out that holds a finished deployment of 3 hospitals: its records and the
    hospitals' state (their identity keys and the federation's roster)."""
    from bract.flower.deploy import LocalFederation

    LocalFederation(out / "deployment", 3)._write_secagg_identities()
    files = {"report.json": b"{}", "ledger.jsonl": b"{}\n", "checkpoint/state.json": b"{}"}
    for name, data in files.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(data)
    secagg = out / "deployment" / "secagg"
    return {**files, **{str(p.relative_to(out)): p.read_bytes()
                        for p in sorted(secagg.rglob("*")) if p.is_file()}}


def test_deploy_refuses_an_out_that_holds_a_run_before_starting_anything(
        tmp_path, monkeypatch, capsys) -> None:
    out = tmp_path / "out"
    files = _earlier_run(out)
    RecordingFederation.made = []
    monkeypatch.setattr(deploy_cli, "LocalFederation", RecordingFederation)
    assert main(["deploy", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already holds a run" in err[0] and "--resume continues" in err[0]
    assert RecordingFederation.made == []
    assert {name: (out / name).read_bytes() for name in files} == files


def test_deploy_new_run_moves_the_records_aside_and_keeps_the_hospitals(
        tmp_path, monkeypatch) -> None:
    out = tmp_path / "out"
    files = _earlier_run(out)
    RecordingFederation.made = []
    FakeFederation.report = {"config": {}, "rounds": [_row(True)], "final": {"epsilon": 1.0}}
    monkeypatch.setattr(deploy_cli, "LocalFederation", RecordingFederation)
    assert main(["deploy", "--out", str(out), "--new-run"]) == 0
    [aside] = [p for p in tmp_path.iterdir() if p.name.startswith("out-")]
    for name, data in files.items():
        where = out if name.startswith("deployment/") else aside
        assert (where / name).read_bytes() == data  # nothing deleted, hospitals in place
    made = RecordingFederation.made[-1]
    assert made["resume"] is False and made["run_config"]["resume"] is False


def test_deploy_resume_continues_the_run_with_the_same_hospitals(tmp_path, monkeypatch,
                                                                 capsys) -> None:
    out = tmp_path / "out"
    RecordingFederation.made = []
    monkeypatch.setattr(deploy_cli, "LocalFederation", RecordingFederation)
    out.mkdir()
    assert main(["deploy", "--out", str(out), "--resume"]) == 2
    assert "cannot resume: " in capsys.readouterr().err and RecordingFederation.made == []
    _earlier_run(out)
    FakeFederation.report = {"config": {}, "rounds": [_row(True)], "final": {"epsilon": 1.0}}
    assert main(["deploy", "--out", str(out), "--resume"]) == 0
    made = RecordingFederation.made[-1]
    assert made["workdir"] == (out / "deployment").resolve()
    assert made["resume"] is True and made["run_config"]["resume"] is True


def test_deploy_resume_without_the_hospitals_keys_is_refused_creating_nothing(
        tmp_path, monkeypatch, capsys) -> None:
    """--resume needs the hospitals' identities and roster in --workdir: a work dir
    without them (another --workdir) or with other hospitals (another --clients) is
    refused (exit 2, one line) before any folder, certificate or key is made."""

    from bract.flower.deploy import LocalFederation

    def never(self, *args, **kwargs):
        raise AssertionError("a process was started")

    monkeypatch.setattr(LocalFederation, "_spawn", never)
    out = tmp_path / "out"
    _earlier_run(out)

    before = tree_snapshot(tmp_path)
    for argv, needle in (
            (["--workdir", str(tmp_path / "elsewhere")], "hospital-0 has no identity"),
            (["--clients", "4"], "hospital-3 has no identity"),
            (["--clients", "2", "--no-secagg"], "lists other hospitals than the 2")):
        assert main(["deploy", "--out", str(out), "--resume", *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "cannot resume: " in err[0] and needle in err[0]
        assert tree_snapshot(tmp_path) == before


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_ctrl_c_stops_a_deployment_and_the_printed_command_resumes_it(tmp_path) -> None:
    """Ctrl-C during `bract deploy` (real SuperLink and SuperNodes): exit 130 within
    seconds, no traceback, no process of the deployment left, one `interrupted:` line
    with the command that continues it; that command (--resume) finishes the run with
    the same hospitals and federation, and the whole ledger verifies."""
    import shlex
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    bract = str(Path(sys.executable).parent / "bract")
    argv = [bract, "deploy", "--rounds", "3", "--out", str(out), "--target-epsilon", "4"]
    report = out / "report.json"
    ended, seconds, _ = interrupt_after_rounds(argv, report, 1, start_within=400)
    assert seconds < 15
    assert ended.returncode == 130
    assert "Traceback" not in ended.stdout + ended.stderr
    last = ended.stderr.strip().splitlines()[-1]
    assert last.startswith("interrupted: the deployment (its SuperLink and SuperNodes are "
                           "stopped) stopped after round ")
    time.sleep(1)
    rows = subprocess.run(["ps", "-ww", "-eo", "pgid=,stat=,args="], capture_output=True,
                          text=True).stdout.splitlines()
    assert [r for r in rows if str(out) in r and not r.split()[1].startswith("Z")] == []
    roster_before = (out / "deployment" / "secagg" / "roster.json").read_text()
    command = shlex.split(last.split("continue it with: ", 1)[1])
    assert command[-1] == "--resume"
    resumed = subprocess.run([bract, *command[1:]], capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert (out / "deployment" / "secagg" / "roster.json").read_text() == roster_before
    final = json.loads(report.read_text())
    assert [r["round"] for r in final["rounds"]] == [1, 2, 3]
    assert all(r["trained"] for r in final["rounds"])
    assert main(["audit", "verify", str(out / "ledger.jsonl"), "--roster",
                 str(out / "deployment" / "secagg" / "roster.json"), "--report", str(report),
                 "--out", str(tmp_path / "audit")]) == 0


def test_deploy_help_lists_only_the_datasets_it_accepts(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["deploy", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    start = text.index("--dataset {", text.index("options:"))
    dataset = text[start:text.index("--partition {", start)]
    assert "synthetic, breast-cancer, diabetes" in dataset
    assert "medmnist" not in dataset and "imagefolder" not in dataset
