"""A damaged checkpoint (any bytes in state.json or the model file, any JSON value in
state.json) is refused with CheckpointError naming the file; nothing else escapes."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bract.explain import load_model_weights
from bract.flower.checkpoint import Checkpointer, CheckpointError
from bract.flower.files import read_npz

CONFIG = {"task": "breast-cancer", "eps": 4.0}
WEIGHTS = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.zeros(3, np.float32)}
STATE = {"report": {"rounds": []}, "chains": {}, "latest": {}, "stopped": {}, "metrics": {}}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)


def _saved(root: Path) -> Checkpointer:
    ckpt = Checkpointer(root, CONFIG)
    ckpt.save(2, WEIGHTS, STATE)
    return ckpt


def test_an_intact_checkpoint_restores() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        state, weights = _saved(Path(tmp)).restore(WEIGHTS.keys())
    assert state["completed_rounds"] == 2
    assert np.array_equal(weights["w"], WEIGHTS["w"])


@pytest.mark.parametrize("text", ["[]", "null", "3", '"x"', "{}", '{"config": []}',
                                  '{"config": {}, "model": "../x.npz", "completed_rounds": 1}'])
def test_state_json_of_the_wrong_shape_is_a_checkpoint_error(text: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = _saved(Path(tmp))
        (ckpt.dir / "state.json").write_text(text)
        with pytest.raises(CheckpointError, match=r"state\.json"):
            ckpt.restore(WEIGHTS.keys())


@pytest.mark.parametrize("value", [[1], {"hospital-1": 1}, {"hospital-1": ["1"]},
                                   {"hospital-1": [True]}, {"hospital-1": [1.5]}])
def test_unanswered_rounds_that_are_not_round_lists_are_a_checkpoint_error(value) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Checkpointer(Path(tmp), CONFIG)
        ckpt.save(2, WEIGHTS, {**STATE, "unanswered": value})
        with pytest.raises(CheckpointError, match="unanswered rounds"):
            ckpt.restore(WEIGHTS.keys())
        ckpt.save(2, WEIGHTS, {**STATE, "unanswered": {"hospital-1": [1, 2]}})
        assert ckpt.restore(WEIGHTS.keys())[0]["unanswered"] == {"hospital-1": [1, 2]}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=json_values, keep_config=st.booleans())
def test_any_json_value_in_state_json_restores_or_is_a_checkpoint_error(
    value: object, keep_config: bool
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = _saved(Path(tmp))
        if keep_config and isinstance(value, dict):
            value = {**value, "config": CONFIG}
        (ckpt.dir / "state.json").write_text(json.dumps(value))
        try:
            ckpt.restore(WEIGHTS.keys())
        except CheckpointError as exc:
            assert "\n" not in str(exc)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=400))
def test_any_bytes_in_state_json_is_a_checkpoint_error(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = _saved(Path(tmp))
        (ckpt.dir / "state.json").write_bytes(data)
        try:
            ckpt.restore(WEIGHTS.keys())
        except CheckpointError as exc:
            assert "state.json" in str(exc) and "\n" not in str(exc)


def _npz_bytes() -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        return _saved(Path(tmp)).dir.joinpath("global-round-2.npz").read_bytes()


NPZ = _npz_bytes()
npz_damage = st.one_of(
    st.binary(max_size=600),
    st.integers(0, len(NPZ) - 1).map(lambda n: NPZ[:n]),
    st.tuples(st.integers(0, len(NPZ) - 1), st.integers(0, 255)).map(
        lambda t: NPZ[:t[0]] + bytes([t[1]]) + NPZ[t[0] + 1:]),
    st.binary(max_size=200).map(lambda b: b"\x93NUMPY" + b),
    st.binary(max_size=200).map(lambda b: b"PK\x03\x04" + b),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=npz_damage)
def test_any_bytes_in_the_checkpointed_model_restore_or_are_a_checkpoint_error(
    data: bytes,
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = _saved(Path(tmp))
        (ckpt.dir / "global-round-2.npz").write_bytes(data)
        try:
            ckpt.restore(WEIGHTS.keys())
        except CheckpointError as exc:
            assert "global-round-2.npz" in str(exc) and "\n" not in str(exc)


def test_a_model_truncated_to_5000_bytes_names_the_file(tmp_path: Path) -> None:
    big = {"w": np.random.default_rng(0).normal(size=(60, 60)).astype(np.float32)}
    ckpt = Checkpointer(tmp_path, CONFIG)
    ckpt.save(1, big, STATE)
    model = ckpt.dir / "global-round-1.npz"
    model.write_bytes(model.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match=r"global-round-1\.npz is not a readable \.npz"):
        ckpt.restore(big.keys())


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=npz_damage)
def test_read_npz_reads_or_raises_value_error_naming_the_file(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.npz"
        path.write_bytes(data)
        try:
            read_npz(path)
        except ValueError as exc:
            assert str(path) in str(exc) and "\n" not in str(exc)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=npz_damage)
def test_explain_model_weights_of_any_bytes_are_a_clear_value_error(data: bytes) -> None:
    import torch.nn as nn

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.npz"
        path.write_bytes(data)
        with pytest.raises(ValueError, match=r"model\.npz"):
            load_model_weights(nn.Linear(3, 2), path)


@pytest.mark.parametrize("text", ["[]", "null"])
def test_bract_simulate_resume_from_a_damaged_state_is_one_error_line(
    text: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from bract.cli import main

    (tmp_path / "out" / "checkpoint").mkdir(parents=True)
    (tmp_path / "out" / "checkpoint" / "state.json").write_text(text)
    code = main(["simulate", "--dataset", "synthetic", "--samples", "2400", "--clients", "2",
                 "--rounds", "3", "--no-secagg", "--no-progress", "--resume",
                 "--out", str(tmp_path / "out")])
    out = "".join(capsys.readouterr().out.split())
    assert code == 2
    assert "error:checkpoint" in out and "state.jsonisdamaged" in out
