"""The metrics release: bounded sensitivity per privacy unit, Gaussian noise of the
recorded scale, and an event the accountants, calibration and budget compose."""

from __future__ import annotations

import math

import dp_accounting as dpa
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats
from torch.utils.data import DataLoader, TensorDataset

from bract.privacy import (
    DpSgdEvent,
    MetricsRelease,
    PrivacyBudget,
    PrivacyError,
    PrivacyLedger,
    PrivateTrainer,
    TrainingPlan,
    calibrate,
    epsilon_of,
)
from bract.privacy.metrics_release import RELEASED_METRICS, UNIT_CLIP, per_record_metrics, unit_sums

losses = st.floats(allow_nan=True, allow_infinity=True, width=32)


@st.composite
def split_data(draw, patients: bool):
    n_train = draw(st.integers(0, 12))
    n_held = draw(st.integers(0, 12))
    train_loss = np.asarray(draw(st.lists(losses, min_size=n_train, max_size=n_train)))
    held_loss = np.asarray(draw(st.lists(losses, min_size=n_held, max_size=n_held)))
    held_correct = np.asarray(draw(st.lists(st.sampled_from([0.0, 1.0]), min_size=n_held,
                                            max_size=n_held)))
    bound = draw(st.floats(0.1, 10.0))
    if not patients:
        return train_loss, held_loss, held_correct, bound, None, None
    ids = st.integers(0, 4)  # few patients: many records each, in both splits
    train_ids = draw(st.lists(ids, min_size=n_train, max_size=n_train))
    held_ids = draw(st.lists(ids, min_size=n_held, max_size=n_held))
    return train_loss, held_loss, held_correct, bound, train_ids, held_ids


@settings(max_examples=300, deadline=None)
@given(split_data(patients=True), st.integers(0, 4))
def test_removing_a_patient_with_all_their_records_moves_the_sums_by_at_most_the_clip(
        data, patient) -> None:
    """The mechanism's sensitivity under patient-level privacy: whatever the losses
    (negative, huge, NaN, infinite) and however a patient's records spread over the
    two splits, removing the patient moves the scaled sums by at most UNIT_CLIP."""
    train_loss, held_loss, held_correct, bound, train_ids, held_ids = data
    full = unit_sums(train_loss, held_loss, held_correct, bound, train_ids, held_ids)
    keep_t = np.asarray([u != patient for u in train_ids], bool)
    keep_h = np.asarray([u != patient for u in held_ids], bool)
    without = unit_sums(train_loss[keep_t], held_loss[keep_h], held_correct[keep_h], bound,
                        [u for u in train_ids if u != patient],
                        [u for u in held_ids if u != patient])
    assert np.linalg.norm(full - without) <= UNIT_CLIP * (1 + 1e-12)


@settings(max_examples=300, deadline=None)
@given(split_data(patients=False), st.data())
def test_removing_one_record_moves_the_sums_by_at_most_the_clip(data, draw) -> None:
    train_loss, held_loss, held_correct, bound, _, _ = data
    n = len(train_loss) + len(held_loss)
    if n == 0:
        return
    i = draw.draw(st.integers(0, n - 1))
    full = unit_sums(train_loss, held_loss, held_correct, bound)
    if i < len(train_loss):
        without = unit_sums(np.delete(train_loss, i), held_loss, held_correct, bound)
    else:
        j = i - len(train_loss)
        without = unit_sums(train_loss, np.delete(held_loss, j), np.delete(held_correct, j),
                            bound)
    assert np.linalg.norm(full - without) <= UNIT_CLIP * (1 + 1e-12)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0, 4), max_size=20), st.lists(st.tuples(st.floats(0, 4),
                                                                    st.booleans()), max_size=20))
def test_records_within_the_bound_are_summed_exactly(train, held) -> None:
    """Records as units, losses within the bound: the sums before noise are exact."""
    held_loss = np.asarray([h[0] for h in held], float)
    correct = np.asarray([float(h[1]) for h in held])
    got = unit_sums(np.asarray(train, float), held_loss, correct, 4.0)
    want = [sum(train) / 4, len(train), held_loss.sum() / 4, correct.sum(), len(held)]
    assert got == pytest.approx(want, abs=1e-9)


