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
