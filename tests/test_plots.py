"""Plots of a run's report (bract.plots), `bract plot`, and the federation's plot hook."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest

from bract import plots
from bract.cli import main
from bract.plots import epsilon_series, metric_series, plot_run
from bract.records.report import HospitalRound, RoundRow

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _row(rnd: int, eps: dict[str, float | str], **metrics: float) -> dict:
    finite = [v for v in eps.values() if isinstance(v, float)]
    top = "inf" if any(v == "inf" for v in eps.values()) else max(finite)
    return {
        "round": rnd,
        "epsilon": top,
        "delta": 1e-5,
        "per_client": {
            cid: {"epsilon": v, "noise_multiplier": 1.1, "sample_rate": 0.05, "steps": 20 * rnd,
                  "trained": True}
            for cid, v in eps.items()
        },
        "trained": sorted(eps),
        **metrics,
        "seconds": 0.3,
    }


def classification_report() -> dict:
    return {
        "config": {"dataset": "synthetic", "clients": 3, "target_epsilon": 8.0, "delta": 1e-5,
                   "secagg": True},
        "initial": {"loss": 1.1, "accuracy": 0.33},
        "rounds": [
            _row(1, {"hospital-0": 2.0, "hospital-1": 2.1, "hospital-2": 1.9},
                 loss=0.9, accuracy=0.55),
            # hospital-2 missed round 2's row entirely: a gap, not a zero
            _row(2, {"hospital-0": 3.5, "hospital-1": 3.6}, loss=0.7, accuracy=0.7),
            _row(3, {"hospital-0": 4.8, "hospital-1": 4.9, "hospital-2": 3.4},
                 loss=0.6, accuracy=0.78),
        ],
        "final": {"rounds_completed": 3, "epsilon": 4.9, "delta": 1e-5, "non_private": False},
    }


def regression_report() -> dict:
    return {
        "config": {"dataset": "diabetes", "clients": 2, "target_epsilon": 3.0, "delta": 1e-5},
        "initial": {"loss": 29000.0, "mse": 29000.0, "r2": -4.1},
        "rounds": [
            _row(1, {"hospital-0": 1.0, "hospital-1": 1.1}, loss=5000.0, mse=5000.0, r2=0.1),
            _row(2, {"hospital-0": 1.7, "hospital-1": 1.8}, loss=3500.0, mse=3500.0, r2=0.38),
        ],
        "final": {"rounds_completed": 2, "epsilon": 1.8, "non_private": False},
    }


def non_private_report() -> dict:
    return {
        # run-config spelling (flwr run): hyphenated keys
        "config": {"dataset": "breast-cancer", "clients": 2, "target-epsilon": 8.0},
        "initial": {"loss": 0.7, "accuracy": 0.5},
        "rounds": [
            _row(1, {"hospital-0": "inf", "hospital-1": "inf"}, loss=0.4, accuracy=0.9),
            _row(2, {"hospital-0": "inf", "hospital-1": "inf"}, loss=0.3, accuracy=0.93),
        ],
        "final": {"rounds_completed": 2, "epsilon": "inf", "non_private": True},
    }


def _png(path: Path) -> np.ndarray:
    """The PNG's pixels (RGBA floats); fails unless it is a real PNG."""
    import matplotlib.image as mpimg

    assert path.read_bytes()[:8] == PNG_SIGNATURE
    return mpimg.imread(path)


def _red_pixels(img: np.ndarray) -> int:
    r, g, b = img[..., 0], img[..., 1], img[..., 2]
    return int(np.sum((r > 0.6) & (g < 0.35) & (b < 0.35)))


def test_epsilon_series_reads_per_hospital_max_inf_and_gaps() -> None:
    rounds, series = epsilon_series(classification_report())
    assert rounds == [0, 1, 2, 3]
    assert set(series) == {"hospital-0", "hospital-1", "hospital-2", "max"}
    assert series["hospital-0"] == [0.0, 2.0, 3.5, 4.8]
    assert series["max"] == [0.0, 2.1, 3.6, 4.9]
    assert math.isnan(series["hospital-2"][2]) and series["hospital-2"][3] == 3.4
    _, inf_series = epsilon_series(non_private_report())
    assert inf_series["max"][0] == 0.0 and all(math.isinf(v) for v in inf_series["max"][1:])


