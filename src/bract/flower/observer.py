"""What the operator sees of a federation: the live table, the plots, a summary line.

The round loop (:class:`bract.flower.server.Federation`) tells its observer each
round's row and each note; the observer owns how they are shown (a ``rich`` live
table with a progress bar, or log lines) and, when the run ends, the plots next to
``report.json`` (:mod:`bract.plots`). It reads the report; it never changes the
record, except to list the plots it drew.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

log = logging.getLogger("bract.server")


def _eps_text(x: float) -> str:
    return f"{x:.3f}" if math.isfinite(x) else "∞ NON-PRIVATE"


class LiveTable:
    """Live per-round table with a progress bar (rich), or nothing when disabled."""

    def __init__(self, rounds: int, enabled: bool) -> None:
        self.enabled = enabled
        self.console = Console()
        self.table = Table(title="bract federation: global model on the central test set")
        for col in ("round", "loss", "acc", "max ε", "trained", "s"):
            self.table.add_column(col, justify="right", no_wrap=True, min_width=len(col))
        self.hospital_columns: list[str] = []
        self.progress = Progress(
            TextColumn("[bold]rounds"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        )
        self.task = self.progress.add_task("rounds", total=rounds)
        self.live = Live(Group(self.table, self.progress), console=self.console,
                         refresh_per_second=4, transient=False)

    def __enter__(self) -> LiveTable:
        if self.enabled:
            self.live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self.live.__exit__(*exc)
            self.console.print()

    def row(self, row: dict[str, Any]) -> None:
        per_client = row["per_client"]
        if not self.hospital_columns and len(per_client) <= 6:
            # One ε column per hospital when they fit; otherwise the max says it all.
            self.hospital_columns = sorted(per_client)
            for cid in self.hospital_columns:
                self.table.add_column(f"ε {cid.replace('hospital-', 'h')}", justify="right")
        trained = sum(1 for v in per_client.values() if v["trained"])
        regression = "r2" in row
        if regression and self.table.columns[2].header == "acc":
            # Regression: MSE (target units) in the loss column, R² in the accuracy column.
            self.table.columns[1].header, self.table.columns[2].header = "MSE", "R²"
        metric = row.get("r2") if regression else row.get("accuracy")
        loss = row.get("mse") if regression else row.get("loss")
        held_out = row.get("federated_eval")
        if loss is None and metric is None and held_out is not None:
            # No central test set: the hospitals' pooled held-out evaluation of the model
            # they received this round, marked with a dagger.
            if self.table.title and "held-out" not in str(self.table.title):
                self.table.title = ("bract federation: global model on the central test set "
                                    "(† hospitals' pooled held-out splits, model of the "
                                    "round before)")
            loss, metric = held_out["loss"], held_out["accuracy"]
            cells_suffix = "†"
        else:
            cells_suffix = ""
        cells = [
            str(row["round"]),
            ((f"{loss:.1f}" if regression else f"{loss:.3f}") + cells_suffix
             if loss is not None else "-"),
            f"{metric:.3f}{cells_suffix}" if metric is not None else "-",
            _eps_text(row["epsilon_value"]),
            f"{trained}/{len(per_client)}",
            f"{row['seconds']:.1f}",
        ]
        for cid in self.hospital_columns:
            v = per_client.get(cid)
            text = "-" if v is None else _eps_text(v["epsilon"])
            if v is not None and not v["trained"]:
                text += " stop"
            cells.append(text)
        self.table.add_row(*cells)
        self.progress.advance(self.task)

    def note(self, text: str) -> None:
        if self.enabled:
            self.console.print(f"[yellow]{text}[/yellow]")
        else:
            log.warning(text)


class RunObserver(LiveTable):
    """The live table (or log lines) during the run, and the plots at its end."""

    @staticmethod
    def draw_plots(report: Mapping[str, Any], out_dir: Path) -> list[str] | None:
        """epsilon.png and metric.png next to report.json (:mod:`bract.plots`); their
        paths, or ``None`` (with a warning) when drawing failed: plots are a
        convenience, the report is the record and is already on disk."""
        try:
            from bract.plots import plot_run

            paths = plot_run(report, out_dir)
        except Exception as exc:  # plots are a convenience; the report is the record
            logging.getLogger(__name__).warning("could not draw the run's plots: %s", exc)
            return None
        return [str(p) for p in paths]


def summarize(report: Mapping[str, Any]) -> str:
    """One-line human summary of a finished report."""
    final = report.get("final", {})
    eps = final.get("epsilon")
    eps = f"{eps:.4f}" if isinstance(eps, float) else eps
    acc = final.get("accuracy")
    acc_text = f"{acc:.3f}" if isinstance(acc, (int, float)) else "-"
    quality = f"final accuracy {acc_text}"
    if isinstance(final.get("r2"), (int, float)):  # regression
        mse = final.get("mse")
        mse_text = f"{mse:.4g}" if isinstance(mse, (int, float)) else "-"
        quality = f"final R² {final['r2']:.3f}, MSE {mse_text}"
    held_out = final.get("federated_eval")
    if acc is None and isinstance(held_out, Mapping):  # no central test set
        quality = (f"accuracy {held_out['accuracy']:.3f} on the hospitals' pooled held-out "
                   f"splits (model of round {held_out['model_of_round']})")
    return (
        f"{final.get('rounds_completed', 0)} rounds, {quality}, "
        f"epsilon {eps} at delta {final.get('delta')}"
        + ("  [NON-PRIVATE: no DP noise]" if final.get("non_private") else "")
    )
