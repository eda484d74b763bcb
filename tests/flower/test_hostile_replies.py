"""One broken or hostile hospital never takes the federation down.

Whatever a hospital puts in its reply (any field of its privacy report, its weights
arrays, its metrics released in clear, its error reason), the federation finishes:
that hospital is recorded as failed with one bounded line of printable text, the
others' updates are averaged, report.json reads back strictly, and the checkpoint
resumes. The regression tests are the red team's crafted replies (T11, T20).
"""

from __future__ import annotations

import io
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bract.flower.client import HospitalSetup, PrivacyPolicy, make_client_app
from bract.flower.observer import RunObserver
from bract.flower.records import (
    AGGREGATED_METRICS,
    LOCAL_METRICS,
    LOCAL_WEIGHTS,
    PRIVACY_REPORT,
)
from bract.flower.server import ServerConfig, federated_evaluation, run_federation
from bract.records.report import read_report
from bract.records.text import MAX_TEXT, one_line
from tests.flower.conftest import FakeGrid

NODES = [101, 202, 303]
POLICY = PrivacyPolicy(target_epsilon=50.0, delta=1e-5, rounds=2, noise_multiplier=1.0,
                       accountant="rdp")
#: The longest failure reason the server records: a prefix and one bounded line.
LONGEST_REASON = MAX_TEXT + 40


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """The tiny hospitals train fastest on one thread (no pool to wake per batch)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _setup(ctx) -> HospitalSetup:
    """A tiny hospital (32 records, a linear model): a round takes milliseconds."""
    pid = int(ctx.node_config["partition-id"])
    g = torch.Generator().manual_seed(pid)
    x = torch.randn(32, 4, generator=g)
    y = torch.arange(32) % 3
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    return HospitalSetup(model, torch.optim.SGD(model.parameters(), lr=0.1),
                         DataLoader(TensorDataset(x, y), batch_size=8),
                         client_id=f"hospital-{pid}", public_size=40,
                         held_out=TensorDataset(x[:8], y[:8]))


def _initial() -> dict[str, np.ndarray]:
    torch.manual_seed(0)
    return {k: v.detach().numpy().copy() for k, v in nn.Linear(4, 3).state_dict().items()}


class _Hostile:
    """A hospital's whole ClientApp with its final reply to ``train`` rewritten by
    ``tamper``: a malicious hospital runs none of bract's client-side mods (its metrics
    guard included), so the tampering wraps them all."""

    def __init__(self, app, tamper) -> None:
        self.app, self.tamper = app, tamper

    def __call__(self, msg: Message, ctx) -> Message:
        reply = self.app(msg, ctx)
        if msg.metadata.message_type != "train":
            return reply
        out = self.tamper(reply, msg)
        return reply if out is None else out


def _grid(tamper, release: str = "none", crash_at_round: int | None = None) -> FakeGrid:
    """Three hospitals; hospital-0's replies to ``train`` go through ``tamper``."""
    apps = {n: make_client_app(_setup, POLICY, allow_plain_aggregation=True,
                               release_metrics=release) for n in NODES}
    apps[NODES[0]] = _Hostile(apps[NODES[0]], tamper)
    return FakeGrid(apps, crash_at_round=crash_at_round)


def _run(out: Path, grid: FakeGrid, *, rounds: int = 2, resume: bool = False,
         release: str = "none", show_progress: bool = False) -> dict[str, Any]:
    cfg = ServerConfig(rounds=rounds, num_clients=len(NODES), delta=POLICY.delta,
                       out_dir=out, node_wait_seconds=1, show_progress=show_progress,
                       resume=resume, run_config={"test": "hostile"},
                       save_model=out / "model.npz", release_metrics=release)
    return run_federation(grid, _initial(), lambda w: {"loss": 1.0, "accuracy": 0.5}, cfg)


def _report_field(key: str, value: Any):
    def tamper(reply: Message, msg: Message) -> None:
        if not reply.has_error() and PRIVACY_REPORT in reply.content.config_records:
            reply.content.config_records[PRIVACY_REPORT][key] = value
    return tamper


def _error(reason: str):
    def tamper(reply: Message, msg: Message) -> Message:
        return Message(Error(code=0, reason=reason), reply_to=msg)
    return tamper


def _metrics(values: dict[str, Any]):
    def tamper(reply: Message, msg: Message) -> None:
        if not reply.has_error() and LOCAL_WEIGHTS in reply.content.array_records:
            reply.content.metric_records[LOCAL_METRICS] = MetricRecord(values)
    return tamper


