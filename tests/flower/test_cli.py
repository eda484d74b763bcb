"""The ``bract`` command: argument errors are clear, and a real simulation runs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bract.cli import main
from bract.privacy import epsilon_of
from bract.records.ledger import read_ledger


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["simulate", "--clients", "0"], "argument --clients: must be an integer >= 1"),
        (["simulate", "--rounds", "two"], "argument --rounds: must be an integer >= 1"),
        (["simulate", "--dataset", "mnist"], "argument --dataset: must be one of synthetic"),
        (["simulate", "--delta", "nan"], "argument --delta: must be a finite number"),
        (["simulate", "--target-epsilon", "-1"],
         "argument --target-epsilon: must be a finite number >= 0.05 and <= 50"),
        (["simulate", "--delta", "1.5"], "argument --delta: must be a finite number > 0 and < 1"),
        (["simulate", "--noise-multiplier", "-0.5"],
         "argument --noise-multiplier: must be a finite number >= 0"),
    ],
)
def test_argument_errors_name_the_problem(argv, needle, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert needle in capsys.readouterr().err


@pytest.mark.parametrize("command", ["simulate", "compare"])
@pytest.mark.parametrize(("device", "cuda", "needle"), [
    ("tpu", 0, "argument --device: must be cpu, cuda or cuda:N, got 'tpu'"),
    ("cuda:x", 1, "argument --device: must be cpu, cuda or cuda:N, got 'cuda:x'"),
    ("cuda", 0, "argument --device: cuda was asked for but torch sees no CUDA device"),
    ("cuda:0", 0, "argument --device: cuda:0 was asked for but torch sees no CUDA device"),
    ("cuda:1", 1, "argument --device: cuda:1 was asked for but this machine has 1 CUDA"),
])
def test_a_device_this_machine_cannot_train_on_is_refused_while_parsing(
        command, device, cuda, needle, capsys, monkeypatch) -> None:
    """--device is checked where it is parsed (exit 2, naming the flag), before Ray
    starts: a name torch does not know, or CUDA where torch sees none (or fewer)."""
    import torch

    from bract.cli import build_parser

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: cuda)
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args([command, "--device", device])
    assert exc.value.code == 2
    assert needle in " ".join(capsys.readouterr().err.split())


def test_a_device_this_machine_has_is_taken(monkeypatch) -> None:
    import torch

    from bract.cli import build_parser
    from bract.flower.config import FederationConfig

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    for device in ("cpu", "cuda", "cuda:1"):
        assert build_parser().parse_args(["simulate", "--device", device]).device == device
    with pytest.raises(ValueError, match=r"device='tpu': must be cpu, cuda or cuda:N"):
        FederationConfig(device="tpu")


def test_a_library_run_on_missing_cuda_is_refused_before_ray_starts(tmp_path,
                                                                      monkeypatch) -> None:
    import torch

    from bract.flower.config import FederationConfig
    from bract.flower.simulation import SimulationConfig, validate

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = SimulationConfig(FederationConfig(dataset="breast-cancer", device="cuda",
                                            out=tmp_path))
    with pytest.raises(ValueError, match="device cuda was asked for but torch sees no CUDA"):
        validate(cfg)


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
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


def test_a_simulation_that_did_not_finish_is_one_error_line_and_exit_1(
        tmp_path, capsys, monkeypatch) -> None:
    import bract.flower.simulation as simulation

    def unfinished(cfg, on_checked=None):
        raise RuntimeError("the federation did not finish; see the messages above")

    monkeypatch.setenv("COLUMNS", "400")
    monkeypatch.setattr(simulation, "run", unfinished)
    assert main(["simulate", "--out", str(tmp_path), "--no-progress"]) == 1
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == "error: the federation did not finish; see the messages above"


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


def test_simulate_into_a_run_without_resume_is_refused_and_deletes_nothing(tmp_path,
                                                                          capsys) -> None:
    """A careless re-run must not forget spent budget: an --out that holds a run is
    refused (exit 2, before any hospital starts), and every file of it is left as it was."""
    out = tmp_path / "run"
    (out / "hospitals" / "hospital-0").mkdir(parents=True)
    (out / "hospitals" / "hospital-0" / "privacy-state.json").write_text("{}")
    (out / "ledger.jsonl").write_text("{}\n")
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    code = main(["simulate", "--dataset", "breast-cancer", "--out", str(out), "--no-progress"])
    text = " ".join(capsys.readouterr().out.split())
    assert code == 2
    assert "already holds a run" in text and "--resume" in text and "--new-run" in text
    assert "--new-federation" in text
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    assert main(["simulate", "--out", str(out), "--resume", "--new-run"]) == 2
    assert main(["simulate", "--out", str(out), "--new-run", "--new-federation"]) == 2


def test_a_new_run_of_the_same_hospitals_keeps_their_state_in_place(tmp_path) -> None:
    """--new-run moves the run's records aside and leaves the hospitals' own directory
    (keys and lifetime budgets) where it is, untouched."""
    from bract.flower.run_dir import holds_run, set_aside_previous_run

    out = tmp_path / "run"
    (out / "hospitals" / "hospital-0").mkdir(parents=True)
    (out / "hospitals" / "hospital-0" / "identity.key").write_text("key\n")
    (out / "checkpoint").mkdir()
    (out / "ledger.jsonl").write_text("entries\n")
    (out / "roster.json").write_text("{}\n")
    moved = set_aside_previous_run(out, "new-run")
    assert moved is not None and moved.name.startswith("run-")
    assert sorted(p.name for p in moved.iterdir()) == ["checkpoint", "ledger.jsonl", "roster.json"]
    assert [p.name for p in out.iterdir()] == ["hospitals"]
    assert (out / "hospitals" / "hospital-0" / "identity.key").read_text() == "key\n"
    assert holds_run(out)  # the hospitals' state alone still marks it: no silent reuse


@pytest.mark.slow
def test_a_new_run_into_the_same_output_continues_the_hospitals_budgets(tmp_path,
                                                                      capsys) -> None:
    """Two runs into one --out (the second with --new-run): both runs' entries are kept,
    the same hospitals (same keys) join a new federation, and their epsilon continues
    from what the first run spent up to the second run's lifetime target; the second
    run's record passes the audit, and the first run's records lie intact beside it."""
    out = tmp_path / "run"
    common = ["simulate", "--dataset", "breast-cancer", "--clients", "3", "--rounds", "2",
              "--out", str(out), "--no-progress"]
    assert main([*common, "--target-epsilon", "2"]) == 0
    first = json.loads((out / "report.json").read_text())
    first_roster = json.loads((out / "roster.json").read_text())
    assert main([*common, "--target-epsilon", "4"]) == 2  # refused: no silent reset
    assert main([*common, "--target-epsilon", "4", "--new-run"]) == 0
    (archived,) = [p for p in tmp_path.iterdir() if p.name.startswith("run-")]
    assert json.loads((archived / "report.json").read_text()) == first
    second = json.loads((out / "report.json").read_text())
    roster = json.loads((out / "roster.json").read_text())
    assert roster["federation_id"] != first_roster["federation_id"]
    assert roster["members"] == first_roster["members"]  # the same hospitals, same keys
    entries = read_ledger(out / "ledger.jsonl")
    assert len(entries) == 12  # 3 hospitals x 2 rounds, twice
    for cid, v in first["rounds"][-1]["per_client"].items():
        start = second["rounds"][0]["per_client"][cid]
        assert start["ledger_carried"] == 2 and start["epsilon"] > v["epsilon"]
        assert 0.97 * 4 <= second["rounds"][-1]["per_client"][cid]["epsilon"] <= 4
        assert [e.round for e in entries if e.client_id == cid] == [1, 2, 1, 2]
    assert main(["audit", "verify", str(out / "ledger.jsonl"), "--roster",
                 str(out / "roster.json"), "--report", str(out / "report.json"),
                 "--pld-discretization", "1e-3", "--out", str(tmp_path / "verify")]) == 0
    # A new run that re-splits the data is refused before anything moves: hospitals
    # 3-5 would hold records hospitals 0-2 spent their budgets on (or a new seed would
    # move records between them), and no hospital's ε would bound those records'.
    capsys.readouterr()
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    for change, named in ((["--clients", "6"], "clients 6 (was 3)"),
                          (["--seed", "1"], "seed 1 (was 0)")):
        assert main([*common, "--target-epsilon", "8", "--new-run", *change]) == 2
        said = " ".join(capsys.readouterr().out.split())
        assert "splits the data differently" in said and named in said, said
        assert said.count("error:") == 1 and "--new-federation" in said
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before
    # A third run asking for the same lifetime 4: nothing is left, every hospital
    # refuses, and the run fails saying so (no accuracy for a model nobody trained).
    capsys.readouterr()
    assert main([*common, "--target-epsilon", "4", "--new-run"]) == 1
    said = " ".join(capsys.readouterr().out.split())
    assert "no hospital's update was averaged in any round" in said and "refused" in said
    assert "final accuracy" not in said


def test_a_new_run_moves_the_earlier_one_aside_whole(tmp_path) -> None:
    from bract.flower.run_dir import holds_run, set_aside_previous_run

    out = tmp_path / "latest"
    assert set_aside_previous_run(out, "refuse") is None  # nothing there: nothing to do
    (out / "checkpoint").mkdir(parents=True)
    (out / "ledger.jsonl").write_text("entries\n")
    assert holds_run(out)
    moved = set_aside_previous_run(out, "archive")
    assert moved is not None and moved.name.startswith("latest-") and not out.exists()
    assert (moved / "ledger.jsonl").read_text() == "entries\n"
    (out / "checkpoint").mkdir(parents=True)  # a second earlier run in the same second
    again = set_aside_previous_run(out, "archive")
    assert again is not None and again != moved and again.exists() and moved.exists()
