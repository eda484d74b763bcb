"""Book-keeping clipping leaves exactly Opacus's clipped gradient sum, in one backward pass."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus import PrivacyEngine
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bract.models import ChestCNN, TabularMLP
from bract.privacy import PrivacyError, PrivateTrainer, choose_grad_sample_mode
from bract.privacy.bookkeeping import BookKeepingClipper, supports_bookkeeping
from tests.privacy.helpers import DP_WARNINGS, chest_loader, small_cnn

pytestmark = DP_WARNINGS


def _reference(model: nn.Module, x: torch.Tensor, y: torch.Tensor, clip: float) -> dict:
    """sum_i min(1, C / (||g_i|| + 1e-6)) g_i with every g_i from autograd on example i alone."""
    m = copy.deepcopy(model)
    total: dict[str, torch.Tensor] = {}
    for i in range(len(x)):
        m.zero_grad()
        nn.functional.cross_entropy(m(x[i:i + 1]), y[i:i + 1]).backward()
        grads = {n: p.grad.clone() for n, p in m.named_parameters()}
        norm = torch.sqrt(sum((g ** 2).sum() for g in grads.values()))
        c = min(1.0, clip / (float(norm) + 1e-6))
        for n, g in grads.items():
            total[n] = total.get(n, 0) + c * g
    return total


def _opacus_ghost(model: nn.Module, x: torch.Tensor, y: torch.Tensor, clip: float) -> dict:
    """Opacus's two-pass ghost clipping: the .grad its optimizer then adds noise to."""
    m = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hooks, opt, crit, _ = PrivacyEngine().make_private(
            module=m, optimizer=torch.optim.SGD(m.parameters(), lr=0.1),
            data_loader=DataLoader(TensorDataset(x, y), batch_size=len(x)),
            criterion=nn.CrossEntropyLoss(), noise_multiplier=0.0, max_grad_norm=clip,
            grad_sample_mode="ghost", poisson_sampling=False, wrap_model=False,
        )
        opt.zero_grad()
        crit(m(x), y).backward()
    out = {n: p.grad.clone() for n, p in m.named_parameters()}
    hooks.cleanup()
    return out


def _bookkeeping(model: nn.Module, x: torch.Tensor, y: torch.Tensor, clip: float, *,
                 overlap: bool | None = None, groups: torch.Tensor | None = None,
                 steps: int = 1):
    """``steps`` backward passes of one clipper on a copy of ``model`` (a worker thread,
    when ``overlap`` starts one, is reused between them): the last .grad, factors and
    the copy."""
    m = copy.deepcopy(model)
    clipper = BookKeepingClipper(m, clip, overlap=overlap)
    try:
        for _ in range(steps):
            factors = clipper.backward(nn.CrossEntropyLoss(reduction="none")(m(x), y),
                                       len(x), groups=groups)
    finally:
        clipper.remove()
    return {n: p.grad.clone() for n, p in m.named_parameters()}, factors, m


def _model(kind: str, seed: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    if kind == "cnn":
        model = ChestCNN(image_size=12, channels=(4, 6), hidden=8)
        x = torch.randn(7, 1, 12, 12)
        return model, x, torch.randint(0, 3, (7,))
    if kind in ("inplace", "inplace-first"):  # in-place activations overwrite hooked outputs
        first = [nn.ReLU(inplace=True)] if kind == "inplace-first" else []
        model = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), *first, nn.GroupNorm(2, 4),
            nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(4 * 6 * 6, 5),
            nn.ReLU(inplace=True), nn.Linear(5, 3),
        )
        return model, torch.randn(7, 1, 6, 6), torch.randint(0, 3, (7,))
    if kind == "embedding":  # integer input: no leaf to stop the backward pass at
        model = nn.Sequential(nn.Embedding(20, 5), nn.Flatten(), nn.Linear(4 * 5, 3))
        return model, torch.randint(0, 20, (7, 4)), torch.randint(0, 3, (7,))
    if kind == "sequence":  # a Linear over [B, T, d]: per-position rows of one example
        model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 5, 3))
        return model, torch.randn(7, 4, 6), torch.randint(0, 3, (7,))
    model = TabularMLP(10, 3, hidden=12) if kind == "mlp" else nn.Linear(10, 3)
    return model, torch.randn(7, 10), torch.randint(0, 3, (7,))


