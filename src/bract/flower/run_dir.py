"""A run's output directory: what marks it as holding a run, and how a new run sets
an earlier one aside without deleting anything (``bract simulate``, ``bract deploy``
and the ServerApp under ``flwr run`` share these rules)."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from pathlib import Path

from bract.flower.checkpoint import CHECKPOINT_DIR
from bract.flower.simulated_operators import HOSPITALS_DIR, ROSTER_FILE

__all__ = ["PREVIOUS_RUN", "RUN_MARKERS", "SECAGG_VIEW_DIR", "holds_run",
           "set_aside_previous_run"]

#: Sub-directory of the run's output holding the server's recorded secure-round views.
SECAGG_VIEW_DIR = "secagg_view"
PREVIOUS_RUN = ("refuse", "new-run", "archive")
#: What marks an output directory as holding a run (its record or its hospitals' state).
RUN_MARKERS = ("report.json", "ledger.jsonl", ROSTER_FILE, CHECKPOINT_DIR, HOSPITALS_DIR,
               SECAGG_VIEW_DIR)
#: What ``bract simulate`` says when it refuses an output that holds a run.
SIMULATE_CHOICES = (
    "--resume continues it; --new-run starts a new run of the same hospitals (their "
    "spent budgets carry on), --new-federation one of new hospitals (the earlier run is "
    "moved aside; nothing is deleted)"
)


def holds_run(out_dir: Path) -> bool:
    """Whether ``out_dir`` holds (part of) a run: a record, a checkpoint or hospital state."""
    return any((Path(out_dir) / m).exists() for m in RUN_MARKERS)


def set_aside_previous_run(out: Path, previous_run: str, holds: bool | None = None, *,
                           keep: Iterable[str] = (), choices: str = SIMULATE_CHOICES
                           ) -> Path | None:
    """Guarantee: a new run never overwrites or deletes an earlier run's ledger,
    checkpoint or hospitals' privacy state in ``out``. When ``out`` holds a run (or
    ``holds`` says so) it refuses with ``ValueError`` naming ``choices``
    (``previous_run="refuse"``), moves the run's records aside to ``<out>-<time>``
    leaving the hospitals' own directory and the entries named in ``keep`` (e.g. a
    deployment's keys and lifetime budgets) in place (``"new-run"``), or moves ``out``
    aside whole (``"archive"``); it returns where the records went."""
    out = Path(out)
    if not (holds_run(out) if holds is None else holds):
        return None
    if previous_run == "refuse":
        raise ValueError(f"{out} already holds a run (its signed ledger and the hospitals' "
                         f"spent privacy budgets): {choices}")
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(out.stat().st_mtime))
    target = out.with_name(f"{out.name}-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = out.with_name(f"{out.name}-{stamp}-{n}")
    log = logging.getLogger("bract")
    if previous_run == "new-run":
        stays = {HOSPITALS_DIR, *keep}
        target.mkdir()
        for entry in sorted(out.iterdir()):
            if entry.name not in stays:
                entry.rename(target / entry.name)
        log.warning("the earlier run's records in %s were moved to %s; its hospitals keep "
                    "their keys and spent budgets in %s", out, target,
                    ", ".join(str(out / name) for name in sorted(stays)))
        return target
    out.rename(target)
    log.warning("the earlier run in %s was moved to %s", out, target)
    return target
