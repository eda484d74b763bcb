"""The comparative study: its plan, its summaries, its plots, and a real (small) study."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bract import compare, tasks
from bract.compare import Variant
from bract.flower.config import FederationConfig
from tests.tree import tree_snapshot

budgets = st.lists(
    st.floats(min_value=0.01, max_value=100, allow_nan=False, allow_infinity=False),
    min_size=1, max_size=5, unique=True,
)


@settings(max_examples=60, deadline=None)
@given(eps=budgets, include=st.sets(st.sampled_from(compare.VARIANT_KINDS), min_size=1))
def test_plan_has_one_arm_per_kind_and_budget_in_run_order(eps, include) -> None:
    variants = compare.plan_variants(eps, include=include)
    kinds = [v.kind for v in variants]
    # Arms run in VARIANT_KINDS order and only the kinds asked for are there.
    assert kinds == sorted(kinds, key=compare.VARIANT_KINDS.index)
    assert set(kinds) == set(include)
    # Every DP budget has exactly one arm, the secure arm takes the first budget.
    assert [v.target_epsilon for v in variants if v.kind == "dp"] == (
        [float(e) for e in eps] if "dp" in include else []
    )
    secure = [v for v in variants if v.kind == "dp-secagg"]
    assert [v.target_epsilon for v in secure] == ([float(eps[0])] if secure else [])
    assert all(v.secagg == (v.kind == "dp-secagg") for v in variants)
    # Non-private arms carry no budget; names (sub-folders) never collide.
    assert all((v.target_epsilon is None) == (v.kind in ("centralized", "fedavg"))
               for v in variants)
    assert len({v.name for v in variants}) == len(variants)


@pytest.mark.parametrize(
    ("epsilons", "kwargs", "message"),
    [
        ([], {}, "epsilon list is empty"),
        ([1.0, 1.0], {}, "listed twice"),
        ([0.0], {}, "finite number > 0"),
        ([math.inf], {}, "non-private baseline is the FedAvg variant"),
        ([-1.0], {}, "finite number > 0"),
        (["3"], {}, "must be a number"),
        ([1.0], {"include": ["dp", "local"]}, "unknown variant kind"),
        ([1.0], {"include": []}, "at least one variant kind"),
        ([1.0], {"secure_epsilon": math.nan}, "secure epsilon"),
    ],
)
def test_plan_rejects_bad_budgets_naming_the_problem(epsilons, kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        compare.plan_variants(epsilons, **kwargs)


def test_plan_with_only_a_secure_budget_needs_no_dp_list() -> None:
    variants = compare.plan_variants([], secure_epsilon=2.0, include=["dp-secagg"])
    assert [(v.kind, v.target_epsilon) for v in variants] == [("dp-secagg", 2.0)]


def _report(epsilons, seconds, accuracy, non_private=False) -> dict:
    rows = [
        {"round": i + 1, "epsilon": e, "accuracy": a, "loss": 1 - a, "seconds": s,
         "per_client": {}, "trained": ["hospital-0"]}
        for i, (e, s, a) in enumerate(zip(epsilons, seconds, accuracy, strict=True))
    ]
    return {
        "initial": {"accuracy": 0.5, "loss": 0.7},
        "rounds": rows,
        "final": {"rounds_completed": len(rows), "epsilon": epsilons[-1],
                  "non_private": non_private, "accuracy": accuracy[-1],
                  "loss": 1 - accuracy[-1]},
    }


def test_summary_reads_the_report_and_skips_rays_start_in_the_round_time() -> None:
    variant = Variant("dp-eps3", "FedAvg+DP ε=3", "dp", 3.0)
    row = compare.summarize_run(_report([1.0, 2.0, 2.9], [9.0, 2.0, 4.0], [0.6, 0.7, 0.8]),
                                variant)
    assert row["seconds_per_round"] == pytest.approx(3.0)  # rounds 2..R, not round 1
    assert row["first_round_seconds"] == 9.0
    assert row["epsilon"] == 2.9 and row["accuracy"] == 0.8
    assert row["series"]["round"] == [0, 1, 2, 3]
    assert row["series"]["epsilon"] == [0.0, 1.0, 2.0, 2.9]
    assert row["series"]["accuracy"] == [0.5, 0.6, 0.7, 0.8]  # from the initial model on
    json.dumps(row, allow_nan=False)  # the row is strict JSON


def test_summary_of_a_non_private_run_says_so_in_strict_json() -> None:
    variant = Variant("fedavg", "FedAvg (non-private)", "fedavg")
    row = compare.summarize_run(_report(["inf", "inf"], [5.0, 1.0], [0.6, 0.9], True), variant)
    assert row["epsilon"] == "inf" and row["non_private"] is True
    assert row["series"]["epsilon"] == [0.0, "inf", "inf"]
    assert row["seconds_per_round"] == 1.0
    json.dumps(row, allow_nan=False)


def _study(task: str = "classification") -> dict:
    metric = "r2" if task == "regression" else "accuracy"
    second = "mse" if task == "regression" else "loss"

    def row(name, label, kind, target, eps, values, secagg=False):
        return {
            "name": name, "label": label, "kind": kind, "target_epsilon": target,
            "secagg": secagg, "epsilon": eps, metric: values[-1], second: 1 - values[-1],
            "non_private": eps == "inf", "seconds_per_round": 1.5, "wall_seconds": 20.0,
            "stopped": {},
            "series": {"round": [0, 1, 2], "epsilon": [0.0, eps if eps == "inf" else eps / 2, eps],
                       metric: values, second: [1 - v for v in values]},
        }

    return {
        "config": {"dataset": "breast-cancer", "clients": 5, "rounds": 2, "partition": "dirichlet",
                   "alpha": 0.5, "delta": 1e-5, "seed": 0, "accountant": "prv",
                   "n_train": 455, "n_test": 114},
        "task": task, "metric": metric,
        "centralized": {"name": "centralized", "label": "centralized (scikit-learn)",
                        metric: 0.97, second: 0.08, "seconds": 0.1},
        "variants": [
            row("fedavg", "FedAvg (non-private)", "fedavg", None, "inf", [0.5, 0.9, 0.95]),
            row("dp-eps1", "FedAvg+DP ε=1", "dp", 1.0, 0.99, [0.5, 0.7, 0.8]),
            row("dp-eps3", "FedAvg+DP ε=3", "dp", 3.0, 2.98, [0.5, 0.8, 0.9]),
            row("dp-secagg-eps3", "FedAvg+DP+SecAgg ε=3", "dp-secagg", 3.0, 2.98,
                [0.5, 0.8, 0.9], secagg=True),
        ],
    }


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_plots_are_pngs_and_the_table_flags_the_non_private_run(tmp_path, task) -> None:
    study = _study(task)
    paths = compare.plot_comparison(study, tmp_path)
    assert [p.name for p in paths] == [compare.METRIC_VS_ROUND_PNG, compare.EPSILON_VS_ROUND_PNG,
                                       compare.UTILITY_VS_EPSILON_PNG]
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
    study["plots"] = [str(p) for p in paths]
    md = compare.comparison_markdown(study)
    lines = [line for line in md.splitlines() if line.startswith("| ")]
    assert len(lines) == 2 + 1 + 4  # header, rule, centralized, four federated arms
    fedavg = next(line for line in lines if "FedAvg (non-private)" in line)
    assert "∞ (NON-PRIVATE)" in fedavg
    dp1 = next(line for line in lines if "FedAvg+DP ε=1 " in line)
    assert "| 0.990 |" in dp1
    assert ("R²" if task == "regression" else "accuracy") in lines[0]
    assert f"![utility_vs_epsilon]({compare.UTILITY_VS_EPSILON_PNG})" in md


def test_centralized_baseline_is_the_tasks_baseline_for_tabular_data() -> None:
    ds = tasks.dataset_for(tasks.TaskConfig.for_dataset("diabetes", clients=3))
    row = compare.centralized_baseline(ds)
    expected = tasks.centralized_baseline(ds)
    assert row["model"] == "LinearRegression"
    assert {k: row[k] for k in expected} == pytest.approx(expected)


def test_centralized_baseline_on_images_learns_the_synthetic_xrays() -> None:
    ds = tasks.dataset_for(tasks.TaskConfig.for_dataset("synthetic", clients=3, n_samples=600,
                                                        image_size=16))
    row = compare.centralized_baseline(ds)
    assert row["model"].startswith("LogisticRegression")
    assert row["accuracy"] > 1 / 3 + 0.15  # well above chance on 3 classes
    assert math.isfinite(row["loss"]) and row["loss"] > 0


def test_bad_study_settings_fail_before_any_training(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"rounds=0: must be an integer >= 1"):
        compare.run_comparison(FederationConfig(dataset="breast-cancer", rounds=0,
                                                out=tmp_path), show_progress=False)
    with pytest.raises(ValueError, match=r"delta=2.0: must be a finite number > 0 and < 1"):
        compare.run_comparison(FederationConfig(dataset="breast-cancer", delta=2.0,
                                                out=tmp_path), show_progress=False)
    with pytest.raises(ValueError, match=r"empty partition|fewer hospitals"):
        compare.run_comparison(FederationConfig(dataset="breast-cancer", clients=1000,
                                                out=tmp_path, secagg=False),
                               show_progress=False)
    assert not (tmp_path / compare.COMPARE_JSON).exists()


@pytest.mark.parametrize(("argv", "needle"), [
    (["--epsilons", "3", "3"], "listed twice"),
    (["--clients", "500"], "empty partition"),
    (["--dataset", "medmnist", "--data-path", "missing.npz"], "MedMNIST file not found"),
])
def test_cli_refused_settings_write_nothing_not_even_out(tmp_path, monkeypatch, capsys, argv,
                                                         needle) -> None:
    """Refused settings (exit 2, one error line) leave no --out behind, not even an
    empty folder: it is made only once every arm's settings are checked."""
    from bract.cli import main

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "study" / "here"
    assert main(["compare", *argv, "--out", str(out), "--no-progress"]) == 2
    assert needle in " ".join(capsys.readouterr().out.split())
    assert not (tmp_path / "study").exists()