KINDS = ["cnn", "mlp", "linear", "inplace", "inplace-first", "embedding", "sequence"]


@settings(max_examples=40, deadline=None)
@given(kind=st.sampled_from(KINDS), seed=st.integers(0, 2**16),
       clip=st.sampled_from([1e-3, 0.1, 1.0, 1e4]))
def test_clipped_sum_equals_per_example_reference_and_opacus_ghost(kind, seed, clip) -> None:
    model, x, y = _model(kind, seed)
    ours, factors, _ = _bookkeeping(model, x, y, clip)
    reference = _reference(model, x, y, clip)
    # Opacus's full backward hooks refuse an in-place change to a hooked output.
    ghost = _opacus_ghost(model, x, y, clip) if "inplace" not in kind else reference
    assert factors.shape == (len(x),) and bool(((factors > 0) & (factors <= 1)).all())
    for name, expected in reference.items():
        torch.testing.assert_close(ours[name], expected, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(ours[name], ghost[name], rtol=1e-4, atol=1e-6)


def test_an_input_that_requires_grad_gives_the_same_clipped_sum() -> None:
    """The user's input carries a gradient (e.g. adversarial training): same result."""
    model, x, y = _model("mlp", 5)
    ours, _, _ = _bookkeeping(model, x.clone().requires_grad_(), y, 0.1)
    for name, expected in _reference(model, x, y, 0.1).items():
        torch.testing.assert_close(ours[name], expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", ["cnn", "inplace"])
def test_the_pass_never_computes_a_parameters_own_gradient(kind) -> None:
    """Only the clipped sum reaches .grad: autograd never accumulates a parameter's
    unclipped gradient (which book-keeping would discard), so that work is skipped."""
    model, x, y = _model(kind, 1)
    accumulated: list[str] = []
    for name, p in model.named_parameters():
        p.register_post_accumulate_grad_hook(lambda _p, name=name: accumulated.append(name))
    clipper = BookKeepingClipper(model, 1.0)
    clipper.backward(nn.CrossEntropyLoss(reduction="none")(model(x), y), len(x))
    clipper.remove()
    assert accumulated == []
    assert all(p.grad is not None for p in model.parameters())


def test_group_norms_use_the_statistics_of_their_forward_pass(monkeypatch) -> None:
    """Book-keeping takes each GroupNorm's per-example gradients from the mean and
    1/std its forward pass saved, never normalising the input a second time (the
    clipped sum itself is checked against the references above); where those
    statistics are not there, it falls back to the registered rule."""
    from bract.privacy import bookkeeping, grad_samplers

    grad_samplers.install()
    model, x, y = _model("cnn", 3)
    expected, _, _ = _bookkeeping(model, x, y, 0.5)
    from opacus.grad_sample.grad_sample_module import GradSampleHooks

    normalised: list[torch.Size] = []

    def normalising_rule(layer, activations, backprops):
        normalised.append(activations[0].shape)
        return grad_samplers.group_norm_grad_sample(layer, activations, backprops)

    monkeypatch.setitem(GradSampleHooks.GRAD_SAMPLERS, nn.GroupNorm, normalising_rule)
    ours, _, _ = _bookkeeping(model, x, y, 0.5)
    assert normalised == []
    for name, value in expected.items():
        torch.testing.assert_close(ours[name], value, rtol=1e-5, atol=1e-7)
    # Without saved statistics (e.g. another autograd node), the input is normalised.
    monkeypatch.setattr(bookkeeping, "_group_norm_stats", lambda output, groups: None)
    fallback, _, _ = _bookkeeping(model, x, y, 0.5)
    assert len(normalised) == 2  # the two GroupNorms of the ChestCNN
    for name, value in expected.items():
        torch.testing.assert_close(fallback[name], value, rtol=1e-5, atol=1e-7)


def test_group_norm_statistics_are_read_only_from_a_group_norm_node() -> None:
    from bract.privacy.bookkeeping import _group_norm_stats

    layer = nn.GroupNorm(2, 4)
    x = torch.randn(3, 4, 5, requires_grad=True)
    mean, rstd = _group_norm_stats(layer(x), 2)
    xg = x.detach().reshape(3, 2, -1)
    torch.testing.assert_close(mean, xg.mean(2))
    torch.testing.assert_close(rstd, (xg.var(2, unbiased=False) + layer.eps).rsqrt())
    assert _group_norm_stats(torch.relu(layer(x)), 2) is None  # not the layer's node
    assert _group_norm_stats(layer(x), 4) is None  # shapes that do not fit


def test_every_example_is_clipped_to_the_norm() -> None:
    """One example per batch: the clipped sum IS its clipped gradient, norm <= C."""
    model, x, y = _model("cnn", 3)
    for i in range(len(x)):
        grads, factors, _ = _bookkeeping(model, x[i:i + 1], y[i:i + 1], 0.05)
        norm = torch.sqrt(sum((g ** 2).sum() for g in grads.values()))
        assert float(norm) <= 0.05 * (1 + 1e-5) and float(factors[0]) < 1


def test_an_empty_batch_leaves_zero_gradients() -> None:
    model, x, y = _model("cnn", 0)
    clipper = BookKeepingClipper(model, 1.0)
    out = model(x[:0])
    clipper.backward(nn.CrossEntropyLoss(reduction="none")(out, y[:0]), 0)
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())
    clipper.remove()


def test_hooks_come_off_and_nothing_is_kept_between_steps() -> None:
    model, x, y = _model("mlp", 0)
    clipper = BookKeepingClipper(model, 1.0)
    for _ in range(2):
        clipper.backward(nn.CrossEntropyLoss(reduction="none")(model(x), y), len(x))
        st = clipper._state()
        assert not st.inputs and not st.rules and not st.group_norm_stats
    clipper.remove()
    assert all(not m._forward_hooks and not m._backward_hooks for m in model.modules())
    assert clipper._worker is None  # no second thread is left behind


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(torch.relu(self.layer(x)))


class _Scale(nn.Module):  # a trainable layer Opacus has no per-sample rule for
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.w


def test_weight_tying_and_unknown_layers_are_refused_by_name() -> None:
    tied = _Tied()
    clipper = BookKeepingClipper(tied, 1.0)
    with pytest.raises(ValueError, match="layer layer ran twice"):
        tied(torch.randn(3, 4))
    clipper.remove()
    shared = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    shared[2].weight = shared[0].weight  # one Parameter in two layers
    with pytest.raises(ValueError, match="layers 0 and 2 share a parameter"):
        BookKeepingClipper(shared, 1.0)
    assert not supports_bookkeeping(shared) and choose_grad_sample_mode(shared) == "hooks"
    odd = nn.Sequential(nn.Linear(4, 4), _Scale())
    assert not supports_bookkeeping(odd)
    with pytest.raises(ValueError, match=r"no per-example rule for: 1 \(_Scale\)"):
        BookKeepingClipper(odd, 1.0)
    assert choose_grad_sample_mode(odd) == "hooks"
    # Never ghost clipping, whose second pass recomputes the output gradients, even
    # for a large Linear layer (1.1M weights) next to a layer book-keeping cannot clip.
    assert choose_grad_sample_mode(nn.Sequential(nn.Linear(1100, 1000), _Scale())) == "hooks"


def test_a_loss_that_is_not_per_example_is_refused() -> None:
    model, x, y = _model("mlp", 0)
    clipper = BookKeepingClipper(model, 1.0)
    with pytest.raises(ValueError, match="one loss per example"):
        clipper.backward(nn.CrossEntropyLoss()(model(x), y), len(x))
    clipper.remove()


def test_auto_picks_bookkeeping_for_bracts_models_and_hooks_for_a_criterion_without_reduction(
) -> None:
    assert choose_grad_sample_mode(ChestCNN(image_size=128)) == "bk"
    assert choose_grad_sample_mode(TabularMLP(30, 2)) == "bk"

    class NoReduction(nn.Module):
        def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            return nn.functional.cross_entropy(logits, target)

    assert choose_grad_sample_mode(small_cnn(), "auto", NoReduction()) == "hooks"
    assert choose_grad_sample_mode(small_cnn(), "auto", nn.CrossEntropyLoss()) == "bk"


def test_a_criterion_that_ignores_reduction_none_is_refused_not_mis_clipped() -> None:
    class BatchMean(nn.Module):  # has `reduction` but always averages the batch
        reduction = "mean"

        def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            return nn.functional.cross_entropy(logits, target)

    model = small_cnn()
    for mode in ("bk", "ghost"):
        # Refused before any step: the sensitivity probe sees no per-example loss.
        with pytest.raises(PrivacyError, match="one value per example"):
            PrivateTrainer(
                model, torch.optim.SGD(model.parameters(), lr=0.1), chest_loader(40, 20),
                noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5, accountant="rdp",
                criterion=BatchMean(), grad_sample_mode=mode,
            )


def test_a_bookkeeping_round_records_the_same_event_as_a_ghost_round() -> None:
    events = {}
    for mode in ("bk", "ghost"):
        model = small_cnn(seed=1)
        trainer = PrivateTrainer(
            model, torch.optim.SGD(model.parameters(), lr=0.1), chest_loader(90, 30),
            noise_multiplier=1.1, max_grad_norm=0.5, delta=1e-5, accountant="rdp",
            grad_sample_mode=mode,
        )
        out = trainer.train_round(1)
        assert out.trained and trainer.grad_sample_mode == mode
        events[mode] = out.event
    assert events["bk"] == events["ghost"]


def test_forcing_bookkeeping_on_a_tied_model_is_refused_before_any_training() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(30, 30), nn.ReLU(), nn.Linear(30, 30), nn.Linear(30, 2))
    model[2].weight = model[0].weight
    x, y = torch.randn(40, 30), torch.randint(0, 2, (40,))
    loader = DataLoader(TensorDataset(x, y), batch_size=20)
    with pytest.raises(PrivacyError, match="layers 0 and 2 share a parameter"):
        PrivateTrainer(
            model, torch.optim.SGD(model.parameters(), lr=0.1), loader, noise_multiplier=1.0,
            max_grad_norm=1.0, delta=1e-5, accountant="rdp", grad_sample_mode="bk",
        )
    assert all(not m._forward_hooks and not m._backward_hooks for m in model.modules())


