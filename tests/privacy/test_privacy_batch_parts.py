"""A DP-SGD step's batch in parts, each on its own thread: the same clipped sum."""

from __future__ import annotations

import copy
import threading
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from bract.privacy import PrivacyError, PrivateTrainer, batch_parts
from bract.privacy.batch_parts import BatchParts, default_batch_parts
from bract.privacy.bookkeeping import BookKeepingClipper
from tests.privacy.helpers import DP_WARNINGS, chest_loader, small_cnn
from tests.privacy.test_privacy_bookkeeping import (
    KINDS,
    _model,
    _patient_reference,
    _reference,
)

pytestmark = DP_WARNINGS

LOSS = nn.CrossEntropyLoss(reduction="none")


def _batch(kind: str, seed: int, size: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """``_model``'s model with a batch of ``size`` examples of its input shape."""
    model, x, _ = _model(kind, seed)
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, len(x), (size,), generator=g)
    # New examples of the same kind: the rows of x mixed with fresh noise (or, for
    # integer inputs, other rows).
    xs = x[rows] if not x.is_floating_point() else x[rows] + torch.randn(
        size, *x.shape[1:], generator=g)
    return model, xs, torch.randint(0, 3, (size,), generator=g)


def _one_pass(model, x, y, clip, groups=None):
    m = copy.deepcopy(model)
    clipper = BookKeepingClipper(m, clip, overlap=False)
    try:
        factors = clipper.backward(LOSS(m(x), y), len(x), groups=groups)
    finally:
        clipper.remove()
    return {n: p.grad.clone() for n, p in m.named_parameters()}, factors


def _in_parts(model, x, y, clip, parts, groups=None, min_part=1):
    m = copy.deepcopy(model)
    clipper = BookKeepingClipper(m, clip, overlap=False)
    try:
        with BatchParts(clipper, parts, min_part=min_part) as split:
            losses = split.step(lambda xb, yb: LOSS(m(xb), yb), x, y, groups)
    finally:
        clipper.remove()
    return {n: p.grad.clone() for n, p in m.named_parameters()}, losses


@settings(max_examples=40, deadline=None)
@given(kind=st.sampled_from(KINDS), seed=st.integers(0, 2**16),
       clip=st.sampled_from([1e-3, 0.1, 1.0, 1e4]), parts=st.integers(2, 4),
       size=st.integers(2, 13))
