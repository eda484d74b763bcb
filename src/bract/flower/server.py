"""Server side: a Flower ``ServerApp`` running FedAvg over the Grid with privacy reporting.

Each round the server sends the global model to every hospital still in the
federation, collects the replies, averages the updates of those that trained
(weighted by their example counts), evaluates the new global model on the
central test set, and records every hospital's epsilon (which covers all rounds
so far) and its ledger of mechanism events.

Robustness: a hospital that errors or does not answer is left out of that
round's average and the round goes on; a hospital that refuses because its
budget is spent is stopped, with its reason logged; a round in which nobody
trained leaves the global model unchanged. The report and ledger files are
rewritten atomically after every round, so an interrupted run leaves a
consistent record of the rounds it completed.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp
from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from bract.flower.records import (
    GLOBAL_WEIGHTS,
    LOCAL_WEIGHTS,
    ROUND_CONFIG,
    TRAIN_INFO,
    read_privacy_report,
    weights_to_record,
)
from bract.privacy import PrivacyLedger

Weights = dict[str, np.ndarray]
EvaluateFn = Callable[[Weights], dict[str, float]]

log = logging.getLogger("bract.server")


@dataclass
class ServerConfig:
    """How the server runs the federation and where it writes its record."""

    rounds: int
    num_clients: int
    delta: float
    out_dir: Path
    min_clients: int = 1
    node_wait_seconds: float = 120.0
    round_timeout: float | None = None
    save_model: Path | None = None
    run_config: dict[str, Any] = field(default_factory=dict)
    show_progress: bool = True


def fedavg(updates: list[tuple[Weights, int]]) -> Weights:
    """Example-weighted average of named weight arrays (FedAvg)."""
    if not updates:
        raise ValueError("fedavg needs at least one update")
    total = float(sum(n for _, n in updates))
    if total <= 0:
        raise ValueError("fedavg needs a positive total number of examples")
    names = list(updates[0][0])
    out: Weights = {}
    for name in names:
        acc = np.zeros_like(updates[0][0][name], dtype=np.float64)
        for weights, n in updates:
            if weights.keys() != updates[0][0].keys():
                raise ValueError("updates do not share the same weight names")
            acc += np.asarray(weights[name], dtype=np.float64) * (n / total)
        out[name] = acc.astype(updates[0][0][name].dtype)
    return out


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, path)


def _json_float(x: float) -> float | str:
    return x if math.isfinite(x) else ("inf" if x > 0 else str(x))


class FederationRecord:
    """The run's report (``report.json``) and merged ledger (``ledger.jsonl``)."""

    def __init__(self, out_dir: Path, config: dict[str, Any]) -> None:
        self.out_dir = Path(out_dir)
        self.report: dict[str, Any] = {"config": config, "rounds": [], "final": {}}
        self.ledgers: dict[str, PrivacyLedger] = {}

    def add_round(self, row: dict[str, Any]) -> None:
        """Append one round's row and rewrite both files atomically."""
        self.report["rounds"].append(row)
        self.write()

    def finish(self, final: dict[str, Any]) -> None:
        """Record the final summary and rewrite both files."""
        self.report["final"] = final
        self.write()

    def write(self) -> None:
        """Write report.json and ledger.jsonl (one event per line, every hospital)."""
        _atomic_write(self.out_dir / "report.json", json.dumps(self.report, indent=2) + "\n")
        lines = [
            json.dumps({**e.to_plain(), "client_id": cid}, sort_keys=True)
            for cid, ledger in sorted(self.ledgers.items())
            for e in ledger.events
        ]
        _atomic_write(self.out_dir / "ledger.jsonl", "".join(line + "\n" for line in lines))


def _eps_text(x: float) -> str:
    return f"{x:.3f}" if math.isfinite(x) else "∞ NON-PRIVATE"


