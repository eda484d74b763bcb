"""The sensitivity guard (T16, T26): every mode's clipped gradient sum equals a
``torch.func`` per-example reference, or the trainer refuses naming the layer; a
forward pass that mixes examples or changes a buffer is refused before training."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils.data import DataLoader, TensorDataset

from bract.privacy import sensitivity
from bract.privacy.accounting import PrivacyBudget, PrivacyError
from bract.privacy.training import PrivateTrainer

MODES = ("hooks", "ghost", "bk")
N = 8


def reference_clipped_sum(model: nn.Module, x, y, criterion, clip: float):
    """sum_i min(1, C / (||g_i|| + 1e-6)) g_i with g_i from torch.func, per example."""
    model = copy.deepcopy(model)  # functional_call may leave a reused layer's tensors wrapped
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, xi, yi):
        return criterion(functional_call(model, p, (xi.unsqueeze(0),)), yi.unsqueeze(0))

    per = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    norms = torch.sqrt(sum((g.reshape(len(x), -1) ** 2).sum(1) for g in per.values()))
    factor = (clip / (norms + 1e-6)).clamp(max=1.0)
    return {k: (g * factor.view(-1, *[1] * (g.dim() - 1))).sum(0) for k, g in per.items()}, norms


def dp_sgd_clipped_sum(model: nn.Module, x, y, mode: str, clip: float, reduction="mean"):
    """What one DP-SGD step of bract's trainer applies, as a clipped sum: every example
    sampled (q = 1), no noise, SGD with lr 1, so the update is -sum / B ('mean')."""
    m = copy.deepcopy(model)
    before = {k: v.detach().clone() for k, v in m.named_parameters()}
    trainer = PrivateTrainer(
        m, torch.optim.SGD(m.parameters(), lr=1.0),
        DataLoader(TensorDataset(x, y), batch_size=len(x)), noise_multiplier=0.0,
        max_grad_norm=clip, delta=1e-5, grad_sample_mode=mode, sampling_seed=0,
        criterion=nn.CrossEntropyLoss(reduction=reduction),
    )
    assert trainer.train_round(1).trained
    scale = len(x) if reduction == "mean" else 1
    return {k: (before[k] - v.detach()) * scale for k, v in m.named_parameters()}


def agrees(model: nn.Module, x, y, mode: str) -> bool:
    # In float64: ill-conditioned configurations (e.g. a GroupNorm over one channel of
    # mostly padding) put every float32 implementation ~1e-4 away from the reference
    # by rounding alone, although all of them clip the same per-example norms.
    model = copy.deepcopy(model).double()
    x = x.double() if x.is_floating_point() else x
    criterion = nn.CrossEntropyLoss()
    _, norms = reference_clipped_sum(model, x, y, criterion, 1e9)
    clip = float(norms.median())  # about half the examples are clipped
    want, _ = reference_clipped_sum(model, x, y, criterion, clip)
    got = dp_sgd_clipped_sum(model, x, y, mode, clip)
    return all(torch.allclose(got[k], want[k], rtol=1e-4, atol=1e-5 * float(
        want[k].abs().max() + 1)) for k in want)


class Conv(nn.Module):
    def __init__(self, conv: nn.Module, norm: str) -> None:
        super().__init__()
        self.conv = conv
        c = conv.out_channels
        self.norm = {"group": nn.GroupNorm(min(2, c) if c % 2 == 0 else 1, c),
                     "instance": nn.InstanceNorm2d(c, affine=True),
                     "none": nn.Identity()}[norm]
        self.head = nn.LazyLinear(3)

    def forward(self, x):
        return self.head(torch.tanh(self.norm(self.conv(x))).flatten(1))


@st.composite
def conv_models(draw):
    groups = draw(st.sampled_from([1, 2]))
    conv = nn.Conv2d(
        2, 2 * draw(st.integers(1, 2)), draw(st.integers(1, 3)),
        stride=draw(st.integers(1, 2)), padding=draw(st.integers(0, 2)),
        dilation=draw(st.integers(1, 2)), groups=groups, bias=draw(st.booleans()),
        padding_mode=draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"])),
    )
    model = Conv(conv, draw(st.sampled_from(["group", "instance", "none"])))
    x = torch.randn(N, 2, 7, 7, generator=torch.Generator().manual_seed(draw(st.integers(0, 99))))
    model(x)  # materialise the lazy head
    return model, x


class Tokens(nn.Module):
    def __init__(self, **options) -> None:
        super().__init__()
        self.embed = nn.Embedding(12, 4, **options)
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 3)

    def forward(self, t):
        return self.head(self.norm(self.embed(t).mean(1)))


@st.composite
def token_models(draw):
    options = {}
    if draw(st.booleans()):
        options["padding_idx"] = 0
    if draw(st.booleans()):
        options["scale_grad_by_freq"] = True
    t = torch.randint(0, 12, (N, 6), generator=torch.Generator().manual_seed(draw(
        st.integers(0, 99))))
    t[:, :2] = 0  # repeated tokens (and the padding token, where there is one)
    return Tokens(**options), t


@settings(max_examples=25, deadline=None)
@given(case=st.one_of(conv_models(), token_models()), mode=st.sampled_from(MODES))
def test_every_mode_clips_the_true_per_example_gradient_or_refuses(case, mode) -> None:
    """The property the DP guarantee needs: the clipped sum DP-SGD applies is the
    reference's (so each example adds at most C), or training is refused naming the
    layer; and a configuration with no known obstacle is never refused."""
    model, x = case
    y = torch.arange(N) % 3
    obstacles = sensitivity.layer_obstacles(model, mode)
    if obstacles:
        with pytest.raises(PrivacyError, match="would not bound each example"):
            dp_sgd_clipped_sum(model, x, y, mode, 1.0)
    else:
        assert agrees(model, x, y, mode)


@pytest.mark.parametrize("mode", MODES)
def test_the_test_has_teeth_without_the_guard(mode, monkeypatch) -> None:
    """Negative control: with the layer check switched off, a reflect-padded
    convolution trains, and its clipped sum is wrong (the finding this guards)."""
    monkeypatch.setattr(sensitivity, "layer_obstacles", lambda model, mode: [])
    model = Conv(nn.Conv2d(2, 4, 3, padding=1, padding_mode="reflect"), "none")
    x = torch.randn(N, 2, 7, 7, generator=torch.Generator().manual_seed(0))
    model(x)
    assert not agrees(model, x, torch.arange(N) % 3, mode)


class Tied(nn.Module):
    def __init__(self, reuse: bool) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = self.a if reuse else nn.Linear(4, 4)
        if not reuse:
            self.b.weight = self.a.weight
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.b(torch.tanh(self.a(x)))))


@pytest.mark.parametrize("reuse", [False, True], ids=["shared-weight", "layer-run-twice"])
def test_weight_sharing_is_exact_in_hooks_and_refused_where_norms_are_per_layer(reuse) -> None:
    x, y = torch.randn(N, 4), torch.arange(N) % 3
    assert agrees(Tied(reuse), x, y, "hooks")
    for mode in ("ghost", "bk"):
        with pytest.raises(PrivacyError, match=r"share a parameter|run twice"):
            dp_sgd_clipped_sum(Tied(reuse), x, y, mode, 1.0)
    model = Tied(reuse)
    trainer = PrivateTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1),
                             DataLoader(TensorDataset(x, y), batch_size=4),
                             noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5)
    assert trainer.grad_sample_mode == "hooks"  # what auto picks for a tied model


# ------------------------------------------------------------------------ the probe
class BatchCentred(nn.Module):
    """Batch statistics without a BatchNorm module: examples mix."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = self.body(x)
        return self.head(h - h.mean(0, keepdim=True))


