"""A hospital's failure reply carries only what bract wrote for the coordinator: the
public reason of bract's own errors and the message of its refusals. Any other
exception (an OSError naming the hospital's state directory, an out-of-memory error
naming an allocation that gives away its Poisson batch and so its record count)
leaves as its type, its whole message staying in the hospital's own log."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from torch import nn

from bract import tasks
from bract.data import DataError
from bract.flower.app import client_app, dataset_source, hospital_setup
from bract.flower.client import PrivacyPolicy, failure_reason, make_client_app, privacy_dir
from bract.flower.hospital_policy import PolicyRefusal
from bract.flower.reasons import PRIVATE_DETAILS, public
from bract.flower.records import GLOBAL_WEIGHTS, ROUND_CONFIG, weights_to_record
from bract.flower.secagg_client import PlainAggregationRefused
from bract.privacy import PrivacyError, weights_of
from bract.secagg.errors import ThresholdPolicyError

TASK = tasks.TaskConfig(dataset="breast-cancer", clients=3, batch_size=32, lr=0.2)
RUN_CONFIG = {"dataset": "breast-cancer", "secagg": False, "rounds": 1}


def _train_message() -> Message:
    content = RecordDict()
    content.array_records[GLOBAL_WEIGHTS] = weights_to_record(
        weights_of(tasks.build_model(TASK)))
    content.config_records[ROUND_CONFIG] = ConfigRecord({"round": 1, "run-id": "r1"})
    return Message(content, dst_node_id=7, message_type="train")


def _configured_hospital(tmp_path: Path) -> dict[str, object]:
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"allow_plain_aggregation": True}))
    return {"name": "st-mary", "state-dir": str(tmp_path / "St_Mary_state"),
            "policy": str(policy), "partition-id": 0, "num-partitions": 3}


def test_an_os_error_naming_the_hospitals_state_dir_leaves_as_its_type_only(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The hospital's own privacy-state.json cannot be read (here: it is a folder; the
    same holds for a permission error): the reply names the error's type, never the
    state directory; the hospital's log has the whole message."""
    node_config = _configured_hospital(tmp_path)
    task = tasks.TaskConfig.for_dataset("breast-cancer", clients=3)
    home = privacy_dir(Path(str(node_config["state-dir"])), dataset_source(task))
    (home / "privacy-state.json").mkdir(parents=True)
    ctx = Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(),
                  run_config=dict(RUN_CONFIG))
    with caplog.at_level(logging.WARNING, logger="bract"):
        reply = client_app(_train_message(), ctx)
    assert reply.has_error()
    assert reply.error.reason == f"IsADirectoryError ({PRIVATE_DETAILS})"
    assert "St_Mary" not in reply.error.reason and str(tmp_path) not in reply.error.reason
    assert str(home / "privacy-state.json") in caplog.text  # the hospital's own log


class _OutOfMemory(nn.Module):
    """A model whose forward pass fails as torch does when a batch does not fit: the
    message names the allocation, a multiple of the batch's size."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = tasks.build_model(TASK)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError(f"[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: "
                           f"not enough memory: you tried to allocate {len(x) * 28311552} "
                           "bytes.")


def test_an_out_of_memory_error_naming_the_batch_leaves_as_its_type_only(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    def setup(ctx: Context):
        base = hospital_setup(TASK, ctx)
        base.model = _OutOfMemory()
        base.optimizer = torch.optim.SGD(base.model.parameters(), lr=0.1)
        return base

    app = make_client_app(setup, PrivacyPolicy(target_epsilon=4.0, delta=1e-5, rounds=1))
    ctx = Context(run_id=1, node_id=7, node_config={"partition-id": 0, "num-partitions": 3},
                  state=RecordDict(), run_config={})
    message = _train_message()
    message.content.array_records[GLOBAL_WEIGHTS] = weights_to_record(
        weights_of(_OutOfMemory()))
    with caplog.at_level(logging.WARNING, logger="bract"):
        reply = app(message, ctx)
    assert reply.has_error()
    assert reply.error.reason == f"RuntimeError ({PRIVATE_DETAILS})"
    assert "you tried to allocate" in caplog.text  # the hospital's own log has it all


def test_only_bracts_public_reasons_and_refusals_leave() -> None:
    path = "/srv/hospital/St_Mary/state/privacy-state.json"
    private = [PermissionError(13, "Permission denied", path),
               FileNotFoundError(2, "No such file or directory", path),
               RuntimeError("CUDA out of memory. Tried to allocate 7.03 GiB"),
               MemoryError("1843 records"), KeyError("label 7"),
               ValueError(f"cannot reshape array of size 1843 into shape (7,) at {path}"),
               DataError(f"{path}: 1843 images")]
    for exc in private:
        assert failure_reason(exc) == f"{type(exc).__name__} ({PRIVATE_DETAILS})"
    assert failure_reason(DataError(f"{path} is missing", public_reason="no data")) == "no data"
    assert failure_reason(public(ValueError("asks\nfor x"))) == "asks for x"
    assert failure_reason(public(OSError(path), "cannot read its state")) == (
        "cannot read its state")
    assert failure_reason(PolicyRefusal("refused: epsilon 9")) == (
        "PolicyRefusal: refused: epsilon 9")
    assert failure_reason(PlainAggregationRefused("refused: in clear")) == "refused: in clear"
    assert failure_reason(PrivacyError("budget spent")) == "budget spent"
    assert failure_reason(ThresholdPolicyError("t = 2 < 3")) == (
        "ThresholdPolicyError: t = 2 < 3")
    assert len(failure_reason(PolicyRefusal("y" * 1000))) == 300


def test_patient_grouping_refusals_leave_without_the_hospitals_counts() -> None:
    from bract.privacy.sampling import Patients, group_grad_samples

    with pytest.raises(PrivacyError) as mismatch:
        Patients.of(["p1", "p2", "p3"], 1843)
    layer = nn.Linear(2, 1)
    layer.weight.grad_sample = torch.zeros(1843, 1, 2)
    with pytest.raises(PrivacyError) as batch:
        group_grad_samples(layer, torch.zeros(1841, dtype=torch.int64))
    for refusal in (mismatch.value, batch.value):
        assert "1843" in str(refusal)  # the hospital's own log keeps the figures
        reason = failure_reason(refusal)
        assert reason and not any(ch.isdigit() for ch in reason)
