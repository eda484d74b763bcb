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

from bract.flower.files import atomic_write_text, committing, read_npz

Weights = dict[str, np.ndarray]


CHECKPOINT_DIR = "checkpoint"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, or belongs to a different run configuration."""


_RESUME_IGNORES = frozenset({"out", "resume", "reply-poll", "save_model", "show_progress",
                             "progress"})

#: Settings added after checkpoints were first written, with the value every run made
#: before them had (run-config and report.json spellings): a checkpoint whose config
#: lacks one resumes as if it held that value, so only another value differs.
_ADDED_SETTINGS = {"secagg-abort-limit": 2, "secagg_abort_limit": 2}


def _state_problem(state: Any) -> str | None:
    """What makes ``state`` (parsed ``state.json``) unusable, or None if it is usable."""
    if not isinstance(state, dict):
        kind = {list: "an array", type(None): "null", str: "a string", bool: "a boolean",
                int: "a number", float: "a number"}.get(type(state), type(state).__name__)
        return f"expected a JSON object, found {kind}"
    missing = [k for k in ("config", "model", "completed_rounds") if k not in state]
    if missing:
        return f"it lacks {', '.join(missing)}"
    if not isinstance(state["config"], dict):
        return "its config is not a JSON object"
    model = state["model"]
    if not (isinstance(model, str) and model.startswith("global-round-")
            and model.endswith(".npz") and Path(model).name == model):
        return f"its model entry {model!r} is not a global-round-N.npz file name"
    rounds = state["completed_rounds"]
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0:
        return f"its completed_rounds {rounds!r} is not a round count"
    return None


def load_checkpoint_state(out_dir: Path, run_config: Mapping[str, Any]) -> dict[str, Any]:
    """The checkpoint state in ``out_dir``, if it was made with the same configuration.

    Raises :class:`CheckpointError` naming the file and the problem: no checkpoint, an
    unreadable or damaged one (any bytes, any JSON value), or settings that differ
    (only the output options may change on resume).
    """
    path = Path(out_dir) / CHECKPOINT_DIR / "state.json"
    if not path.exists():
        raise CheckpointError(f"no checkpoint to resume from in {path.parent}")
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path} is unreadable: {exc}") from None
    problem = _state_problem(state)
    if problem:
        raise CheckpointError(f"checkpoint {path} is damaged: {problem}")
    saved = {**{k: v for k, v in _ADDED_SETTINGS.items() if k in run_config},
             **state["config"]}
    old = {k: v for k, v in saved.items() if k not in _RESUME_IGNORES}
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
        """The saved state and global model; :class:`CheckpointError` naming the file and
        the problem (none, unreadable or damaged state or model file whatever its bytes,
        another configuration, another model)."""
        state = load_checkpoint_state(self.dir.parent, self.run_config)
        for key in ("report", "chains", "latest", "stopped", "metrics"):
            if not isinstance(state.get(key), dict):
                raise CheckpointError(f"checkpoint {self.dir / 'state.json'} is damaged: "
                                      f"its {key} is missing or not a JSON object")
        if not all(isinstance(text, str) for text in state["chains"].values()):
            raise CheckpointError(f"checkpoint {self.dir / 'state.json'} is damaged: "
                                  "its chains are not ledger texts")
        if not all(isinstance(line, dict) for line in state["latest"].values()):
            raise CheckpointError(f"checkpoint {self.dir / 'state.json'} is damaged: "
                                  "its latest entries are not JSON objects")
        aborts = state.get("spent_aborts", 0)  # a checkpoint older than the count lacks it
        if isinstance(aborts, bool) or not isinstance(aborts, int) or aborts < 0:
            raise CheckpointError(f"checkpoint {self.dir / 'state.json'} is damaged: "
                                  f"its spent_aborts {aborts!r} is not a round count")
        asked = state.get("unanswered", {})  # absent from a checkpoint that did not keep it
        if not isinstance(asked, dict) or not all(
                isinstance(rounds, list) and all(isinstance(r, int) and not isinstance(r, bool)
                                                 for r in rounds)
                for rounds in asked.values()):
            raise CheckpointError(f"checkpoint {self.dir / 'state.json'} is damaged: "
                                  "its unanswered rounds are not lists of round numbers")
        try:
            weights = read_npz(self.dir / state["model"])
        except ValueError as exc:
            raise CheckpointError(f"checkpointed model unreadable: {exc}") from None
        if weights.keys() != set(model_keys):
            raise CheckpointError("the checkpointed model does not match this run's model")
        return state, weights