def test_a_refused_study_leaves_an_earlier_one_where_it_was(tmp_path, monkeypatch,
                                                           capsys) -> None:
    """A model the task cannot build (an image side the CNN cannot pool) is refused
    with every other setting, before an earlier study in --out is moved aside or a
    new compare.json written: the folder is left exactly as it was."""

    import flwr.simulation

    from bract.cli import main

    def started(*args, **kwargs):
        raise AssertionError("an arm started: the study was not refused up front")

    monkeypatch.setattr(flwr.simulation, "run_simulation", started)
    out = tmp_path / "study"
    (out / "dp-eps1").mkdir(parents=True)
    (out / compare.COMPARE_JSON).write_text("{}")
    (out / "dp-eps1" / "ledger.jsonl").write_text("{}\n")

    before = tree_snapshot(tmp_path)
    assert main(["compare", "--dataset", "synthetic", "--image-size", "30", "--out", str(out),
                 "--no-progress"]) == 2
    assert "multiple of 4" in " ".join(capsys.readouterr().out.split())
    assert tree_snapshot(tmp_path) == before


def test_one_round_has_no_time_per_round_and_the_table_says_n_a() -> None:
    """s/round averages rounds 2..R (round 1 also starts Ray): with one round there is
    none, so compare.json holds null and the table n/a, never round 1's time."""
    variant = Variant("dp-eps3", "FedAvg+DP ε=3", "dp", 3.0)
    row = compare.summarize_run(_report([2.9], [41.0], [0.8]), variant)
    assert row["seconds_per_round"] is None and row["first_round_seconds"] == 41.0
    json.dumps(row, allow_nan=False)
    study = _study()
    study["variants"] = [{**row, "wall_seconds": 45.0}]
    line = next(line for line in compare.comparison_markdown(study).splitlines()
                if line.startswith("| FedAvg+DP ε=3"))
    assert "| n/a |" in line and "41" not in line


