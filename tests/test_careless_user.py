"""The careless user (issue #19): every bad input a new user tried, as a table. Each
must end with exit status 2, exactly one line that says `error:` and names the
problem, no traceback, and nothing written or lost. Ctrl-C and `--resume` after it
are tested in tests/flower/test_resume.py; a hospital-side failure and an
impossible target in tests/flower/test_federation.py and below."""

from __future__ import annotations

import io
import json
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest

from bract.cli import main

#: (arguments, what the error line must name). ``{out}`` is a fresh directory,
#: ``{file}`` an existing file, ``{run}`` a directory holding a finished run.
CASES = [
    (["simulate", "--target-epsilon", "0.001"], "--target-epsilon: must be a finite number >= 0.05"
     ),
    (["simulate", "--target-epsilon", "1e9"], "<= 50"),
    (["simulate", "--max-grad-norm", "0"], "--max-grad-norm: must be a finite number > 0"),
    (["simulate", "--max-grad-norm", "-1"], "--max-grad-norm"),
    (["simulate", "--clients", "0"], "--clients: must be an integer >= 1"),
    (["simulate", "--batch-size", "0"], "--batch-size"),
    (["simulate", "--secagg-clip", "0"], "--secagg-clip"),
    (["simulate", "--delta", "1"], "--delta"),
    (["simulate", "--noise-multiplier", "-1"], "--noise-multiplier"),
    (["simulate", "--dataset", "chest"], "--dataset"),
    (["simulate", "--clients", "2"], "at least 3 hospitals"),
    (["simulate", "--release-metrics", "clear"], "never in clear"),
    (["simulate", "--dataset", "medmnist"], "needs --data-path"),
    (["simulate", "--dataset", "imagefolder"], "needs --data-path"),
    (["simulate", "--dataset", "breast-cancer", "--clients", "500"],
     "500 hospitals but only 455 training examples"),
    (["simulate", "--dataset", "breast-cancer", "--public-size", "10"], "--public-size 10"),
    (["simulate", "--dataset", "breast-cancer", "--privacy-unit", "patient"],
     "names no patient"),
    (["simulate", "--dataset", "breast-cancer", "--resume"], "no checkpoint to resume"),
    (["simulate", "--dataset", "breast-cancer", "--resume", "--new-run"], "choose one"),
    (["simulate", "--save-model", "model.pt"], "must end in .npz"),
    (["simulate", "--out", "{file}"], "is an existing file"),
    (["simulate", "--out", "{run}"], "holds a run"),
    (["simulate", "--dataset", "breast-cancer", "--rounds", "4", "--noise-multiplier", "0.8",
      "--target-epsilon", "5"], "spends ε=5.83 in round 1 alone"),
    (["simulate", "--noise-multiplier", "1e300"], "--noise-multiplier: must be a finite"),
    (["simulate", "--no-secagg", "--secagg-colluders", "2"], "which --no-secagg turns off"),
    (["simulate", "--no-secagg", "--secagg-abort-limit", "5", "--secagg-graph", "complete"],
     "--secagg-graph complete, --secagg-abort-limit 5 set up secure aggregation"),
    (["simulate", "--no-secagg", "--drop-rate", "0.3", "--drop-stage", "mask"],
     "the only drop stage is 'config'"),
    (["deploy", "--no-secagg", "--secagg-dropouts", "1"], "which --no-secagg turns off"),
    (["deploy", "--dataset", "medmnist"], "--dataset: must be one of"),
    (["deploy", "--noise-multiplier", "0"], "never allow a non-private run"),
    (["deploy", "--out", "{file}"], "is an existing file"),
    (["deploy", "--kill-node-at-round", "9"], "--kill-node-at-round"),
    (["compare", "--out", "{file}"], "is an existing file"),
]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(["simulate", "--dataset", "breast-cancer", "--rounds", "1", "--out",
                 str(out), "--no-progress", "--no-secagg"]) == 0
    return out


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


@pytest.mark.parametrize(("argv", "names"), CASES, ids=[" ".join(a) for a, _ in CASES])
def test_a_bad_input_ends_with_one_error_line_and_touches_nothing(
        argv, names, tmp_path, finished_run) -> None:
    a_file = tmp_path / "notes.txt"
    a_file.write_text("the user's file")
    fresh = tmp_path / "out"
    places = {"{file}": str(a_file), "{run}": str(finished_run), "{out}": str(fresh)}
    argv = [places.get(a, a) for a in argv]
    if "--out" not in argv:
        argv += ["--out", str(fresh)]
    before = _snapshot(finished_run)
    stdout, stderr = io.StringIO(), io.StringIO()
    with redirect_stdout(stdout), redirect_stderr(stderr):
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse
            code = exc.code
    text = stdout.getvalue() + stderr.getvalue()
    assert code == 2, text
    assert "Traceback" not in text
    lines = [line for line in text.splitlines() if "error:" in line]
    assert len(lines) == 1, text
    assert "output in" not in text, text  # a refused run is not announced as starting
    assert names in " ".join(text.split()), text  # rich may wrap the line
    assert a_file.read_text() == "the user's file"
    assert _snapshot(finished_run) == before
    assert not (fresh / "report.json").exists() and not (fresh / "ledger.jsonl").exists()


