"""A coordinator's crafted global model cannot make a hospital's reply tell its data:
weights that hold NaN are refused before any record is read; weights whose loss
overflows on chosen records get the same reply (error or not, the same reason) from
neighbouring datasets, and where the hospital trains its update stays finite, so what
differs between them is only the DP-SGD update."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from torch import nn
from torch.utils.data import DataLoader, Dataset

from bract.flower.client import HospitalSetup, PrivacyPolicy, make_client_app
from bract.flower.records import (
    GLOBAL_WEIGHTS,
    LOCAL_WEIGHTS,
    PRIVACY_REPORT,
    ROUND_CONFIG,
    record_to_weights,
    weights_to_record,
)

FMAX = float(np.finfo(np.float32).max)


class Records(Dataset):
    """A hospital's records (4 features, 3 classes) that note which items were read."""

    def __init__(self, x: np.ndarray) -> None:
        self.x = torch.from_numpy(x.astype(np.float32))
        self.y = torch.arange(len(x)) % 3
        self.read: list[int] = []

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        self.read.append(int(i))
        return self.x[i], self.y[i]


def _app(data: Records, mode: str = "bk", release_metrics: str = "none"):
    def setup(_ctx: Context) -> HospitalSetup:
        torch.manual_seed(0)
        model = nn.Linear(4, 3)
        return HospitalSetup(model, torch.optim.SGD(model.parameters(), lr=0.1),
                             DataLoader(data, batch_size=8), client_id="st-mary",
                             public_size=40)

    policy = PrivacyPolicy(target_epsilon=8.0, delta=1e-5, rounds=20, noise_multiplier=1.0,
                           grad_sample_mode=mode, accountant="rdp")
    return make_client_app(setup, policy, allow_plain_aggregation=True,
                           release_metrics=release_metrics)


def _ask(app, weights: dict[str, np.ndarray], rnd: int = 1) -> Message:
    content = RecordDict()
    content.config_records[ROUND_CONFIG] = ConfigRecord({"round": rnd, "run-id": "r"})
    content.array_records[GLOBAL_WEIGHTS] = weights_to_record(weights)
    msg = Message(content, dst_node_id=7, message_type="train", group_id=str(rnd))
    ctx = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})
    return app(msg, ctx)


def _records(n: int = 32, seed: int = 0) -> np.ndarray:
    return np.tanh(np.random.default_rng(seed).standard_normal((n, 4))) * 3


def test_a_global_model_holding_nan_is_refused_before_any_record_is_read() -> None:
    data = Records(_records())
    app = _app(data)
    weights = {"weight": np.zeros((3, 4), np.float32),
               "bias": np.array([np.nan, 0.0, 0.0], np.float32)}
    reply = _ask(app, weights)
    assert reply.has_error()
    assert "global weights ['bias'] hold NaN or infinite values" in reply.error.reason
    assert data.read == []


@pytest.mark.parametrize("release_metrics", ["none", "clear"])
def test_weights_finite_only_in_float64_are_refused_before_any_record_is_read(
        release_metrics) -> None:
    """Float64 weights that are finite as sent but infinite in the model's float32
    (1e300) are refused, naming them, before any record is read: by the metrics
    release (which would run the model over every record) as by training."""
    data = Records(_records())
    app = _app(data, release_metrics=release_metrics)
    weights = {"weight": np.zeros((3, 4), np.float64),
               "bias": np.array([1e300, 0.0, 0.0], np.float64)}
    reply = _ask(app, weights)
    assert reply.has_error()
    assert "global weights ['bias'] hold NaN or infinite values" in reply.error.reason
    assert data.read == []


def _question(j: int, bound: float, sign: float) -> dict[str, np.ndarray]:
    """Loss NaN iff ``sign * x_j > bound`` (the red team's probe oracle)."""
    s = 1e36
    weight = np.zeros((3, 4), np.float32)
    weight[0, j] = sign * s
    return {"weight": weight, "bias": np.array([FMAX - s * bound, 0.0, 0.0], np.float32)}


def _canary(threshold: float) -> dict[str, np.ndarray]:
    """Loss NaN iff ``x_0 > threshold`` (the red team's NaN canary)."""
    weight = np.zeros((3, 4), np.float32)
    weight[0, 0] = FMAX / threshold
    return {"weight": weight, "bias": np.zeros(3, np.float32)}


def _reply(app, weights: dict[str, np.ndarray]) -> tuple[str, bool]:
    """The parts of a reply that are not the DP-SGD update: its error (or none), and
    whether it trained; a trained update must be finite."""
    reply = _ask(app, weights)
    if reply.has_error():
        return f"error: {reply.error.reason}", False
    trained = bool(reply.content.config_records[PRIVACY_REPORT]["trained"])
    if trained:
        update = record_to_weights(reply.content.array_records[LOCAL_WEIGHTS])
        assert all(np.isfinite(v).all() for v in update.values())
    return "no error", trained