def test_cli_rejects_a_non_positive_budget_with_a_clear_message() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bract.cli", "compare", "--epsilons", "0"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "epsilon must be a finite number > 0" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_budgets_that_print_alike_still_get_their_own_arm() -> None:
    """Found by the property above: 100 and 99.99999999999999 both printed as
    'dp-eps100', so two arms would have shared one output folder."""
    names = [v.name for v in compare.plan_variants([100.0, 99.99999999999999],
                                                    include={"dp"})]
    assert len(set(names)) == 2 and names[0] != names[1]
    assert [v.name for v in compare.plan_variants([1.0, 3.0], include={"dp"})] == [
        "dp-eps1", "dp-eps3"]


def _arm_report(aggregated: bool, failed: dict[str, str] | None = None) -> dict:
    """A finished arm's report: one round that averaged an update, or one in which every
    hospital trained and then dropped (nothing averaged, as a mask-stage dropout)."""
    line = {"epsilon": 7.98, "trained": True, "steps": 8, "ledger_carried": 0}
    row = {"round": 1, "epsilon": 7.98, "delta": 1e-5, "seconds": 1.0,
           "per_client": {f"hospital-{i}": line for i in range(3)},
           "trained": [f"hospital-{i}" for i in range(3)] if aggregated else [],
           "failed": failed or {}}
    final = {"rounds_completed": 1 if aggregated else 0, "model_trained": aggregated,
             "epsilon": 7.98, "delta": 1e-5, "non_private": False, "stopped": {}}
    if aggregated:
        row.update(loss=0.3, accuracy=0.92)
        final.update(loss=0.3, accuracy=0.92)
    return {"config": {}, "initial": {"loss": 0.67, "accuracy": 0.64}, "rounds": [row],
            "final": final}