def test_the_parts_clipped_sums_add_up_to_the_whole_batchs(kind, seed, clip, parts,
                                                           size) -> None:
    """Cut into 2-4 parts (some of one example), each part's passes on its own thread,
    a batch leaves in .grad the clipped sum of the whole batch in one pass and of the
    per-example autograd reference (to float rounding), for every layer kind, and
    returns every example's loss once."""
    model, x, y = _batch(kind, seed, size)
    whole, _ = _one_pass(model, x, y, clip)
    split, losses = _in_parts(model, x, y, clip, parts)
    reference = _reference(model, x, y, clip)
    assert torch.allclose(losses.sort().values, LOSS(model(x), y).detach().sort().values,
                          rtol=1e-5, atol=1e-6)
    for name, grad in whole.items():
        torch.testing.assert_close(split[name], grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(split[name], reference[name], rtol=1e-4, atol=1e-6)


@settings(max_examples=30, deadline=None)
@given(kind=st.sampled_from(KINDS), seed=st.integers(0, 2**16),
       clip=st.sampled_from([1e-3, 0.1, 1.0, 1e4]), parts=st.integers(2, 4),
       owners=st.lists(st.integers(0, 5), min_size=2, max_size=13))
def test_in_parts_every_patient_is_clipped_whole(kind, seed, clip, parts, owners) -> None:
    """With patient groups the parts never split a patient: the .grad left is
    sum_p clip(sum_{i in p} g_i), the reference of patient-level clipping, whatever
    the records' order in the batch."""
    model, x, y = _batch(kind, seed, len(owners))
    _, groups = torch.unique(torch.tensor(owners), return_inverse=True)
    split, _ = _in_parts(model, x, y, clip, parts, groups=groups)
    reference = _patient_reference(model, x, y, groups, clip)
    for name, expected in reference.items():
        torch.testing.assert_close(split[name], expected, rtol=1e-4, atol=1e-6)


def test_parts_run_on_their_own_threads_with_torchs_threads_divided() -> None:
    """Each part's forward pass runs on a thread of its own, with torch's intra-op
    threads divided between the parts for as long as the parts are open; a batch too
    small to cut runs whole on the calling thread; closing ends the threads and
    restores torch's thread count."""
    model, x, y = _batch("cnn", 1, 32)
    m = copy.deepcopy(model)
    seen: list[tuple[str, int]] = []
    m.register_forward_pre_hook(lambda *_: seen.append(
        (threading.current_thread().name.split("_")[0], torch.get_num_threads())))
    clipper = BookKeepingClipper(m, 1.0, overlap=False)
    before = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        with BatchParts(clipper, 2) as split:
            assert torch.get_num_threads() == 2
            split.step(lambda xb, yb: LOSS(m(xb), yb), x, y)
            assert sorted(seen) == sorted([(threading.current_thread().name, 2),
                                           ("bract-batch-part", 2)])
            seen.clear()
            split.step(lambda xb, yb: LOSS(m(xb), yb), x[:15], y[:15])  # < 2 x 8
            assert seen == [(threading.current_thread().name, 2)]
        assert torch.get_num_threads() == 4
        assert not any(t.name.startswith("bract-batch-part") for t in threading.enumerate())
        with pytest.raises(RuntimeError, match="closed"):
            split.step(lambda xb, yb: LOSS(m(xb), yb), x, y)
        split.close()  # idempotent: the count stays restored
        assert torch.get_num_threads() == 4
    finally:
        torch.set_num_threads(before)
        clipper.remove()


def test_a_part_that_fails_fails_the_step_and_leaves_nothing_behind() -> None:
    """An error in any part's pass is raised by the step (the same exception), after the
    other parts ended, nothing of it is kept, the next step gives the whole batch's
    clipped sum, and closing restores torch's threads."""
    model, x, y = _batch("mlp", 2, 24)
    m = copy.deepcopy(model)
    clipper = BookKeepingClipper(m, 1.0, overlap=False)
    threads = torch.get_num_threads()
    calls = []

    def loss(xb, yb):
        calls.append(len(xb))
        if len(calls) == 2:
            raise RuntimeError("a broken forward pass")
        return LOSS(m(xb), yb)

    try:
        with BatchParts(clipper, 2, min_part=1) as split:
            with pytest.raises(RuntimeError, match="a broken forward pass"):
                split.step(loss, x, y)
            st_ = clipper._state()
            assert not st_.inputs and not st_.rules
            split.step(loss, x, y)
        assert torch.get_num_threads() == threads
        whole, _ = _one_pass(model, x, y, 1.0)
        for name, p in m.named_parameters():
            torch.testing.assert_close(p.grad, whole[name], rtol=1e-5, atol=1e-6)
    finally:
        clipper.remove()


def test_misuse_is_refused_by_name() -> None:
    model, _, _ = _model("mlp", 0)
    clipper = BookKeepingClipper(model, 1.0)  # overlap=None: could take a worker itself
    with pytest.raises(ValueError, match="overlap=False"):
        BatchParts(clipper, 2)
    clipper.remove()
    clipper = BookKeepingClipper(model, 1.0, overlap=False)
    for bad in (1, 0, True, 2.0, 65):
        with pytest.raises(ValueError, match="parts"):
            BatchParts(clipper, bad)  # type: ignore[arg-type]
    clipper.remove()


def test_auto_cuts_the_batch_in_two_only_when_torch_takes_every_core(monkeypatch) -> None:
    """``batch_parts=None``: two parts for book-keeping on a CPU where torch's threads
    take every core (at least two) and each half of the expected batch has at least
    MIN_PART_INPUT_ELEMENTS input elements; one part where a core is free (the rules
    beside the pass use it), with one core or thread, on another device, in another
    mode, when the rules are asked to overlap, or for smaller inputs."""
    cpu = torch.device("cpu")
    big = (128 * 128, 64)  # 2^19 input elements per half
    monkeypatch.setattr(batch_parts, "available_cores", lambda: 2)
    monkeypatch.setattr(batch_parts, "core_is_free", lambda: False)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert default_batch_parts(cpu, "bk", None, *big) == 2
    assert default_batch_parts(cpu, "bk", False, *big) == 2
    assert default_batch_parts(cpu, "bk", None, 2 * batch_parts.MIN_PART_INPUT_ELEMENTS, 1) == 2
    assert default_batch_parts(cpu, "bk", None,
                               2 * batch_parts.MIN_PART_INPUT_ELEMENTS - 1, 1) == 1
    assert default_batch_parts(cpu, "bk", None, 28 * 28, 64) == 1
    assert default_batch_parts(cpu, "bk", None, 30, 64) == 1  # a tabular hospital
    assert default_batch_parts(cpu, "bk", True, *big) == 1
    assert default_batch_parts(cpu, "ghost", None, *big) == 1
    assert default_batch_parts(torch.device("cuda"), "bk", None, *big) == 1
    monkeypatch.setattr(batch_parts, "core_is_free", lambda: True)
    assert default_batch_parts(cpu, "bk", None, *big) == 1
    monkeypatch.setattr(batch_parts, "core_is_free", lambda: False)
    monkeypatch.setattr(batch_parts, "available_cores", lambda: 1)
    assert default_batch_parts(cpu, "bk", None, *big) == 1


def test_a_trainer_cuts_large_inputs_by_default_and_keeps_small_ones_whole(
        monkeypatch) -> None:
    """PrivateTrainer with ``batch_parts=None`` and no free core: a 128x128 hospital's
    steps run in two parts (a forward pass on the worker thread), a 28x28 one's whole."""
    from bract.models import ChestCNN
    from bract.privacy import training

    monkeypatch.setattr(batch_parts, "available_cores", lambda: 2)
    monkeypatch.setattr(batch_parts, "core_is_free", lambda: False)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)

    def forward_threads(size: int) -> set[str]:
        torch.manual_seed(0)
        model = ChestCNN(image_size=size, channels=(2, 2), hidden=4)
        x = torch.randn(96, 1, size, size)
        loader = torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(x, torch.randint(0, 3, (96,))), batch_size=64)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer = training.PrivateTrainer(
                model, torch.optim.SGD(model.parameters(), lr=0.1), loader,
                noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5, accountant="rdp",
                grad_sample_mode="bk")
            names: set[str] = set()
            model.register_forward_pre_hook(
                lambda *_: names.add(threading.current_thread().name.split("_")[0]))
            assert trainer.train_round(1).trained
        return names

    try:
        assert "bract-batch-part" in forward_threads(128)
        assert "bract-batch-part" not in forward_threads(28)
    finally:
        torch.set_num_threads(threads)