def _one_full_batch_step(mode: str, sigma: float) -> dict[str, torch.Tensor]:
    """One DP-SGD step through PrivateTrainer on 64 examples at batch 64 (Poisson rate
    1: every example, exactly one step), lr 1: the update is -(clipped sum + noise)/64."""
    model = small_cnn(seed=3)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = PrivateTrainer(
        model, torch.optim.SGD(model.parameters(), lr=1.0), chest_loader(64, 64),
        noise_multiplier=sigma, max_grad_norm=0.5, delta=1e-5, accountant="rdp",
        grad_sample_mode=mode,
    )
    assert trainer.train_round(1).event.steps == 1
    return {n: start[n] - p.detach() for n, p in model.named_parameters()}


def test_a_bookkeeping_step_through_the_optimizer_equals_ghost_and_adds_the_noise_once() -> None:
    # Without noise the optimizer's update is exactly Opacus's ghost-clipping update
    # (the clipped sum handed over without a copy is neither scaled twice nor lost).
    clean = _one_full_batch_step("bk", 0.0)
    ghost = _one_full_batch_step("ghost", 0.0)
    for name, delta in clean.items():
        torch.testing.assert_close(delta, ghost[name], rtol=1e-4, atol=1e-7)
    # With noise, update - clean update = noise / 64 with std sigma * C / 64: added
    # once (std would be sqrt(2) times larger if added twice, 64 times if not scaled).
    sigma, clip = 2.0, 0.5
    noisy = _one_full_batch_step("bk", sigma)
    noise = torch.cat([(noisy[n] - clean[n]).flatten() for n in clean])
    expected = sigma * clip / 64
    n = noise.numel()
    assert abs(float(noise.std()) / expected - 1.0) < 6.0 * (1.0 / (2 * n)) ** 0.5


