"""The server's checkpoint: the global model and the run's record after every round.

Written after each completed round (the model first, then the state that names it:
the commit point), so a resumed run continues after the last completed round,
neither losing nor repeating one; a checkpoint made with other settings is refused.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from bract.flower.files import atomic_write_text, committing

Weights = dict[str, np.ndarray]


CHECKPOINT_DIR = "checkpoint"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, or belongs to a different run configuration."""


_RESUME_IGNORES = frozenset({"out", "resume", "reply-poll", "save_model", "show_progress"})


def load_checkpoint_state(out_dir: Path, run_config: Mapping[str, Any]) -> dict[str, Any]:
    """The checkpoint state in ``out_dir``, if it was made with the same configuration.

    Raises :class:`CheckpointError` naming the problem: no checkpoint, an unreadable
    one, or settings that differ (only the output options may change on resume).
    """
    path = Path(out_dir) / CHECKPOINT_DIR / "state.json"
    if not path.exists():
        raise CheckpointError(f"no checkpoint to resume from in {path.parent}")
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
        old = {k: v for k, v in state["config"].items() if k not in _RESUME_IGNORES}
    except (OSError, ValueError, KeyError, AttributeError) as exc:
        raise CheckpointError(f"checkpoint {path} is unreadable: {exc}") from None
    new = {k: v for k, v in run_config.items() if k not in _RESUME_IGNORES}
    if old != new:
        diff = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
        raise CheckpointError(
            f"the checkpoint in {path.parent} was made with a different configuration "
            f"(differs in {diff}); resume with the same settings or use another --out"
        )
    return state


class Checkpointer:
    """Saves and restores the round loop's state in ``out_dir/checkpoint``.

    Guarantee: :meth:`save` is atomic (a crash leaves the previous checkpoint or the
    new one, never a mix); :meth:`restore` returns a state and model only if they
    were saved with the same configuration (only output options may differ).
    """

    def __init__(self, out_dir: Path, run_config: Mapping[str, Any]) -> None:
        self.dir = Path(out_dir) / CHECKPOINT_DIR
        self.run_config = run_config

    def save(self, completed: int, weights: Weights, state: Mapping[str, Any]) -> None:
        """Write the global model after round ``completed``, then the state naming it."""
        with committing():
            self.dir.mkdir(parents=True, exist_ok=True)
            model_name = f"global-round-{completed}.npz"
            fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=".model.", suffix=".npz")
            with os.fdopen(fd, "wb") as fh:
                np.savez(fh, **weights)
            os.replace(tmp, self.dir / model_name)
            full = {"completed_rounds": completed, "model": model_name,
                    "config": dict(self.run_config), **state}
            atomic_write_text(self.dir / "state.json", json.dumps(full) + "\n")
            for old in self.dir.glob("global-round-*.npz"):
                if old.name != model_name:
                    old.unlink()

    def restore(self, model_keys: Any) -> tuple[dict[str, Any], Weights]:
        """The saved state and global model; :class:`CheckpointError` naming the problem
        (none, unreadable, another configuration, another model)."""
        state = load_checkpoint_state(self.dir.parent, self.run_config)
        try:
            with np.load(self.dir / state["model"]) as data:
                weights = {k: data[k] for k in data.files}
        except (OSError, ValueError, KeyError) as exc:
            raise CheckpointError(
                f"checkpointed model in {self.dir} is unreadable: {exc}"
            ) from None
        if weights.keys() != set(model_keys):
            raise CheckpointError("the checkpointed model does not match this run's model")
        return state, weights
