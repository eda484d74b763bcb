"""``bract simulate``'s data flags: --dataset, --data-path, --partition, --alpha,
--partition-column. Bad values fail before any federation starts, with exit code 2
and an error line naming the fix."""

from __future__ import annotations

import numpy as np
import pytest

from bract.cli import build_parser, main
from bract.flower.app import task_from_run_config
from bract.flower.config import FederationConfig


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


@pytest.mark.parametrize(("flag", "value", "needle"), [
    ("--alpha", "0", "must be a finite number > 0"),
    ("--max-grad-norm", "0", "must be a finite number > 0"),
    ("--max-grad-norm", "-1", "must be a finite number > 0"),
    ("--secagg-clip", "0", "must be a finite number > 0"),
    ("--target-epsilon", "0", "must be a finite number >= 0.05 and <= 50"),
    ("--target-epsilon", "nan", "must be a finite number >= 0.05 and <= 50"),
    ("--target-epsilon", "1e9", "must be a finite number >= 0.05 and <= 50"),
    ("--delta", "1", "must be a finite number > 0 and < 1"),
    ("--noise-multiplier", "-1", "must be a finite number >= 0 and <= 10000, or 'calibrate'"),
    ("--batch-size", "0", "must be an integer >= 1, or 'dataset-default'"),
    ("--lr", "0", "must be a finite number > 0, or 'dataset-default'"),
    ("--momentum", "1", "must be a finite number >= 0 and < 1, or 'dataset-default'"),
    ("--clients", "2.5", "must be an integer >= 1"),
])
def test_the_parser_refuses_a_value_out_of_range_naming_the_flag(flag, value, needle,
                                                                 capsys) -> None:
    """Every federation flag is checked where it is parsed (bract.flower.config): a clip
    norm of 0 or a delta of 1 never reaches a hospital."""
    with pytest.raises(SystemExit) as exc:
        main(["simulate", flag, value])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: {needle}, got {value!r}" in err
    assert "Traceback" not in err


def test_partition_choice_is_checked_by_the_parser(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["simulate", "--partition", "pathological"])
    assert exc.value.code == 2
    assert "argument --partition: must be one of iid, dirichlet" in capsys.readouterr().err


def test_flags_reach_the_task_as_the_run_config_does(tmp_path) -> None:
    path = tmp_path / "p.npz"
    np.savez(path, x=np.zeros(1))
    args = build_parser().parse_args([
        "simulate", "--dataset", "medmnist", "--data-path", str(path), "--partition",
        "dirichlet", "--alpha", "0.3",
    ])
    fed = FederationConfig.from_args(args)
    assert (fed.dataset, fed.data_path, fed.partition, fed.alpha) == (
        "medmnist", str(path), "dirichlet", 0.3,
    )
    task = task_from_run_config({
        "dataset": "medmnist", "data-path": str(path), "partition": "dirichlet", "alpha": 0.3,
    })
    assert (task.dataset, task.data_path, task.partition, task.alpha) == (
        "medmnist", str(path.resolve()), "dirichlet", 0.3,
    )
    assert task == fed.task()
    assert task_from_run_config({"partition": "column", "partition-column": "label"}) \
        .partition_column == "label"