def _arrays(make):
    """Replace every array of the update by ``make(name, array)``."""
    def tamper(reply: Message, msg: Message) -> None:
        if reply.has_error() or LOCAL_WEIGHTS not in reply.content.array_records:
            return
        rec = reply.content.array_records[LOCAL_WEIGHTS]
        reply.content.array_records[LOCAL_WEIGHTS] = ArrayRecord(
            {k: make(k, v) for k, v in rec.items()})
    return tamper


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def _check_record(out: Path, hostile_failed: bool, rounds: int = 2) -> None:
    """The invariants of every run with one hostile hospital (hospital-0)."""
    report = read_report(out / "report.json", strict=True)  # reads back, strictly
    assert [r.round for r in report.rounds] == list(range(1, rounds + 1))
    assert report.final is not None  # the run finished and wrote its summary
    assert math.isfinite(report.final.epsilon) and not report.final.non_private
    assert (out / "model.npz").exists()
    for row in report.rounds:
        reasons = list(row.failed.items()) + [(c, v.reason) for c, v in row.per_client.items()]
        for who, why in reasons:
            assert one_line(who, 200) == who and one_line(why, LONGEST_REASON) == why
            assert len(why) <= LONGEST_REASON
        assert {"hospital-1", "hospital-2"} <= set(row.trained)
        if hostile_failed:
            assert len(row.failed) == 1 and "hospital-0" not in row.trained
            assert not {"hospital-1", "hospital-2"} & set(row.failed)


def _crash_then_resume(out: Path, tamper, release: str = "none") -> None:
    """Round 1 with the hostile reply, the server interrupted in round 2, then resumed
    from the checkpoint (the same hospitals, still hostile) to the end."""
    grid = _grid(tamper, release, crash_at_round=2)
    with pytest.raises(RuntimeError, match="injected server crash"):
        _run(out, grid, release=release)
    grid.crash_at_round = None
    _run(out, grid, resume=True, release=release)


# ------------------------------------------------------------------ the property

_NEST = st.sampled_from(["[" * 200_000, "{" * 50_000, '{"a":' * 100_000])
_NOT_NUMBER = st.one_of(st.text(max_size=20).filter(lambda t: t != "inf"),
                        st.lists(st.integers(0, 9), min_size=1, max_size=3), st.booleans(),
                        st.binary(max_size=8))
_BAD_TEXT = st.one_of(st.integers(), st.floats(), st.booleans(),
                      st.lists(st.integers(0, 9), min_size=1, max_size=3))
_BAD_COUNT = st.one_of(st.integers(max_value=-1), st.integers(2**53 + 1, 2**63 - 1),
                       st.floats(), _NOT_NUMBER)
_HOSTILE_TEXT = st.one_of(
    st.text(max_size=60),
    st.sampled_from(["boom [/bold]", "[red]x[/red", "\x1b[2K\r\x1b]8;;http://e/\x1b\\x",
                     "line\nbreak\u2028\u202eevil", "\x00\x9b31m"]),
    st.integers(1, 5).map(lambda k: "x\x1b" * (k * 300_000)))

_FIELD_CASES = st.one_of(
    st.tuples(st.sampled_from(["steps", "appended"]), _BAD_COUNT),
    st.tuples(st.just("weight-bound"), st.one_of(st.integers(max_value=0), st.floats(),
                                                 _NOT_NUMBER)),
    st.tuples(st.just("epsilon"), st.one_of(
        st.floats(max_value=-1e-9), st.just(math.nan), st.just(-math.inf),
        st.sampled_from(["nan", "-inf", "1e3"]), st.floats(0, 1e6).map(lambda v: v + 7.0),
        _NOT_NUMBER.filter(lambda v: not isinstance(v, str)))),
    st.tuples(st.just("noise-multiplier"), st.one_of(
        st.floats(max_value=-1e-9), st.just(math.nan), st.just(math.inf), _NOT_NUMBER)),
    st.tuples(st.just("sample-rate"), st.one_of(
        st.floats(max_value=-1e-9), st.floats(min_value=1.0 + 1e-9), st.just(math.nan),
        _NOT_NUMBER)),
    st.tuples(st.sampled_from(["ledger", "signed-ledger"]), st.one_of(
        _NEST, _BAD_TEXT, st.sampled_from(["not json", "[]", "1", "null", "{}"]))),
    st.tuples(st.just("decision"), st.one_of(_NEST, _BAD_TEXT,
                                             st.sampled_from(["[]", "1", "nope"]))),
    st.tuples(st.just("client-id"), st.one_of(
        _BAD_TEXT, st.sampled_from(["hospital-0\x1b[2K", "a\nb", " lead", "x" * 129]))),
    st.tuples(st.just("trained"), st.one_of(st.integers(), st.text(max_size=5))),
)


