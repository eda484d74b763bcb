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
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from bract.records.report import RoundRow, RunReport
from bract.records.text import one_line

log = logging.getLogger("bract.server")


def _eps_text(x: float) -> str:
    return f"{x:.3f}" if math.isfinite(x) else "∞ NON-PRIVATE"


def _hospital_cell(cid: str, row: RoundRow) -> str:
    """A hospital's cell in a round's row: its latest epsilon (it covers every round so
    far), marked ``stop`` when it stopped, and ``failed`` / ``no answer`` when it failed
    or did not answer this round; a failed hospital's epsilon is its last report's."""
    v = row.per_client.get(cid)
    text = "" if v is None else _eps_text(v.epsilon)
    if cid in row.failed:
        mark = "no answer" if row.failed[cid] == "did not answer" else "failed"
        return f"{text} {mark}".strip()
    if v is None:
        return "-"
    return text + ("" if v.trained else " stop")


class LiveTable:
    """Live per-round table with a progress bar (rich), or nothing when disabled."""

    def __init__(self, rounds: int, enabled: bool) -> None:
        self.enabled = enabled
        self.console = Console()
        self.table = Table(title="bract federation: global model on the central test set")
        for col in ("round", "loss", "acc", "max ε", "averaged", "s"):
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

    def row(self, row: RoundRow) -> None:
        """Show one round: a table row, or (table disabled) one plain line."""
        per_client = row.per_client
        # Every hospital the round heard from, or whose failure it recorded.
        present = sorted(set(per_client) | set(row.failed))
        if not self.hospital_columns and len(present) <= 6:
            # One ε column per hospital when they fit; otherwise the max says it all.
            self.hospital_columns = present
            for cid in self.hospital_columns:
                name = escape(one_line(cid.replace("hospital-", "h"), 40))
                self.table.add_column(f"ε {name}", justify="right")
        # Updates in this round's aggregate (per_client keeps each hospital's last report).
        trained = len(row.trained)
        # No epsilon figure for a round no hospital reported on (never a 0 for a failure).
        max_eps = _eps_text(row.epsilon) if per_client else "-"
        regression = "r2" in row.metrics
        if regression and self.table.columns[2].header == "acc":
            # Regression: MSE (target units) in the loss column, R² in the accuracy column.
            self.table.columns[1].header, self.table.columns[2].header = "MSE", "R²"
        metric = row.metrics.get("r2" if regression else "accuracy")
        loss = row.metrics.get("mse" if regression else "loss")
        held_out = row.federated_eval
        suffix = ""
        if loss is None and metric is None and held_out is not None:
            # No central test set: the hospitals' pooled held-out evaluation of the model
            # they received this round, marked with a dagger.
            if self.table.title and "held-out" not in str(self.table.title):
                self.table.title = ("bract federation: global model on the central test set "
                                    "(† hospitals' pooled held-out splits, model of the "
                                    "round before)")
            loss, metric, suffix = held_out.loss, held_out.accuracy, "†"
        loss_text = ((f"{loss:.1f}" if regression else f"{loss:.3f}") + suffix
                     if loss is not None else "-")
        metric_text = f"{metric:.3f}{suffix}" if metric is not None else "-"
        if not row.aggregated:
            # No update was averaged: the model is unchanged, so no figure of it is shown.
            loss_text, metric_text = "-", "no update"
        cells = [str(row.round), loss_text, metric_text, max_eps,
                 f"{trained}/{len(present)}", f"{row.seconds:.1f}"]
        cells += [_hospital_cell(cid, row) for cid in self.hospital_columns]
        self.table.add_row(*cells)
        self.progress.advance(self.task)
        if not self.enabled:
            names = ("MSE", "R²") if regression else ("loss", "accuracy")
            quality = (f"{names[0]} {loss_text}, {names[1]} {metric_text}" if row.aggregated
                       else "no update was averaged (global model unchanged)")
            self.console.print(
                f"round {row.round}: {quality}, "
                f"max ε {max_eps}, averaged {trained}/{len(present)}, "
                f"{row.seconds:.1f} s", highlight=False)

    def note(self, text: str) -> None:
        """Tell the operator ``text`` (which may quote a hospital's words).

        Guarantee: what is shown is :func:`~bract.records.text.one_line` of it (no
        control character or escape sequence reaches the terminal or the log, at most
        2000 characters), and on the live table its ``[`` are escaped, so no text can
        end the run with a markup error or restyle the table."""
        text = one_line(text, 2000)
        if self.enabled:
            self.console.print(f"[yellow]{escape(text)}[/yellow]")
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


def summarize(report: RunReport | Mapping[str, Any]) -> str:
    """One-line human summary of a finished report: how many rounds averaged an update,
    the final model's quality (none when no round did) and the final epsilon."""
    typed = report if isinstance(report, RunReport) else RunReport.from_plain(report)
    final = typed.final
    if final is None:
        return f"{len(typed.rounds)} rounds recorded; the run did not finish"
    if not final.model_trained:
        eps = f"{final.epsilon:.4f}" if math.isfinite(final.epsilon) else "inf"
        return (f"no round averaged an update ({len(typed.rounds)} rounds run): the model "
                f"was not trained; epsilon {eps} at delta {final.delta:g}")
    acc = final.metrics.get("accuracy")
    quality = f"final accuracy {acc:.3f}" if acc is not None else "final accuracy -"
    if "r2" in final.metrics:  # regression
        mse = final.metrics.get("mse")
        mse_text = f"{mse:.4g}" if mse is not None else "-"
        quality = f"final R² {final.metrics['r2']:.3f}, MSE {mse_text}"
    held_out = final.federated_eval
    if acc is None and held_out is not None:  # no central test set
        quality = (f"accuracy {held_out.accuracy:.3f} on the hospitals' pooled held-out "
                   f"splits (model of round {held_out.model_of_round})")
    eps = f"{final.epsilon:.4f}" if math.isfinite(final.epsilon) else "inf"
    n = len(typed.rounds)
    rounds = (f"{n} round{'' if n == 1 else 's'}" if final.rounds_completed == n
              else f"{final.rounds_completed} of {n} round{'' if n == 1 else 's'} averaged "
                   "an update")
    return (
        f"{rounds}, {quality}, epsilon {eps} at delta {final.delta:g}"
        + ("  [NON-PRIVATE: no DP noise]" if final.non_private else "")
    )