class _Display:
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

    def __enter__(self) -> _Display:
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
            self.hospital_columns = list(per_client)
            for cid in self.hospital_columns:
                self.table.add_column(f"ε {cid.replace('hospital-', 'h')}", justify="right")
        trained = sum(1 for v in per_client.values() if v["trained"])
        metric = row.get("accuracy")
        cells = [
            str(row["round"]),
            f"{row['loss']:.3f}" if row.get("loss") is not None else "-",
            f"{metric:.3f}" if metric is not None else "-",
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


def _wait_for_nodes(grid: Grid, n: int, seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= n or time.monotonic() > deadline:
            return nodes
        time.sleep(0.1)


def run_federation(
    grid: Grid,
    initial_weights: Weights,
    evaluate: EvaluateFn,
    cfg: ServerConfig,
) -> dict[str, Any]:
    """Run ``cfg.rounds`` rounds of private FedAvg; returns the report dict.

    Guarantee: the global model only ever changes by averaging updates of
    hospitals that trained within their budget this round; errors, timeouts
    and refusals never corrupt it or the recorded ledgers.
    """
    record = FederationRecord(cfg.out_dir, cfg.run_config)
    nodes = _wait_for_nodes(grid, cfg.num_clients, cfg.node_wait_seconds)
    if len(nodes) < cfg.min_clients:
        raise RuntimeError(
            f"only {len(nodes)} hospitals connected, fewer than the minimum {cfg.min_clients}"
        )
    active = list(nodes)
    names: dict[int, str] = {}
    latest: dict[str, dict[str, Any]] = {}
    stopped: dict[str, str] = {}
    global_weights = {k: np.array(v, copy=True) for k, v in initial_weights.items()}
    metrics = evaluate(global_weights)
    record.report["initial"] = metrics
    with _Display(cfg.rounds, cfg.show_progress) as display:
        for rnd in range(1, cfg.rounds + 1):
            if len(active) < cfg.min_clients:
                display.note(
                    f"stopping before round {rnd}: {len(active)} hospitals remain, "
                    f"fewer than the minimum {cfg.min_clients}"
                )
                break
            t0 = time.perf_counter()
            arrays = weights_to_record(global_weights)
            messages = []
            for node in active:
                content = RecordDict()
                content.array_records[GLOBAL_WEIGHTS] = arrays
                content.config_records[ROUND_CONFIG] = ConfigRecord(
                    {"round": rnd, "num-rounds": cfg.rounds}
                )
                messages.append(
                    Message(content, dst_node_id=node, message_type="train", group_id=str(rnd))
                )
            replies = list(grid.send_and_receive(messages, timeout=cfg.round_timeout))
            updates: list[tuple[Weights, int]] = []
            answered: set[int] = set()
            for reply in replies:
                node = reply.metadata.src_node_id
                answered.add(node)
                label = names.get(node, f"node-{node}")
                if reply.has_error():
                    display.note(f"round {rnd}: {label} failed: {reply.error.reason}")
                    continue
                try:
                    rep = read_privacy_report(reply.content)
                except ValueError as exc:
                    display.note(f"round {rnd}: {label} sent a malformed reply: {exc}")
                    continue
                cid = rep["client_id"] or label
                names[node] = cid
                record.ledgers[cid] = rep["ledger"]
                latest[cid] = {
                    "epsilon": rep["epsilon"],
                    "noise_multiplier": rep["noise_multiplier"],
                    "sample_rate": rep["sample_rate"],
                    "steps": rep["steps"],
                    "trained": rep["trained"],
                    "reason": rep["reason"],
                }
                if not rep["trained"]:
                    stopped[cid] = rep["reason"]
                    active.remove(node)
                    display.note(f"round {rnd}: {cid} stopped — {rep['reason']}")
                    continue
                if LOCAL_WEIGHTS not in reply.content.array_records:
                    display.note(f"round {rnd}: {cid} trained but sent no weights; ignored")
                    continue
                local = {
                    k: v.numpy() for k, v in reply.content.array_records[LOCAL_WEIGHTS].items()
                }
                if local.keys() != global_weights.keys() or any(
                    local[k].shape != global_weights[k].shape for k in local
                ):
                    display.note(f"round {rnd}: {cid} sent weights of the wrong shape; ignored")
                    continue
                n_ex = int(reply.content.metric_records[TRAIN_INFO]["num-examples"])
                updates.append((local, n_ex))
            for node in active:
                if node not in answered:
                    display.note(f"round {rnd}: {names.get(node, f'node-{node}')} did not answer")
            if updates:
                global_weights = fedavg(updates)
                metrics = evaluate(global_weights)
            else:
                display.note(f"round {rnd}: no hospital trained; the global model is unchanged")
            per_client = {cid: dict(v) for cid, v in sorted(latest.items())}
            eps_max = max((v["epsilon"] for v in per_client.values()), default=0.0)
            row = {
                "round": rnd,
                "epsilon": _json_float(eps_max),
                "delta": cfg.delta,
                "per_client": {
                    cid: {**v, "epsilon": _json_float(v["epsilon"])}
                    for cid, v in per_client.items()
                },
                "trained": sorted(names[n] for n in answered if n in names
                                  and latest.get(names[n], {}).get("trained")),
                **metrics,
                "seconds": time.perf_counter() - t0,
            }
            record.add_round(row)
            display.row({**row, "per_client": per_client, "epsilon_value": eps_max})
            if not active:
                display.note(f"every hospital has stopped after round {rnd}; federation ends")
                break
    rounds = record.report["rounds"]
    final_eps = max((float(v["epsilon"]) for v in latest.values()), default=0.0)
    final = {
        "rounds_completed": len(rounds),
        "epsilon": _json_float(final_eps),
        "delta": cfg.delta,
        "non_private": not math.isfinite(final_eps),
        "stopped": stopped,
        **metrics,
    }
    if cfg.save_model is not None:
        cfg.save_model.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cfg.save_model, **global_weights)
        final["model"] = str(cfg.save_model)
    record.finish(final)
    return record.report


def make_server_app(
    initial_weights: Callable[[], Weights],
    evaluate: EvaluateFn,
    cfg: ServerConfig,
    on_done: Callable[[dict[str, Any]], None] | None = None,
) -> ServerApp:
    """A Flower ``ServerApp`` running :func:`run_federation`."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        report = run_federation(grid, initial_weights(), evaluate, cfg)
        if on_done is not None:
            on_done(report)

    return app


def summarize(report: Mapping[str, Any]) -> str:
    """One-line human summary of a finished report."""
    final = report.get("final", {})
    eps = final.get("epsilon")
    eps = f"{eps:.4f}" if isinstance(eps, float) else eps
    acc = final.get("accuracy")
    acc_text = f"{acc:.3f}" if isinstance(acc, (int, float)) else "-"
    return (
        f"{final.get('rounds_completed', 0)} rounds, final accuracy {acc_text}, "
        f"epsilon {eps} at delta {final.get('delta')}"
        + ("  [NON-PRIVATE: no DP noise]" if final.get("non_private") else "")
    )