class RunningMean(nn.Module):
    """A buffer that averages private inputs in training mode."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(4, 3)
        self.register_buffer("seen_mean", torch.zeros(4))

    def forward(self, x):
        if self.training:
            self.seen_mean.mul_(0.9).add_(0.1 * x.detach().mean(0))
        return self.head(x)


def _trainer(model: nn.Module, **kw) -> PrivateTrainer:
    x, y = torch.randn(16, 4), torch.arange(16) % 3
    return PrivateTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1),
                          DataLoader(TensorDataset(x, y), batch_size=4), noise_multiplier=1.0,
                          max_grad_norm=1.0, delta=1e-5, **kw)


@pytest.mark.parametrize("mode", MODES)
def test_a_forward_that_mixes_examples_is_refused_naming_the_module(mode) -> None:
    with pytest.raises(PrivacyError, match=r"influence each other .* output of head"):
        _trainer(BatchCentred(), grad_sample_mode=mode)


def test_a_buffer_that_training_changes_is_refused_unless_declared_public() -> None:
    with pytest.raises(PrivacyError, match=r"buffer\(s\) \['seen_mean'\]"):
        _trainer(RunningMean())
    model = RunningMean()
    _trainer(model, public_buffers=("seen_mean",))
    assert torch.equal(model.seen_mean, torch.zeros(4))  # the probe ran on a copy


class SwitchedMixing(nn.Module):
    """Mixes examples only when its buffer says so: a flag the global weights carry."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)
        self.register_buffer("centre", torch.zeros(()))

    def forward(self, x):
        h = self.body(x)
        return self.head(h - self.centre * h.mean(0, keepdim=True))


class GatedMixing(SwitchedMixing):
    """The same switch as a parameter that starts at zero (a ReZero-style gate)."""

    def __init__(self) -> None:
        super().__init__()
        del self.centre
        self.centre = nn.Parameter(torch.zeros(()), requires_grad=False)