def test_metric_series_detects_classification_and_regression() -> None:
    cls = metric_series(classification_report())
    assert cls.kind == "classification" and cls.primary_name == "accuracy"
    assert cls.rounds == [0, 1, 2, 3]
    assert cls.primary == [0.33, 0.55, 0.7, 0.78]  # starts from the initial model
    assert cls.secondary == [1.1, 0.9, 0.7, 0.6]
    reg = metric_series(regression_report())
    assert reg.kind == "regression" and reg.primary_name == "R²" and reg.secondary_name == "MSE"
    assert reg.primary == [-4.1, 0.1, 0.38]
    assert reg.secondary == [29000.0, 5000.0, 3500.0]


@pytest.mark.parametrize("make", [classification_report, regression_report, non_private_report])
def test_plot_run_writes_two_real_pngs(make, tmp_path) -> None:
    report = make()
    before = json.dumps(report, sort_keys=True)
    paths = plot_run(report, tmp_path / "out")
    assert paths == [tmp_path / "out" / "epsilon.png", tmp_path / "out" / "metric.png"]
    for path in paths:
        img = _png(path)
        assert img.shape[0] >= 400 and img.shape[1] >= 700  # 7.5 x 4.5 in at 110 dpi
        assert path.stat().st_size > 15_000  # axes, lines and text, not a blank canvas
        assert np.std(img[..., :3]) > 0.05
    assert json.dumps(report, sort_keys=True) == before  # plotting only reads the report


def test_non_private_epsilon_plot_is_flagged_in_red(tmp_path) -> None:
    private = classification_report()
    plain = non_private_report()
    private_red = _red_pixels(_png(plots.plot_epsilon(private, tmp_path / "p.png")))
    plain_red = _red_pixels(_png(plots.plot_epsilon(plain, tmp_path / "np.png")))
    # The NON-PRIVATE banner and the ∞ markers add far more red than the budget line alone.
    assert plain_red > private_red + 2000


def _untrained_report() -> dict:
    """Two rounds in which no update was averaged (every hospital dropped after
    training): epsilon spent, no model to show."""
    report = classification_report()
    report["rounds"] = report["rounds"][:2]
    for row in report["rounds"]:
        row["trained"] = []
        for key in ("loss", "accuracy"):
            row.pop(key)
    report["final"] = {"rounds_completed": 0, "model_trained": False, "epsilon": 3.6,
                       "delta": 1e-5, "non_private": False}
    return report


def _no_round_report() -> dict:
    return {"config": {"dataset": "synthetic"}, "initial": {"loss": 1.1, "accuracy": 0.3},
            "rounds": [], "final": {}}


@pytest.mark.parametrize(("make", "needle"), [
    (_no_round_report, "records no round"),
    (_untrained_report, "no round of the report averaged an update"),
])
def test_plot_run_and_bract_plot_refuse_a_report_with_nothing_trained(
        make, needle, tmp_path, capsys) -> None:
    """No plot of a model that was never trained: plot_run raises, `bract plot` says so
    in one line and exits non-zero, and no PNG is written."""
    with pytest.raises(ValueError, match=needle):
        plot_run(make(), tmp_path / "direct")
    path = tmp_path / "report.json"
    path.write_text(json.dumps(make()))
    assert main(["plot", str(path)]) == 2
    out = capsys.readouterr().out
    assert out.count("error:") == 1 and needle in " ".join(out.split())
    assert not list(tmp_path.rglob("*.png"))


def test_a_round_that_averaged_nothing_is_no_point_on_the_metric_plot() -> None:
    """Round 2 averaged nothing: its metric is a gap (even in a report that copied the
    previous model's figures into it), while its epsilon (spent) is drawn."""
    report = classification_report()
    report["rounds"][1]["trained"] = []
    m = metric_series(report)
    assert m.primary[:2] == [0.33, 0.55] and math.isnan(m.primary[2]) and m.primary[3] == 0.78
    _, series = epsilon_series(report)
    assert series["max"][2] == 3.6


def test_the_epsilon_plot_starts_at_what_each_hospital_carried_into_the_run() -> None:
    """A hospital whose data spent epsilon in earlier runs starts there, not at 0; one
    that carried nothing starts at 0; one whose carried epsilon is unknown (carried at
    another delta) starts with a gap, and so does the maximum."""
    report = classification_report()
    lines = report["rounds"][0]["per_client"]
    lines["hospital-0"].update(ledger_carried=1, epsilon_carried=1.5)
    lines["hospital-1"].update(ledger_carried=0, epsilon_carried=0.0)
    _, series = epsilon_series(report)
    assert series["hospital-0"][:2] == [1.5, 2.0]
    assert series["hospital-1"][0] == 0.0
    assert series["hospital-2"][0] == 0.0  # an older report: nothing carried, none recorded
    assert series["max"][0] == 1.5
    lines["hospital-2"].update(ledger_carried=2)  # carried, epsilon not known
    _, series = epsilon_series(report)
    assert math.isnan(series["hospital-2"][0]) and math.isnan(series["max"][0])


