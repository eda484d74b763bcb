"""PrivateTrainer: rounds over one model object, budget refusals, empty batches, learning.

Where the accounting figure does not matter the trainers use the RDP accountant
(analytic, milliseconds); the PRV/PLD figures are tested in test_privacy_accounting.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bract.privacy import (
    PrivacyBudget,
    PrivacyError,
    PrivacyLedger,
    PrivateTrainer,
    load_weights,
    weights_of,
)
from tests.privacy.helpers import DP_WARNINGS, chest_loader, chest_tensors, small_cnn

pytestmark = DP_WARNINGS

MODES = ["hooks", "ghost", "bk"]


def _trainer(model: nn.Module, loader: DataLoader, lr: float = 0.1, **kwargs) -> PrivateTrainer:
    options = {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "delta": 1e-5, "accountant": "rdp"}
    options.update(kwargs)
    return PrivateTrainer(model, torch.optim.SGD(model.parameters(), lr=lr), loader, **options)


def _assert_no_opacus_leftovers(model: nn.Module) -> None:
    for name, module in model.named_modules():
        assert not module._forward_hooks, name
        assert not module._forward_pre_hooks, name
        assert not module._backward_hooks, name
        assert not module._backward_pre_hooks, name
    for p in model.parameters():
        assert getattr(p, "grad_sample", None) is None
        assert p.grad is None


def _finite(weights: dict[str, np.ndarray]) -> bool:
    return all(np.isfinite(v).all() for v in weights.values())


# ----------------------------------------------------- 9. weights survive the wrap cycle


@pytest.mark.parametrize("mode", MODES)
def test_three_rounds_on_one_model_keep_plain_keys_and_leave_no_hooks(mode: str) -> None:
    model = small_cnn()
    keys = list(model.state_dict())
    trainer = _trainer(model, chest_loader(120, 30), grad_sample_mode=mode)
    global_weights = trainer.weights()
    eps = []
    for r in (1, 2, 3):  # would raise "Trying to add hooks twice" if hooks stayed attached
        out = trainer.train_round(r, global_weights=global_weights)
        assert out.trained and out.event is not None and out.weights is not None
        assert list(out.weights) == keys and not any("_module." in k for k in out.weights)
        assert list(model.state_dict()) == keys
        assert _finite(out.weights)
        assert any(not np.array_equal(out.weights[k], global_weights[k]) for k in keys)
        _assert_no_opacus_leftovers(model)
        assert out.event.round == r and out.event.steps == 4 and out.num_examples == 120
        eps.append(out.epsilon)
        global_weights = out.weights
    assert [e.round for e in trainer.ledger.events] == [1, 2, 3]
    assert eps == sorted(eps) and eps[0] < eps[-1]
    assert eps[-1] == pytest.approx(trainer.epsilon())


@pytest.mark.parametrize("mode", MODES)
def test_round_starts_from_the_given_global_weights(mode: str) -> None:
    """Noise 0 (explicitly non-private) and lr 0: the round returns the global weights exactly."""
    model = small_cnn(seed=0)
    global_weights = weights_of(small_cnn(seed=1))
    assert any(
        not np.array_equal(global_weights[k], v) for k, v in weights_of(model).items()
    )
    budget = PrivacyBudget(epsilon=1.0, delta=1e-5, allow_non_private=True)
    trainer = _trainer(
        model, chest_loader(60, 20), lr=0.0, noise_multiplier=0.0, budget=budget,
        grad_sample_mode=mode,
    )
    for r in (1, 2):
        out = trainer.train_round(r, global_weights=global_weights)
        assert out.trained and out.decision.reason.startswith("NON-PRIVATE")
        assert out.epsilon == math.inf
        for k, v in global_weights.items():
            np.testing.assert_array_equal(out.weights[k], v)
        _assert_no_opacus_leftovers(model)


def test_load_weights_rejects_mismatched_names_and_shapes() -> None:
    model = small_cnn()
    weights = weights_of(model)
    with pytest.raises(PrivacyError, match="missing"):
        load_weights(model, {k: v for k, v in weights.items() if k != "features.0.bias"})
    with pytest.raises(PrivacyError, match="unexpected"):
        load_weights(model, {**weights, "_module.extra": np.zeros(1)})
    bad = dict(weights)
    bad["features.0.bias"] = np.zeros(3, dtype=np.float32)
    with pytest.raises(PrivacyError, match="shape"):
        load_weights(model, bad)


# -------------------------------------------------------------- 5. budget refusal in training


def test_trainer_trains_k_rounds_then_refuses_without_touching_anything() -> None:
    model = small_cnn()
    loader = chest_loader(60, 20)
    probe = _trainer(small_cnn(), loader)
    events = [probe.planned_event(r) for r in (1, 2, 3)]
    eps2 = PrivacyLedger(events=tuple(events[:2])).epsilon(1e-5, "rdp")
    eps3 = PrivacyLedger(events=tuple(events)).epsilon(1e-5, "rdp")
    budget = PrivacyBudget(epsilon=(eps2 + eps3) / 2, delta=1e-5, accountant="rdp")

    trainer = _trainer(model, loader, budget=budget)
    for r in (1, 2):
        assert trainer.train_round(r).trained
    ledger_before = trainer.ledger
    weights_before = trainer.weights()

    out = trainer.train_round(3)  # no exception: a refusal is data
    assert out.trained is False and out.weights is None and out.event is None
    assert out.num_examples == 0
    assert out.decision.allowed is False
    assert "budget" in out.decision.reason and f"{budget.epsilon:.4g}" in out.decision.reason
    assert out.epsilon == pytest.approx(eps2)
    assert trainer.ledger is ledger_before and len(trainer.ledger.events) == 2
    for k, v in trainer.weights().items():
        np.testing.assert_array_equal(v, weights_before[k])
    _assert_no_opacus_leftovers(model)


def test_trainer_refuses_noise_zero_under_a_budget_unless_allowed() -> None:
    model = small_cnn()
    before = weights_of(model)
    trainer = _trainer(
        model, chest_loader(40, 20), noise_multiplier=0.0,
        budget=PrivacyBudget(epsilon=1e6, delta=1e-5),
    )
    out = trainer.train_round(1)
    assert out.trained is False and "noise multiplier is 0" in out.decision.reason
    assert trainer.ledger.events == ()
    for k, v in weights_of(model).items():
        np.testing.assert_array_equal(v, before[k])


def test_outcome_epsilon_uses_the_trainers_accountant_even_if_budget_uses_another() -> None:
    budget = PrivacyBudget(epsilon=1e3, delta=1e-5, accountant="pld")
    trainer = _trainer(small_cnn(), chest_loader(40, 20), budget=budget, accountant="rdp")
    out = trainer.train_round(1)
    assert out.trained
    assert out.epsilon == pytest.approx(trainer.epsilon())
    assert out.epsilon == pytest.approx(trainer.ledger.epsilon(1e-5, "rdp"))


# ------------------------------------------------------------ 11. empty Poisson batches count


def test_steps_include_empty_poisson_batches() -> None:
    """batch_size 1 over 50 records: q = 1/50, 50 steps per epoch, ~36% of them empty."""
    x, y = chest_tensors(50)
    seen_sizes: list[int] = []
    cross_entropy = nn.CrossEntropyLoss()

    class Recording(nn.Module):
        def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            seen_sizes.append(len(target))
            return cross_entropy(logits, target)

    steps_seen: list[tuple[int, int]] = []
    trainer = _trainer(
        small_cnn(), DataLoader(TensorDataset(x, y), batch_size=1), lr=0.01,
        criterion=Recording(), local_epochs=2, grad_sample_mode="hooks",
    )
    out = trainer.train_round(1, on_step=lambda s, total: steps_seen.append((s, total)))
    assert out.event is not None and out.event.steps == 2 * 50
    assert out.event.sample_rate == pytest.approx(1 / 50)
    assert len(seen_sizes) == 100 and steps_seen[-1] == (100, 100)
    assert seen_sizes.count(0) > 0  # P(no empty batch in 100) = (1 - 0.98^50)^100 ~ 1e-20
    assert _finite(out.weights)
    assert math.isfinite(out.train_loss)


@pytest.mark.parametrize("mode", MODES)
def test_tiny_batches_do_not_crash_or_produce_nan(mode: str) -> None:
    trainer = _trainer(small_cnn(), chest_loader(20, 1), lr=0.01, grad_sample_mode=mode)
    for r in (1, 2):
        out = trainer.train_round(r)
        assert out.event is not None and out.event.steps == 20
        assert _finite(out.weights)


# ------------------------------------------------------------------------ 7. DP learns


def test_dp_training_lowers_held_out_loss_on_synthetic_xrays() -> None:
    """8 rounds of DP-SGD (sigma 1.0, C 1.0, secure noise) lower held-out cross-entropy.

    Untrained the loss is 1.18 (near ln 3 = 1.10); in repeated runs it ended at
    0.79-0.86. The bound (a drop of at least 0.1 nats) leaves a wide margin for
    the noise, which no seed controls (it comes from the OS via SecureGaussian).
    """
    x, y = chest_tensors(800, seed=1)
    train = DataLoader(TensorDataset(x[:600], y[:600]), batch_size=50)
    x_test, y_test = x[600:], y[600:]
    model = small_cnn(seed=0)

    def held_out_loss() -> float:
        model.eval()
        with torch.no_grad():
            return float(nn.functional.cross_entropy(model(x_test), y_test))

    before = held_out_loss()
    trainer = _trainer(model, train, noise_multiplier=1.0, lr=0.1)
    assert trainer.secure_noise
    for r in range(1, 9):
        assert trainer.train_round(r).trained
    after = held_out_loss()
    assert after < before - 0.1, (before, after)
    assert math.isfinite(trainer.epsilon()) and trainer.epsilon() > 0


# ------------------------------------------------------------------------- 10. bad input


def test_empty_partition_is_rejected_with_the_fix() -> None:
    empty = TensorDataset(torch.zeros(0, 1, 28, 28), torch.zeros(0, dtype=torch.long))
    with pytest.raises(PrivacyError, match="empty partition") as info:
        _trainer(small_cnn(), DataLoader(empty, batch_size=8), client_id="h7")
    assert "h7" in str(info.value) and "fewer hospitals" in str(info.value)


def test_batchnorm_model_is_rejected_naming_groupnorm() -> None:
    model = small_cnn()
    model.features[1] = nn.BatchNorm2d(8)
    with pytest.raises(PrivacyError, match="GroupNorm"):
        _trainer(model, chest_loader(20, 10))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"accountant": "gdp"}, "unknown accountant 'gdp'"),
        ({"grad_sample_mode": "functorch"}, "grad_sample_mode 'functorch' is not supported"),
        ({"noise_multiplier": -1.0}, "noise_multiplier must be a finite number >= 0"),
        ({"noise_multiplier": math.nan}, "noise_multiplier must be a finite number >= 0"),
        ({"max_grad_norm": 0.0}, "max_grad_norm must be > 0"),
        ({"delta": 0.0}, "delta must be a number strictly between 0 and 1"),
        ({"delta": 1.0}, "delta must be a number strictly between 0 and 1"),
        ({"local_epochs": 0}, "local_epochs must be an integer >= 1"),
    ],
)
def test_bad_trainer_parameters_are_rejected(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(PrivacyError, match=match):
        _trainer(small_cnn(), chest_loader(20, 10), **kwargs)


def test_bad_data_loaders_are_rejected() -> None:
    x, y = chest_tensors(20)
    data = TensorDataset(x, y)
    with pytest.raises(PrivacyError, match="drop_last=False"):
        _trainer(small_cnn(), DataLoader(data, batch_size=8, drop_last=True))
    with pytest.raises(PrivacyError, match="batch_size"):
        _trainer(small_cnn(), DataLoader(data, batch_size=None))
    with pytest.raises(PrivacyError, match="DataLoader"):
        _trainer(small_cnn(), data)  # type: ignore[arg-type]


def test_model_left_in_eval_mode_is_accepted_and_trained() -> None:
    """Regression: the validator's "needs training mode" must not read as a BatchNorm error."""
    model = small_cnn().eval()
    trainer = _trainer(model, chest_loader(40, 20))
    assert not model.training  # the check does not change the caller's mode
    assert trainer.train_round(1).trained


