"""The comparative study: centralized vs federated vs private vs private and secure.

:func:`run_comparison` trains, on one dataset and one train/test split:

* **centralized**: a non-private scikit-learn model on the pooled training split
  (logistic regression for classification, on flattened pixels for images;
  linear regression for regression), the reference a hospital would get by
  pooling every patient's record in one place;
* **FedAvg**: the same federation of hospitals without noise (noise multiplier 0,
  plain aggregation), flagged NON-PRIVATE (epsilon infinite);
* **FedAvg+DP** at every epsilon of ``epsilons`` (DP-SGD on every hospital,
  noise calibrated to the budget, plain aggregation);
* **FedAvg+DP+SecAgg** at the main epsilon (DP-SGD and bract's secure
  aggregation).

Every federated variant is one ``bract simulate`` run (its ``report.json``,
signed ledger and plots in ``OUT/<variant>/``); the study writes
``OUT/compare.json``, ``OUT/compare.md`` and three PNGs (metric per round,
epsilon per round, utility against epsilon). The table reports the global
model's metric on the central test set, the final epsilon the hospitals'
accountants reported (the maximum over hospitals) and the time per round.

The study adds no privacy claim of its own: each federated run's epsilon comes
from its report and can be re-checked with ``bract audit verify`` on its ledger.

An arm whose run failed (a hospital's failure, a round that averaged nothing while
hospitals took part, no round that averaged an update, or a run that did not
finish) is a failed arm: the study still runs the other arms and writes its files,
but the failed arm's row holds only its reason (``failed``), no figure, and it is
left out of the plots; :func:`run_comparison` then raises :class:`ComparisonError`
naming it (``bract compare`` prints one ``error:`` line and exits 1).
Times are wall-clock on whatever machine ran it (the first round holds Ray's
start, so the per-round figure averages rounds 2..R, and a one-round study has none:
n/a). Drawing uses the Agg canvas.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from bract.argtypes import positive_float
from bract.flower.config import FederationConfig
from bract.records.report import RunReport

__all__ = [
    "COMPARE_JSON",
    "COMPARE_MD",
    "EPSILON_VS_ROUND_PNG",
    "METRIC_VS_ROUND_PNG",
    "UTILITY_VS_EPSILON_PNG",
    "VARIANT_KINDS",
    "ComparisonError",
    "Variant",
    "add_compare_parser",
    "arm_failure",
    "centralized_baseline",
    "comparison_markdown",
    "comparison_table",
    "plan_variants",
    "plot_comparison",
    "run_comparison",
    "summarize_run",
]

COMPARE_JSON = "compare.json"
COMPARE_MD = "compare.md"
METRIC_VS_ROUND_PNG = "metric_vs_round.png"
EPSILON_VS_ROUND_PNG = "epsilon_vs_round.png"
UTILITY_VS_EPSILON_PNG = "utility_vs_epsilon.png"

#: The kinds of variant a study can hold, in the order they run.
VARIANT_KINDS = ("centralized", "fedavg", "dp", "dp-secagg")
#: Datasets the study accepts (those of :mod:`bract.tasks`; a test keeps them in step).

_INF_COLOR = "#c62828"
_CENTRAL_COLOR = "#424242"
_FEDAVG_COLOR = "#1565c0"
_SECAGG_COLOR = "#2e7d32"


class ComparisonError(RuntimeError):
    """The study ran, but an arm failed: its files are written with that arm marked
    failed (no figure of it); ``result`` is the study as written to compare.json."""

    def __init__(self, message: str, result: dict[str, Any]) -> None:
        super().__init__(message)
        self.result = result


@dataclass(frozen=True)
class Variant:
    """One arm of the study: its name (also its sub-folder), label and settings.

    ``target_epsilon`` is ``None`` for the non-private arms (centralized, FedAvg).
    """

    name: str
    label: str
    kind: str
    target_epsilon: float | None = None
    secagg: bool = False


def _eps_text(eps: float) -> str:
    return f"{eps:g}"


def _distinct_texts(values: Sequence[float]) -> list[str]:
    """The budgets as short texts (``%g``), with as many digits as it takes for
    distinct budgets to get distinct texts (arm names are sub-folders)."""
    for digits in range(6, 18):
        texts = [f"{v:.{digits}g}" for v in values]
        if len(set(texts)) == len(texts):
            return texts
    return [repr(float(v)) for v in values]


def plan_variants(
    epsilons: Sequence[float],
    secure_epsilon: float | None = None,
    include: Iterable[str] = VARIANT_KINDS,
) -> list[Variant]:
    """The study's variants, in the order they run.

    ``epsilons`` are the FedAvg+DP budgets (each a finite number > 0, no repeats);
    ``secure_epsilon`` (default: the first of ``epsilons``) is the budget of the
    FedAvg+DP+SecAgg arm; ``include`` picks which kinds of :data:`VARIANT_KINDS`
    run. Raises ValueError naming the problem for an empty or invalid budget list
    or an unknown kind.
    """
    include = tuple(include)
    unknown = [k for k in include if k not in VARIANT_KINDS]
    if unknown:
        raise ValueError(f"unknown variant kind(s) {unknown}; choose from {list(VARIANT_KINDS)}")
    if not include:
        raise ValueError(f"choose at least one variant kind from {list(VARIANT_KINDS)}")
    eps = [_check_epsilon(e, "epsilon") for e in epsilons]
    needs_eps = "dp" in include or ("dp-secagg" in include and secure_epsilon is None)
    if needs_eps and not eps:
        raise ValueError(
            "the epsilon list is empty: give at least one budget, e.g. --epsilons 1 3 8"
        )
    repeated = sorted({e for e in eps if eps.count(e) > 1})
    if repeated:
        raise ValueError(f"epsilon(s) {[_eps_text(e) for e in repeated]} are listed twice")
    secure = _check_epsilon(secure_epsilon, "secure epsilon") if secure_epsilon is not None else (
        eps[0] if eps else None
    )
    variants: list[Variant] = []
    if "centralized" in include:
        variants.append(Variant("centralized", "centralized (scikit-learn)", "centralized"))
    if "fedavg" in include:
        variants.append(Variant("fedavg", "FedAvg (non-private)", "fedavg"))
    if "dp" in include:
        variants += [Variant(f"dp-eps{text}", f"FedAvg+DP ε={text}", "dp", e)
                     for e, text in zip(eps, _distinct_texts(eps), strict=True)]
    if "dp-secagg" in include and secure is not None:
        variants.append(Variant(f"dp-secagg-eps{_eps_text(secure)}",
                                f"FedAvg+DP+SecAgg ε={_eps_text(secure)}", "dp-secagg",
                                secure, secagg=True))
    return variants


def _check_epsilon(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{what} must be a number > 0, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(
            f"{what} must be a finite number > 0, got {value!r} (the non-private baseline "
            "is the FedAvg variant; do not list it as a budget)"
        )
    return float(value)


# ------------------------------------------------------------------ centralized baseline
def centralized_baseline(ds: Any) -> dict[str, Any]:
    """A centralized, non-private scikit-learn model on ``ds``'s pooled training split,
    scored on its central test set with the federated runs' metric names.

    Tabular data: :func:`bract.tasks.centralized_baseline` (LogisticRegression /
    LinearRegression). Images: LogisticRegression(max_iter=1000) on the flattened
    pixels. Returns the metrics plus ``"model"`` (the estimator's name) and
    ``"seconds"`` (fit and scoring time). No privacy: every record is pooled.
    """
    from bract import tasks

    t0 = time.perf_counter()
    if len(ds.input_shape) == 1:
        metrics: dict[str, Any] = dict(tasks.centralized_baseline(ds))
        model = "LinearRegression" if ds.task == "regression" else "LogisticRegression"
    else:
        import numpy as np
        from sklearn.linear_model import LogisticRegression
        from sklearn.metrics import log_loss

        x_train = ds.x_train.reshape(len(ds.x_train), -1)
        x_test = ds.x_test.reshape(len(ds.x_test), -1)
        clf = LogisticRegression(max_iter=1000).fit(x_train, ds.y_train)
        proba = clf.predict_proba(x_test)
        # predict_proba's columns are clf.classes_; spread them over every class index.
        full = np.zeros((len(x_test), ds.num_classes), dtype=proba.dtype)
        full[:, clf.classes_] = proba
        metrics = {
            "loss": float(log_loss(ds.y_test, full, labels=list(range(ds.num_classes)))),
            "accuracy": float(np.mean(clf.predict(x_test) == ds.y_test)),
        }
        model = "LogisticRegression (flattened pixels)"
    return {**metrics, "model": model, "seconds": time.perf_counter() - t0}


# ---------------------------------------------------------------------- run summaries
def _number(value: Any) -> float:
    """A report value as a float (``"inf"`` -> inf; missing -> nan)."""
    if isinstance(value, bool) or value is None:
        return math.nan
    if isinstance(value, (int, float)):
        return float(value)
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _json_number(value: float) -> float | str | None:
    """inf as ``"inf"`` (as in report.json), nan as null, else the float."""
    if math.isnan(value):
        return None
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return value


def arm_failure(report: Mapping[str, Any] | RunReport, name: str = "the run") -> str | None:
    """Why a federated arm's run failed, in one line, or ``None`` when it did what was
    asked: it finished, some round averaged an update, and its report records no error
    (:meth:`bract.records.report.RunReport.errors`; a hospital stopped by its budget
    is not one)."""
    typed = report if isinstance(report, RunReport) else RunReport.from_plain(
        report, f"{name}'s report")
    if typed.final is None:
        return "the run did not finish"
    errors = typed.errors()
    if not any(row.aggregated for row in typed.rounds):
        return errors[0] if errors else "no round averaged an update"
    return "; ".join(errors) if errors else None


def failed_row(variant: Variant, reason: str) -> dict[str, Any]:
    """A failed arm's row of the study: who it is and why it failed, no figure."""
    return {"name": variant.name, "label": variant.label, "kind": variant.kind,
            "target_epsilon": variant.target_epsilon, "secagg": variant.secagg,
            "failed": reason}


def _reported(result: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The arms whose figures the study reports (every arm that did not fail)."""
    return [v for v in result.get("variants", []) if not v.get("failed")]


def summarize_run(report: Mapping[str, Any], variant: Variant) -> dict[str, Any]:
    """One federated variant's row of the study, read from its ``report.json``.

    Holds the final metrics (accuracy and cross-entropy, or R² and MSE), the final
    epsilon (``"inf"`` when non-private), ``seconds_per_round`` (mean of rounds
    2..R; ``None`` for a one-round run, whose only round also holds Ray's start),
    ``first_round_seconds``, and per-round series (round 0 = initial model, and the
    largest epsilon a hospital carried into the run).
    """
    typed = RunReport.from_plain(report, f"{variant.name}'s report")
    rows = typed.rounds
    final = typed.final
    if final is None:
        raise ValueError(f"{variant.name}'s report has no final summary: the run did not finish")
    seconds = [r.seconds for r in rows]
    finite = [s for s in seconds[1:] if math.isfinite(s)]  # round 1 also starts Ray
    points = [typed.initial, *(r.metrics for r in rows)]
    keys = ("accuracy", "loss", "r2", "mse")
    series = {k: [_json_number(_number(p.get(k))) for p in points] for k in keys
              if any(k in p for p in points)}
    out: dict[str, Any] = {
        "name": variant.name,
        "label": variant.label,
        "kind": variant.kind,
        "target_epsilon": variant.target_epsilon,
        "secagg": variant.secagg,
        "rounds_completed": final.rounds_completed,
        "epsilon": _json_number(typed.final_epsilon),
        "non_private": final.non_private,
        "seconds_per_round": sum(finite) / len(finite) if finite else None,
        "first_round_seconds": _json_number(seconds[0]) if seconds else None,
        "series": {
            "round": [0, *[r.round for r in rows]],
            "epsilon": [_json_number(typed.starting_epsilon),
                        *[_json_number(r.epsilon) for r in rows]],
            **series,
        },
        "stopped": dict(final.stopped),
    }
    for key in keys:
        if key in final.metrics:
            out[key] = _json_number(final.metrics[key])
    return out


# ------------------------------------------------------------------------ the study
def run_comparison(
    federation: FederationConfig,
    epsilons: Sequence[float] = (1.0, 3.0, 8.0),
    *,
    secure_epsilon: float | None = None,
    include: Iterable[str] = VARIANT_KINDS,
    show_progress: bool = True,
    console: Any = None,
) -> dict[str, Any]:
    """Run the study (see the module docstring) and write its results to ``federation.out``.

    ``federation`` holds the data, split, model and training every variant shares
    (its budget, noise and secure-aggregation settings are each variant's own).
    Every variant uses the same data, split, partition between hospitals, seed
    and model initialisation; only noise and aggregation differ. Returns the
    study as a dict (also ``out/compare.json``) with ``config``, ``task``
    (classification or regression), ``metric``, ``centralized`` and ``variants``
    (one :func:`summarize_run` row per federated run) and ``plots``.

    Raises ValueError naming the problem (and the fix) for bad settings before
    any training starts. A federated arm that fails (:func:`arm_failure`, or a run
    that raises RuntimeError) does not stop the study: its row holds only
    ``failed`` (the reason) and no figure, it is left out of the table's figures
    and the plots, and once every file is written :class:`ComparisonError` names
    every failed arm.
    """
    from rich.console import Console

    from bract import tasks
    from bract.flower.run_dir import holds_run, set_aside_previous_run
    from bract.flower.simulation import SimulationConfig, run, validate

    console = console or Console()
    variants = plan_variants(epsilons, secure_epsilon, include)
    out_dir = Path(federation.out)
    task = federation.task()
    ds = tasks.dataset_for(task)
    regression = ds.task == "regression"
    metric = "r2" if regression else "accuracy"

    def simulation(variant: Variant) -> SimulationConfig:
        non_private = variant.target_epsilon is None
        fed = replace(
            federation, target_epsilon=variant.target_epsilon or max([*epsilons, 1.0]),
            noise_multiplier=0.0 if non_private else None, secagg=variant.secagg,
            release_metrics="none", out=out_dir / variant.name,
        )
        return SimulationConfig(federation=fed, show_progress=show_progress,
                                extra={"compare_variant": variant.name})

    federated = [v for v in variants if v.kind != "centralized"]
    configs = {v.name: simulation(v) for v in federated}
    for cfg in configs.values():  # every variant's settings, checked before any run
        validate(cfg)  # PrivacyError / DataError are ValueErrors naming the problem
    # An earlier study here is moved aside whole (its runs' ledgers are never deleted).
    set_aside_previous_run(out_dir, "archive", holds=(out_dir / COMPARE_JSON).exists() or any(
        holds_run(c.out_dir) for c in configs.values()))

    f = federation
    config = {
        "dataset": f.dataset, "clients": f.clients, "rounds": f.rounds,
        "epsilons": [float(e) for e in epsilons],
        "secure_epsilon": next((v.target_epsilon for v in variants if v.secagg), None),
        "partition": f.partition, "alpha": f.alpha, "seed": f.seed, "delta": f.delta,
        "data_path": task.data_path or None, "image_size": f.image_size,
        "samples": f.samples, "batch_size": task.batch_size, "lr": task.lr,
        "momentum": task.momentum, "local_epochs": f.local_epochs,
        "max_grad_norm": f.max_grad_norm, "accountant": f.accountant,
        "n_train": int(ds.n_train), "n_test": len(ds.y_test),
        "variants": [v.name for v in variants],
    }
    result: dict[str, Any] = {
        "config": config, "task": ds.task, "metric": metric, "centralized": None,
        "variants": [],
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    total = len(variants)
    for i, variant in enumerate(variants, start=1):
        heading = f"[{i}/{total}] {variant.label}"
        if show_progress:
            console.rule(f"[bold]{heading}")
        else:
            console.print(heading)
        t0 = time.perf_counter()
        if variant.kind == "centralized":
            result["centralized"] = {"name": variant.name, "label": variant.label,
                                     **centralized_baseline(ds)}
            row = result["centralized"]
        else:
            try:
                report = run(configs[variant.name])
                failure = arm_failure(report, variant.name)
            except RuntimeError as exc:  # the run did not finish
                failure = str(exc)
            row = (summarize_run(report, variant) if failure is None
                   else failed_row(variant, failure))
            row["wall_seconds"] = time.perf_counter() - t0
            row["out"] = str(out_dir / variant.name)
            result["variants"].append(row)
        console.print(f"{heading}: {_metric_text(row, metric)}"
                      f" ({time.perf_counter() - t0:.1f} s)")
        _write_json(result, out_dir)  # partial results survive an interrupted study
    result["plots"] = [str(p) for p in plot_comparison(result, out_dir)]
    _write_json(result, out_dir)
    (out_dir / COMPARE_MD).write_text(comparison_markdown(result), encoding="utf-8")
    console.print(comparison_table(result))
    console.print(f"wrote {out_dir / COMPARE_JSON}, {out_dir / COMPARE_MD} and "
                  + ", ".join(Path(p).name for p in result["plots"]))
    failed = [v for v in result["variants"] if v.get("failed")]
    if failed:
        raise ComparisonError(
            "; ".join(f"arm {v['label']} ({v['name']}) failed: {v['failed']}" for v in failed)
            + "; its figures are left out of the study (each run's record is in "
            + ", ".join(str(v["out"]) for v in failed) + ")", result)
    return result


def _write_json(result: Mapping[str, Any], out_dir: Path) -> None:
    (out_dir / COMPARE_JSON).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


def _metric_text(row: Mapping[str, Any], metric: str) -> str:
    if row.get("failed"):
        return f"failed: {row['failed']}"
    value = _number(row.get(metric))
    name = "R²" if metric == "r2" else metric
    return f"{name} {value:.3f}" if math.isfinite(value) else f"{name} -"


# ------------------------------------------------------------------------- the table
def _rows(result: Mapping[str, Any]) -> list[list[str]]:
    """The table's cells: variant, metric, secondary metric, final ε, s/round, total s."""
    metric = result["metric"]
    secondary = "mse" if metric == "r2" else "loss"
    rows = []
    central = result.get("centralized")
    if central:
        rows.append([central["label"], _fmt(central.get(metric)), _fmt(central.get(secondary)),
                     "n/a (not federated)", "n/a", f"{_number(central.get('seconds')):.2f}"])
    for v in result.get("variants", []):
        if v.get("failed"):  # no figure of an arm that failed
            rows.append([v["label"], "failed", "-", "-", "-", _fmt(v.get("wall_seconds"), 1)])
            continue
        eps = _number(v.get("epsilon"))
        eps_text = "∞ (NON-PRIVATE)" if math.isinf(eps) else _fmt(eps, 3)
        if v.get("stopped"):
            eps_text += f" (stopped: {', '.join(sorted(v['stopped']))})"
        rows.append([v["label"], _fmt(v.get(metric)), _fmt(v.get(secondary)), eps_text,
                     _fmt(v.get("seconds_per_round"), 2, missing="n/a"),
                     _fmt(v.get("wall_seconds"), 1)])
    return rows


def _headers(result: Mapping[str, Any]) -> list[str]:
    regression = result["metric"] == "r2"
    return ["variant", "R²" if regression else "accuracy", "MSE" if regression else "cross-entropy",
            "final ε", "s/round", "total s"]


def _fmt(value: Any, digits: int = 4, missing: str = "-") -> str:
    """``digits`` decimals (one for values >= 1000, e.g. an MSE); ``missing`` when missing."""
    x = _number(value)
    if math.isnan(x):
        return missing
    if math.isinf(x):
        return "∞"
    return f"{x:.1f}" if abs(x) >= 1000 else f"{x:.{digits}f}"


def comparison_table(result: Mapping[str, Any]) -> Any:
    """The study as a rich Table (utility, secondary metric, final ε, time per round)."""
    from rich.table import Table

    cfg = result["config"]
    table = Table(title=(
        f"{cfg['dataset']}: {cfg['clients']} hospitals, {cfg['rounds']} rounds, "
        f"{cfg['partition']} partition, δ={cfg['delta']:g}, seed {cfg['seed']}"
    ))
    for i, header in enumerate(_headers(result)):
        table.add_column(header, justify="left" if i == 0 else "right")
    for row in _rows(result):
        style = "red" if "NON-PRIVATE" in row[3] or row[1] == "failed" else None
        table.add_row(*row, style=style)
    return table


def comparison_markdown(result: Mapping[str, Any]) -> str:
    """The study as Markdown: settings, the table and the plots' file names."""
    cfg = result["config"]
    lines = [
        f"# Comparison on {cfg['dataset']}",
        "",
        f"{cfg['clients']} hospitals, {cfg['rounds']} rounds, partition {cfg['partition']}"
        + (f" (alpha {cfg['alpha']:g})" if cfg["partition"] in ("dirichlet", "quantity") else "")
        + f", delta {cfg['delta']:g}, seed {cfg['seed']}, accountant {cfg['accountant']}; "
        f"{cfg['n_train']} training and {cfg['n_test']} central test examples.",
        "",
        "| " + " | ".join(_headers(result)) + " |",
        "| " + " | ".join(["---"] + ["---:"] * (len(_headers(result)) - 1)) + " |",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in _rows(result)]
    failed = [v for v in result.get("variants", []) if v.get("failed")]
    if failed:
        lines += ["", "**The study failed.** Arms that failed report no figure and are not "
                  "in the plots:", ""]
        lines += [f"* {v['label']}: {v['failed']}" for v in failed]
    lines += [
        "",
        "Final ε: the largest epsilon any hospital's accountant reported after the last round "
        f"(at δ = {cfg['delta']:g}); ∞: no noise. s/round: mean wall time of rounds 2..R "
        "(round 1 also starts Ray; n/a with one round); total s: the whole run (calibration "
        "and start included; for the centralized model, fit and scoring).",
        "",
    ]
    lines += [f"![{Path(p).stem}]({Path(p).name})" for p in result.get("plots", [])]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------- the plots
def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _integer_ticks() -> Any:
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator(integer=True)


def _colors(n: int) -> list[Any]:
    import matplotlib

    cmap = matplotlib.colormaps["plasma"]
    return [cmap(0.15 + 0.6 * i / max(n - 1, 1)) for i in range(n)]


def _variant_styles(variants: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    dp = [v for v in variants if v["kind"] == "dp"]
    styles = {v["name"]: {"color": c, "marker": "o"} for v, c in zip(dp, _colors(len(dp)),
                                                                      strict=True)}
    for v in variants:
        if v["kind"] == "fedavg":
            styles[v["name"]] = {"color": _FEDAVG_COLOR, "marker": "s"}
        elif v["kind"] == "dp-secagg":
            styles[v["name"]] = {"color": _SECAGG_COLOR, "marker": "D", "linestyle": "--"}
    return styles


def _subtitle(result: Mapping[str, Any]) -> str:
    cfg = result["config"]
    return f"{cfg['dataset']}, {cfg['clients']} hospitals, {cfg['partition']} partition"


def plot_comparison(result: Mapping[str, Any], out_dir: Path | str) -> list[Path]:
    """Write metric_vs_round.png, epsilon_vs_round.png and utility_vs_epsilon.png.

    Reads the study only. An infinite epsilon (FedAvg) is never drawn as a
    number: it is a red marker on the top edge labelled ε = ∞. A failed arm (its row
    holds ``failed``) is not drawn.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return [
        _plot_metric_vs_round(result, out_dir / METRIC_VS_ROUND_PNG),
        _plot_epsilon_vs_round(result, out_dir / EPSILON_VS_ROUND_PNG),
        _plot_utility_vs_epsilon(result, out_dir / UTILITY_VS_EPSILON_PNG),
    ]


def _names(result: Mapping[str, Any]) -> tuple[str, str, str, str]:
    if result["metric"] == "r2":
        return "r2", "R²", "mse", "MSE"
    return "accuracy", "accuracy", "loss", "cross-entropy"


def _values(values: Sequence[Any]) -> list[float]:
    return [_number(v) for v in values]


def _plot_metric_vs_round(result: Mapping[str, Any], path: Path) -> Path:
    key, label, key2, label2 = _names(result)
    variants = _reported(result)
    styles = _variant_styles(variants)
    fig = _figure(11, 4.3)
    axes = fig.subplots(1, 2)
    central = result.get("centralized")
    for ax, k, name in ((axes[0], key, label), (axes[1], key2, label2)):
        for v in variants:
            series = v["series"]
            if k in series:
                ax.plot(series["round"], _values(series[k]), label=v["label"], linewidth=1.6,
                        markersize=4, **styles[v["name"]])
        if central and math.isfinite(_number(central.get(k))):
            ax.axhline(_number(central[k]), color=_CENTRAL_COLOR, linestyle=":", linewidth=1.8,
                       label=central["label"])
        ax.set_xlabel("round (0 = initial global model)")
        ax.xaxis.set_major_locator(_integer_ticks())
        ax.set_ylabel(name)
        ax.grid(True, alpha=0.3)
    if key == "accuracy":
        axes[0].set_ylim(0, 1.02)
    elif key == "r2":
        lows = [x for v in variants for x in _values(v["series"].get("r2", []))[1:]
                if math.isfinite(x)]
        axes[0].set_ylim(max(min([*lows, 0.0]) - 0.05, -1.0), 1.0)
    axes[0].legend(fontsize=8, loc="lower right")
    axes[0].set_title(f"{label} on the central test set")
    axes[1].set_title(f"{label2} on the central test set")
    fig.suptitle(_subtitle(result), fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def _plot_epsilon_vs_round(result: Mapping[str, Any], path: Path) -> Path:
    variants = _reported(result)
    styles = _variant_styles(variants)
    fig = _figure(7.5, 4.5)
    ax = fig.add_subplot(1, 1, 1)
    top = 0.0
    any_inf = False
    for v in variants:
        series = v["series"]
        eps = _values(series["epsilon"])
        finite = [e if math.isfinite(e) else math.nan for e in eps]
        if any(math.isfinite(e) and e > 0 for e in finite):
            ax.plot(series["round"], finite, label=v["label"], linewidth=1.6, **styles[v["name"]])
            top = max([top, *[e for e in finite if math.isfinite(e)]])
        if v.get("target_epsilon"):
            ax.axhline(v["target_epsilon"], color=styles[v["name"]]["color"], linestyle=":",
                       linewidth=1)
            top = max(top, v["target_epsilon"])
        inf_rounds = [r for r, e in zip(series["round"], eps, strict=True) if math.isinf(e)]
        if inf_rounds:
            any_inf = True
            ax.plot(inf_rounds, [0.97] * len(inf_rounds), linestyle="none", marker="^",
                    markersize=9, color=_INF_COLOR, transform=ax.get_xaxis_transform(),
                    clip_on=False, label=f"{v['label']}: ε = ∞ (no noise)")
    ax.set_ylim(0, top * 1.15 if top > 0 else 1.0)
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(_integer_ticks())
    ax.set_ylabel(f"cumulative ε (max over hospitals, δ = {result['config']['delta']:g})")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="center right")
    title = "Privacy spent per round (dotted: budgets)"
    if any_inf:
        title += "; FedAvg is NON-PRIVATE"
    ax.set_title(f"{title}\n{_subtitle(result)}", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def _plot_utility_vs_epsilon(result: Mapping[str, Any], path: Path) -> Path:
    key, label, _, _ = _names(result)
    variants = _reported(result)
    fig = _figure(7.5, 4.5)
    ax = fig.add_subplot(1, 1, 1)
    dp = sorted((v for v in variants if v["kind"] == "dp"), key=lambda v: _number(v["epsilon"]))
    if dp:
        ax.plot([_number(v["epsilon"]) for v in dp], [_number(v.get(key)) for v in dp],
                marker="o", color="#6a1b9a", linewidth=1.8, label="FedAvg+DP")
        for v in dp:
            ax.annotate(f"target {v['target_epsilon']:g}", (_number(v["epsilon"]),
                        _number(v.get(key))), textcoords="offset points", xytext=(4, -12),
                        fontsize=7)
    for v in variants:
        if v["kind"] == "dp-secagg":
            ax.plot([_number(v["epsilon"])], [_number(v.get(key))], marker="D", markersize=9,
                    linestyle="none", color=_SECAGG_COLOR, label=v["label"])
        elif v["kind"] == "fedavg" and math.isfinite(_number(v.get(key))):
            ax.axhline(_number(v[key]), color=_FEDAVG_COLOR, linestyle="--", linewidth=1.5,
                       label=f"{v['label']}: ε = ∞")
    central = result.get("centralized")
    if central and math.isfinite(_number(central.get(key))):
        ax.axhline(_number(central[key]), color=_CENTRAL_COLOR, linestyle=":", linewidth=1.8,
                   label=central["label"])
    finite_eps = [_number(v["epsilon"]) for v in variants
                  if math.isfinite(_number(v["epsilon"])) and _number(v["epsilon"]) > 0]
    if finite_eps and max(finite_eps) / min(finite_eps) > 4:
        ax.set_xscale("log")
        ax.set_xticks(sorted(set(finite_eps)))
        ax.set_xticklabels([f"{e:.3g}" for e in sorted(set(finite_eps))])
    ax.set_xlabel(f"final ε (δ = {result['config']['delta']:g})")
    ax.set_ylabel(f"{label} on the central test set")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(f"Utility against privacy\n{_subtitle(result)}", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig: Any, path: Path) -> Path:
    fig.savefig(path, format="png")
    return path


# ---------------------------------------------------------------------- bract compare
def _epsilon(text: str) -> float:
    return positive_float(text, "epsilon")


def add_compare_parser(sub: Any) -> argparse.ArgumentParser:
    """Add ``bract compare`` to the ``bract`` subparsers ``sub``."""
    p = sub.add_parser(
        "compare",
        help="centralized vs FedAvg vs FedAvg+DP vs FedAvg+DP+SecAgg on one dataset",
        description=(
            "The comparative study: a centralized scikit-learn model, non-private FedAvg, "
            "FedAvg with DP-SGD at each --epsilons budget, and FedAvg with DP-SGD and secure "
            "aggregation at --secure-epsilon (default: the first budget), all on the same "
            "data and split. Writes OUT/compare.json, OUT/compare.md, metric_vs_round.png, "
            "epsilon_vs_round.png, utility_vs_epsilon.png, and each run in OUT/<variant>/."
        ),
    )
    FederationConfig.add_arguments(
        p, ("dataset", "data_path", "clients", "rounds", "partition", "alpha", "delta", "seed",
            "image_size", "samples", "batch_size", "lr", "momentum", "local_epochs",
            "max_grad_norm", "accountant", "grad_sample_mode", "device"),
        defaults={"dataset": "breast-cancer", "clients": 5, "rounds": 10,
                  "partition": "dirichlet"},
        choices={"partition": ("iid", "dirichlet", "quantity")},
    )
    p.add_argument("--epsilons", type=_epsilon, nargs="+", default=[1.0, 3.0, 8.0],
                   metavar="EPS", help="FedAvg+DP budgets (default 1 3 8)")
    p.add_argument("--secure-epsilon", type=_epsilon, default=None,
                   help="budget of the DP + secure-aggregation run (default: first of --epsilons)")
    p.add_argument("--no-secagg-run", action="store_true",
                   help="skip the DP + secure-aggregation run")
    p.add_argument("--out", type=Path, default=Path("runs/compare"),
                   help="output directory (default: runs/compare)")
    p.add_argument("--no-progress", action="store_true", help="plain output, no live tables")
    p.set_defaults(func=_compare_command)
    return p


def _compare_command(args: argparse.Namespace) -> int:
    from rich.console import Console

    from bract.argtypes import output_dir_problem
    from bract.flower.checkpoint import CheckpointError
    from bract.privacy import PrivacyError

    console = Console()
    # Nothing is written yet: run_comparison makes --out once every setting is checked.
    problem = output_dir_problem(args.out, create=False)
    if problem:
        console.print(f"[red]error:[/red] {problem}", highlight=False)
        return 2
    include = [k for k in VARIANT_KINDS if not (k == "dp-secagg" and args.no_secagg_run)]
    try:
        run_comparison(
            FederationConfig.from_args(args, out=args.out, secagg=False), args.epsilons,
            secure_epsilon=args.secure_epsilon, include=include,
            show_progress=not args.no_progress, console=console,
        )
    except (PrivacyError, ValueError, CheckpointError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 2
    except ComparisonError as exc:
        console.print(f"[red]error:[/red] {exc}", highlight=False)
        return 1
    return 0