def _patient_reference(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                       groups: torch.Tensor, clip: float) -> dict:
    """sum_p min(1, C / (||G_p|| + 1e-6)) G_p, G_p = the sum of patient p's records'
    gradients, each from autograd on that record alone."""
    m = copy.deepcopy(model)
    per_patient: dict[int, dict[str, torch.Tensor]] = {}
    for i in range(len(x)):
        m.zero_grad()
        nn.functional.cross_entropy(m(x[i:i + 1]), y[i:i + 1]).backward()
        sums = per_patient.setdefault(int(groups[i]), {})
        for n, p in m.named_parameters():
            sums[n] = sums.get(n, 0) + p.grad.clone()
    total: dict[str, torch.Tensor] = {}
    for grads in per_patient.values():
        norm = torch.sqrt(sum((g ** 2).sum() for g in grads.values()))
        c = min(1.0, clip / (float(norm) + 1e-6))
        for n, g in grads.items():
            total[n] = total.get(n, 0) + c * g
    return total


@settings(max_examples=40, deadline=None)
@given(kind=st.sampled_from(KINDS), seed=st.integers(0, 2**16),
       clip=st.sampled_from([1e-3, 0.1, 1.0, 1e4]),
       owners=st.lists(st.integers(0, 3), min_size=7, max_size=7),
       whole_batch_gram=st.booleans())