def _wire_ok(value: Any) -> bool:
    """Whether Flower's records can carry ``value`` at all (what a hospital can send)."""
    try:
        ConfigRecord({"k": value})
    except Exception:
        return False
    return True


_bad_arrays = st.one_of(
    st.binary(max_size=64).map(lambda b: lambda k, v: Array(dtype=v.dtype, shape=v.shape,
                                                            stype=v.stype, data=b)),
    st.sampled_from(["torch.raw", ""]).map(
        lambda s: lambda k, v: Array(dtype=v.dtype, shape=v.shape, stype=s, data=v.data)),
    st.sampled_from([np.float64, np.int32, np.object_]).map(
        lambda t: lambda k, v: Array(dtype=v.dtype, shape=v.shape, stype=v.stype,
                                     data=_npy(np.zeros(v.shape, t)))),
    st.just(lambda k, v: Array(dtype=v.dtype, shape=v.shape, stype=v.stype,
                               data=_npy(np.zeros((10**6,), np.float32))[:200])),
    st.just(lambda k, v: Array(dtype=v.dtype, shape=v.shape, stype=v.stype,
                               data=v.data[:-4])),
    st.just(lambda k, v: Array(dtype=v.dtype, shape=v.shape, stype=v.stype,
                               data=_npy(np.full(v.shape, np.nan, np.float32)))),
)

_bad_metrics = st.one_of(
    st.tuples(st.sampled_from(AGGREGATED_METRICS), st.one_of(
        st.just(math.inf), st.just(-math.inf), st.just(math.nan), st.just(1e30),
        st.integers(2**53 + 1, 2**63 - 1), st.lists(st.floats(0, 1), min_size=1, max_size=2))),
    st.tuples(st.just("eval-examples-2"), st.just(1.0)),
)

HOSTILE = st.one_of(
    st.tuples(st.just("report"), _FIELD_CASES.filter(lambda kv: _wire_ok(kv[1]))),
    st.tuples(st.just("error"), _HOSTILE_TEXT),
    st.tuples(st.just("reason"), _HOSTILE_TEXT),
    st.tuples(st.just("array"), _bad_arrays),
    st.tuples(st.just("metrics"), _bad_metrics),
)


def _tamper_of(kind: str, case: Any):
    if kind == "report":
        return _report_field(*case)
    if kind == "error":
        return _error(case)
    if kind == "reason":
        return _report_field("reason", case)
    if kind == "array":
        return _arrays(case)
    key, value = case
    honest = dict.fromkeys(AGGREGATED_METRICS, 1.0)
    return _metrics({**honest, key: value})


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(hostile=HOSTILE)
def test_no_reply_takes_the_federation_down(tmp_path_factory, hostile) -> None:
    """For any hostile value in any field of hospital-0's reply (privacy report fields,
    weights arrays, clear metrics, error reason, decision reason): the federation
    finishes and resumes after an interruption; hospital-0 is recorded as failed in
    every round (except for a decision reason, which is only sanitised) with one
    bounded line of printable text, the others are averaged; report.json reads back
    strictly with a finite epsilon."""
    kind, case = hostile
    out = tmp_path_factory.mktemp("hostile")
    with pytest.MonkeyPatch.context() as patch:  # plots are not the subject: no drawing
        patch.setattr(RunObserver, "draw_plots", staticmethod(lambda report, out_dir: None))
        _crash_then_resume(out, _tamper_of(kind, case), release="clear")
    _check_record(out, hostile_failed=kind != "reason")


# --------------------------------------------------------------- the red team's cases