def _task(n: int = 24, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g)
    y = (x[:, 0] > 0).long()
    model = torch.nn.Linear(5, 2)
    return model, TensorDataset(x, y)


def test_per_record_metrics_are_the_criterions_losses_and_the_argmax_hits() -> None:
    model, data = _task()
    loss, correct = per_record_metrics(model, torch.nn.CrossEntropyLoss(), data)
    x, y = data.tensors
    with torch.no_grad():
        out = model(x)
    assert loss == pytest.approx(torch.nn.functional.cross_entropy(
        out, y, reduction="none").numpy(), abs=1e-6)
    assert correct.tolist() == (out.argmax(1) == y).double().tolist()
    assert model.training  # the model's mode is restored


def test_the_released_noise_has_the_recorded_scale() -> None:
    """Released minus exact, over many releases, is N(0, (sigma * UNIT_CLIP * scale)^2)
    per coordinate: a chi-square test on the standardized residuals, at confidence
    1 - 1e-6 on both sides (too little noise would void the accounting)."""
    model, data = _task()
    held = TensorDataset(*(t[:10] for t in _task(10, seed=1)[1].tensors))
    release = MetricsRelease(noise_multiplier=3.0, loss_bound=4.0)
    crit = torch.nn.CrossEntropyLoss()
    tl, _ = per_record_metrics(model, crit, data)
    hl, hc = per_record_metrics(model, crit, held)
    exact = unit_sums(tl, hl, hc, 4.0) * np.array([4.0, 1, 4.0, 1, 1])
    scale = 3.0 * UNIT_CLIP * np.array([4.0, 1, 4.0, 1, 1])
    residuals = []
    for _ in range(300):
        got = release.release(model, crit, data, held)
        assert list(got) == list(RELEASED_METRICS)
        residuals.append((np.array(list(got.values())) - exact) / scale)
    z = np.concatenate(residuals)
    chi2 = float(np.sum(z**2))
    lo, hi = stats.chi2.ppf([1e-6, 1 - 1e-6], df=len(z))
    assert lo < chi2 < hi
    assert abs(float(np.mean(z))) < 6 / math.sqrt(len(z))


def test_patient_level_release_needs_the_held_out_records_patients() -> None:
    model, data = _task()
    held = _task(6, seed=2)[1]
    with pytest.raises(PrivacyError, match="held-out records name no patient"):
        MetricsRelease().release(model, None, data, held, train_units=list(range(24)))


def test_a_criterion_without_reduction_is_refused_by_name() -> None:
    model, data = _task()
    with pytest.raises(PrivacyError, match="no `reduction` attribute"):
        per_record_metrics(model, lambda out, y: out.sum(), data)


@pytest.mark.parametrize("bad", [0.0, -1.0, math.inf, math.nan, True])
def test_a_release_without_noise_is_refused(bad) -> None:
    with pytest.raises(PrivacyError, match="noise_multiplier must be a finite number > 0"):
        MetricsRelease(noise_multiplier=bad)


def test_the_event_is_the_gaussian_mechanism_for_every_accountant() -> None:
    """One release = the Gaussian mechanism of its noise multiplier, per dp_accounting."""
    event = MetricsRelease(noise_multiplier=4.0).event(round=2, delta=1e-5, client_id="h",
                                                       unit="record")
    assert (event.mechanism, event.sample_rate, event.steps) == ("metrics", 1.0, 1)
    assert event.max_grad_norm == UNIT_CLIP and not event.is_training
    acc = dpa.pld.PLDAccountant(value_discretization_interval=1e-4)
    acc.compose(dpa.GaussianDpEvent(4.0))
    reference = acc.get_epsilon(1e-5)
    for accountant in ("prv", "pld", "rdp"):
        got = epsilon_of([event], 1e-5, accountant)
        assert got >= reference * (1 - 1e-3)
        assert got <= reference * (1.2 if accountant == "rdp" else 1.01)
    assert DpSgdEvent.from_plain(event.to_plain()) == event
    with pytest.raises(PrivacyError, match="sample_rate 1 and steps 1"):
        DpSgdEvent(4.0, 0.5, 1, 1.0, 1e-5, mechanism="metrics")