@pytest.mark.parametrize("model_cls", [SwitchedMixing, GatedMixing])
def test_global_weights_that_switch_on_mixing_are_probed_again_before_any_step(
        model_cls) -> None:
    """The probe's verdict holds for the weights it saw: global weights that switch a
    buffer or a frozen gate parameter on (the forward then mixes examples) are probed
    again before the round, which is refused with nothing recorded; weights that mix
    nothing train."""
    model = model_cls()
    trainer = _trainer(model, grad_sample_mode="hooks")
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    assert trainer.train_round(1, global_weights=weights).trained
    switched = {**weights, "centre": torch.ones(())}
    before = trainer.ledger
    with pytest.raises(PrivacyError, match=r"influence each other"):
        trainer.train_round(2, global_weights=switched)
    assert trainer.ledger == before


def test_dropout_and_per_example_models_pass_the_probe() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.GroupNorm(2, 8), nn.Linear(8, 3))
    assert _trainer(model).grad_sample_mode == "bk"


def test_a_loss_that_mixes_examples_is_refused() -> None:
    class Contrastive(nn.CrossEntropyLoss):
        def forward(self, out, y):
            return super().forward(out - out.mean(0, keepdim=True), y)

    with pytest.raises(PrivacyError, match="one value per example"):
        _trainer(nn.Linear(4, 3), criterion=Contrastive(), grad_sample_mode="hooks")


# ------------------------------------------------------------------ loss reductions
@pytest.mark.parametrize("mode", MODES)
def test_mean_and_sum_reductions_clip_the_same_examples(mode) -> None:
    """'mean' applies the clipped sum / expected batch size, 'sum' the clipped sum."""
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    x, y = torch.randn(N, 4), torch.arange(N) % 3
    mean = dp_sgd_clipped_sum(model, x, y, mode, 0.5, "mean")
    total = dp_sgd_clipped_sum(model, x, y, mode, 0.5, "sum")
    want, _ = reference_clipped_sum(model, x, y, nn.CrossEntropyLoss(reduction="sum"), 0.5)
    for k in want:
        assert torch.allclose(mean[k], want[k], atol=1e-5)
        assert torch.allclose(total[k], want[k], atol=1e-5)


@pytest.mark.parametrize("mode", [*MODES, "auto"])
def test_reduction_none_is_refused_with_the_fix(mode) -> None:
    with pytest.raises(PrivacyError, match=r"reduction='none'.*'mean'.*'sum'"):
        _trainer(nn.Linear(4, 3), criterion=nn.CrossEntropyLoss(reduction="none"),
                 grad_sample_mode=mode)