# ------------------------------------------- which records a step samples stays secret


def _sampled_ids(torch_seed: int, **kwargs) -> list[list[int]]:
    """Ids of the records each Poisson batch of one round held, after ``torch.manual_seed``."""
    seen: list[list[int]] = []

    class Recording(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(2, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append([int(v) for v in x[:, 0].tolist()])
            return self.lin(x)

    ids = torch.arange(64, dtype=torch.float32)
    x = torch.stack([ids, torch.zeros(64)], dim=1)
    y = (ids.long() % 2)
    torch.manual_seed(0)
    model = Recording()
    trainer = _trainer(model, DataLoader(TensorDataset(x, y), batch_size=8), lr=0.01,
                       grad_sample_mode="hooks", **kwargs)
    seen.clear()  # the sensitivity probe's forward passes
    torch.manual_seed(torch_seed)  # an application's (public) seed must not fix the batches
    trainer.train_round(1)
    return seen


def test_poisson_batches_do_not_follow_the_public_torch_seed() -> None:
    """Amplification by subsampling assumes the adversary cannot predict the batches:
    with the same public torch seed, two private rounds sample different records
    (P(equal) over 8 steps of 64 Bernoulli(1/8) draws is below 2^-100); only an
    explicit sampling seed, allowed without noise alone, makes them reproducible."""
    first, second = _sampled_ids(0), _sampled_ids(0)
    assert len(first) == len(second) == 8
    assert first != second
    seeded = {"noise_multiplier": 0.0, "sampling_seed": 7}
    assert _sampled_ids(0, **seeded) == _sampled_ids(1, **seeded)


class _DictItems(torch.utils.data.Dataset):
    """Items as Flower Datasets yields them after a transform: {"img": x, "label": y}."""

    def __init__(self, x, y) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return {"img": self.x[i], "label": int(self.y[i]), "id": i}


def test_dict_items_train_once_their_keys_are_named_and_train_as_the_same_pairs() -> None:
    """A dict dataset is refused with its keys named; with batch_keys it trains exactly
    as the same data given as (x, y) pairs (a non-private run with a fixed sampling
    seed is deterministic)."""
    from torch.utils.data import DataLoader, TensorDataset

    from bract.privacy import PrivacyError, PrivateTrainer, weights_of

    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 5, generator=gen), torch.randint(0, 2, (40,), generator=gen)

    def trained(loader, **kw):
        torch.manual_seed(0)
        model = torch.nn.Linear(5, 2)
        trainer = PrivateTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1), loader,
                                 noise_multiplier=0.0, max_grad_norm=1.0, delta=1e-5,
                                 sampling_seed=3, grad_sample_mode="hooks", **kw)
        trainer.budget = None
        assert trainer.train_round(1).trained
        return weights_of(model)

    dicts = DataLoader(_DictItems(x, y), batch_size=8)
    with pytest.raises(PrivacyError, match=r"a dict with keys \['id', 'img', 'label'\].*"
                                           r"batch_keys"):
        trained(dicts)
    with pytest.raises(PrivacyError, match=r"no key\(s\) \['image'\]; its keys are"):
        trained(dicts, batch_keys=("image", "label"))
    got = trained(dicts, batch_keys=("img", "label"))
    want = trained(DataLoader(TensorDataset(x, y), batch_size=8))
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])


