"""``bract simulate``'s data flags: --dataset, --data-path, --partition, --alpha,
--partition-column. Bad values fail before any federation starts, with exit code 2
and an error line naming the fix."""

from __future__ import annotations

import numpy as np
import pytest

from bract.cli import build_parser, main
from bract.flower.app import task_from_run_config


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--dataset", "medmnist"], "dataset medmnist needs --data-path"),
        (["--dataset", "imagefolder"], "dataset imagefolder needs --data-path"),
        (["--dataset", "medmnist", "--data-path", "{tmp}/none.npz"], "MedMNIST file not found"),
        (["--dataset", "imagefolder", "--data-path", "{tmp}/none"], "image folder not found"),
        (["--dataset", "breast-cancer", "--data-path", "{tmp}/x.npz"], "--data-path is read only"),
        (["--dataset", "diabetes", "--partition", "column"], "needs --partition-column"),
        (["--dataset", "diabetes", "--partition", "column", "--partition-column", "height"],
         "has no column 'height'"),
        (["--dataset", "diabetes", "--partition", "column", "--partition-column", "sex"],
         "2 distinct value(s)"),
        (["--dataset", "diabetes", "--partition", "dirichlet", "--alpha", "0"],
         "alpha must be a finite number > 0"),
        (["--dataset", "breast-cancer", "--partition", "quantity", "--clients", "500"],
         "empty partition"),
    ],
)
def test_bad_data_flags_fail_fast_with_a_clear_message(argv, needle, capsys, tmp_path) -> None:
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    code = main(["simulate", *argv, "--out", str(tmp_path / "run"), "--no-progress"])
    out = " ".join(capsys.readouterr().out.split())
    assert code == 2
    assert "error:" in out and needle in out
    assert "Traceback" not in out


def test_partition_choice_is_checked_by_the_parser(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["simulate", "--partition", "pathological"])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_flags_reach_the_task_as_the_run_config_does(tmp_path) -> None:
    path = tmp_path / "p.npz"
    np.savez(path, x=np.zeros(1))
    args = build_parser().parse_args([
        "simulate", "--dataset", "medmnist", "--data-path", str(path), "--partition",
        "dirichlet", "--alpha", "0.3",
    ])
    assert (args.dataset, args.data_path, args.partition, args.alpha) == (
        "medmnist", path, "dirichlet", 0.3,
    )
    task = task_from_run_config({
        "dataset": "medmnist", "data-path": str(path), "partition": "dirichlet", "alpha": 0.3,
    })
    assert (task.dataset, task.data_path, task.partition, task.alpha) == (
        "medmnist", str(path.resolve()), "dirichlet", 0.3,
    )
    assert task_from_run_config({"partition": "column", "partition-column": "label"}) \
        .partition_column == "label"