@pytest.mark.parametrize("bad", [[], {"config": {}}, {"rounds": "three"}, {"rounds": [1, 2]}])
def test_plot_run_rejects_what_is_not_a_report(bad, tmp_path) -> None:
    with pytest.raises(ValueError, match="report"):
        plot_run(bad, tmp_path)


def test_bract_plot_redraws_from_a_report_file(tmp_path, capsys) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "report.json").write_text(json.dumps(regression_report()))
    assert main(["plot", str(run / "report.json")]) == 0  # default: next to the report
    assert (run / "epsilon.png").is_file() and (run / "metric.png").is_file()
    assert main(["plot", str(run / "report.json"), "--out", str(tmp_path / "elsewhere")]) == 0
    _png(tmp_path / "elsewhere" / "metric.png")
    assert "elsewhere" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("content", "needle"),
    [(None, "does not exist"), ("{not json", "not valid JSON"), ('{"a": 1}', "not a bract report")],
)
def test_bract_plot_errors_are_clear(content, needle, tmp_path, capsys) -> None:
    path = tmp_path / "report.json"
    if content is not None:
        path.write_text(content)
    assert main(["plot", str(path)]) == 2
    out = " ".join(capsys.readouterr().out.split())
    assert "error:" in out and needle in out
    assert "Traceback" not in out


# ------------------------------------------------------- the federation's hook
def _finished_federation(tmp_path: Path):
    from bract.flower.server import Federation, ServerConfig

    cfg = ServerConfig(rounds=2, num_clients=2, delta=1e-5, out_dir=tmp_path,
                       show_progress=False, run_config={"dataset": "synthetic",
                                                        "target_epsilon": 4.0})
    fed = Federation(None, lambda w: {}, cfg)  # type: ignore[arg-type]
    fed.record.report["initial"] = {"loss": 1.0, "accuracy": 0.4}
    for rnd, eps in ((1, 1.5), (2, 2.5)):
        fed.record.add_round(RoundRow.from_plain(
            _row(rnd, {"hospital-0": eps, "hospital-1": eps - 0.1}, loss=1.0 / rnd,
                 accuracy=0.4 + 0.2 * rnd), f"round {rnd}"))
    fed.latest = {"hospital-0": HospitalRound(2.5, True), "hospital-1": HospitalRound(2.4, True)}
    fed.metrics = {"loss": 0.5, "accuracy": 0.8}
    return fed


def test_federation_finish_draws_plots_and_lists_them(tmp_path) -> None:
    report = _finished_federation(tmp_path)._finish()
    assert report["final"]["plots"] == [str(tmp_path / "epsilon.png"),
                                        str(tmp_path / "metric.png")]
    for p in report["final"]["plots"]:
        _png(Path(p))
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk["final"]["plots"] == report["final"]["plots"]


def test_a_plotting_failure_only_warns_and_keeps_the_report(tmp_path, monkeypatch, caplog) -> None:
    def broken(report, out_dir):
        raise RuntimeError("no fonts today")

    monkeypatch.setattr(plots, "plot_run", broken)
    with caplog.at_level(logging.WARNING):
        report = _finished_federation(tmp_path)._finish()
    assert "no fonts today" in caplog.text
    assert "plots" not in report["final"]
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk["final"]["rounds_completed"] == 2 and len(on_disk["rounds"]) == 2


def test_simulate_prints_the_plot_paths(tmp_path, monkeypatch, capsys) -> None:
    import bract.flower.simulation as simulation

    def fake_run(cfg, on_checked=None):
        return {"rounds": [{**_row(1, {"hospital-0": 1.0}, loss=0.5, accuracy=0.8),
                            "trained": ["hospital-0"]}],
                "final": {"rounds_completed": 1, "epsilon": 1.0, "delta": 1e-5,
                          "plots": [str(cfg.out_dir / "epsilon.png"),
                                    str(cfg.out_dir / "metric.png")]}}

    monkeypatch.setattr(simulation, "run", fake_run)
    code = main(["simulate", "--dataset", "breast-cancer", "--out", str(tmp_path),
                 "--no-progress"])
    out = " ".join(capsys.readouterr().out.split())
    assert code == 0
    assert f"plots: {tmp_path / 'epsilon.png'}, {tmp_path / 'metric.png'}" in out