def test_a_hospital_setup_reads_dict_items_for_training_and_its_held_out_split() -> None:
    from torch.utils.data import DataLoader

    from bract.flower.client import HospitalSetup
    from bract.privacy import MetricsRelease

    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(30, 5, generator=gen), torch.randint(0, 2, (30,), generator=gen)
    model = torch.nn.Linear(5, 2)
    setup = HospitalSetup(model, torch.optim.SGD(model.parameters(), lr=0.1),
                          DataLoader(_DictItems(x[:20], y[:20]), batch_size=5), "h",
                          held_out=_DictItems(x[20:], y[20:]), batch_keys=("img", "label"))
    xb, yb = next(iter(setup.train_loader))
    assert xb.shape == (5, 5) and yb.shape == (5,)
    released = MetricsRelease().release(model, None, setup.train_loader.dataset,
                                         setup.held_out)
    assert set(released) >= {"train-examples", "eval-examples"}


# ------------------------------------------- global weights that are not finite


def test_non_finite_global_weights_are_refused_before_the_data_is_read() -> None:
    """Global weights holding NaN or an infinity are refused naming them, before the
    probe, the budget check or any record: the refusal is a function of the
    coordinator's message alone. Nothing is recorded."""

    class Recorded(torch.utils.data.Dataset):
        def __init__(self) -> None:
            self.x, self.y = torch.randn(16, 4), torch.arange(16) % 3
            self.read: list[int] = []

        def __len__(self) -> int:
            return 16

        def __getitem__(self, i: int):
            self.read.append(int(i))
            return self.x[i], self.y[i]

    data = Recorded()
    model = nn.Linear(4, 3)
    trainer = _trainer(model, DataLoader(data, batch_size=4))
    data.read.clear()
    weights = weights_of(model)
    for bad in (np.nan, np.inf):
        crafted = {**weights, "bias": np.array([0.0, bad, 0.0], np.float32)}
        with pytest.raises(PrivacyError, match=r"global weights \['bias'\] hold NaN or "
                                               "infinite values"):
            trainer.train_round(1, global_weights=crafted)
    assert data.read == []
    assert trainer.ledger.events == ()
    assert trainer.train_round(1, global_weights=weights).trained


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("n", "batch"), [(49, 1), (98, 2)])
def test_sizes_whose_expected_batch_rounds_down_train_to_finite_weights(
        mode: str, n: int, batch: int) -> None:
    # 49 * (1/49) is 0.99999... in floating point: truncated, the step divided by 0.
    trainer = _trainer(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)),
                       DataLoader(TensorDataset(torch.randn(n, 4), torch.arange(n) % 2),
                                  batch_size=batch), lr=0.01, grad_sample_mode=mode)
    out = trainer.train_round(1)
    assert out.event is not None and out.event.steps == n // batch
    assert _finite(out.weights)