def test_functional_dropout_is_not_taken_for_mixing() -> None:
    """F.dropout draws its mask per batch, so a batch without one example gets other
    masks; the probe tells that randomness from mixing (eval mode) and accepts it."""

    class FunctionalDropout(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Linear(4, 8)
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            h = nn.functional.dropout(torch.tanh(self.body(x)), 0.5, self.training)
            return self.head(h)

    assert _trainer(FunctionalDropout()).grad_sample_mode == "bk"
    with pytest.raises(PrivacyError, match="influence each other"):
        _trainer(BatchCentred())  # still refused


def test_a_forward_that_depends_on_the_batch_size_is_refused() -> None:
    class PerBatchScale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Linear(4, 3)

        def forward(self, x):
            return self.head(x) / len(x)

    with pytest.raises(PrivacyError, match="removing one example changes the others"):
        _trainer(PerBatchScale())


# ---------------------------------------- the probe answers nothing about patient data
FMAX = float(torch.finfo(torch.float32).max)


class Recorded(torch.utils.data.Dataset):
    """A hospital's records that note which items were read."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y
        self.read: list[int] = []

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        self.read.append(int(i))
        return self.x[i], self.y[i]


def nan_iff_above(j: int, bound: float, sign: float) -> dict:
    """The red team's question to an ``nn.Linear(4, 3)``: logit 0 is ``s (sign x_j -
    bound) + FMAX``, which overflows (loss NaN) iff ``sign * x_j > bound``."""
    s = 1e36
    weight = torch.zeros(3, 4)
    weight[0, j] = sign * s
    bias = torch.tensor([FMAX - s * bound, 0.0, 0.0])
    return {"weight": weight.numpy(), "bias": bias.numpy()}


#: The questions: every feature, both signs, thresholds across the records' range.
QUESTIONS = [(j, b, sign) for j in range(4) for sign in (1.0, -1.0)
             for b in (0.0, 0.25, 0.5, 1.0, 2.0)]


def answers(x: torch.Tensor, y: torch.Tensor, mode: str) -> list[str]:
    """What a hospital holding (x, y), whose budget is spent, replies to each question:
    an error (the probe's refusal), or the budget's refusal."""
    model = nn.Linear(4, 3)
    trainer = PrivateTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1),
                             DataLoader(TensorDataset(x, y), batch_size=4),
                             noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5,
                             grad_sample_mode=mode, accountant="rdp",
                             budget=PrivacyBudget(0.01, 1e-5, "rdp"))
    out = []
    for j, bound, sign in QUESTIONS:
        try:
            outcome = trainer.train_round(1, global_weights=nan_iff_above(j, bound, sign))
            out.append(f"refused by the budget: {not outcome.trained}")
        except Exception as exc:  # any error reaches the coordinator as the reply
            out.append(f"error: {type(exc).__name__}: {exc}")
    return out


def test_the_probe_reads_no_patient_record() -> None:
    """The probe runs on public synthetic inputs: building the trainer reads one record
    for the data's format (shapes and dtypes, no value kept), and probing a round's
    weights reads nothing."""
    x, y = torch.randn(16, 4), torch.arange(16) % 3
    data = Recorded(x, y)
    model = nn.Linear(4, 3)
    trainer = PrivateTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1),
                             DataLoader(data, batch_size=4), noise_multiplier=1.0,
                             max_grad_norm=1.0, delta=1e-5, accountant="rdp",
                             budget=PrivacyBudget(0.01, 1e-5, "rdp"))
    assert data.read == [0]
    probe_x, _ = trainer._probe_batch
    assert not any(torch.equal(row, record) for row in probe_x for record in x)
    data.read.clear()
    weights = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    assert not trainer.train_round(1, global_weights=weights).trained  # the budget's refusal
    with pytest.raises(PrivacyError, match="NaN or infinite"):
        trainer.train_round(1, global_weights=nan_iff_above(0, 0.0, 1.0))
    assert data.read == []


@pytest.mark.parametrize("mode", MODES)
def test_crafted_weights_get_the_same_answer_from_neighbouring_datasets(mode) -> None:
    """The red team's oracle: weights whose loss is NaN iff a record's feature passes a
    threshold, sent after the budget is spent. Every answer (the probe's refusal, or the
    budget's) is the same for datasets that differ in one record (changed, removed, or
    turned into NaN): the probe's verdict depends on the weights alone."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 4, generator=g), torch.arange(8) % 3
    expected = answers(x, y, mode)
    changed = x.clone()
    changed[1] = torch.tensor([2.5, -2.5, 1.5, -0.7])
    poisoned = x.clone()
    poisoned[1] = torch.nan
    keep = [i for i in range(8) if i != 1]
    assert answers(changed, y, mode) == expected
    assert answers(poisoned, y, mode) == expected
    assert answers(x[keep], y[keep], mode) == expected
    # The questions are answered (some refused, some not): by the public inputs.
    assert len(set(expected)) > 1


def test_a_non_finite_probe_is_a_refusal_with_its_reason() -> None:
    """Outputs that overflow on the probe's public inputs are refused saying so (the
    comparisons never fail on them); NaN and infinities compare as themselves."""
    model = nn.Linear(4, 3)
    with torch.no_grad():
        model.weight.fill_(FMAX)
    fmt = sensitivity.ProbeFormat((4,), torch.float32, (), torch.int64)
    x, y = sensitivity.public_probe_batch(model, fmt)
    with pytest.raises(PrivacyError, match="NaN or infinite with these weights"):
        sensitivity.probe(model, x, y, nn.CrossEntropyLoss())
    a = torch.tensor([float("nan"), float("inf"), 1.0])
    assert sensitivity._close(a, a.clone())
    assert not sensitivity._close(a, torch.tensor([float("nan"), float("inf"), 2.0]))


def test_the_probe_batch_is_public_and_fits_the_model() -> None:
    """The same synthetic batch for every dataset of one format; token ids below the
    embedding's size, classes below the model's output width, float targets in [0, 1)."""
    fmt = sensitivity.ProbeFormat((6,), torch.int64, (), torch.int64)
    tokens = Tokens()
    x, y = sensitivity.public_probe_batch(tokens, fmt)
    again, _ = sensitivity.public_probe_batch(Tokens(), fmt)
    assert torch.equal(x, again) and x.dtype == torch.int64
    assert int(x.min()) >= 0 and int(x.max()) < 12
    assert y.shape == (sensitivity.PROBE_EXAMPLES,) and int(y.max()) < 3
    images = sensitivity.ProbeFormat((1, 5, 5), torch.float32, (), torch.float32)
    xi, yi = sensitivity.public_probe_batch(nn.Sequential(nn.Flatten(), nn.Linear(25, 1)),
                                            images)
    assert xi.shape == (sensitivity.PROBE_EXAMPLES, 1, 5, 5) and bool(torch.isfinite(xi).all())
    assert yi.dtype == torch.float32 and 0 <= float(yi.min()) and float(yi.max()) < 1