def test_patient_groups_clip_each_patients_summed_gradient_in_one_pass(
        kind, seed, clip, owners, whole_batch_gram) -> None:
    """Book-keeping with patient groups: the .grad left is sum_p clip(sum_{i in p} g_i)
    (the autograd reference above), for every layer kind, including a Linear over
    sequences whose cross-record terms within a patient count; both ways of forming
    a Linear's Gram sums (one matrix for the batch, or one per patient) are checked."""
    from bract.privacy import norm_bounds

    model, x, y = _model(kind, seed)
    _, groups = torch.unique(torch.tensor(owners), return_inverse=True)
    m = copy.deepcopy(model)
    clipper = BookKeepingClipper(m, clip)
    saved = norm_bounds.GRAM_ROWS
    norm_bounds.GRAM_ROWS = saved if whole_batch_gram else 0
    try:
        factors = clipper.backward(nn.CrossEntropyLoss(reduction="none")(m(x), y), len(x),
                                   groups=groups)
    finally:
        norm_bounds.GRAM_ROWS = saved
        clipper.remove()
    reference = _patient_reference(model, x, y, groups, clip)
    assert factors.shape == (len(x),)
    for i in range(len(x)):  # one factor per patient, shared by its records
        assert bool((factors[groups == groups[i]] == factors[i]).all())
    for name, expected in reference.items():
        torch.testing.assert_close(m.get_parameter(name).grad, expected, rtol=1e-4, atol=1e-6)


# ------------------------------------------------ per-example rules on a second thread

@settings(max_examples=30, deadline=None)
@given(kind=st.sampled_from(KINDS), seed=st.integers(0, 2**16),
       clip=st.sampled_from([1e-3, 0.1, 1.0, 1e4]),
       owners=st.none() | st.lists(st.integers(0, 3), min_size=7, max_size=7))
def test_rules_on_a_second_thread_give_the_same_bits(kind, seed, clip, owners) -> None:
    """With ``overlap`` the per-example rules run on a worker thread while the backward
    pass goes on: every .grad and every clipping factor is bit for bit the one the
    rules give inside the pass, with or without patient groups."""
    model, x, y = _model(kind, seed)
    groups = None if owners is None else torch.unique(torch.tensor(owners),
                                                      return_inverse=True)[1]
    serial, serial_factors, _ = _bookkeeping(model, x, y, clip, overlap=False, groups=groups,
                                             steps=2)
    overlapped, overlapped_factors, _ = _bookkeeping(model, x, y, clip, overlap=True,
                                                     groups=groups, steps=2)
    assert torch.equal(serial_factors, overlapped_factors)
    for name, grad in serial.items():
        assert torch.equal(grad, overlapped[name]), name