def test_weights_finite_in_float64_but_not_in_the_models_dtype_are_refused() -> None:
    """A float64 weight that is finite as sent and infinite in the model's float32
    (1e300) is refused like an infinite one, by the check and by load_weights, and
    the model keeps its weights."""
    from bract.privacy import PrivacyError, weights_of
    from bract.privacy.training import check_finite_weights

    model = nn.Linear(4, 3)
    weights = {k: v.astype(np.float64) for k, v in weights_of(model).items()}
    weights["bias"] = np.array([1e300, 0.0, 0.0])
    check_finite_weights(weights)  # finite as sent
    with pytest.raises(PrivacyError, match=r"global weights \['bias'\] hold NaN or "
                                           "infinite values"):
        check_finite_weights(weights, model)
    before = model.bias.detach().clone()
    with pytest.raises(PrivacyError, match=r"weight 'bias' holds values that are NaN or "
                                           r"infinite in the model's torch.float32"):
        load_weights(model, weights)
    assert torch.equal(model.bias.detach(), before)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_model_in_half_precision_is_refused_naming_the_fix(dtype: torch.dtype) -> None:
    """In float16 or bfloat16 the per-example norms and factors round by up to a percent
    (a red team measured terms of 1.013 C in bfloat16), so bract refuses such a model
    before any step instead of recording a clipping norm it does not keep."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2)).to(dtype)
    loader = DataLoader(TensorDataset(torch.randn(8, 4, dtype=dtype), torch.arange(8) % 2),
                        batch_size=4)
    with pytest.raises(PrivacyError, match=r"trainable parameters in .*16.*model\.float\(\)"):
        _trainer(model, loader)


# ------------------------------------------------ a round that stops part-way is accounted


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("stop_at", [1, 3, 7])
def test_a_round_that_stops_part_way_records_every_step_that_moved_the_model(
        mode: str, stop_at: int) -> None:
    # Whatever step a round stops at (here on_step raises after it), the ledger holds
    # exactly the steps taken, the weights the trainer keeps are the ones those steps
    # made, and a later round continuing from them composes on top: the ε reported after
    # it is the one for every step that shaped the released model.
    model = nn.Linear(6, 2)
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(80, 6), torch.randint(0, 2, (80,)))
    trainer = _trainer(model, DataLoader(data, batch_size=8), grad_sample_mode=mode)
    full = trainer.plan_per_round.batches_per_epoch  # one local epoch
    assert stop_at < full
    before = weights_of(model)

    def stop(step: int, _total: int) -> None:
        if step == stop_at:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        trainer.train_round(1, on_step=stop)
    (partial,) = trainer.ledger.events
    assert partial.steps == stop_at and partial.round == 1
    assert any(not np.array_equal(v, before[k]) for k, v in weights_of(model).items())
    out = trainer.train_round(2)  # continues from the partly trained model
    assert [e.steps for e in trainer.ledger.events] == [stop_at, full]
    reference = PrivacyLedger().append(partial).append(out.event)
    assert out.epsilon == pytest.approx(reference.epsilon(1e-5, "rdp"))


def test_a_round_that_fails_before_any_step_records_nothing() -> None:
    class Broken(TensorDataset):
        gone = False

        def __getitem__(self, i):
            if self.gone:
                raise OSError("the disk went away")
            return super().__getitem__(i)

    torch.manual_seed(0)
    model = nn.Linear(6, 2)
    before = weights_of(model)
    data = Broken(torch.randn(40, 6), torch.randint(0, 2, (40,)))
    trainer = _trainer(model, DataLoader(data, batch_size=8), grad_sample_mode="hooks")
    data.gone = True
    with pytest.raises(OSError, match="disk went away"):
        trainer.train_round(1)
    assert trainer.ledger.events == ()
    for k, v in weights_of(model).items():
        np.testing.assert_array_equal(v, before[k])


# ------------------------------------------------ what DP-SGD cannot sample as it says


@pytest.mark.parametrize("sampler", ["subset", "with-replacement", "fewer"])
def test_a_loader_whose_sampler_reads_part_of_the_data_is_refused(sampler: str) -> None:
    # Poisson sampling replaces the loader's sampler and reads the whole dataset: a
    # sampler that holds records out would have them trained on without a word.
    from torch.utils.data import RandomSampler, SubsetRandomSampler

    data = TensorDataset(torch.randn(100, 6), torch.randint(0, 2, (100,)))
    made = {"subset": lambda: SubsetRandomSampler(range(50)),
            "with-replacement": lambda: RandomSampler(data, replacement=True),
            "fewer": lambda: RandomSampler(data, num_samples=50)}[sampler]()
    with pytest.raises(PrivacyError, match=r"sampler .* would be replaced.*Subset"):
        _trainer(nn.Linear(6, 2), DataLoader(data, batch_size=10, sampler=made))
    for fine in (DataLoader(data, batch_size=10), DataLoader(data, batch_size=10,
                                                             shuffle=True)):
        _trainer(nn.Linear(6, 2), fine)


def test_a_dataset_without_a_length_is_refused_by_name() -> None:
    from torch.utils.data import IterableDataset

    class Stream(IterableDataset):
        def __iter__(self):
            yield from ((torch.randn(6), torch.tensor(i % 2)) for i in range(20))

    with pytest.raises(PrivacyError, match=r"dataset \(Stream\) has no length"):
        _trainer(nn.Linear(6, 2), DataLoader(Stream(), batch_size=5))


@pytest.mark.parametrize(("option", "value", "named"), [
    ("max_grad_norm", math.inf, "max_grad_norm must be > 0 and finite"),
    ("max_grad_norm", math.nan, "max_grad_norm must be > 0 and finite"),
    ("noise_multiplier", 1e300, "noise_multiplier 1e+300 is above 10000"),
    ("noise_multiplier", 1e5, "noise_multiplier 100000.0 is above 10000"),
])
def test_a_clip_that_bounds_nothing_or_noise_that_overflows_is_refused(
        option: str, value: float, named: str) -> None:
    data = TensorDataset(torch.randn(40, 6), torch.randint(0, 2, (40,)))
    with pytest.raises(PrivacyError, match=re.escape(named)):
        _trainer(nn.Linear(6, 2), DataLoader(data, batch_size=8), **{option: value})


def test_numpy_numbers_meet_the_same_bounds_and_delta() -> None:
    data = TensorDataset(torch.randn(40, 6), torch.randint(0, 2, (40,)))
    with pytest.raises(PrivacyError, match="is above 10000"):
        _trainer(nn.Linear(6, 2), DataLoader(data, batch_size=8),
                 noise_multiplier=np.float32(1e5))
    with pytest.raises(PrivacyError, match="max_grad_norm must be > 0 and finite"):
        _trainer(nn.Linear(6, 2), DataLoader(data, batch_size=8),
                 max_grad_norm=np.float32("inf"))
    trainer = _trainer(nn.Linear(6, 2), DataLoader(data, batch_size=8),
                       delta=np.float32(1e-5))
    assert trainer.delta == 1e-5 and trainer.planned_event(1).delta == 1e-5