def test_a_dpsgd_event_serializes_as_before_metrics_releases_existed() -> None:
    """Ledgers written before metrics releases hash and verify unchanged."""
    event = DpSgdEvent(1.0, 0.1, 10, 1.0, 1e-5, round=1, client_id="h")
    assert "mechanism" not in event.to_plain()
    assert DpSgdEvent.from_plain(event.to_plain()).mechanism == "dp-sgd"


def test_calibration_composes_the_planned_releases_and_lands_on_the_target() -> None:
    plan = TrainingPlan(rounds=3, local_epochs=1, dataset_size=500, batch_size=50)
    releases = [MetricsRelease(10.0).event(r, 1e-5, "", "record") for r in (1, 2, 3)]
    cal = calibrate(4.0, 1e-5, plan, accountant="pld", alongside=releases)
    plain = calibrate(4.0, 1e-5, plan, accountant="pld")
    assert cal.noise_multiplier > plain.noise_multiplier  # the releases cost budget
    events = [*releases, DpSgdEvent(cal.noise_multiplier, plan.sample_rate,
                                    plan.total_steps, 1.0, 1e-5)]
    eps = epsilon_of(events, 1e-5, "pld")
    assert 4.0 * 0.99 <= eps <= 4.0
    too_costly = [MetricsRelease(0.5).event(r, 1e-5, "", "record") for r in (1, 2, 3)]
    with pytest.raises(PrivacyError, match="metrics releases spend epsilon"):
        calibrate(4.0, 1e-5, plan, alongside=too_costly)


def test_the_budget_check_covers_the_release_and_the_ledger_records_it_first() -> None:
    model, data = _task(40)
    loader = DataLoader(data, batch_size=10)
    release = MetricsRelease(2.0).event(1, 1e-5, "h", "record")
    trainer = PrivateTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1), loader,
                             noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5,
                             client_id="h", grad_sample_mode="hooks")
    training_only = trainer.check_budget(1).epsilon_after
    both = trainer.check_budget(1, (release,)).epsilon_after
    assert both > training_only
    # A budget between the two: training alone would fit, training and release do not.
    trainer.budget = PrivacyBudget((training_only + both) / 2, 1e-5, trainer.accountant)
    refused = trainer.train_round(1, also=(release,))
    assert not refused.trained and trainer.ledger == PrivacyLedger("h")
    trainer.budget = PrivacyBudget(both * 1.01, 1e-5, trainer.accountant)
    done = trainer.train_round(1, also=(release,))
    assert done.trained and done.also == (release,)
    assert [e.mechanism for e in trainer.ledger.events] == ["metrics", "dp-sgd"]
    assert trainer.ledger.total_steps == done.event.steps  # a release is not a step
    assert done.epsilon == pytest.approx(trainer.epsilon())


def test_the_server_shows_released_figures_only_above_the_noise() -> None:
    from bract.flower.server import federated_evaluation, released_train_loss

    totals = {"train-loss-sum": 50.0, "train-examples": 100.0, "eval-loss-sum": 20.0,
              "eval-correct": 30.0, "eval-examples": 40.0}
    assert released_train_loss(totals, count_noise=30.0) == pytest.approx(0.5)
    assert released_train_loss(totals, count_noise=40.0) is None
    got = federated_evaluation(3, totals, count_noise=10.0)
    assert got is not None and (got.examples, got.accuracy) == (40, 0.75)
    assert federated_evaluation(3, totals, count_noise=20.0) is None
    noisy = {**totals, "eval-loss-sum": -5.0, "eval-correct": 55.0}
    got = federated_evaluation(3, noisy)
    assert got is not None and got.loss == 0.0 and got.accuracy == 1.0