def test_a_target_every_hospital_would_miss_is_refused_before_any_hospital_starts(
        tmp_path, monkeypatch) -> None:
    """An unreachable target is found by the pre-flight calibration: exit 2, one line,
    and Flower's simulation never starts."""
    import bract.flower.simulation as simulation

    started = []
    monkeypatch.setattr(simulation, "_identities", lambda cfg: started.append(1))
    stdout = io.StringIO()
    with redirect_stdout(stdout):
        code = main(["simulate", "--dataset", "breast-cancer", "--rounds", "50",
                     "--local-epochs", "20", "--batch-size", "400", "--target-epsilon",
                     "0.05", "--accountant", "rdp", "--out", str(tmp_path / "o"),
                     "--no-progress"])
    text = stdout.getvalue()
    assert code == 2 and started == [], text
    assert "unreachable" in " ".join(text.split())
    assert [line for line in text.splitlines() if "error:" in line]


def test_a_finished_run_reports_its_failures_in_its_exit_status(tmp_path, monkeypatch,
                                                                capsys) -> None:
    """A run whose hospitals failed in some rounds still writes its record, prints its
    summary, and then one error line naming the hospital; exit 1."""
    import bract.flower.simulation as simulation

    def run(cfg, on_checked=None):
        rows = [{"round": r, "epsilon": 1.0, "delta": 1e-5, "per_client": {},
                 "trained": ["hospital-0"], "failed": {"hospital-1": "failed: boom"},
                 "loss": 0.5, "accuracy": 0.8} for r in (1, 2)]
        report = {"config": {}, "rounds": rows, "final": {
            "rounds_completed": 2, "epsilon": 1.0, "delta": 1e-5, "non_private": False,
            "stopped": {}, "loss": 0.5, "accuracy": 0.8}}
        cfg.out_dir.mkdir(parents=True, exist_ok=True)
        (cfg.out_dir / "report.json").write_text(json.dumps(report))
        return report

    monkeypatch.setattr(simulation, "run", run)
    code = main(["simulate", "--dataset", "breast-cancer", "--out", str(tmp_path / "o"),
                 "--no-progress"])
    out = capsys.readouterr().out
    assert code == 1
    assert "hospital-1 failed in rounds 1, 2: boom" in " ".join(out.split())
    assert len([line for line in out.splitlines() if "error:" in line]) == 1


def test_a_fixed_noise_that_fits_only_some_rounds_is_warned_of() -> None:
    """A fixed noise level with which the hospitals with the least data can train some
    rounds but not all: allowed (each refuses the rounds that would pass its budget),
    and said before the run starts; noise that fits every round gets no warning."""
    from bract.flower.config import FederationConfig
    from bract.flower.simulation import SimulationConfig, fixed_noise_epsilon, warnings_for
    from bract.privacy import TrainingPlan

    def cfg(sigma: float) -> SimulationConfig:
        return SimulationConfig(federation=FederationConfig(
            dataset="breast-cancer", rounds=4, clients=3, noise_multiplier=sigma,
            target_epsilon=5.0))

    (said,) = [w for w in warnings_for(cfg(1.0)) if "--noise-multiplier" in w]
    assert "spends ε=6.63 over 4 rounds" in said and "past --target-epsilon 5" in said
    assert not [w for w in warnings_for(cfg(1.2)) if "--noise-multiplier" in w]
    plan = TrainingPlan(4, 1, 151, 32)
    assert fixed_noise_epsilon(cfg(1.0), plan, 1) < 5.0 < fixed_noise_epsilon(cfg(1.0), plan, 4)


def test_a_delta_not_below_one_over_n_is_warned_of() -> None:
    from bract.flower.config import FederationConfig
    from bract.flower.simulation import SimulationConfig, warnings_for

    def said(delta: float) -> list[str]:
        return [w for w in warnings_for(SimulationConfig(federation=FederationConfig(
            dataset="breast-cancer", clients=3, delta=delta))) if w.startswith("δ=")]

    (line,) = said(1 / 151)
    assert "not below 1/n" in line and "151 records" in line
    assert said(0.5) and not said(1 / 152) and not said(1e-5)