def test_rules_overlap_by_default_only_when_a_core_is_free(monkeypatch) -> None:
    """``overlap=None`` sends the rules to the worker thread when a core is free of
    torch's threads, and keeps them in the pass otherwise; True / False force it. The
    first layer's rule (fed by the input, where the pass ends) always runs in the pass:
    there is nothing left to overlap it with."""
    import threading

    from bract.privacy import bookkeeping

    model, x, y = _model("cnn", 3)
    first = model.features[0]
    seen: dict[nn.Module, str] = {}
    rule = BookKeepingClipper._rule

    def recording_rule(module, *args):
        seen[module] = threading.current_thread().name.split("_")[0]
        return rule(module, *args)

    monkeypatch.setattr(BookKeepingClipper, "_rule", staticmethod(recording_rule))

    def threads_used(free: bool, overlap: bool | None) -> tuple[str, set[str]]:
        """The first layer's rule's thread, and the other rules' threads."""
        monkeypatch.setattr(bookkeeping, "core_is_free", lambda: free)
        seen.clear()
        _bookkeeping(model, x, y, 1.0, overlap=overlap)
        assert len(seen) == 6
        return seen.pop(next(m for m in seen if type(m) is type(first)
                             and m.in_channels == first.in_channels)), set(seen.values())

    main = threading.current_thread().name
    assert threads_used(True, None) == (main, {"bract-bookkeeping"})
    assert threads_used(False, None) == (main, {main})
    assert threads_used(False, True) == (main, {"bract-bookkeeping"})
    assert threads_used(True, False) == (main, {main})


def test_a_rule_that_fails_on_the_worker_fails_the_step_and_leaves_nothing(
        monkeypatch) -> None:
    """An error inside a rule on the worker thread is raised by ``backward`` itself (the
    same exception), nothing of the failed pass is kept, the next pass gives the
    result of a fresh clipper, and ``remove`` leaves no thread behind."""
    import threading

    from bract.privacy import grad_samplers

    grad_samplers.install()
    model, x, y = _model("cnn", 4)
    expected, expected_factors, _ = _bookkeeping(model, x, y, 1.0, overlap=False)
    m = copy.deepcopy(model)
    threads = threading.active_count()
    clipper = BookKeepingClipper(m, 1.0, overlap=True)
    rule = grad_samplers.group_norm_grad_sample_from_stats

    def broken(*args, **kwargs):
        raise RuntimeError("a broken per-example rule")

    monkeypatch.setattr(grad_samplers, "group_norm_grad_sample_from_stats", broken)
    loss = nn.CrossEntropyLoss(reduction="none")
    with pytest.raises(RuntimeError, match="a broken per-example rule"):
        clipper.backward(loss(m(x), y), len(x))
    st = clipper._state()
    assert not st.rules and not st.inputs and not st.group_norm_stats
    monkeypatch.setattr(grad_samplers, "group_norm_grad_sample_from_stats", rule)
    for p in m.parameters():
        p.grad = None
    factors = clipper.backward(loss(m(x), y), len(x))
    clipper.remove()
    assert threading.active_count() == threads
    assert torch.equal(factors, expected_factors)
    for name, p in m.named_parameters():
        assert torch.equal(p.grad, expected[name]), name


def test_a_training_round_with_rules_on_a_second_thread_trains_the_same_weights() -> None:
    """PrivateTrainer's ``rule_overlap`` changes when the rules run, not what the round
    trains: a non-private, fixed-sampling round (deterministic) gives the same weights
    bit for bit with and without it, and no worker thread outlives the round."""
    import threading

    def round_weights(overlap: bool) -> tuple[dict, set[str]]:
        model = small_cnn(seed=2)
        threads_seen: set[str] = set()
        trainer = PrivateTrainer(
            model, torch.optim.SGD(model.parameters(), lr=0.1), chest_loader(96, 32),
            noise_multiplier=0.0, max_grad_norm=0.5, delta=1e-5, accountant="rdp",
            grad_sample_mode="bk", sampling_seed=7, rule_overlap=overlap,
            batch_parts=1)
        out = trainer.train_round(1, on_step=lambda _s, _t: threads_seen.update(
            t.name.split("_")[0] for t in threading.enumerate()))
        assert out.trained
        return {k: v.clone() for k, v in model.state_dict().items()}, threads_seen

    serial, serial_threads = round_weights(False)
    overlapped, overlapped_threads = round_weights(True)
    assert "bract-bookkeeping" in overlapped_threads - serial_threads
    assert not any(t.name.startswith("bract-bookkeeping") for t in threading.enumerate())
    for name, value in serial.items():
        assert torch.equal(value, overlapped[name]), name