def _trainer(**kw) -> PrivateTrainer:
    model = small_cnn(seed=2)
    return PrivateTrainer(
        model, torch.optim.SGD(model.parameters(), lr=0.1), chest_loader(160, 48),
        noise_multiplier=kw.pop("noise_multiplier", 0.0), max_grad_norm=0.5, delta=1e-5,
        accountant="rdp", grad_sample_mode=kw.pop("grad_sample_mode", "bk"), **kw)


def test_a_round_in_parts_trains_the_weights_of_a_round_in_one_pass() -> None:
    """PrivateTrainer with ``batch_parts=2`` trains (non-private, fixed sampling, so
    deterministic) the weights of ``batch_parts=1`` to float rounding, its parts ran on
    a second thread, no thread outlives the round, and the criterion the hospital
    passed is left as it was (Opacus's loss wrapper switches its reduction per call)."""

    def round_weights(parts: int) -> tuple[dict, set[str], nn.Module]:
        names: set[str] = set()
        criterion = nn.CrossEntropyLoss()
        trainer = _trainer(sampling_seed=7, batch_parts=parts, criterion=criterion)
        trainer.model.register_forward_pre_hook(
            lambda *_: names.add(threading.current_thread().name.split("_")[0]))
        out = trainer.train_round(1)
        assert out.trained and out.event.steps > 0
        return ({k: v.clone() for k, v in trainer.model.state_dict().items()}, names,
                criterion)

    threads = torch.get_num_threads()
    whole, whole_threads, _ = round_weights(1)
    split, split_threads, criterion = round_weights(2)
    assert "bract-batch-part" in split_threads - whole_threads
    assert not any(t.name.startswith(("bract-batch-part", "bract-noise-lane"))
                   for t in threading.enumerate())
    assert torch.get_num_threads() == threads
    assert criterion.reduction == "mean"
    for name, value in whole.items():
        torch.testing.assert_close(split[name], value, rtol=1e-4, atol=1e-6)


