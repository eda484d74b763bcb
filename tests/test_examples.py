"""The examples run as documented."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.flwr_cli import flwr_run

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_custom_hospital_app_runs_private_and_secure_with_flwr_run(tmp_path) -> None:
    """examples/custom_app, a hospital's own Flower app with bract, runs with Flower's
    own CLI (`flwr run`, simulation engine, 3 SuperNodes), trains privately and
    securely, and writes what the README's audit command reads (the audit passes)."""
    from bract.cli import main

    out = tmp_path / "custom"
    proc = flwr_run(ROOT / "examples" / "custom_app", f'out="{out}"', tmp_path,
                    tmp_path / "flwr-home", timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    assert [r["round"] for r in report["rounds"]] == [1, 2, 3]
    last = report["rounds"][-1]
    assert last["secagg"]["aborted"] is None and len(last["secagg"]["alive"]) == 3
    assert all(0.98 * 3.0 <= v["epsilon"] <= 3.0 for v in last["per_client"].values())
    assert report["final"]["accuracy"] > 0.8
    assert main(["audit", "verify", str(out / "ledger.jsonl"), "--roster",
                 str(out / "roster.json"), "--report", str(out / "report.json"), "--out",
                 str(tmp_path / "audit")]) == 0


#: Wide enough that rich never wraps a line the tests look for.
WIDE = {"COLUMNS": "400"}


def _run_example(name: str, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", **WIDE}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / name), *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc


def _write_medmnist(path: Path, n: int = 240, side: int = 28) -> Path:
    """A small file in the official MedMNIST layout (uint8 images, [N, 1] labels), 2 classes
    that differ by a bright square, so nothing is downloaded."""
    import numpy as np

    rng = np.random.default_rng(0)
    arrays = {}
    for split, count in (("train", n), ("val", n // 4), ("test", n // 2)):
        labels = np.arange(count) % 2
        images = rng.integers(0, 120, size=(count, side, side), dtype=np.uint8)
        images[labels == 1, 8:16, 8:16] = 250
        arrays[f"{split}_images"] = images
        arrays[f"{split}_labels"] = labels.reshape(-1, 1).astype(np.uint8)
    np.savez(path, **arrays)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("source", ["synthetic", "medmnist"])
def test_chest_xray_example_trains_the_cnn_non_iid_and_explains_it(tmp_path, source) -> None:
    # The example's own defaults (128 px, 3 rounds) are for people; this is its smallest run.
    args = ["--image-size", "32", "--rounds", "1", "--out", "out"]
    if source == "medmnist":  # every image of the file: 420
        args += ["--data-path", str(_write_medmnist(tmp_path / "pneumoniamnist.npz"))]
    else:
        args += ["--samples", "600"]
    proc = _run_example("chest_xray_cnn.py", tmp_path, *args)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["config"]["partition"] == "dirichlet" and report["config"]["image_size"] == 32
    assert report["config"]["dataset"] == source
    assert report["rounds"][0]["secagg"]["aborted"] is None
    assert all(0 < v["epsilon"] <= 8.0 for v in report["rounds"][0]["per_client"].values())
    assert (tmp_path / "out" / "global_model.npz").is_file()
    overlays = sorted((tmp_path / "out" / "gradcam").glob("*.png"))
    assert len(overlays) == 8 + 1, overlays  # eight overlays and the contact sheet
    assert "wrote 8 overlays and the contact sheet" in proc.stdout


def test_chest_xray_example_names_a_missing_medmnist_file(tmp_path) -> None:
    env = {**os.environ, "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", **WIDE}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "chest_xray_cnn.py"),
         "--data-path", str(tmp_path / "missing.npz")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2
    assert "missing.npz" in proc.stdout and "Traceback" not in proc.stdout + proc.stderr


def _example_module(name: str, monkeypatch: pytest.MonkeyPatch):
    """An example loaded as a module (not run), so a test can stand in for its calls;
    its console is wide enough that rich never wraps a line the tests look for."""
    import importlib.util

    monkeypatch.setenv("COLUMNS", WIDE["COLUMNS"])

    spec = importlib.util.spec_from_file_location(f"example_{name}", ROOT / "examples" / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _chest_report(trained: list[str], failed: dict[str, str]) -> dict:
    done = bool(trained)
    metrics = {"accuracy": 0.8, "loss": 0.5} if done else {}
    return {
        "rounds": [{"round": 1, "epsilon": 2.0 if done else 0.0, "delta": 1e-5,
                    "per_client": {}, "trained": trained, "failed": failed, "seconds": 3.0,
                    **metrics}],
        "final": {"rounds_completed": int(done), "model_trained": done,
                  "epsilon": 2.0 if done else 0.0, "delta": 1e-5, "non_private": False,
                  "stopped": {}, **metrics},
        "initial": {"loss": 1.1, "accuracy": 0.3},
    }


@pytest.mark.parametrize(("trained", "needle"), [
    # e.g. every hospital failed on its device
    ([], "no hospital's update was averaged in any round"),
    (["hospital-0", "hospital-1"], "hospital-2 failed in round 1: ValueError: bad pixels"),
])
def test_chest_xray_example_that_failed_says_so_once_and_explains_nothing(
        tmp_path, monkeypatch, capsys, trained, needle) -> None:
    """A failed (or partly failed) federation: exit 1, one error line naming the cause;
    no Grad-CAM is attempted and no list of outputs is printed."""
    example = _example_module("chest_xray_cnn.py", monkeypatch)
    failed = {"hospital-2": "failed: ValueError: bad pixels"} if trained else {
        f"hospital-{i}": "failed: RuntimeError (details in the hospital's log)"
        for i in range(3)}
    monkeypatch.setattr(example, "run", lambda cfg: _chest_report(trained, failed))
    monkeypatch.setattr(example, "bract_command", lambda argv: pytest.fail("explain ran"))
    monkeypatch.setattr(sys, "argv", ["chest_xray_cnn.py", "--out", str(tmp_path / "out"),
                                      "--no-progress", "--device", "cpu"])
    assert example.main() == 1
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], out
    assert "outputs in" not in out


@pytest.mark.parametrize("name", ["chest_xray_cnn.py", "breast_cancer_hospitals.py"])
def test_an_example_whose_federation_did_not_finish_says_so_in_one_line(
        name, tmp_path, monkeypatch, capsys) -> None:
    example = _example_module(name, monkeypatch)

    def unfinished(cfg):
        raise RuntimeError("the federation did not finish; see the messages above")

    monkeypatch.setattr(example, "run", unfinished)
    monkeypatch.setattr(sys, "argv", [name, "--out", str(tmp_path / "out"), "--no-progress"])
    assert example.main() == 1
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert lines == ["error: the federation did not finish; see the messages above"]


def test_chest_xray_example_lists_only_the_outputs_it_wrote(tmp_path, monkeypatch,
                                                            capsys) -> None:
    example = _example_module("chest_xray_cnn.py", monkeypatch)
    out = tmp_path / "out"

    def run(cfg):
        out.mkdir()
        for name in ("report.json", "ledger.jsonl", "roster.json"):
            (out / name).write_text("{}")  # no plots, no saved model in this stand-in
        return _chest_report(["hospital-0", "hospital-1", "hospital-2"], {})

    def explain(argv):
        (out / "gradcam").mkdir()
        return 0

    monkeypatch.setattr(example, "run", run)
    monkeypatch.setattr(example, "bract_command", explain)
    monkeypatch.setattr(sys, "argv", ["chest_xray_cnn.py", "--out", str(out), "--no-progress"])
    assert example.main() == 0
    said = capsys.readouterr().out
    assert f"outputs in {out}: report.json, ledger.jsonl, roster.json, gradcam/" in said


def test_the_chest_xray_example_refuses_a_device_while_parsing(capsys, monkeypatch) -> None:
    example = _example_module("chest_xray_cnn.py", monkeypatch)
    monkeypatch.setattr(sys, "argv", ["chest_xray_cnn.py", "--device", "tpu"])
    with pytest.raises(SystemExit) as exc:
        example.parse_args()
    assert exc.value.code == 2
    assert "argument --device: must be cpu, cuda or cuda:N" in capsys.readouterr().err


def test_diabetes_example_with_a_failed_arm_says_so_once_and_reports_the_others(
        tmp_path, monkeypatch, capsys) -> None:
    """An arm whose run failed (bract.compare's ComparisonError): no traceback, no R² of
    the failed arm, the other arms' gaps, one error line, exit 1."""
    from bract.compare import ComparisonError

    example = _example_module("diabetes_vs_centralized.py", monkeypatch)
    study = {
        "centralized": {"r2": 0.33},
        "variants": [
            {"label": "FedAvg (non-private)", "r2": 0.07},
            {"label": "FedAvg+DP ε=3", "name": "dp-eps3", "failed": "the run did not finish"},
        ],
    }

    def fails(*args, **kwargs):
        raise ComparisonError("arm FedAvg+DP ε=3 (dp-eps3) failed: the run did not finish",
                              study)

    monkeypatch.setattr(example, "run_comparison", fails)
    monkeypatch.setattr(sys, "argv", ["diabetes_vs_centralized.py", "--out",
                                      str(tmp_path / "out"), "--no-progress"])
    assert example.main() == 1
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert lines[0].startswith("FedAvg (non-private): R² 0.070; centralized 0.330")
    assert lines[1:] == ["error: arm FedAvg+DP ε=3 (dp-eps3) failed: the run did not finish"]


@pytest.mark.slow
def test_breast_cancer_example_passes_its_own_audit(tmp_path) -> None:
    proc = _run_example("breast_cancer_hospitals.py", tmp_path, "--rounds", "2", "--out", "out")
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["config"]["clients"] == 5 and report["config"]["partition"] == "dirichlet"
    last = report["rounds"][-1]
    assert last["secagg"]["aborted"] is None and len(last["secagg"]["alive"]) == 5
    assert all(0.98 * 3.0 <= v["epsilon"] <= 3.0 for v in last["per_client"].values())
    assert "PASS" in proc.stdout
    assert (tmp_path / "out" / "audit" / "audit.md").is_file()
    assert "centralized non-private logistic regression" in proc.stdout


@pytest.mark.slow
def test_diabetes_example_compares_federated_and_centralized_r2(tmp_path) -> None:
    proc = _run_example("diabetes_vs_centralized.py", tmp_path, "--rounds", "2",
                        "--epsilons", "8", "--out", "out", "--no-progress")
    study = json.loads((tmp_path / "out" / "compare.json").read_text())
    assert study["task"] == "regression" and study["metric"] == "r2"
    assert study["centralized"]["model"] == "LinearRegression"
    kinds = [v["kind"] for v in study["variants"]]
    assert kinds == ["fedavg", "dp", "dp-secagg"]
    assert study["variants"][0]["epsilon"] == "inf" and study["variants"][0]["non_private"]
    secure = study["variants"][-1]
    assert 0.98 * 8.0 <= secure["epsilon"] <= 8.0 and not secure["non_private"]
    assert secure["rounds_completed"] == 2
    assert secure["r2"] > 0.0  # better than predicting the mean, after two private rounds
    assert "gap" in proc.stdout
    # Every arm is a full bract run: the secure one's report says secure aggregation ran,
    # and its signed ledger passes the independent audit (bract compare adds no claim).
    arm = tmp_path / "out" / secure["name"]
    report = json.loads((arm / "report.json").read_text())
    assert all(r["secagg"]["aborted"] is None for r in report["rounds"])
    audit = subprocess.run(
        [sys.executable, "-m", "bract.cli", "audit", "verify", str(arm / "ledger.jsonl"),
         "--roster", str(arm / "roster.json"), "--report", str(arm / "report.json"),
         "--out", str(tmp_path / "audit")],
        capture_output=True, text=True, timeout=300,
    )
    assert audit.returncode == 0, audit.stdout[-2000:] + audit.stderr[-2000:]
    assert all((tmp_path / p).is_file() for p in study["plots"]) and len(study["plots"]) == 3
    assert "∞ (NON-PRIVATE)" in (tmp_path / "out" / "compare.md").read_text()
