"""Plots of a federation's report: epsilon per round and the global metric per round.

:func:`plot_run` reads a ``report.json`` (as written by ``bract simulate`` or the
deployed ``ServerApp``) and writes two PNGs:

* ``epsilon.png``: each hospital's cumulative epsilon after every round (its
  accountant spans rounds), starting at round 0 from what its data carried into
  the run (0, or the epsilon earlier runs spent), the maximum over hospitals (the
  figure the federation reports), and the budget (``target_epsilon``) as a dashed line.
  Non-private rounds (epsilon ``"inf"``) are drawn as red triangles at the top
  edge and the plot says NON-PRIVATE: an infinite epsilon is never hidden.
* ``metric.png``: the global model's metric on the central test set, from the
  initial model (round 0) to the last round: accuracy and cross-entropy for
  classification, R² and MSE for regression (detected from the rows' keys). A
  round that averaged no update has no point (its model is the previous one).

A report with no round, or none that averaged an update, is refused
(ValueError): there is no trained model to draw.

The plots only read the report; they add no privacy claim of their own (the
audit re-derives epsilon from the ledger, see docs/audit.md). Drawing uses the
object-oriented Agg canvas (no pyplot state), so it is safe inside the server's
thread. No flwr import.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bract.records.report import ReportError, RunReport

__all__ = [
    "EPSILON_PNG",
    "METRIC_PNG",
    "MetricSeries",
    "add_plot_parser",
    "epsilon_series",
    "load_report",
    "metric_series",
    "plot_epsilon",
    "plot_metric",
    "plot_run",
]

EPSILON_PNG = "epsilon.png"
METRIC_PNG = "metric.png"

_INF_COLOR = "#c62828"


def _number(value: Any) -> float:
    """A report value as a float: ``"inf"`` strings become ``inf``; missing or
    non-numeric values become ``nan`` (a gap in the line)."""
    if isinstance(value, bool) or value is None:
        return math.nan
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return math.nan
    return math.nan


#: A report as written to report.json (a mapping) or already read (RunReport).
ReportLike = Mapping[str, Any] | RunReport


def _typed(report: ReportLike) -> RunReport:
    """The report, read through :class:`bract.records.report.RunReport`."""
    if isinstance(report, RunReport):
        return report
    try:
        return RunReport.from_plain(report, "the report")
    except ReportError as exc:
        raise ValueError(f"{exc}; pass the report.json that bract simulate or the ServerApp "
                         "wrote") from None


def epsilon_series(report: ReportLike) -> tuple[list[int], dict[str, list[float]]]:
    """Round numbers (with 0, before training) and cumulative epsilon per series.

    Series: one per hospital seen in any row's ``per_client`` (``nan`` where a row
    does not list it) and ``"max"``, the row's reported maximum. ``"inf"`` in the
    report becomes ``math.inf``. Round 0 is each hospital's epsilon when the run
    began (:meth:`~bract.records.report.RunReport.starting_epsilons`: 0, or what its
    data carried from earlier runs; ``nan``, a gap, when unknown) and their maximum.
    Raises ValueError for something that is not a bract report.
    """
    typed = _typed(report)
    rows = typed.rounds
    rounds = [0, *(row.round for row in rows)]
    hospitals = sorted({cid for row in rows for cid in row.per_client})
    start = typed.starting_epsilons()
    series: dict[str, list[float]] = {cid: [start.get(cid, 0.0)] for cid in hospitals}
    series["max"] = [typed.starting_epsilon]
    for row in rows:
        for cid in hospitals:
            entry = row.per_client.get(cid)
            series[cid].append(entry.epsilon if entry is not None else math.nan)
        series["max"].append(row.epsilon)
    return rounds, series


class MetricSeries:
    """The global metric per round: ``primary`` (accuracy or R²) and ``secondary``
    (cross-entropy or MSE), each a list aligned with ``rounds`` (0 = initial model)."""

    def __init__(
        self,
        kind: str,
        rounds: list[int],
        primary_name: str,
        primary: list[float],
        secondary_name: str,
        secondary: list[float],
    ) -> None:
        self.kind = kind
        self.rounds = rounds
        self.primary_name = primary_name
        self.primary = primary
        self.secondary_name = secondary_name
        self.secondary = secondary

    def has_primary(self) -> bool:
        """Whether any point of the primary metric was recorded."""
        return any(math.isfinite(v) for v in self.primary)

    def has_secondary(self) -> bool:
        """Whether any point of the secondary metric was recorded."""
        return any(math.isfinite(v) for v in self.secondary)


def metric_series(report: ReportLike) -> MetricSeries:
    """The global model's metric per round, detected from the rows' keys.

    ``"r2"`` anywhere means regression (R², with MSE as the secondary metric);
    otherwise classification (accuracy, with cross-entropy ``loss``). Round 0 is
    the report's ``"initial"`` evaluation when present (``nan`` otherwise); a round
    that averaged no update is ``nan`` (no point: its model is the previous one).
    Without a central test set (no row carries a metric), the series is the
    hospitals' pooled held-out evaluation (``federated_eval``), placed at the round
    of the model it describes (``kind`` ``"held-out"``).
    """
    typed = _typed(report)
    rows = typed.rounds
    if not typed.initial and not any(r.metrics for r in rows) and any(
            r.federated_eval is not None for r in rows):
        return _held_out_series(typed)
    points: list[Mapping[str, float]] = [
        typed.initial, *(r.metrics if r.aggregated else {} for r in rows)]
    regression = any("r2" in p for p in points)
    if regression:
        primary_name, primary_key, secondary_name, secondary_key = "R²", "r2", "MSE", "mse"
    else:
        primary_name, primary_key = "accuracy", "accuracy"
        secondary_name, secondary_key = "cross-entropy", "loss"

    def values(key: str) -> list[float]:
        out = [_number(p.get(key)) for p in points]
        if regression and key == "mse":  # older regression rows carry MSE as "loss" only
            out = [v if math.isfinite(v) else _number(p.get("loss"))
                   for v, p in zip(out, points, strict=True)]
        return out

    return MetricSeries(
        "regression" if regression else "classification",
        [0, *(r.round for r in rows)],
        primary_name, values(primary_key), secondary_name, values(secondary_key),
    )


def _held_out_series(report: RunReport) -> MetricSeries:
    """Accuracy and cross-entropy on the hospitals' pooled held-out splits, at the round
    of the model each evaluation describes (the last round's model is not evaluated)."""
    by_model = {r.federated_eval.model_of_round: r.federated_eval
                for r in report.rounds if r.federated_eval is not None}
    rounds = sorted(by_model)
    return MetricSeries("held-out", rounds,
                        "accuracy (hospitals' held-out)", [by_model[r].accuracy for r in rounds],
                        "cross-entropy (hospitals' held-out)", [by_model[r].loss for r in rounds])


def _new_figure(width: float = 7.5, height: float = 4.5) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _subtitle(report: ReportLike) -> str:
    config = _typed(report).config
    parts = []
    if config.get("dataset"):
        parts.append(str(config["dataset"]))
    if config.get("clients"):
        parts.append(f"{config['clients']} hospitals")
    if "secagg" in config:
        parts.append("secure aggregation" if config["secagg"] else "plain FedAvg")
    return ", ".join(parts)


def _non_private(report: ReportLike, series: Mapping[str, list[float]] | None) -> bool:
    typed = _typed(report)
    final, config = typed.final, typed.config
    if (final is not None and final.non_private) or config.get("non_private"):
        return True
    return bool(series) and any(math.isinf(v) for s in series.values() for v in s)


def plot_epsilon(report: ReportLike, path: Path) -> Path:
    """Write the cumulative-epsilon plot to ``path`` (PNG); returns ``path``.

    Finite epsilons are lines (thin per hospital, thick for the maximum); an
    infinite epsilon (no noise) is a red triangle on the top edge, and a
    non-private run is labelled NON-PRIVATE in large red text.
    """
    rounds, series = epsilon_series(report)
    typed = _typed(report)
    budget = _number(typed.config_value("target_epsilon"))
    delta = _number(typed.config_value("delta"))
    fig = _new_figure()
    ax = fig.add_subplot(1, 1, 1)
    cmap = _colormap("tab10")
    hospitals = [k for k in series if k != "max"]
    any_inf = False
    for i, name in enumerate([*hospitals, "max"]):
        values = series[name]
        finite = [v if math.isfinite(v) else math.nan for v in values]
        style = (
            # Wide and pale under the hospitals' lines, which it often coincides with.
            {"color": "black", "linewidth": 5, "alpha": 0.3, "marker": "o", "markersize": 8,
             "label": "max over hospitals (reported)", "zorder": 2}
            if name == "max"
            else {"color": cmap(i % 10), "linewidth": 1.3, "marker": ".", "label": name,
                  "zorder": 3}
        )
        ax.plot(rounds, finite, **style)
        inf_rounds = [r for r, v in zip(rounds, values, strict=True) if math.isinf(v)]
        if inf_rounds:
            any_inf = True
            # On the top edge, in axes coordinates: infinite epsilon is off every scale.
            ax.plot(inf_rounds, [0.97] * len(inf_rounds), linestyle="none", marker="^",
                    markersize=11 if name == "max" else 7, color=_INF_COLOR,
                    transform=ax.get_xaxis_transform(), clip_on=False, zorder=4)
    if math.isfinite(budget):
        ax.axhline(budget, color=_INF_COLOR, linestyle="--", linewidth=1.4,
                   label=f"budget ε = {budget:g}")
    if any_inf:
        ax.plot([], [], linestyle="none", marker="^", color=_INF_COLOR, label="ε = ∞ (no noise)")
    if _non_private(report, series):
        ax.text(0.5, 0.55, "NON-PRIVATE\nno DP noise: ε = ∞", transform=ax.transAxes,
                ha="center", va="center", fontsize=18, fontweight="bold", color=_INF_COLOR,
                alpha=0.8)
    top = max([v for s in series.values() for v in s if math.isfinite(v)]
              + ([budget] if math.isfinite(budget) else []), default=0.0)
    # Headroom above the budget line for the ∞ markers (drawn at 97% of the height).
    ax.set_ylim(0, top * 1.15 if top > 0 else 1.0)
    ax.set_xlabel("round")
    ax.set_ylabel("cumulative ε" + (f" (δ = {delta:g})" if math.isfinite(delta) else ""))
    ax.set_xticks(_ticks(rounds))
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    sub = _subtitle(report)
    ax.set_title("Privacy spent per round" + (f" — {sub}" if sub else ""))
    fig.tight_layout()
    return _save(fig, path)


def plot_metric(report: ReportLike, path: Path) -> Path:
    """Write the global-metric plot to ``path`` (PNG); returns ``path``.

    Left axis: accuracy (classification) or R² (regression); right axis:
    cross-entropy or MSE. Round 0 is the initial, untrained global model.
    """
    m = metric_series(report)
    fig = _new_figure()
    ax = fig.add_subplot(1, 1, 1)
    handles = []
    if m.has_primary():
        handles += ax.plot(m.rounds, m.primary, color="#1565c0", marker="o", linewidth=2,
                           label=m.primary_name)
        if m.kind in ("classification", "held-out"):
            ax.set_ylim(0, 1.02)
    ax.set_ylabel(m.primary_name, color="#1565c0")
    if m.has_secondary():
        ax2 = ax.twinx()
        handles += ax2.plot(m.rounds, m.secondary, color="#ef6c00", marker="s", linewidth=1.4,
                            linestyle="--", label=m.secondary_name)
        ax2.set_ylabel(m.secondary_name, color="#ef6c00")
    if not m.has_primary() and not m.has_secondary():
        ax.text(0.5, 0.5, "no global metric recorded in this report", transform=ax.transAxes,
                ha="center", va="center", fontsize=12)
    if _non_private(report, None):
        ax.text(0.99, 0.02, "NON-PRIVATE run (no DP noise)", transform=ax.transAxes,
                ha="right", va="bottom", fontsize=10, fontweight="bold", color=_INF_COLOR)
    ax.set_xlabel("round (0 = initial global model)")
    ax.set_xticks(_ticks(m.rounds))
    ax.grid(True, alpha=0.3)
    if handles:
        ax.legend(handles=handles, labels=[h.get_label() for h in handles], loc="center right",
                  fontsize=8)
    sub = _subtitle(report)
    where = ("the hospitals' pooled held-out splits" if m.kind == "held-out"
             else "the central test set")
    ax.set_title(f"Global model on {where}" + (f" — {sub}" if sub else ""))
    fig.tight_layout()
    return _save(fig, path)


def plot_run(report: Mapping[str, Any], out_dir: Path) -> list[Path]:
    """Write ``out_dir/epsilon.png`` and ``out_dir/metric.png`` for a run's report.

    Returns the two paths. Raises ValueError (naming the problem) when ``report``
    is not a bract report, records no round, or records none that averaged an
    update (no plot of a model that was never trained). Reads the report only;
    never changes it.
    """
    typed = _typed(report)  # read once; both plots take the typed report as it is
    if not typed.rounds:
        raise ValueError("the report records no round: there is nothing to plot")
    if not any(row.aggregated for row in typed.rounds):
        raise ValueError("no round of the report averaged an update: the model was not "
                         "trained, so there is nothing to plot")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return [plot_epsilon(typed, out_dir / EPSILON_PNG), plot_metric(typed, out_dir / METRIC_PNG)]


def _ticks(rounds: Sequence[int]) -> list[int]:
    if not rounds:
        return [0]
    top = max(rounds)
    step = max(1, math.ceil(top / 12))
    return list(range(0, top + 1, step))


def _colormap(name: str) -> Any:
    import matplotlib

    return matplotlib.colormaps[name]


def _save(fig: Any, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def load_report(path: Path) -> dict[str, Any]:
    """Read a ``report.json``; ValueError naming the file and the problem otherwise."""
    path = Path(path)
    if path.is_dir():
        path = path / "report.json"
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ValueError(
            f"{path} does not exist; pass the report.json of a run (e.g. runs/latest/report.json)"
        ) from None
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc}") from None
    try:
        report = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}); is it a bract report.json?") from None
    _typed(report)
    return report


# ------------------------------------------------------------------ bract plot
def add_plot_parser(sub: Any) -> argparse.ArgumentParser:
    """Add ``bract plot REPORT.json [--out DIR]`` to the ``bract`` subparsers ``sub``."""
    p = sub.add_parser(
        "plot",
        help="redraw epsilon.png and metric.png from a run's report.json",
        description=(
            "Draw the cumulative epsilon per round (per hospital, the maximum and the "
            "budget) and the global model's metric per round from a report.json."
        ),
    )
    p.add_argument("report", type=Path, help="a run's report.json (or the folder holding it)")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default: the report's folder)")
    p.set_defaults(func=_plot_command)
    return p


def _plot_command(args: argparse.Namespace) -> int:
    from rich.console import Console

    console = Console()
    try:
        report = load_report(args.report)
        source = args.report / "report.json" if args.report.is_dir() else args.report
        out = args.out if args.out is not None else source.parent
        paths = plot_run(report, out)
    except ValueError as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 2
    except OSError as exc:
        console.print(f"[red]error:[/red] cannot write the plots: {exc}")
        return 2
    for path in paths:
        console.print(f"wrote {path}")
    return 0