def test_a_private_round_in_parts_draws_the_noise_once_per_step() -> None:
    """With noise, a round in parts records the DP-SGD event of a round in one pass
    (steps, sigma, q, epsilon) and draws the secure noise once per step, for every
    parameter at the plan's std: the parts add clipped sums, never noise. The draw may
    use the parts' threads (SecureGaussian.threads, the one-thread stream bit for bit)
    during the round, and one thread after it."""
    def run(parts: int) -> tuple[object, list[tuple[int, float]]]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer = _trainer(noise_multiplier=1.3, batch_parts=parts, noise_prefetch=False)
            draws: list[tuple[int, float]] = []
            source = trainer._noise_source
            add = source.add_noise_each_
            source.add_noise_each_ = lambda targets, std: (
                draws.append((sum(t.numel() for t in targets), std)),
                lanes.add(source.threads), add(targets, std))[2]
            lanes: set[int] = set()
            out = trainer.train_round(1)
            assert lanes == {parts} and source.threads == 1
            return out, draws

    (a, a_draws), (b, b_draws) = run(1), run(2)
    params = sum(p.numel() for p in small_cnn().parameters())
    assert (a.event.steps, a.event.noise_multiplier, a.event.sample_rate, a.epsilon) == (
        b.event.steps, b.event.noise_multiplier, b.event.sample_rate, b.epsilon)
    assert b_draws == [(params, 1.3 * 0.5)] * b.event.steps
    assert a_draws == b_draws


def test_a_round_in_parts_that_fails_leaves_no_thread_and_torchs_threads_as_they_were(
        ) -> None:
    """A forward pass that raises in the middle of a round in parts fails the round with
    that error; no part's thread is left, torch's thread count is the one before the
    round and the ledger records the one step taken before it (its two parts' forward
    passes were the first two)."""
    trainer = _trainer(batch_parts=2)
    calls = []

    def broken(*_: object) -> None:
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("a forward pass that fails")

    trainer.model.register_forward_pre_hook(broken)
    threads = torch.get_num_threads()
    with pytest.raises(RuntimeError, match="a forward pass that fails"):
        trainer.train_round(1)
    assert torch.get_num_threads() == threads
    assert not any(t.name.startswith(("bract-batch-part", "bract-noise-lane"))
                   for t in threading.enumerate())
    assert trainer._noise_source.threads == 1
    assert [e.steps for e in trainer.ledger.events] == [1]


def test_bad_batch_parts_are_refused_before_training() -> None:
    for bad in (0, -1, 65, 1.5, True, "2"):
        with pytest.raises(PrivacyError, match="batch_parts"):
            _trainer(batch_parts=bad)
    with pytest.raises(PrivacyError, match="book-keeping"):
        _trainer(batch_parts=2, grad_sample_mode="ghost")
    with pytest.raises(PrivacyError, match="choose one"):
        _trainer(batch_parts=2, rule_overlap=True)