def test_an_arm_that_averaged_nothing_fails_the_study_and_reports_no_figure(
        tmp_path, monkeypatch, capsys) -> None:
    """The secure arm's hospitals all drop after training: the study still writes its
    files, but that arm's row says failed with the reason and no figure, the plots leave
    it out, and `bract compare` ends with one error line naming it, exit 1."""
    import bract.flower.simulation as simulation
    from bract.cli import main

    dropped = {f"hospital-{i}": "dropped from secure aggregation at the mask stage: "
               "InjectedDropoutError" for i in range(3)}

    def fake_run(cfg):
        return _arm_report(not cfg.federation.secagg, None if not cfg.federation.secagg
                           else dropped)

    monkeypatch.setattr(simulation, "run", fake_run)
    monkeypatch.setattr(simulation, "validate", lambda cfg: None)
    out = tmp_path / "study"
    code = main(["compare", "--dataset", "breast-cancer", "--clients", "3", "--rounds", "1",
                 "--epsilons", "8", "--no-progress", "--out", str(out)])
    text = capsys.readouterr().out
    assert code == 1
    errors = [line for line in text.splitlines() if "error:" in line]
    assert len(errors) == 1
    said = " ".join(text[text.index("error:"):].split())
    assert "arm FedAvg+DP+SecAgg ε=8 (dp-secagg-eps8) failed: no hospital's update was " \
           "averaged in any round" in said
    study = json.loads((out / compare.COMPARE_JSON).read_text())
    secure = next(v for v in study["variants"] if v["kind"] == "dp-secagg")
    assert secure["failed"].startswith("no hospital's update was averaged in any round")
    assert not {"accuracy", "loss", "epsilon", "series"} & set(secure)
    assert all("accuracy" in v for v in study["variants"] if v["kind"] != "dp-secagg")
    md = (out / compare.COMPARE_MD).read_text()
    row = next(line for line in md.splitlines() if line.startswith("| FedAvg+DP+SecAgg"))
    assert "| failed |" in row and "0.92" not in row and "7.98" not in row
    assert "**The study failed.**" in md
    assert all((out / name).is_file() for name in (
        compare.METRIC_VS_ROUND_PNG, compare.EPSILON_VS_ROUND_PNG,
        compare.UTILITY_VS_EPSILON_PNG))


@pytest.mark.parametrize(("report", "needle"), [
    (_arm_report(True), None),
    (_arm_report(False), "no hospital's update was averaged in any round"),
    (_arm_report(True, {"hospital-1": "failed: boom"}), "hospital-1 failed in round 1: boom"),
    ({**_arm_report(True), "final": {}}, "the run did not finish"),
])
def test_arm_failure_names_why_an_arm_failed(report, needle) -> None:
    why = compare.arm_failure(report)
    assert why is None if needle is None else needle in why