@pytest.mark.parametrize("mode", ["bk", "hooks"])
def test_crafted_weights_get_the_same_reply_from_neighbouring_datasets(mode) -> None:
    """Two datasets that differ in one record (here the target: feature 0 at 20, or an
    ordinary record in its place): for the probe oracle's questions and the NaN canary
    every reply has the same error or none, and a trained update is finite."""
    x = _records()
    target = x.copy()
    target[1, 0] = 20.0
    questions = [_question(j, b, sign) for j in (0, 1) for sign in (1.0, -1.0)
                 for b in (0.0, 0.5, 2.0)] + [_canary(15.0)]
    ordinary = [_reply(_app(Records(x), mode), w) for w in questions]
    with_target = [_reply(_app(Records(target), mode), w) for w in questions]
    assert with_target == ordinary
    assert ordinary[-1] == ("no error", True)  # the canary's round trains, finite


def _probe_counts(monkeypatch, refuse: bool = False) -> list[int]:
    """Counts the weights-only probes of loaded global weights (one entry per call);
    with ``refuse`` each probe refuses the weights, as it would weights that mix."""
    from bract.privacy import PrivacyError
    from bract.privacy.training import PrivateTrainer

    calls: list[int] = []
    real = PrivateTrainer._probe_loaded_weights

    def counted(self) -> None:
        calls.append(1)
        if refuse:
            raise PrivacyError("the probe refuses these weights")
        real(self)

    monkeypatch.setattr(PrivateTrainer, "_probe_loaded_weights", counted)
    return calls


@pytest.mark.parametrize("release_metrics", ["none", "clear"])
def test_the_received_model_is_probed_once_a_round(release_metrics, monkeypatch) -> None:
    """With or without a metrics release, each round probes the global model it
    receives exactly once (the release and the training share the verdict), and the
    round still trains and, when asked, releases its metrics."""
    from bract.flower.records import LOCAL_METRICS

    calls = _probe_counts(monkeypatch)
    app = _app(Records(_records()), release_metrics=release_metrics)
    ctx = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})
    weights = {"weight": np.zeros((3, 4), np.float32), "bias": np.zeros(3, np.float32)}
    for rnd in (1, 2, 3):
        content = RecordDict()
        content.config_records[ROUND_CONFIG] = ConfigRecord({"round": rnd, "run-id": "r"})
        content.array_records[GLOBAL_WEIGHTS] = weights_to_record(weights)
        before = len(calls)
        reply = app(Message(content, dst_node_id=7, message_type="train",
                            group_id=str(rnd)), ctx)
        assert not reply.has_error(), reply.error.reason
        assert len(calls) - before == 1
        assert reply.content.config_records[PRIVACY_REPORT]["trained"]
        assert (LOCAL_METRICS in reply.content.metric_records) == (release_metrics != "none")
        weights = record_to_weights(reply.content.array_records[LOCAL_WEIGHTS])


@pytest.mark.parametrize("release_metrics", ["none", "clear"])
def test_a_probe_refusal_comes_before_the_release_and_the_training(
        release_metrics, monkeypatch) -> None:
    """Weights the probe refuses are refused before any record is read: neither the
    metrics release nor the training runs on them."""
    calls = _probe_counts(monkeypatch, refuse=True)
    data = Records(_records())
    reply = _ask(_app(data, release_metrics=release_metrics),
                 {"weight": np.zeros((3, 4), np.float32), "bias": np.zeros(3, np.float32)})
    assert reply.has_error() and "the probe refuses these weights" in reply.error.reason
    # Only record 0 was read, for its format (shape, dtype), when the trainer was built.
    assert calls == [1] and data.read == [0]


def test_a_trainer_probes_other_weights_than_those_it_loaded() -> None:
    """train_round reuses load_global_weights's verdict only for the very same weights:
    weights that differ in one value are checked (and refused) anew."""
    from bract.privacy import PrivacyError
    from bract.privacy.training import PrivateTrainer

    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    trainer = PrivateTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1),
                             DataLoader(Records(_records()), batch_size=8),
                             noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5,
                             accountant="rdp")
    good = {"weight": np.zeros((3, 4), np.float32), "bias": np.zeros(3, np.float32)}
    trainer.load_global_weights(good)
    bad = {"weight": good["weight"], "bias": np.array([np.inf, 0.0, 0.0], np.float32)}
    with pytest.raises(PrivacyError, match="hold NaN or infinite values"):
        trainer.train_round(1, bad)