@pytest.mark.parametrize("key,value", [
    ("steps", math.inf), ("steps", [1, 2]), ("noise-multiplier", [1.0]),
    ("weight-bound", math.inf), ("appended", math.nan), ("decision", "[" * 200_000),
    ("ledger", "[" * 200_000), ("epsilon", [1.0]), ("steps", -1), ("steps", 2**60),
    ("epsilon", "nan"), ("epsilon", "inf"), ("epsilon", -5.0),
])
def test_a_crafted_privacy_report_fails_only_that_reply(tmp_path, key, value) -> None:
    """The red team's privacy reports (t1, t5): each ended the federation or its
    final summary (an OverflowError, a TypeError, a RecursionError; a step count the
    report's reader refuses; a NaN or infinite epsilon marking the whole run
    NON-PRIVATE). Now the reply fails, named, and the run ends with its summary, its
    model and a finite epsilon."""
    _run(tmp_path, _grid(_report_field(key, value)))
    _check_record(tmp_path, hostile_failed=True)
    (why,) = read_report(tmp_path / "report.json").rounds[0].failed.values()
    assert (why.startswith("malformed reply: ") and f"'{key}'" in why) or "epsilon" in why


def test_bad_steps_leave_a_checkpoint_that_resumes(tmp_path) -> None:
    """t6: steps = -1 in round 1, then the server is interrupted: the checkpoint holds
    no refused value, and the resumed run finishes (it used to refuse the
    checkpointed line of hospital-0)."""
    _crash_then_resume(tmp_path, _report_field("steps", -1))
    _check_record(tmp_path, hostile_failed=True)


@pytest.mark.parametrize("values", [
    {"train-loss-sum": [1.0]}, {"eval-examples": math.inf, "eval-loss-sum": 1.0},
    {"eval-examples": 1e30, "eval-loss-sum": 1.0, "eval-correct": 1.0},
    {"train-examples": math.nan, "train-loss-sum": 1.0},
])
def test_crafted_clear_metrics_fail_only_that_reply(tmp_path, values) -> None:
    """t11: in a run that releases metrics in clear, a list, an infinite, NaN or 1e30
    released sum fails that reply (it ended the round loop, or the run's end, or
    wrote NaN into report.json); the honest hospitals' metrics still count."""
    honest = dict.fromkeys(AGGREGATED_METRICS, 1.0)
    _run(tmp_path, _grid(_metrics({**honest, **values}), release="clear"), release="clear")
    _check_record(tmp_path, hostile_failed=True)
    row = read_report(tmp_path / "report.json", strict=True).rounds[0]
    assert "released metric" in next(iter(row.failed.values()))
    assert row.train_loss is None or math.isfinite(row.train_loss)


def test_metrics_in_clear_are_not_used_when_the_run_does_not_release_them(tmp_path) -> None:
    """A hospital that sends metrics in clear to a run that does not release them: the
    server does not use them (and its update still counts)."""
    _run(tmp_path, _grid(_metrics(dict.fromkeys(AGGREGATED_METRICS, 1e6))))
    row = read_report(tmp_path / "report.json", strict=True).rounds[0]
    assert row.trained == ("hospital-0", "hospital-1", "hospital-2")
    assert row.train_loss is None and row.federated_eval is None


@pytest.mark.parametrize("kind", ["garbage", "stype", "pickle", "npz", "huge-header"])
def test_weights_that_are_not_a_npy_array_fail_only_that_reply(tmp_path, kind) -> None:
    """t16: weights whose bytes are not a .npy file (or a pickle, an .npz, a header
    declaring 10^12 elements) or whose serialisation type is not numpy's: the reply
    is refused before numpy reads it, named; the run goes on."""
    def make(k, v):
        data = {"garbage": b"not a npy file", "stype": v.data,
                "pickle": b"\x80\x04\x95", "npz": b"PK\x03\x04" + b"\0" * 40,
                "huge-header": _npy(np.zeros(0, np.float32)).replace(
                    b"(0,)", b"(1000000000000,)")}[kind]
        return Array(dtype=v.dtype, shape=v.shape,
                     stype="torch.raw" if kind == "stype" else v.stype, data=data)

    _run(tmp_path, _grid(_arrays(make)))
    _check_record(tmp_path, hostile_failed=True)
    (why,) = read_report(tmp_path / "report.json").rounds[0].failed.values()
    assert why.startswith("unusable update: ")


def test_markup_in_a_reason_does_not_stop_the_live_table(tmp_path) -> None:
    """t3: an error reason holding rich markup ('[/bold]') raised a MarkupError in the
    live table (the default display) and ended the run; it is shown as text."""
    _run(tmp_path, _grid(_error("boom [/bold] [red]")), show_progress=True)
    (why,) = read_report(tmp_path / "report.json").rounds[0].failed.values()
    assert why == "failed: boom [/bold] [red]"


