"""A refused ``bract simulate`` leaves the filesystem exactly as it was: every setting,
the output folder, ``--save-model`` and an earlier run in ``--out`` are checked before
anything under ``--out`` is created or moved (exit 2, one error line)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bract.cli import main
from tests.tree import tree_snapshot


def _earlier_run(out: Path, key: str = "ab" * 32) -> None:
    """An output that holds a run: its records and a hospital's identity key."""
    (out / "hospitals" / "hospital-0").mkdir(parents=True)
    (out / "hospitals" / "hospital-0" / "identity.key").write_text(key + "\n")
    (out / "ledger.jsonl").write_text("{}\n")
    (out / "report.json").write_text("{}")


@pytest.fixture
def no_federation(monkeypatch) -> None:
    """A refused command never gets as far as starting the simulated federation."""
    import flwr.simulation

    def started(*args, **kwargs):
        raise AssertionError("the federation started: the command was not refused up front")

    monkeypatch.setattr(flwr.simulation, "run_simulation", started)


REFUSED = [
    (["--dataset", "breast-cancer", "--clients", "1000"], "empty partition"),
    (["--image-size", "30"], "multiple of 4"),
    (["--dataset", "breast-cancer", "--resume"], "no checkpoint to resume"),
    (["--clients", "2"], "needs at least 3 hospitals"),
    (["--drop-rate", "2"], "--drop-rate must lie in [0, 1]"),
    (["--record-secagg", "--no-secagg"], "it needs --secagg"),
    (["--no-secagg", "--drop-rate", "0.3"], "the only drop stage is 'config'"),
    (["--dataset", "breast-cancer", "--public-size", "3"], "--public-size 3 is below"),
    (["--dataset", "breast-cancer", "--privacy-unit", "patient"], "patient"),
    (["--release-metrics", "clear"], "metrics leave only in aggregate"),
    (["--dataset", "imagefolder", "--data-path", "nowhere"], "nowhere"),
    (["--save-model", "model.pt"], "--save-model must end in .npz"),
    (["--save-model", "adir.npz"], "--save-model adir.npz is an existing directory"),
    (["--save-model", "afile/m.npz"], "afile is an existing file, not a directory"),
]


@pytest.mark.parametrize("layout", ["new-out", "default-out-holds-a-run"])
@pytest.mark.parametrize(("argv", "needle"), REFUSED)
def test_a_refused_simulate_leaves_the_filesystem_as_it_was(
        argv, needle, layout, tmp_path, monkeypatch, capsys, no_federation) -> None:
    """New --out (nested): no folder is made. Default --out holding a run (which a
    started run would move aside whole): it stays where it is, untouched."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COLUMNS", "400")
    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir.npz").mkdir()
    if layout == "new-out":
        extra = ["--out", str(tmp_path / "a" / "b")]
    else:
        _earlier_run(tmp_path / "runs" / "latest")
        extra = []
    before = tree_snapshot(tmp_path)
    assert main(["simulate", *argv, *extra, "--no-progress"]) == 2
    said = capsys.readouterr().out
    assert needle in " ".join(said.split()) and "Traceback" not in said
    assert tree_snapshot(tmp_path) == before


def test_an_out_that_holds_a_run_is_refused_without_touching_it(
        tmp_path, capsys, no_federation) -> None:
    """Not even the folder's modification time changes (it dates the run when a later
    --new-federation moves it aside)."""
    out = tmp_path / "run"
    _earlier_run(out)
    before = tree_snapshot(tmp_path)
    assert main(["simulate", "--dataset", "breast-cancer", "--out", str(out),
                 "--no-progress"]) == 2
    assert "already holds a run" in " ".join(capsys.readouterr().out.split())
    assert tree_snapshot(tmp_path) == before


@pytest.mark.parametrize("key", ["not a key", "abcd"])
def test_new_run_with_an_unreadable_hospital_key_moves_nothing_aside(
        key, tmp_path, capsys, no_federation) -> None:
    """--new-run would move the records aside and have the hospitals sign with their
    keys: a key that cannot be read (not hex, or not 32 bytes) refuses the command
    before anything moves."""
    out = tmp_path / "run"
    _earlier_run(out, key=key)
    before = tree_snapshot(tmp_path)
    assert main(["simulate", "--dataset", "breast-cancer", "--out", str(out), "--new-run",
                 "--no-progress"]) == 2
    said = " ".join(capsys.readouterr().out.split())
    assert "hospital-0's identity key" in said and "unreadable" in said
    assert tree_snapshot(tmp_path) == before


def test_new_run_over_spent_budgets_with_no_recorded_split_moves_nothing_aside(
        tmp_path, capsys, no_federation) -> None:
    """Hospitals whose budgets were spent on a split bract did not record (an output of
    an older bract, or split.json deleted): --new-run cannot tell whether each would
    hold the records its budget was spent on, so it is refused before anything moves;
    an output whose hospitals spent nothing is not refused for it."""
    from bract.flower.simulation import SPLIT_FILE

    out = tmp_path / "run"
    _earlier_run(out)
    argv = ["simulate", "--dataset", "breast-cancer", "--out", str(out), "--new-run",
            "--no-progress"]
    spent = out / "hospitals" / "hospital-0" / "datasets" / "breast-cancer-0" / "ledger.jsonl"
    spent.parent.mkdir(parents=True)
    spent.write_text("")
    before = tree_snapshot(tmp_path)
    assert main(argv) == 2
    said = " ".join(capsys.readouterr().out.split())
    assert f"no record of which records each holds ({SPLIT_FILE}" in said
    assert "--new-federation" in said and said.count("error:") == 1
    assert tree_snapshot(tmp_path) == before


def test_a_library_run_refused_by_its_output_creates_nothing(tmp_path, no_federation) -> None:
    """bract.flower.simulation.run checks the output before it creates it."""
    from bract.flower.config import FederationConfig
    from bract.flower.simulation import SimulationConfig, run

    cfg = SimulationConfig(FederationConfig(dataset="breast-cancer", out=tmp_path / "a" / "b"),
                           save_model=tmp_path / "m.txt")
    with pytest.raises(ValueError, match=r"--save-model must end in \.npz"):
        run(cfg)
    assert list(tmp_path.iterdir()) == []