def test_escape_sequences_never_reach_the_operator(tmp_path, caplog) -> None:
    """t13: an error reason of terminal escape sequences (erase the line, a hyperlink)
    reached the operator's log and report.json as it was; no control character does
    now."""
    evil = ("\x1b[2K\r\x1b[1A\x1b[2Kround 1: all 3 hospitals trained "
            "\x1b]8;;http://evil.example/\x1b\\details\x1b]8;;\x1b\\")
    with caplog.at_level(logging.WARNING, logger="bract.server"):
        _run(tmp_path, _grid(_error(evil)))
    assert "\x1b" not in caplog.text and "\r" not in caplog.text
    text = (tmp_path / "report.json").read_text()
    assert "\\u001b" not in text and "\\r" not in text
    _check_record(tmp_path, hostile_failed=True)


def test_a_huge_reason_is_recorded_bounded(tmp_path) -> None:
    """t12: a 4 MiB error reason every round made report.json and the checkpoint grow
    by 4 MiB a round (rewritten whole each round); it is recorded cut, saying so."""
    _run(tmp_path, _grid(_error("x" * 4 * 2**20)), rounds=2)
    assert (tmp_path / "report.json").stat().st_size < 64 * 2**10
    ckpt = sum(f.stat().st_size for f in (tmp_path / "checkpoint").rglob("*") if f.is_file())
    assert ckpt < 256 * 2**10
    for row in read_report(tmp_path / "report.json").rounds:
        (why,) = row.failed.values()
        assert why.endswith("(truncated)") and len(why) <= LONGEST_REASON


def test_an_unforeseen_exception_while_reading_a_reply_fails_only_that_reply(
        tmp_path, monkeypatch, caplog) -> None:
    """The containment boundary: whatever exception reading one reply raises (here a
    KeyError no reader foresaw), that hospital is recorded as failed with its type
    and the run goes on; the traceback is in the server's log."""
    import bract.flower.server as server

    real = server.read_privacy_report

    def fragile(content):
        rep = real(content)
        if rep["client_id"] == "hospital-0":
            raise KeyError("nobody foresaw this")
        return rep

    monkeypatch.setattr(server, "read_privacy_report", fragile)
    with caplog.at_level(logging.ERROR, logger="bract.server"):
        _run(tmp_path, _grid(lambda reply, msg: None))
    row = read_report(tmp_path / "report.json", strict=True).rounds[0]
    assert row.failed == {"node-101": "unreadable reply (KeyError; details in the server's "
                                      "log)"}
    assert "nobody foresaw this" in caplog.text and "Traceback" in caplog.text
    _check_record(tmp_path, hostile_failed=True)


def test_a_federated_evaluation_beyond_what_a_report_holds_is_none() -> None:
    """The released totals of several hospitals can pass 2**53 (secure sums too): the
    row then has no held-out figure rather than one report.json refuses."""
    big = {"eval-examples": 2.0**53 * 3, "eval-loss-sum": 1.0, "eval-correct": 1.0}
    assert federated_evaluation(2, big) is None
    assert federated_evaluation(2, {**big, "eval-examples": 10.0,
                                    "eval-loss-sum": math.inf}) is None
    ok = federated_evaluation(2, {**big, "eval-examples": 10.0})
    assert ok is not None and ok.examples == 10


@pytest.mark.parametrize("key,value", [("steps", math.inf), ("decision", "[" * 200_000)])
def test_a_crafted_privacy_report_fails_only_that_reply_in_a_secure_round(
        tmp_path, key, value) -> None:
    """t2: under secure aggregation the same crafted reports escaped the secure round
    (it catches only protocol errors) and ended the run; now that hospital is out of
    the round, named, and the others' masked sum is revealed."""
    from tests.flower.test_secure_federation import NON_PRIVATE
    from tests.flower.test_secure_federation import _run as run_secure

    def mod(msg, ctx, call_next):  # inside the secagg mod: the report it sends
        reply = call_next(msg, ctx)
        if int(ctx.node_config["partition-id"]) == 0 and msg.metadata.message_type == "train":
            _report_field(key, value)(reply, msg)
        return reply

    report, _, _ = run_secure(tmp_path, NON_PRIVATE, secure=True, rounds=1, extra_mods=[mod])
    row = report["rounds"][0]
    (why,) = row["failed"].values()
    assert why.startswith("malformed reply: ") and f"'{key}'" in why
    assert len(row["trained"]) >= 3 and row["secagg"]["aborted"] is None
    assert report["final"]["rounds_completed"] == 1
